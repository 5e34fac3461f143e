"""imagenet_tokenizer.py and the shared pieces it adds to common.py: the multi-scale residual
quantizer (VAR), the VQGAN encoder/decoder, and the training / evaluation / token-dump paths on a
tiny generated ImageFolder (CPU, tiny model, LPIPS weight 0, --skip-fid)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Multi-scale residual quantizer
# ------------------------------------------------------------------------------------------------


def make_msvq(scales=(1, 2, 3, 4), dim=4, codes=32, **kw):
    torch.manual_seed(0)
    q = common.MultiScaleQuantizer(codes, dim, scales=scales, num_phi=2, **kw)
    q.vq.set_codes(torch.ones(codes, dtype=torch.bool), torch.randn(codes, dim))
    return q


def reference_pass(q, f):
    """Independent re-computation of VAR's residual pass: per-scale residual norms and contributions."""
    b, c, h, w = f.shape
    rest, contribs, norms = f.clone(), [], [f.norm().item()]
    for k, s in enumerate(q.scales):
        r = F.interpolate(rest, size=(s, s), mode="area")
        flat = r.permute(0, 2, 3, 1).reshape(-1, c)
        idx = torch.cdist(flat, q.codebook).argmin(1)
        codes = q.codebook[idx].reshape(b, s, s, c).permute(0, 3, 1, 2)
        up = F.interpolate(codes, size=(h, w), mode="bicubic") if s != h else codes
        contribution = q.phis[q.phi_index(k)](up)
        contribs.append(contribution)
        rest = rest - contribution
        norms.append(rest.norm().item())
    return contribs, norms


def test_msvq_index_shapes_and_f_hat_is_sum_of_scale_contributions():
    q = make_msvq().eval()
    f = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        z_q, indices, _ = q(f)
        contribs, _ = reference_pass(q, f)
    assert [tuple(i.shape) for i in indices] == [(3, 1, 1), (3, 2, 2), (3, 3, 3), (3, 4, 4)]
    assert torch.allclose(z_q, sum(contribs), atol=1e-5)
    # decoding the index pyramid gives the same f_hat (token dumps decode to the reconstruction)
    assert torch.allclose(q.decode_indices(indices), z_q, atol=1e-5)


def test_msvq_residual_decreases():
    # phi = identity and a zero code available: each scale can at worst leave the residual as is,
    # and the finest scale (no resampling) can only shrink it
    q = make_msvq(phi_ratio=0.0, codes=64).eval()
    q.vq.set_codes(torch.arange(64) == 0, torch.zeros(1, 4))
    f = torch.randn(8, 4, 4, 4) * 2
    with torch.no_grad():
        _, norms = reference_pass(q, f)
    assert norms[-1] <= norms[-2] + 1e-6
    assert norms[-1] < 0.8 * norms[0]


def test_msvq_beta_multiplies_the_commitment_term_only():
    f = torch.randn(2, 4, 4, 4)
    grads = {}
    for beta in (0.25, 1.0):
        q = make_msvq(beta=beta)
        x = f.clone().requires_grad_(True)
        _, _, loss = q(x)
        # value: mean over scales of (1 + beta) * ||f_hat_k - f||^2 (both terms have the same value)
        with torch.no_grad():
            contribs, _ = reference_pass(q, f)
            partial = torch.cumsum(torch.stack(contribs), 0)
            expected = (1 + beta) * torch.stack([F.mse_loss(p, f) for p in partial]).mean()
        assert torch.allclose(loss, expected, atol=1e-5)
        loss.backward()
        grads[beta] = (x.grad.clone(), q.vq.embed.grad.clone())
    assert torch.allclose(grads[0.25][0], 0.25 * grads[1.0][0], atol=1e-7)  # encoder side scales
    assert torch.allclose(grads[0.25][1], grads[1.0][1], atol=1e-7)  # codebook side does not
    assert grads[1.0][0].abs().sum() > 0 and grads[1.0][1].abs().sum() > 0


def test_msvq_straight_through_and_disabled_identity():
    q = make_msvq()
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    z_q, _, _ = q(x)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    assert torch.allclose(x.grad, w)
    q.set_enabled(False)
    y = torch.randn(2, 4, 4, 4)
    out, idx, loss = q(y)
    assert out is y and idx is None and loss.item() == 0.0


def test_msvq_ema_and_init_reuse_vector_quantizer():
    q = common.MultiScaleQuantizer(16, 4, scales=(1, 2, 4), ema_decay=0.9, enabled=False)
    emb = torch.randn(64, 4)
    n = common.deferred_switch(q, lambda b: b, [emb[:32], emb[32:]], ratio=2.0)
    assert n == 32 and q.is_enabled
    # every code is one of the collected embeddings, EMA state reset with them
    assert all((emb - c).norm(dim=1).min() < 1e-6 for c in q.codebook)
    assert torch.equal(q.vq.embed_avg, q.vq.embed)
    before = q.codebook.clone()
    q.train()(torch.randn(2, 4, 4, 4))
    assert not torch.allclose(before, q.codebook)  # the EMA step ran


def test_msvq_phi_selection_follows_scale_position():
    q = common.MultiScaleQuantizer(8, 4, scales=common.VAR_SCALES, num_phi=4)
    chosen = [q.phi_index(k) for k in range(len(q.scales))]
    assert chosen[0] == 0 and chosen[-1] == 3
    assert chosen == sorted(chosen) and set(chosen) == {0, 1, 2, 3}


def test_encoder_decoder_shapes():
    enc = common.Encoder(ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         resolution=128, z_channels=8)
    x = torch.randn(1, 3, 128, 128)
    z = enc(x)
    assert z.shape == (1, 8, 16, 16) and enc.latent_resolution == 16
    dec = common.Decoder(ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         resolution=128, z_channels=8)
    assert dec(z).shape == (1, 3, 128, 128)
