"""Shared building blocks of the Deferred Quantization reproduction.

Read in this order:
  1. Run utilities     errors, distributed set-up, seeding, atomic files, checkpoints, result JSON.
  2. Quantizer         chunked nearest-code search, k-means, `VectorQuantizer` (gradient or EMA
                       codebook, init strategies, on/off switch for Deferred Quantization, dead-code
                       replacement, affine / SimVQ reparameterisation, synchronized update) and
                       `deferred_switch`, the one helper that performs the Continuous -> Discretization
                       phase change in every script.
  3. Diagnostics       the coverage suite of paper appendix A.2 (mean pairwise Euclidean and cosine
                       distance, Vendi score) and usage perplexity counted over a whole split.

Nothing here is specific to one experiment; each script decides *when* the switch happens.
"""
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ================================================================================================
# 1. Run utilities
# ================================================================================================


class UserError(Exception):
    """A problem with the user's input (missing file, wrong key, impossible setting).

    `run_cli` turns it into a one-line message and exit status 2, without a traceback.
    """


def run_cli(main, parser, argv=None):
    """Parse arguments, run `main(args)`, and report `UserError`s as one line on stderr.

    Every script ends with `run_cli(main, build_parser())`, so bad input never prints a traceback
    and never leaves half-written files (all writes go through `atomic_write`).
    """
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        cleanup_distributed()
        sys.exit(2)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device=None):
    """Initialise torch.distributed when launched by torchrun, and pick the device.

    One CPU process, one GPU, or `torchrun --nproc_per_node=N` all go through here: gloo on CPU,
    nccl on CUDA. `device` forces 'cpu' or 'cuda'; by default CUDA is used when present.
    """
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process():
    return not is_distributed() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (a no-op in one process); returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensor):
    """Make every rank hold rank 0's copy of `tensor` (in place)."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_rows(x):
    """Concatenate the rows of `x` from every rank, in rank order; rows may differ per rank."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


def seed_everything(seed):
    """Seed python, numpy and torch (all devices). Call with the same seed on every rank so
    models start identical; give data samplers their own seeded generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(model, info, find_unused_parameters=False):
    """DistributedDataParallel for multi-process runs (identity in one process).

    broadcast_buffers=False matters: quantizer buffers (EMA statistics, the on/off switch, LRU
    counters) are kept identical by all-reduce and broadcast inside the quantizer; DDP's default
    buffer broadcast would silently overwrite every rank's EMA statistics with rank 0's each step.
    find_unused_parameters=True is needed while a gradient codebook sits unused (Continuous Phase).
    """
    if not is_distributed():
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


def progress_bar(iterable=None, **kwargs):
    """tqdm on rank 0 only (other ranks stay quiet)."""
    from tqdm.auto import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=kwargs.pop("disable", False) or not is_main_process(), **kwargs)


def autocast_for(device, enabled=True):
    """bf16 autocast on CUDA (paper-scale runs), plain float32 on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_write(path, write_fn, mode="wb"):
    """Write a file through a temporary file in the same folder and rename it into place, so a
    crash or a bad input never leaves a truncated checkpoint or JSON behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_json_default) + "\n"), "w")


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def git_commit():
    """The commit of the code that produced a result (or 'unknown' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_result(path, experiment, method, args, metrics, history=(), **extra):
    """Write the result JSON that every script produces and `evaluate.py` reads:
    {"experiment", "method", "args", "git_commit", "metrics", "history", ...}."""
    record = {"experiment": experiment, "method": method,
              "args": vars(args) if hasattr(args, "__dict__") else dict(args),
              "git_commit": git_commit(), "metrics": metrics, "history": list(history)}
    record.update(extra)
    write_json(path, record)
    return record


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """Atomically save `state` (model/optimizer/scheduler state dicts, step, args, ...) plus the
    RNG states of this process, so `load_checkpoint` + `set_rng_state` resume bit-for-bit."""
    state = dict(state, rng=rng_state())
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise UserError(f"no such checkpoint: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"cannot read checkpoint {path}: {err}") from None


def check_finite(loss, where):
    """Stop with a clear message (and without overwriting earlier outputs) when training diverges."""
    if not torch.isfinite(loss).all():
        raise UserError(f"loss became {loss.item()} at {where}; lower the learning rate or check the data")


# ================================================================================================
# 2. Quantizer
# ================================================================================================

# Elements of one distance tile: 2**22 float32 = 16 MiB. Small enough to stay near the cache and
# bound memory at any codebook size, large enough that the matmul runs at full speed.
SEARCH_TILE_ELEMENTS = 2**22


@torch.no_grad()
def nearest_code(z, codebook, tile_elements=SEARCH_TILE_ELEMENTS):
    """Index of the nearest code (squared Euclidean, paper eq. 1) for each row of `z`.

    argmin_k ||z - c_k||^2 = argmin_k (||c_k||^2 - 2 z.c_k): the ||z||^2 term is constant per row
    and dropped. Rows are processed in blocks so the N x K distance matrix is never built whole.
    """
    z = z.detach().to(codebook.dtype)
    codebook = codebook.detach()
    code_sq = codebook.pow(2).sum(1)
    rows = max(1, tile_elements // codebook.shape[0])
    if rows >= z.shape[0]:
        return torch.addmm(code_sq, z, codebook.t(), alpha=-2.0).argmin(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], rows):
        block = z[start:start + rows]
        out[start:start + rows] = torch.addmm(code_sq, block, codebook.t(), alpha=-2.0).argmin(1)
    return out


@torch.no_grad()
def kmeans(x, num_clusters, iters=20, generator=None):
    """Lloyd's k-means (paper eq. 3), initialised from a random sample of the data.

    An empty cluster is re-seeded with a random data point so every centre stays on the data.
    """
    x = x.float()
    n = x.shape[0]
    centers = x[torch.randperm(n, generator=generator, device="cpu")[:num_clusters].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_code(x, centers)
        counts = torch.bincount(assign, minlength=num_clusters).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            pick = torch.randint(0, n, (int(empty.sum()),), generator=generator, device="cpu").to(x.device)
            centers[empty] = x[pick]
    return centers


class VectorQuantizer(nn.Module):
    """Vector quantizer with every option the paper's experiments need.

    forward(z) takes (N, dim) vectors or (B, dim, H, W) maps and returns (z_q, indices, loss):
      * z_q: the quantized input with the straight-through estimator (same shape as z);
      * indices: (N,) or (B, H, W) code indices, or None while quantization is off;
      * loss: codebook term + beta * commitment term (paper eq. 2). beta multiplies the commitment
        term ||z - sg[q]||^2 only. With an EMA codebook the codebook term is replaced by the EMA
        update, so loss = beta * commitment.

    Options:
      ema_decay          None: gradient codebook; gamma in (0, 1): EMA codebook with Laplace
                         smoothing (van den Oord et al. 2017, appendix).
      init               'uniform' (U(-1/K, 1/K), the usual nn.Embedding VQ-VAE init) or
                         'gaussian' with init_std (paper Table 10). Data-driven init goes through
                         `init_from_embeddings` ('sample' or 'kmeans').
      enabled            False: identity, no loss (the Continuous Phase). See `deferred_switch`.
      dead_code_steps    > 0: SoundStream-style LRU replacement; a code unused for that many
                         training steps is replaced by a random encoder output of the current batch.
      affine_lr          > 0: affine reparameterisation of Huh et al. (2023): codes are
                         (1 + a*s) * c + a*b with learnable per-dimension s, b and a = affine_lr.
      sync_nu            > 0: synchronized update of Huh et al. (2023): the task-loss gradient also
                         reaches the codebook, scaled by nu.
      simvq              True: SimVQ (Zhu et al. 2025): a frozen random codebook C seen through a
                         learned linear map, codes = C W^T.

    Under torch.distributed, EMA statistics and usage are all-reduced and every codebook write
    (init, replacement) is computed on rank 0 and broadcast, so all ranks hold the same codebook.
    """

    def __init__(self, num_codes, dim, beta=0.25, ema_decay=None, init="uniform", init_std=1.0,
                 enabled=True, dead_code_steps=0, affine_lr=0.0, sync_nu=0.0, simvq=False, eps=1e-5):
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise UserError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        if ema_decay is not None and (affine_lr > 0 or simvq or sync_nu > 0):
            raise UserError("an EMA codebook cannot be combined with affine_lr, sync_nu or simvq "
                            "(those options train the codebook by gradient)")
        if affine_lr > 0 and simvq:
            raise UserError("choose one codebook reparameterisation: affine_lr or simvq")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema_decay, self.eps = ema_decay, eps
        self.dead_code_steps, self.affine_lr, self.sync_nu = dead_code_steps, affine_lr, sync_nu

        weight = self._initial_codes(init, init_std)
        if ema_decay is None:
            self.embed = nn.Parameter(weight, requires_grad=not simvq)
        else:
            self.register_buffer("embed", weight)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_avg", weight.clone())
        if affine_lr > 0:
            self.affine_scale = nn.Parameter(torch.zeros(dim))
            self.affine_bias = nn.Parameter(torch.zeros(dim))
        self.simvq_map = nn.Linear(dim, dim, bias=False) if simvq else None
        if simvq:
            nn.init.eye_(self.simvq_map.weight)
        self.register_buffer("enabled", torch.tensor(bool(enabled)))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    def _initial_codes(self, init, init_std):
        if init == "uniform":
            return torch.empty(self.num_codes, self.dim).uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        if init == "gaussian":
            return torch.randn(self.num_codes, self.dim) * init_std
        raise UserError(f"unknown codebook init '{init}' (use uniform, gaussian, or init_from_embeddings)")

    # ---- the codebook as users see it ---------------------------------------------------------
    @property
    def codebook(self):
        """The effective (num_codes, dim) codebook that inputs are quantized to."""
        codes = self.embed
        if self.affine_lr > 0:
            codes = (1.0 + self.affine_lr * self.affine_scale) * codes + self.affine_lr * self.affine_bias
        if self.simvq_map is not None:
            codes = self.simvq_map(codes)
        return codes

    def lookup(self, indices):
        """Code vectors for integer indices of any shape: (...,) -> (..., dim)."""
        return F.embedding(indices, self.codebook)

    def decode_indices(self, indices):
        """(B, H, W) indices -> (B, dim, H, W) quantized map, for decoding token dumps."""
        return self.lookup(indices).permute(0, 3, 1, 2).contiguous()

    @property
    def is_enabled(self):
        return bool(self.enabled.item())

    def set_enabled(self, on):
        self.enabled.fill_(bool(on))

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, z):
        if not self.is_enabled:
            return z, None, z.new_zeros(())
        spatial = z.dim() == 4
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim) if spatial else z
        z_q, indices, loss = self.quantize_flat(flat)
        if spatial:
            b, _, h, w = z.shape
            z_q = z_q.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
            indices = indices.reshape(b, h, w)
        return z_q, indices, loss

    def quantize_flat(self, z):
        """Quantize (N, dim) vectors; the core of `forward`, reused by the multi-scale quantizer."""
        z = z.float()  # distances and losses in float32 even under bf16 autocast
        codebook = self.codebook.float()
        indices = nearest_code(z, codebook)
        q = F.embedding(indices, codebook)
        commitment = F.mse_loss(z, q.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(q, z.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        if self.training:
            self.update_after_assignment(z.detach(), indices)
        return self.straight_through(z, q), indices, loss

    def straight_through(self, z, q):
        """Forward value q, gradient to z unchanged (Bengio et al. 2013). With sync_nu the
        task-loss gradient also reaches q, scaled by nu (Huh et al. 2023, synchronized update)."""
        out = z + (q - z).detach()
        if self.sync_nu > 0:
            out = out + self.sync_nu * (q - q.detach())
        return out

    @torch.no_grad()
    def update_after_assignment(self, z, indices):
        """Training-time bookkeeping after a search: EMA step and dead-code replacement."""
        counts = all_reduce_sum(torch.bincount(indices, minlength=self.num_codes).float())
        if self.ema_decay is not None:
            sums = all_reduce_sum(torch.zeros_like(self.embed).index_add_(0, indices, z.to(self.embed.dtype)))
            self.ema_update(counts, sums)
        if self.dead_code_steps > 0:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            dead = self.steps_unused >= self.dead_code_steps
            if dead.any():
                self.replace_codes(dead, z)

    @torch.no_grad()
    def ema_update(self, counts, sums):
        """One EMA step from global per-code counts and sums, with Laplace-smoothed counts so a
        code that gets no vectors never divides by zero (and keeps its position)."""
        gamma = self.ema_decay
        self.cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)
        self.embed_avg.mul_(gamma).add_(sums, alpha=1 - gamma)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    # ---- codebook writes (identical on every rank) --------------------------------------------
    @torch.no_grad()
    def set_codes(self, mask, values):
        """Write raw code vectors for the codes in `mask` and reset their EMA state consistently
        (cluster_size 1, embed_avg = embed), so the next EMA step does not erase the write."""
        self.embed.data[mask] = values.to(self.embed.dtype)
        self.steps_unused[mask] = 0
        if self.ema_decay is not None:
            self.cluster_size[mask] = 1.0
            self.embed_avg[mask] = self.embed[mask]

    @torch.no_grad()
    def _to_raw(self, codes):
        """Map desired effective codes back to stored codes (inverse of the reparameterisation),
        so data-driven inits place the *effective* codes on the data."""
        if self.affine_lr > 0:
            scale = 1.0 + self.affine_lr * self.affine_scale
            return (codes - self.affine_lr * self.affine_bias) / scale
        if self.simvq_map is not None:
            return torch.linalg.solve(self.simvq_map.weight, codes.t()).t()
        return codes

    @torch.no_grad()
    def replace_codes(self, mask, z):
        """Replace the codes in `mask` by random rows of `z` gathered from every rank."""
        pool = all_gather_rows(z.float())
        pick = torch.randint(0, pool.shape[0], (int(mask.sum()),), device=pool.device)
        values = broadcast_from_main(pool[pick].contiguous())
        self.set_codes(mask, self._to_raw(values))

    @torch.no_grad()
    def init_from_embeddings(self, embeddings, method="sample", kmeans_iters=20, seed=0):
        """Initialise every code from encoder embeddings (paper section 5, appendix A.1).

        `embeddings` are this rank's (N_r, dim) vectors; they are gathered from all ranks, and
        rank 0 draws `num_codes` of them without replacement ('sample') or runs k-means on them
        ('kmeans'); the result is broadcast, so every rank starts from the same codebook.
        """
        pool = all_gather_rows(embeddings.detach().float().reshape(-1, self.dim))
        if pool.shape[0] < self.num_codes:
            raise UserError(f"codebook of {self.num_codes} codes is larger than the {pool.shape[0]} "
                            "embeddings collected to initialise it; collect more or use fewer codes")
        gen = torch.Generator().manual_seed(seed)
        if method == "sample":
            codes = pool[torch.randperm(pool.shape[0], generator=gen)[: self.num_codes].to(pool.device)]
        elif method == "kmeans":
            codes = kmeans(pool, self.num_codes, iters=kmeans_iters, generator=gen)
        else:
            raise UserError(f"unknown init method '{method}' (use sample or kmeans)")
        codes = broadcast_from_main(codes.to(self.embed.device).contiguous())
        self.set_codes(torch.ones(self.num_codes, dtype=torch.bool, device=codes.device), self._to_raw(codes))


def deferred_switch(quantizer, encode, batches, ratio, method="sample", seed=0, progress=False):
    """The switch from the Continuous Phase to the Discretization Phase (paper section 5).

    Collects encoder embeddings over as many batches as needed until ratio x num_codes vectors
    are gathered across all ranks (paper: 10:1 on CIFAR-10, 2:1 at ImageNet scale), initialises
    the codebook from them ('sample' or 'kmeans'), resets the EMA state, and turns quantization on.
    `encode(batch)` returns the pre-quantization latents, (N, dim) or (B, dim, H, W).
    Called at step 0 with an untrained encoder this is exactly the usual baseline initialisation.
    """
    needed = int(math.ceil(ratio * quantizer.num_codes))
    world = dist.get_world_size() if is_distributed() else 1
    per_rank = int(math.ceil(needed / world))
    collected, total = [], 0
    bar = progress_bar(total=per_rank, desc="collecting embeddings", disable=not progress)
    with torch.no_grad():
        for batch in batches:
            z = encode(batch).detach()
            flat = z.permute(0, 2, 3, 1).reshape(-1, quantizer.dim) if z.dim() == 4 else z.reshape(-1, quantizer.dim)
            collected.append(flat.float())
            total += flat.shape[0]
            bar.update(flat.shape[0])
            if total >= per_rank:
                break
    bar.close()
    local = torch.cat(collected)[:per_rank] if collected else torch.zeros(0, quantizer.dim)
    quantizer.init_from_embeddings(local, method=method, seed=seed)
    quantizer.set_enabled(True)
    return local.shape[0]


# ---- Multi-scale residual quantizer (VAR, Tian et al. 2024), built on VectorQuantizer ---------

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class ScaleConv(nn.Conv2d):
    """VAR's phi: a 3x3 convolution mixed residually into its input, (1 - r) h + r conv(h).

    It lets the code of a coarse scale, once bicubic-upsampled to the full grid, be refined
    before it is added to f_hat, so one shared codebook can serve every scale."""

    def __init__(self, dim, ratio):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return (1.0 - self.ratio) * h + self.ratio * super().forward(h)


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer with one shared codebook (Tian et al. 2024, Alg. 1).

    For scales s_1 < ... < s_K (the last equals the latent grid), starting from the residual
    r = f and f_hat = 0:  r_k = area-downsample(r) to s_k x s_k; idx_k = nearest code of r_k;
    h_k = phi_k(bicubic-upsample(codebook[idx_k])); f_hat += h_k; r -= h_k.
    The loss, like VAR's, is averaged over scales and taken on the *accumulated* f_hat after each
    scale: ||sg[f_hat_k] - f||^2 * beta (commitment, to the encoder) + ||f_hat_k - sg[f]||^2
    (codebook term, to the codes and the phi convolutions). The output is f_hat with the
    straight-through estimator, so the decoder gradient reaches the encoder unchanged.

    The codebook, the nearest-code search, EMA / dead-code bookkeeping, SimVQ / affine options,
    data-driven init and the straight-through estimator are those of the wrapped `VectorQuantizer`
    (`self.vq`), so Deferred Quantization (`deferred_switch`), EMA and the diagnostics apply
    unchanged. With an EMA codebook the codebook term still trains the phi convolutions (the codes
    are buffers and get no gradient), and the EMA statistics are updated once per step from the
    residual vectors of all scales together.

    phi: `num_phi` convolutions shared across scales (VAR: 4, ratio 0.5); scale k at relative
    position k/(K-1) uses the convolution whose tick in `phi_ticks` is nearest.
    forward(f) returns (f_hat, [idx_1 (B, s_1, s_1), ..., idx_K], loss); while disabled (the
    Continuous Phase) it is the identity with indices None and zero loss.
    """

    def __init__(self, num_codes, dim, scales=VAR_SCALES, num_phi=4, phi_ratio=0.5, enabled=True,
                 **vq_options):
        super().__init__()
        if list(scales) != sorted(set(scales)):
            raise UserError(f"scales must be strictly increasing, got {list(scales)}")
        self.scales = tuple(int(s) for s in scales)
        self.num_codes, self.dim = num_codes, dim
        self.vq = VectorQuantizer(num_codes, dim, enabled=True, **vq_options)
        self.beta = self.vq.beta
        self.phis = nn.ModuleList(ScaleConv(dim, phi_ratio) for _ in range(num_phi))
        self.register_buffer("enabled", torch.tensor(bool(enabled)))

    @staticmethod
    def phi_ticks(num_phi):
        """Positions in [0, 1] that the shared phi convolutions stand for (as in VAR: evenly spaced,
        with a margin of 1/(3K) for K = 4 and 1/(2K) otherwise)."""
        margin = 1.0 / (3 * num_phi) if num_phi == 4 else 1.0 / (2 * num_phi)
        return np.linspace(margin, 1.0 - margin, num_phi)

    def phi_index(self, k):
        """Which phi convolution scale k uses."""
        position = k / max(1, len(self.scales) - 1)
        return int(np.abs(self.phi_ticks(len(self.phis)) - position).argmin())

    @property
    def codebook(self):
        return self.vq.codebook

    @property
    def is_enabled(self):
        return bool(self.enabled.item())

    def set_enabled(self, on):
        self.enabled.fill_(bool(on))

    def init_from_embeddings(self, embeddings, method="sample", kmeans_iters=20, seed=0):
        """Initialise the shared codebook from encoder embeddings. `deferred_switch` passes the
        encoder outputs at the finest scale (every vector of the 16x16 latent map): they are what
        the first residual is made of, and unlike the area-averaged coarse scales they are not
        shrunk towards the image mean. Resets the EMA state like `VectorQuantizer`."""
        self.vq.init_from_embeddings(embeddings, method=method, kmeans_iters=kmeans_iters, seed=seed)

    def _contribution(self, k, codes, size):
        """h_k: the (B, dim, s_k, s_k) codes of scale k upsampled to the full grid and passed through phi."""
        if codes.shape[-1] != size[-1] or codes.shape[-2] != size[-2]:
            codes = F.interpolate(codes, size=size, mode="bicubic")
        return self.phis[self.phi_index(k)](codes)

    def forward(self, f):
        if not self.is_enabled:
            return f, None, f.new_zeros(())
        f = f.float()  # search, residuals and losses in float32 even under bf16 autocast
        b, c, h, w = f.shape
        if (h, w) != (self.scales[-1], self.scales[-1]):
            raise UserError(f"the finest scale {self.scales[-1]} must equal the latent grid {h}x{w}")
        target = f.detach()
        rest, f_hat = target.clone(), torch.zeros_like(target)
        codebook = self.codebook.float()
        indices, searched, loss = [], [], f.new_zeros(())
        for k, s in enumerate(self.scales):
            r = F.interpolate(rest, size=(s, s), mode="area") if s != h else rest
            r_flat = r.permute(0, 2, 3, 1).reshape(-1, c)
            idx = nearest_code(r_flat, codebook)
            codes = F.embedding(idx, codebook).reshape(b, s, s, c).permute(0, 3, 1, 2)
            contribution = self._contribution(k, codes, (h, w))
            f_hat = f_hat + contribution
            rest = rest - contribution.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, target)
            indices.append(idx.reshape(b, s, s))
            searched.append((r_flat, idx))
        if self.training:
            self.vq.update_after_assignment(torch.cat([r for r, _ in searched]),
                                            torch.cat([i for _, i in searched]))
        return self.vq.straight_through(f, f_hat), indices, loss / len(self.scales)

    def decode_indices(self, indices):
        """[idx_1 (B, s_1, s_1), ..., idx_K] -> (B, dim, H, W) f_hat, for decoding token dumps."""
        if len(indices) != len(self.scales):
            raise UserError(f"expected {len(self.scales)} index maps (scales {self.scales}), got {len(indices)}")
        size = (self.scales[-1], self.scales[-1])
        f_hat = 0.0
        for k, idx in enumerate(indices):
            codes = self.vq.lookup(idx.long()).permute(0, 3, 1, 2)
            f_hat = f_hat + self._contribution(k, codes, size)
        return f_hat



# ================================================================================================
# 3. Diagnostics: the coverage suite (paper appendix A.2) and usage perplexity
# ================================================================================================

PAIRWISE_BLOCK_ROWS = 1024


@torch.no_grad()
def mean_pairwise_euclidean(codes, block_rows=PAIRWISE_BLOCK_ROWS):
    """D_Euc = 2 / (S(S-1)) * sum_{i<j} ||t_i - t_j|| (paper eq. 4), exact.

    The codebook is centred first (distances are translation invariant) so the expansion
    ||a||^2 + ||b||^2 - 2ab does not lose precision in float32 when codes sit far from the origin.
    Only blocks on or above the diagonal are computed; memory stays at block_rows x S.
    """
    t = codes.detach().float()
    t = t - t.mean(0, keepdim=True)
    s = t.shape[0]
    if s < 2:
        return 0.0
    sq = t.pow(2).sum(1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, s, block_rows):
        stop = min(start + block_rows, s)
        rows, cols = t[start:stop], t[start:]
        d2 = torch.addmm(sq[start:][None, :] + sq[start:stop, None], rows, cols.t(), alpha=-2.0)
        d = d2.clamp_(min=0).sqrt_()
        # strictly upper triangle of the diagonal block, everything to its right
        diag = d[:, : stop - start].triu(1).sum(dtype=torch.float64)
        total += diag + d[:, stop - start:].sum(dtype=torch.float64)
    return float(total / (s * (s - 1) / 2))


@torch.no_grad()
def mean_pairwise_cosine_distance(codes, eps=1e-12):
    """D_cos = 2 / (S(S-1)) * sum_{i<j} (1 - cos(t_i, t_j)) (paper eq. 5), exact in O(S d):
    with unit vectors u_i, sum_{i<j} u_i.u_j = (||sum_i u_i||^2 - S) / 2.
    A zero code has no direction; it counts as orthogonal to every other code."""
    t = codes.detach().double()
    s = t.shape[0]
    if s < 2:
        return 0.0
    norms = t.norm(dim=1, keepdim=True)
    u = torch.where(norms > eps, t / norms.clamp(min=eps), torch.zeros_like(t))
    sum_cos = (u.sum(0).pow(2).sum() - u.pow(2).sum()) / 2
    return float(1.0 - sum_cos / (s * (s - 1) / 2))


@torch.no_grad()
def vendi_score(codes):
    """Vendi score with the inner-product kernel on the raw codes (paper eq. 6, Friedman & Dieng
    2022): exp of the entropy of the eigenvalues of K / tr(K), K = T T^T.

    K and T^T T share their non-zero eigenvalues and tr(K) = ||T||_F^2, so the S x S matrix is
    never formed: a d x d eigenproblem in float64. (The `vendi-score` package normalises the
    kernel differently and gives other numbers; do not use it to compare with the paper.)"""
    t = codes.detach().double()
    gram = t.t() @ t
    trace = torch.trace(gram)
    if trace <= 0:
        return 1.0
    lam = torch.linalg.eigvalsh(gram / trace).clamp(min=0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def perplexity_from_counts(counts):
    """exp(entropy) of the code-usage distribution: the effective number of codes used."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


class UsageCounter:
    """Counts code usage over a whole evaluation split; `all_reduce` sums counts over ranks, so
    perplexity is computed from the global histogram, not averaged per batch."""

    def __init__(self, num_codes, device="cpu"):
        self.counts = torch.zeros(num_codes, dtype=torch.float64, device=device)

    def update(self, indices):
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.counts.numel()).to(self.counts)

    def all_reduce(self):
        all_reduce_sum(self.counts)
        return self

    def perplexity(self):
        return perplexity_from_counts(self.counts.cpu())

    def used_codes(self):
        return int((self.counts > 0).sum())


def codebook_metrics(codes, counts=None):
    """The coverage diagnostic suite for one codebook, as the dict every result JSON stores."""
    codes = codes.detach().float().cpu()
    out = {"num_codes": int(codes.shape[0]), "dim": int(codes.shape[1]),
           "euclidean": mean_pairwise_euclidean(codes),
           "cosine": mean_pairwise_cosine_distance(codes),
           "vendi": vendi_score(codes)}
    if counts is not None:
        counts = torch.as_tensor(counts).cpu()
        out["perplexity"] = perplexity_from_counts(counts)
        out["used_codes"] = int((counts > 0).sum())
    return out


# ================================================================================================
# 4. Image metrics: MSE, PSNR, SSIM, LPIPS, FID / IS / precision-recall, pixel and LPIPS diversity
# ================================================================================================


# ================================================================================================
# 5. Models shared by more than one script (VQGAN-style encoder/decoder, PatchGAN discriminator)
# ================================================================================================


def group_norm(channels):
    """GroupNorm as in taming-transformers (32 groups, eps 1e-6); tiny test models with fewer
    channels use the largest group count <= 32 that divides the channel count."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def _stage_blocks(in_ch, out_ch, n, with_attn, dropout):
    blocks, attns = nn.ModuleList(), nn.ModuleList()
    for _ in range(n):
        blocks.append(ResnetBlock(in_ch, out_ch, dropout))
        attns.append(AttnBlock(out_ch) if with_attn else nn.Identity())
        in_ch = out_ch
    return blocks, attns


class Encoder(nn.Module):
    """VQGAN encoder (Esser et al. 2021): conv_in; per level `num_res_blocks` ResnetBlocks (with
    attention at `attn_resolutions`) and a stride-2 downsampling after every level but the last;
    mid block (res, attn, res); norm, swish, conv_out to `z_channels`.

    len(ch_mult) levels give len(ch_mult) - 1 downsamplings: the paper's 128x128 tokenizer with
    ch_mult (1, 1, 2, 4) keeps a 16x16 latent grid (one stage fewer than VQGAN's 256x256 model)."""

    def __init__(self, in_channels=3, ch=64, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=128, z_channels=256, dropout=0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        res, in_ch = resolution, ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = _stage_blocks(in_ch, ch * mult, num_res_blocks, res in attn_resolutions, dropout)
            level = nn.Module()
            level.blocks, level.attns = blocks, attns
            # taming pads (0, 1, 0, 1) and convolves with stride 2 and no padding
            level.down = nn.Conv2d(ch * mult, ch * mult, 3, stride=2) if i < len(ch_mult) - 1 else None
            self.levels.append(level)
            in_ch = ch * mult
            res = res // 2 if level.down is not None else res
        self.mid = nn.ModuleList([ResnetBlock(in_ch, in_ch, dropout), AttnBlock(in_ch),
                                  ResnetBlock(in_ch, in_ch, dropout)])
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)
        self.latent_resolution = res

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.levels:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h))
            if level.down is not None:
                h = level.down(F.pad(h, (0, 1, 0, 1)))
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """VQGAN decoder, the mirror of `Encoder`: conv_in from `z_channels`, mid block, per level
    (deepest first) num_res_blocks + 1 ResnetBlocks (+ attention) and a nearest-neighbour x2
    upsampling followed by a conv before every level but the shallowest; norm, swish, conv_out."""

    def __init__(self, out_channels=3, ch=64, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=128, z_channels=256, dropout=0.0):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(in_ch, in_ch, dropout), AttnBlock(in_ch),
                                  ResnetBlock(in_ch, in_ch, dropout)])
        self.levels = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            blocks, attns = _stage_blocks(in_ch, ch * ch_mult[i], num_res_blocks + 1,
                                          res in attn_resolutions, dropout)
            level = nn.Module()
            level.blocks, level.attns = blocks, attns
            level.up = nn.Conv2d(ch * ch_mult[i], ch * ch_mult[i], 3, padding=1) if i > 0 else None
            self.levels.append(level)
            in_ch = ch * ch_mult[i]
            res = res * 2 if level.up is not None else res
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for level in self.levels:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h))
            if level.up is not None:
                h = level.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQAutoencoder(nn.Module):
    """Tokenizer = Encoder -> quant_conv (1x1, z_channels -> token dim) -> quantizer ->
    post_quant_conv (1x1) -> Decoder. The quantizer is any module with the `VectorQuantizer` /
    `MultiScaleQuantizer` interface; while it is disabled (Continuous Phase) this is a plain
    autoencoder. Images go in and come out in [0, 1] (the networks see [-1, 1], as in VQGAN)."""

    def __init__(self, quantizer, embed_dim, **arch):
        super().__init__()
        self.encoder, self.decoder = Encoder(**arch), Decoder(**arch)
        z_channels = arch.get("z_channels", 256)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantizer = quantizer

    def encode(self, x):
        """Pre-quantization latents (B, embed_dim, h, w): what the codebook is initialised from."""
        return self.quant_conv(self.encoder(x * 2.0 - 1.0))

    def decode(self, z_q):
        return (self.decoder(self.post_quant_conv(z_q)) + 1.0) / 2.0

    def decode_indices(self, indices):
        """Token indices (a (B, h, w) map, or a list of per-scale maps) -> images in [0, 1]."""
        return self.decode(self.quantizer.decode_indices(indices))

    def forward(self, x):
        z_q, indices, vq_loss = self.quantizer(self.encode(x))
        return self.decode(z_q), indices, vq_loss

    @property
    def last_layer(self):
        """The decoder's last weight, where taming balances the GAN and reconstruction gradients."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix / taming (NLayerDiscriminator): stride-2 4x4 convs with
    BatchNorm and LeakyReLU(0.2), one stride-1 layer, a 1-channel map of real/fake logits.
    Weights initialised N(0, 0.02) (BatchNorm scale N(1, 0.02)) as in taming."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        """Images in [0, 1] -> patch logits."""
        return self.main(x * 2.0 - 1.0)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """taming's calculate_adaptive_weight: ||grad rec|| / (||grad gan|| + 1e-4) at the decoder's
    last layer, so the GAN term starts at the scale of the reconstruction term; detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ================================================================================================
# 6. Data: image folders, reproducible split files
# ================================================================================================
