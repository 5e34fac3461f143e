"""CIFAR-10 VQ-VAE codebook-size sweep: paper Figure 5, Tables 8-11 and Figure 6 (sections 6.2, 6.5,
6.6, appendix A.1 and A.3).

One training loop serves every method; a method only decides the codebook (gradient or EMA), its
initialisation, and *when* the Continuous -> Discretization switch (common.deferred_switch) happens:

  method          codebook  init / switch                                          default epochs
  baseline        gradient  switch at step 0 (untrained encoder), 10:1 sample       0 + 300
  baseline_ema    EMA 0.99  switch at step 0                                        0 + 300
  deferred        gradient  switch after the Continuous Phase                      50 + 250  (sec. 6.1)
  deferred_ema    EMA 0.99  switch after the Continuous Phase                     150 + 150  (sec. 6.1, A.1)
  gaussian        EMA 0.99  N(0, sigma^2) codes, quantization on from step 0        0 + 300  (Table 10)
  posthoc_kmeans  -         autoencoder only, then k-means of encoder outputs     300 + 0    (Table 8)
  affine          gradient  switch at 0, affine reparameterisation, affine_lr=5     0 + 300  (Table 11)
  sync            gradient  switch at 0, synchronized update, sync_nu=0.1           0 + 300  (Table 11)
  affine_sync     gradient  switch at 0, vqtorch defaults affine_lr=2, sync_nu=2    0 + 300  (Table 11)
  lru_kmeans      gradient  k-means of the first batch + dead-code (LRU) replacement 0 + 300 (Table 11)

Choices the paper leaves open (documented here and in the report):
  * Pixels: images are scaled to [0, 1] and shifted to [-0.5, 0.5] for the network; the reported MSE
    is the plain per-pixel mean squared error, identical on [0, 1] and [-0.5, 0.5] (a shift), not
    divided by the data variance. Paper values of ~9e-3 are on this scale.
  * Batch size 128 (per step, across all GPUs: each of N ranks takes 128 / N).
  * Validation (Figure 6) = the CIFAR-10 test set, evaluated after every epoch; no training image is
    held out (the paper does not say; the classic VQ-VAE CIFAR-10 code does the same). The plotted
    "validation loss" is the training objective on it: MSE + VQ loss (codebook + beta * commitment;
    beta * commitment with an EMA codebook; 0 in the Continuous Phase).
  * Table 10's Gaussian inits and Table 8/9's baseline use an EMA codebook: their paper numbers
    coincide with "Baseline + EMA" / "Deferred + EMA" of Table 11 (8,192 and 16,384 codes).
  * The Huh et al. (2023) / SoundStream methods use a gradient codebook, as vqtorch (which the
    paper used) has no EMA codebook; LRU replacement after 100 unused steps (vqtorch's timeout).
    "K-means of the first batch": one global batch holds 128 x 64 = 8,192 vectors; for larger
    codebooks the following batches are added until there is one vector per code.
  * Codes of every baseline start from the same 10:1 sample of (untrained) encoder outputs as the
    deferred runs, so the only difference is *when* the switch happens (common.deferred_switch).

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
    python cifar_sweep.py --preset smoke --method deferred_ema --num-codes 64 --data-dir data/cifar10

    # one paper run on one GPU (CIFAR-10 must already be under --data-dir, or add --download)
    python cifar_sweep.py --method deferred_ema --num-codes 8192 --data-dir data/cifar10 --out runs/cifar
    # ... continue it after a crash (an existing run is never overwritten without --resume, and a
    # checkpoint made with other settings is refused)
    python cifar_sweep.py --method deferred_ema --num-codes 8192 --data-dir data/cifar10 --out runs/cifar --resume

    # the same on 4 GPUs (global batch stays 128)
    torchrun --standalone --nproc_per_node=4 cifar_sweep.py --method deferred_ema --num-codes 8192

    # a whole table (skips runs whose JSON exists; rerun the same line to resume after a crash)
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
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from common import (UsageCounter, UserError, VectorQuantizer, add_run_arguments, all_reduce_sum, autocast_for,
                    check_finite, cleanup_distributed, codebook_metrics, deferred_switch,
                    perplexity_from_counts, print0, progress_bar, run_cli, save_checkpoint, seed_everything,
                    set_rng_state, setup_distributed, start_run, wrap_ddp, write_result)

# ================================================================================================
# Methods, presets and the grids of every CIFAR-10 table
# ================================================================================================

# ema: EMA codebook (decay --ema-decay) instead of a gradient one. switch: how deferred_switch builds
# the codebook ('sample' = 10:1 random sample of encoder outputs, 'kmeans'), None = no switch
# (quantization on from the start). ae / vq: paper epochs of the two phases (sec. 6.1, A.1).
METHODS = {
    "baseline":       dict(ema=False, switch="sample", ae=0, vq=300),
    "baseline_ema":   dict(ema=True, switch="sample", ae=0, vq=300),
    "deferred":       dict(ema=False, switch="sample", ae=50, vq=250),
    "deferred_ema":   dict(ema=True, switch="sample", ae=150, vq=150),
    "gaussian":       dict(ema=True, switch=None, ae=0, vq=300),
    "posthoc_kmeans": dict(ema=False, switch="kmeans", ae=300, vq=0),
    "affine":         dict(ema=False, switch="sample", ae=0, vq=300, affine_lr=5.0),
    "sync":           dict(ema=False, switch="sample", ae=0, vq=300, sync_nu=0.1),
    "affine_sync":    dict(ema=False, switch="sample", ae=0, vq=300, affine_lr=2.0, sync_nu=2.0),
    "lru_kmeans":     dict(ema=False, switch="kmeans", ae=0, vq=300, dead_code_steps=100, first_batch=True),
}

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
TABLE9_AE_EPOCHS = [0, 10, 20, 40, 60, 80, 100]
TABLE10_STDS = [1.0, 2.0, 3.0, 10.0]


def run_config(method, num_codes, ae_epochs=None, vq_epochs=None, **extra):
    """One run of a grid: the args that identify it (the rest comes from the command line)."""
    m = METHODS[method]
    return dict(method=method, num_codes=num_codes, ae_epochs=m["ae"] if ae_epochs is None else ae_epochs,
                vq_epochs=m["vq"] if vq_epochs is None else vq_epochs, **extra)


def grid_configs(name):
    """The runs of one paper table/figure. evaluate.py reads the same lists to find its runs."""
    if name == "fig5":  # EMA variants: the A.1 recipe (decay 0.99, 150 + 150 epochs)
        return [run_config(m, k) for m in ("baseline_ema", "deferred_ema") for k in FIG5_SIZES]
    if name == "table8":
        return [run_config(m, 8192) for m in ("baseline_ema", "posthoc_kmeans", "deferred_ema")]
    if name == "table9":  # Discretization Phase fixed to 150 epochs; AE epochs 0 = baseline
        return [run_config("deferred_ema", 8192, ae_epochs=e, vq_epochs=150) for e in TABLE9_AE_EPOCHS]
    if name == "table10":  # 16,384 codes: the paper's "ours" row equals Deferred + EMA at 16K
        return ([run_config("gaussian", 16384, init_std=s) for s in TABLE10_STDS]
                + [run_config("deferred_ema", 16384)])
    if name == "table11":
        return [run_config(m, k) for m in TABLE11_METHODS for k in TABLE11_SIZES]
    if name == "fig6":  # the Table 11 methods at 16,384 codes (appendix A.3)
        return [run_config(m, 16384) for m in TABLE11_METHODS]
    raise UserError(f"unknown grid '{name}' (use {', '.join(GRIDS)})")


GRIDS = ("fig5", "table8", "table9", "table10", "table11", "fig6")

# Options that change what a run computes. A checkpoint made under other values cannot be resumed,
# and evaluate.py averages only runs that agree on all of them except the seed.
RUN_DEFINING = ("method", "num_codes", "ae_epochs", "vq_epochs", "init_std", "affine_lr", "sync_nu",
                "dead_code_steps", "ratio", "dim", "channels", "res_channels", "res_blocks", "beta",
                "ema_decay", "lr", "batch_size", "train_subset", "test_subset", "preset", "seed")


# Every number the parser accepts, checked before any work (common.check_ranges; floats must also
# be finite: `--ratio inf`, `--beta nan`, `--affine-lr nan` are refused). Rules between arguments
# and the data are in `validate` and `check_switch_embeddings`.
RANGES = {"num_codes": ">= 1", "ae_epochs": ">= 0", "vq_epochs": ">= 0", "init_std": "> 0", "affine_lr": ">= 0",
          "sync_nu": ">= 0", "dead_code_steps": ">= 0", "ratio": ">= 1", "dim": ">= 1", "channels": ">= 2",
          "res_channels": ">= 1", "res_blocks": ">= 0", "beta": ">= 0", "ema_decay": "(0, 1)", "lr": "> 0",
          "batch_size": ">= 1", "train_subset": ">= 1", "test_subset": ">= 1", "workers": ">= 0", "seed": ">= 0",
          "dist_timeout": "> 0"}
TOKENS_PER_IMAGE = 8 * 8  # encoder outputs per 32 x 32 image (two stride-2 convolutions)


def defining_keys(args):
    """The RUN_DEFINING options of a run (a namespace or a dict); sigma only for gaussian."""
    a = args if isinstance(args, dict) else vars(args)
    return [k for k in RUN_DEFINING if k != "init_std" or a.get("method") == "gaussian"]


def defining_args(args):
    """The RUN_DEFINING values of resolved args (a namespace or a dict)."""
    a = args if isinstance(args, dict) else vars(args)
    return {k: a.get(k) for k in defining_keys(a)}


def resolve_args(args):
    """Fill every None from the preset, then from the method's paper defaults (explicit flags win)."""
    if args.method not in METHODS:
        raise UserError(f"unknown method '{args.method}' (use {', '.join(METHODS)})")
    m = METHODS[args.method]
    preset = dict(PRESETS[args.preset])
    ae, vq = m["ae"], m["vq"]
    if "epochs" in preset:  # shorten both phases in the method's proportion, each kept >= 1 if used
        total = preset.pop("epochs")
        ae = int(min(total - (vq > 0), max(ae > 0, round(total * ae / (ae + vq)))))
        vq = total - ae
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.ae_epochs = ae if args.ae_epochs is None else args.ae_epochs
    args.vq_epochs = vq if args.vq_epochs is None else args.vq_epochs
    for key in ("affine_lr", "sync_nu", "dead_code_steps"):
        if getattr(args, key) is None:
            setattr(args, key, m.get(key, 0))
    return args


def validate(args, world_size=1):
    """Rules between arguments (single numbers are in RANGES), checked before any work."""
    m = METHODS[args.method]
    if args.ae_epochs + args.vq_epochs == 0:
        raise UserError("--ae-epochs and --vq-epochs must not both be 0")
    if args.method == "posthoc_kmeans" and args.vq_epochs != 0:
        raise UserError("posthoc_kmeans never trains with quantization (Table 8): use --vq-epochs 0")
    if m["switch"] is None and args.ae_epochs != 0:
        raise UserError(f"{args.method} quantizes from the start (Table 10): use --ae-epochs 0")
    if not 16 <= args.num_codes <= 65536 and args.preset == "paper":
        raise UserError(f"--num-codes {args.num_codes} is outside the paper's range 16 ... 65,536")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")


def switch_ratio(args, num_train):
    """Embeddings per code that the switch collects: --ratio, or for SoundStream's k-means of the
    first batch (lru_kmeans) one global batch (the whole set if smaller), at least one per code."""
    if METHODS[args.method].get("first_batch"):
        return max(1.0, min(args.batch_size, num_train) * TOKENS_PER_IMAGE / args.num_codes)
    return args.ratio


def check_switch_embeddings(args, num_train):
    """The switch collects its embeddings within one epoch: refuse, before training, a ratio or a
    codebook that one epoch of the training images cannot give (rather than collecting fewer)."""
    if METHODS[args.method]["switch"] is None:
        return
    available = num_train * TOKENS_PER_IMAGE
    needed = math.ceil(switch_ratio(args, num_train) * args.num_codes)
    if needed > available:
        raise UserError(f"the switch needs {needed} encoder outputs (--ratio {args.ratio:g} x --num-codes "
                        f"{args.num_codes}), but one epoch of {num_train} training images gives {available} "
                        f"({TOKENS_PER_IMAGE} per image); lower --ratio or --num-codes, or use more images")


def run_name(args):
    """Method, codebook size, phase lengths and seed (+ the method's own hyperparameters)."""
    tags = [args.method]
    if args.method == "gaussian":
        tags.append(f"std{args.init_std:g}")
    if args.affine_lr > 0:
        tags.append(f"alr{args.affine_lr:g}")
    if args.sync_nu > 0:
        tags.append(f"nu{args.sync_nu:g}")
    if args.dead_code_steps > 0:
        tags.append(f"dead{args.dead_code_steps}")
    tags += [f"K{args.num_codes}", f"ae{args.ae_epochs}", f"vq{args.vq_epochs}", f"s{args.seed}"]
    if args.preset != "paper":
        tags.append(args.preset)
    return "_".join(tags)


# ================================================================================================
# Model: the classic VQ-VAE CIFAR-10 network (van den Oord et al. 2017), appendix A.1
# ================================================================================================


class ResidualStack(nn.Module):
    """ReLU, 3x3 conv to `hidden`, ReLU, 1x1 conv back, added to the input; a final ReLU."""

    def __init__(self, channels, hidden, num_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(hidden, channels, 1)) for _ in range(num_blocks))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class VQVAE(nn.Module):
    """32x32 image -> two stride-2 4x4 convs -> 8x8 x `channels` -> 3x3 conv -> residual stack ->
    1x1 conv to the token dim -> quantizer -> mirrored decoder. 64 tokens per image."""

    def __init__(self, quantizer, channels=128, res_channels=64, res_blocks=2, dim=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ResidualStack(channels, res_channels, res_blocks),
            nn.Conv2d(channels, dim, 1))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, channels, 3, padding=1),
            ResidualStack(channels, res_channels, res_blocks),
            nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(channels // 2, 3, 4, stride=2, padding=1))

    def forward(self, x):
        z_q, indices, vq_loss = self.quantizer(self.encoder(x))
        return self.decoder(z_q), indices, vq_loss


def build_model(args):
    m = METHODS[args.method]
    quantizer = VectorQuantizer(
        args.num_codes, args.dim, beta=args.beta, ema_decay=args.ema_decay if m["ema"] else None,
        init="gaussian" if args.method == "gaussian" else "uniform", init_std=args.init_std,
        enabled=m["switch"] is None, dead_code_steps=args.dead_code_steps,
        affine_lr=args.affine_lr, sync_nu=args.sync_nu)
    return VQVAE(quantizer, args.channels, args.res_channels, args.res_blocks, args.dim)


# ================================================================================================
# Data: torchvision's CIFAR-10 held in memory as uint8, converted on the device
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


def load_data(args):
    """{'train', 'test'}: both splits as uint8 tensors (a UserError when the data are missing)."""
    return {"train": load_cifar(args.data_dir, True, args.download, args.train_subset),
            "test": load_cifar(args.data_dir, False, args.download, args.test_subset)}


def build_loaders(args, info, data):
    """Training loader (DistributedSampler, reshuffled per epoch from (seed, epoch)) and the test
    loader, sharded without padding so every test image is counted exactly once over all ranks."""
    train, test = data["train"], data["test"]
    per_rank = args.batch_size // info.world_size
    pin = info.device.type == "cuda"
    sampler = DistributedSampler(TensorDataset(train), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed)
    train_loader = DataLoader(TensorDataset(train), batch_size=per_rank, sampler=sampler,
                              num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0)
    test_shard = Subset(TensorDataset(test), range(info.rank, len(test), info.world_size))
    test_loader = DataLoader(test_shard, batch_size=max(per_rank, 256), shuffle=False,
                             num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0)
    return train_loader, sampler, test_loader


# ================================================================================================
# Evaluation: test MSE, VQ loss and code usage over the whole (all-reduced) test set
# ================================================================================================


@torch.no_grad()
def evaluate(model, loader, args, device):
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, vq loss x images, images
    usage = UsageCounter(args.num_codes, device)
    for batch in loader:
        x = to_input(batch, device)
        with autocast_for(device):
            recon, indices, vq_loss = model(x)
        sums[0] += F.mse_loss(recon.float(), x, reduction="sum").double()
        sums[1] += vq_loss.double() * x.shape[0]
        sums[2] += x.shape[0]
        if indices is not None:
            usage.update(indices)
    all_reduce_sum(sums)
    usage.all_reduce()
    mse = float(sums[0] / (sums[2] * 3 * 32 * 32))
    return {"mse": mse, "loss": mse + float(sums[1] / sums[2]), "counts": usage.counts.cpu()}


# ================================================================================================
# One run
# ================================================================================================


def switch(model, loader, args, epoch):
    """Continuous -> Discretization (common.deferred_switch) from this epoch's batches."""
    m = METHODS[args.method]
    ratio = switch_ratio(args, len(loader.dataset))
    loader.sampler.set_epoch(epoch)
    model.eval()
    device = next(model.parameters()).device

    def encode(batch):
        return model.encoder(to_input(batch, device))

    with autocast_for(device):
        n = deferred_switch(model.quantizer, encode, loader, ratio, method=m["switch"], seed=args.seed,
                            progress=True)
    print0(f"epoch {epoch}: quantization on, codebook of {args.num_codes} from {n} embeddings per rank "
           f"({m['switch']})")


def train_run(args, info):
    """Start-up protocol (common.start_run), then train (or resume) one configuration."""
    name = run_name(args)
    paths = {"json": os.path.join(args.out, name + ".json"), "ckpt": os.path.join(args.out, name + ".pt")}
    data = {}

    def check_data():  # rank 0, before the lock: data readable, and enough of it for the switch
        data.update(load_data(args))
        check_switch_embeddings(args, len(data["train"]))

    with start_run(args, name=name, outputs=[paths["ckpt"], paths["json"]], ranges=RANGES,
                   defining=defining_keys(args), resume_from=paths["ckpt"], checks=[check_data],
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
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, amsgrad=True)
    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        print0(f"resuming {name} at epoch {start_epoch}")
    # The gradient codebook / affine parameters sit unused during the Continuous Phase.
    ddp = wrap_ddp(model, info, find_unused_parameters=args.ae_epochs > 0)
    total = args.ae_epochs + args.vq_epochs

    def save(epochs_done, code_counts):
        """Epoch-boundary checkpoint (rank 0): resumable state + the codebook and its test usage."""
        if info.is_main:
            save_checkpoint(paths["ckpt"], model=model.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epochs_done, history=history, args=vars(args),
                            codebook=model.quantizer.codebook.detach().float().cpu(), code_counts=code_counts)

    t0 = time.time()
    for epoch in range(start_epoch, total):
        if epoch == args.ae_epochs and not model.quantizer.is_enabled:
            switch(model, train_loader, args, epoch)
        sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x n, mse x n, n, quantized steps
        for batch in progress_bar(train_loader, desc=f"{name} epoch {epoch}", leave=False):
            x = to_input(batch, device)
            with autocast_for(device):
                recon, indices, vq_loss = ddp(x)
            mse = F.mse_loss(recon.float(), x)
            loss = mse + vq_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: no host sync per step.
            n = x.shape[0]
            sums += torch.stack([loss.detach() * n, mse.detach() * n, loss.new_tensor(n),
                                 loss.new_tensor(float(indices is not None))]).double()
        all_reduce_sum(sums)
        # Checked once per epoch, before anything is written, so a diverged epoch never overwrites
        # the last good checkpoint.
        check_finite(sums[0] + sums[1], f"epoch {epoch}")
        val = evaluate(model, test_loader, args, device)
        history.append({"epoch": epoch, "phase": "continuous" if epoch < args.ae_epochs else "discretization",
                        "train_loss": float(sums[0] / sums[2]), "train_mse": float(sums[1] / sums[2]),
                        "val_loss": val["loss"], "val_mse": val["mse"],
                        "val_perplexity": perplexity_from_counts(val["counts"]),
                        "quantized_steps": int(sums[3] / info.world_size)})
        print0(f"epoch {epoch}: train loss {history[-1]['train_loss']:.5f}, val mse {val['mse']:.5f}")
        save(epoch + 1, val["counts"])
    if not model.quantizer.is_enabled:  # posthoc_kmeans: discretize after training, no fine-tuning
        switch(model, train_loader, args, total)
    final = evaluate(model, test_loader, args, device)
    metrics = codebook_metrics(model.quantizer.codebook, final["counts"])
    metrics["mse"] = final["mse"]
    metrics["val_loss"] = final["loss"]
    save(total, final["counts"])
    if info.is_main:
        write_result(paths["json"], "cifar10", args.method, args, metrics, history, run_name=name,
                     wall_seconds=time.time() - t0, world_size=info.world_size)
    print0(f"{name}: test mse {metrics['mse']:.5f}, perplexity {metrics['perplexity']:.1f}, "
           f"vendi {metrics['vendi']:.3f}, euclidean {metrics['euclidean']:.3f}")
    return metrics


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
            train_run(run_args, info)
    finally:
        cleanup_distributed()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="deferred_ema", choices=sorted(METHODS))
    p.add_argument("--grid", choices=GRIDS, help="run every configuration of one paper table/figure")
    p.add_argument("--grid-shard", default="0/1",
                   help="I/N: run only configurations I, I+N, ... of the grid (one process per GPU)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--num-codes", type=int, default=512, help="codebook size (paper: 16 ... 65,536)")
    p.add_argument("--ae-epochs", type=int, help="Continuous Phase epochs (default: per method)")
    p.add_argument("--vq-epochs", type=int, help="Discretization Phase epochs (default: per method)")
    p.add_argument("--init-std", type=float, default=1.0, help="sigma of the gaussian method (Table 10)")
    p.add_argument("--affine-lr", type=float, help="affine reparameterisation rate (default: per method)")
    p.add_argument("--sync-nu", type=float, help="synchronized update nu (default: per method)")
    p.add_argument("--dead-code-steps", type=int, help="LRU replacement after this many unused steps")
    p.add_argument("--ratio", type=float, default=10.0, help="embeddings per code at the switch (A.1: 10)")
    p.add_argument("--dim", type=int, default=32, help="token dimension")
    p.add_argument("--channels", type=int, help="encoder/decoder channels (paper 128)")
    p.add_argument("--res-channels", type=int, help="residual hidden channels (paper 64)")
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, help="global batch size (paper preset 128)")
    p.add_argument("--train-subset", type=int, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, help="use only the first N test images")
    p.add_argument("--data-dir", default="data/cifar10", help="folder holding cifar-10-batches-py")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (needs internet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    add_run_arguments(p, out_default="runs/cifar")  # --out, --resume (--grid: automatic), --device, --dist-timeout
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
