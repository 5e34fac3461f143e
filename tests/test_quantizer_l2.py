"""The l2-normalised mode of common.VectorQuantizer (LlamaGen's quantizer, vq_model.py).

Expected values are computed here in float64 from the definitions (unit vectors u = z / ||z||,
nearest code by cosine, the Jacobian of the projection), never by calling the quantizer twice.
"""
import pytest
import torch
import torch.nn.functional as F

from common import MultiScaleQuantizer, UserError, VectorQuantizer, deferred_switch


def unit64(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def l2_vq(num_codes=32, dim=4, seed=0, **kw):
    torch.manual_seed(seed)
    return VectorQuantizer(num_codes, dim, init="gaussian", l2_norm=True, **kw)


def test_init_is_uniform_then_normalised():
    torch.manual_seed(3)
    expected = unit64(torch.empty(64, 8).uniform_(-1 / 64, 1 / 64))
    torch.manual_seed(3)
    vq = VectorQuantizer(64, 8, l2_norm=True)
    assert torch.allclose(vq.embed.double(), expected, atol=1e-6)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(64), atol=1e-6)


def test_search_output_and_codes_are_unit_vectors():
    vq = l2_vq()
    z = torch.randn(3, 4, 5, 5) * 7.0  # encoder outputs far from the unit sphere
    z_q, idx, _ = vq(z)
    u = unit64(z.permute(0, 2, 3, 1).reshape(-1, 4))
    cos = u @ unit64(vq.embed).t()
    assert torch.equal(idx.reshape(-1), cos.argmax(1))  # nearest on the sphere = largest cosine
    assert torch.allclose(z_q.norm(dim=1), torch.ones(3, 5, 5), atol=1e-5)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4).double(), unit64(vq.embed)[idx.reshape(-1)], atol=1e-6)


def test_disabled_l2_quantizer_is_the_projection():
    vq = l2_vq(enabled=False)
    z = torch.randn(2, 4, 3, 3) * 5
    out, idx, loss = vq(z)
    assert idx is None and float(loss) == 0.0
    assert torch.allclose(out.double(), unit64(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)


def test_straight_through_gradient_passes_through_the_projection():
    vq = l2_vq()
    z = (torch.randn(20, 4) * 3).requires_grad_(True)
    z_q, _, _ = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    # d(z/||z||)/dz = (I - u u^T) / ||z||, applied to the upstream gradient
    zd, gd = z.detach().double(), g.double()
    u = unit64(zd)
    expected = (gd - (gd * u).sum(1, keepdim=True) * u) / zd.norm(dim=1, keepdim=True)
    assert torch.allclose(z.grad.double(), expected, atol=1e-6)


def test_loss_is_codebook_plus_beta_commitment_on_unit_vectors():
    z0 = torch.randn(30, 4) * 2
    grads = {}
    for beta in (0.25, 1.0):
        vq = l2_vq(beta=beta)
        z = z0.clone().requires_grad_(True)
        _, idx, loss = vq(z)
        u, codes = unit64(z0), unit64(vq.embed.detach())
        # both terms have the value mean((q - u)^2); beta multiplies the commitment term only
        expected = (1 + beta) * ((codes[idx] - u) ** 2).mean()
        assert torch.allclose(loss.double(), expected, atol=1e-6)
        loss.backward()
        grads[beta] = (z.grad.clone(), vq.embed.grad.clone())
    assert torch.allclose(grads[0.25][0], 0.25 * grads[1.0][0], atol=1e-7)  # encoder side scales with beta
    assert torch.allclose(grads[0.25][1], grads[1.0][1], atol=1e-7)  # codebook side does not


def test_gradient_steps_grow_the_raw_norm_but_not_the_effective_codes():
    # The gradient through the projection is tangent to the sphere, so plain SGD steps can only
    # lengthen a stored code: raw LlamaGen codebooks drift off the sphere (the paper's 1.42 mean
    # pairwise distance on raw codes exceeds what unit vectors allow), the effective codes do not.
    vq = l2_vq(num_codes=8, dim=3)
    opt = torch.optim.SGD(vq.parameters(), lr=0.5)
    for _ in range(20):
        _, _, loss = vq(torch.randn(64, 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = vq.embed.detach().norm(dim=1)
    assert (norms > 1 + 1e-4).all()
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(8), atol=1e-6)


def test_ema_step_stays_on_the_sphere():
    vq = l2_vq(num_codes=4, dim=3, ema_decay=0.5)
    vq.set_codes(torch.ones(4, dtype=torch.bool), torch.eye(4, 3) * 3 + 0.1)  # written as unit vectors
    assert torch.allclose(vq.embed.norm(dim=1), torch.ones(4), atol=1e-6)
    before = vq.embed.double().clone()
    z = torch.tensor([[2.0, 0.2, 0.0], [4.0, -0.2, 0.0], [0.0, 0.0, 9.0]])
    vq.train()
    _, idx, _ = vq(z)
    u = unit64(z)
    counts = torch.bincount(idx, minlength=4).double()
    sums = torch.zeros(4, 3, dtype=torch.float64).index_add_(0, idx, u)
    size = 0.5 * 1.0 + 0.5 * counts
    avg = 0.5 * before + 0.5 * sums  # embed_avg started equal to the written unit codes
    smoothed = (size + 1e-5) / (size.sum() + 4e-5) * size.sum()
    assert torch.allclose(vq.embed.double(), unit64(avg / smoothed[:, None]), atol=1e-6)


def test_data_init_writes_unit_vectors_of_the_embeddings():
    vq = l2_vq(num_codes=16, dim=4)
    emb = torch.randn(40, 4) * 5
    vq.init_from_embeddings(emb, method="sample", seed=1)
    rows = unit64(emb)
    stored = vq.embed.detach().double()
    # every code is the direction of a distinct embedding
    match = torch.cdist(stored, rows).min(1)
    assert match.values.max() < 1e-6 and match.indices.unique().numel() == 16
    vq.init_from_embeddings(emb, method="kmeans", seed=1)
    assert torch.allclose(vq.embed.norm(dim=1), torch.ones(16), atol=1e-6)


def test_raw_data_init_stores_the_embeddings_and_searches_as_the_unit_one():
    emb = torch.randn(40, 4) * 5
    raw, unit = l2_vq(num_codes=16, dim=4), l2_vq(num_codes=16, dim=4)
    raw.init_from_embeddings(emb, method="sample", seed=1, unit_codes=False)
    unit.init_from_embeddings(emb, method="sample", seed=1)
    match = torch.cdist(raw.embed.detach().double(), emb.double()).min(1)
    assert match.values.max() < 1e-5 and match.indices.unique().numel() == 16  # the embeddings themselves
    assert raw.embed.detach().norm(dim=1).min() > 1.5  # not projected (these embeddings have norm ~10)
    assert torch.allclose(raw.codebook, unit.codebook, atol=1e-6)  # same draw, same effective codes
    z = torch.randn(50, 4)
    assert torch.equal(raw(z)[1], unit(z)[1])
    # with Adam a step moves a stored code by ~lr whatever its norm: the raw code turns ~||code|| times less
    angles = []
    for vq in (raw, unit):
        opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
        before = vq.codebook.detach().clone()
        _, _, loss = vq(z)
        loss.backward()
        opt.step()
        moved = vq.codebook.detach()
        angles.append(torch.arccos((before * moved).sum(1).clamp(-1, 1)).max())
    assert angles[0] < angles[1] / 3
    with pytest.raises(UserError, match="gradient-trained codebook"):  # an l2 EMA update writes unit vectors
        l2_vq(num_codes=16, dim=4, ema_decay=0.99).init_from_embeddings(emb, unit_codes=False)


def test_deferred_switch_initialises_exactly_once_from_the_first_batch(monkeypatch):
    vq = l2_vq(num_codes=8, dim=4, enabled=False)
    calls = []
    original = VectorQuantizer.init_from_embeddings

    def spy(self, embeddings, **kw):
        calls.append(embeddings.clone())
        return original(self, embeddings, **kw)

    monkeypatch.setattr(VectorQuantizer, "init_from_embeddings", spy)
    batches = [torch.randn(4, 4) * 3 for _ in range(5)]
    n = deferred_switch(vq, lambda b: b, iter(batches), ratio=1.0)
    assert n == 8 and len(calls) == 1 and vq.is_enabled
    assert torch.equal(calls[0], torch.cat(batches[:2]))  # ratio x K vectors, from the first batches only
    match = torch.cdist(vq.embed.detach().double(), unit64(calls[0])).min(1).values
    assert match.max() < 1e-6


@pytest.mark.parametrize("kwargs", [dict(simvq=True), dict(affine_lr=1.0)])
def test_l2_with_reparameterisations_is_refused(kwargs):
    with pytest.raises(UserError, match="l2_norm .* is not combined with affine_lr or simvq"):
        VectorQuantizer(8, 4, l2_norm=True, **kwargs)


def test_multiscale_quantizer_refuses_l2():
    with pytest.raises(UserError, match="l2_norm is a single-scale option"):
        MultiScaleQuantizer(8, 4, scales=(1, 2), l2_norm=True)


def test_l2_off_leaves_vectors_unnormalised():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, init="gaussian", init_std=3.0)
    assert not torch.allclose(vq.codebook.norm(dim=1), torch.ones(8), atol=0.1)
    z = torch.randn(5, 4) * 4
    assert torch.equal(VectorQuantizer(8, 4, enabled=False)(z)[0], z)
    assert F.mse_loss(vq(z)[0], z) > 0  # still quantizes to the raw codes
