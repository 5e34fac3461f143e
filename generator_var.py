"""VAR: next-scale prediction over a multi-scale tokenizer's tokens (docstring completed below)."""
import math

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
    ends = torch.tensor([s * s for s in scales]).cumsum(0).tolist()
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


def split_scales(idx_BL, scales):
    """Inverse of `flatten_scales`: (B, L) -> [(B, s, s)] per scale."""
    return [idx_BL[:, b:e].reshape(-1, s, s) for (b, e), s in zip(scale_slices(scales), scales)]


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
    guidance. In training, labels are replaced by it with probability `cond_drop`; never in eval,
    so a validation loss is the conditional loss (VAR's forward drops labels in eval too).
    Defaults follow VAR's build_vae_var: width 64 * depth, heads = depth, MLP ratio 4, stochastic
    depth rising linearly to 0.1 * depth / 24, LayerNorm eps 1e-6.
    """

    def __init__(self, num_classes, vocab, token_dim, scales, depth=16, width=None, heads=None,
                 mlp_ratio=4.0, drop_path_rate=None, cond_drop=0.1, eps=1e-6):
        super().__init__()
        self.num_classes, self.vocab, self.token_dim = num_classes, vocab, token_dim
        self.scales = tuple(int(s) for s in scales)
        self.width = width = width or 64 * depth
        heads = heads or depth
        self.cond_drop = cond_drop
        self.drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.slices = scale_slices(self.scales)
        self.L, self.first_l = self.slices[-1][1], self.scales[0] ** 2

        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, width))
        self.word_embed = nn.Linear(token_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.L, width))
        self.lvl_embed = nn.Embedding(len(self.scales), width)
        rates = torch.linspace(0, self.drop_path_rate, depth).tolist()
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
        if not self.training or self.cond_drop == 0:
            return labels_B
        drop = torch.rand(labels_B.shape, device=labels_B.device) < self.cond_drop
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


def guided_logits(logits_2BlV, t):
    """(1 + t) * conditional - t * unconditional, the halves of a batch doubled with the null class."""
    cond, uncond = logits_2BlV.chunk(2)
    return (1 + t) * cond - t * uncond


def filter_top_k_top_p(logits, top_k=0, top_p=0.0):
    """Logits with everything outside the top-k set and outside the top-p nucleus set to -inf.
    top_k <= 0 or >= V keeps all; top_p <= 0 or >= 1 keeps all. The nucleus is the smallest set of
    most likely codes whose mass reaches top_p (the most likely code is always kept)."""
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


def sample_logits(logits_BlV, top_k, top_p, generator):
    """One code per position from softmax of the filtered logits, drawn from `generator`."""
    probs = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(-1)
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
        x_BLCv = quantizer.teacher_forcing_input(split_scales(idx_BL, quantizer.scales))
    return model(labels_B, x_BLCv)
