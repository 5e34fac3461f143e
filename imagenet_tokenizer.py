"""ImageNet-100 / ODIR image tokenizers with and without Deferred Quantization (paper sections
6.1-6.3, appendix A.1, A.6, A.7): Tables 2, 3, 5, 15, 16 and the tokenizer columns of Table 17.

Two tokenizers share one VQGAN-style encoder/decoder (128x128 input, backbone width 64, three
downsamplings so the latent grid is 16x16, codebook 16,384):
  --quantizer vq     single-scale VQ, the MaskGIT tokenizer;
  --quantizer msvq   VAR's multi-scale residual quantizer (scales 1..16, shared codebook, phi convs).
Loss: MSE + LPIPS + codebook + beta * commitment (section 6), optionally + PatchGAN hinge loss with
taming's adaptive weight (appendix A.6, --gan-weight > 0).

Recipe (section 6.1). With --deferred the autoencoder first trains --continuous-epochs (paper 200)
epochs with the quantizer off (Continuous Phase); then the codebook is initialised from 2 x 16,384
encoder embeddings (--ratio 2) and quantization turns on (Discretization Phase). The baseline makes
the same switch at step 0 with the untrained encoder. --epochs is the total of both phases, a cap:
in the Discretization Phase ReduceLROnPlateau halves the lr when the validation loss has not improved
for 20 epochs (1e-4 -> 1e-7) and training stops early once the lr sits at its minimum with no
improvement for --patience epochs. best.pt is the checkpoint with the best validation r-FID
(--select-by val_loss where the Inception weights are absent); last.pt is the latest one; the JSON
reports best.pt on ImageNet-100 and last.pt on ODIR (appendix A.1).

Commands
    # CPU smoke run (tiny model, a few steps, no pretrained weights needed)
    python imagenet_tokenizer.py --data-dir tiny_imagefolder --test-size 8 --val-size 8 \
        --resolution 32 --ch 8 --ch-mult 1,2,2 --num-res-blocks 1 --attn-resolutions 8 \
        --z-channels 8 --token-dim 8 --codebook-size 32 --scales 1,2,4,8 --epochs 2 \
        --continuous-epochs 1 --deferred --lpips-weight 0 --skip-lpips --skip-fid \
        --select-by val_loss --num-workers 0 --out runs/smoke

    # real images on a CPU: Fashion-MNIST (apt-get install dataset-fashion-mnist), 28 -> 32 zero
    # padding, 8x8 tokens; ~14 min per arm on 2 quiet cores (~37 min with other jobs running);
    # the baseline is the same command without --deferred --continuous-epochs 4
    python imagenet_tokenizer.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --ch 16 --ch-mult 1,2,2 --num-res-blocks 1 --attn-resolutions '' --z-channels 16 --token-dim 8 \
        --codebook-size 4096 --batch-size 64 --lr 1e-3 --min-lr 1e-5 --lr-schedule cosine --epochs 12 \
        --max-steps-per-epoch 250 --select-by val_loss --fid-images 1000 --num-workers 0 --device cpu \
        --deferred --continuous-epochs 4 --out results/fashion_tokenizer

    # one GPU, paper configuration (MaskGIT tokenizer, Deferred Quantization, ImageNet-100)
    python imagenet_tokenizer.py --data-dir /data/imagenet100 --scheme imagenet100 \
        --split-file runs/in100/split.json --quantizer vq --deferred --out runs/in100

    # the documented launch: two GPUs (paper: 2 x A100 40 GB); --batch-size is global
    torchrun --nproc_per_node=2 imagenet_tokenizer.py --data-dir /data/imagenet100 \
        --split-file runs/in100/split.json --quantizer msvq --deferred --simvq --out runs/in100

    # evaluate a checkpoint on the test split; dump the test tokens for the generator scripts
    python imagenet_tokenizer.py --eval-only --checkpoint runs/in100/vq_deferred_imagenet100/best.pt ...
    python imagenet_tokenizer.py --dump-tokens train --checkpoint runs/in100/vq_deferred_imagenet100/best.pt ...

Runs per table (add --deferred for the ✓ rows; 2 GPUs each; ImageNet-100 needs the Inception and
LPIPS weights in $TORCH_HOME/hub/checkpoints):
    Table 3   --scheme imagenet100 --quantizer vq | msvq                       (4 runs)
    Table 2   Table 3's msvq runs, plus --quantizer msvq --simvq               (2 more runs)
    Table 5   --scheme odir --quantizer msvq                                   (2 runs)
    Table 15  --scheme imagenet100 --quantizer vq | msvq --gan-weight 0.5 --gan-start 20000 (4 runs)
    Table 16  --scheme odir --quantizer msvq --gan-weight 0.5 --gan-start 20000 (2 runs)
    Table 17  --scheme odir --quantizer vq [--gan-weight 0.5 --gan-start 20000] (4 runs)
then `python evaluate.py tables <out>` (runs that differ only in --seed are averaged; runs that
differ in a run-defining setting get their own row). The GAN weight / start are LlamaGen's.

Choices the paper leaves open (documented here and recorded in the JSON args):
  * Learning-rate schedule: section 6.1 (the tables) uses ReduceLROnPlateau, the default here.
    Appendix A.1 says the tokenizers were trained with ReduceLROnPlateau *and* cosine annealing and
    gives a minimum lr of 1e-6 (section 6.1: 1e-7). --lr-schedule cosine anneals from --lr to
    --min-lr over the Discretization epochs (epochs - continuous epochs), once per epoch, and runs
    to --epochs (the schedule fixes the length: no early stopping). Both phases start at --lr; the
    Continuous Phase keeps it constant.
  * SimVQ (Table 2, --simvq): SimVQ as published (Zhu et al. 2025; youngsheen/SimVQ): a frozen
    codebook drawn N(0, 1/dim) seen through a learned linear layer in torch's default init. The
    "+ SimVQ" baseline starts from that random codebook (its switch at step 0 only turns the
    quantizer on: SimVQ does not initialise from data). Only the deferred arm starts from encoder
    embeddings: at its switch the frozen codebook is set to them and the layer to the identity,
    so its initial codes are the embeddings exactly, as without SimVQ (common.VectorQuantizer).
  * --batch-size is global (all ranks together) and must divide by the number of processes; the
    paper does not state it: 64 = 32 per GPU on its 2 GPUs. --token-dim 32 is VAR's (not stated).
  * The Adam betas (0.5, 0.9) are taming's VQGAN setting (not stated).

Outputs (rank 0): <out>/<name>.json (metrics on the test split, per-epoch history with "phase":
"continuous" | "discretization"), <out>/<name>.pt (the evaluated checkpoint with `codebook` and
`code_counts` for `python evaluate.py codebook`), <out>/<name>_recon.png (the first 32 test images,
each row of originals above its reconstructions), <out>/<name>/{best,last}.pt,
<out>/<name>/tokens_<split>.pt; --eval-split val|train writes <out>/<name>_<split>.json, .pt and
_recon.png instead. --eval-only and --dump-tokens use the split file recorded in the checkpoint unless
--split-file is given.

Start-up (common.start_run): every number is checked before any training (a codebook larger than
the embeddings the training split can give at --ratio is refused at start, not at the switch), the
data, the split file and the metric weights are checked, the run's lock <out>/<name>.lock is taken,
and none of the run's files (JSON, .pt, checkpoints, token dumps) is overwritten without --resume;
--resume refuses a checkpoint made with other run-defining settings (DEFINING). An evaluation or
token dump never replaces an earlier one: delete the file to redo it. best.pt is written before
last.pt, so no kill can make a resumed run report another checkpoint than an uninterrupted one.
Pretrained weights needed (no download happens): LPIPS's AlexNet backbone
($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth) unless --lpips-weight 0 and --skip-lpips,
and torch-fidelity's Inception weights unless --skip-fid.
"""
import argparse
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset

import common
from common import UserError, int_list, print0

EXPERIMENT = "imagenet_tokenizer"
QUANTIZER_KEYS = ("quantizer", "codebook_size", "token_dim", "beta", "ema_decay", "simvq", "scales",
                  "num_phi", "phi_ratio")
# What a checkpoint fixes: --eval-only / --dump-tokens take these from it.
IDENTITY_KEYS = common.TOKENIZER_ARCH_KEYS + QUANTIZER_KEYS + ("deferred", "gan_weight", "scheme", "seed")
# Settings that define a run: --resume refuses a checkpoint made under other values (and with
# --lr-schedule cosine also --epochs, which sets the schedule's length).
DEFINING = IDENTITY_KEYS + ("dataset", "split_file", "continuous_epochs", "ratio", "init_method", "lr", "min_lr",
                            "lr_schedule", "plateau_patience", "plateau_factor", "batch_size", "lpips_weight",
                            "gan_start", "disc_layers", "select_by", "fid_every", "fid_images",
                            "max_steps_per_epoch", "train_augment")
RANGES = {
    "test_size": ">= 1", "val_size": ">= 1", "resolution": ">= 1", "batch_size": ">= 1",
    "num_workers": ">= 0", "ch": ">= 1", "ch_mult": ">= 1", "num_res_blocks": ">= 1",
    "attn_resolutions": ">= 1", "z_channels": ">= 1", "token_dim": ">= 1", "codebook_size": ">= 1",
    "beta": ">= 0", "ema_decay": "(0, 1)", "scales": ">= 1", "num_phi": ">= 1", "phi_ratio": "[0, 1]",
    "continuous_epochs": ">= 0", "ratio": ">= 1", "lr": "> 0", "min_lr": ">= 0", "plateau_patience": ">= 0",
    "plateau_factor": "(0, 1)", "patience": ">= 1", "epochs": ">= 1", "max_steps_per_epoch": ">= 0",
    "lpips_weight": ">= 0", "gan_weight": ">= 0", "gan_start": ">= 0", "disc_layers": ">= 1",
    "seed": ">= 0", "fid_every": ">= 1", "fid_batch_size": ">= 1", "fid_images": ">= 0",
}
# Phase names: "continuous" / "discretization" in JSON, the paper's words in logs.
CONTINUOUS, DISCRETIZATION = "continuous", "discretization"
PHASE_TITLES = {CONTINUOUS: "Continuous Phase", DISCRETIZATION: "Discretization Phase"}
# --test-size / --val-size of a scheme that takes sizes (odir takes the paper's fractions;
# Fashion-MNIST's test set is the official one).
SCHEME_SIZES = {"imagenet100": {"test": 20000, "val": 5000}, common.FASHION_MNIST_SCHEME: {"val": 5000}}
# Per dataset: the default --scheme and --resolution (Fashion-MNIST: 28x28 zero-padded to 32).
DATASET_DEFAULTS = {"imagefolder": {"scheme": "imagenet100", "resolution": 128},
                    common.FASHION_MNIST_SCHEME: {"scheme": common.FASHION_MNIST_SCHEME, "resolution": 32}}


def method_name(args):
    name = f"{args.quantizer}_{'deferred' if args.deferred else 'baseline'}"
    return name + ("_simvq" if args.simvq else "")


def run_name(args):
    """--name, else <method>_<scheme>[_gan][_s<seed> for seeds other than 0]."""
    suffix = ("_gan" if args.gan_weight > 0 else "") + (f"_s{args.seed}" if args.seed else "")
    return args.name or f"{method_name(args)}_{args.scheme}{suffix}"


# What an evaluation writes: <stem>.json (metrics), <stem>.pt (codebook, counts), <stem>_recon.png.
RESULT_FILES = (".json", ".pt", "_recon.png")


def result_stem(name, split):
    """<name> for the test split (what the tables read), <name>_<split> otherwise."""
    return name if split == "test" else f"{name}_{split}"


@dataclass
class RunPaths:
    """Every file of one run inside --out."""
    out: str
    name: str

    @property
    def folder(self):
        return os.path.join(self.out, self.name)

    @property
    def last(self):
        return os.path.join(self.folder, "last.pt")

    @property
    def best(self):
        return os.path.join(self.folder, "best.pt")

    def result(self, split, ext):
        return os.path.join(self.out, result_stem(self.name, split) + ext)

    def tokens(self, split):
        return os.path.join(self.folder, f"tokens_{split}.pt")

    def all(self):
        return ([self.last, self.best] + [self.result(s, e) for s in common.SPLIT_PARTS for e in RESULT_FILES]
                + [self.tokens(s) for s in common.SPLIT_PARTS])


# ------------------------------------------------------------------------------------------------
# Data: the split file and the three datasets
# ------------------------------------------------------------------------------------------------


def latent_grid(args):
    """Side of the latent grid: one halving per ch_mult level after the first."""
    return args.resolution // 2 ** (len(args.ch_mult) - 1)


def expected_sizes(args):
    """The part sizes this run asks for ({} where the scheme fixes them)."""
    return {part: getattr(args, f"{part}_size") for part in ("test", "val")
            if getattr(args, f"{part}_size") is not None}


def check_split(split, args, path):
    """An existing split file must belong to this scheme, to the data of --data-dir (a split of
    another ImageFolder tree would fail at its first missing image, or silently mix test images
    into training where file names coincide; a Fashion-MNIST split must cover the files' images),
    and to the requested --test-size / --val-size (the JSON would otherwise state sizes that were
    not used)."""
    if split["scheme"] != args.scheme:
        raise UserError(f"{path} is a '{split['scheme']}' split, not '{args.scheme}'")
    if args.dataset == common.FASHION_MNIST_SCHEME:
        counts = {name: len(common.load_fashion_mnist(args.data_dir, train=name == "train")[1])
                  for name in ("train", "test")}
        sizes = split["sizes"]
        if (sizes["train"] + sizes["val"], sizes["test"]) != (counts["train"], counts["test"]):
            raise UserError(f"{path} splits {sizes['train'] + sizes['val']} training and {sizes['test']} test "
                            f"images, but {args.data_dir} holds {counts['train']} and {counts['test']}")
    elif split["classes"] != common.scan_image_folder(args.data_dir)[0]:
        raise UserError(f"{path} was made from {split['root']}, whose classes differ from those of "
                        f"--data-dir {args.data_dir}")
    for part, size in expected_sizes(args).items():
        if split["sizes"][part] != size:
            raise UserError(f"{path} has {split['sizes'][part]} {part} images, not --{part}-size {size}: "
                            "pass the sizes it was made with, or another --split-file")


def prepare_split(args, create):
    """The split of this run, on rank 0 before anything is written: the existing --split-file,
    checked, or (with `create`) a new one computed in memory. Returns (split, is_new)."""
    path = args.split_file
    if os.path.exists(path) or not create:
        if not os.path.exists(path):
            raise UserError(f"split file not found: {path} (pass the run's --split-file)")
        split = common.load_split(path)
        check_split(split, args, path)
        return split, False
    if args.dataset == common.FASHION_MNIST_SCHEME:
        return common.make_fashion_mnist_split(args.data_dir, args.seed, args.val_size, download=args.download), True
    split = common.make_split(args.data_dir, scheme=args.scheme, seed=args.seed, out_path=None,
                              test_size=args.test_size, val_size=args.val_size)
    return split, True


def check_codebook_fits(args, num_train, world_size):
    """The switch collects ratio x codebook-size embeddings (grid^2 per image, every rank its share
    of one pass over the training split): refuse at start what would fail after the Continuous
    Phase. The SimVQ baseline starts from its random codebook and collects none."""
    if args.simvq and not args.deferred:
        return
    per_rank_needed = math.ceil(math.ceil(args.ratio * args.codebook_size) / world_size)
    per_rank_available = num_train // world_size * latent_grid(args) ** 2
    if per_rank_needed > per_rank_available:
        raise UserError(
            f"--codebook-size {args.codebook_size} at --ratio {args.ratio:g} needs "
            f"{per_rank_needed * world_size} embeddings, but the {num_train} training images give "
            f"{per_rank_available * world_size} ({latent_grid(args)}x{latent_grid(args)} per image): "
            "use fewer codes, a lower --ratio or more data")


def share_split(new_split, args):
    """Rank 0 writes a newly computed split (`new_split`; None: the file exists) unless another
    run wrote the file meanwhile (then theirs is checked and used). Call it on every rank: all
    ranks wait for the file (and share a refusal)."""
    def write():
        if new_split is not None and common.write_split(new_split, args.split_file) != new_split:
            check_split(common.load_split(args.split_file), args, args.split_file)
    common.agree_on_main(write)


def make_datasets(args):
    """train / val / test of the run's split file (common.tokenizer_datasets: the one definition
    the generator scripts use too)."""
    return common.tokenizer_datasets(vars(args), train_augment=args.train_augment)


def shard(dataset, info):
    """This rank's share of an evaluation split: every world_size-th image, no padding, so each
    image is counted exactly once in all-reduced sums."""
    return Subset(dataset, range(info.rank, len(dataset), info.world_size))


def rank_batch(args, info):
    """This process's share of the global --batch-size."""
    return args.batch_size // info.world_size


def loader(dataset, args, info, shuffle_sampler=None):
    return DataLoader(dataset, batch_size=rank_batch(args, info), sampler=shuffle_sampler, shuffle=False,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def load_tokenizer_checkpoint(path):
    """A checkpoint of this script (one-line refusal of anything else, e.g. a CIFAR checkpoint)."""
    ckpt = common.load_checkpoint(path)
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    missing = [k for k in IDENTITY_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing or "model" not in ckpt:
        raise UserError(f"{path} is not an {EXPERIMENT} checkpoint (no "
                        f"{'args ' + missing[0] if missing else 'model'} in it)")
    return ckpt


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def reconstruction_loss(x, recon, lpips_fn, lpips_weight):
    """MSE + lpips_weight * LPIPS (section 6: L_MSE + L_LPIPS), both on [0, 1] images."""
    loss = F.mse_loss(recon.float(), x.float())
    if lpips_fn is not None and lpips_weight > 0:
        loss = loss + lpips_weight * lpips_fn(recon.float(), x.float()).mean()
    return loss


def batch_sum(value, batch):
    """Sum over a batch of a metric that may come back per image (B,) or as the batch mean."""
    value = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    return value.sum() if value.numel() == batch else value.mean() * batch


def count_usage(counter, indices):
    """Usage over every index map (one for vq, one per scale for msvq)."""
    for idx in indices if isinstance(indices, list) else [indices]:
        counter.update(idx)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset, args, info, lpips_fn, fid_dir=None, metrics_wanted=True):
    """Reconstruct one split: loss, MSE / PSNR / SSIM / LPIPS means, usage over the whole split
    (all ranks), and r-FID of reconstructions vs originals (PNG folders written by every rank
    into `fid_dir`, scored on rank 0). Returns a dict (values identical on every rank)."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    device = info.device
    counter = common.UsageCounter(net.quantizer.num_codes, device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # n, loss, mse, psnr, ssim, lpips
    subset = shard(dataset, info)
    if fid_dir and info.is_main:
        shutil.rmtree(fid_dir, ignore_errors=True)
    if fid_dir and common.is_distributed():
        torch.distributed.barrier()
    keep = common.fid_subset(dataset.items, args.fid_images)  # None: every image
    keep = None if keep is None else set(keep)
    for b, (x, _) in enumerate(common.progress_bar(loader(subset, args, info), desc="evaluate", leave=False)):
        x = x.to(device, non_blocking=True)
        recon, indices, vq_loss = net(x)  # float32: bf16 rounding would show in MSE ~1e-4
        n = x.shape[0]
        use_lpips = lpips_fn is not None and (metrics_wanted or args.lpips_weight > 0)
        perceptual = lpips_fn(recon.clamp(0, 1), x).reshape(-1).float() if use_lpips else None
        loss = F.mse_loss(recon, x) + vq_loss
        if perceptual is not None and args.lpips_weight > 0:
            loss = loss + args.lpips_weight * perceptual.mean()
        sums[0] += n
        sums[1] += loss.double() * n
        if metrics_wanted:
            clamped = recon.clamp(0, 1)
            sums[2] += batch_sum(common.mse(clamped, x), n)
            sums[3] += batch_sum(common.psnr(clamped, x, data_range=1.0), n)
            sums[4] += batch_sum(common.ssim(clamped, x, data_range=1.0), n)
            if perceptual is not None:
                sums[5] += perceptual.double().sum()
        if indices is not None:
            count_usage(counter, indices)
        if fid_dir:
            write_pngs(fid_dir, recon, x, start=info.rank + b * args.batch_size, stride=info.world_size, keep=keep)
    common.all_reduce_sum(sums)
    counter.all_reduce()
    n = max(sums[0].item(), 1.0)
    out = {"loss": sums[1].item() / n, "num_images": int(sums[0].item()), "counts": counter.counts.cpu()}
    if metrics_wanted:
        out.update(mse=sums[2].item() / n, psnr=sums[3].item() / n, ssim=sums[4].item() / n,
                   lpips=sums[5].item() / n if lpips_fn is not None else None)
    if fid_dir:
        out["rfid"] = score_fid(fid_dir, args, device)
    net.train()
    return out


def write_pngs(folder, recon, x, start, stride, keep=None):
    """Reconstruction i and its original under the same global file name in two folders, for the
    images whose global index is in `keep` (the --fid-images subset, common.fid_subset; None: all)."""
    for sub, images in (("recon", recon), ("real", x)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for j, img in enumerate(common.to_uint8(images).cpu()):
            if keep is None or start + j * stride in keep:
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                    os.path.join(folder, sub, f"{start + j * stride:07d}.png"))


def score_fid(folder, args, device):
    """r-FID between the reconstruction and original PNG folders (rank 0), shared with all ranks."""
    if common.is_distributed():
        torch.distributed.barrier()
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if common.is_main_process():
        res = common.fidelity_metrics(os.path.join(folder, "recon"), os.path.join(folder, "real"),
                                      fid=True, batch_size=args.fid_batch_size, num_workers=args.num_workers)
        value[0] = res["fid"]
        shutil.rmtree(folder, ignore_errors=True)
    return common.broadcast_from_main(value).item()


def final_report(model, dataset, args, info, lpips_fn, paths, ckpt_path, history, status, switch=None):
    """Evaluate on one split and write <out>/<stem>.json and <out>/<stem>.pt (codebook + counts, and
    `switch`: the evaluated checkpoint's `switch_sample`), stem = name for the test split (what the
    tables read), name_<split> otherwise, so that an evaluation on val or train never replaces the
    test result. The metrics carry the spreads at the switch beside the final ones. `status`: the
    checkpoint's common.model_status (whether its training finished), stated in the JSON."""
    fid_dir = None if args.skip_fid else os.path.join(paths.folder, f"fid_{args.eval_split}")
    res = evaluate(model, dataset, args, info, lpips_fn, fid_dir=fid_dir)
    codebook = model.quantizer.codebook.detach().float().cpu()
    metrics = common.codebook_metrics(codebook, res["counts"])
    metrics.update({k: res[k] for k in ("mse", "psnr", "ssim", "lpips")},
                   rfid=res.get("rfid"), eval_loss=res["loss"], num_images=res["num_images"])
    metrics.update(common.switch_spreads(history))
    notes = {}
    if args.skip_fid:
        notes["rfid"] = "not computed: --skip-fid (the Inception weights were not available)"
    if lpips_fn is None:
        notes["lpips"] = "not computed: --skip-lpips (the LPIPS AlexNet weights were not available)"
    if common.unfinished_note(status):
        notes["model_finished"] = common.unfinished_note(status)
    subset = common.fid_subset(dataset.items, args.fid_images)
    fid_reference = (f"{args.eval_split} split originals, {len(dataset) if subset is None else len(subset)} images"
                     + ("" if subset is None else f", a class-stratified subset (seed {common.FID_SUBSET_SEED})")
                     + " (r-FID: their reconstructions vs them)")
    if info.is_main:
        common.write_result(paths.result(args.eval_split, ".json"), EXPERIMENT, method_name(args), args,
                            metrics, history, **status, eval_split=args.eval_split,
                            checkpoint=os.path.abspath(ckpt_path), data_range=1.0, notes=notes,
                            fid_reference=fid_reference,
                            fid_reference_subset=common.fid_subset_record(dataset.items, subset))
        common.save_checkpoint(paths.result(args.eval_split, ".pt"), model=model.state_dict(), args=vars(args),
                               codebook=codebook, code_counts=res["counts"].float(), metrics=metrics, **(switch or {}))
        common.write_png(paths.result(args.eval_split, "_recon.png"), reconstruction_sheet(model, dataset, info))
    print0({k: v for k, v in metrics.items()})
    return metrics


@torch.no_grad()
def reconstruction_sheet(model, dataset, info, columns=16, rows=2):
    """The first rows x columns images of a split, each row of originals above its reconstructions,
    as one uint8 (3, 2 * rows * H, columns * W) image: what "visibly good" means, at a glance."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    x = torch.stack([dataset[i][0] for i in range(min(len(dataset), rows * columns))])
    recon = net(x.to(info.device))[0].clamp(0, 1).cpu()
    pad = rows * columns - x.shape[0]
    pairs = [torch.cat([t, torch.ones(pad, *t.shape[1:])]).reshape(rows, columns, *t.shape[1:]) for t in (x, recon)]
    sheet = torch.stack(pairs, 1).reshape(2 * rows, columns, *x.shape[1:])  # original row, its reconstruction
    c, h, w = x.shape[1:]
    return common.to_uint8(sheet.permute(2, 0, 3, 1, 4).reshape(c, 2 * rows * h, columns * w))


@torch.no_grad()
def dump_tokens(model, dataset, args, info, ckpt_path, out_path):
    """Token indices of every image of a split, in split order, in the record of
    common.token_dump_record: vq -> (N, h, w) tensor; msvq -> list of (N, s, s) tensors; int16 when
    the codebook fits, else int32; plus labels, the number of classes of the split file (the
    generators' class embedding) and the provenance the generators check: the split's part and
    digest, the tokenizer's fingerprint. The training split
    (unless --dump-plain) holds the 10 augmented views of every image (common.augmented_views,
    view 0 the plain image): maps (N, 10, h, w) / (N, 10, s, s), "views" and "view_names" in the
    record; the generators draw one view per image per epoch (common.epoch_views)."""
    net = model.module if hasattr(model, "module") else model
    fingerprint = common.tokenizer_fingerprint(net, vars(args))
    net.eval()
    views = len(common.VIEW_NAMES) if args.dump_tokens == "train" and not args.dump_plain else 1
    if views > 1:
        dataset = common.AugmentedViews(dataset)
    rows = []
    subset = shard(dataset, info)
    for b, (x, y) in enumerate(common.progress_bar(loader(subset, args, info), desc="tokens", leave=False)):
        n = x.shape[0]
        z_q, indices, _ = net.quantizer(net.encode((x.flatten(0, 1) if views > 1 else x).to(info.device)))
        maps = indices if isinstance(indices, list) else [indices]
        order = torch.arange(n) * info.world_size + info.rank + b * args.batch_size
        rows.append(torch.cat([order[:, None], y[:, None].long()] + [m.reshape(n, -1).cpu() for m in maps], 1))
    local = torch.cat(rows).to(info.device)
    table = common.all_gather_rows(local).cpu()
    table = table[table[:, 0].argsort()]
    sizes = [m.shape[-1] for m in maps]
    flat, col = [], 2
    for s in sizes:
        flat.append(table[:, col:col + views * s * s].reshape((-1, s, s) if views == 1 else (-1, views, s, s)))
        col += views * s * s
    record = common.token_dump_record(flat, table[:, 1], quantizer=args.quantizer, codebook_size=net.quantizer.num_codes,
                                      part=args.dump_tokens, split_file=args.split_file, ckpt_path=ckpt_path,
                                      fingerprint=fingerprint, views=views)
    if info.is_main:
        common.atomic_write(out_path, lambda f: torch.save(record, f))
    return record


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class CosineSchedule:
    """Appendix A.1's alternative to ReduceLROnPlateau: the lr follows half a cosine from `lr` to
    `min_lr` over `epochs` Discretization epochs, one step per epoch, and then stays at `min_lr`.
    Same interface as common.PlateauSchedule (`lr`, `stopped`, `step(val_loss)` -> improved,
    state_dict); it never stops early: its length is the schedule."""

    def __init__(self, lr, min_lr, epochs):
        self.base_lr, self.min_lr, self.epochs = lr, min_lr, epochs
        self.lr, self.done, self.best, self.stopped = lr, 0, math.inf, False

    def step(self, val_loss):
        self.done += 1
        self.lr = common.cosine_lr(self.base_lr, self.min_lr, self.done, self.epochs)
        improved = val_loss < self.best
        self.best = min(self.best, val_loss)
        return improved

    def state_dict(self):
        return {k: getattr(self, k) for k in ("lr", "done", "best", "stopped")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def continuous_epochs(args):
    """Epochs before the switch: --continuous-epochs for the deferred arm, 0 for the baseline."""
    return args.continuous_epochs if args.deferred else 0


def make_schedule(args):
    """The Discretization Phase's lr schedule (section 6.1 / appendix A.1)."""
    if args.lr_schedule == "cosine":
        return CosineSchedule(args.lr, args.min_lr, args.epochs - continuous_epochs(args))
    return common.PlateauSchedule(args.lr, factor=args.plateau_factor, patience=args.plateau_patience,
                                  min_lr=args.min_lr, stop_patience=args.patience)


@dataclass
class Trainer:
    """What one training run holds: the model (and its DDP wrapper), the optional discriminator,
    the optimizers, the lr schedule and the resumable `state`."""
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    disc: torch.nn.Module
    ddp_disc: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    schedule: object
    lpips_fn: object
    state: dict

    def checkpoint(self, args):
        blob = dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                    schedule=self.schedule.state_dict(), state=self.state, epoch=self.state["epoch"],
                    step=self.state["discretization_steps"], args=vars(args), experiment=EXPERIMENT,
                    finished=bool(self.schedule.stopped or self.state["epoch"] >= args.epochs),
                    history=self.state["history"], codebook=self.model.quantizer.codebook.detach().float().cpu(),
                    **switch_sample(self.state))
        if self.disc is not None:
            blob.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        return blob


def make_trainer(args, info, model, lpips_fn, resumed):
    """Optimizers (Adam, betas (0.5, 0.9) as taming's VQGAN), schedule and state, fresh or from
    the --resume checkpoint."""
    disc = common.PatchDiscriminator(n_layers=args.disc_layers).to(info.device) if args.gan_weight > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    schedule = make_schedule(args)
    state = {"epoch": 0, "discretization_steps": 0, "best_select": math.inf, "history": []}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        if disc is not None:
            disc.load_state_dict(resumed["disc"])
            opt_d.load_state_dict(resumed["disc_optimizer"])
        state = resumed["state"]
        common.set_rng_state(resumed["rng"])
        print0(f"resumed at epoch {state['epoch']}")
    # A gradient codebook (and the msvq phi convs) sit unused in the Continuous Phase.
    return Trainer(model, common.wrap_ddp(model, info, find_unused_parameters=True), disc,
                   common.wrap_ddp(disc, info) if disc is not None else None, opt, opt_d, schedule, lpips_fn, state)


def switch_sample(state):
    """What a checkpoint keeps of the switch (none for the SimVQ baseline): a seeded sample of the
    encoder outputs the codebook was drawn from and the fresh codebook, for `evaluate.py codebook
    --plot` (paper Figure 3 on real images)."""
    return {k: state[k] for k in ("switch_embeddings", "switch_codebook") if k in state}


def switch_to_discretization(t, train_loader, sampler, args, info, epoch):
    """The switch (section 5). Baseline: epoch 0, untrained encoder. Deferred: after the Continuous
    Phase. Embeddings are the encoder outputs on the latent grid (for msvq: the finest scale). The
    SimVQ baseline keeps SimVQ's random frozen codebook: its switch only turns quantization on.
    Returns what the checkpoints keep of it (`switch_sample`: {} for the SimVQ baseline)."""
    quantizer = t.model.quantizer
    if args.simvq and not args.deferred:
        quantizer.set_enabled(True)
        print0(f"epoch {epoch}: {PHASE_TITLES[DISCRETIZATION]}: SimVQ's random codebook, quantization on")
        return {}
    sampler.set_epoch(10**6 + epoch)  # its own data order, independent of the epochs
    t.model.eval()
    kept = {}
    n = common.deferred_switch(quantizer, lambda batch: t.model.encode(batch[0].to(info.device)),
                               train_loader, args.ratio, args.init_method, args.seed, progress=True, keep=kept)
    t.model.train()
    print0(f"epoch {epoch}: {PHASE_TITLES[DISCRETIZATION]}: codebook initialised from {n} embeddings per rank; "
           "quantization on")
    return {"switch_embeddings": kept["embeddings"],
            "switch_codebook": quantizer.codebook.detach().float().cpu().clone()}


def train_epoch(t, train_loader, args, info, epoch, phase):
    """One pass over the training split; returns the mean train loss and reconstruction loss."""
    t.model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # steps, loss, rec
    for step, (x, _) in enumerate(common.progress_bar(train_loader, desc=f"epoch {epoch} ({PHASE_TITLES[phase]})")):
        if args.max_steps_per_epoch and step >= args.max_steps_per_epoch:
            break
        x = x.to(info.device, non_blocking=True)
        gan_on = (t.disc is not None and phase == DISCRETIZATION
                  and t.state["discretization_steps"] >= args.gan_start)
        with common.autocast_for(info.device):
            recon, _, vq_loss = t.ddp_model(x)
            recon = recon.float()
            rec = reconstruction_loss(x, recon, t.lpips_fn, args.lpips_weight)
            loss = rec + vq_loss
            if gan_on:
                t.disc.requires_grad_(False)
                g_loss = -t.disc(recon).mean()
                t.disc.requires_grad_(True)
                loss = loss + args.gan_weight * common.adaptive_gan_weight(rec, g_loss, t.model.last_layer) * g_loss
        common.check_finite(loss, f"epoch {epoch} step {step}")
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.opt.step()
        if gan_on:
            with common.autocast_for(info.device):
                d_loss = common.hinge_d_loss(t.ddp_disc(x), t.ddp_disc(recon.detach()))
            t.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            t.opt_d.step()
        if phase == DISCRETIZATION:
            t.state["discretization_steps"] += 1
        sums += torch.stack([torch.ones((), dtype=torch.float64, device=info.device),
                             loss.detach().double(), rec.detach().double()])
    common.all_reduce_sum(sums)
    return {"train_loss": (sums[1] / sums[0].clamp(min=1)).item(),
            "train_rec": (sums[2] / sums[0].clamp(min=1)).item()}


def fit(t, data, args, info, paths):
    """Continuous Phase (deferred arm), the switch, Discretization Phase; one validation and one
    checkpoint pair per epoch (best.pt before last.pt: `common.save_checkpoints`)."""
    switch_epoch = continuous_epochs(args)
    sampler = DistributedSampler(data["train"], num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    train_loader = loader(data["train"], args, info, sampler)
    quantizer, state = t.model.quantizer, t.state
    while not t.schedule.stopped and state["epoch"] < args.epochs:
        epoch = state["epoch"]
        switched = {}
        if epoch >= switch_epoch and not quantizer.is_enabled:
            state.update(switch_to_discretization(t, train_loader, sampler, args, info, epoch))
            if "switch_codebook" in state:  # the spreads of Figure 3 where the switch happens
                switched = common.switch_record(state["switch_codebook"], state["switch_embeddings"])
        phase = DISCRETIZATION if quantizer.is_enabled else CONTINUOUS
        sampler.set_epoch(epoch)
        record = {"epoch": epoch, "phase": phase, "lr": t.opt.param_groups[0]["lr"], **switched}
        record.update(train_epoch(t, train_loader, args, info, epoch, phase))

        # Validation: loss every epoch; r-FID every --fid-every Discretization epochs for best.pt.
        want_fid = phase == DISCRETIZATION and args.select_by == "fid" and (epoch - switch_epoch) % args.fid_every == 0
        val = evaluate(t.ddp_model, data["val"], args, info, t.lpips_fn,
                       fid_dir=os.path.join(paths.folder, "fid_val") if want_fid else None, metrics_wanted=False)
        record["val_loss"] = val["loss"]
        if want_fid:
            record["val_rfid"] = val["rfid"]
        if phase == DISCRETIZATION:
            t.schedule.step(val["loss"])
            common.set_lr(t.opt, t.schedule.lr)
            record["val_perplexity"] = common.perplexity_from_counts(val["counts"])
        state["history"].append(record)
        state["epoch"] = epoch + 1
        print0(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

        score = val.get("rfid") if args.select_by == "fid" else val["loss"]
        improved = phase == DISCRETIZATION and score is not None and score < state["best_select"]
        if improved:
            state["best_select"] = score
        if info.is_main:
            common.save_checkpoints(paths.last, paths.best if improved else None, **t.checkpoint(args))
        if common.is_distributed():
            torch.distributed.barrier()


def default_report(args):
    """Paper appendix A.1: the best-validation-FID checkpoint on ImageNet-100, the final one on ODIR."""
    return "last" if args.scheme == "odir" else "best"


def train(args, info):
    """A training run under the start-up protocol, then the final evaluation of the reported checkpoint."""
    args.split_file = default_split_file(args)
    paths = RunPaths(args.out, run_name(args))
    found = {}

    def check_data():
        found["split"], is_new = prepare_split(args, create=True)
        found["new"] = found["split"] if is_new else None
        check_codebook_fits(args, found["split"]["sizes"]["train"], info.world_size)

    defining = DEFINING + (("epochs",) if args.lr_schedule == "cosine" else ())
    with common.start_run(args, name=paths.name, outputs=paths.all(), ranges=RANGES, defining=defining,
                          resume_from=paths.last, checks=weight_checks(args) + [check_data],
                          validate=lambda a: validate(a, info.world_size)) as run:
        share_split(found.get("new"), args)
        args.split_sha256 = common.split_fingerprint(common.load_split(args.split_file))  # for check_checkpoint_split
        data = make_datasets(args)
        common.seed_everything(args.seed)
        model = common.build_tokenizer(args).to(info.device)
        lpips_fn = load_lpips_if_needed(args, info)
        t = make_trainer(args, info, model, lpips_fn, run.checkpoint)
        fit(t, data, args, info, paths)
        report = paths.best if (args.report_checkpoint or default_report(args)) == "best" else paths.last
        if not os.path.exists(report):  # every validation score was NaN
            raise UserError(f"no Discretization epoch gave a finite --select-by {args.select_by} score: "
                            f"{report} was never written")
        if info.is_main:
            common.mark_finished(report)  # best.pt was written at an earlier epoch of the finished training
        if common.is_distributed():
            torch.distributed.barrier()
        ckpt = common.load_checkpoint(report)
        model.load_state_dict(ckpt["model"])
        final_report(model, data[args.eval_split], args, info, lpips_fn, paths, report, t.state["history"],
                     common.model_status(ckpt), switch_sample(ckpt))


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def default_split_file(args):
    return os.path.abspath(args.split_file or os.path.join(args.out, f"split_{args.scheme}.json"))


def resolve_data_defaults(args):
    """The dataset's --scheme and --resolution and the scheme's --test-size / --val-size where
    unset (all recorded in the JSON args); sizes a scheme fixes cannot be set."""
    fashion = args.dataset == common.FASHION_MNIST_SCHEME
    if fashion and args.scheme is not None:
        raise UserError("--scheme applies to --dataset imagefolder; Fashion-MNIST uses its official train/test "
                        "files with a validation set drawn from train")
    if args.download and not fashion:
        raise UserError("--download fetches Fashion-MNIST (--dataset fashion-mnist); an ImageFolder is yours")
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    defaults = SCHEME_SIZES.get(args.scheme, {})
    for part in ("test", "val"):
        if part not in defaults and getattr(args, f"{part}_size") is not None:
            fixed = "the official test set" if fashion else "the paper's 70/20/10 split"
            raise UserError(f"--{part}-size cannot be set for --{'dataset' if fashion else 'scheme'} "
                            f"{args.scheme}: it uses {fixed}")
        if getattr(args, f"{part}_size") is None:
            setattr(args, f"{part}_size", defaults.get(part))


def validate(args, world_size):
    """Cross-argument rules, before anything is written (the Continuous Phase can last days, so
    nothing may fail only at the switch or after it)."""
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is global: it must divide by the {world_size} processes")
    if args.deferred and not args.continuous_epochs < args.epochs and not (args.eval_only or args.dump_tokens):
        raise UserError(f"--epochs {args.epochs} counts both phases: it must exceed --continuous-epochs "
                        f"{args.continuous_epochs} so that the Discretization Phase gets at least one epoch")
    if not args.ch_mult:
        raise UserError("--ch-mult needs at least one multiplier, e.g. 1,1,2,4")
    steps = 2 ** (len(args.ch_mult) - 1)
    if args.resolution % steps:
        raise UserError(f"--resolution {args.resolution} must be a multiple of {steps} "
                        f"({len(args.ch_mult) - 1} downsamplings from --ch-mult)")
    if args.quantizer == "msvq":
        if list(args.scales) != sorted(set(args.scales)) or args.scales[-1] != latent_grid(args):
            raise UserError(f"--scales must increase strictly up to the latent grid {latent_grid(args)}, "
                            f"got {','.join(map(str, args.scales))}")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} must not exceed --lr {args.lr:g}")
    if args.ema_decay is not None and args.simvq:
        raise UserError("--simvq trains its linear map by gradient: it cannot be combined with --ema-decay")
    if args.eval_only and args.dump_tokens:
        raise UserError("choose one of --eval-only and --dump-tokens")
    if args.resume and (args.eval_only or args.dump_tokens):
        raise UserError("--resume continues training; --eval-only / --dump-tokens do not train")
    if args.select_by == "fid" and args.skip_fid and not (args.eval_only or args.dump_tokens):
        raise UserError("--select-by fid needs r-FID; with --skip-fid use --select-by val_loss")


def weight_checks(args):
    """Metric weights the run will need, checked before training (a missing file is one line)."""
    checks = []
    if args.lpips_weight > 0 or not (args.skip_lpips or args.dump_tokens):
        checks.append(lambda: common.load_lpips(net="alex"))
    if not (args.skip_fid or args.dump_tokens):
        checks.append(common.inception_weights_path)
    return checks


def load_lpips_if_needed(args, info):
    """LPIPS is a training loss (--lpips-weight) and an evaluation metric."""
    if args.lpips_weight > 0 or not (args.skip_lpips or args.dump_tokens):
        return common.load_lpips(net="alex", device=info.device)
    return None


def evaluate_checkpoint(args, info):
    """--eval-only / --dump-tokens: the architecture and the run's identity come from the
    checkpoint, the data and evaluation options from the command line; the split is the one the
    checkpoint was trained on (a fresh default split could put training images into the test set)."""
    if not args.checkpoint:  # <out>/<name>/best.pt of the run these flags name
        args.scheme = args.scheme or DATASET_DEFAULTS[args.dataset]["scheme"]
    ckpt_path = args.checkpoint or RunPaths(args.out, run_name(args)).best
    ckpt = load_tokenizer_checkpoint(ckpt_path)
    for k in IDENTITY_KEYS:
        setattr(args, k, ckpt["args"][k])
    args.dataset = ckpt["args"].get("dataset", "imagefolder")  # runs before --dataset read ImageFolders
    args.name = args.name or ckpt["args"].get("name")
    args.split_file = os.path.abspath(args.split_file or ckpt["args"].get("split_file") or default_split_file(args))
    paths = RunPaths(args.out, run_name(args))
    outputs = ([paths.tokens(args.dump_tokens)] if args.dump_tokens else
               [paths.result(args.eval_split, ext) for ext in RESULT_FILES])
    found = {}

    def check_data():
        found["split"], _ = prepare_split(args, create=False)
        check_checkpoint_split(ckpt_path, ckpt["args"], found["split"], args.split_file)
    with common.start_run(args, name=paths.name, outputs=outputs, ranges=RANGES,
                          validate=lambda a: validate(a, info.world_size), checks=weight_checks(args) + [check_data]):
        share_split(None, args)
        split = common.load_split(args.split_file)
        for part in ("test", "val"):
            setattr(args, f"{part}_size", split["sizes"][part])
        model = common.build_tokenizer(args).to(info.device)
        model.load_state_dict(ckpt["model"])
        if not model.quantizer.is_enabled:
            raise UserError(f"{ckpt_path} is from the Continuous Phase (quantization off): no tokens to "
                            f"evaluate or dump; use best.pt or a last.pt written after the switch")
        data = make_datasets(args)
        if args.dump_tokens:
            dump_tokens(model, data[args.dump_tokens], args, info, ckpt_path, outputs[0])
            print0(f"wrote {outputs[0]}")
        else:
            final_report(model, data[args.eval_split], args, info, load_lpips_if_needed(args, info), paths,
                         ckpt_path, ckpt.get("history", []), common.model_status(ckpt), switch_sample(ckpt))


def check_checkpoint_split(ckpt_path, saved, split, split_file):
    """--eval-only / --dump-tokens evaluate or dump a part of the split the checkpoint was trained
    on: another split's 'train' can hold this checkpoint's test images, which would then leak into a
    generator's training. The split is known by its digest (recorded since issue 16) or, for older
    checkpoints, by the recorded file where it still exists; a copied file with the same content
    is the same split."""
    recorded, recorded_file = saved.get("split_sha256"), saved.get("split_file")
    if recorded is None and recorded_file and os.path.exists(recorded_file):
        recorded = common.split_fingerprint(common.load_split(recorded_file))
    if recorded is not None and common.split_fingerprint(split) != recorded:
        raise UserError(f"--split-file {split_file} is not the split {ckpt_path} was trained on ({recorded_file}): "
                        "evaluations and token dumps use the checkpoint's split; leave --split-file out")


def main(args):
    info = common.setup_distributed(args.device, args.dist_timeout)
    if args.eval_only or args.dump_tokens:
        evaluate_checkpoint(args, info)
    else:
        resolve_data_defaults(args)
        train(args, info)
    common.cleanup_distributed()


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["imagefolder", common.FASHION_MNIST_SCHEME], default="imagefolder",
                   help="imagefolder: --data-dir is an ImageFolder tree split by --scheme; fashion-mnist: "
                        "--data-dir holds the four idx files (torchvision's layout or a plain folder, e.g. "
                        f"{common.FASHION_MNIST_APT_DIR})")
    g.add_argument("--data-dir", required=True, help="the dataset's folder (see --dataset)")
    g.add_argument("--download", action="store_true", help="fashion-mnist: fetch the files through torchvision")
    g.add_argument("--scheme", choices=["imagenet100", "odir"],
                   help="imagefolder split scheme: imagenet100 (default; 20k test / 5k val drawn from train) "
                        "or odir (70/20/10)")
    g.add_argument("--split-file", help="split JSON shared by all runs (written if absent); "
                                        "default <out>/split_<scheme>.json")
    g.add_argument("--test-size", type=int, help="imagenet100 scheme: test images (default 20,000)")
    g.add_argument("--val-size", type=int,
                   help="imagenet100 scheme and fashion-mnist: validation images (default 5,000; class-balanced)")
    g.add_argument("--resolution", type=int,
                   help="image side: imagefolder resize + centre crop (default 128); fashion-mnist zero-pads "
                        "28 to it (default 32)")
    g.add_argument("--train-augment", action="store_true", help="random flips in training (off in the paper)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="global batch (all processes together; must divide by their number)")
    g.add_argument("--num-workers", type=int, default=4)

    g = p.add_argument_group("model (VQGAN encoder/decoder, section 6.1)")
    g.add_argument("--ch", type=int, default=64, help="backbone width (paper: 64)")
    g.add_argument("--ch-mult", type=int_list, default=(1, 1, 2, 4),
                   help="width multipliers; len-1 downsamplings (paper: 3, 128 -> 16)")
    g.add_argument("--num-res-blocks", type=int, default=2)
    g.add_argument("--attn-resolutions", type=int_list, default=(16,))
    g.add_argument("--z-channels", type=int, default=256)
    g.add_argument("--token-dim", type=int, default=32,
                   help="code dimension; the paper does not state it: 32 is VAR's (VQGAN 256, LlamaGen 8)")

    g = p.add_argument_group("quantizer")
    g.add_argument("--quantizer", choices=["vq", "msvq"], default="vq",
                   help="vq: single-scale (MaskGIT tokenizer); msvq: VAR multi-scale residual")
    g.add_argument("--codebook-size", type=int, default=16384)
    g.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA codebook with this gamma (default: gradient)")
    g.add_argument("--simvq", action="store_true", help="SimVQ: frozen random codebook through a learned linear map")
    g.add_argument("--scales", type=int_list, default=common.VAR_SCALES, help="msvq scales (last = latent grid)")
    g.add_argument("--num-phi", type=int, default=4, help="msvq: shared phi convolutions")
    g.add_argument("--phi-ratio", type=float, default=0.5, help="msvq: residual ratio of phi")

    g = p.add_argument_group("Deferred Quantization (section 5)")
    g.add_argument("--deferred", action="store_true", help="Continuous Phase first, then switch")
    g.add_argument("--continuous-epochs", type=int, default=200,
                   help="Continuous-Phase epochs of the deferred arm (paper 200); the baseline switches at step 0")
    g.add_argument("--ratio", type=float, default=2.0, help="embeddings per code collected for the init (paper 2:1)")
    g.add_argument("--init-method", choices=["sample", "kmeans"], default="sample")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1200,
                   help="total epochs, both phases (a cap: early stopping ends the Discretization Phase sooner)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=1e-7, help="section 6.1: 1e-7 (appendix A.1: 1e-6)")
    g.add_argument("--lr-schedule", choices=["plateau", "cosine"], default="plateau",
                   help="Discretization Phase: ReduceLROnPlateau + early stopping (section 6.1, the tables) or "
                        "cosine annealing to --min-lr over the Discretization epochs (appendix A.1)")
    g.add_argument("--plateau-patience", type=int, default=20)
    g.add_argument("--plateau-factor", type=float, default=0.5)
    g.add_argument("--patience", type=int, default=20,
                   help="plateau: early stopping after this many epochs at the minimum lr without improvement")
    g.add_argument("--max-steps-per-epoch", type=int, default=0,
                   help="0: full epochs; N: an epoch is N steps of a fresh shuffle (a CPU budget; tests)")
    g.add_argument("--lpips-weight", type=float, default=1.0)
    g.add_argument("--gan-weight", type=float, default=0.0, help="> 0: PatchGAN hinge loss (appendix A.6)")
    g.add_argument("--gan-start", type=int, default=0, help="Discretization-Phase steps before the GAN loss starts")
    g.add_argument("--disc-layers", type=int, default=3)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--name", help="run name (default <method>_<scheme>[_gan][_s<seed> unless the seed is 0])")
    g.add_argument("--select-by", choices=["fid", "val_loss"], default="fid",
                   help="best.pt criterion: validation r-FID (paper) or validation loss (no Inception weights)")
    g.add_argument("--fid-every", type=int, default=1, help="validation r-FID every N Discretization epochs")
    g.add_argument("--skip-fid", action="store_true", help="no r-FID (the JSON says why)")
    g.add_argument("--skip-lpips", action="store_true", help="no LPIPS metric (the JSON says why)")
    g.add_argument("--fid-batch-size", type=int, default=128)
    g.add_argument("--fid-images", type=int, default=0,
                   help="r-FID on a class-stratified subset of N images of a split (0: all; common.fid_subset, "
                        "stated in the JSON); on a CPU Inception-v3 takes ~10 images/s, so 2 x 10,000 images cost "
                        "half an hour")
    g.add_argument("--report-checkpoint", choices=["best", "last"],
                   help="checkpoint evaluated at the end (default: best for imagenet100, last for odir, as in A.1)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --eval-split")
    g.add_argument("--eval-split", choices=["train", "val", "test"], default="test")
    g.add_argument("--checkpoint", help="checkpoint for --eval-only / --dump-tokens (default <out>/<name>/best.pt)")
    g.add_argument("--dump-tokens", choices=["train", "val", "test"],
                   help="write the token indices and labels of this split and exit (train: 10 augmented "
                        "views per image, view 0 the plain one; the generators draw one per epoch)")
    g.add_argument("--dump-plain", action="store_true",
                   help="--dump-tokens train: the plain view only (the generators then train without augmentation)")
    common.add_run_arguments(p, out_default="runs/imagenet_tokenizer")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser())
