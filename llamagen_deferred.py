"""Deferred Quantization on the LlamaGen tokenizer at ImageNet-1K 256x256, and LlamaGen-B on its
tokens (paper section 6.4 and Table 7; appendix A.1 and A.5, Table 12).

One pipeline for every arm; each stage reads what the previous one wrote under <out>/<arm>/:
  tokenizer       train LlamaGen's VQ-16 tokenizer with LlamaGen's public recipe; with --deferred a
                  Continuous Phase of --continuous-steps (50,000) steps with the quantizer off comes first
  tokenizer-eval  ImageNet val at 256 (ADM centre crop): r-FID, PSNR, SSIM (correct and LlamaGen's),
                  the coverage suite on raw and unit codes, usage perplexity            -> Table 7
  tokens          ten-crop codes of every training image (LlamaGen's extract_codes_c2i layout)
  gpt             train LlamaGen-B, the class-conditional GPT, on those codes (300 epochs)
  sample          50,000 class-conditional samples with classifier-free guidance -> samples.npz
                  (`arr_0`, uint8 N x 256 x 256 x 3: what the ADM / LlamaGen evaluator reads)
  sample-eval     g-FID, IS, precision / recall of samples.npz through torch-fidelity -> Table 12

Commands (the paper: 8+ GPUs; --batch-size is global; add --nnodes/--rdzv-* for several nodes)
    # Table 7: the two tokenizers. Deferred: 50,000 Continuous steps (~5 epochs) + 40 epochs of the
    # Discretization Phase = --epochs 45 in all (VOCAB: --epochs counts both phases).
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage tokenizer --data-dir /data/imagenet --deferred --epochs 45
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage tokenizer --data-dir /data/imagenet        # baseline
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage tokenizer-eval --data-dir /data/imagenet --deferred
    # Table 12: codes, LlamaGen-B, samples, metrics (repeat without --deferred for the baseline)
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage tokens --data-dir /data/imagenet --deferred
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage gpt --deferred
    torchrun --nproc_per_node=8 llamagen_deferred.py --stage sample --deferred
    python llamagen_deferred.py --stage sample-eval --deferred --fid-reference VIRTUAL_imagenet256_labeled.npz
    # the public checkpoints through the same evaluation (arm "public")
    torchrun ... --stage tokenizer-eval --arm public --tokenizer-checkpoint vq_ds16_c2i.pt --data-dir /data/imagenet
    torchrun ... --stage sample --arm public --tokenizer-checkpoint vq_ds16_c2i.pt --gpt-checkpoint c2i_B_256.pt
    # coverage of the other public codebooks (Table 7 rows VAR, VQGAN), then the tables
    python evaluate.py codebook vae_ch160v4096z32.pth --view both --label var --save runs/llamagen/coverage_var.json
    python evaluate.py codebook last.ckpt --view both --label vqgan --save runs/llamagen/coverage_vqgan.json
    python evaluate.py codebook vq_ds16_c2i.pt --view both --label llamagen --save runs/llamagen/coverage_llamagen.json
    python evaluate.py tables runs/llamagen
    # CPU smoke run on a tiny ImageFolder (tests/test_llamagen_deferred.py runs every stage this way)
    python llamagen_deferred.py --stage tokenizer --data-dir tiny --resolution 64 --ch 8 --ch-mult 1,2,2,2 \\
        --num-res-blocks 1 --attn-resolutions 8 --z-channels 8 --token-dim 4 --codebook-size 32 --batch-size 4 \\
        --epochs 3 --deferred --continuous-steps 4 --gan-start 2 --lpips-weight 0 --num-workers 0 --out runs/smoke
Data: --data-dir holds ImageNet-1K as ImageFolder trees train/ and val/ (class sub-folders).
Weights (no download happens): LPIPS VGG16 ($TORCH_HOME/hub/checkpoints/vgg16-397923af.pth) for
training unless --lpips-weight 0; torch-fidelity's Inception for r-FID / g-FID unless --skip-fid.

Recipe (LlamaGen tokenizer/tokenizer_image/vq_train.py, vq_loss.py, vq_model.py at ce98ec4):
VQ-16 = VQGAN encoder/decoder with ch 128, ch_mult (1,1,2,2,4), 2 residual blocks, attention at
16x16 and in the middle, z 256, 1x1 convs to and from codes of dimension 8; 16,384 codes, l2-
normalised (`common.VectorQuantizer(l2_norm=True)`); beta 0.25. Loss = MSE on [-1, 1] images +
LPIPS (VGG) + codebook + 0.25 commitment, + 0.5 x PatchGAN hinge loss (3 layers, 64 filters, no
adaptive weight) from step 20,000; Adam lr 1e-4, betas (0.9, 0.95), no weight decay (LlamaGen's
--weight-decay is never used), global batch 128, gradient clipping 1.0 for both networks, bf16,
ADM random crop (shorter side rescaled to 256-320) + horizontal flip. The baseline's codebook is
LlamaGen's U(-1/K, 1/K) init, normalised; with --deferred --continuous-steps 0 it is initialised from
the untrained encoder instead (the usual practice the paper blames).

Choices the paper leaves open (section 6.4 / A.1 say only "50,000 steps", "first training batch"):
  * Normalisation during the Continuous Phase: on. The quantizer, switched off, still projects the
    encoder outputs onto the unit sphere, so the decoder trains on the kind of vectors it receives
    after the switch; only quantization is deferred. (Raw outputs would hand the decoder vectors of
    another norm at the switch.) The switch writes unit vectors into the codebook (--switch-codes
    unit). The paper's Deferred Euclidean 6.48 in Table 7 cannot come from unit codes (at most 2):
    it measured the raw parameter, which suggests it wrote unnormalised encoder outputs; --switch-
    codes raw does that. The search normalises codes either way, so both start from the same
    effective codebook, but they train differently: Adam moves a stored code by about lr per step
    whatever its norm, which turns a code of norm r by ~lr / r, so raw codes of norm > 1 move more
    slowly. Our JSON reports raw and unit views; only the unit view compares two l2 tokenizers fairly.
  * The codebook comes from the first global batch of the Discretization Phase: 128 images x 256
    positions = 32,768 = 2 x 16,384 embeddings (--ratio 2), sampled without replacement.
  * The GAN across the switch: the discriminator starts --gan-start (20,000) steps into the
    Discretization Phase in both arms, so the Discretization Phase follows LlamaGen's recipe from its
    first step and the Continuous Phase is a plain MSE + LPIPS autoencoder. Adam's state, the step
    counter and the data order run on through the switch; the codebook gets its first gradient then.
  * Table 7's SSIM is LlamaGen's protocol (reconstruction_vq_ddp.py): skimage SSIM with its default
    7x7 uniform window and sample covariance, data_range=2.0 on [0, 1] images (too large a range
    shrinks the stabilisers and raises the score). We report it as ssim_llamagen beside the correct
    SSIM (Gaussian 11x11, data range 1; common.ssim). PSNR is per image on uint8 reconstructions.
  * r-FID is against the 50,000 val images themselves (LlamaGen's val.sh gives 2.19 that way; against
    ADM's VIRTUAL_imagenet256_labeled.npz the public tokenizer gives 4.28, LlamaGen issue #34).

Generation (autoregressive/models/gpt.py, train/train_c2i.py, sample/sample_c2i_ddp.py, generate.py):
LlamaGen-B: 12 layers, width 768, 12 heads, SwiGLU 2048, RMSNorm (eps 1e-5), no biases, 2-D RoPE
(base 10,000; the class slot's rotary table is zero, as in LlamaGen), class embedding with a null
row (id = num_classes) and class dropout 0.1 for CFG, token / residual / FFN dropout 0.1, output
layer zero-initialised; AdamW lr 1e-4 constant, betas (0.9, 0.95), weight decay 0.05 on matrices and
embeddings, global batch 256, 300 epochs, clip 1.0, bf16. Codes: each training image centre-cropped
to 1.1 x 256 (and 1.05 x 256) and ten-cropped (4 corners + centre, and their mirror images) -> 20
views per image; training picks one view at random per image and epoch. Sampling: LlamaGen's CFG
2.0, logits = u + s (c - u) with s = 2, temperature 1, no top-k / top-p, uniform random labels.
--cfg-scale means what it means in generator_maskgit.py and generator_var.py: the guidance w of
c + w (c - u), so LlamaGen's s = 1 + w (the default w = 1 is its s = 2.0; w = 0 is the conditional
model; the JSON records both); --top-p is common.filter_top_k_top_p's (0 or 1: off), as in VAR. g-FID with --fid-reference VIRTUAL_imagenet256_labeled.npz uses its precomputed
statistics (mu, sigma), as the ADM evaluator does; precision / recall use its images. The paper
cites LlamaGen-B's 5.46 / 193.61 / 0.83 / 0.45; the public c2i_B_256.pt gives other numbers through
the ADM evaluator (6.13 / 193.61 / 0.75 / 0.45, LlamaGen issue #48), so rerun the baseline here.
Inception Score needs the Inception's logits: offline weights without them -> --skip-isc (noted).

Outputs under <out>/<arm> (arm: --arm, default "deferred" or "baseline"): tokenizer/last.pt (and
tokenizer/continuous.pt, the model at the switch), tokenizer.json + tokenizer.pt (codebooks and usage
counts for `evaluate.py codebook`) + reconstructions.npz, tokens_train.pt + tokens_train.npy,
gpt/last.pt, samples.npz, generation.json. Training stages resume with --resume from last.pt
(written every --ckpt-every steps): the data order is replayed exactly, augmentations are redrawn.
"""
import argparse
import contextlib
import errno
import math
import os
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

import common
from common import UserError, print0

TOKENIZER_EXPERIMENT = "llamagen_tokenizer"
GENERATOR_EXPERIMENT = "generator_llamagen"
STAGES = ("tokenizer", "tokenizer-eval", "tokens", "gpt", "sample", "sample-eval")
# what load_tokenizer / build_tokenizer need besides the command-line architecture
TOKENIZER_FIXED = {"quantizer": "vq", "simvq": False, "ema_decay": None, "l2_norm": True, "dataset": "imagenet1k",
                   "scheme": None, "split_file": None}


# ================================================================================================
# Data: ImageNet ImageFolder trees with ADM's crops (LlamaGen dataset/augmentation.py)
# ================================================================================================


def halve_while_large(img, side):
    """ADM's anti-aliasing: BOX-halve the image while its shorter side is at least 2 x `side`."""
    from PIL import Image
    while min(img.size) >= 2 * side:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    return img


def resize_shorter(img, side):
    from PIL import Image
    img = halve_while_large(img, side)
    scale = side / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop(img, size):
    """ADM's centre crop (`center_crop_arr`): evaluation images, and the start of the ten crops."""
    img = resize_shorter(img, size)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(img, size, min_frac=0.8, max_frac=1.0):
    """ADM / LlamaGen `random_crop_arr`: shorter side rescaled to a random length in
    [size / max_frac, size / min_frac] (256-320 at 256), then a random size x size crop.
    torch's RNG, so DataLoader workers draw independent crops."""
    lo, hi = math.ceil(size / max_frac), math.ceil(size / min_frac)
    img = resize_shorter(img, int(torch.randint(lo, hi + 1, ())))
    left = int(torch.randint(img.size[0] - size + 1, ()))
    top = int(torch.randint(img.size[1] - size + 1, ()))
    return img.crop((left, top, left + size, top + size))


def ten_crops(img, size, crop_range):
    """LlamaGen extract_codes_c2i --ten-crop: centre crop to int(size * crop_range), then
    torchvision's TenCrop(size) (four corners and the centre, and the same of the mirror image)."""
    from torchvision.transforms import TenCrop
    return list(TenCrop(size)(center_crop(img, int(size * crop_range))))


def to_tensor(img):
    """PIL RGB -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class ImageFolderSplit(Dataset):
    """One ImageNet split (an ImageFolder tree) with one of three views per image:
      'train'   ADM random crop + horizontal flip (tokenizer training), (3, R, R)
      'eval'    ADM centre crop, (3, R, R)
      'crops'   the ten-crops at each of `crop_ranges`, (10 x len(crop_ranges), 3, R, R)
    Items are (image(s) in [0, 1], class index); classes are the sorted folder names."""

    def __init__(self, root, resolution, view, crop_ranges=(1.1,)):
        self.root, self.resolution, self.view, self.crop_ranges = root, resolution, view, tuple(crop_ranges)
        self.classes, self.items = common.scan_image_folder(root)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        relpath, label = self.items[i]
        img, r = common.read_rgb(os.path.join(self.root, relpath)), self.resolution
        if self.view == "crops":
            return torch.stack([to_tensor(c) for cr in self.crop_ranges for c in ten_crops(img, r, cr)]), label
        if self.view == "eval":
            return to_tensor(center_crop(img, r)), label
        x = to_tensor(random_crop(img, r))
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), label


def imagenet_split(args, part, view, crop_ranges=(1.1,)):
    root = os.path.join(args.data_dir, part)
    if not os.path.isdir(root):
        raise UserError(f"--data-dir {args.data_dir} has no '{part}' folder (expected ImageNet as ImageFolder trees "
                        "train/ and val/)")
    return ImageFolderSplit(root, args.resolution, view, crop_ranges)


def keep_budget(data, limit):
    """Keep a class-stratified, seeded subset of `limit` images of `data` (common.fid_subset) and
    return its record for the JSON (None: every image kept). ImageFolder lists are sorted by class,
    so "the first N" of ImageNet's val split would be its first N / 50 classes."""
    indices = common.fid_subset(data.items, limit)
    record = common.fid_subset_record(data.items, indices)
    if indices is not None:
        data.items = [data.items[i] for i in indices]
    return record


def check_data(args, parts):
    """Before anything is created (cheap: no walk over 1.28M files): the ImageFolder trees exist and
    have the same class folders. The datasets themselves refuse a tree without images."""
    classes = []
    for part in parts:
        root = os.path.join(args.data_dir, part)
        if not os.path.isdir(root):
            raise UserError(f"--data-dir {args.data_dir} has no '{part}' folder (expected ImageNet as ImageFolder "
                            "trees train/ and val/)")
        classes.append(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
        if not classes[-1]:
            raise UserError(f"{root} has no class folders")
    if any(c != classes[0] for c in classes[1:]):
        raise UserError(f"{' and '.join(parts)} of {args.data_dir} have different class folders")


def shard(dataset, info):
    """This rank's share of an evaluation pass: every world_size-th item, each exactly once."""
    return Subset(dataset, range(info.rank, len(dataset), info.world_size))


# ================================================================================================
# The tokenizer: LlamaGen's VQ-16 = common.VQAutoencoder + the l2-normalised VectorQuantizer
# ================================================================================================

ARCH = common.TOKENIZER_ARCH_KEYS


def tokenizer_cfg(args):
    """The args dict a tokenizer checkpoint stores: build_tokenizer / load_tokenizer rebuild it."""
    return {**vars(args), **TOKENIZER_FIXED, "name": arm_name(args)}


# LlamaGen VQModel state-dict names -> ours (vq_model.py: conv_blocks.{i}.res / .attn / .downsample /
# .upsample, separate q, k, v, proj_out, nin_shortcut; quantize.embedding). Order matters: first match.
_LLAMAGEN_RENAMES = (
    (r"^quantize\.embedding\.weight$", "quantizer.embed"),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.nin_shortcut\.", r"\1.levels.\2.blocks.\3.skip."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.", r"\1.levels.\2.blocks.\3."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.proj_out\.", r"\1.levels.\2.attns.\3.proj."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.norm\.", r"\1.levels.\2.attns.\3.norm."),
    (r"^encoder\.conv_blocks\.(\d+)\.downsample\.conv\.", r"encoder.levels.\1.down."),
    (r"^decoder\.conv_blocks\.(\d+)\.upsample\.conv\.", r"decoder.levels.\1.up."),
    (r"^(encoder|decoder)\.mid\.1\.proj_out\.", r"\1.mid.1.proj."),
    (r"^(encoder|decoder)\.mid\.(\d)\.nin_shortcut\.", r"\1.mid.\2.skip."),
)
_QKV = re.compile(r"^(encoder|decoder)\.(conv_blocks\.(\d+)\.attn\.(\d+)|mid\.1)\.(q|k|v)\.(weight|bias)$")


def llamagen_state_dict(path):
    """The VQModel weights of a LlamaGen checkpoint (vq_ds16_c2i.pt: 'model'; its own scripts
    also accept 'ema' and 'state_dict'), or None when the file is not in that layout."""
    ckpt = common.load_checkpoint(path)
    for key in ("ema", "model", "state_dict"):
        sd = ckpt.get(key) if isinstance(ckpt, dict) else None
        if isinstance(sd, dict) and "quantize.embedding.weight" in sd and "encoder.conv_in.weight" in sd:
            return sd
    return None


def convert_llamagen(sd):
    """LlamaGen VQModel state dict -> ours: renames, q/k/v 1x1 convs concatenated into one qkv
    conv (our AttnBlock splits its output channels in that order), the usage buffer dropped."""
    out, qkv = {}, {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m:
            enc, where, level, block, part, kind = m.groups()
            target = f"{enc}.levels.{level}.attns.{block}.qkv" if level is not None else f"{enc}.mid.1.qkv"
            qkv.setdefault((target, kind), {})[part] = value
            continue
        if key == "quantize.codebook_used":
            continue
        for pattern, repl in _LLAMAGEN_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    for (target, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"attention weights of {target} are incomplete in the LlamaGen checkpoint")
        out[f"{target}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def llamagen_cfg(sd, resolution):
    """The architecture of a LlamaGen VQModel, read off its weights (ch, ch_mult, blocks, codes)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
    ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels)
    blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
    codes = sd["quantize.embedding.weight"]
    return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": blocks, "resolution": resolution,
            "attn_resolutions": (resolution // 2 ** (len(ch_mult) - 1),),  # attention at the deepest level only
            "z_channels": sd["encoder.conv_out.weight"].shape[0], "codebook_size": codes.shape[0],
            "token_dim": codes.shape[1], "beta": 0.25, "deferred": False, **TOKENIZER_FIXED}


def load_any_tokenizer(path, resolution, device):
    """(frozen model, cfg) from one of our tokenizer checkpoints or a public LlamaGen one."""
    sd = llamagen_state_dict(path)
    if sd is None:
        return common.load_tokenizer(path, device)
    cfg = llamagen_cfg(sd, resolution)
    cfg["name"] = "llamagen-public"
    model = common.build_tokenizer(cfg)
    state = convert_llamagen(sd)
    state["quantizer.enabled"] = torch.tensor(True)
    state["quantizer.steps_unused"] = torch.zeros(cfg["codebook_size"], dtype=torch.long)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: LlamaGen weights that do not fit VQ-16 ({str(err).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model.to(device), cfg


# ================================================================================================
# Evaluation metrics of Table 7 that only this script uses
# ================================================================================================

LLAMAGEN_SSIM_WINDOW, LLAMAGEN_SSIM_RANGE = 7, 2.0


def ssim_llamagen(x, y, data_range=LLAMAGEN_SSIM_RANGE, win=LLAMAGEN_SSIM_WINDOW):
    """Per-image SSIM as LlamaGen's reconstruction_vq_ddp.py computes it: skimage
    `structural_similarity(a, b, data_range=2.0, channel_axis=-1)` on [0, 1] images, i.e. a 7x7
    uniform window, sample (co)variances (x 49/48), K1 0.01, K2 0.03, C = (K L)^2 with L = 2,
    statistics where the window fits, mean over pixels then channels. Returns (B,) float64.
    Not the SSIM of Wang et al. (common.ssim): L = 2 on [0, 1] images shrinks C1, C2 fourfold."""
    x, y = x.double(), y.double()
    n = win * win
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731  (valid region = skimage's crop)
    mx, my = mean(x), mean(y)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (mean(x * x) - mx * mx), cov * (mean(y * y) - my * my), cov * (mean(x * y) - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)


def psnr_per_image(x, y):
    """10 log10(1 / MSE) per image on [0, 1] images (skimage's default range for float [0, 1] images)."""
    return 10.0 * torch.log10(1.0 / (x.double() - y.double()).pow(2).flatten(1).mean(1))


# ================================================================================================
# .npz image files (the ADM evaluator's format)
# ================================================================================================


def rows_path(output):
    """The temporary .npy that the rows of `output` are written into: `.<name>.rows.tmp`, a name
    `common.start_run` removes as a temporary file of `output` when a killed run left it behind."""
    folder, name = os.path.split(output)
    return os.path.join(folder, f".{name}.rows.tmp")


def open_npy_rows(path, shape, dtype):
    """A writable .npy memory map that every rank fills with its own rows (rank 0 creates it). Its
    blocks are allocated now: a full disk is a one-line UserError here, not a SIGBUS when a
    memory-mapped write finds no block, hours later."""
    common.agree_on_main(lambda: _create_npy_rows(path, shape, dtype))
    return np.lib.format.open_memmap(path, mode="r+")


def _create_npy_rows(path, shape, dtype):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    rows.flush()
    size = rows.offset + rows.nbytes
    del rows
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without allocation: write sparse
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise UserError(f"cannot write {path} ({size / 1e9:.1f} GB): {err.strerror or err}") from None


@contextlib.contextmanager
def removed_on_failure(path):
    """Rank 0 removes the temporary file `path` when the stage fails (a kill leaves it to the
    next start_run)."""
    try:
        yield
    except BaseException:
        if common.is_main_process():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise


def check_free_disk(folder, need, what):
    """A start_run check: `need` bytes free where `folder` is (or will be), so that a long stage does
    not end on a full disk."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(f"{what} needs {need / 1e9:.1f} GB on the disk of {existing}, which has "
                        f"{free / 1e9:.1f} GB free")


def npy_to_npz(npy_path, npz_path, **extra):
    """Rank 0: store the .npy rows as `arr_0` of an uncompressed .npz (streamed from the memory map,
    never whole in RAM) plus `extra` arrays; atomic; the .npy is removed."""
    images = np.load(npy_path, mmap_mode="r")
    common.atomic_write(npz_path, lambda f: np.savez(f, arr_0=images, **extra))
    del images
    os.unlink(npy_path)


def npz_images(path):
    """`arr_0` of an .npz as a read-only memory map when it is stored uncompressed (np.savez),
    else loaded. (N, H, W, 3) uint8 expected."""
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("arr_0.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
                f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        else:
            arr = np.load(path)["arr_0"]
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise UserError(f"{path} is not an .npz with an 'arr_0' image array ({err})") from None
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise UserError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0:
        raise UserError(f"{path} holds no images")
    return arr


class NHWCImages(Dataset):
    """uint8 (N, H, W, 3) rows -> uint8 (3, H, W) tensors (torch-fidelity's input convention)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return self.array.shape[0]

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)  # a copy: memory maps are read-only


def fid_reference(path):
    """--fid-reference: a folder of images, or an .npz with `arr_0` images and optionally ADM's
    precomputed Inception statistics `mu`, `sigma` (VIRTUAL_imagenet256_labeled.npz).
    Returns (images for torch-fidelity, statistics or None, description for the JSON)."""
    if os.path.isdir(path):
        if not any(name.lower().endswith(IMAGE_SUFFIXES) for name in os.listdir(path)):
            raise UserError(f"--fid-reference {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return path, None, f"folder {os.path.abspath(path)}"
    images = npz_images(path)
    with np.load(path) as z:
        stats = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)} \
            if "mu" in z.files and "sigma" in z.files else None
    if stats is not None:
        check_statistics(stats, path)
    what = "precomputed statistics (mu, sigma) for FID and its" if stats else "its"
    return NHWCImages(images), stats, f"{os.path.basename(path)}: {what} {images.shape[0]} images"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_POOL_DIM = 2048


def check_statistics(stats, path):
    """ADM reference statistics are the mean (2048,) and covariance (2048, 2048) of Inception pool
    features, finite: anything else gives a traceback or a NaN g-FID after all the sampling."""
    d = INCEPTION_POOL_DIM
    if stats["mu"].shape != (d,) or stats["sigma"].shape != (d, d):
        raise UserError(f"{path}: mu / sigma must have shapes ({d},) / ({d}, {d}) (Inception pool features), "
                        f"got {stats['mu'].shape} / {stats['sigma'].shape}")
    if not (np.isfinite(stats["mu"]).all() and np.isfinite(stats["sigma"]).all()):
        raise UserError(f"{path}: mu / sigma contain NaN or infinite values")


def inception_pool_features(dataset, batch_size, cuda):
    """2048-d pool features of torch-fidelity's TF-compatible Inception (the FID network)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
    extractor = create_feature_extractor("inception-v3-compat", ["2048"], cuda=cuda, verbose=False,
                                         feature_extractor_weights_path=common.inception_weights_path())
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, True, False)["2048"].double()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the trace of the root from eigenvalues of
    S1 S2 (real parts; torch-fidelity's formula)."""
    diff = mu1 - mu2
    root = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * root)


def fid_against_statistics(dataset, stats, batch_size=64, cuda=None):
    """FID of images against precomputed (mu, sigma) (the ADM evaluator's reference batches)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    feats = inception_pool_features(dataset, batch_size, cuda).numpy()
    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), stats["mu"], stats["sigma"])


# ================================================================================================
# LlamaGen-B: the class-conditional GPT (parameter names as LlamaGen's, so c2i_B_256.pt loads)
# ================================================================================================


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d_table(grid, head_dim, base=10000.0, cls_tokens=1):
    """(cls_tokens + grid^2, head_dim / 2, 2) cos / sin of LlamaGen's 2-D rotary embedding: of each
    head's head_dim / 2 rotation pairs, the first half turns with the row, the second with the
    column of a token (raster order). The class slot's rows are ZERO, as in LlamaGen (its query
    and key vanish: every position gives the class token attention logit 0)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].double() / half)
    angle = torch.outer(torch.arange(grid).double(), freqs)  # (grid, half / 2)
    grid_angle = torch.cat([angle[:, None, :].expand(-1, grid, -1), angle[None, :, :].expand(grid, -1, -1)], -1)
    table = torch.stack([grid_angle.cos(), grid_angle.sin()], -1).flatten(0, 1).float()
    return torch.cat([torch.zeros(cls_tokens, half, 2), table])


def apply_rope(x_BTHD, table_TD2):
    xs = x_BTHD.float().reshape(*x_BTHD.shape[:-1], -1, 2)
    t = table_TD2.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], -1)
    return out.flatten(3).type_as(x_BTHD)


class KVCache:
    """Keys and values of one layer for positions 0..max_len-1 (B, H, max_len, head_dim)."""

    def __init__(self, batch, heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


class Attention(nn.Module):
    def __init__(self, dim, heads, resid_dropout):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x_BTC, rope, cache=None, pos=0):
        b, t, c = x_BTC.shape
        q, k, v = (u.view(b, t, self.heads, self.head_dim) for u in self.wqkv(x_BTC).split(c, -1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # positions pos..pos+t-1 see every cached position before them and themselves
            cache.k[:, :, pos:pos + t], cache.v[:, :, pos:pos + t] = k, v
            mask = torch.ones(t, pos + t, dtype=torch.bool, device=x_BTC.device).tril(pos)
            out = F.scaled_dot_product_attention(q, cache.k[:, :, :pos + t], cache.v[:, :, :pos + t], attn_mask=mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, t, c)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); hidden 2/3 of 4 x dim rounded up to a multiple of 256."""

    def __init__(self, dim, dropout, multiple_of=256):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        hidden = hidden + (-hidden) % multiple_of
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, dropout, norm_eps):
        super().__init__()
        self.attention, self.feed_forward = Attention(dim, heads, dropout), FeedForward(dim, dropout)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)

    def forward(self, x, rope, cache=None, pos=0):
        h = x + self.attention(self.attention_norm(x), rope, cache, pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class (id = num_classes), for classifier-free
    guidance; in training each label is replaced by the null class with probability `dropout`."""

    def __init__(self, num_classes, dim, dropout):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout = num_classes, dropout

    def forward(self, labels_B):
        if self.training and self.dropout > 0:
            drop = torch.rand(labels_B.shape, device=labels_B.device) < self.dropout
            labels_B = torch.where(drop, torch.full_like(labels_B, self.num_classes), labels_B)
        return self.embedding_table(labels_B)[:, None]


class LlamaGenGPT(nn.Module):
    """Class-conditional decoder-only transformer over a raster-order token grid (LlamaGen c2i).
    Sequence: [class token, z_0, ..., z_{L-2}] -> logits for z_0 .. z_{L-1}."""

    def __init__(self, vocab_size, num_classes, seq_len=256, dim=768, n_layer=12, n_head=12, dropout=0.1,
                 token_dropout=0.1, class_dropout=0.1, norm_eps=1e-5, rope_base=10000.0):
        super().__init__()
        grid = int(round(math.sqrt(seq_len)))
        if grid * grid != seq_len or dim % n_head:
            raise UserError(f"LlamaGen's GPT needs a square token grid and width divisible by heads "
                            f"(got {seq_len} tokens, width {dim}, {n_head} heads)")
        self.vocab_size, self.num_classes, self.seq_len = vocab_size, num_classes, seq_len
        self.n_head, self.head_dim = n_head, dim // n_head
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_head, dropout, norm_eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope", rope_2d_table(grid, self.head_dim, rope_base), persistent=False)
        for m in self.modules():  # LlamaGen: N(0, 0.02) for linear and embedding weights, zero output layer
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(self.output.weight)

    def forward(self, idx_BT, labels_B):
        """Teacher forcing: idx_BT = z[:, :-1] (T = L - 1 tokens) -> logits (B, T + 1, V), float32."""
        h = torch.cat([self.cls_embedding(labels_B), self.tok_embeddings(idx_BT)], 1)
        h = self.tok_dropout(h)
        rope = self.rope[:h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope)
        return self.output(self.norm(h)).float()

    def new_caches(self, batch, device, dtype):
        return [KVCache(batch, self.n_head, self.seq_len, self.head_dim, dtype, device) for _ in self.layers]

    def step(self, caches, pos, labels_B=None, idx_B1=None):
        """Incremental decoding: the class token (pos 0, labels_B) or one token (idx_B1) at `pos`,
        attending to the cache -> logits (B, V) for the next token."""
        h = self.cls_embedding(labels_B) if labels_B is not None else self.tok_embeddings(idx_B1)
        rope = self.rope[pos:pos + h.shape[1]]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, rope, cache, pos)
        return self.output(self.norm(h[:, -1])).float()


def guided_logits(cond_BV, uncond_BV, scale):
    """Classifier-free guidance as LlamaGen: u + s (c - u)."""
    return uncond_BV + scale * (cond_BV - uncond_BV)


def llamagen_scale(cfg_scale):
    """LlamaGen's s of u + s (c - u) for the guidance w of every generator's --cfg-scale, c + w (c - u)."""
    return 1.0 + cfg_scale


@torch.no_grad()
def sample_tokens(model, labels_B, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """(B, L) tokens, one at a time with the kv cache. With guidance w = cfg_scale > 0 the batch is
    doubled with the null class and logits are guided with LlamaGen's s = 1 + w (only for s > 1, as
    LlamaGen); top-k / top-p as every generator (common.filter_top_k_top_p); every draw comes from
    `generator`."""
    guided = cfg_scale > 0
    cond = torch.cat([labels_B, torch.full_like(labels_B, model.num_classes)]) if guided else labels_B
    device = labels_B.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        next(model.parameters()).dtype  # the cache holds keys / values in the dtype attention computes in
    caches = model.new_caches(cond.shape[0], device, dtype)
    b, tokens = labels_B.shape[0], []
    logits = model.step(caches, 0, labels_B=cond)
    for i in range(model.seq_len):
        if i > 0:
            prev = tokens[-1][:, None]
            logits = model.step(caches, i, idx_B1=torch.cat([prev, prev]) if guided else prev)
        if guided:
            logits = guided_logits(logits[:b], logits[b:], llamagen_scale(cfg_scale))
        probs = common.filter_top_k_top_p(logits / temperature, top_k, top_p).softmax(-1)
        tokens.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
    return torch.stack(tokens, 1)


def gpt_param_groups(model, weight_decay):
    """LlamaGen's AdamW groups: weight decay on >= 2-D tensors (matrices, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_gpt(args, vocab_size, num_classes, seq_len):
    return LlamaGenGPT(vocab_size, num_classes, seq_len, dim=args.gpt_dim, n_layer=args.gpt_layers,
                       n_head=args.gpt_heads, dropout=args.gpt_dropout, token_dropout=args.gpt_dropout,
                       class_dropout=args.class_dropout)


def public_gpt_state_dict(ckpt):
    """The GPT weights of one of our checkpoints or of LlamaGen's c2i_*.pt ('model', 'module' or
    'state_dict'; LlamaGen's rotary table is not a weight)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return {k: v for k, v in ckpt[key].items() if k != "freqs_cis"}
    raise UserError("the GPT checkpoint holds no 'model' / 'module' / 'state_dict' weights")


# ================================================================================================
# Token codes (tokens stage output; GPT training input)
# ================================================================================================


class Codes:
    """Token codes of a split: `array` (N, A, L) integer ids (A views per image, L = grid^2),
    a .npy memory map written by the tokens stage or an in-memory tensor from a common token dump
    (A = 1), and the labels. `batch(idx, view)` -> (B, L) int64 ids."""

    def __init__(self, path, array, labels, codebook_size, num_classes, grid, record):
        self.path, self.array, self.labels = path, array, labels
        self.codebook_size, self.num_classes, self.grid, self.record = codebook_size, num_classes, grid, record

    @property
    def num_views(self):
        return self.array.shape[1]

    def __len__(self):
        return self.array.shape[0]

    def batch(self, idx, view):
        rows = self.array[idx.numpy(), view.numpy()] if isinstance(self.array, np.ndarray) else self.array[idx, view]
        return torch.as_tensor(np.asarray(rows)).long().reshape(len(idx), -1)


def load_codes(path):
    """Our ten-crop code file (tokens_<split>.pt + .npy) or a common token dump (vq only), checked:
    ids inside [0, K) (streamed through the memory map in chunks), labels inside [0, classes)."""
    record = common.load_checkpoint(path) if os.path.exists(path) else None
    if record is None:
        raise UserError(f"token codes not found: {path} (run --stage tokens first, or pass --tokens)")
    if isinstance(record, dict) and "tokens_file" in record:
        npy = os.path.join(os.path.dirname(os.path.abspath(path)), record["tokens_file"])
        if not os.path.exists(npy):
            raise UserError(f"{path} names {npy}, which is missing")
        array = np.load(npy, mmap_mode="r")
        labels = torch.as_tensor(record["labels"]).long()
        k, classes = int(record["codebook_size"]), int(record["num_classes"])
        if array.ndim != 4 or array.shape[0] != labels.shape[0] or array.shape[2] != array.shape[3]:
            raise UserError(f"{npy}: codes must be (N, views, h, w) with one label per image, got {array.shape}")
        for start in range(0, array.shape[0], 8192):  # ~84 MB at 20 views of 16 x 16
            chunk = np.asarray(array[start:start + 8192])
            if chunk.size and (chunk.min() < 0 or chunk.max() >= k):
                raise UserError(f"{npy}: token ids must lie in [0, {k}), found {chunk.min()}..{chunk.max()}")
        grid = array.shape[2]
        array = array.reshape(array.shape[0], array.shape[1], -1)
    else:
        dump = common.load_token_dump(path)
        if dump.quantizer != "vq":
            raise UserError(f"{path} holds {dump.quantizer} tokens; LlamaGen's GPT reads single-scale (vq) codes")
        array, labels, k, classes, grid = dump.tokens_NL[:, None], dump.labels, dump.codebook_size, \
            dump.num_classes, dump.scales[0]
        record = dump.record
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= classes:
        raise UserError(f"{path}: labels must lie in [0, {classes})")
    return Codes(os.path.abspath(path), array, labels, k, classes, grid, record)


# ================================================================================================
# Stage: tokenizer training
# ================================================================================================


def arm_name(args):
    """The run's folder under --out: --arm, else baseline / deferred / deferred_raw (--switch-codes raw)."""
    if args.arm:
        return args.arm
    return "baseline" if not args.deferred else "deferred_raw" if args.switch_codes == "raw" else "deferred"


def run_dir(args):
    return os.path.join(args.out, arm_name(args))


def steps_per_epoch(n, global_batch):
    steps = n // global_batch
    if steps < 1:
        raise UserError(f"--batch-size {global_batch} exceeds the {n} training images")
    return steps


def epoch_loader(dataset, args, info, epoch, skip, global_batch):
    """This rank's batches of one epoch (common.epoch_batches: the same permutation of (seed, epoch)
    on every rank), from batch `skip` on (a resumed run replays the epoch's order exactly)."""
    batches = common.epoch_batches(len(dataset), global_batch, args.seed, epoch, info.rank, info.world_size)
    gen = torch.Generator().manual_seed(common.epoch_seed(args.seed, epoch, info.rank) + skip)
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches[skip:]], num_workers=args.num_workers,
                      pin_memory=info.device.type == "cuda", generator=gen)


def tokenizer_paths(args):
    folder = os.path.join(run_dir(args), "tokenizer")
    return os.path.join(folder, "last.pt"), os.path.join(folder, "continuous.pt")


def codebook_views(quantizer):
    """(raw stored codes, effective unit codes) on the CPU, float32."""
    return quantizer.embed.detach().float().cpu(), quantizer.codebook.detach().float().cpu()


def train_tokenizer(args, info):
    last_path, continuous_path = tokenizer_paths(args)
    outputs = [last_path] + ([continuous_path] if args.deferred else [])
    checks = [lambda: check_data(args, ("train",))]
    with common.start_run(args, name=f"{arm_name(args)}_tokenizer", outputs=outputs, ranges=TOKENIZER_RANGES,
                          defining=TOKENIZER_DEFINING, resume_from=last_path, checks=checks,
                          validate=validate_tokenizer) as run:
        common.seed_everything(args.seed)
        data = imagenet_split(args, "train", "train")
        per_epoch = steps_per_epoch(len(data), args.batch_size)
        total = args.epochs * per_epoch
        switch_step = args.continuous_steps if args.deferred else 0
        if switch_step >= total:
            raise UserError(f"--continuous-steps {switch_step} leaves no Discretization Phase in {total} steps "
                            f"({args.epochs} epochs of {per_epoch}); raise --epochs")
        check_switch_fits(args, per_epoch, info.world_size)
        model = common.build_tokenizer(tokenizer_cfg(args)).to(info.device)
        model.quantizer.set_enabled(not args.deferred)  # baseline: LlamaGen's normalised U(-1/K, 1/K) codes
        disc = common.PatchDiscriminator(ndf=args.disc_ndf, n_layers=args.disc_layers).to(info.device) \
            if args.gan_weight > 0 else None
        betas = (args.adam_beta1, args.adam_beta2)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=betas)
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=betas) if disc is not None else None
        lpips_fn = common.load_lpips("vgg", info.device) if args.lpips_weight > 0 else None
        state = {"step": 0, "history": [], "switched_at": None}
        if run.checkpoint is not None:
            ck = run.checkpoint
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if disc is not None:
                disc.load_state_dict(ck["disc"])
                opt_d.load_state_dict(ck["disc_optimizer"])
            state = ck["state"]
            common.set_rng_state(ck["rng"])
            print0(f"resumed {last_path} at step {state['step']}")
        # the codebook sits idle while quantization is off; afterwards every parameter is used
        ddp_model = common.wrap_ddp(model, info, find_unused_parameters=not model.quantizer.is_enabled)
        ddp_disc = common.wrap_ddp(disc, info) if disc is not None else None

        def save(path=last_path):
            if info.is_main:
                raw, unit = codebook_views(model.quantizer)
                blob = dict(model=model.state_dict(), optimizer=opt.state_dict(), state=state, step=state["step"],
                            args=tokenizer_cfg(args), history=state["history"], codebook=unit, codebook_raw=raw,
                            finished=state["step"] >= total)
                if disc is not None:
                    blob.update(disc=disc.state_dict(), disc_optimizer=opt_d.state_dict())
                common.save_checkpoints(path, **blob)
            if common.is_distributed():
                torch.distributed.barrier()

        bar = common.progress_bar(total=total, initial=state["step"], desc="tokenizer")
        window = torch.zeros(7, dtype=torch.float64, device=info.device)
        usage = torch.zeros(args.codebook_size, dtype=torch.float64, device=info.device)
        while state["step"] < total:
            epoch, skip = divmod(state["step"], per_epoch)
            for x, _ in epoch_loader(data, args, info, epoch, skip, args.batch_size):
                x = x.to(info.device, non_blocking=True)
                if state["step"] == switch_step and not model.quantizer.is_enabled:
                    switch(model, x, next_batches(data, args, info, epoch, skip + 1), args, state, save,
                           continuous_path)
                    ddp_model = common.wrap_ddp(model, info)
                stats = tokenizer_step(model, ddp_model, disc, ddp_disc, opt, opt_d, lpips_fn, x, args,
                                       state["step"] - switch_step)
                window += stats["sums"]
                if stats["indices"] is not None:
                    usage += torch.bincount(stats["indices"].flatten(), minlength=args.codebook_size)
                state["step"] += 1
                bar.update(1)
                if state["step"] % args.log_every == 0 or state["step"] == total:
                    log_window(state, window, usage, model)
                if state["step"] % args.ckpt_every == 0 or state["step"] == total:
                    save()
                if state["step"] >= total:
                    break
        bar.close()
    print0(f"tokenizer trained: {last_path}; next --stage tokenizer-eval")


def check_switch_fits(args, per_epoch, world_size):
    """The switch builds the codebook from --ratio x --codebook-size embeddings (grid^2 per image)
    of the batches left in its epoch: refuse before training a codebook they cannot fill, which
    would otherwise fail at the switch, --continuous-steps (50,000) steps in."""
    if not args.deferred:
        return
    grid = args.resolution // 2 ** (len(args.ch_mult) - 1)
    batches_left = per_epoch - args.continuous_steps % per_epoch
    available = batches_left * (args.batch_size // world_size) * grid * grid  # per rank
    needed = math.ceil(math.ceil(args.ratio * args.codebook_size) / world_size)
    if needed > available:
        raise UserError(f"--codebook-size {args.codebook_size} at --ratio {args.ratio:g} needs {needed * world_size} "
                        f"embeddings at the switch, but the {batches_left} batches left in its epoch give "
                        f"{available * world_size} ({grid}x{grid} per image): use fewer codes, a lower --ratio, "
                        "a larger --batch-size or another --continuous-steps")


def switch(model, x, more, args, state, save, continuous_path):
    """Continuous -> Discretization (paper section 5): keep the model at the switch, then build the
    codebook from the first global batch of the Discretization Phase (2 x K embeddings at the
    paper's batch), reading the next batches of the epoch (`more`, lazily) only where one is too
    small. The first batch is then trained on, like every batch."""
    save(continuous_path)
    model.eval()
    n = common.deferred_switch(model.quantizer, model.encode, _chain(x, more), args.ratio, args.init_method,
                               args.seed, progress=True, unit_codes=args.switch_codes == "unit")
    model.train()
    state["switched_at"] = state["step"]
    print0(f"step {state['step']}: codebook initialised from {n} embeddings per rank; Discretization Phase")


def next_batches(data, args, info, epoch, skip):
    """The rest of this rank's epoch, loaded only when iterated (a generator function)."""
    for x, _ in epoch_loader(data, args, info, epoch, skip, args.batch_size):
        yield x.to(info.device)


def _chain(first, rest):
    """`first`, then the items of the generator `rest` (started only if asked for)."""
    yield first
    yield from rest


def tokenizer_step(model, ddp_model, disc, ddp_disc, opt, opt_d, lpips_fn, x, args, vq_step):
    """One LlamaGen step: generator (autoencoder + codebook) update, then discriminator update."""
    gan_on = disc is not None and model.quantizer.is_enabled and vq_step >= args.gan_start
    with common.autocast_for(x.device):
        recon, indices, vq_loss = ddp_model(x)
        recon = recon.float()
        mse = F.mse_loss(recon, x) * 4.0  # LlamaGen's L2 loss is on [-1, 1] images: 4 x MSE on [0, 1]
        perceptual = lpips_fn(recon, x).mean() if lpips_fn is not None else recon.new_zeros(())
        loss = mse + args.lpips_weight * perceptual + vq_loss
        g_loss = recon.new_zeros(())
        if gan_on:
            disc.requires_grad_(False)
            g_loss = -disc(recon).float().mean()  # hinge generator loss
            disc.requires_grad_(True)
            loss = loss + args.gan_weight * g_loss
    common.check_finite(loss, f"tokenizer step (Discretization step {vq_step})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    d_loss = recon.new_zeros(())
    if gan_on:
        with common.autocast_for(x.device):
            d_loss = args.gan_weight * common.hinge_d_loss(ddp_disc(x).float(), ddp_disc(recon.detach()).float())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), args.grad_clip)
        opt_d.step()
    one = torch.ones((), dtype=torch.float64, device=x.device)
    sums = torch.stack([one, loss.detach().double(), mse.detach().double(), perceptual.detach().double(),
                        vq_loss.detach().double(), g_loss.detach().double(), d_loss.detach().double()])
    return {"sums": sums, "indices": indices}


def log_window(state, window, usage, model):
    """History record of the steps since the last one (means over ranks and steps), reset after."""
    common.all_reduce_sum(window)
    common.all_reduce_sum(usage)
    n = max(window[0].item(), 1.0)
    record = {"step": state["step"], "phase": "discretization" if model.quantizer.is_enabled else "continuous"}
    for i, key in enumerate(("loss", "mse", "lpips", "vq_loss", "gan_g", "gan_d"), 1):
        record[key] = window[i].item() / n
    if usage.sum() > 0:
        record["perplexity"] = common.perplexity_from_counts(usage.cpu())
        record["used_codes"] = int((usage > 0).sum())
    state["history"].append(record)
    print0(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    window.zero_()
    usage.zero_()


# ================================================================================================
# Stage: tokenizer evaluation (Table 7)
# ================================================================================================


def tokenizer_checkpoint(args):
    return args.tokenizer_checkpoint or tokenizer_paths(args)[0]


def evaluate_tokenizer(args, info):
    ckpt_path = tokenizer_checkpoint(args)
    folder = run_dir(args)
    json_path, pt_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.pt")
    npz_path = os.path.join(folder, "reconstructions.npz")
    npy_path = rows_path(npz_path)
    checks = [lambda: check_data(args, ("val",))] + ([] if args.skip_fid else [common.inception_weights_path])
    with common.start_run(args, name=f"{arm_name(args)}_tokenizer-eval", outputs=[json_path, pt_path, npz_path],
                          ranges=TOKENIZER_RANGES, checks=checks), removed_on_failure(npy_path):
        model, cfg = load_any_tokenizer(ckpt_path, args.resolution, info.device)
        check_tokenizer_resolution(cfg, args.resolution, ckpt_path)
        data = imagenet_split(args, "val", "eval")
        subset = keep_budget(data, args.max_eval_images)
        n, r = len(data), args.resolution
        rows = open_npy_rows(npy_path, (n, r, r, 3), np.uint8)
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # images, psnr, ssim_llamagen, ssim
        counter = common.UsageCounter(cfg["codebook_size"], info.device)
        part = shard(data, info)
        loader = DataLoader(part, batch_size=args.eval_batch_size, num_workers=args.num_workers)
        done = 0
        for x, _ in common.progress_bar(loader, desc="reconstructing"):
            x = x.to(info.device)
            with torch.no_grad(), common.autocast_for(info.device):
                z_q, indices, _ = model.quantizer(model.encode(x))
                recon8 = common.to_uint8(model.decode(z_q).float())
            counter.update(indices)
            recon = recon8.float() / 255.0  # the protocol scores the uint8 images that are saved
            sums += torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64, device=info.device),
                                 psnr_per_image(recon, x).sum(), ssim_llamagen(recon, x).sum(),
                                 torch.tensor(common.ssim(recon, x) * x.shape[0], dtype=torch.float64,
                                              device=info.device)])
            index = np.asarray(part.indices[done:done + x.shape[0]])
            rows[index] = recon8.permute(0, 2, 3, 1).cpu().numpy()
            done += x.shape[0]
        rows.flush()
        del rows
        common.all_reduce_sum(sums)
        counter.all_reduce()
        if common.is_distributed():
            torch.distributed.barrier()
        if not info.is_main:
            return
        npy_to_npz(npy_path, npz_path)
        metrics = {"psnr": (sums[1] / sums[0]).item(), "ssim_llamagen": (sums[2] / sums[0]).item(),
                   "ssim": (sums[3] / sums[0]).item(), "num_images": n}
        notes = {"ssim": "common.ssim: Gaussian 11x11, sigma 1.5, data range 1 on [0, 1] images (Wang et al.)",
                 "ssim_llamagen": "LlamaGen's protocol: skimage uniform 7x7, sample covariance, data_range=2.0 "
                                  "on [0, 1] images (the paper's SSIM column)",
                 "codebook": "euclidean / cosine / vendi: the raw stored codes (what the paper measured); "
                             "*_unit: the l2-normalised codes the quantizer uses (cosine is the same for both)"}
        if args.skip_fid:
            notes["rfid"] = "not computed: --skip-fid"
        else:
            metrics["rfid"] = common.fidelity_metrics(NHWCImages(npz_images(npz_path)), data, fid=True,
                                                      batch_size=args.fid_batch_size,
                                                      num_workers=args.num_workers)["fid"]
        raw, unit = codebook_views(model.quantizer)
        metrics.update(common.codebook_metrics(raw, counter.counts.cpu()))
        unit_metrics = common.codebook_metrics(unit)
        metrics.update({f"{k}_unit": unit_metrics[k] for k in ("euclidean", "vendi")})
        ckpt = common.load_checkpoint(ckpt_path)
        history = ckpt.get("history", []) if cfg.get("name") != "llamagen-public" else []
        status = checkpoint_status(ckpt)
        if common.unfinished_note(status):
            notes["model_finished"] = common.unfinished_note(status)
        common.write_result(json_path, TOKENIZER_EXPERIMENT, arm_name(args), args, metrics, history, **status,
                            tokenizer=common.tokenizer_identity(cfg, ckpt_path),
                            eval_split=f"ImageNet-1K val, ADM centre crop {r}",
                            fid_reference=None if args.skip_fid
                            else f"ImageNet-1K val, {n} images{common.fid_subset_note(subset)}",
                            eval_subset=subset, data_range=1.0, reconstructions=os.path.basename(npz_path),
                            notes=notes)
        common.save_checkpoint(pt_path, codebook=unit, codebook_raw=raw, code_counts=counter.counts.float().cpu(),
                               metrics=metrics, args=cfg)
        print0({k: v for k, v in metrics.items()})


# ================================================================================================
# Stage: token codes of the training images (LlamaGen extract_codes_c2i --ten-crop)
# ================================================================================================


def tokens_paths(args):
    return os.path.join(run_dir(args), "tokens_train.pt"), os.path.join(run_dir(args), "tokens_train.npy")


def extract_tokens(args, info):
    ckpt_path = tokenizer_checkpoint(args)
    pt_path, npy_path = tokens_paths(args)
    tmp_path = rows_path(npy_path)
    with common.start_run(args, name=f"{arm_name(args)}_tokens", outputs=[pt_path, npy_path], ranges=TOKENIZER_RANGES,
                          checks=[lambda: check_data(args, ("train",))], validate=validate_crops), \
                removed_on_failure(tmp_path):
        model, cfg = load_any_tokenizer(ckpt_path, args.resolution, info.device)
        check_tokenizer_resolution(cfg, args.resolution, ckpt_path)
        data = imagenet_split(args, "train", "crops", args.crop_ranges)
        subset = keep_budget(data, args.max_train_images)
        grid = args.resolution // 2 ** (len(cfg["ch_mult"]) - 1)
        views = 10 * len(args.crop_ranges)
        dtype = np.int16 if cfg["codebook_size"] <= 2 ** 15 else np.int32
        rows = open_npy_rows(tmp_path, (len(data), views, grid, grid), dtype)
        part = shard(data, info)
        loader = DataLoader(part, batch_size=args.eval_batch_size, num_workers=args.num_workers)
        done = 0
        for x, _ in common.progress_bar(loader, desc="codes"):
            flat = x.flatten(0, 1).to(info.device)
            codes = []
            for chunk in flat.split(args.eval_batch_size):
                with torch.no_grad(), common.autocast_for(info.device):
                    codes.append(model.quantizer(model.encode(chunk))[1].cpu())
            index = np.asarray(part.indices[done:done + x.shape[0]])
            rows[index] = torch.cat(codes).reshape(x.shape[0], views, grid, grid).numpy().astype(dtype)
            done += x.shape[0]
        rows.flush()
        del rows
        if common.is_distributed():
            torch.distributed.barrier()
        if info.is_main:
            os.replace(tmp_path, npy_path)
            record = {"tokens_file": os.path.basename(npy_path), "labels": torch.tensor([lab for _, lab in data.items]),
                      "quantizer": "vq", "scales": [grid], "codebook_size": cfg["codebook_size"],
                      "num_classes": len(data.classes), "classes": data.classes, "split": "train",
                      "checkpoint": os.path.abspath(ckpt_path), "crop_ranges": list(args.crop_ranges),
                      "train_subset": subset,
                      "views": "per crop range: TenCrop (tl, tr, bl, br, centre, then the same of the mirror image)"}
            common.atomic_write(pt_path, lambda f: torch.save(record, f))
            print0(f"wrote {npy_path} ({len(data)} images x {views} views); next --stage gpt")


# ================================================================================================
# Stage: LlamaGen-B training
# ================================================================================================


def gpt_path(args):
    return os.path.join(run_dir(args), "gpt", "last.pt")


def train_gpt(args, info):
    last_path = gpt_path(args)
    tokens_path = args.tokens or tokens_paths(args)[0]
    with common.start_run(args, name=f"{arm_name(args)}_gpt", outputs=[last_path], ranges=GPT_RANGES,
                          defining=GPT_DEFINING, resume_from=last_path) as run:
        codes = load_codes(tokens_path)
        common.seed_everything(args.seed)
        model = build_gpt(args, codes.codebook_size, codes.num_classes, codes.grid ** 2).to(info.device)
        opt = torch.optim.AdamW(gpt_param_groups(model, args.gpt_weight_decay), lr=args.gpt_lr,
                                betas=(args.adam_beta1, args.adam_beta2))
        state = {"step": 0, "history": []}
        if run.checkpoint is not None:
            model.load_state_dict(run.checkpoint["model"])
            opt.load_state_dict(run.checkpoint["optimizer"])
            state = run.checkpoint["state"]
            common.set_rng_state(run.checkpoint["rng"])
            print0(f"resumed {last_path} at step {state['step']}")
        ddp_model = common.wrap_ddp(model, info)
        per_epoch = steps_per_epoch(len(codes), args.gpt_batch_size)
        total = args.gpt_epochs * per_epoch
        bar = common.progress_bar(total=total, initial=state["step"], desc="gpt")
        window = torch.zeros(2, dtype=torch.float64, device=info.device)
        model.train()
        while state["step"] < total:
            epoch, skip = divmod(state["step"], per_epoch)
            batches = common.epoch_batches(len(codes), args.gpt_batch_size, args.seed, epoch, info.rank,
                                           info.world_size)
            # one of the image's views per epoch, the same draw on every rank (LlamaGen: random crop code)
            view = common.epoch_views(len(codes), codes.num_views, args.seed, epoch)
            for idx in batches[skip:]:
                z = codes.batch(idx, view[idx]).to(info.device, non_blocking=True)
                y = codes.labels[idx].to(info.device)
                with common.autocast_for(info.device):
                    logits = ddp_model(z[:, :-1], y)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), z.reshape(-1))
                common.check_finite(loss, f"GPT step {state['step']}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                window += torch.stack([torch.ones((), dtype=torch.float64, device=info.device), loss.detach().double()])
                state["step"] += 1
                bar.update(1)
                if state["step"] % args.log_every == 0 or state["step"] == total:
                    common.all_reduce_sum(window)
                    record = {"step": state["step"], "epoch": epoch, "train_loss": (window[1] / window[0]).item()}
                    state["history"].append(record)
                    print0(record)
                    window.zero_()
                if state["step"] % args.ckpt_every == 0 or state["step"] == total:
                    if info.is_main:
                        common.save_checkpoints(last_path, model=model.state_dict(), optimizer=opt.state_dict(),
                                                state=state, step=state["step"], finished=state["step"] >= total,
                                                args=vars(args),
                                                history=state["history"], tokens=codes.path,
                                                tokenizer=codes.record.get("checkpoint"),
                                                vocab_size=codes.codebook_size, num_classes=codes.num_classes,
                                                seq_len=codes.grid ** 2)
                    if common.is_distributed():
                        torch.distributed.barrier()
        bar.close()
    print0(f"GPT trained: {last_path}; next --stage sample")


# ================================================================================================
# Stages: sampling and generation metrics (Table 12)
# ================================================================================================


def samples_path(args):
    return os.path.join(run_dir(args), "samples.npz")


def checkpoint_status(ckpt):
    """common.model_status of a loaded checkpoint: ours record whether their training finished; a
    public release (LlamaGen's vq_ds16_c2i.pt, c2i_B_256.pt: no 'args') is a finished model."""
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    return common.model_status(ckpt, finished=True if "args" not in ckpt else None)


def combined_status(gpt, tokenizer):
    """Samples come from two models: finished only when both are (unknown if either is)."""
    states = (gpt["model_finished"], tokenizer["model_finished"])
    finished = False if False in states else None if None in states else True
    return dict(gpt, model_finished=finished, tokenizer_finished=tokenizer["model_finished"],
                tokenizer_sha256=tokenizer["model_sha256"])


def load_gpt(args, device):
    """(model in eval mode, its checkpoint path, tokenizer path it was trained with)."""
    path = args.gpt_checkpoint or gpt_path(args)
    ckpt = common.load_checkpoint(path)
    sd = public_gpt_state_dict(ckpt)
    if "tok_embeddings.weight" not in sd or "cls_embedding.embedding_table.weight" not in sd:
        raise UserError(f"{path} is not a LlamaGen GPT checkpoint (no tok_embeddings / cls_embedding weights)")
    vocab = sd["tok_embeddings.weight"].shape[0]
    classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    model = build_gpt(args, vocab, classes, ckpt.get("seq_len", 256) if isinstance(ckpt, dict) else 256)
    try:
        model.load_state_dict(sd)
    except RuntimeError as err:
        raise UserError(f"{path}: weights that do not fit --gpt-layers/--gpt-dim/--gpt-heads "
                        f"({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), path, ckpt.get("tokenizer") if isinstance(ckpt, dict) else None


def sample_labels(args, num_classes):
    """LlamaGen's labels are uniform random classes (sample_c2i_ddp.py); 'balanced' gives every
    class its share (common.balanced_labels). Drawn once for the whole run from --seed."""
    if args.labels == "balanced":
        return common.balanced_labels(args.num_samples, num_classes)
    return torch.randint(num_classes, (args.num_samples,), generator=torch.Generator().manual_seed(args.seed))


def generate_samples(args, info):
    out_path = samples_path(args)
    meta_path = out_path[:-4] + ".json"
    tmp_path = rows_path(out_path)
    # the rows (uint8 images), then the .npz written from them before they are removed: twice the images
    need = 2 * args.num_samples * args.resolution ** 2 * 3
    disk = [lambda: check_free_disk(run_dir(args), need, f"--stage sample of {args.num_samples} images")]
    with common.start_run(args, name=f"{arm_name(args)}_sample", outputs=[out_path, meta_path], ranges=GPT_RANGES,
                          checks=disk), removed_on_failure(tmp_path):
        model, gpt_ckpt, trained_with = load_gpt(args, info.device)
        tok_path = args.tokenizer_checkpoint or trained_with or tokenizer_checkpoint(args)
        tokenizer, cfg = load_any_tokenizer(tok_path, args.resolution, info.device)
        check_tokenizer_resolution(cfg, args.resolution, tok_path)
        if cfg["codebook_size"] != model.vocab_size:
            raise UserError(f"{tok_path} has {cfg['codebook_size']} codes, the GPT {model.vocab_size}")
        grid = int(math.isqrt(model.seq_len))
        labels = sample_labels(args, model.num_classes)
        size = args.resolution
        rows = open_npy_rows(tmp_path, (args.num_samples, size, size, 3), np.uint8)
        starts = list(range(0, args.num_samples, args.eval_batch_size))
        for b in common.progress_bar(starts[info.rank::info.world_size], desc="sampling"):
            lab = labels[b:b + args.eval_batch_size].to(info.device)
            # one generator per global batch, seeded by its position: no two batches share a seed,
            # and the samples do not depend on the number of processes
            gen = torch.Generator(info.device).manual_seed(common.epoch_seed(args.seed, b))
            with common.autocast_for(info.device):  # bf16 matmuls; rotary table and logits stay float32
                idx = sample_tokens(model, lab, args.cfg_scale, args.temperature, args.top_k, args.top_p, gen)
            with torch.no_grad():
                images = tokenizer.decode_indices(idx.reshape(-1, grid, grid)).float()
            rows[b:b + lab.shape[0]] = common.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        rows.flush()
        del rows
        if common.is_distributed():
            torch.distributed.barrier()
        if info.is_main:
            npy_to_npz(tmp_path, out_path, labels=labels.numpy())
            common.write_json(meta_path, {
                "gpt_checkpoint": os.path.abspath(gpt_ckpt), "tokenizer": common.tokenizer_identity(cfg, tok_path),
                "sampling": sampling_settings(args),
                **combined_status(checkpoint_status(common.load_checkpoint(gpt_ckpt)),
                                  checkpoint_status(common.load_checkpoint(tok_path)))})
            print0(f"wrote {out_path}; next --stage sample-eval")


def sampling_settings(args):
    return {"num_samples": args.num_samples, "labels": args.labels, "seed": args.seed, "cfg_scale": args.cfg_scale,
            "llamagen_cfg_scale": llamagen_scale(args.cfg_scale), "guidance": "c + w (c - u) = u + s (c - u), "
            "w = cfg_scale, s = llamagen_cfg_scale = 1 + w (w = 0: the conditional model)",
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "batch_size": args.eval_batch_size}


def evaluate_samples(args, info):
    npz = args.samples or samples_path(args)
    json_path = os.path.join(run_dir(args), "generation.json")
    checks = [lambda: npz_images(npz)] + ([] if args.skip_fid else
                                          [common.inception_weights_path, lambda: fid_reference(args.fid_reference)])
    with common.start_run(args, name=f"{arm_name(args)}_sample-eval", outputs=[json_path], ranges=GPT_RANGES,
                          checks=checks, validate=validate_sample_eval):
        if not info.is_main:
            return
        images = NHWCImages(npz_images(npz))
        meta_path = npz[:-4] + ".json"
        meta = common.read_json(meta_path) if os.path.exists(meta_path) else {}
        metrics, notes = {"num_samples": len(images)}, {}
        provenance = {"eval_split": None, "fid_reference": None, "data_range": 1.0}
        if args.skip_fid:
            notes["gfid"] = "not computed: --skip-fid"
        else:
            reference, stats, described = fid_reference(args.fid_reference)
            cuda = info.device.type == "cuda"
            raw = common.fidelity_metrics(images, reference, fid=stats is None, isc=not args.skip_isc, prc=True,
                                          batch_size=args.fid_batch_size, device=info.device.type)
            if stats is not None:
                raw["fid"] = fid_against_statistics(images, stats, args.fid_batch_size, cuda)
            metrics.update(gfid=raw["fid"], precision=raw["precision"], recall=raw["recall"])
            if "isc" in raw:
                metrics.update(isc=raw["isc"], isc_std=raw["isc_std"])
            provenance.update(eval_split="ImageNet-1K train (reference)", fid_reference=described)
        if args.skip_isc:
            notes["isc"] = ("not computed: --skip-isc (the Inception weights must carry the classifier logits; "
                            "NVIDIA's TorchScript port has pool features only)")
        tokenizer = meta.get("tokenizer") or {"deferred": args.deferred, "checkpoint": None}
        status = {k: meta.get(k) for k in ("model_finished", "model_epoch", "model_sha256", "tokenizer_finished")}
        if status["model_finished"] is not True:
            notes["model_finished"] = ("the GPT or the tokenizer had not finished training" if status["model_finished"]
                                       is False else "unknown: samples without a record of finished training")
        common.write_generator_result(json_path, GENERATOR_EXPERIMENT, args, metrics, [], tokenizer=tokenizer,
                                      provenance=provenance, sampling=meta.get("sampling", {}), **status,
                                      checkpoint=meta.get("gpt_checkpoint") or npz, notes=notes,
                                      samples=os.path.relpath(npz, os.path.dirname(json_path)))
        print0(metrics)


# ================================================================================================
# Entry point and arguments
# ================================================================================================

TOKENIZER_RANGES = {"seed": common.SAMPLER_RANGES["seed"], "codebook_size": ">= 1", "token_dim": ">= 1", "beta": ">= 0", "ratio": ">= 1", "lr": "> 0",
                    "epochs": ">= 1", "batch_size": ">= 1", "continuous_steps": ">= 0", "lpips_weight": ">= 0",
                    "gan_weight": ">= 0", "gan_start": ">= 0", "grad_clip": "> 0", "adam_beta1": "[0, 1)",
                    "adam_beta2": "[0, 1)", "resolution": ">= 8", "ch": ">= 1", "z_channels": ">= 1",
                    "num_res_blocks": ">= 1", "log_every": ">= 1", "ckpt_every": ">= 1", "num_workers": ">= 0",
                    "eval_batch_size": ">= 1", "fid_batch_size": ">= 1", "crop_ranges": ">= 1",
                    "max_eval_images": ">= 0", "max_train_images": ">= 0", "disc_layers": ">= 1", "disc_ndf": ">= 1"}
TOKENIZER_DEFINING = ("codebook_size", "token_dim", "beta", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                      "resolution", "z_channels", "deferred", "continuous_steps", "ratio", "init_method", "switch_codes",
                      "epochs", "batch_size", "lr", "adam_beta1", "adam_beta2", "grad_clip", "lpips_weight", "gan_weight",
                      "gan_start", "disc_layers", "disc_ndf", "seed")
GPT_RANGES = {"gpt_layers": ">= 1", "gpt_dim": ">= 1", "gpt_heads": ">= 1", "gpt_dropout": "[0, 1)",
              "class_dropout": "[0, 1)", "gpt_epochs": ">= 1", "gpt_batch_size": ">= 1", "gpt_lr": "> 0",
              "gpt_weight_decay": ">= 0", "grad_clip": "> 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
              "num_samples": ">= 1", **common.SAMPLER_RANGES,
              "eval_batch_size": ">= 1", "fid_batch_size": ">= 1", "log_every": ">= 1", "ckpt_every": ">= 1",
              "resolution": ">= 8"}
GPT_DEFINING = ("gpt_layers", "gpt_dim", "gpt_heads", "gpt_dropout", "class_dropout", "gpt_epochs", "gpt_batch_size",
                "gpt_lr", "gpt_weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "tokens", "seed")


def validate_tokenizer(args):
    if not args.ch_mult:
        raise UserError("--ch-mult needs at least one multiplier, e.g. 1,1,2,2,4")
    validate_crops(args)
    if args.resolution % 2 ** (len(args.ch_mult) - 1):
        raise UserError(f"--resolution {args.resolution} must divide by 2^{len(args.ch_mult) - 1} (--ch-mult levels)")
    if args.deferred and args.continuous_steps == 0 and args.init_method == "sample":
        print0("note: --continuous-steps 0 initialises the codebook from the untrained encoder (not LlamaGen's recipe)")


def validate_crops(args):
    if not args.crop_ranges:
        raise UserError("--crop-ranges needs at least one value, e.g. 1.1,1.05")


def check_tokenizer_resolution(cfg, resolution, path):
    """The stages after training work at the tokenizer's own resolution, which its downsamplings
    must divide (a public checkpoint takes --resolution)."""
    steps = 2 ** (len(cfg["ch_mult"]) - 1)
    if cfg["resolution"] != resolution:
        raise UserError(f"{path} was trained at {cfg['resolution']}px, --resolution is {resolution}")
    if resolution % steps:
        raise UserError(f"--resolution {resolution} must be a multiple of {steps} ({path} downsamples "
                        f"{len(cfg['ch_mult']) - 1} times)")


def validate_sample_eval(args):
    if not args.skip_fid and not args.fid_reference:
        raise UserError("--stage sample-eval needs --fid-reference (a folder of images or an .npz such as "
                        "VIRTUAL_imagenet256_labeled.npz), or --skip-fid")


def comma_separated(cast):
    """argparse type: '1,1,2' -> a tuple of `cast` values."""
    def parse(text):
        try:
            return tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__} values, got '{text}'") from None
    return parse


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--arm", help="run name under --out (default: deferred or baseline)")
    p.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="ImageNet-1K root holding the ImageFolder trees train/ and val/")
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--num-workers", type=int, default=8, help="DataLoader workers per process")
    g.add_argument("--max-eval-images", type=int, default=0,
                   help="evaluate a class-stratified, seeded subset of N val images (0: all)")
    g.add_argument("--max-train-images", type=int, default=0,
                   help="tokens stage: a class-stratified, seeded subset of N training images (0: all)")

    g = p.add_argument_group("tokenizer (LlamaGen VQ-16)")
    g.add_argument("--ch", type=int, default=128)
    g.add_argument("--ch-mult", type=comma_separated(int), default=(1, 1, 2, 2, 4))
    g.add_argument("--num-res-blocks", type=int, default=2)
    g.add_argument("--attn-resolutions", type=comma_separated(int), default=(16,))
    g.add_argument("--z-channels", type=int, default=256)
    g.add_argument("--token-dim", type=int, default=8)
    g.add_argument("--codebook-size", type=int, default=16384)
    g.add_argument("--beta", type=float, default=0.25, help="commitment weight")

    g = p.add_argument_group("Deferred Quantization (section 5)")
    g.add_argument("--deferred", action="store_true", help="Continuous Phase first, then the switch")
    g.add_argument("--continuous-steps", type=int, default=50000, help="Continuous Phase length (paper: 50,000)")
    g.add_argument("--ratio", type=float, default=2.0,
                   help="embeddings per code at the switch (2: exactly the first batch of 128 x 256)")
    g.add_argument("--init-method", choices=["sample", "kmeans"], default="sample")
    g.add_argument("--switch-codes", choices=["unit", "raw"], default="unit",
                   help="what the switch stores: the l2-normalised embeddings (ours) or the raw ones (what the "
                        "paper's Table 7 Euclidean 6.48 implies); the search normalises both")

    g = p.add_argument_group("tokenizer training (LlamaGen vq_train.py)")
    g.add_argument("--epochs", type=int, default=40, help="TOTAL epochs, both phases (paper deferred: 45)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--lpips-weight", type=float, default=1.0, help="LPIPS (VGG) weight; 0 needs no weights")
    g.add_argument("--gan-weight", type=float, default=0.5, help="PatchGAN hinge weight (0: no GAN)")
    g.add_argument("--gan-start", type=int, default=20000, help="Discretization-Phase steps before the GAN starts")
    g.add_argument("--disc-layers", type=int, default=3)
    g.add_argument("--disc-ndf", type=int, default=64)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=5000)

    g = p.add_argument_group("evaluation, codes, sampling")
    g.add_argument("--tokenizer-checkpoint", help="default <out>/<arm>/tokenizer/last.pt; a LlamaGen vq_ds16_c2i.pt works")
    g.add_argument("--eval-batch-size", type=int, default=32, help="images per process")
    g.add_argument("--fid-batch-size", type=int, default=64)
    g.add_argument("--skip-fid", action="store_true", help="no r-FID / g-FID (the JSON notes why)")
    g.add_argument("--skip-isc", action="store_true", help="no Inception Score (needs Inception logits)")
    g.add_argument("--fid-reference", help="sample-eval: image folder or .npz (VIRTUAL_imagenet256_labeled.npz)")
    g.add_argument("--crop-ranges", type=comma_separated(float), default=(1.1, 1.05),
                   help="tokens: ten-crops of centre crops this much larger than --resolution (LlamaGen: 1.1, 1.05)")
    g.add_argument("--tokens", help="gpt: code file (default <out>/<arm>/tokens_train.pt; a common token dump works)")
    g.add_argument("--samples", help="sample-eval: .npz to score (default <out>/<arm>/samples.npz)")

    g = p.add_argument_group("LlamaGen-B (train_c2i.py, sample_c2i_ddp.py)")
    g.add_argument("--gpt-layers", type=int, default=12)
    g.add_argument("--gpt-dim", type=int, default=768)
    g.add_argument("--gpt-heads", type=int, default=12)
    g.add_argument("--gpt-dropout", type=float, default=0.1, help="token, residual and FFN dropout")
    g.add_argument("--class-dropout", type=float, default=0.1, help="label -> null class probability (CFG)")
    g.add_argument("--gpt-epochs", type=int, default=300)
    g.add_argument("--gpt-batch-size", type=int, default=256, help="global batch")
    g.add_argument("--gpt-lr", type=float, default=1e-4)
    g.add_argument("--gpt-weight-decay", type=float, default=0.05)
    g.add_argument("--gpt-checkpoint", help="sample: default <out>/<arm>/gpt/last.pt; LlamaGen's c2i_B_256.pt works")
    g.add_argument("--num-samples", type=int, default=50000)
    g.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="random: uniform classes (LlamaGen); balanced: every class its share")
    g.add_argument("--cfg-scale", type=float, default=1.0,
                   help="guidance w of c + w (c - u), as in the other generators (0: conditional only); LlamaGen's "
                        "s = 1 + w (default: its 2.0)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="0 or 1: off (as generator_var.py)")
    common.add_run_arguments(p, out_default="runs/llamagen")
    return p


def main(args):
    info = common.setup_distributed(args.device, args.dist_timeout)
    if args.stage in ("tokenizer", "tokenizer-eval", "tokens") and not args.data_dir:
        raise UserError(f"--stage {args.stage} needs --data-dir (ImageNet with train/ and val/)")
    {"tokenizer": train_tokenizer, "tokenizer-eval": evaluate_tokenizer, "tokens": extract_tokens,
     "gpt": train_gpt, "sample": generate_samples, "sample-eval": evaluate_samples}[args.stage](args, info)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_cli(main, build_parser())
