"""Benchmark of the quantizer and the diagnostic suite on CPU (prints ratios; not a pytest test).

    OMP_WAIT_POLICY=PASSIVE python tests/bench_quantizer.py
    # with vector-quantize-pytorch for comparison (never a project requirement):
    pip install --target /tmp/vqp --no-deps vector-quantize-pytorch einops einx frozendict loguru torch-einops-utils
    PYTHONPATH=/tmp/vqp OMP_WAIT_POLICY=PASSIVE python tests/bench_quantizer.py

Forward + backward of 4,096 vectors x dim 32 at 1,024 / 8,192 / 16,384 / 65,536 codes, run side by side in
one process (the machine is shared: only ratios within one run mean anything), for
  ours-ema / ours-grad   VectorQuantizer with an EMA / a gradient codebook (train mode);
  bare                   one torch.addmm of the full N x K distance matrix + argmin (search only);
  vqp                    vector_quantize_pytorch.VectorQuantize (EMA), when importable.
Peak extra memory is the growth of the resident-set high-water mark (VmHWM in /proc/self/status,
Linux) over one forward + backward in a fresh subprocess per configuration. Not ru_maxrss: Linux
carries the parent's peak into a child across fork + exec, hiding the child's own growth; and
torch's CPU allocator has no peak statistics (tracemalloc does not see it).
Last, the time of the whole coverage suite (common.codebook_metrics) on a 65,536 x 32 codebook.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import VectorQuantizer, codebook_metrics  # noqa: E402

N, DIM = 4096, 32
CODES = (1024, 8192, 16384, 65536)


def have_vqp():
    try:
        import vector_quantize_pytorch  # noqa: F401
        return True
    except ImportError:
        return False


def make_step(method, num_codes):
    """A closure running one forward (+ backward where there is one) of `method`."""
    torch.manual_seed(0)
    z = torch.randn(N, DIM, requires_grad=True)
    if method == "bare":
        codes = torch.randn(num_codes, DIM)
        return lambda: torch.addmm(codes.pow(2).sum(1), z.detach(), codes.t(), alpha=-2.0).argmin(1)
    if method == "vqp":
        from vector_quantize_pytorch import VectorQuantize
        vq = VectorQuantize(dim=DIM, codebook_size=num_codes, decay=0.99, commitment_weight=0.25).train()
        x = z[None]

        def step():
            q, _, loss = vq(x)
            (q.square().mean() + loss.sum()).backward()
        return step
    vq = VectorQuantizer(num_codes, DIM, ema_decay=0.99 if method == "ours-ema" else None,
                         init="gaussian").train()

    def step():
        q, _, loss = vq(z)
        (q.square().mean() + loss).backward()
    return step


def methods():
    return ["ours-ema", "ours-grad", "bare"] + (["vqp"] if have_vqp() else [])


def time_all(reps):
    """Median seconds per call of every method at every codebook size, calls interleaved."""
    out = {}
    for k in CODES:
        steps = {m: make_step(m, k) for m in methods()}
        times = {m: [] for m in steps}
        for m, f in steps.items():
            f()  # warm-up
        for _ in range(reps if k < 65536 else max(2, reps // 2)):
            for m, f in steps.items():
                t0 = time.perf_counter()
                f()
                times[m].append(time.perf_counter() - t0)
        out[k] = {m: statistics.median(t) for m, t in times.items()}
    return out


def peak_extra_mib(method, num_codes):
    """Resident high-water growth over one call, in a fresh subprocess."""
    proc = subprocess.run([sys.executable, __file__, "--memory", method, str(num_codes)],
                          capture_output=True, text=True, timeout=600, env=os.environ)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return float(proc.stdout.strip())


def high_water_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def measure_memory(method, num_codes):
    step = make_step(method, num_codes)
    before = high_water_kib()
    step()
    print((high_water_kib() - before) / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory", nargs=2, metavar=("METHOD", "CODES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory:
        return measure_memory(args.memory[0], int(args.memory[1]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={N}, dim={DIM}"
          + ("" if have_vqp() else "  (vector-quantize-pytorch not importable: vqp column skipped)"))
    memory = {k: {m: peak_extra_mib(m, k) for m in methods()} for k in CODES}
    times = time_all(args.reps)
    header = "| codes | " + " | ".join(f"{m} ms" for m in methods()) + " | ours-ema / bare | " + \
        ("vqp / ours-ema | " if have_vqp() else "") + " | ".join(f"{m} MiB" for m in methods()) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for k in CODES:
        t, m = times[k], memory[k]
        row = [str(k)] + [f"{t[x] * 1e3:.0f}" for x in methods()] + [f"{t['ours-ema'] / t['bare']:.2f}x"]
        if have_vqp():
            row.append(f"{t['vqp'] / t['ours-ema']:.1f}x")
        row += [f"{m[x]:.0f}" for x in methods()]
        print("| " + " | ".join(row) + " |")

    codes = torch.randn(65536, 32, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    metrics = codebook_metrics(codes)
    print(f"coverage suite on 65,536 x 32: {time.perf_counter() - t0:.1f} s  ({metrics})")


if __name__ == "__main__":
    main()
