"""Turn the result JSON files written by the experiment scripts into the paper's tables and figures.

evaluate.py never trains; the scripts never format tables. Every table prints the paper's value
beside ours so agreement and disagreement are visible at a glance.

Commands:
    # coverage diagnostics (paper appendix A.2) of any codebook
    python evaluate.py codebook runs/cifar/deferred_ema_8192.pt
    python evaluate.py codebook foreign.ckpt --key state_dict.quantize.embedding.weight --json
    python evaluate.py codebook codes.npy

    # every table / figure whose runs exist under a results folder (markdown + PNG figures)
    python evaluate.py tables runs/ --out report/
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch

from common import UserError, codebook_metrics, load_checkpoint, read_json, run_cli, write_json

# ================================================================================================
# The paper's reported values, in one place (section 6 and appendix A). Keys match our metrics.
# ================================================================================================

PAPER = {}

# ---- synthetic mixture (synthetic_gmm.py) ----
# Figure 2 is qualitative (scatter plots and KDEs, no numbers); its claim per arm (section 4):
PAPER["synthetic_gmm"] = {
    "baseline": "codes concentrate in a narrow region; reconstructions collapse onto a subset of modes",
    "deferred": "codes spread across the embedding support; all modes reconstructed",
}


# ---- CIFAR-10 (cifar_sweep.py): Figure 5, Tables 8-11, Figure 6 ----


# ---- ImageNet-100 / ODIR tokenizers (imagenet_tokenizer.py): Tables 2, 3, 5, 15, 16, 17 ----


# ================================================================================================
# Loading results
# ================================================================================================


def load_results(root):
    """Every result JSON under `root` (recursively), as a list of dicts with a 'path' added."""
    paths = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True))
    results = []
    for path in paths:
        record = read_json(path)
        if isinstance(record, dict) and "experiment" in record and "metrics" in record:
            record["path"] = path
            results.append(record)
    return results


def select(results, experiment, **arg_filters):
    """Results of one experiment whose args match every filter."""
    return [r for r in results if r["experiment"] == experiment
            and all(r["args"].get(k) == v for k, v in arg_filters.items())]


def fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ================================================================================================
# `codebook`: the diagnostic suite for any codebook
# ================================================================================================

# Our checkpoints store the effective codebook under 'codebook' and the usage counts of the final
# evaluation under 'code_counts' (see `save_checkpoint` calls in the scripts).
DEFAULT_CODEBOOK_KEYS = ("codebook",)


def lookup_key(obj, key):
    """Follow a dotted key path through nested dicts. A state-dict key itself contains dots
    ('quantize.embedding.weight'), so at each level the longest matching prefix wins."""
    if not key:
        return obj
    if not isinstance(obj, dict):
        raise KeyError(key)
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in obj:
            try:
                return lookup_key(obj[head], ".".join(parts[i:]))
            except KeyError:
                continue
    raise KeyError(key)


def load_codebook(path, key=None):
    """A (num_codes, dim) float tensor from a .npy file or a torch checkpoint (+ usage counts
    when the checkpoint stores them under 'code_counts')."""
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path)).float(), None
    ckpt = load_checkpoint(path)
    keys = [key] if key else DEFAULT_CODEBOOK_KEYS
    for k in keys:
        try:
            codes = lookup_key(ckpt, k)
            break
        except KeyError:
            continue
    else:
        raise UserError(f"no codebook at key '{key}' in {path}" if key else
                        f"no codebook found in {path}; name its dotted key path with --key")
    codes = torch.as_tensor(codes).float()
    if codes.dim() != 2:
        raise UserError(f"the tensor at '{k}' has shape {tuple(codes.shape)}; a codebook is (num_codes, dim)")
    counts = ckpt.get("code_counts") if isinstance(ckpt, dict) else None
    return codes, counts


def cmd_codebook(args):
    codes, counts = load_codebook(args.path, args.key)
    metrics = codebook_metrics(codes, counts)
    if args.json:
        import json
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>10}: {fmt(v, 4)}")
    return metrics


# ================================================================================================
# `tables`: every paper table / figure whose runs exist
# ================================================================================================

# name -> function(results, out_dir) returning markdown (or None when its runs are absent).
RENDERERS = {}


def renderer(name):
    def register(fn):
        RENDERERS[name] = fn
        return fn
    return register


# ---- synthetic mixture renderers ----

SYNTH_COLUMNS = (("mse", "MSE", 3), ("modes_covered", "modes covered", 1), ("own_mode_share", "own-mode", 3),
                 ("within_mode_spread", "spread", 2), ("perplexity", "perplexity", 1),
                 ("used_codes", "used codes", 1), ("euclidean", "euclidean", 3), ("cosine", "cosine", 3),
                 ("vendi", "vendi", 2))


def mean_std(values, digits):
    """'mean' for one seed, 'mean ± std' (sample std) over several."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return "–"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


@renderer("Figure 2 (synthetic)")
def render_synthetic(results, out_dir):
    """Baseline vs deferred per (input dim, token dim, codebook update), averaged over seeds.
    'init euclidean' is the mean pairwise distance of the codebook right after initialisation
    (untrained encoder for the baseline, trained one for deferred: the mechanism of section 4)."""
    runs = select(results, "synthetic_gmm")
    if not runs:
        return None
    groups = {}
    for r in runs:
        a = r["args"]
        key = (a["dim"], a["token_dim"], bool(a["ema"]), r["method"].replace("_ema", ""))
        groups.setdefault(key, []).append(r)
    header = (["input → token", "codebook", "method", "seeds"] + [c[1] for c in SYNTH_COLUMNS]
              + ["init euclidean", "paper (qualitative)"])
    rows = []
    for (dim, token_dim, ema, method) in sorted(groups):  # baseline sorts before deferred
        group = groups[(dim, token_dim, ema, method)]
        cells = [mean_std([r["metrics"].get(k) for r in group], d) for k, _, d in SYNTH_COLUMNS]
        init = mean_std([(r.get("init_codebook") or {}).get("euclidean") for r in group], 3)
        rows.append([f"{dim} → {token_dim}", "EMA" if ema else "gradient", method, len(group)] + cells
                    + [init, PAPER["synthetic_gmm"].get(method, "–")])
    return markdown_table(header, rows) + (
        "\n\nModes covered: cluster means (of 10) nearest to at least 5% of all reconstructions; "
        "own-mode: share of points reconstructed nearest their own cluster mean; spread: within-cluster "
        "variance of the reconstructions over that of the data (0: every mode collapsed to a point). "
        "Mean ± std over seeds.")


# ---- CIFAR-10 renderers ----


# ---- ImageNet-100 / ODIR tokenizer renderers ----


def cmd_tables(args):
    results = load_results(args.runs)
    if not results:
        raise UserError(f"no result JSON files under {args.runs}")
    os.makedirs(args.out, exist_ok=True)
    sections = []
    for name, fn in RENDERERS.items():
        if args.only and name not in args.only:
            continue
        text = fn(results, args.out)
        if text:
            sections.append(f"## {name}\n\n{text}\n")
    report = "\n".join(sections) if sections else "No table has its runs yet.\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(report)
    return report


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("codebook", help="coverage diagnostics of one codebook")
    c.add_argument("path", help="our .pt checkpoint, a foreign checkpoint, or a .npy array")
    c.add_argument("--key", help="dotted key path of the codebook tensor inside a checkpoint")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_codebook)
    t = sub.add_parser("tables", help="render the paper's tables and figures from result JSONs")
    t.add_argument("runs", help="folder searched recursively for result JSON files")
    t.add_argument("--out", default="report", help="where report.md and figures go")
    t.add_argument("--only", nargs="*", help="render only these tables (names as in the report)")
    t.set_defaults(func=cmd_tables)
    return p


def main(args):
    return args.func(args)


if __name__ == "__main__":
    run_cli(main, build_parser())
