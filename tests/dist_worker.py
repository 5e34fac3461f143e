"""Helper for tests/test_distributed.py (not a test itself): a few quantizer steps on this rank's
shard of fixed global data, saving the quantizer state so the test can compare ranks with each
other and with one process on the whole data.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT   # two ranks, gloo on CPU
    python tests/dist_worker.py OUT                                     # the single-process reference

Global data is drawn from a fixed generator; rank r of W takes rows [r*n/W, (r+1)*n/W) of every
global batch, so all_gather_rows(shards) is exactly the global batch in order.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (UsageCounter, VectorQuantizer, cleanup_distributed, deferred_switch,  # noqa: E402
                    seed_everything, setup_distributed, wrap_ddp)

NUM_CODES, DIM, STEPS, BATCH = 16, 4, 6, 64


def shard(x, info):
    n = x.shape[0] // info.world_size
    return x[info.rank * n:(info.rank + 1) * n]


def main(out):
    info = setup_distributed("cpu")
    seed_everything(0)
    # Ranks' global RNG streams diverge in training (dropout, augmentation); make them differ here
    # too, so only drawing on rank 0 + broadcast can keep dead-code replacements identical.
    torch.rand(1 + info.rank)
    g = torch.Generator().manual_seed(123)
    init_data = torch.randn(2 * NUM_CODES, DIM, generator=g)  # ratio 2: exactly what the switch needs
    # training data from a narrower distribution, so outlying codes fall out of use and get replaced
    train = [0.5 * torch.randn(BATCH, DIM, generator=g) for _ in range(STEPS)]

    vq = VectorQuantizer(NUM_CODES, DIM, ema_decay=0.9, dead_code_steps=2, enabled=False)
    replaced = []
    replace = vq.replace_codes
    vq.replace_codes = lambda mask, z: (replaced.append(int(mask.sum())), replace(mask, z))
    deferred_switch(vq, lambda batch: batch, [shard(init_data, info)], ratio=2, method="kmeans", seed=1)
    init_codebook = vq.codebook.clone()

    vq.train()
    for batch in train:
        vq(shard(batch, info))

    vq.eval()
    usage = UsageCounter(NUM_CODES)
    for batch in train:
        usage.update(vq(shard(batch, info))[1])
    usage.all_reduce()

    # wrap_ddp must not broadcast buffers in forward (it would overwrite every rank's EMA state
    # with rank 0's): a buffer changed on each rank after wrapping keeps its rank's value.
    probe = torch.nn.Linear(2, 1)
    probe.register_buffer("mark", torch.zeros(1))
    ddp = wrap_ddp(probe, info)
    probe.mark.fill_(float(info.rank))
    ddp(torch.ones(3, 2)).sum().backward()

    torch.save({"world_size": info.world_size, "buffer_after_forward": probe.mark.item(), "init_codebook": init_codebook, "codebook": vq.codebook.clone(),
                "cluster_size": vq.cluster_size.clone(), "embed_avg": vq.embed_avg.clone(),
                "steps_unused": vq.steps_unused.clone(), "counts": usage.counts.clone(), "replaced": replaced},
               os.path.join(out, f"rank{info.rank}.pt"))
    # the DDP wrapper goes before its process group: a reducer that outlives the group can abort the
    # process at exit ("terminate called without an active exception"), as the training scripts
    # avoid by keeping theirs inside their training functions
    del ddp
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
