"""MaskGIT (Chang et al. 2022) on the tokens of a frozen tokenizer, with and without Deferred
Quantization: the generation half of the paper for the single-scale (MaskGIT) tokenizer
(section 6.1, Tables 4, 13 and 17; sample sheets in the style of Figure 9).

A class-conditional bidirectional transformer learns to fill in masked tokens of the tokenizer's
token grid; samples start fully masked and are revealed over a few parallel decoding steps, then
decoded to images by the tokenizer. The paper's claim: tokens with better coverage (Deferred
Quantization) give more diverse samples (higher pixel distance and LPIPS diversity, lower g-FID).

Inputs: a tokenizer checkpoint of imagenet_tokenizer.py (--quantizer vq) or a finished Fashion-MNIST
run of cifar_sweep.py (<out>/<name>.pt, its VQ-VAE), and its token dumps `tokens_train.pt` /
`tokens_val.pt` (--dump-tokens train|val of either script), which that script writes into the
tokenizer's run folder (common.tokenizer_run_folder). The tokenizer stays frozen; it only decodes samples.

Commands
    # the tokenizer's token dumps (once per tokenizer)
    python imagenet_tokenizer.py --dump-tokens train --checkpoint runs/in100/vq_deferred_imagenet100/best.pt ...
    python imagenet_tokenizer.py --dump-tokens val --checkpoint runs/in100/vq_deferred_imagenet100/best.pt ...
    # ... or of a cifar_sweep.py Fashion-MNIST run (its training flags + --dump-tokens), then --tokenizer <out>/<name>.pt
    python cifar_sweep.py --dataset fashion-mnist --method deferred_ema --codebook-size 4096 ... --dump-tokens train

    # CPU smoke run (a 2-layer model, 2 epochs, 20 samples, no pretrained weights needed)
    python generator_maskgit.py --tokenizer runs/smoke/vq_deferred_imagenet100/best.pt --out runs/smoke_maskgit \
        --depth 2 --width 64 --heads 4 --mlp-dim 128 --batch-size 8 --warmup-steps 10 --epochs 2 \
        --sample 20 --steps 4 --skip-fid --skip-lpips --device cpu

    # Fashion-MNIST on a 2-core CPU (the README's real-image chain; 7x7 or 8x8 token grid): a
    # 0.9 M-parameter model trains at ~190 images per CPU-second with 49 tokens, ~145 with 64
    # (measured), i.e. 3-4 min per 60,000-image epoch on two free cores, ~20 min for this run
    OMP_WAIT_POLICY=PASSIVE python generator_maskgit.py --tokenizer runs/fmnist/vq_deferred_fashion-mnist/best.pt \
        --out runs/fmnist_maskgit --depth 4 --width 128 --heads 4 --mlp-dim 512 --batch-size 128 --lr 5e-4 \
        --warmup-steps 200 --epochs 5 --sample 1000 --steps 8 --device cpu

    # one GPU, paper configuration (the official class-conditional MaskGIT: 24 layers, width 768)
    python generator_maskgit.py --tokenizer runs/in100/vq_deferred_imagenet100/best.pt --out runs/maskgit

    # several GPUs (--batch-size is global: 256 split over the processes)
    torchrun --nproc_per_node=2 generator_maskgit.py --tokenizer runs/in100/vq_deferred_imagenet100/best.pt \
        --out runs/maskgit

    # sample again from a trained generator with other settings (a new run name)
    python generator_maskgit.py --tokenizer runs/in100/vq_deferred_imagenet100/best.pt --out runs/maskgit \
        --sample-only --checkpoint runs/maskgit/maskgit_vq_deferred_imagenet100/best.pt --cfg-scale 2 \
        --name maskgit_vq_deferred_imagenet100_cfg2

Runs per table (one run per tokenizer of imagenet_tokenizer.py's table runs; then
`python evaluate.py tables runs/`):
    Table 4   tokenizers vq baseline / vq --deferred, ImageNet-100          (2 runs)
    Table 13  the same with the GAN tokenizers (--gan-weight 0.5)             (2 runs)
    Table 17  ODIR tokenizers vq, without and with GAN loss, both arms        (4 runs)
The VAR rows of these tables, and Tables 6 and 14 (VAR only), come from generator_var.py;
evaluate.py renders both.

Outputs in --out, <name> = maskgit_<tokenizer run folder> unless --name:
    <name>/last.pt, <name>/best.pt   generator checkpoints (best = lowest validation loss)
    <name>/samples/*.png              every sample, <index>_class<label>.png
    <name>/samples_grid.png           one row per class (material for Figure 9)
    <name>/samples_tokens.pt          the sampled tokens and labels
    <name>.json                       metrics (gfid, pixel_diversity, lpips_diversity, val_loss, ...),
                                      history, the tokenizer's identity, the sampling settings
                                      (convention: README "Generator results")

What the official code fixes and what we chose (google-research/maskgit, valeoai/Maskgit-pytorch):
  * Architecture (official class-conditional config): BERT-style post-LayerNorm transformer,
    24 layers, width 768, 16 heads, MLP 3072, dropout 0.1 (on the embeddings, the attention
    probabilities and the output of the attention and the MLP, not inside the MLP; 183.6 M
    parameters at 16,384 codes, 100 classes and 256 tokens), LayerNorm eps 1e-12, learned position
    embeddings, truncated-normal(0.02) init, an MLM head (dense, GELU, LayerNorm) whose output
    weights are the token embedding (tied) plus a bias. The class token is prepended.
  * Token ids: codes 0..K-1, [MASK] = K (never a code id; the official -1 wraps to the last
    embedding row in JAX, which PyTorch does not do), class c = K + 1 + c, the null class for
    classifier-free guidance K + 1 + num_classes. The head predicts the K codes only (the official
    sampler slices its logits to the codes).
  * Training masks (MaskGIT paper section 3.2): r ~ U[0, 1), ceil(cos(pi/2 r) N) tokens chosen
    uniformly are masked. Loss: cross-entropy with label smoothing 0.1 on the masked positions
    only (official `compute_loss_for_all=False`); --loss-on-all-tokens is the other official option.
  * Label dropout 0.1 (the null class) so that classifier-free guidance is possible: OUR choice,
    the official MaskGIT has no guidance (valeoai's port drops labels with p 0.1). --cfg-scale 0
    (default) samples from the conditional model alone, as the official sampler does.
  * Optimisation: AdamW (betas 0.9, 0.96, weight decay 0.045 on matrices and embeddings, not on
    biases / LayerNorms), lr 1e-4, batch 256 (official); gradient clipping 1.0 (valeoai); bf16
    autocast on CUDA. Linear warm-up of --warmup-epochs 1: the official 5,000 steps of 256 are one
    ImageNet epoch; counted in epochs it takes the same share of a run on any data set (as steps it
    would last ~278 of 300 epochs on ODIR's ~4,700 training images, 18 steps per epoch);
    --warmup-steps N sets steps instead (rule: common.generator_schedule; the JSON's "schedule"
    records steps per epoch, warm-up steps and patience). Paper appendix A.1: ReduceLROnPlateau and
    early stopping (no values given): after the warm-up we reduce by 0.5 after 5 epochs without
    validation improvement, down to 1e-6, and stop after 10 more epochs at the minimum; --epochs
    (300, valeoai) caps it. The validation loss uses fixed masks and no label dropout, so epochs
    compare.
  * Decoding (official parallel_decode.py): --steps T (12, the official `decode` default); at step
    t a token is sampled at every masked position; ratio = (t+1)/T; floor(N cos(pi/2 ratio))
    positions stay masked (at least one, and at least one fewer than before); the ones kept masked
    are those with the lowest confidence log p + 4.5 (1 - ratio) Gumbel noise; tokens already
    revealed are never re-masked or resampled. After the last step nothing is masked (the official
    code returns that step's sample before its final re-masking). T larger than N is refused.
  * Classifier-free guidance (not official): logits = c + w (c - u), u with the null class, w =
    --cfg-scale constant over the steps. w = 0 is the conditional model, as in generator_var.py
    (VAR's convention); LlamaGen's scale s (u + s (c - u), llamagen_deferred.py) is 1 + w. The
    result JSON states the formula (sampling.guidance). Guidance needs the null class, which only
    label dropout trains: --cfg-scale > 0 with --label-dropout 0 is refused (also --sample-only
    from such a checkpoint).
  * Samples (paper: not stated for ImageNet-100): 5,000 class-balanced (50 per class on
    ImageNet-100, as VAR evaluates); on ODIR one per test image with its label, the test split's
    size and class mix (A.1: "For the ODIR dataset, we use the full original test set";
    common.sample_labels; --sample N overrides the count). Drawn from ONE random stream per run
    (--sample-seed), so no two batches repeat each other. g-FID against the tokenizer's test split
    (torch-fidelity, as its r-FID; --fid-images N: a class-stratified subset); pixel distance and
    LPIPS diversity over all pairs (common.sample_metrics). Tokenizer checkpoint: best.pt on
    ImageNet-100, the final last.pt on ODIR (A.1: "the final checkpoint was used for the ODIR
    dataset"); dump the tokens of that one.
  * The official config also sets `min_masking_rate = 0.5` without released training code that
    uses it; we do not use it.
"""
import argparse
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError, print0

EXPERIMENT = "generator_maskgit"
LAYERNORM_EPS = 1e-12  # BERT's, as the official transformer
RANGES = {**common.GENERATOR_RANGES, "depth": ">= 1", "width": ">= 1", "heads": ">= 1", "mlp_dim": ">= 1",
          "dropout": "[0, 1)", "label_smoothing": "[0, 1)", "lr": "> 0", "weight_decay": ">= 0", "clip": "> 0",
          "batch_size": ">= 1", "epochs": ">= 0", "steps": ">= 1"}
# Settings that define a training run: --resume refuses a checkpoint made under other values.
ARCH = ("depth", "width", "heads", "mlp_dim", "dropout")
DEFINING = ARCH + ("tokenizer", "tokens_dir", "no_augment", "label_smoothing", "loss_on_all_tokens", "label_dropout", "lr",
                   "min_lr", "weight_decay", "clip", "batch_size", "warmup_epochs", "warmup_steps", "plateau_factor",
                   "plateau_patience", "patience", "seed")


# ------------------------------------------------------------------------------------------------
# Model: BERT-style bidirectional transformer over [class token, tokens]
# ------------------------------------------------------------------------------------------------


class MaskGITTransformer(nn.Module):
    """Class-conditional masked-token model. forward(idx_BN, label_B) -> logits (B, N, K) over the
    K codes at every position; idx_BN holds code ids or `mask_id`; label_B holds class indices,
    or `num_classes` for the null class of classifier-free guidance."""

    def __init__(self, codebook_size, num_classes, seq_len, depth=24, width=768, heads=16, mlp_dim=3072,
                 dropout=0.1):
        super().__init__()
        self.codebook_size, self.num_classes, self.seq_len = codebook_size, num_classes, seq_len
        self.mask_id = codebook_size
        vocab = codebook_size + 1 + num_classes + 1  # codes, [MASK], classes, null class
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len + 1, width))
        self.emb_norm = nn.LayerNorm(width, eps=LAYERNORM_EPS)
        self.emb_drop = nn.Dropout(dropout)
        # post-LN blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))), tanh-GELU as jax.nn.gelu
        layer = nn.TransformerEncoderLayer(width, heads, mlp_dim, dropout, batch_first=True, norm_first=False,
                                           layer_norm_eps=LAYERNORM_EPS,
                                           activation=functools.partial(F.gelu, approximate="tanh"))
        # torch's feed-forward block drops out after the GELU too; the official Mlp drops only its
        # output (then the residual and LayerNorm), as torch's dropout2 does: no inner dropout
        layer.dropout = nn.Identity()
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(approximate="tanh"),
                                  nn.LayerNorm(width, eps=LAYERNORM_EPS))
        self.head_bias = nn.Parameter(torch.zeros(codebook_size))
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation: truncated normal (std 0.02, cut at 2 std) for every weight
        matrix, embedding and the position embeddings, zero biases, unit LayerNorms."""
        def trunc_normal(p):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                trunc_normal(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):  # q, k, v projections live in one parameter
                trunc_normal(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        trunc_normal(self.pos_emb)
        nn.init.zeros_(self.head_bias)

    def class_token(self, label_B):
        return self.codebook_size + 1 + label_B

    def forward(self, idx_BN, label_B):
        x_BN = torch.cat([self.class_token(label_B)[:, None], idx_BN], 1)
        h = self.emb_drop(self.emb_norm(self.tok_emb(x_BN) + self.pos_emb))
        h = self.head(self.blocks(h)[:, 1:])
        return h @ self.tok_emb.weight[:self.codebook_size].t() + self.head_bias


def build_generator(cfg, dump):
    cfg = cfg if isinstance(cfg, dict) else vars(cfg)
    return MaskGITTransformer(dump.codebook_size, dump.num_classes, dump.seq_len, **{k: cfg[k] for k in ARCH})


# ------------------------------------------------------------------------------------------------
# Training objective: cosine mask schedule, masked-token cross-entropy, label dropout
# ------------------------------------------------------------------------------------------------


def mask_ratio(r):
    """The cosine schedule gamma(r) = cos(pi/2 r), clipped to [1e-6, 1] (official mask_schedule.py)."""
    return torch.cos(math.pi / 2 * r).clamp(1e-6, 1.0)


def random_mask(batch, seq_len, device=None, generator=None):
    """(B, N) bool: per image r ~ U[0, 1) and ceil(gamma(r) N) positions, chosen uniformly, masked
    (MaskGIT section 3.2); always between 1 and N."""
    r = torch.rand(batch, device=device, generator=generator)
    count = torch.ceil(mask_ratio(r) * seq_len).clamp(1, seq_len)
    rank = torch.rand(batch, seq_len, device=device, generator=generator).argsort(1).argsort(1)
    return rank < count[:, None]


def drop_labels(label_B, p, num_classes, generator=None):
    """Replace each label by the null class `num_classes` with probability p (classifier-free guidance)."""
    if p <= 0:
        return label_B
    drop = torch.rand(label_B.shape, device=label_B.device, generator=generator) < p
    return label_B.masked_fill(drop, num_classes)


def token_loss_sum(logits_BNK, target_BN, masked_BN, label_smoothing=0.1, all_tokens=False):
    """(sum of the cross-entropy over the scored positions, their number): the masked positions
    (official) or every position (`all_tokens`). Logits of unscored positions do not matter."""
    ce = F.cross_entropy(logits_BNK.float().flatten(0, 1), target_BN.flatten(), reduction="none",
                         label_smoothing=label_smoothing).view_as(target_BN)
    weight = torch.ones_like(ce) if all_tokens else masked_BN.to(ce.dtype)
    return (ce * weight).sum(), weight.sum()


# ------------------------------------------------------------------------------------------------
# Iterative parallel decoding (official parallel_decode.py) with optional classifier-free guidance
# ------------------------------------------------------------------------------------------------


def masked_after_steps(num_tokens, steps):
    """How many tokens are still masked after each of the T steps, all starting masked:
    floor(N cos(pi/2 (t+1)/T)), kept in [1, previous - 1] before the last step (every step reveals
    at least one token and leaves one for the next), 0 after the last."""
    if steps > num_tokens:
        raise UserError(f"--steps {steps} exceeds the {num_tokens} tokens of an image: every step must "
                        "reveal at least one token")
    counts, left = [], num_tokens
    for t in range(steps - 1):
        left = max(1, min(left - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))))
        counts.append(left)
    return counts + [0]


# Classifier-free guidance, as the result JSON states it (VAR's convention, w = 0 is the
# conditional model; LlamaGen's scale s = 1 + w, see llamagen_deferred.py).
GUIDANCE = "c + w (c - u) = (1 + w) c - w u at every step, w = cfg_scale; u: null-class logits"


def guided_logits(model, idx_BN, label_B, cfg_scale):
    """Conditional logits c, or c + w (c - u) with u the null-class logits (one doubled batch)."""
    if cfg_scale == 0:
        return model(idx_BN, label_B).float()
    null = torch.full_like(label_B, model.num_classes)
    cond, uncond = model(torch.cat([idx_BN, idx_BN]), torch.cat([label_B, null])).float().chunk(2)
    return cond + cfg_scale * (cond - uncond)


def gumbel(shape, device, generator):
    u = torch.rand(shape, device=device, generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_tokens(model, label_B, steps, generator, cfg_scale=0.0, choice_temperature=4.5, temperature=1.0,
                  history=None):
    """(B, N) code ids for the given classes, by MaskGIT's parallel decoding. `generator` is the
    run's one random stream (categorical draws and Gumbel noise). `history`, when a list, receives
    the working sequence after every step (the official decoder returns them all too)."""
    b, n, mask_id = label_B.shape[0], model.seq_len, model.mask_id
    device = label_B.device
    idx = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    still_masked = masked_after_steps(n, steps)
    for t in range(steps):
        masked = idx == mask_id
        with common.autocast_for(device):
            logits = guided_logits(model, idx, label_B, cfg_scale)
        log_p = torch.log_softmax(logits / temperature, -1)
        drawn = torch.multinomial(log_p.exp().flatten(0, 1), 1, generator=generator).view(b, n)
        sampled = torch.where(masked, drawn, idx)  # revealed tokens are never resampled
        if t == steps - 1:
            idx = sampled
        else:
            ratio = (t + 1) / steps
            confidence = log_p.gather(-1, sampled[..., None])[..., 0] + \
                choice_temperature * (1 - ratio) * gumbel((b, n), device, generator)
            confidence = confidence.masked_fill(~masked, math.inf)  # fixed tokens are never re-masked
            lowest = confidence.topk(still_masked[t], dim=1, largest=False).indices
            idx = sampled.scatter(1, lowest, mask_id)
        if history is not None:
            history.append(idx.clone())
    return idx


# ------------------------------------------------------------------------------------------------
# Inputs: tokenizer args and token dumps
# ------------------------------------------------------------------------------------------------


def load_inputs(args):
    """(tokenizer args, training dump, validation dump), checked by common.load_generator_inputs
    (a vq tokenizer, dumps made from it; one-line errors) and against --steps. MaskGIT trains on
    the dumps alone: the tokenizer is loaded again, on the device, only to decode samples."""
    _, cfg, train_dump, val_dump = common.load_generator_inputs(args, "vq")
    masked_after_steps(train_dump.seq_len, args.steps)  # --steps > N fails now, not after training
    return cfg, train_dump, val_dump


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def build_optimizer(model, args):
    """AdamW; weight decay on weight matrices and embeddings only (not biases or LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.96))


@torch.no_grad()
def validation_loss(model, dump, args, info):
    """Mean masked-token loss over the whole validation dump, label dropout OFF and dropout off;
    the masks come from a generator seeded by --seed, the same every epoch, so epochs compare."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    masks = random_mask(len(dump), dump.seq_len, generator=gen)
    sums = torch.zeros(2, dtype=torch.float64, device=info.device)
    for idx in common.epoch_batches(len(dump), args.batch_size, args.seed, 0, info.rank, info.world_size,
                                    shuffle=False):
        if idx.numel() == 0:
            continue
        tokens, labels, masked = dump.tokens_NL[idx].to(info.device), dump.labels[idx].to(info.device), \
            masks[idx].to(info.device)
        with common.autocast_for(info.device):
            logits = model(tokens.masked_fill(masked, model.mask_id), labels)
        loss_sum, count = token_loss_sum(logits, tokens, masked, args.label_smoothing, args.loss_on_all_tokens)
        sums += torch.stack([loss_sum.double(), count.double()])
    common.all_reduce_sum(sums)
    model.train()
    return (sums[0] / sums[1]).item()


def train_epoch(model, ddp_model, opt, sched, dump, args, info, state, warmup_steps):
    """One epoch; returns (mean training loss, images per second over all ranks, seconds)."""
    epoch = state["epoch"]
    torch.manual_seed(common.epoch_seed(args.seed, epoch, 1 + info.rank))  # masks, label drops, dropout
    batches = common.epoch_batches(len(dump), args.batch_size, args.seed, epoch, info.rank, info.world_size)
    views = common.training_views(args, dump, epoch)  # one augmented view per image, or None: the plain one
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=info.device)
    start = time.time()
    for idx in common.progress_bar(batches, desc=f"epoch {epoch}", leave=False):
        common.set_lr(opt, sched.lr * common.warmup_factor(state["step"], warmup_steps))
        tokens = dump.batch(idx, None if views is None else views[idx]).to(info.device)
        labels = dump.labels[idx].to(info.device)
        masked = random_mask(tokens.shape[0], tokens.shape[1], device=info.device)
        with common.autocast_for(info.device):
            logits = ddp_model(tokens.masked_fill(masked, model.mask_id),
                               drop_labels(labels, args.label_dropout, model.num_classes))
        loss_sum, count = token_loss_sum(logits, tokens, masked, args.label_smoothing, args.loss_on_all_tokens)
        loss = loss_sum / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        state["step"] += 1
        sums += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=info.device)])
    common.all_reduce_sum(sums)
    common.check_finite(sums[0], f"epoch {epoch}")
    seconds = time.time() - start
    return (sums[0] / sums[1]).item(), len(batches) * args.batch_size / seconds, seconds


def train(args, info, inputs, run, paths):
    """Train to early stopping or --epochs; rank 0 writes best.pt before last.pt every epoch
    (common.end_generator_epoch); --resume continues from last.pt."""
    _, train_dump, val_dump = inputs
    common.seed_everything(args.seed)  # identical initial weights on every rank
    model = build_generator(args, train_dump).to(info.device)
    opt = build_optimizer(model, args)
    sched, state = common.resume_generator_training(run, model, opt, args, paths["last"])
    ddp_model = common.wrap_ddp(model, info)
    plan = common.generator_schedule(args, len(train_dump))
    print0(f"MaskGIT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {len(train_dump)} "
           f"training images of {train_dump.seq_len} tokens, {train_dump.codebook_size} codes, "
           f"{train_dump.num_classes} classes; {plan['steps_per_epoch']} steps per epoch, warm-up "
           f"{plan['warmup_steps']} steps")
    while not sched.stopped and state["epoch"] < args.epochs:
        train_loss, speed, seconds = train_epoch(model, ddp_model, opt, sched, train_dump, args, info, state,
                                                 plan["warmup_steps"])
        record = {"epoch": state["epoch"], "lr": sched.lr, "train_loss": train_loss,
                  "val_loss": validation_loss(model, val_dump, args, info), "images_per_second": speed,
                  "seconds": seconds}
        common.end_generator_epoch(record, model, opt, sched, state, args, info, paths, plan["warmup_steps"],
                                   tokenizer=train_dump.tokenizer)
    return common.finish_generator_training(sched, state)


# ------------------------------------------------------------------------------------------------
# Samples and metrics (rank 0)
# ------------------------------------------------------------------------------------------------


def sample_and_report(args, info, inputs, ckpt_path, history, paths):
    """Class-balanced samples of the checkpoint at ckpt_path, decoded from ONE generator seeded
    once with --sample-seed; files, metrics and the result JSON through common.report_samples."""
    tokenizer_cfg, dump, _ = inputs
    ckpt = common.load_checkpoint(ckpt_path)
    model = build_generator(ckpt["args"], dump).to(info.device)
    common.load_weights(model, ckpt["model"], ckpt_path, f"a MaskGIT for the dump's {dump.codebook_size} codes, "
                        f"{dump.num_classes} classes and {dump.seq_len} tokens")
    model.eval()
    tokenizer, _ = common.load_tokenizer(args.tokenizer, info.device)
    generator = torch.Generator(info.device).manual_seed(args.sample_seed)  # ONE stream for all batches
    sampler = functools.partial(sample_tokens, model, steps=args.steps, generator=generator,
                                cfg_scale=args.cfg_scale, choice_temperature=args.choice_temperature,
                                temperature=args.temperature)
    sampling = {"steps": args.steps, "cfg_scale": args.cfg_scale, "guidance": GUIDANCE,
                "choice_temperature": args.choice_temperature, "temperature": args.temperature}
    metrics = {"val_loss": ckpt.get("val_loss"), "best_epoch": ckpt.get("epoch", 0) - 1}
    return common.report_samples(args, EXPERIMENT, tokenizer, tokenizer_cfg, dump, sampler, sampling, metrics,
                                 history, ckpt_path, paths, info.device, common.model_status(ckpt))


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def validate(args):
    common.validate_generator_args(args)
    if args.width % args.heads:
        raise UserError(f"--width {args.width} must be divisible by --heads {args.heads}")


def main(args):
    return common.run_generator(args, "vq", ranges=RANGES, defining=DEFINING, validate=validate,
                                load_inputs=load_inputs, train=train, sample_and_report=sample_and_report)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = common.add_generator_arguments(p, "vq", out_default="runs/generator_maskgit")
    g.add_argument("--steps", type=int, default=12, help="decoding steps T")
    g.add_argument("--cfg-scale", type=float, default=0.0,
                   help="classifier-free guidance w: c + w (c - u) at every step (0: conditional only)")
    g.add_argument("--choice-temperature", type=float, default=4.5, help="Gumbel noise scale of the confidence")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the token draws")

    g = p.add_argument_group("model (official class-conditional MaskGIT)")
    g.add_argument("--depth", type=int, default=24)
    g.add_argument("--width", type=int, default=768)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--mlp-dim", type=int, default=3072)
    g.add_argument("--dropout", type=float, default=0.1)

    g = p.add_argument_group("training (official MaskGIT recipe, the paper's plateau schedule)")
    g.add_argument("--batch-size", type=int, default=256, help="global batch (all processes together)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.045)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--loss-on-all-tokens", action="store_true",
                   help="cross-entropy on every position (official option; default: masked positions only)")
    g.add_argument("--epochs", type=int, default=300, help="cap; early stopping usually ends sooner")
    common.add_generator_training_arguments(g, 1.0, "official: 5,000 steps of 256, one ImageNet epoch")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser())
