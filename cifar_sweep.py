"""CIFAR-10 VQ-VAE codebook-size sweep: paper Figure 5, Tables 8-11 and Figures 6-8 (sections 6.2,
6.5, 6.6, appendix A.1 and A.3).

One training loop serves every method; a method only decides the codebook (gradient or EMA), its
initialisation, and *when* the Continuous -> Discretization switch (common.deferred_switch) happens:

  method          codebook  init / switch                                      Continuous + Discretization
  baseline        gradient  switch at step 0 (untrained encoder), 10:1 sample       0 + 300
  baseline_ema    EMA 0.99  switch at step 0                                        0 + 300
  deferred        gradient  switch after the Continuous Phase                      50 + 250  (sec. 6.1)
  deferred_ema    EMA 0.99  switch after the Continuous Phase                     150 + 150  (sec. 6.1, A.1)
  gaussian        EMA 0.99  N(0, sigma^2) codes, quantization on from step 0        0 + 300  (Table 10)
  posthoc_kmeans  -         autoencoder only, then k-means of encoder outputs     300 + 0    (Table 8)
  affine          gradient  switch at 0, affine reparameterisation, affine_lr=5     0 + 300  (Table 11)
  sync            gradient  switch at 0, synchronized update, sync_nu=0.1           0 + 300  (Table 11)
  affine_sync     gradient  switch at 0, vqtorch defaults affine_lr=2, sync_nu=2    0 + 300  (Table 11, Fig. 7)
  lru_kmeans      gradient  k-means of the first batch + dead-code (LRU) replacement 0 + 300 (Table 11)
  alternated      gradient  switch at 0, alternated optimisation (Huh et al. 2023)  0 + 300  (Figure 8)

--epochs is the TOTAL of both phases and --continuous-epochs the Continuous Phase: deferred_ema is
--epochs 300 --continuous-epochs 150. Given --epochs alone, a method keeps its paper split (deferred_ema
--epochs 20 -> 10 + 10). Logs say "Continuous Phase" / "Discretization Phase"; history records carry
"phase": "continuous" | "discretization".

Choices the paper leaves open (documented here and in the report):
  * Pixels: images are scaled to [0, 1] and shifted to [-0.5, 0.5] for the network; the reported MSE
    is the plain per-pixel mean squared error, identical on [0, 1] and [-0.5, 0.5] (a shift), not
    divided by the data variance. Paper values of ~9e-3 are on this scale.
  * Batch size 128 (per step, across all GPUs: each of N ranks takes 128 / N).
  * Validation (Figure 6) = the CIFAR-10 test set, evaluated after every epoch (--val-every 1); no
    training image is held out (the paper does not say; the classic VQ-VAE CIFAR-10 code does the same). The plotted
    "validation loss" is the training objective on it: MSE + VQ loss (codebook + beta * commitment;
    beta * commitment with an EMA codebook; 0 in the Continuous Phase).
  * Table 10's Gaussian inits and Table 8/9's baseline use an EMA codebook: their paper numbers
    coincide with "Baseline + EMA" / "Deferred + EMA" of Table 11 (8,192 and 16,384 codes), with
    one exception: Table 8's baseline Vendi, 1.66, is Table 11's plain Baseline at 8,192 codes
    (Baseline + EMA there: 1.70), while its MSE (9.6) and perplexity (2018.63) are Baseline + EMA's.
    We run Table 8's baseline with the EMA codebook (what two of its three numbers say).
  * Alternated optimisation (Huh et al. 2023, Figure 8) as vqtorch implements it ("in-place
    alternated optimization", `VectorQuant(inplace_optimizer=...)`): in every training forward,
    after the nearest-code search, one SGD step (lr 50, momentum 0.9: vqtorch's README setting)
    on mean ||c_k - sg(z)||^2 moves the assigned codes towards the batch's encoder outputs, and
    the forward continues with the moved codes and the same assignments. vqtorch allows it only
    with its beta = 1, i.e. no commitment term, so this method's --beta defaults to 0 (our beta
    weighs the commitment term). The paper found it collapses (perplexity towards 1) "across
    different learning rates and codebook sizes": --grid fig8 runs that claim.
  * A run whose loss stops being finite (the paper's Affine + Sync at 1,024 codes "training
    failure", Figure 7) still writes its JSON, with "failed" and the history up to that epoch, so
    the failure can be plotted; the last good checkpoint stays, and the run exits with one line
    (a --grid goes on with its next run).
  * The Huh et al. (2023) / SoundStream methods use a gradient codebook, as vqtorch (which the
    paper used) has no EMA codebook; LRU replacement after 100 unused steps (vqtorch's timeout).
    "K-means of the first batch": one global batch holds 128 x 64 = 8,192 vectors; for larger
    codebooks the following batches are added until there is one vector per code.
  * Codes of every baseline start from the same 10:1 sample of (untrained) encoder outputs as the
    deferred runs, so the only difference is *when* the switch happens (common.deferred_switch).
    Every switch records the spread (mean pairwise Euclidean / cosine, eqs. 4-5) of the fresh
    codebook (switch_*) and of a seeded sample of at most 8,192 of the encoder outputs it was drawn
    from (switch_embeddings_*; the sample is kept in the checkpoint as `switch_embeddings`, for
    `evaluate.py codebook --plot`): the paper's Figure 3 mechanism, measured where it happens.

Factor study (issue 15, --grid cpu-factors; README "When does coverage failure appear?"): the
Fashion-MNIST baseline here collapses (perplexity ~25 of 4,096 codes), imagenet_tokenizer.py's does
not. Each way the tokenizer's recipe differs is a flag, so that a cell changes one of them:
  --network vqgan        imagenet_tokenizer.py's encoder/decoder (common.Encoder / Decoder: GroupNorm,
                         swish, mid-block attention) with its width flags --ch --ch-mult
                         --num-res-blocks --attn-resolutions --z-channels (defaults: the chain
                         tokenizer's 16, 1,2,2, 1, '', 16) and 1x1 convs to the token dim; 8x8 tokens
  --lr-schedule cosine   its schedule: --lr through the Continuous Phase, then half a cosine to
                         --min-lr over the Discretization epochs, stepped once per epoch
  --lpips-weight W       + W x LPIPS (AlexNet, common.load_lpips; grey images repeated to RGB)
  --init-method kmeans   the switch's k-means instead of the method's 10:1 sample
  --pixel-range 1        the networks see [-1, 1] pixels (VQGAN's) instead of [-0.5, 0.5]
  --adam-betas 0.5,0.9 --no-amsgrad   its Adam (taming's) instead of A.1's amsgrad
with the existing --method (EMA vs gradient codebook), --token-dim, --lr, --batch-size, --ratio. At
their defaults these options leave a run's name and identity as they were; otherwise each adds a
tag to the name (as do a token dim other than 32, a ratio other than 10 and a batch size other
than the preset's).

Start-up (common.start_run, before any data is touched by training): every number is checked
(finite, in range: RANGES), then the rules between arguments (`validate`), --out must be writable,
CIFAR-10 must be readable and one epoch must give the embeddings the switch collects (`--ratio` x
codebook size; refused, not silently reduced); the run takes the lock <out>/<name>.lock (a second
process on the same run, e.g. with another --lr, gets a one-line refusal; --grid takes one lock per
run), removes temporary files of killed writes, and refuses to overwrite the run's .pt / .json
without --resume; --resume refuses a checkpoint made with other RUN_DEFINING settings.
--dist-timeout bounds how long torchrun ranks wait for a dead or frozen peer.

Commands:
    # a few seconds on CPU, real code path (tiny subset, narrow network)
    python cifar_sweep.py --preset smoke --method deferred_ema --codebook-size 64 --data-dir data/cifar10

    # one paper run on one GPU (CIFAR-10 must already be under --data-dir, or add --download)
    python cifar_sweep.py --method deferred_ema --codebook-size 8192 --data-dir data/cifar10 --out runs/cifar
    # ... continue it after a crash (an existing run is never overwritten without --resume, and a
    # checkpoint made with other settings is refused)
    python cifar_sweep.py --method deferred_ema --codebook-size 8192 --data-dir data/cifar10 --out runs/cifar --resume

    # the same on 4 GPUs (global batch stays 128)
    torchrun --standalone --nproc_per_node=4 cifar_sweep.py --method deferred_ema --codebook-size 8192

    # Fashion-MNIST, real images on a CPU (offline: apt-get install dataset-fashion-mnist)
    python cifar_sweep.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --method deferred_ema --codebook-size 1024 --epochs 10 --train-subset 10000 --channels 32 --res-channels 16
    # ... Figure 5 and the Table 11 methods on it: --grid cpu-fig5 / cpu-table11 with the same flags
    # (their recipe comes from the command line; README: the timed two-process family); the factor
    # study: --grid cpu-factors (results/fashion_mnist/factors/command.sh)
    # ... a finished run as the generators' tokenizer (issue 15 item 3): its flags + --dump-tokens
    # writes <out>/<name>/tokens_<split>.pt (train: 10 augmented views unless --dump-plain) and the
    # split file beside them (train = its --train-subset images, val = --val-size unseen training
    # images, test = its test images; common.make_fashion_mnist_split); then MaskGIT on them
    # (results/fashion_mnist/c4c5/command.sh)
    for split in train val test; do python cifar_sweep.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --method deferred_ema --codebook-size 1024 --epochs 10 --train-subset 10000 --channels 32 --res-channels 16 \
        --num-workers 0 --device cpu --dump-tokens $split; done
    python generator_maskgit.py --tokenizer runs/cifar/deferred_ema_K1024_ep10_cont5_s0_fashion-mnist.pt ...

    # a whole table or figure (skips runs whose JSON exists; rerun the same line to resume after a
    # crash). Grids: fig5 table8 table9 table10 table11 fig6 fig7 fig8 (paper recipe), cpu-fig5 cpu-table11
    # cpu-table9 cpu-factors
    python cifar_sweep.py --grid table11 --data-dir data/cifar10 --out runs/cifar
    # ... or spread it over 8 GPUs, one independent process each (small model: better than DDP)
    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i python cifar_sweep.py --grid table11 --grid-shard $i/8 & done
    python evaluate.py tables runs/cifar --out report/
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from common import (FASHION_MNIST_SIZE, SWEEP_DATASETS, SWEEP_NET_SIZE, SWEEP_TOKEN_GRID, VIEW_NAMES, AugmentedViews,
                    UsageCounter, UserError, add_run_arguments, all_reduce_sum, atomic_write, autocast_for,
                    build_sweep_model, cleanup_distributed, codebook_metrics, cosine_lr, deferred_switch, float_list,
                    int_list, load_fashion_mnist, load_lpips, load_split, load_tokenizer, make_fashion_mnist_split,
                    perplexity_from_counts, print0, progress_bar, run_cli, save_checkpoint, seed_everything, set_lr,
                    set_rng_state, setup_distributed, split_fingerprint, spread_record, start_run, sweep_split_file,
                    switch_record, switch_spreads, token_dump_record, tokenizer_datasets, tokenizer_fingerprint,
                    wrap_ddp, write_json, write_result)

# ================================================================================================
# Methods, presets and the grids of every CIFAR-10 table
# ================================================================================================

# ema: EMA codebook (decay --ema-decay) instead of a gradient one. switch: how deferred_switch builds
# the codebook ('sample' = 10:1 random sample of encoder outputs, 'kmeans'), None = no switch
# (quantization on from the start). continuous / epochs: paper epochs of the Continuous Phase and
# in total (sec. 6.1, A.1). Other keys are the method's defaults of the flags of the same name.
METHODS = {
    "baseline":       dict(ema=False, switch="sample", continuous=0, epochs=300),
    "baseline_ema":   dict(ema=True, switch="sample", continuous=0, epochs=300),
    "deferred":       dict(ema=False, switch="sample", continuous=50, epochs=300),
    "deferred_ema":   dict(ema=True, switch="sample", continuous=150, epochs=300),
    "gaussian":       dict(ema=True, switch=None, continuous=0, epochs=300),
    "posthoc_kmeans": dict(ema=False, switch="kmeans", continuous=300, epochs=300),
    "affine":         dict(ema=False, switch="sample", continuous=0, epochs=300, affine_lr=5.0),
    "sync":           dict(ema=False, switch="sample", continuous=0, epochs=300, sync_nu=0.1),
    "affine_sync":    dict(ema=False, switch="sample", continuous=0, epochs=300, affine_lr=2.0, sync_nu=2.0),
    "lru_kmeans":     dict(ema=False, switch="kmeans", continuous=0, epochs=300, dead_code_steps=100,
                           first_batch=True),
    "alternated":     dict(ema=False, switch="sample", continuous=0, epochs=300, alternated=True, beta=0.0),
}
BETA = 0.25  # commitment weight of every method but alternated (appendix A.1)
LR = 3e-4    # Adam (amsgrad) learning rate (appendix A.1); runs with another one carry it in their name

# Everything not given on the command line: the paper recipe, or a seconds-long CPU rehearsal that
# runs the identical code path on a few hundred images with a narrower network.
PRESETS = {
    "paper": dict(batch_size=128, channels=128, res_channels=64, train_subset=None, test_subset=None),
    "smoke": dict(batch_size=32, channels=32, res_channels=16, train_subset=192, test_subset=64, epochs=2),
}

FIG5_SIZES = [2**k for k in range(4, 17)]          # 16 ... 65,536 codes (Figure 5)
TABLE11_SIZES = [1024, 4096, 8192, 16384, 32768]   # "1K ... 32K" (Table 11)
TABLE11_METHODS = ["baseline", "baseline_ema", "affine_sync", "affine", "sync", "lru_kmeans",
                   "deferred", "deferred_ema"]
TABLE9_CONTINUOUS_EPOCHS = [0, 10, 20, 40, 60, 80, 100]
TABLE10_STDS = [1.0, 2.0, 3.0, 10.0]
# Figure 8: "across different learning rates and codebook sizes" (which ones, the paper does not say)
FIG8_SIZES, FIG8_LRS = [1024, 16384], [1e-4, 3e-4, 1e-3]
# CPU-sized grids (Figure 5 and Table 11 on real images, e.g. --dataset fashion-mnist): only method
# and codebook size are set, so --epochs, --train-subset, --channels, --seed ... come from the
# command line. Figure 5's sizes in steps of 4; the Table 11 methods (and alternated) at one size.
CPU_FIG5_SIZES = [16, 64, 256, 1024, 4096, 16384]
CPU_TABLE11_SIZE = 1024
# Table 9 on the CPU family: Continuous Phase length at 4,096 codes, Discretization Phase fixed to
# the paper's 150 epochs; the 150-epoch row is cpu-fig5's Deferred run at 4,096 codes (same name,
# run once), the 0-epoch row a baseline trained for 150 epochs.
CPU_TABLE9_SIZE, CPU_TABLE9_CONTINUOUS_EPOCHS = 4096, [0, 10, 20, 40, 80, 150]
# The factor study (issue 15, --grid cpu-factors): from the failing recipe (cpu-fig5's Baseline +
# EMA at 4,096 codes: perplexity ~25) towards imagenet_tokenizer.py's Fashion-MNIST recipe
# (results/fashion_mnist/chain/1_tokenizers.sh, no failure), one factor at a time, both arms per
# cell (the baseline switching at step 0, Deferred after FACTOR_CONTINUOUS of FACTOR_EPOCHS
# epochs, the same split for both codebook updates). name -> (codebook update, options changed).
# The last cell changes all of them at once: if it still fails, a factor not listed here decides.
TOKENIZER_RECIPE = dict(network="vqgan", token_dim=8, lr=1e-3, lr_schedule="cosine", min_lr=1e-5, lpips_weight=1.0,
                        batch_size=64, ratio=2.0, pixel_range=1.0, adam_betas=(0.5, 0.9), amsgrad=False)
FACTORS = {
    "base (failing recipe)": ("ema", {}),
    "network: VQGAN blocks": ("ema", dict(network="vqgan")),
    "codebook update: gradient": ("gradient", {}),
    "token dim 8": ("ema", dict(token_dim=8)),
    "lr 1e-3": ("ema", dict(lr=1e-3)),
    "cosine schedule": ("ema", dict(lr_schedule="cosine", min_lr=1e-5)),
    "LPIPS weight 1": ("ema", dict(lpips_weight=1.0)),
    "batch 64": ("ema", dict(batch_size=64)),
    "ratio 2": ("ema", dict(ratio=2.0)),
    "pixels in [-1, 1]": ("ema", dict(pixel_range=1.0)),
    "Adam betas (0.5, 0.9), no amsgrad": ("ema", dict(adam_betas=(0.5, 0.9), amsgrad=False)),
    "k-means init": ("ema", dict(init_method="kmeans")),  # the other init (the tokenizer samples)
    "all: tokenizer recipe": ("gradient", TOKENIZER_RECIPE),
}
FACTOR_ARMS = {"ema": ("baseline_ema", "deferred_ema"), "gradient": ("baseline", "deferred")}
FACTOR_SIZE, FACTOR_EPOCHS, FACTOR_CONTINUOUS = 4096, 10, 5


def factor_configs():
    """[(cell name, arm config)] of the factor study, the two arms of a cell side by side (so that
    --grid-shard I/2 runs every baseline in one process and every Deferred run in the other)."""
    return [(cell, dict(method=method, codebook_size=FACTOR_SIZE, epochs=FACTOR_EPOCHS,
                        continuous_epochs=FACTOR_CONTINUOUS if method.startswith("deferred") else 0, **options))
            for cell, (update, options) in FACTORS.items() for method in FACTOR_ARMS[update]]


def run_config(method, codebook_size, continuous_epochs=None, epochs=None, **extra):
    """One run of a grid: the args that identify it (the rest comes from the command line)."""
    m = METHODS[method]
    return dict(method=method, codebook_size=codebook_size,
                continuous_epochs=m["continuous"] if continuous_epochs is None else continuous_epochs,
                epochs=m["epochs"] if epochs is None else epochs, **extra)


def grid_configs(name):
    """The runs of one paper table/figure. evaluate.py reads the same lists to find its runs."""
    if name == "fig5":  # EMA variants: the A.1 recipe (decay 0.99, 150 + 150 epochs)
        return [run_config(m, k) for m in ("baseline_ema", "deferred_ema") for k in FIG5_SIZES]
    if name == "table8":
        return [run_config(m, 8192) for m in ("baseline_ema", "posthoc_kmeans", "deferred_ema")]
    if name == "table9":  # Discretization Phase fixed to 150 epochs; 0 Continuous epochs = baseline
        return [run_config("deferred_ema", 8192, continuous_epochs=e, epochs=e + 150)
                for e in TABLE9_CONTINUOUS_EPOCHS]
    if name == "table10":  # 16,384 codes: the paper's "ours" row equals Deferred + EMA at 16K
        return ([run_config("gaussian", 16384, init_std=s) for s in TABLE10_STDS]
                + [run_config("deferred_ema", 16384)])
    if name == "table11":
        return [run_config(m, k) for m in TABLE11_METHODS for k in TABLE11_SIZES]
    if name == "fig6":  # the Table 11 methods at 16,384 codes (appendix A.3)
        return [run_config(m, 16384) for m in TABLE11_METHODS]
    if name == "fig7":  # the failure case of Table 11: Affine + Sync (vqtorch defaults) at 1,024 codes
        return [run_config("affine_sync", 1024)]
    if name == "fig8":  # alternated optimisation collapsing
        return [run_config("alternated", k, lr=lr) for k in FIG8_SIZES for lr in FIG8_LRS]
    if name == "cpu-fig5":  # alternate the method's order per size: --grid-shard I/2 splits the cost evenly
        pairs = [("baseline_ema", "deferred_ema")[::1 - 2 * (i % 2)] for i in range(len(CPU_FIG5_SIZES))]
        return [dict(method=m, codebook_size=k) for k, pair in zip(CPU_FIG5_SIZES, pairs) for m in pair]
    if name == "cpu-table11":
        return [dict(method=m, codebook_size=CPU_TABLE11_SIZE)
                for m in TABLE11_METHODS + ["alternated"] if m not in ("baseline_ema", "deferred_ema")]
    if name == "cpu-table9":  # the phase split is the grid's: --epochs from the command line is ignored
        return [dict(method="deferred_ema", codebook_size=CPU_TABLE9_SIZE, continuous_epochs=e, epochs=e + 150)
                for e in CPU_TABLE9_CONTINUOUS_EPOCHS]
    if name == "cpu-factors":  # epochs, split and the changed factor are the grid's; the rest the command line's
        return [config for _, config in factor_configs()]
    raise UserError(f"unknown grid '{name}' (use {', '.join(GRIDS)})")


GRIDS = ("fig5", "table8", "table9", "table10", "table11", "fig6", "fig7", "fig8", "cpu-fig5", "cpu-table11",
         "cpu-table9", "cpu-factors")

# Options that change what a run computes. A checkpoint made under other values cannot be resumed,
# and evaluate.py averages only runs that agree on all of them except the seed.
RUN_DEFINING = ("dataset", "method", "codebook_size", "continuous_epochs", "epochs", "init_std", "affine_lr", "sync_nu",
                "dead_code_steps", "ratio", "token_dim", "channels", "res_channels", "res_blocks", "beta",
                "ema_decay", "lr", "batch_size", "train_subset", "test_subset", "preset", "seed",
                "network", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "lr_schedule",
                "min_lr", "lpips_weight", "init_method", "pixel_range", "adam_betas", "amsgrad")
# The factor-study options (issue 15) and their defaults, the failing recipe's. At its default an
# option is left out of a run's identity (`defining_keys`) and name, so runs, results and
# checkpoints made before it existed keep theirs; the VQGAN widths count only for --network vqgan,
# --min-lr only for --lr-schedule cosine, --init-method only where it is not the method's own.
FACTOR_DEFAULTS = dict(network="vqvae", lr_schedule="constant", lpips_weight=0.0, pixel_range=0.5,
                       adam_betas=(0.9, 0.999), amsgrad=True)
# --network vqgan: common.Encoder / Decoder with imagenet_tokenizer.py's flags; defaults = the
# chain's tokenizer (results/fashion_mnist/chain/1_tokenizers.sh). Three levels: 32 -> 8 x 8 tokens.
VQGAN_DEFAULTS = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16)
MIN_LR = 1e-5  # the chain tokenizer's --min-lr
DEFAULT_TOKEN_DIM, DEFAULT_RATIO = 32, 10.0


# Every number the parser accepts, checked before any work (common.check_ranges; floats must also
# be finite: `--ratio inf`, `--beta nan`, `--affine-lr nan` are refused). Rules between arguments
# and the data are in `validate` and `check_switch_embeddings`.
RANGES = {"codebook_size": ">= 1", "continuous_epochs": ">= 0", "epochs": ">= 1", "init_std": "> 0",
          "affine_lr": ">= 0", "sync_nu": ">= 0", "dead_code_steps": ">= 0", "ratio": ">= 1", "token_dim": ">= 1",
          "channels": ">= 2", "res_channels": ">= 1", "res_blocks": ">= 0", "beta": ">= 0", "ema_decay": "(0, 1)",
          "lr": "> 0", "batch_size": ">= 1", "train_subset": ">= 1", "test_subset": ">= 1", "num_workers": ">= 0",
          "seed": ">= 0", "dist_timeout": "> 0", "val_every": ">= 1", "ch": ">= 1", "ch_mult": ">= 1",
          "num_res_blocks": ">= 1", "attn_resolutions": ">= 1", "z_channels": ">= 1", "min_lr": ">= 0",
          "lpips_weight": ">= 0", "pixel_range": "> 0", "adam_betas": "[0, 1)", "val_size": ">= 1"}
# The network sees 32 x 32 images and makes 8 x 8 tokens of them (two stride-2 convolutions);
# the datasets' channels, sizes and default folders, and Fashion-MNIST's 28 -> 32 zero padding:
# common.SWEEP_DATASETS (the generators decode these runs' tokens too).
NET_SIZE = SWEEP_NET_SIZE
TOKENS_PER_IMAGE = SWEEP_TOKEN_GRID ** 2
DATASETS = SWEEP_DATASETS


def as_tuple(value):
    """Lists (JSON) and tuples (argparse) of one option compare and hash alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def defining_keys(args):
    """The RUN_DEFINING options of a run (a namespace or a dict): sigma only for gaussian, the
    factor-study options only away from their defaults (FACTOR_DEFAULTS)."""
    a = args if isinstance(args, dict) else vars(args)

    def counts(k):
        if k == "init_std":
            return a.get("method") == "gaussian"
        if k in VQGAN_DEFAULTS:
            return a.get("network", "vqvae") == "vqgan"
        if k == "min_lr":
            return a.get("lr_schedule", "constant") == "cosine"
        if k == "init_method":
            return a.get(k) not in (None, METHODS[a["method"]]["switch"])
        if k in FACTOR_DEFAULTS:
            return as_tuple(a.get(k, FACTOR_DEFAULTS[k])) != FACTOR_DEFAULTS[k]
        return True
    return [k for k in RUN_DEFINING if counts(k)]


def defining_args(args):
    """The RUN_DEFINING values of resolved args (a namespace or a dict), lists as tuples."""
    a = args if isinstance(args, dict) else vars(args)
    return {k: as_tuple(a.get(k)) for k in defining_keys(a)}


def resolve_args(args):
    """Fill every None from the preset, then from the method's paper defaults (explicit flags win)."""
    if args.method not in METHODS:
        raise UserError(f"unknown method '{args.method}' (use {', '.join(METHODS)})")
    m = METHODS[args.method]
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.data_dir is None:
        args.data_dir = DATASETS[args.dataset]["data_dir"]
    if args.epochs is None:
        args.epochs = m["epochs"]
    if args.continuous_epochs is None:
        args.continuous_epochs = default_continuous_epochs(m, args.epochs)
    for key, default in (("affine_lr", 0.0), ("sync_nu", 0.0), ("dead_code_steps", 0), ("beta", BETA)):
        if getattr(args, key) is None:
            setattr(args, key, m.get(key, default))
    resolve_factor_options(args)
    return args


def resolve_factor_options(args):
    """The switch's init defaults to the method's; --network vqgan takes VQGAN_DEFAULTS for the
    widths not given (a width given for the VQ-VAE network is refused: it would change nothing)."""
    if getattr(args, "init_method", None) is None:
        args.init_method = METHODS[args.method]["switch"]
    elif METHODS[args.method]["switch"] is None:
        raise UserError(f"{args.method} has no switch (its codes start from a Gaussian): --init-method does not apply")
    given = [k for k in VQGAN_DEFAULTS if getattr(args, k, None) is not None]
    if args.network == "vqvae" and given:
        raise UserError(f"--{given[0].replace('_', '-')} sets the VQGAN network: add --network vqgan")
    for key, value in VQGAN_DEFAULTS.items():
        if args.network == "vqgan" and getattr(args, key, None) is None:
            setattr(args, key, value)


def default_continuous_epochs(m, epochs):
    """The method's paper split of `epochs`: its share of Continuous Phase epochs, rounded, keeping
    at least one epoch of each phase the method has (when there are two epochs or more)."""
    if m["continuous"] in (0, m["epochs"]):  # one phase only: all quantized, or all continuous
        return 0 if m["continuous"] == 0 else epochs
    return int(min(epochs - 1, max(1, round(epochs * m["continuous"] / m["epochs"]))))


def validate(args, world_size=1):
    """Rules between arguments (single numbers are in RANGES), checked before any work."""
    m = METHODS[args.method]
    if args.continuous_epochs > args.epochs:
        raise UserError(f"--continuous-epochs {args.continuous_epochs} exceeds the run's --epochs {args.epochs} "
                        "(--epochs counts both phases)")
    if args.method == "posthoc_kmeans" and args.continuous_epochs != args.epochs:
        raise UserError("posthoc_kmeans never trains with quantization (Table 8): --continuous-epochs must "
                        "equal --epochs")
    if m["switch"] is None and args.continuous_epochs != 0:
        raise UserError(f"{args.method} quantizes from the start (Table 10): use --continuous-epochs 0")
    if m.get("alternated") and (args.affine_lr > 0 or args.sync_nu > 0):
        raise UserError("alternated optimisation steps the raw codes: it takes no --affine-lr or --sync-nu")
    if not 16 <= args.codebook_size <= 65536 and args.preset == "paper":
        raise UserError(f"--codebook-size {args.codebook_size} is outside the paper's range 16 ... 65,536")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    if args.network == "vqgan":
        validate_vqgan(args)
    if args.lr_schedule == "cosine" and args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} must not exceed --lr {args.lr:g}")
    if len(args.adam_betas) != 2:
        raise UserError(f"--adam-betas takes two numbers, e.g. 0.9,0.999, got {len(args.adam_betas)}")


def validate_vqgan(args):
    """Two downsamplings (three --ch-mult levels) give the 8 x 8 tokens of the VQ-VAE; attention
    only at a resolution the network has (32, 16, 8)."""
    if len(args.ch_mult) != 3:
        raise UserError(f"--ch-mult needs three levels (two downsamplings: 32 x 32 -> {NET_SIZE // 4} x "
                        f"{NET_SIZE // 4} tokens), got {','.join(map(str, args.ch_mult))}")
    missing = [r for r in args.attn_resolutions if r not in (NET_SIZE, NET_SIZE // 2, NET_SIZE // 4)]
    if missing:
        raise UserError(f"--attn-resolutions {missing[0]}: the VQGAN network's resolutions are 32, 16 and 8")


def switch_ratio(args, num_train):
    """Embeddings per code that the switch collects: --ratio, or for SoundStream's k-means of the
    first batch (lru_kmeans) one global batch (the whole set if smaller), at least one per code."""
    if METHODS[args.method].get("first_batch"):
        return max(1.0, min(args.batch_size, num_train) * TOKENS_PER_IMAGE / args.codebook_size)
    return args.ratio


def check_switch_embeddings(args, num_train):
    """The switch collects its embeddings within one epoch: refuse, before training, a ratio or a
    codebook that one epoch of the training images cannot give (rather than collecting fewer)."""
    if METHODS[args.method]["switch"] is None:
        return
    available = num_train * TOKENS_PER_IMAGE
    needed = math.ceil(switch_ratio(args, num_train) * args.codebook_size)
    if needed > available:
        raise UserError(f"the switch needs {needed} encoder outputs (--ratio {args.ratio:g} x --codebook-size "
                        f"{args.codebook_size}), but one epoch of {num_train} training images gives {available} "
                        f"({TOKENS_PER_IMAGE} per image); lower --ratio or --codebook-size, or use more images")


def run_name(args):
    """Method, codebook size, epochs (total, Continuous Phase), seed, the method's own
    hyperparameters and a learning rate other than the paper's."""
    tags = [args.method]
    if args.method == "gaussian":
        tags.append(f"std{args.init_std:g}")
    if args.affine_lr > 0:
        tags.append(f"alr{args.affine_lr:g}")
    if args.sync_nu > 0:
        tags.append(f"nu{args.sync_nu:g}")
    if args.dead_code_steps > 0:
        tags.append(f"dead{args.dead_code_steps}")
    if args.lr != LR:
        tags.append(f"lr{args.lr:g}")
    tags += factor_tags(args)
    tags += [f"K{args.codebook_size}", f"ep{args.epochs}", f"cont{args.continuous_epochs}", f"s{args.seed}"]
    if args.preset != "paper":
        tags.append(args.preset)
    if args.dataset != "cifar10":
        tags.append(args.dataset)
    return "_".join(tags)


def factor_tags(args):
    """Name tags of the factor-study options away from their defaults, and of the token dim, the
    switch's ratio and the batch size where they differ from the paper's (earlier names had none:
    none of their runs changed them)."""
    tags = []
    if args.network == "vqgan":
        tags.append(vqgan_tag(args))
    if args.token_dim != DEFAULT_TOKEN_DIM:
        tags.append(f"d{args.token_dim}")
    if args.lr_schedule == "cosine":
        tags.append("cos" + (f"{args.min_lr:g}" if args.min_lr != MIN_LR else ""))
    if args.lpips_weight > 0:
        tags.append(f"lpips{args.lpips_weight:g}")
    if args.batch_size != PRESETS[args.preset]["batch_size"]:
        tags.append(f"bs{args.batch_size}")
    if args.ratio != DEFAULT_RATIO:
        tags.append(f"ratio{args.ratio:g}")
    if args.init_method != METHODS[args.method]["switch"]:
        tags.append(f"init-{args.init_method}")
    if args.pixel_range != FACTOR_DEFAULTS["pixel_range"]:
        tags.append(f"px{args.pixel_range:g}")
    if as_tuple(args.adam_betas) != FACTOR_DEFAULTS["adam_betas"]:
        tags.append("betas" + "-".join(f"{b:g}" for b in args.adam_betas))
    if not args.amsgrad:
        tags.append("noams")
    return tags


def vqgan_tag(args):
    """'vqgan', and each width that differs from VQGAN_DEFAULTS, e.g. 'vqgan-ch32-m1.2.4'."""
    parts = ["vqgan"]
    for key, short in (("ch", "ch"), ("ch_mult", "m"), ("num_res_blocks", "rb"), ("attn_resolutions", "at"),
                       ("z_channels", "z")):
        value = as_tuple(getattr(args, key))
        if value != VQGAN_DEFAULTS[key]:
            parts.append(short + (".".join(map(str, value)) if isinstance(value, tuple) else str(value)))
    return "-".join(parts)


# ================================================================================================
# Model: the classic VQ-VAE CIFAR-10 network (van den Oord et al. 2017), appendix A.1, or the VQGAN
# blocks (--network vqgan): common.build_sweep_model, shared with the generators (common.load_tokenizer)
# ================================================================================================


def build_model(args):
    """The run's autoencoder (common.build_sweep_model) with what its method decides: the codebook
    update, alternated optimisation, and quantization on from step 0 for a method without a switch."""
    m = METHODS[args.method]
    return build_sweep_model(vars(args), ema=m["ema"], alternated=bool(m.get("alternated")),
                             enabled=m["switch"] is None)


# ================================================================================================
# Data: CIFAR-10 (torchvision) or Fashion-MNIST (common.load_fashion_mnist) held in memory as
# uint8 (N, C, 32, 32), converted on the device
# ================================================================================================


def load_cifar(root, train, download, subset):
    """(N, 3, 32, 32) uint8 tensor of one split, read by torchvision.datasets.CIFAR10."""
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except RuntimeError:
        raise UserError(f"CIFAR-10 not found or corrupted under {os.path.join(root, 'cifar-10-batches-py')}; "
                        "point --data-dir at the folder that holds cifar-10-batches-py, or add --download") from None
    except OSError as err:  # --download without internet
        raise UserError(f"could not download CIFAR-10 into {root}: {err}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images[:subset] if subset else images


def to_input(batch, device):
    """uint8 images -> float in [-0.5, 0.5] (MSE identical to [0, 1] pixels), channels_last on CUDA."""
    x = batch[0].to(device, non_blocking=True).float().div_(255.0).sub_(0.5)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def load_fashion(root, train, download, subset):
    """(N, 1, 32, 32) uint8 tensor of one Fashion-MNIST split: the 28 x 28 images zero-padded by 2
    pixels on every side (see DATASETS)."""
    images = load_fashion_mnist(root, train=train, download=download)[0]
    images = images[:subset] if subset else images
    pad = (NET_SIZE - FASHION_MNIST_SIZE) // 2
    return F.pad(images[:, None], (pad, pad, pad, pad))


def load_data(args):
    """{'train', 'test'}: both splits as uint8 tensors (a UserError when the data are missing)."""
    load = load_cifar if args.dataset == "cifar10" else load_fashion
    return {"train": load(args.data_dir, True, args.download, args.train_subset),
            "test": load(args.data_dir, False, args.download, args.test_subset)}


def image_pixels(x, args):
    """The pixels of the images themselves: the network's 32 x 32 minus any padding (DATASETS)."""
    pad = (NET_SIZE - DATASETS[args.dataset]["size"]) // 2
    return x[..., pad:NET_SIZE - pad, pad:NET_SIZE - pad] if pad else x


def build_loaders(args, info, data):
    """Training loader (DistributedSampler, reshuffled per epoch from (seed, epoch)) and the test
    loader, sharded without padding so every test image is counted exactly once over all ranks."""
    train, test = data["train"], data["test"]
    per_rank = args.batch_size // info.world_size
    pin = info.device.type == "cuda"
    sampler = DistributedSampler(TensorDataset(train), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed)
    train_loader = DataLoader(TensorDataset(train), batch_size=per_rank, sampler=sampler,
                              num_workers=args.num_workers, pin_memory=pin, persistent_workers=args.num_workers > 0)
    test_shard = Subset(TensorDataset(test), range(info.rank, len(test), info.world_size))
    test_loader = DataLoader(test_shard, batch_size=max(per_rank, 256), shuffle=False,
                             num_workers=args.num_workers, pin_memory=pin,
                             persistent_workers=args.num_workers > 0)
    return train_loader, sampler, test_loader


# ================================================================================================
# Evaluation: test MSE, VQ loss and code usage over the whole (all-reduced) test set
# ================================================================================================


def penalties(recon, x, vq_loss, args, lpips_fn):
    """The loss beyond the MSE: VQ loss, plus --lpips-weight x mean LPIPS (imagenet_tokenizer.py's
    L_LPIPS) where lpips_fn is given. LPIPS takes both images from [-0.5, 0.5] to the [0, 1] of
    common.load_lpips, grey ones repeated to the RGB AlexNet needs (as the tokenizer's
    Fashion-MNIST data are), over the network's 32 x 32 (the tokenizer's too: AlexNet needs >= 31)."""
    if lpips_fn is None:
        return vq_loss

    def rgb(images):
        return (images.float() + 0.5).expand(-1, 3, -1, -1)
    return vq_loss + args.lpips_weight * lpips_fn(rgb(recon), rgb(x)).mean()


@torch.no_grad()
def evaluate(model, loader, args, device, lpips_fn=None):
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, penalties x images, images
    usage = UsageCounter(args.codebook_size, device)
    for batch in loader:
        x = to_input(batch, device)
        with autocast_for(device):
            recon, indices, vq_loss = model(x)
        sums[0] += F.mse_loss(image_pixels(recon.float(), args), image_pixels(x, args), reduction="sum").double()
        sums[1] += penalties(recon, x, vq_loss, args, lpips_fn).double() * x.shape[0]
        sums[2] += x.shape[0]
        if indices is not None:
            usage.update(indices)
    all_reduce_sum(sums)
    usage.all_reduce()
    info = DATASETS[args.dataset]
    mse = float(sums[0] / (sums[2] * info["channels"] * info["size"] ** 2))
    return {"mse": mse, "loss": mse + float(sums[1] / sums[2]), "counts": usage.counts.cpu()}


# ================================================================================================
# One run
# ================================================================================================


def switch(model, loader, args, epoch):
    """Continuous -> Discretization (common.deferred_switch, --init-method) from this epoch's
    batches. Returns (the new codebook, a seeded sample of at most common.SWITCH_SAMPLE of the
    encoder outputs it was drawn from), copies: with the 'sample' init the codebook is a random
    subset of those outputs, so its spread is theirs (the paper's Figure 3 mechanism, on real
    images); k-means centres are not, hence the sample."""
    ratio = switch_ratio(args, len(loader.dataset))
    loader.sampler.set_epoch(epoch)
    model.eval()
    device = next(model.parameters()).device

    def encode(batch):
        return model.encode(to_input(batch, device))

    kept = {}
    with autocast_for(device):
        n = deferred_switch(model.quantizer, encode, loader, ratio, method=args.init_method, seed=args.seed,
                            progress=True, keep=kept)
    print0(f"epoch {epoch}: Discretization Phase on, codebook of {args.codebook_size} from {n} embeddings "
           f"per rank ({args.init_method})")
    return model.quantizer.codebook.detach().float().cpu().clone(), kept["embeddings"]


def train_run(args, info):
    """Start-up protocol (common.start_run), then train (or resume) one configuration."""
    name = run_name(args)
    paths = {"json": os.path.join(args.out, name + ".json"), "ckpt": os.path.join(args.out, name + ".pt")}
    data = {}

    def check_data():  # rank 0, before the lock: data readable, and enough of it for the switch
        data.update(load_data(args))
        check_switch_embeddings(args, len(data["train"]))

    weights = [lambda: load_lpips(net="alex")] if args.lpips_weight > 0 else []  # a missing file: one line
    with start_run(args, name=name, outputs=[paths["ckpt"], paths["json"]], ranges=RANGES,
                   defining=defining_keys(args), resume_from=paths["ckpt"], checks=[check_data] + weights,
                   validate=lambda a: validate(a, info.world_size)) as run:
        if not data:  # the other ranks (rank 0 has downloaded, if asked, by now)
            data.update(load_data(args))
        return train(args, info, name, paths, data, run.checkpoint)


def train(args, info, name, paths, data, ckpt):
    """Train one configuration from scratch or from `ckpt`; writes <name>.pt and <name>.json."""
    device = info.device
    seed_everything(args.seed)
    train_loader, sampler, test_loader = build_loaders(args, info, data)
    model = build_model(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # appendix A.1's Adam (amsgrad); --adam-betas (0.5, 0.9) --no-amsgrad is taming's VQGAN setting
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.adam_betas), amsgrad=args.amsgrad)
    lpips_fn = load_lpips(net="alex", device=device) if args.lpips_weight > 0 else None
    start_epoch, history, switch_codebook, switch_embeddings = 0, [], None, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        switch_codebook, switch_embeddings = ckpt.get("switch_codebook"), ckpt.get("switch_embeddings")
        set_rng_state(ckpt["rng"])
        print0(f"resuming {name} at epoch {start_epoch}")
    # The gradient codebook / affine parameters sit unused during the Continuous Phase.
    ddp = wrap_ddp(model, info, find_unused_parameters=args.continuous_epochs > 0)

    def save(epochs_done, code_counts):
        """Epoch-boundary checkpoint (rank 0): resumable state + the codebook and its test usage."""
        if info.is_main:
            save_checkpoint(paths["ckpt"], model=model.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epochs_done, history=history, args=vars(args),
                            codebook=model.quantizer.codebook.detach().float().cpu(), code_counts=code_counts,
                            switch_codebook=switch_codebook, switch_embeddings=switch_embeddings)

    def result(metrics, **extra):
        if info.is_main:
            write_result(paths["json"], args.dataset, args.method, args, metrics, history, run_name=name,
                         wall_seconds=time.time() - t0, world_size=info.world_size, eval_split="test",
                         eval_images=len(data["test"]), data_range=1.0, **extra)

    t0, val = time.time(), None
    for epoch in range(start_epoch, args.epochs):
        switched = {}
        if epoch == args.continuous_epochs and not model.quantizer.is_enabled:
            switch_codebook, switch_embeddings = switch(model, train_loader, args, epoch)
            switched = switch_record(switch_codebook, switch_embeddings)
        phase = "discretization" if model.quantizer.is_enabled else "continuous"
        sampler.set_epoch(epoch)
        set_lr(optimizer, epoch_lr(args, epoch))
        t_epoch = time.time()
        stats = train_epoch(ddp, optimizer, train_loader, args, info, lpips_fn,
                            desc=f"{name} epoch {epoch} ({phase.title()} Phase)")
        train_seconds = time.time() - t_epoch
        if not stats["finite"]:  # Figure 7's failure: record it, keep the last good checkpoint, stop
            history.append({"epoch": epoch, "phase": phase, "train_loss": None, "diverged": True})
            failure = f"loss became {stats['train_loss']} at epoch {epoch}; lower the learning rate or check the data"
            result({}, failed=failure, model_finished=False, model_epoch=epoch)
            raise Diverged(f"{name}: {failure} (the history up to it is in {paths['json']})")
        record = {"epoch": epoch, "phase": phase, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": stats["train_loss"], "train_mse": stats["train_mse"],
                  "train_perplexity": stats["train_perplexity"], "quantized_steps": stats["quantized_steps"],
                  "train_seconds": train_seconds, **switched}
        val = None
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            t_val = time.time()
            val = evaluate(model, test_loader, args, device, lpips_fn)
            record.update(val_loss=val["loss"], val_mse=val["mse"], val_seconds=time.time() - t_val)
            if model.quantizer.is_enabled:  # usage and spread exist once codes do
                record.update(val_perplexity=perplexity_from_counts(val["counts"]),
                              val_used_codes=int((val["counts"] > 0).sum()),
                              **spread_record("codebook_", model.quantizer.codebook))
        history.append(record)
        print0(f"epoch {epoch} ({phase.title()} Phase): train loss {stats['train_loss']:.5f}"
               + (f", val mse {val['mse']:.5f}" if val else ""))
        save(epoch + 1, val and val["counts"])
    final = val  # the last epoch's test evaluation is the result (at 16,384 codes it costs an epoch)
    switched = switch_spreads(history)
    if not model.quantizer.is_enabled:  # posthoc_kmeans: discretize after training, no fine-tuning
        switch_codebook, switch_embeddings = switch(model, train_loader, args, args.epochs)
        switched = switch_record(switch_codebook, switch_embeddings)
        final = None
    if final is None:  # posthoc_kmeans, or a run resumed after its last epoch
        final = evaluate(model, test_loader, args, device, lpips_fn)
        save(args.epochs, final["counts"])
    metrics = codebook_metrics(model.quantizer.codebook, final["counts"])
    metrics["mse"] = final["mse"]
    metrics["val_loss"] = final["loss"]
    metrics.update(switched)  # the spreads at the switch beside the final ones (issue 15, paper Figure 3)
    result(metrics, model_finished=True, model_epoch=args.epochs)  # written once training has ended
    print0(f"{name}: test mse {metrics['mse']:.5f}, perplexity {metrics['perplexity']:.1f}, "
           f"vendi {metrics['vendi']:.3f}, euclidean {metrics['euclidean']:.3f}")
    return metrics


class Diverged(UserError):
    """The training loss stopped being finite (a result of its own: the run's JSON records it)."""


def epoch_lr(args, epoch):
    """The learning rate of an epoch: --lr throughout (appendix A.1), or with --lr-schedule cosine
    imagenet_tokenizer.py's: --lr through the Continuous Phase, then half a cosine to --min-lr over
    the Discretization epochs, one step per epoch (its first epoch at --lr)."""
    if args.lr_schedule == "constant":
        return args.lr
    return cosine_lr(args.lr, args.min_lr, max(0, epoch - args.continuous_epochs), args.epochs - args.continuous_epochs)


def train_epoch(ddp, optimizer, loader, args, info, lpips_fn, desc):
    """One epoch over this rank's shard. Sums stay on the device (no host sync per step) and are
    all-reduced once: mean loss and MSE, the usage perplexity of every training assignment of the
    epoch (Figure 8: collapse shows as perplexity -> 1), and the number of quantized steps."""
    device = info.device
    ddp.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x n, mse x n, n, quantized steps
    usage = UsageCounter(args.codebook_size, device)
    for batch in progress_bar(loader, desc=desc, leave=False):
        x = to_input(batch, device)
        with autocast_for(device):
            recon, indices, vq_loss = ddp(x)
        mse = F.mse_loss(image_pixels(recon.float(), args), image_pixels(x, args))
        loss = mse + penalties(recon, x, vq_loss, args, lpips_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        sums += torch.stack([loss.detach() * n, mse.detach() * n, loss.new_tensor(n),
                             loss.new_tensor(float(indices is not None))]).double()
        if indices is not None:
            usage.update(indices)
    all_reduce_sum(sums)
    usage.all_reduce()
    return {"finite": bool(torch.isfinite(sums[:2]).all()), "train_loss": float(sums[0] / sums[2]),
            "train_mse": float(sums[1] / sums[2]), "quantized_steps": int(sums[3]) // info.world_size,
            "train_perplexity": perplexity_from_counts(usage.counts.cpu()) if usage.counts.sum() > 0 else None}


# ================================================================================================
# Token dumps: a finished Fashion-MNIST run as the generators' tokenizer (issue 15 item 3)
# ================================================================================================


def validate_dump(args, world_size):
    """--dump-tokens: one finished run named by the flags, in one process, never resumed."""
    if args.grid is not None:
        raise UserError("--dump-tokens dumps one run: name it with its flags, not --grid")
    if args.resume:
        raise UserError("--resume continues training; --dump-tokens does not train")
    if world_size > 1:
        raise UserError("--dump-tokens runs in one process (not under torchrun)")
    if args.dataset != "fashion-mnist":
        raise UserError(f"--dump-tokens: only Fashion-MNIST runs are tokenizers of the generators, not {args.dataset}")


def dump_split(args, saved):
    """The generators' split of a run (common.make_fashion_mnist_split): train = the first
    --train-subset training images it trained on, val = --val-size images drawn with the run's seed
    from the training images it never saw, test = the test images it was evaluated on (--test-subset).
    Written once to <out>/<name>/split.json (common.sweep_split_file); a later dump must find the same."""
    first = saved["train_subset"] or len(load_fashion_mnist(args.data_dir, train=True)[1])
    return make_fashion_mnist_split(args.data_dir, saved["seed"], args.val_size, train_subset=first,
                                    test_subset=saved["test_subset"])


@torch.no_grad()
def encode_part(model, dataset, views, args, device):
    """(token maps, labels) of every image of a split part, in its order: (N, 8, 8), or with
    `views` > 1 (N, views, 8, 8) of common.augmented_views (view 0 the plain image). The images come
    as the generators' reference does (common.tokenizer_datasets: [0, 1], 3 channels, zero-padded to
    32) and enter the network as in training (to_input: one channel, shifted to [-0.5, 0.5])."""
    channels = DATASETS[args.dataset]["channels"]
    loader = DataLoader(AugmentedViews(dataset) if views > 1 else dataset, batch_size=args.batch_size,
                        shuffle=False, num_workers=args.num_workers)
    maps, labels = [], []
    for x, y in progress_bar(loader, desc="tokens", leave=False):
        x = (x.flatten(0, 1) if views > 1 else x)[:, :channels].to(device) - 0.5
        _, indices, _ = model.quantizer(model.encode(x))
        maps.append(indices.reshape((-1, views) + indices.shape[1:]) if views > 1 else indices)
        labels.append(y)
    return torch.cat(maps).cpu(), torch.cat(labels)


def dump_tokens(args, info):
    """--dump-tokens PART of the run the flags name (<out>/<name>.pt, which must have finished
    training): writes <out>/<name>/tokens_PART.pt in imagenet_tokenizer.py's format
    (common.token_dump_record: int16 maps, labels, split part and digest, the tokenizer's
    fingerprint; the train part with the 10 augmented views unless --dump-plain) and, with the
    first dump, the split file beside it (`dump_split`). The flags must be those the run was
    trained with (settings in RUN_DEFINING); an existing dump is never replaced."""
    name = run_name(args)
    ckpt_path = os.path.join(args.out, name + ".pt")
    out_path = os.path.join(args.out, name, f"tokens_{args.dump_tokens}.pt")
    split_path = sweep_split_file(ckpt_path)
    found = {}

    def check():
        if os.path.exists(out_path):
            raise UserError(f"{out_path} exists: a token dump is never replaced (delete it to dump again)")
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint {ckpt_path}: train the run first (the same flags without --dump-tokens)")
        found["model"], found["cfg"] = load_tokenizer(ckpt_path, info.device)  # refuses an unfinished run
        saved, wanted = defining_args(found["cfg"]), defining_args(args)
        diff = [k for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise UserError(f"{ckpt_path} was trained with --{diff[0].replace('_', '-')} {saved.get(diff[0])!r}, not "
                            f"{wanted[diff[0]]!r}: dump it with the flags it was trained with")
        split = dump_split(args, found["cfg"])
        if os.path.exists(split_path) and split_fingerprint(load_split(split_path)) != \
                split_fingerprint(split):
            raise UserError(f"{split_path} holds another split than --val-size {args.val_size} and --data-dir "
                            f"{args.data_dir} give: dump with the settings of the run's earlier dumps, or delete them")
        found["split"] = split

    with start_run(args, name=name, outputs=[out_path], ranges=RANGES, checks=[check],
                   validate=lambda a: (validate_dump(a, info.world_size), validate(a))):
        model, cfg = found["model"], found["cfg"]
        if not os.path.exists(split_path):
            write_json(split_path, found["split"])
        part = args.dump_tokens
        views = len(VIEW_NAMES) if part == "train" and not args.dump_plain else 1
        dataset = tokenizer_datasets(cfg, args.data_dir, parts=(part,))[part]
        maps, labels = encode_part(model, dataset, views, args, info.device)
        record = token_dump_record([maps], labels, quantizer="vq", codebook_size=args.codebook_size, part=part,
                                          split_file=split_path, ckpt_path=ckpt_path,
                                          fingerprint=tokenizer_fingerprint(model, cfg), views=views)
        atomic_write(out_path, lambda f: torch.save(record, f))
        print0(f"wrote {out_path}: {len(labels)} images of the {part} split" + (f", {views} views each" if views > 1 else ""))
        return record


def parse_shard(text):
    """'I/N' -> (I, N): this process runs every N-th configuration of the grid, starting at I."""
    try:
        shard, num_shards = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--grid-shard must look like 0/4, got '{text}'") from None
    if not 0 <= shard < num_shards:
        raise UserError(f"--grid-shard {text}: need 0 <= I < N")
    return shard, num_shards


def main(args):
    info = setup_distributed(args.device, args.dist_timeout)
    try:
        if args.dump_tokens:
            return dump_tokens(resolve_args(args), info)
        if args.grid is None:
            return train_run(resolve_args(args), info)
        shard, num_shards = parse_shard(args.grid_shard)
        for config in grid_configs(args.grid)[shard::num_shards]:
            run_args = copy.copy(args)
            for key, value in config.items():
                setattr(run_args, key, value)
            resolve_args(run_args)
            path = os.path.join(args.out, run_name(run_args))
            if os.path.exists(path + ".json"):
                print0(f"skip {run_name(run_args)} (result exists)")
                continue
            run_args.resume = os.path.exists(path + ".pt")  # a grid continues where it stopped
            try:
                train_run(run_args, info)
            except Diverged as err:  # recorded in its JSON (e.g. Figure 7's failure case); go on
                print0(f"failed: {err}")
    finally:
        cleanup_distributed()


def add_factor_arguments(g):
    """The options that walk the failing recipe towards imagenet_tokenizer.py's (--grid
    cpu-factors); VQGAN widths and --min-lr have that script's names and meanings."""
    g.add_argument("--network", choices=["vqvae", "vqgan"], default="vqvae",
                   help="vqvae: the classic VQ-VAE (--channels --res-channels --res-blocks); vqgan: "
                        "imagenet_tokenizer.py's encoder/decoder (--ch ... --z-channels), 8x8 tokens")
    g.add_argument("--ch", type=int, help=f"vqgan: backbone width (default {VQGAN_DEFAULTS['ch']})")
    g.add_argument("--ch-mult", type=int_list, help="vqgan: width multipliers, three levels (default 1,2,2)")
    g.add_argument("--num-res-blocks", type=int, help=f"vqgan: default {VQGAN_DEFAULTS['num_res_blocks']}")
    g.add_argument("--attn-resolutions", type=int_list,
                   help="vqgan: attention at these of 32,16,8 besides the mid block's (default '': none)")
    g.add_argument("--z-channels", type=int, help=f"vqgan: default {VQGAN_DEFAULTS['z_channels']}")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant --lr (A.1), or cosine annealing to --min-lr over the Discretization epochs, "
                        "once per epoch (imagenet_tokenizer.py's)")
    g.add_argument("--min-lr", type=float, default=MIN_LR, help="--lr-schedule cosine: the final lr")
    g.add_argument("--lpips-weight", type=float, default=0.0,
                   help="loss + this x LPIPS (AlexNet; imagenet_tokenizer.py: 1); its weights must be in the torch hub cache")
    g.add_argument("--init-method", choices=["sample", "kmeans"],
                   help="how the switch builds the codebook (default: the method's, sample for baseline/deferred)")
    g.add_argument("--pixel-range", type=float, default=0.5,
                   help="the networks see pixels in [-R, R]: 0.5 the VQ-VAE's, 1 VQGAN's (the loss stays the MSE on [0, 1])")
    g.add_argument("--adam-betas", type=float_list, default=FACTOR_DEFAULTS["adam_betas"],
                   help="Adam's betas (default 0.9,0.999; imagenet_tokenizer.py: 0.5,0.9 as taming)")
    g.add_argument("--amsgrad", action=argparse.BooleanOptionalAction, default=True,
                   help="Adam's amsgrad variant (A.1; imagenet_tokenizer.py: off)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="deferred_ema", choices=sorted(METHODS))
    p.add_argument("--grid", choices=GRIDS, help="run every configuration of one paper table/figure")
    p.add_argument("--grid-shard", default="0/1",
                   help="I/N: run only configurations I, I+N, ... of the grid (one process per GPU)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--codebook-size", type=int, default=512, help="number of codes K (paper: 16 ... 65,536)")
    p.add_argument("--epochs", type=int, help="TOTAL epochs, both phases (default: per method, 300)")
    p.add_argument("--continuous-epochs", type=int,
                   help="Continuous Phase epochs before the switch (default: the method's share of --epochs)")
    p.add_argument("--init-std", type=float, default=1.0, help="sigma of the gaussian method (Table 10)")
    p.add_argument("--affine-lr", type=float, help="affine reparameterisation rate (default: per method)")
    p.add_argument("--sync-nu", type=float, help="synchronized update nu (default: per method)")
    p.add_argument("--dead-code-steps", type=int, help="LRU replacement after this many unused steps")
    p.add_argument("--ratio", type=float, default=10.0, help="embeddings per code at the switch (A.1: 10)")
    p.add_argument("--token-dim", type=int, default=32, help="dimension of a code / encoder output vector")
    p.add_argument("--channels", type=int, help="encoder/decoder channels (paper 128)")
    p.add_argument("--res-channels", type=int, help="residual hidden channels (paper 64)")
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument("--beta", type=float, help=f"commitment weight (default {BETA}; alternated: 0, as vqtorch)")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=LR, help="Adam (amsgrad) learning rate")
    p.add_argument("--batch-size", type=int, help="global batch size (paper preset 128)")
    # The first N, not a stratified draw: both datasets' files are stored in shuffled class order
    # (Fashion-MNIST's first 10,000 training images hold 942-1,027 per class), and a draw would change
    # the training data of every committed run.
    p.add_argument("--train-subset", type=int, help="use only the first N training images (files in shuffled order)")
    p.add_argument("--test-subset", type=int, help="use only the first N test images (files in shuffled order)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    p.add_argument("--data-dir", help="cifar10: the folder holding cifar-10-batches-py (default data/cifar10); "
                   "fashion-mnist: torchvision's layout or a folder with the four idx .gz files, e.g. "
                   "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist; default "
                   "data/fashion-mnist)")
    p.add_argument("--download", action="store_true", help="download the dataset through torchvision (internet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=1,
                   help="evaluate the test split every N epochs (Figure 6's curves; always after the last)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    g = p.add_argument_group("token dumps for the generators (a finished Fashion-MNIST run named by the flags above)")
    g.add_argument("--dump-tokens", choices=["train", "val", "test"],
                   help="write <out>/<name>/tokens_<split>.pt for generator_maskgit.py --tokenizer <out>/<name>.pt")
    g.add_argument("--dump-plain", action="store_true",
                   help="--dump-tokens train: the plain view only (the generators then train without augmentation)")
    g.add_argument("--val-size", type=int, default=5000,
                   help="--dump-tokens: validation images, drawn from the training images the run did not train on")
    add_factor_arguments(p.add_argument_group(
        "factor study (issue 15): what imagenet_tokenizer.py's recipe does differently; defaults: appendix A.1"))
    add_run_arguments(p, out_default="runs/cifar")  # --out, --resume (--grid: automatic), --device, --dist-timeout
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
