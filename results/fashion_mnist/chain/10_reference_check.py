"""Issue 17 item 7, one factor: how much of the rerun's g-FID change comes from the reference set
alone? Scores the saved samples of one MaskGIT run (sampling 0) against the new g-FID reference (a
class-stratified, seeded 2,000 of the test split: must reproduce the run's JSON) and against the old
one (the first 2,000 test images), with the same Inception.

    PYTHONPATH=. python results/fashion_mnist/chain/10_reference_check.py runs/fashion_chain_protocol baseline
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import common

out, arm = sys.argv[1], sys.argv[2]
run = os.path.join(out, "maskgit", f"maskgit_vq_{arm}_fashion-mnist")
result = common.read_json(run + ".json")
_, cfg = common.load_tokenizer(os.path.join(out, f"vq_{arm}_fashion-mnist", "best.pt"))
files = sorted(f for f in os.listdir(os.path.join(run, "samples")) if f.endswith(".png"))
images = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(run, "samples", f)).convert("RGB")))
                      for f in files]).permute(0, 3, 1, 2).float() / 255
stratified = common.tokenizer_test_split(cfg, None, 2000)
first = torch.utils.data.Subset(common.tokenizer_test_split(cfg, None, 0), range(2000))
row = {"run": os.path.relpath(run, out), "samples": len(files), "gfid_in_json": result["metrics"]["gfid"],
       "gfid_stratified_2000": common.fidelity_metrics(images, stratified, device="cpu")["fid"],
       "gfid_first_2000": common.fidelity_metrics(images, first, device="cpu")["fid"]}
print(json.dumps(row))
