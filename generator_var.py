"""VAR generator on a multi-scale tokenizer's tokens: does better token coverage make the
generator better and more diverse? (paper section 6.2-6.3, appendix A.1, A.6: Tables 4, 6, 13,
14, Figure 9).

Next-scale prediction (Tian et al. 2024, FoundationVision/VAR): a tokenizer trained by
`imagenet_tokenizer.py --quantizer msvq` turns an image into token maps of sides s_1 < ... < s_K
(the paper's 128 px / 16 x 16 grid: VAR's 1,2,3,4,5,6,8,10,13,16, L = 680 tokens). A class-
conditional transformer predicts every token of scale k at once from the class and all coarser
scales: its input for scale k is the tokenizer's own reconstruction after scale k-1, f_hat,
area-downsampled to s_k (`common.MultiScaleQuantizer.teacher_forcing_input`, built from the frozen
tokenizer's codebook and phi convolutions); a block-causal mask lets scale k see scales <= k,
bidirectionally inside k. At inference the scales are drawn one after the other with a kv cache,
classifier-free guidance t = cfg * k / (K - 1) growing with the scale, and top-k / top-p sampling.
Model and recipe are VAR's at --depth 16 (the paper's "smallest" VAR): width 1024, 16 heads, MLP 4,
stochastic depth 0.067, l2-normalised attention (VAR's --anorm), adaptive LayerNorm conditioning,
label dropout 0.1, VAR's initialisation; AdamW (0.9, 0.95), weight decay 0.05 (none on biases,
norms, position / level embeddings), gradient clipping 2.0, bf16 on CUDA. The schedule is the
paper's (A.1): linear warm-up, then ReduceLROnPlateau on the validation loss and early stopping.

Commands
    # CPU smoke run: a tiny multi-scale tokenizer (see imagenet_tokenizer.py), its dumps, a tiny VAR
    python imagenet_tokenizer.py --data-dir tiny_imagefolder --scheme imagenet100 --test-size 8 \
        --val-size 8 --resolution 32 --ch 8 --ch-mult 1,2,2 --num-res-blocks 1 --attn-resolutions 8 \
        --z-channels 8 --token-dim 8 --codebook-size 32 --quantizer msvq --scales 1,2,4,8 --epochs 2 \
        --continuous-epochs 1 --deferred --lpips-weight 0 --skip-lpips --skip-fid --select-by val_loss \
        --num-workers 0 --out runs/smoke
    for split in train val; do python imagenet_tokenizer.py --data-dir tiny_imagefolder --out runs/smoke \
        --checkpoint runs/smoke/msvq_deferred_imagenet100/best.pt --dump-tokens $split --num-workers 0; done
    python generator_var.py --tokenizer runs/smoke/msvq_deferred_imagenet100/best.pt --out runs/smoke_var \
        --depth 2 --width 64 --heads 2 --batch-size 8 --warmup-steps 10 --epochs 3 --sample 12 \
        --skip-fid --skip-lpips --device cpu

    # one GPU, paper configuration (VAR d16 on the Deferred-Quantization msvq tokenizer of Table 3);
    # --grad-accum keeps VAR's global batch of 768 in memory: 768 / 16 = 48 sequences of 680 tokens
    # per micro-batch (our estimate for 40 GB at d16, ~0.5 GB each; not measured: no GPU here)
    python generator_var.py --tokenizer runs/in100/msvq_deferred_imagenet100/best.pt --grad-accum 16 \
        --out runs/var

    # the documented launch: two GPUs (paper: 2 x A100 40 GB), global batch 768 = 2 x 8 x 48
    torchrun --nproc_per_node=2 generator_var.py --tokenizer runs/in100/msvq_deferred_imagenet100/best.pt \
        --grad-accum 8 --out runs/var

    # sample again from a trained generator with other settings (a new run name)
    python generator_var.py --tokenizer runs/in100/msvq_deferred_imagenet100/best.pt --out runs/var \
        --sample-only --checkpoint runs/var/var_msvq_deferred_imagenet100/best.pt --cfg-scale 2 \
        --name var_msvq_deferred_imagenet100_cfg2

Runs per table: one generator per tokenizer, baseline (✗) and Deferred (✓) tokenizer of each pair;
dump train and val tokens of the tokenizer's best.pt (ImageNet-100) / last.pt (ODIR) first.
    Table 4   tokenizers of Table 3, --quantizer msvq                (imagenet100; 2 runs)
    Table 6   tokenizers of Table 5                                  (odir; 2 runs)
    Table 13  tokenizers of Table 15, --quantizer msvq, GAN loss     (imagenet100; 2 runs)
    Table 14  tokenizers of Table 16, GAN loss                       (odir; 2 runs)
    Figure 9  the samples_grid.png of the Table 4 and Table 6 pairs
then `python evaluate.py tables <out>` (paper values beside ours). Each run is days on 2 GPUs in the
paper (A.1: 3-6 days per generator on 2 x A100 40 GB).

Inputs: a tokenizer checkpoint of imagenet_tokenizer.py (--quantizer msvq) and its token dumps
tokens_train.pt / tokens_val.pt (--dump-tokens train|val), which that script writes next to the
checkpoint (--tokens-dir if elsewhere). The tokenizer stays frozen: its quantizer builds the
teacher-forcing input and turns sampled indices into f_hat; its decoder makes the images.

Outputs in --out, <name> = var_<tokenizer run folder> (--name overrides):
    <name>.json               the result (/work/notes/generator_json.md convention): g-FID, pixel
                              distance, LPIPS diversity, sampled-code usage, best validation loss,
                              the tokenizer's identity, sampling settings, FID reference, history
    <name>/best.pt, last.pt   checkpoints (best validation loss; latest epoch), resumable
    <name>/samples/*.png      every sample, <index>_class<label>.png
    <name>/samples_grid.png   one row per class (Figure 9 material)
    <name>/samples_tokens.pt  the sampled token maps and labels
    <name>_untruncated.json, <name>_untruncated/   the same checkpoint sampled with top-k / top-p off
                              (when they truncate; --skip-untruncated omits it)
Needs (unless --skip-fid / --skip-lpips): torch-fidelity's Inception weights and LPIPS's AlexNet
backbone in $TORCH_HOME/hub/checkpoints, and the tokenizer's images (its split file's test split
is the g-FID reference; --data-dir if they moved). Missing files fail before training, in one line.

Choices the paper leaves open (ours; all are flags and recorded in the JSON):
  * Guidance --cfg-scale 1.5, top-k 900, top-p 0.96, no "more_smooth": VAR's README recipe for FID. VAR's
    paper says cfg 2.0 (VAR#86). top-k 900 was tuned for VAR's 4,096 codes; with the paper's 16,384
    it keeps 5.5% of the vocabulary instead of 22% (--top-k 3600 keeps the same share). Guidance
    is (1 + t) c - t u, t = cfg k / (K - 1) at scale k: t = 0 is the conditional model, as w in
    generator_maskgit.py; LlamaGen's scale s is 1 + t. The JSON states it (sampling.guidance).
    Truncation moves the diversity columns and the paper states no sampling settings, so a run
    whose --top-k / --top-p truncate samples the same checkpoint again untruncated (top-k 0 = off,
    top-p 1 = off; same --sample-seed) as <name>_untruncated, a --sample-only run of its own that
    evaluate.py shows as its own row ("top_k=0, top_p=1.0"); --skip-untruncated omits it.
  * Samples: 5,000 class-balanced (50 per ImageNet-100 class, VAR's per-class count); on ODIR one
    per test image with its label, the test split's size and class mix (A.1: "For the ODIR
    dataset, we use the full original test set"; common.sample_labels; --sample N overrides the
    count); one random stream per run (--sample-seed). Pixel distance and LPIPS diversity
    (AlexNet) over all pairs of the samples; g-FID against the tokenizer's whole test split
    (20,000 images on ImageNet-100; --fid-images N: a class-stratified subset). The checkpoint
    sampled is the one with the best validation loss.
  * Schedule: warm-up --warmup-epochs 4 (VAR: 1/50 of its 200 epochs; ~530 steps of 768 on
    ImageNet-100, 24 on ODIR's ~4,700 training images, where 500 steps would have lasted 83 of
    200 epochs; --warmup-steps N sets steps instead; rule: common.generator_schedule, the JSON's
    "schedule" records the resolved numbers), peak lr 3e-4 (VAR: 1e-4 x batch / 256), then, after
    the warm-up, ReduceLROnPlateau x0.5 after 5 validations without improvement, floor 1e-6 (the
    tokenizer's, A.1), early stop after 10 more at the floor; cap 200 epochs (VAR d16). VAR itself
    decays linearly to 0.1x instead.
  * Validation loss with label dropout OFF (the conditional loss): VAR's forward drops labels in
    eval mode too, which makes a plateau / early-stopping signal noisy.
  * Loss: cross-entropy averaged over all L tokens (VAR's 1/L weights), label smoothing 0 (VAR).
  * AdaLN gate init 1e-3 (VAR's d16 command: --alng 1e-3; its default is 1e-5).
Mixed precision: bf16 autocast on CUDA (VAR: fp16 with a scaler; l2-normalised attention keeps
either stable, VAR#38); the teacher-forcing input, the quantizer and the logits stay float32.
Sampling and metrics run on rank 0 after training. Resume: checkpoints at epoch ends; each epoch
draws its data order, label dropout and stochastic depth from (seed, epoch, rank), so `--resume`
reproduces the uninterrupted run exactly (tested on CPU).
"""
import argparse
import contextlib
import itertools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

EXPERIMENT = "generator_var"

# ------------------------------------------------------------------------------------------------
# The token sequence: scales s_1 < ... < s_K laid end to end, each row-major
# ------------------------------------------------------------------------------------------------


def scale_slices(scales):
    """[(begin, end)] of each scale in the flattened sequence of L = sum s_k^2 tokens."""
    ends = list(itertools.accumulate(s * s for s in scales))
    return list(zip([0] + ends[:-1], ends))


def scale_of_position(scales):
    """(L,) long: the scale index of every sequence position."""
    return torch.cat([torch.full((s * s,), k, dtype=torch.long) for k, s in enumerate(scales)])


def block_causal_mask(scales):
    """(L, L) bool, True where query i may attend to key j: scale(i) >= scale(j). Scale k sees all
    coarser scales and every token of its own scale (bidirectional inside a scale), never a finer
    one: the generator predicts a whole scale at once from the scales before it (VAR section 3.2)."""
    level = scale_of_position(scales)
    return level[:, None] >= level[None, :]


def flatten_scales(indices):
    """[(B, s_1, s_1), ..., (B, s_K, s_K)] index maps (a token dump stores int16) -> (B, L) long."""
    return torch.cat([idx.reshape(idx.shape[0], -1).long() for idx in indices], 1)


# ------------------------------------------------------------------------------------------------
# Model: VAR's transformer (FoundationVision/VAR models/var.py, models/basic_var.py)
# ------------------------------------------------------------------------------------------------


def drop_path(x, p, training):
    """Stochastic depth per sample (Huang et al. 2016): the residual branch is dropped for a whole
    sample with probability p and the kept ones are rescaled by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SelfAttention(nn.Module):
    """Multi-head self-attention with l2-normalised queries and keys (VAR's --anorm, on by default
    there): q and k are unit vectors, so logits lie in [-tau, tau] with a learned per-head
    temperature tau = exp(min(log_tau, log 100)), initialised at 4. That keeps attention logits
    bounded in fp16 / bf16 (VAR#38). Biases on q and v only (a key bias shifts every logit of a
    query equally). `cache`, a dict, makes the layer append this call's keys and values to those
    of earlier calls and attend to all of them: the kv cache of scale-by-scale decoding."""

    MAX_LOG_TAU = math.log(100.0)

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise UserError(f"the width {width} must divide by the number of heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.log_tau = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC, mask=None, cache=None):
        b, n, c = x_BLC.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x_BLC, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * self.log_tau.clamp(max=self.MAX_LOG_TAU).exp()
        k = F.normalize(k, dim=-1)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms (no affine parameters) are scaled and shifted by
    the class condition, and whose two residual branches are gated by it: SiLU -> Linear(D, 6C)
    gives (gamma1, gamma2, scale1, scale2, shift1, shift2) per sample (adaptive LayerNorm)."""

    def __init__(self, width, heads, mlp_ratio, drop_path_p, eps):
        super().__init__()
        self.width, self.drop_path_p = width, drop_path_p
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.attn = SelfAttention(width, heads)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x_BLC, cond_BD, mask=None, cache=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada(cond_BD).view(-1, 1, 6, self.width).unbind(2)
        h = self.attn(self.norm(x_BLC) * (1 + scale1) + shift1, mask, cache)
        x_BLC = x_BLC + drop_path(h * gamma1, self.drop_path_p, self.training)
        h = self.mlp(self.norm(x_BLC) * (1 + scale2) + shift2)
        return x_BLC + drop_path(h * gamma2, self.drop_path_p, self.training)


class AdaLNHead(nn.Module):
    """Adaptive LayerNorm before the classifier (VAR's AdaLNBeforeHead), then Linear(C, V)."""

    def __init__(self, width, vocab, eps):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, vocab)

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return self.out(self.norm(x_BLC) * (1 + scale) + shift).float()


class VAR(nn.Module):
    """Class-conditional next-scale prediction (Tian et al. 2024).

    Sequence of L = sum s_k^2 positions. Position 0.. s_1^2-1 (the first scale) holds the start
    token: class embedding + a learned start position. Scale k+1's positions hold the word
    embedding (Linear token_dim -> C) of the teacher-forcing input, the accumulated tokenizer
    reconstruction f_hat_k area-downsampled to s_{k+1} (`MultiScaleQuantizer.teacher_forcing_input`).
    Every position adds a level embedding (its scale) and an absolute position embedding. The
    output at every position of scale k is a distribution over the V codes of that position.

    The class embedding has num_classes + 1 rows; the last is the null class of classifier-free
    guidance. In training, labels are replaced by it with probability `label_dropout`; never in eval,
    so a validation loss is the conditional loss (VAR's forward drops labels in eval too).
    Defaults follow VAR's build_vae_var: width 64 * depth, heads = depth, MLP ratio 4, stochastic
    depth rising linearly to 0.1 * depth / 24, LayerNorm eps 1e-6.
    """

    def __init__(self, num_classes, vocab, token_dim, scales, depth=16, width=None, heads=None,
                 mlp_ratio=4.0, drop_path_rate=None, label_dropout=0.1, eps=1e-6):
        super().__init__()
        self.num_classes, self.vocab, self.token_dim = num_classes, vocab, token_dim
        self.scales = tuple(int(s) for s in scales)
        self.width = width = width or 64 * depth
        heads = heads or depth
        self.label_dropout = label_dropout
        self.drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.slices = scale_slices(self.scales)
        self.L, self.first_l = self.slices[-1][1], self.scales[0] ** 2

        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, width))
        self.word_embed = nn.Linear(token_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.L, width))
        self.lvl_embed = nn.Embedding(len(self.scales), width)
        rates = [self.drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # linear from 0
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads, mlp_ratio, p, eps) for p in rates)
        self.head = AdaLNHead(width, vocab, eps)
        self.register_buffer("level", scale_of_position(self.scales), persistent=False)
        self.register_buffer("mask", block_causal_mask(self.scales), persistent=False)

    @torch.no_grad()
    def init_weights(self, std=None, head=0.02, adaln=0.5, adaln_gamma=1e-3):
        """VAR's init_weights: truncated normal with std sqrt(1 / 3C) for every linear and embedding
        weight and the position parameters, zero biases; the classifier scaled by `head`; the
        adaptive-LayerNorm maps by `adaln`, their two gate rows (gamma1, gamma2) by `adaln_gamma`
        (VAR's --alng, 1e-3 in its d16 command) so every block starts close to the identity;
        attention and MLP output projections divided by sqrt(2 depth) (GPT-2)."""
        std = math.sqrt(1.0 / (3 * self.width)) if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        self.head.out.weight.mul_(head)
        self.head.ada[-1].weight.mul_(adaln)
        c, scale = self.width, math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            block.attn.proj.weight.div_(scale)
            block.mlp[-1].weight.div_(scale)
            block.ada[-1].weight[2 * c:].mul_(adaln)
            block.ada[-1].weight[:2 * c].mul_(adaln_gamma)
        return self

    def drop_labels(self, labels_B):
        """Label dropout for classifier-free guidance: training only."""
        if not self.training or self.label_dropout == 0:
            return labels_B
        drop = torch.rand(labels_B.shape, device=labels_B.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels_B, self.num_classes), labels_B)

    def level_position(self, begin, end):
        """Level + absolute position embedding of positions [begin, end): (1, end - begin, C)."""
        return self.lvl_embed(self.level[begin:end])[None] + self.pos_embed[:, begin:end]

    def start_tokens(self, cond_BD):
        """The first scale's input: class embedding + start position + level/position (B, s_1^2, C)."""
        return cond_BD[:, None] + self.pos_start + self.level_position(0, self.first_l)

    def forward(self, labels_B, x_BLCv):
        """Teacher-forced logits (B, L, V) for labels (B,) and inputs (B, L - s_1^2, token_dim)."""
        cond_BD = self.class_emb(self.drop_labels(labels_B))
        rest = self.word_embed(x_BLCv.float()) + self.level_position(self.first_l, self.L)
        x_BLC = torch.cat([self.start_tokens(cond_BD), rest], 1)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BD, self.mask)
        return self.head(x_BLC, cond_BD)

    def step(self, x_BlC, cond_BD, caches):
        """Logits of one scale's positions (B, l, V), attending to the cached earlier scales."""
        for block, cache in zip(self.blocks, caches):
            x_BlC = block(x_BlC, cond_BD, None, cache)
        return self.head(x_BlC, cond_BD)


# ------------------------------------------------------------------------------------------------
# Inference: scale by scale with a kv cache, classifier-free guidance, top-k / top-p sampling
# ------------------------------------------------------------------------------------------------


def guidance_scale(cfg, k, num_scales):
    """VAR's guidance schedule: t = cfg * k / (K - 1), from 0 at the first scale to cfg at the last
    (the first scale holds the class token alone; strong guidance there collapses diversity)."""
    return cfg * k / max(1, num_scales - 1)


# Classifier-free guidance, as the result JSON states it (t = 0 is the conditional model; LlamaGen's
# scale s = 1 + t, see llamagen_deferred.py).
GUIDANCE = "(1 + t) c - t u = c + t (c - u) at scale k, t = cfg * k / (K - 1); u: null-class logits"


def guided_logits(logits_2BlV, t):
    """(1 + t) * conditional - t * unconditional, the halves of a batch doubled with the null class."""
    cond, uncond = logits_2BlV.chunk(2)
    return (1 + t) * cond - t * uncond


def sample_logits(logits_BlV, top_k, top_p, generator):
    """One code per position from softmax of the filtered logits, drawn from `generator`."""
    probs = common.filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


@torch.no_grad()
def decode_scales(model, quantizer, labels_B, pick, guided):
    """Scale-by-scale decoding with a kv cache. At scale k the model sees only the new scale's
    inputs; keys and values of the coarser scales come from the cache, which is exactly what the
    block-causal mask lets the full forward see. `pick(k, logits)` turns the logits of scale k
    ((2B, l, V) when `guided`: conditional half, then the null-class half) into (B, l) indices.
    Returns ([(B, s, s)] indices per scale, the final f_hat (B, token_dim, H, W))."""
    b = labels_B.shape[0]
    rows = torch.cat([labels_B, torch.full_like(labels_B, model.num_classes)]) if guided else labels_B
    cond_BD = model.class_emb(rows)
    caches = [{} for _ in model.blocks]
    grid = quantizer.scales[-1]
    f_hat = torch.zeros(b, quantizer.dim, grid, grid, device=labels_B.device)
    x_BlC, indices = model.start_tokens(cond_BD), []
    for k, (s, (begin, end)) in enumerate(zip(model.scales, model.slices)):
        idx_Bl = pick(k, model.step(x_BlC, cond_BD, caches))
        indices.append(idx_Bl.reshape(b, s, s))
        f_hat, nxt = quantizer.next_scale_input(k, f_hat, idx_Bl)
        if nxt is not None:
            nb, ne = model.slices[k + 1]
            x_BlC = model.word_embed(nxt) + model.level_position(nb, ne)
            x_BlC = torch.cat([x_BlC, x_BlC]) if guided else x_BlC
    return indices, f_hat


def generate(model, quantizer, labels_B, cfg, top_k, top_p, generator):
    """Class-conditional samples: classifier-free guidance growing with the scale index, then
    top-k / top-p sampling from `generator` (one stream for the whole run: reseeding it per batch
    would repeat images and fake diversity, VAR#61). Returns indices per scale and f_hat."""
    num = len(model.scales)

    def pick(k, logits):
        return sample_logits(guided_logits(logits, guidance_scale(cfg, k, num)), top_k, top_p, generator)
    return decode_scales(model, quantizer, labels_B, pick, guided=True)


# ------------------------------------------------------------------------------------------------
# Training: teacher forcing, AdamW as VAR, validation loss without label dropout
# ------------------------------------------------------------------------------------------------

# Parameters without weight decay besides biases and 1-D tensors (VAR train.py: nowd_keys).
NO_DECAY_KEYS = ("pos_start", "pos_embed", "lvl_embed", "log_tau")


def param_groups(model, weight_decay):
    """AdamW groups as VAR's filter_params: decay on weight matrices and embeddings, none on
    biases, 1-D parameters, position / level embeddings and attention temperatures."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)
            (plain if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def token_loss(logits_BLV, idx_BL, label_smoothing=0.0):
    """Cross-entropy averaged over all L tokens and the batch (VAR: weight 1/L per token, summed
    over the sequence, averaged over the batch: the same number)."""
    return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]).float(), idx_BL.reshape(-1),
                           label_smoothing=label_smoothing)


def teacher_forced_logits(model, quantizer, labels_B, idx_BL):
    """Logits of the whole sequence from ground-truth tokens; the input is built by the frozen
    tokenizer's quantizer (float32, no gradient)."""
    with torch.no_grad():
        x_BLCv = quantizer.teacher_forcing_input(idx_BL)
    return model(labels_B, x_BLCv)


def train_step(ddp_model, quantizer, labels_B, idx_BL, opt, args, device):
    """One optimizer step on this rank's share of a global batch, split into --grad-accum
    micro-batches (VAR's --ac: the batch of the recipe on fewer or smaller GPUs): teacher-forced
    cross-entropy under bf16 autocast (CUDA), gradients summed over micro-batches and averaged over
    ranks (DDP synchronises the last micro-batch only), clipped at --clip (VAR: 2.0).
    Returns (mean loss, gradient norm before clipping)."""
    opt.zero_grad(set_to_none=True)
    parts = list(zip(labels_B.chunk(args.grad_accum), idx_BL.chunk(args.grad_accum)))
    total = labels_B.new_zeros((), dtype=torch.float32)
    for i, (labels, idx) in enumerate(parts):
        last = i == len(parts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
        with sync:
            with common.autocast_for(device):
                loss = token_loss(teacher_forced_logits(ddp_model, quantizer, labels, idx), idx, args.label_smoothing)
            (loss * labels.shape[0] / labels_B.shape[0]).backward()
        total += loss.detach() * labels.shape[0] / labels_B.shape[0]
    params = [p for group in opt.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
    opt.step()
    return total, norm.detach()


@torch.no_grad()
def validation_loss(model, quantizer, dump, args, info):
    """Teacher-forced cross-entropy and next-token accuracy on a held-out dump, per scale and over
    all L tokens, with the model in eval mode: no label dropout (conditional loss; VAR's forward
    would drop 10% of the labels here too and make the early-stopping signal noisy), no
    stochastic depth. Every rank scores its share; sums are all-reduced."""
    was_training = model.training
    model.eval()
    num = len(model.scales)
    sums = torch.zeros(2 * num + 1, dtype=torch.float64, device=info.device)  # CE per scale, hits per scale, images
    for rows in common.epoch_batches(len(dump), args.batch_size // args.grad_accum, args.seed, 0, info.rank,
                                     info.world_size, shuffle=False):  # micro-batches: what fits in memory
        if rows.numel() == 0:
            continue
        idx_BL, labels_B = dump.tokens_NL[rows].to(info.device), dump.labels[rows].to(info.device)
        with common.autocast_for(info.device):
            logits = teacher_forced_logits(model, quantizer, labels_B, idx_BL)
        ce = F.cross_entropy(logits.float().transpose(1, 2), idx_BL, reduction="none")  # (B, L)
        hit = (logits.argmax(-1) == idx_BL).double()
        for k, (b, e) in enumerate(model.slices):
            sums[k] += ce[:, b:e].double().sum()
            sums[num + k] += hit[:, b:e].sum()
        sums[-1] += rows.numel()
    common.all_reduce_sum(sums)
    model.train(was_training)
    n = sums[-1].clamp(min=1)
    tokens = torch.tensor([b - a for a, b in model.slices], dtype=torch.float64, device=info.device)
    return {"val_loss": (sums[:num].sum() / (n * model.L)).item(),
            "val_accuracy": (sums[num:2 * num].sum() / (n * model.L)).item(),
            "val_loss_per_scale": (sums[:num] / (n * tokens)).tolist()}


def train(args, info, inputs, run, paths):
    """Epochs until --epochs or early stopping. Every epoch draws its data order from (seed, epoch)
    and the rank's label dropout and stochastic depth from (seed, epoch, rank), so a resumed run
    repeats the uninterrupted one; the validation loss then drives ReduceLROnPlateau / early
    stopping, and rank 0 writes best.pt (lowest validation loss) before last.pt."""
    tokenizer, tokenizer_cfg, train_dump, val_dump = inputs
    common.seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(args, train_dump, tokenizer_cfg["token_dim"]).init_weights(adaln_gamma=args.adaln_gamma_init)
    model = model.to(info.device)
    quantizer = tokenizer.to(info.device).quantizer
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule, state = common.resume_generator_training(run, model, opt, args, paths["last"])
    ddp_model = common.wrap_ddp(model, info)
    plan = common.generator_schedule(args, len(train_dump))
    warmup_steps = plan["warmup_steps"]
    common.print0(f"VAR: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {len(train_dump)} "
                  f"training images of {train_dump.seq_len} tokens (scales {list(train_dump.scales)}), "
                  f"{train_dump.codebook_size} codes, {train_dump.num_classes} classes; "
                  f"{plan['steps_per_epoch']} steps per epoch, warm-up {plan['warmup_steps']} steps")
    while not schedule.stopped and state["epoch"] < args.epochs:
        epoch = state["epoch"]
        torch.manual_seed(common.epoch_seed(args.seed, epoch, 1 + info.rank))
        batches = common.epoch_batches(len(train_dump), args.batch_size, args.seed, epoch, info.rank, info.world_size)
        views = common.training_views(args, train_dump, epoch)  # one augmented view per image, or None: plain
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # steps, loss, gradient norm
        start = time.time()
        for rows in common.progress_bar(batches, desc=f"epoch {epoch}", leave=False):
            common.set_lr(opt, schedule.lr * common.warmup_factor(state["step"], warmup_steps))
            loss, norm = train_step(ddp_model, quantizer, train_dump.labels[rows].to(info.device),
                                    train_dump.batch(rows, None if views is None else views[rows]).to(info.device),
                                    opt, args, info.device)
            state["step"] += 1
            sums += torch.stack([torch.ones((), dtype=torch.float64, device=info.device), loss.double(), norm.double()])
        common.all_reduce_sum(sums)
        common.check_finite(sums[1], f"epoch {epoch}")  # on every rank alike, before any checkpoint
        seconds = time.time() - start
        val = validation_loss(model, quantizer, val_dump, args, info)
        record = {"epoch": epoch, "step": state["step"], "lr": schedule.lr,
                  "train_loss": (sums[1] / sums[0].clamp(min=1)).item(),
                  "grad_norm": (sums[2] / sums[0].clamp(min=1)).item(), **val,
                  "images_per_second": len(batches) * args.batch_size / seconds, "seconds": seconds}
        common.end_generator_epoch(record, model, opt, schedule, state, args, info, paths, warmup_steps,
                                   val_accuracy=val["val_accuracy"], tokenizer=train_dump.tokenizer)
    return common.finish_generator_training(schedule, state)


# ------------------------------------------------------------------------------------------------
# Samples and metrics (rank 0; paper section 6.1: g-FID, pixel distance, LPIPS diversity)
# ------------------------------------------------------------------------------------------------


def sample_and_report(args, info, inputs, ckpt_path, history, paths):
    """Class-balanced samples of the checkpoint at ckpt_path, drawn scale by scale from ONE
    generator seeded once with --sample-seed; files, metrics and the result JSON through
    common.report_samples."""
    tokenizer, tokenizer_cfg, dump, _ = inputs
    ckpt = common.load_checkpoint(ckpt_path)
    model = build_model(ckpt["args"], dump, tokenizer_cfg["token_dim"]).to(info.device)
    common.load_weights(model, ckpt["model"], ckpt_path, f"a VAR for the dump's {dump.codebook_size} codes, "
                        f"{dump.num_classes} classes and scales {list(dump.scales)}")
    model.eval()
    tokenizer.to(info.device)
    generator = torch.Generator(info.device).manual_seed(args.sample_seed)

    def sample_tokens(labels_B):
        with common.autocast_for(info.device):
            indices, _ = generate(model, tokenizer.quantizer, labels_B, args.cfg_scale, args.top_k, args.top_p,
                                  generator)
        return flatten_scales(indices)
    sampling = {"cfg_scale": args.cfg_scale, "cfg_schedule": "linear in the scale index, 0 at the first",
                "guidance": GUIDANCE,
                "top_k": args.top_k, "top_p": args.top_p, "more_smooth": False}
    metrics = {"val_loss": ckpt.get("val_loss"), "val_accuracy": ckpt.get("val_accuracy"),
               "best_epoch": ckpt.get("epoch", 0) - 1}
    return common.report_samples(args, EXPERIMENT, tokenizer, tokenizer_cfg, dump, sample_tokens, sampling, metrics,
                                 history, ckpt_path, paths, info.device, common.model_status(ckpt))


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

RANGES = {**common.GENERATOR_RANGES, "depth": ">= 1", "width": ">= 0", "heads": ">= 0", "mlp_ratio": "> 0",
          "drop_path": "[0, 1)", "adaln_gamma_init": ">= 0", "batch_size": ">= 1", "grad_accum": ">= 1", "lr": "> 0",
          "weight_decay": ">= 0", "clip": ">= 0", "label_smoothing": "[0, 1)", "epochs": ">= 0"}
# Settings that define a training run: --resume refuses a checkpoint made under other values, and
# --sample-only takes them from the checkpoint. (--grad-accum changes memory, not the maths.)
ARCH = ("depth", "width", "heads", "mlp_ratio", "drop_path", "label_dropout", "adaln_gamma_init")
DEFINING = ARCH + ("tokenizer", "tokens_dir", "no_augment", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "warmup_steps", "clip",
                   "label_smoothing", "plateau_factor", "plateau_patience", "patience", "seed")


def build_model(cfg, dump, token_dim):
    """VAR for a dump's classes, codes and scales; architecture from args or a checkpoint's args."""
    cfg = cfg if isinstance(cfg, dict) else vars(cfg)
    return VAR(dump.num_classes, dump.codebook_size, token_dim, dump.scales, depth=cfg["depth"],
               width=cfg["width"] or None, heads=cfg["heads"] or None, mlp_ratio=cfg["mlp_ratio"],
               drop_path_rate=cfg["drop_path"], label_dropout=cfg["label_dropout"])


def validate(args):
    common.validate_generator_args(args)
    width, heads = args.width or 64 * args.depth, args.heads or args.depth
    if width % heads:
        raise UserError(f"the width {width} must be divisible by the {heads} heads (--width, --heads)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must divide into {world} processes x --grad-accum "
                        f"{args.grad_accum} micro-batches")


def load_inputs(args):
    """Tokenizer (frozen, CPU), its args, the training and validation dumps (one-line errors)."""
    return common.load_generator_inputs(args, "msvq")  # the dumps' scales are the tokenizer's (checked there)


def main(args):
    return common.run_generator(args, "msvq", ranges=RANGES, defining=DEFINING, validate=validate,
                                load_inputs=load_inputs, train=train, sample_and_report=sample_and_report)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = common.add_generator_arguments(p, "msvq", out_default="runs/generator_var")
    g.add_argument("--cfg-scale", type=float, default=1.5,
                   help="guidance at the last scale, t = cfg x k / (K - 1) at scale k (VAR's FID recipe: 1.5)")
    g.add_argument("--top-k", type=int, default=900, help="0: off (VAR: 900, tuned for 4,096 codes)")
    g.add_argument("--top-p", type=float, default=0.96, help="0 or 1: off (VAR: 0.96)")
    g.add_argument("--skip-untruncated", action="store_true",
                   help="no second sample set with top-k 0 / top-p 1 (default: sampled as <name>_untruncated "
                        "whenever --top-k / --top-p truncate; common.untruncated_args)")

    g = p.add_argument_group("model (VAR's build_vae_var at --depth)")
    g.add_argument("--depth", type=int, default=16, help="transformer blocks (paper: 16, the smallest VAR)")
    g.add_argument("--width", type=int, default=0, help="0: 64 x depth")
    g.add_argument("--heads", type=int, default=0, help="0: depth")
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth of the last block, rising linearly from 0 (default 0.1 x depth / 24)")
    g.add_argument("--adaln-gamma-init", type=float, default=1e-3,
                   help="init multiplier of the AdaLN gates (VAR's --alng; 1e-3 in its d16 command)")

    g = p.add_argument_group("training (VAR's AdamW recipe, the paper's plateau schedule)")
    g.add_argument("--batch-size", type=int, default=768, help="global batch, all processes together (VAR d16: 768)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process (VAR's --ac)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (VAR: 1e-4 x batch / 256)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip", type=float, default=2.0, help="gradient-norm clipping (0: none)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=200, help="cap (VAR d16: 200); early stopping usually ends sooner")
    common.add_generator_training_arguments(g, 4.0, "VAR: 1/50 of its 200 epochs")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser())
