"""Warm torch-fidelity's cache of the g-FID reference (the first 2,000 Fashion-MNIST test images,
as the tokenizers saw them) once, so the two generator runs that follow share it.

    python 2_fid_reference.py runs/fashion_chain/vq_baseline_fashion-mnist/best.pt   # from the repository root

Ran at code commit d7ac63e; 454 s."""
import sys, time
import torch
import common

t0 = time.time()
_, cfg = common.load_tokenizer(sys.argv[1])
ref = common.tokenizer_test_split(cfg, None, 2000)
name = common.tokenizer_test_cache_name(cfg, None, 2000)
probe = torch.utils.data.Subset(ref, range(10))
print(common.fidelity_metrics(probe, ref, fid=True, cache=True, input2_cache_name=name), name, f"{time.time() - t0:.0f} s")
