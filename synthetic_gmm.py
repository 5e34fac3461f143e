"""Synthetic mixture of Gaussians: token coverage failure and Deferred Quantization (paper
section 4, Figures 2 and 3; setup in section 6.1 and appendix A.1).

Ten Gaussian clusters of 1,000 points, standardised per feature, are reconstructed by a small
MLP VQ-VAE. Two arms share the initial weights and the data order:
  baseline   --epochs 200, all of them Discretization Phase: the codebook is initialised at step 0
             from the untrained encoder's outputs (the usual practice the paper blames for
             coverage failure);
  deferred   --continuous-epochs 100 with the quantizer off (Continuous Phase), then the codebook
             is initialised from the trained encoder's outputs and the remaining 100 of the 200
             --epochs run with quantization (Discretization Phase). Same total budget as the
             baseline (section 6.1).
Both go through `common.deferred_switch`; only the epoch of the switch differs.

Commands (CPU; one process is the right size for a 10,000-point MLP):
    python synthetic_gmm.py --compare                                  # 2-d data, 1-d tokens
    python synthetic_gmm.py --compare --ema                            # EMA codebook, gamma 0.9
    python synthetic_gmm.py --compare --data-dim 48 --token-dim 32     # Figure 2(b), t-SNE panels
    python synthetic_gmm.py --deferred --seed 1 --out runs/synthetic   # one arm
    python synthetic_gmm.py --compare --resume                         # continue a killed run
No file of an existing run (.pt, .json, figures) in --out is overwritten without --resume.
One GPU: add `--device cuda` (works, but a 256 x 2 batch is launch-bound; the CPU is faster).
torchrun is not supported: the whole job is a few seconds of one core.

Outputs in --out (default runs/synthetic), <name> = <method>_d<data_dim>_t<token_dim>_s<seed>, method in
baseline, deferred, baseline_ema, deferred_ema:
    <name>.json      metrics (mse, perplexity, used_codes, euclidean, cosine, vendi, modes_covered,
                     own_mode_share, within_mode_spread) + "history" every --log-every epochs
                     ("phase": "continuous" | "discretization"; the entry with "switch": true is
                     the model right after the switch, before any Discretization-Phase step) +
                     "init_codebook", the diagnostics of the codebook right after its initialisation
    <name>.pt        checkpoint (model, optimizer, epoch, history, RNG states, codebook, code_counts)
    <name>_fig2.png  Figure 2 panels of one arm; with --compare one figure compare<...>_fig2.png
                     (baseline top row, deferred bottom row, as in the paper)
    <tag>_fig3.png   Figure 3: KDE of untrained vs trained (Continuous Phase) encoder outputs
                     (written whenever the deferred arm runs)

Choices the paper leaves open (documented here and in the JSON args):
  * Cluster means: uniform in [-10, 10]^data-dim with standard deviation 1, as sklearn's make_blobs
    defaults, which the "StandardScaler" wording suggests; centres are redrawn until every pair is
    at least --min-separation (5) standard deviations apart, so the 10 modes never overlap in 2-d.
    The data depend on --seed (seed 0 is the reported setting).
  * Embedding-to-code ratio 2:1: the appendix says large codebooks "cannot be initialised from a
    single batch" and used 10:1 / 2:1 there; 128 codes from one batch of 256 embeddings is the
    single-batch initialisation that remark implies for the synthetic set. The codebook is
    initialised from the first batch(es) of the first Discretization-Phase epoch, in that epoch's data order.
  * Hidden width 32 (appendix A.1), so --token-dim may not exceed --hidden.

Start-up (common.start_run, before any training): every number is checked (finite, in range:
`--ratio inf`, `--beta nan`, `--center-box nan` are refused), --out must be writable, the mixture
must be placeable, each arm takes the lock <out>/<name>.lock (a second process on the same arm gets
a one-line refusal), temporary files of killed writes are removed, and without --resume none of
the run's files (.pt, .json, figures) may exist; --resume refuses a checkpoint made with other
run-defining settings (RUN_DEFINING).

Resume: checkpoints at epoch boundaries (every --ckpt-every epochs and at the end). Data order
comes from a generator seeded with (seed, epoch) and RNG states are restored, so `--resume`
reproduces an uninterrupted run exactly (the tests kill a run from outside and compare).
"""
import argparse
import contextlib
import hashlib
import math
import os
import time

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import (UserError, VectorQuantizer, add_run_arguments, atomic_write, check_finite,
                    codebook_metrics, deferred_switch, print0, run_cli, save_checkpoint, seed_everything,
                    set_rng_state, setup_distributed, start_run, write_result)

EXPERIMENT = "synthetic_gmm"
# A mode is "covered" when at least this share of all reconstructions lands nearest to its mean
# (half of the 10% a mode would get if reconstructions matched the data).
MIN_MODE_SHARE = 0.05
# Options that change what a run computes: a checkpoint made under other values cannot be resumed.
RUN_DEFINING = ("data_dim", "token_dim", "hidden", "clusters", "points_per_cluster", "cluster_std",
                "center_box", "min_separation", "codebook_size", "batch_size", "lr", "beta", "ema",
                "ema_decay", "epochs", "continuous_epochs", "ratio", "init_method", "seed")
# Every number the parser accepts, checked before any work (common.check_ranges; floats must also
# be finite). Rules between arguments are in `validate`.
RANGES = {"data_dim": ">= 1", "token_dim": ">= 1", "hidden": ">= 1", "clusters": ">= 1", "points_per_cluster": ">= 2",
          "cluster_std": "> 0", "center_box": "> 0", "min_separation": ">= 0", "codebook_size": ">= 1",
          "batch_size": ">= 1", "lr": "> 0", "beta": ">= 0", "ema_decay": "(0, 1)", "epochs": ">= 1",
          "continuous_epochs": ">= 0", "ratio": ">= 1", "seed": ">= 0", "ckpt_every": ">= 1", "log_every": ">= 1",
          "tsne_points": ">= 2", "dist_timeout": "> 0"}

# ------------------------------------------------------------------------------------------------
# Data: the mixture of section 6.1, standardised (appendix A.1)
# ------------------------------------------------------------------------------------------------


def cluster_centres(dim, clusters, box, min_separation, rng):
    """Centres uniform in [-box, box]^dim, each redrawn until it lies at least `min_separation`
    from every centre already placed (sequential rejection; fails only for impossible packings)."""
    centres = []
    for _ in range(clusters):
        for _attempt in range(10_000):
            c = rng.uniform(-box, box, size=dim)
            if all(np.linalg.norm(c - o) >= min_separation for o in centres):
                centres.append(c)
                break
        else:
            raise UserError(f"cannot place {clusters} centres {min_separation} apart in [-{box}, {box}]^{dim}; "
                            "lower --min-separation or raise --center-box")
    return np.stack(centres)


def make_mixture(args):
    """(x, labels, means): `clusters` x `points_per_cluster` points, standardised per feature
    (zero mean, unit variance, population std like StandardScaler), and the cluster means mapped
    through the same standardisation (they define the modes for the coverage metric)."""
    rng = np.random.default_rng(args.seed)
    centres = cluster_centres(args.data_dim, args.clusters, args.center_box, args.min_separation, rng)
    labels = np.repeat(np.arange(args.clusters), args.points_per_cluster)
    raw = centres[labels] + args.cluster_std * rng.standard_normal((labels.size, args.data_dim))
    mean, std = raw.mean(0), raw.std(0)
    to_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return to_tensor((raw - mean) / std), torch.from_numpy(labels), to_tensor((centres - mean) / std)


def epoch_order(n, seed, epoch):
    """The permutation of the data for one epoch, from a generator seeded by (seed, epoch): the
    same in both arms and after a resume, whatever ran before."""
    gen_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(gen_seed))


def epoch_batches(x, seed, epoch, batch_size):
    """Shuffled batches as slices of one tensor (no DataLoader: per-step overhead would dominate)."""
    xs = x[epoch_order(x.shape[0], seed, epoch).to(x.device)]
    return [xs[i:i + batch_size] for i in range(0, xs.shape[0], batch_size)]


# ------------------------------------------------------------------------------------------------
# Model: MLP encoder/decoder, three linear layers with ReLU (appendix A.1)
# ------------------------------------------------------------------------------------------------


def mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class VQVAE(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.encoder = mlp(args.data_dim, args.hidden, args.token_dim)
        # Starts disabled: the switch (at step 0 for the baseline) initialises and enables it.
        self.quantizer = VectorQuantizer(args.codebook_size, args.token_dim, beta=args.beta,
                                         ema_decay=args.ema_decay if args.ema else None, enabled=False)
        self.decoder = mlp(args.token_dim, args.hidden, args.data_dim)

    def forward(self, x):
        z = self.encoder(x)
        z_q, indices, vq_loss = self.quantizer(z)
        return self.decoder(z_q), z, indices, vq_loss


def build_model(args, device):
    """Seeded construction: every arm (and every resume) starts from the same initial weights."""
    seed_everything(args.seed)
    return VQVAE(args).to(device)


def state_digest(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Metrics: reconstruction MSE, mode coverage, codebook diagnostics (appendix A.2)
# ------------------------------------------------------------------------------------------------


def mode_coverage(recon, means, labels, min_share=MIN_MODE_SHARE):
    """(modes covered, own-mode share). Each reconstruction is assigned to its nearest cluster
    mean; a mode is covered when it receives at least `min_share` of all reconstructions; the
    own-mode share is the fraction of points whose reconstruction is nearest their own mean."""
    nearest = torch.cdist(recon.float(), means.float()).argmin(1)
    share = torch.bincount(nearest, minlength=means.shape[0]).double() / recon.shape[0]
    return int((share >= min_share).sum()), float((nearest == labels.to(nearest.device)).double().mean())


def within_mode_spread(recon, x, labels):
    """Within-cluster variance of the reconstructions over that of the data (summed over clusters
    and features): 1 when each mode's spread is reproduced, 0 when each mode collapses to a point.
    Mode coverage cannot see this second kind of collapse (section 4, Figure 2(b))."""
    num, den = 0.0, 0.0
    for k in labels.unique():
        member = labels == k
        num += float(recon[member].var(0, unbiased=False).sum())
        den += float(x[member].var(0, unbiased=False).sum())
    return num / den


@torch.no_grad()
def evaluate(model, x, labels, means):
    """Metrics over the whole dataset, plus the arrays the figures need."""
    was_training = model.training
    model.eval()
    recon, z, indices, _ = model(x)
    model.train(was_training)
    modes, own = mode_coverage(recon, means, labels)
    metrics = {"mse": float(F.mse_loss(recon, x)), "modes_covered": modes, "own_mode_share": own,
               "within_mode_spread": within_mode_spread(recon, x, labels)}
    counts = None
    if indices is not None:  # Discretization Phase: usage over the whole dataset
        counts = torch.bincount(indices, minlength=model.quantizer.num_codes).cpu()
        metrics.update(codebook_metrics(model.quantizer.codebook, counts))
    arrays = {"recon": recon.cpu(), "embeddings": z.cpu(), "codebook": model.quantizer.codebook.detach().cpu(),
              "counts": counts, "indices": None if indices is None else indices.cpu()}
    return metrics, arrays


# ------------------------------------------------------------------------------------------------
# Training one arm
# ------------------------------------------------------------------------------------------------


def arm_name(args, method):
    return f"{method}{'_ema' if args.ema else ''}_d{args.data_dim}_t{args.token_dim}_s{args.seed}"


def train_arm(args, method, data, device, resume_state=None):
    """Train one arm and write <name>.json and <name>.pt; returns what the figures need."""
    x, labels, means = data
    name = arm_name(args, method)
    ckpt_path = os.path.join(args.out, name + ".pt")
    switch_epoch = 0 if method == "baseline" else args.continuous_epochs
    model = build_model(args, device)
    init_digest = state_digest(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    start, history, extra = 0, [], {"init_codebook": None, "continuous_encoder": None}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        start, history, extra = resume_state["epoch"], resume_state["history"], resume_state["extra"]
        set_rng_state(resume_state["rng"])
        print0(f"{name}: resuming after epoch {start}")

    t0, prior_s = time.time(), extra.get("train_seconds", 0.0)

    def checkpoint(epoch, **final):
        extra["train_seconds"] = prior_s + time.time() - t0
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                        history=history, extra=extra, args=vars(args), init_digest=init_digest, **final)

    for epoch in range(start, args.epochs):
        batches = epoch_batches(x, args.seed, epoch, args.batch_size)
        if epoch == switch_epoch:
            if method == "deferred":  # keep the Continuous-Phase encoder for Figure 3
                extra["continuous_encoder"] = {k: v.clone().cpu() for k, v in model.encoder.state_dict().items()}
            # Section 5: codebook from the current encoder's embeddings of the first batch(es)
            # of this epoch. At epoch 0 (baseline) that encoder is untrained.
            deferred_switch(model.quantizer, model.encoder, batches, args.ratio, args.init_method, args.seed)
            print0(f"{name}: Discretization Phase from epoch {epoch} (after {epoch} Continuous Phase epochs)")
            extra["init_codebook"] = codebook_metrics(model.quantizer.codebook)
            # The model right after the switch, before any Discretization-Phase step.
            history.append({"epoch": epoch, "phase": "discretization", "switch": True,
                            **evaluate(model, x, labels, means)[0]})
        phase = "discretization" if model.quantizer.is_enabled else "continuous"
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            recon, _, _, vq_loss = model(batch)
            loss = F.mse_loss(recon, batch) + vq_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        # One check per epoch instead of a sync per step: a NaN/inf anywhere makes the sum
        # non-finite, and nothing is written before this check passes.
        check_finite(loss_sum, f"{name} epoch {epoch + 1}")
        done = epoch + 1
        if done % args.log_every == 0 or done == args.epochs:
            history.append({"epoch": done, "phase": phase, "loss": float(loss_sum) / len(batches),
                            **evaluate(model, x, labels, means)[0]})
        if done % args.ckpt_every == 0 and done < args.epochs:
            checkpoint(done)
    metrics, arrays = evaluate(model, x, labels, means)
    checkpoint(args.epochs, codebook=arrays["codebook"], code_counts=arrays["counts"])
    train_s = extra["train_seconds"]
    write_result(os.path.join(args.out, name + ".json"), EXPERIMENT, method + ("_ema" if args.ema else ""),
                 args, metrics, history, name=name, init_digest=init_digest,
                 init_codebook=extra["init_codebook"], switch_epoch=switch_epoch, train_seconds=train_s,
                 model_finished=True, model_epoch=args.epochs)  # written once training has ended
    print0(f"{name}: mse {metrics['mse']:.4f}  modes {metrics['modes_covered']}/{args.clusters}  "
           f"own-mode {metrics['own_mode_share']:.3f}  spread {metrics['within_mode_spread']:.2f}  "
           f"used codes {metrics['used_codes']}/{args.codebook_size}  "
           f"perplexity {metrics['perplexity']:.1f}  ({train_s:.1f} s)")
    if extra["continuous_encoder"] is not None:
        continuous_encoder = mlp(args.data_dim, args.hidden, args.token_dim).to(device)
        continuous_encoder.load_state_dict(extra["continuous_encoder"])
        with torch.no_grad():
            arrays["continuous_embeddings"] = continuous_encoder(x).cpu()
    arrays.update(method=method, metrics=metrics)
    return arrays


# ------------------------------------------------------------------------------------------------
# Figures 2 and 3
# ------------------------------------------------------------------------------------------------


def tsne(points, seed):
    from sklearn.manifold import TSNE
    perplexity = min(30.0, (points.shape[0] - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points.numpy())


# KDE bandwidth (Figures 2 and 3) in bins of the histogram drawn beside it (200 bins over the
# plotted range). Rules of thumb that assume one mode smooth the ten modes of the trained encoder
# together: on seed 0 (2-d data, 1-d tokens) Scott's rule gives 0.31 and Silverman's 0.27 and both
# show 3 peaks, where the histogram shows 10 (cluster widths 0.04 ... 0.43, neighbouring means
# 0.3 apart). Two bins (0.09 there) give exactly 10 peaks, at the 10 cluster means, as the paper's
# Figure 3(b) shows; one bin starts splitting the widest cluster.
HIST_BINS = 200
KDE_BANDWIDTH_BINS = 2.0


def kde_density(values, grid):
    """Gaussian KDE of 1-d `values` on `grid` with a bandwidth of KDE_BANDWIDTH_BINS histogram bins
    (the bins are HIST_BINS equal parts of the grid's range)."""
    from scipy.stats import gaussian_kde
    values = np.asarray(values, dtype=np.float64)
    if values.std() == 0:  # every value identical: a spike, which gaussian_kde cannot fit
        return np.where(np.abs(grid - values[0]) <= np.ptp(grid) / 200, 1.0, 0.0)
    bandwidth = KDE_BANDWIDTH_BINS * np.ptp(grid) / HIST_BINS
    return gaussian_kde(values, bw_method=bandwidth / values.std(ddof=1))(grid)  # factor x sample std


def kde_curve(ax, values, grid, color, label, fill, hist=False):
    """`kde_density` drawn on `ax`; `hist` draws the histogram whose bins set the bandwidth."""
    values = values.double().numpy()
    if hist:
        ax.hist(values, bins=np.linspace(grid[0], grid[-1], HIST_BINS + 1), density=True, histtype="step",
                color="#888888", lw=0.8, label="histogram")
    (ax.fill_between if fill else ax.plot)(grid, kde_density(values, grid), color=color, label=label,
                                           **({"alpha": 0.5} if fill else {"lw": 2}))


def first_pc(z):
    """Projection on the first principal component: the most spread 1-d view of a d-dim cloud."""
    if z.shape[1] == 1:
        return z[:, 0]
    zc = z - z.mean(0)
    return zc @ torch.linalg.svd(zc, full_matrices=False).Vh[0]


def data_panel(ax, x, arr, args, pick):
    recon = arr["recon"]
    if args.data_dim == 2:
        ax.scatter(x[:, 0], x[:, 1], s=2, c="#a6cee3", label="data")
        ax.scatter(recon[:, 0], recon[:, 1], s=2, c="#1f4e9c", label="reconstruction")
        ax.set_title("data space")
    else:
        # One reconstruction per code used: a collapsed decoder repeats a few outputs hundreds of
        # times, and t-SNE would inflate those zero-distance copies into rings around the data.
        idx = arr["indices"][pick]
        distinct = recon[pick][torch.stack([(idx == c).nonzero()[0, 0] for c in idx.unique()])]
        emb = tsne(torch.cat([x[pick], distinct]), args.seed)
        ax.scatter(*emb[:len(pick)].T, s=3, c="#a6cee3", label="data")
        ax.scatter(*emb[len(pick):].T, s=6, c="#1f4e9c", label="reconstruction")
        ax.set_title(f"data space (t-SNE: {len(pick)} points, their {len(distinct)} distinct reconstructions)",
                     fontsize=10)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)


def latent_panel(ax, arr, args, pick):
    z, codes = arr["embeddings"], arr["codebook"]
    if args.token_dim == 1:
        lo, hi = min(z.min(), codes.min()).item(), max(z.max(), codes.max()).item()
        grid = np.linspace(lo - 0.1 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6), 600)
        kde_curve(ax, z[:, 0], grid, "#f4b6c2", "encoder embeddings", fill=True, hist=True)
        kde_curve(ax, codes[:, 0], grid, "#c2185b", f"codebook ({codes.shape[0]} codes)", fill=False)
        ax.set_title("latent space (KDE)")
    else:
        emb = tsne(torch.cat([z[pick], codes]), args.seed)
        ax.scatter(*emb[:len(pick)].T, s=3, c="#f4b6c2", label="encoder embeddings")
        ax.scatter(*emb[len(pick):].T, s=9, c="#c2185b", label=f"codebook ({codes.shape[0]} codes)")
        ax.set_title("latent space (t-SNE)")
    ax.legend(loc="upper right", fontsize=7)


def plot_figure2(path, x, arms, args):
    """One row per arm: data vs reconstructions, and encoder embeddings vs codebook."""
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.tsne_points]
    fig, axes = plt.subplots(len(arms), 2, figsize=(10, 4.4 * len(arms)), squeeze=False)
    for row, arr in zip(axes, arms):
        data_panel(row[0], x, arr, args, pick)
        latent_panel(row[1], arr, args, pick)
        m = arr["metrics"]
        row[0].set_ylabel(arr["method"], fontsize=12, fontweight="bold")
        row[0].text(0.01, 0.01, f"MSE {m['mse']:.3f}, modes {m['modes_covered']}/{args.clusters}, own-mode "
                    f"{m['own_mode_share']:.2f}, spread {m['within_mode_spread']:.2f}",
                    transform=row[0].transAxes, fontsize=8)
        row[1].text(0.01, 0.01, f"used codes {m['used_codes']}/{args.codebook_size}, "
                    f"perplexity {m['perplexity']:.1f}", transform=row[1].transAxes, fontsize=8)
    fig.suptitle(f"Figure 2: input dim {args.data_dim}, token dim {args.token_dim}"
                 f"{', EMA codebook' if args.ema else ''}, seed {args.seed}")
    fig.tight_layout()
    save_png(fig, path)


def plot_figure3(path, untrained, trained, args):
    """KDE of encoder outputs before and after the Continuous Phase (first principal component
    when the token dimension exceeds 1), on one shared axis so the spreads compare directly."""
    a, b = first_pc(untrained), first_pc(trained)
    lo, hi = min(a.min(), b.min()).item(), max(a.max(), b.max()).item()
    grid = np.linspace(lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6), 800)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    view = "" if args.token_dim == 1 else " (first principal component)"
    for ax, values, title in ((axes[0], a, "(a) untrained encoder"), (axes[1], b, "(b) trained encoder")):
        kde_curve(ax, values, grid, "#f4b6c2", "KDE", fill=True, hist=True)
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title(f"{title}: range {np.ptp(values.numpy()):.2f}")
        ax.set_xlabel("encoder output" + view)
    fig.suptitle(f"Figure 3: encoder outputs, input dim {args.data_dim}, token dim {args.token_dim}, seed {args.seed}")
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def validate(args):
    """Rules between arguments (single numbers are in RANGES), checked before any work."""
    if args.token_dim > args.hidden:
        raise UserError(f"--token-dim must lie in [1, --hidden={args.hidden}], got {args.token_dim}")
    n = args.clusters * args.points_per_cluster
    if args.codebook_size > n:
        raise UserError(f"codebook of {args.codebook_size} codes is larger than the {n} data points")
    # The switch collects its embeddings from one epoch (the whole dataset): refuse a ratio it
    # could only meet by silently collecting fewer.
    needed = math.ceil(args.ratio * args.codebook_size)
    if needed > n:
        raise UserError(f"--ratio {args.ratio:g} x --codebook-size {args.codebook_size} needs {needed} embeddings "
                        f"at the switch, but one epoch holds only the {n} data points; lower --ratio to at most "
                        f"{n / args.codebook_size:g}")
    if args.method in ("deferred", "compare") and not 1 <= args.continuous_epochs < args.epochs:
        raise UserError(f"--continuous-epochs must lie in [1, --epochs) for the deferred arm, "
                        f"got {args.continuous_epochs}")


def run_files(args, methods, names):
    """{arm name: every file that arm writes}; the figures belong to the last arm (written after it)."""
    files = {n: [os.path.join(args.out, n + ext) for ext in (".pt", ".json")] for n in names}
    if not args.no_figures:
        tag = figure_tag(names)
        files[names[-1]].append(os.path.join(args.out, tag + "_fig2.png"))
        if any(m == "deferred" for m in methods):
            files[names[-1]].append(os.path.join(args.out, tag + "_fig3.png"))
    return files


def figure_tag(names):
    return names[0] if len(names) == 1 else "compare" + names[0][len("baseline"):]


def start_arms(args, stack, methods, names):
    """common.start_run for every arm (lock, overwrite and resume rules per arm); returns the
    checkpoint to continue per arm (None: start fresh). Under --compare --resume an arm that never
    reached its first checkpoint (the run was killed in the arm before it) starts fresh."""
    files, states = run_files(args, methods, names), {}
    for i, name in enumerate(names):
        ckpt = files[name][0]
        arm_args = args
        if args.resume and i > 0 and not os.path.exists(ckpt):
            arm_args = argparse.Namespace(**dict(vars(args), resume=False))
        run = stack.enter_context(start_run(arm_args, name=name, outputs=files[name], ranges=RANGES,
                                            defining=RUN_DEFINING, resume_from=ckpt,
                                            checks=[lambda: make_mixture(args)], validate=validate))
        states[name] = run.checkpoint
    return states


def main(args):
    info = setup_distributed(args.device, args.dist_timeout)
    if info.world_size > 1:
        raise UserError("synthetic_gmm.py runs in one process; launch it without torchrun")
    if info.device.type == "cpu":
        torch.set_num_threads(1)  # 32-wide layers: thread hand-offs cost more than they save
    methods = ["baseline", "deferred"] if args.method == "compare" else [args.method]
    names = [arm_name(args, m) for m in methods]
    with contextlib.ExitStack() as stack:
        states = start_arms(args, stack, methods, names)
        x, labels, means = (t.to(info.device) for t in make_mixture(args))
        arms = [train_arm(args, m, (x, labels, means), info.device, states[n]) for m, n in zip(methods, names)]
        if not args.no_figures:
            plot_figures(args, arms, names, x, info.device)
    return arms


def plot_figures(args, arms, names, x, device):
    t0 = time.time()
    tag = figure_tag(names)
    plot_figure2(os.path.join(args.out, tag + "_fig2.png"), x.cpu(), arms, args)
    deferred = [a for a in arms if "continuous_embeddings" in a]
    if deferred:
        with torch.no_grad():
            untrained = build_model(args, device).encoder(x).cpu()
        plot_figure3(os.path.join(args.out, tag + "_fig3.png"), untrained, deferred[0]["continuous_embeddings"], args)
    print0(f"figures in {args.out} ({time.time() - t0:.1f} s)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arm = p.add_mutually_exclusive_group()
    arm.add_argument("--deferred", dest="method", action="store_const", const="deferred",
                     help="Deferred Quantization arm only (default: baseline arm only)")
    arm.add_argument("--compare", dest="method", action="store_const", const="compare",
                     help="both arms from the same initial weights and data order")
    p.set_defaults(method="baseline")
    p.add_argument("--data-dim", type=int, default=2, help="input (data) dimension (paper: 2 and 48)")
    p.add_argument("--token-dim", type=int, default=1, help="token dimension (paper: 1 and 32)")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width (appendix A.1: 32)")
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--points-per-cluster", type=int, default=1000)
    p.add_argument("--cluster-std", type=float, default=1.0)
    p.add_argument("--center-box", type=float, default=10.0, help="centres uniform in [-box, box]^data-dim")
    p.add_argument("--min-separation", type=float, default=5.0, help="minimum distance between centres")
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--ema", action="store_true", help="EMA codebook instead of a gradient codebook")
    p.add_argument("--ema-decay", type=float, default=0.9, help="EMA decay gamma (appendix A.1: 0.9)")
    p.add_argument("--epochs", type=int, default=200, help="total epochs of every arm (both phases)")
    p.add_argument("--continuous-epochs", type=int, default=100,
                   help="Continuous Phase epochs of the deferred arm (the baseline has none)")
    p.add_argument("--ratio", type=float, default=2.0, help="embeddings collected per code at the switch")
    p.add_argument("--init-method", choices=("sample", "kmeans"), default="sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the data order")
    p.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="history entry every N epochs")
    p.add_argument("--no-figures", action="store_true", help="results only (seed sweeps, tests)")
    p.add_argument("--tsne-points", type=int, default=1000, help="subsample for the t-SNE panels")
    add_run_arguments(p, out_default="runs/synthetic")  # --out, --resume, --device, --dist-timeout
    p.set_defaults(device="cpu")  # a 32-wide MLP: the CPU beats a launch-bound GPU
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
