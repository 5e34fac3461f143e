"""ImageNet-100 / ODIR image tokenizers with and without Deferred Quantization (paper sections
6.1-6.3, appendix A.1, A.6, A.7): Tables 2, 3, 5, 15, 16 and the tokenizer columns of Table 17.

Two tokenizers share one VQGAN-style encoder/decoder (128x128 input, backbone width 64, three
downsamplings so the latent grid is 16x16, codebook 16,384):
  --quantizer vq     single-scale VQ, the MaskGIT tokenizer;
  --quantizer msvq   VAR's multi-scale residual quantizer (scales 1..16, shared codebook, phi convs).
Loss: MSE + LPIPS + codebook + beta * commitment (section 6), optionally + PatchGAN hinge loss with
taming's adaptive weight (appendix A.6, --gan-weight > 0).

Recipe (section 6.1): with --deferred the autoencoder first trains --ae-epochs (paper 200) epochs
without quantization (Continuous Phase); then the codebook is initialised from 2 x 16,384 encoder
embeddings (--ratio 2) and quantization turns on (Discretization Phase). The baseline makes the same
switch at step 0 with the untrained encoder. Quantized training uses ReduceLROnPlateau on the
validation loss (patience 20, factor 0.5, lr 1e-4 -> 1e-7) and stops early once at the minimum lr
with no improvement for --patience epochs. best.pt is the checkpoint with the best validation
r-FID (--select-by val_loss where the Inception weights are absent); last.pt is the latest one.

Commands
    # CPU smoke run (tiny model, a few steps, no pretrained weights needed)
    python imagenet_tokenizer.py --data-dir tiny_imagefolder --scheme imagenet100 --test-size 8 \
        --val-size 8 --resolution 32 --ch 8 --ch-mult 1,2,2 --num-res-blocks 1 --attn-resolutions 8 \
        --z-channels 8 --token-dim 8 --codebook-size 32 --scales 1,2,4,8 --epochs 2 --ae-epochs 1 \
        --deferred --lpips-weight 0 --skip-lpips --skip-fid --select-by val_loss --num-workers 0 \
        --out runs/smoke

    # one GPU, paper configuration (MaskGIT tokenizer, Deferred Quantization, ImageNet-100)
    python imagenet_tokenizer.py --data-dir /data/imagenet100 --scheme imagenet100 \
        --split-file runs/in100/split.json --quantizer vq --deferred --out runs/in100

    # the documented launch: two GPUs (paper: 2 x A100 40 GB)
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
then `python evaluate.py tables <out>`. The GAN weight / start are LlamaGen's; the paper gives none.

Outputs (rank 0): <out>/<name>.json (metrics on the test split, per-epoch history),
<out>/<name>.pt (the evaluated checkpoint with `codebook` and `code_counts` for
`python evaluate.py codebook`), <out>/<name>/{best,last}.pt, <out>/<name>/tokens_<split>.pt;
--eval-split val|train writes <out>/<name>_<split>.{json,pt} instead. --eval-only and --dump-tokens
use the split file recorded in the checkpoint unless --split-file is given.
Pretrained weights needed (no download happens): LPIPS's AlexNet backbone
($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth) unless --lpips-weight 0 and --skip-lpips,
and torch-fidelity's Inception weights unless --skip-fid.
"""
import argparse
import os
import shutil

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset

import common
from common import UserError, print0

EXPERIMENT = "imagenet_tokenizer"


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def int_list(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True, help="ImageFolder tree (one sub-folder per class)")
    g.add_argument("--scheme", choices=["imagenet100", "odir"], default="imagenet100",
                   help="split scheme: imagenet100 (20k test / 5k val drawn from train) or odir (70/20/10)")
    g.add_argument("--split-file", help="split JSON shared by all runs (written if absent); "
                                        "default <out>/split_<scheme>.json")
    g.add_argument("--test-size", type=int, default=20000)
    g.add_argument("--val-size", type=int, default=5000)
    g.add_argument("--resolution", type=int, default=128)
    g.add_argument("--train-augment", action="store_true", help="random flips in training (off in the paper)")
    g.add_argument("--batch-size", type=int, default=32, help="per process")
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
    g.add_argument("--ae-epochs", type=int, default=200, help="Continuous Phase epochs (paper 200)")
    g.add_argument("--ratio", type=float, default=2.0, help="embeddings per code collected for the init (paper 2:1)")
    g.add_argument("--init-method", choices=["sample", "kmeans"], default="sample")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=1e-7)
    g.add_argument("--plateau-patience", type=int, default=20)
    g.add_argument("--plateau-factor", type=float, default=0.5)
    g.add_argument("--patience", type=int, default=20,
                   help="early stopping: epochs at the minimum lr without validation improvement")
    g.add_argument("--epochs", type=int, default=1000, help="cap on the quantized epochs (early stopping ends sooner)")
    g.add_argument("--max-steps-per-epoch", type=int, default=0, help="0: full epochs (tests use a few)")
    g.add_argument("--lpips-weight", type=float, default=1.0)
    g.add_argument("--gan-weight", type=float, default=0.0, help="> 0: PatchGAN hinge loss (appendix A.6)")
    g.add_argument("--gan-start", type=int, default=0, help="quantized-phase steps before the GAN loss starts")
    g.add_argument("--disc-layers", type=int, default=3)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--out", default="runs/imagenet_tokenizer")
    g.add_argument("--name", help="run name (default <method>_<scheme>[_gan])")
    g.add_argument("--select-by", choices=["fid", "val_loss"], default="fid",
                   help="best.pt criterion: validation r-FID (paper) or validation loss (no Inception weights)")
    g.add_argument("--fid-every", type=int, default=1, help="validation r-FID every N quantized epochs")
    g.add_argument("--skip-fid", action="store_true", help="no r-FID (the JSON says why)")
    g.add_argument("--skip-lpips", action="store_true", help="no LPIPS metric (the JSON says why)")
    g.add_argument("--fid-batch-size", type=int, default=128)
    g.add_argument("--resume", action="store_true", help="continue from <out>/<name>/last.pt")
    g.add_argument("--report-checkpoint", choices=["best", "last"],
                   help="checkpoint evaluated at the end (default: best for imagenet100, last for odir, as in A.1)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --eval-split")
    g.add_argument("--eval-split", choices=["train", "val", "test"], default="test")
    g.add_argument("--checkpoint", help="checkpoint for --eval-only / --dump-tokens (default <out>/<name>/best.pt)")
    g.add_argument("--dump-tokens", choices=["train", "val", "test"],
                   help="write the token indices and labels of this split and exit")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def method_name(args):
    name = f"{args.quantizer}_{'deferred' if args.deferred else 'baseline'}"
    return name + ("_simvq" if args.simvq else "")


def run_name(args):
    return args.name or method_name(args) + f"_{args.scheme}" + ("_gan" if args.gan_weight > 0 else "")


# ------------------------------------------------------------------------------------------------
# Model, data, losses
# ------------------------------------------------------------------------------------------------


def default_split_file(args):
    return os.path.abspath(args.split_file or os.path.join(args.out, f"split_{args.scheme}.json"))


def load_data(args, info):
    """The split (made once on rank 0 and written to args.split_file) and the three datasets.
    An existing split file must belong to this scheme and to the classes of --data-dir: a split
    of another tree would otherwise fail at its first missing image, or silently mix test images
    into training where file names coincide."""
    if not os.path.exists(args.split_file) and (args.eval_only or args.dump_tokens):
        raise UserError(f"split file not found: {args.split_file} (pass the run's --split-file)")
    if not os.path.exists(args.split_file) and info.is_main:
        common.make_split(args.data_dir, scheme=args.scheme, seed=args.seed, out_path=args.split_file,
                          test_size=args.test_size, val_size=args.val_size)
    if common.is_distributed():
        torch.distributed.barrier()
    split = common.load_split(args.split_file)
    if split["scheme"] != args.scheme:
        raise UserError(f"{args.split_file} is a '{split['scheme']}' split, not '{args.scheme}'")
    if split["classes"] != common.scan_image_folder(args.data_dir)[0]:
        raise UserError(f"{args.split_file} was made from {split['root']}, whose classes differ from "
                        f"those of --data-dir {args.data_dir}")
    return {part: common.SplitImageDataset(args.data_dir, split, part, args.resolution,
                                           train_augment=args.train_augment and part == "train")
            for part in ("train", "val", "test")}


def shard(dataset, info):
    """This rank's share of an evaluation split: every world_size-th image, no padding, so each
    image is counted exactly once in all-reduced sums."""
    return Subset(dataset, range(info.rank, len(dataset), info.world_size))


def loader(dataset, args, shuffle_sampler=None):
    return DataLoader(dataset, batch_size=args.batch_size, sampler=shuffle_sampler, shuffle=False,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False)


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
    for b, (x, _) in enumerate(common.progress_bar(loader(subset, args), desc="evaluate", leave=False)):
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
            write_pngs(fid_dir, recon, x, start=info.rank + b * args.batch_size * info.world_size,
                       stride=info.world_size)
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


def write_pngs(folder, recon, x, start, stride):
    """Reconstruction i and its original under the same global file name in two folders."""
    for sub, images in (("recon", recon), ("real", x)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for j, img in enumerate(common.to_uint8(images).cpu()):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                os.path.join(folder, sub, f"{start + j * stride:07d}.png"))


def score_fid(folder, args, device):
    """r-FID between the reconstruction and original PNG folders (rank 0), shared with all ranks."""
    if common.is_distributed():
        torch.distributed.barrier()
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if common.is_main_process():
        res = common.fidelity_metrics(os.path.join(folder, "recon"), os.path.join(folder, "real"),
                                      fid=True, batch_size=args.fid_batch_size)
        value[0] = res["fid"]
        shutil.rmtree(folder, ignore_errors=True)
    return common.broadcast_from_main(value).item()


# ------------------------------------------------------------------------------------------------
# Token dumps
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def dump_tokens(model, dataset, args, info, ckpt_path, out_path):
    """Token indices of every image of a split, in split order: vq -> (N, h, w) tensor; msvq ->
    list of (N, s, s) tensors; int16 when the codebook fits, else int32; plus labels."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    rows, dtype = [], torch.int16 if net.quantizer.num_codes <= 2**15 else torch.int32
    subset = shard(dataset, info)
    for b, (x, y) in enumerate(common.progress_bar(loader(subset, args), desc="tokens", leave=False)):
        z_q, indices, _ = net.quantizer(net.encode(x.to(info.device)))
        maps = indices if isinstance(indices, list) else [indices]
        order = torch.arange(x.shape[0]) * info.world_size + info.rank + b * args.batch_size * info.world_size
        rows.append(torch.cat([order[:, None], y[:, None].long()] + [m.reshape(x.shape[0], -1).cpu() for m in maps], 1))
    local = torch.cat(rows).to(info.device)
    table = common.all_gather_rows(local).cpu()
    table = table[table[:, 0].argsort()]
    sizes = [m.shape[-1] for m in maps]
    flat, col = [], 2
    for s in sizes:
        flat.append(table[:, col:col + s * s].reshape(-1, s, s).to(dtype))
        col += s * s
    record = {"tokens": flat if args.quantizer == "msvq" else flat[0], "labels": table[:, 1],
              "checkpoint": os.path.abspath(ckpt_path), "quantizer": args.quantizer,
              "scales": sizes, "codebook_size": net.quantizer.num_codes, "split": args.dump_tokens,
              "split_file": args.split_file}
    if info.is_main:
        common.atomic_write(out_path, lambda f: torch.save(record, f))
    return record


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def main(args):
    info = common.setup_distributed(args.device)
    common.seed_everything(args.seed)
    name = run_name(args)
    run_dir = os.path.join(args.out, name)
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")

    # Bad settings fail before any file is written (conventions: nothing overwritten on bad input).
    # (the Continuous Phase can last days, so nothing may fail only at the switch or after it)
    for message, ok in (("--ratio must be >= 1", args.ratio >= 1), ("--fid-every must be >= 1", args.fid_every >= 1),
                     ("--plateau-factor must lie in (0, 1)", 0 < args.plateau_factor < 1),
                     ("--min-lr must not exceed --lr", 0 <= args.min_lr <= args.lr),
                     ("--epochs and --ae-epochs must be >= 0", min(args.epochs, args.ae_epochs) >= 0),
                     ("--batch-size must be >= 1", args.batch_size >= 1)):
        if not ok:
            raise UserError(message)
    if args.select_by == "fid" and args.skip_fid and not (args.eval_only or args.dump_tokens):
        raise UserError("--select-by fid needs r-FID; with --skip-fid use --select-by val_loss")
    if not args.skip_fid and not args.dump_tokens:
        common.inception_weights_path()  # fail now, not after the Continuous Phase
    if args.resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint at {last_path}")
    if not (args.resume or args.eval_only or args.dump_tokens):
        common.refuse_overwrite([last_path])
    ckpt = None
    if args.eval_only or args.dump_tokens:
        ckpt_path = args.checkpoint or best_path
        ckpt = common.load_checkpoint(ckpt_path)
        # the architecture and the run's identity come from the checkpoint, the data / evaluation
        # options from the command line
        for k in common.TOKENIZER_ARCH_KEYS + ("quantizer", "codebook_size", "token_dim", "beta", "ema_decay",
                                               "simvq", "scales", "num_phi", "phi_ratio", "deferred", "gan_weight",
                                               "scheme"):
            setattr(args, k, ckpt["args"][k])
        args.name = args.name or ckpt["args"].get("name")
        # the split the checkpoint was trained on: a fresh default split (other --out or --seed)
        # could put training images into the evaluated test set
        args.split_file = args.split_file or ckpt["args"].get("split_file")
        name = run_name(args)
        run_dir = os.path.join(args.out, name)
    args.split_file = default_split_file(args)  # recorded in the checkpoints' args
    model = common.build_tokenizer(args).to(info.device)
    # LPIPS is a training loss (--lpips-weight) and an evaluation metric; a missing backbone
    # weight file is a UserError naming it (exit 2), unless neither use is asked for.
    lpips_fn = None
    if args.lpips_weight > 0 or not (args.skip_lpips or args.dump_tokens):
        lpips_fn = common.load_lpips(net="alex", device=info.device)
    data = load_data(args, info)

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if not model.quantizer.is_enabled:
            raise UserError(f"{ckpt_path} is from the Continuous Phase (quantization off): no tokens to "
                            f"evaluate or dump; use best.pt or a last.pt written after the switch")
        if args.dump_tokens:
            out_path = os.path.join(run_dir, f"tokens_{args.dump_tokens}.pt")
            dump_tokens(model, data[args.dump_tokens], args, info, ckpt_path, out_path)
            print0(f"wrote {out_path}")
            return common.cleanup_distributed()
        final_report(model, data[args.eval_split], args, info, lpips_fn, run_dir, name, ckpt_path,
                     ckpt.get("history", []))
        return common.cleanup_distributed()

    disc = common.PatchDiscriminator(n_layers=args.disc_layers).to(info.device) if args.gan_weight > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=args.plateau_factor,
                                                       patience=args.plateau_patience, min_lr=args.min_lr)
    state = {"epoch": 0, "vq_step": 0, "best_val_loss": float("inf"), "best_select": float("inf"),
             "stale_at_min": 0, "history": [], "stopped": False}
    if args.resume:
        ck = common.load_checkpoint(last_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if disc is not None:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["disc_optimizer"])
        state = ck["state"]
        common.set_rng_state(ck["rng"])
        print0(f"resumed from {last_path} at epoch {state['epoch']}")

    # A gradient codebook (and the msvq phi convs) sit unused in the Continuous Phase.
    ddp_model = common.wrap_ddp(model, info, find_unused_parameters=True)
    ddp_disc = common.wrap_ddp(disc, info) if disc is not None else None
    ae_epochs = args.ae_epochs if args.deferred else 0
    sampler = DistributedSampler(data["train"], num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    train_loader = loader(data["train"], args, sampler)
    quantizer = model.quantizer

    while not state["stopped"] and state["epoch"] < ae_epochs + args.epochs:
        epoch = state["epoch"]
        if epoch >= ae_epochs and not quantizer.is_enabled:
            # The switch (section 5). Baseline: epoch 0, untrained encoder. Deferred: after the
            # Continuous Phase. Embeddings are the 16x16 encoder outputs (for msvq: the finest scale).
            sampler.set_epoch(10**6 + epoch)  # its own data order, independent of the epochs
            model.eval()
            n = common.deferred_switch(quantizer, lambda batch: model.encode(batch[0].to(info.device)),
                                       train_loader, args.ratio, args.init_method, args.seed, progress=True)
            model.train()
            print0(f"epoch {epoch}: codebook initialised from {n} embeddings per rank; quantization on")
        phase = "quantized" if quantizer.is_enabled else "continuous"
        sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # steps, loss, rec
        for step, (x, _) in enumerate(common.progress_bar(train_loader, desc=f"epoch {epoch} ({phase})")):
            if args.max_steps_per_epoch and step >= args.max_steps_per_epoch:
                break
            x = x.to(info.device, non_blocking=True)
            with common.autocast_for(info.device):
                recon, _, vq_loss = ddp_model(x)
                recon = recon.float()
                rec = reconstruction_loss(x, recon, lpips_fn, args.lpips_weight)
                loss = rec + vq_loss
                gan_on = disc is not None and phase == "quantized" and state["vq_step"] >= args.gan_start
                if gan_on:
                    disc.requires_grad_(False)
                    g_loss = -disc(recon).mean()
                    disc.requires_grad_(True)
                    loss = loss + args.gan_weight * common.adaptive_gan_weight(rec, g_loss, model.last_layer) * g_loss
            common.check_finite(loss, f"epoch {epoch} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if gan_on:
                with common.autocast_for(info.device):
                    d_loss = common.hinge_d_loss(ddp_disc(x), ddp_disc(recon.detach()))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            if phase == "quantized":
                state["vq_step"] += 1
            sums += torch.stack([torch.ones((), dtype=torch.float64, device=info.device),
                                 loss.detach().double(), rec.detach().double()])
        common.all_reduce_sum(sums)
        record = {"epoch": epoch, "phase": phase, "lr": opt.param_groups[0]["lr"],
                  "train_loss": (sums[1] / sums[0].clamp(min=1)).item(),
                  "train_rec": (sums[2] / sums[0].clamp(min=1)).item()}

        # Validation: loss every epoch; r-FID every --fid-every quantized epochs for best.pt.
        want_fid = phase == "quantized" and args.select_by == "fid" and \
            (epoch - ae_epochs) % args.fid_every == 0
        val = evaluate(ddp_model, data["val"], args, info, lpips_fn,
                       fid_dir=os.path.join(run_dir, "fid_val") if want_fid else None, metrics_wanted=False)
        record["val_loss"] = val["loss"]
        if want_fid:
            record["val_rfid"] = val["rfid"]
        if phase == "quantized":
            update_schedule(state, sched, opt, val["loss"], args)
            record["val_perplexity"] = common.perplexity_from_counts(val["counts"])
        state["history"].append(record)
        state["epoch"] = epoch + 1
        print0(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

        score = val.get("rfid") if args.select_by == "fid" else val["loss"]
        improved = phase == "quantized" and score is not None and score < state["best_select"]
        if improved:
            state["best_select"] = score
        if info.is_main:
            blob = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        state=state, epoch=state["epoch"], step=state["vq_step"], args=vars(args),
                        history=state["history"], codebook=quantizer.codebook.detach().float().cpu())
            if disc is not None:
                blob.update(disc=disc.state_dict(), disc_optimizer=opt_d.state_dict())
            common.save_checkpoint(last_path, **blob)
            if improved:
                common.save_checkpoint(best_path, **blob)
        if common.is_distributed():
            torch.distributed.barrier()

    # Paper appendix A.1: the best-validation-FID checkpoint on ImageNet-100, the final one on ODIR.
    report_path = best_path if (args.report_checkpoint or default_report(args)) == "best" else last_path
    if not os.path.exists(report_path):
        raise UserError("training ended before any quantized epoch; raise --epochs")
    model.load_state_dict(common.load_checkpoint(report_path)["model"])
    final_report(model, data[args.eval_split], args, info, lpips_fn, run_dir, name, report_path,
                 state["history"])
    common.cleanup_distributed()


def default_report(args):
    return "last" if args.scheme == "odir" else "best"


def update_schedule(state, sched, opt, val_loss, args):
    """ReduceLROnPlateau on the validation loss, and early stopping once the lr sits at its
    minimum and the validation loss has not improved for --patience epochs (section 6.1)."""
    sched.step(val_loss)
    if val_loss < state["best_val_loss"]:
        state["best_val_loss"], state["stale_at_min"] = val_loss, 0
    elif opt.param_groups[0]["lr"] <= args.min_lr * (1 + 1e-6):
        state["stale_at_min"] += 1
    state["stopped"] = state["stale_at_min"] >= args.patience


def final_report(model, dataset, args, info, lpips_fn, run_dir, name, ckpt_path, history):
    """Evaluate on one split and write <out>/<stem>.json and <out>/<stem>.pt (codebook + counts),
    stem = name for the test split (what the tables read), name_<split> otherwise, so that an
    evaluation on val or train never replaces the test result."""
    stem = name if args.eval_split == "test" else f"{name}_{args.eval_split}"
    fid_dir = None if args.skip_fid else os.path.join(run_dir, f"fid_{args.eval_split}")
    res = evaluate(model, dataset, args, info, lpips_fn, fid_dir=fid_dir)
    codebook = model.quantizer.codebook.detach().float().cpu()
    metrics = common.codebook_metrics(codebook, res["counts"])
    metrics.update({k: res[k] for k in ("mse", "psnr", "ssim", "lpips")},
                   rfid=res.get("rfid"), eval_loss=res["loss"], num_images=res["num_images"])
    notes = {}
    if args.skip_fid:
        notes["rfid"] = "not computed: --skip-fid (the Inception weights were not available)"
    if lpips_fn is None:
        notes["lpips"] = "not computed: --skip-lpips (the LPIPS AlexNet weights were not available)"
    if info.is_main:
        common.write_result(os.path.join(args.out, f"{stem}.json"), EXPERIMENT, method_name(args), args,
                            metrics, history, eval_split=args.eval_split, checkpoint=os.path.abspath(ckpt_path),
                            notes=notes)
        common.save_checkpoint(os.path.join(args.out, f"{stem}.pt"), model=model.state_dict(), args=vars(args),
                               codebook=codebook, code_counts=res["counts"].float(), metrics=metrics)
    print0({k: v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    common.run_cli(main, build_parser())
