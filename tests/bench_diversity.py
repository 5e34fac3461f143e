"""Benchmark of LPIPS diversity over all pairs on CPU (prints numbers; not a pytest test).

    python evaluate.py weights          # once: the real LPIPS weights (offline, see its docstring)
    OMP_WAIT_POLICY=PASSIVE python tests/bench_diversity.py [--images 5000] [--size 128] [--net alex]

1. Exactness: common.lpips_diversity, which computes all pairs from features computed once per
   image (common.lpips_all_pairs_mean), against lpips.LPIPS called on every pair of a 64-image
   sample (2,016 pairs, 64 pairs per call): relative difference, target <= 1e-5.
2. Scale: all pairs of 5,000 images of 128x128 (12.5 M pairs): wall time (target <= 3 min on 2
   CPU cores) and the growth of the resident-set peak (VmHWM, reset through /proc/self/clear_refs
   first; Linux) over the call: bounded, whatever the number of images.
3. Speed-up: the pair-by-pair time per pair measured in step 1, in the same process, extrapolated
   to all pairs of step 2, over step 2's time. The machine may be shared: only this ratio and the
   exactness are comparable between runs.
Images: smooth random structure plus noise, deterministic, stored as uint8 (lpips_diversity
accepts uint8: 5,000 x 3 x 128 x 128 is 234 MiB, against 938 MiB as float32).
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import load_lpips, lpips_diversity, run_cli, to_uint8  # noqa: E402


def make_images(n, size, seed=0, chunk=500):
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        coarse = torch.rand(b, 3, 8, 8, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        out[s:s + b] = to_uint8(0.85 * x + 0.15 * torch.rand(b, 3, size, size, generator=g))
    return out


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def pair_by_pair(images, model, pairs_per_call=64):
    """Mean of lpips.LPIPS over every pair (i < j), called on batches of pairs: the old method."""
    n = images.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    x = images.float() / 255
    total = 0.0
    for s in range(0, i.numel(), pairs_per_call):
        total += float(model(x[i[s:s + pairs_per_call]], x[j[s:s + pairs_per_call]]).double().sum())
    return total / i.numel(), i.numel()


def main(args):
    model = load_lpips(args.net)
    threads = torch.get_num_threads()
    print(f"LPIPS ({args.net}) diversity, {threads} threads, load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine inflates times; ratios within this run are what compare)")

    sample = make_images(args.sample, args.size, seed=1)
    t0 = time.perf_counter()
    reference, num_pairs = pair_by_pair(sample, model)
    t_pairs = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = lpips_diversity(sample, model)
    t_fast_sample = time.perf_counter() - t0
    rel = abs(fast - reference) / reference
    print(f"1. exactness, {args.sample} images of {args.size}x{args.size} ({num_pairs} pairs): pair by pair "
          f"{reference:.8f} in {t_pairs:.1f} s, all-pairs path {fast:.8f} in {t_fast_sample:.2f} s, "
          f"relative difference {rel:.1e} ({'within' if rel <= 1e-5 else 'ABOVE'} the 1e-5 target)")

    images = make_images(args.images, args.size, seed=2)
    total_pairs = args.images * (args.images - 1) // 2
    rss0 = status_kib("VmRSS")
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    value = lpips_diversity(images, model, batch_size=args.batch_size, progress=args.progress)
    t_all = time.perf_counter() - t0
    growth = max(0, status_kib("VmHWM") - rss0) / 1024
    print(f"2. all {total_pairs:,} pairs of {args.images:,} images of {args.size}x{args.size} (uint8, "
          f"{images.numel() / 2 ** 20:.0f} MiB): LPIPS diversity {value:.6f} in {t_all:.1f} s "
          f"({'within' if t_all <= 180 else 'ABOVE'} the 3 min target); peak resident memory "
          f"{'+' if peak_reset else 'process peak '}{growth:.0f} MiB over the call")
    per_pair = t_pairs / num_pairs
    est = per_pair * total_pairs
    print(f"3. pair by pair: {1e3 * per_pair:.2f} ms per pair here -> {est / 3600:.1f} h ({est / 86400:.1f} days) "
          f"for all {total_pairs:,} pairs; speed-up of the all-pairs path: {est / t_all:,.0f}x")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images for the all-pairs run (paper: 5,000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--sample", type=int, default=64, help="images of the pair-by-pair exactness check")
    p.add_argument("--net", default="alex", choices=("alex", "vgg"))
    p.add_argument("--batch-size", type=int, default=64, help="images per forward in the all-pairs path")
    p.add_argument("--progress", action="store_true")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
