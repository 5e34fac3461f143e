"""Two gloo ranks on CPU (torchrun --standalone, which picks a free port) against one process on the
concatenated global batch: deferred_switch init (k-means on rank 0, broadcast), EMA statistics
all-reduce, dead-code replacement drawn on rank 0, usage counts all-reduce. The work is in
tests/dist_worker.py."""
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
STATE = ("init_codebook", "codebook", "cluster_size", "embed_avg", "steps_unused", "counts")


def run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    dist_out, single_out = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
         str(dist_out)], dist_out)
    run([sys.executable, WORKER, str(single_out)], single_out)
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return load(dist_out / "rank0.pt"), load(dist_out / "rank1.pt"), load(single_out / "rank0.pt")


def test_ranks_hold_identical_quantizer_state(states):
    rank0, rank1, _ = states
    assert rank0["world_size"] == rank1["world_size"] == 2
    for key in STATE:
        assert torch.equal(rank0[key], rank1[key]), key
    assert rank0["replaced"] == rank1["replaced"]


def test_two_ranks_equal_one_process_on_the_global_batch(states):
    rank0, _, single = states
    assert single["world_size"] == 1
    assert torch.equal(rank0["init_codebook"], single["init_codebook"])  # same gathered pool, same k-means
    # the run exercised dead-code replacement, at the same steps as in one process
    assert sum(single["replaced"]) > 0 and rank0["replaced"] == single["replaced"]
    assert torch.equal(rank0["steps_unused"], single["steps_unused"])
    for key in ("codebook", "cluster_size", "embed_avg"):  # all-reduced sums: equal up to rounding
        assert torch.allclose(rank0[key], single[key], rtol=1e-5, atol=1e-6), key


def test_usage_all_reduce_equals_single_process_counts(states):
    rank0, _, single = states
    assert torch.equal(rank0["counts"], single["counts"])
    assert rank0["counts"].sum() == 6 * 64  # every vector of every global batch counted once


def test_ddp_keeps_each_ranks_buffers_in_forward(states):
    rank0, rank1, _ = states
    assert rank0["buffer_after_forward"] == 0.0 and rank1["buffer_after_forward"] == 1.0


FROZEN = '''
import sys, time
sys.path.insert(0, {root!r})
import argparse, torch
import common

def main(args):
    common.setup_distributed("cpu", timeout_minutes=0.05)  # 3 s
    if common.torch.distributed.get_rank() == 1:
        time.sleep(12)  # frozen past rank 0's timeout
    common.all_reduce_sum(torch.ones(1))

common.run_cli(main, argparse.ArgumentParser())
'''


def test_a_frozen_rank_ends_every_rank_with_one_line(tmp_path):
    """Rank 1 freezes past --dist-timeout: rank 0 times out and ends with one 'error:' line on its
    stderr (exit status 2), not a gloo traceback; torchrun then stops rank 1 (if it finds its peer
    gone first, it says so in one line too)."""
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    logs = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--log-dir", str(logs), "--redirects", "3", str(script)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    stderrs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(stderrs) == ["0", "1"]
    for rank, text in stderrs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == (1 if rank == "0" else len(lines[:1])), text[-2000:]
        assert all(line.startswith(f"error: rank {rank}: a torchrun peer died") for line in lines), text[-2000:]
    assert "--dist-timeout" in stderrs["0"] and "Timed out" in stderrs["0"]
