"""VectorQuantizer, nearest_code, kmeans and deferred_switch (common.py section 2), one process.

Every expected value is computed here independently (float64 brute-force distances, hand-written
EMA and loss formulas), never by calling the code under test a second time.
"""
import pytest
import torch

import common
from common import UserError, VectorQuantizer, deferred_switch, kmeans, nearest_code


def brute_nearest(z, codes):
    return torch.cdist(z.double(), codes.double()).argmin(1)


def fixed_vq(num_codes=16, dim=4, seed=0, **kw):
    """A quantizer whose codes are well spread N(0, 1) draws, so assignments are unambiguous."""
    torch.manual_seed(seed)
    vq = VectorQuantizer(num_codes, dim, init="gaussian", init_std=1.0, **kw)
    return vq


# ---- nearest-code search ------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [None, (3, 5), (1, 7), (64, 1), (1000, 1000)])
def test_nearest_code_any_tile_equals_brute_force(tile):
    g = torch.Generator().manual_seed(1)
    z, codes = torch.randn(203, 6, generator=g), torch.randn(97, 6, generator=g)
    assert torch.equal(nearest_code(z, codes, tile), brute_nearest(z, codes))


def test_nearest_code_of_no_vectors_is_empty():
    assert nearest_code(torch.zeros(0, 3), torch.randn(5, 3)).shape == (0,)


def test_nearest_code_ties_keep_first_index_across_tiles():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # codes 0, 2, 3 coincide
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert nearest_code(z, codes, (1, 1)).tolist() == [0, 1]
    assert nearest_code(z, codes).tolist() == [0, 1]


def test_quantizer_with_tiny_search_tiles_matches_default(monkeypatch):
    vq = fixed_vq(64, 8)
    z = torch.randn(300, 8)
    zq_ref, idx_ref, loss_ref = vq(z)
    monkeypatch.setitem(common.SEARCH_TILE, "cpu", (7, 5))
    zq, idx, loss = vq(z)
    assert torch.equal(idx, idx_ref) and torch.equal(idx, brute_nearest(z, vq.codebook))
    assert torch.equal(zq, zq_ref) and torch.equal(loss, loss_ref)


def test_search_stays_float32_under_bf16_autocast():
    # bf16 keeps 8 significant bits: a bf16 distance matmul picks the wrong code for ~2% of these
    # vectors (checked when this test was written), float32 for none.
    g = torch.Generator().manual_seed(2)
    codes, z = torch.randn(256, 4, generator=g), torch.randn(2000, 4, generator=g)
    vq = VectorQuantizer(256, 4, simvq=True)  # the SimVQ codebook is a Linear: autocast would round it
    with torch.no_grad():
        vq.simvq_map.weight.copy_(torch.eye(4))
        vq.simvq_map.bias.zero_()
        vq.embed.copy_(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = nearest_code(z, codes)
        z_q, vq_idx, _ = vq(z)
    assert torch.equal(idx, brute_nearest(z, codes))
    assert torch.equal(vq_idx, brute_nearest(z, codes))
    assert z_q.dtype == torch.float32 and torch.allclose(z_q, codes[vq_idx], atol=1e-6)


# ---- losses and the straight-through estimator ------------------------------------------------

def test_straight_through_gradient_and_codebook_isolation():
    vq = fixed_vq()
    z = torch.randn(40, 4, requires_grad=True)
    z_q, idx, _ = vq(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    # the task loss does not reach the codebook (no synchronized update)
    assert vq.embed.grad is None or torch.count_nonzero(vq.embed.grad) == 0
    assert torch.allclose(z_q, vq.codebook[brute_nearest(z, vq.codebook)])


def test_codebook_gradient_comes_only_from_codebook_term():
    vq = fixed_vq()
    z = torch.randn(40, 4, requires_grad=True)
    z_q, idx, loss = vq(z)
    loss.backward()
    q = vq.codebook.detach()[idx]
    n_el = z.numel()
    # d/dq ||q - sg[z]||^2 (mean over elements) = 2 (q - z) / n_el, summed into each code's row
    expected = torch.zeros_like(vq.embed).index_add_(0, idx, 2 * (q - z.detach()) / n_el)
    assert torch.allclose(vq.embed.grad, expected, atol=1e-6)
    # the encoder gets beta * d/dz ||z - sg[q]||^2 only
    assert torch.allclose(z.grad, vq.beta * 2 * (z.detach() - q) / n_el, atol=1e-6)


def test_loss_value_and_beta_placement():
    z = torch.randn(50, 4)
    grads = {}
    for beta in (0.25, 1.0):
        vq = fixed_vq(beta=beta)
        zz = z.clone().requires_grad_(True)
        _, idx, loss = vq(zz)
        q = vq.codebook.detach()[idx]
        mse = ((q - z) ** 2).mean()
        assert torch.allclose(loss, mse + beta * mse)
        loss.backward()
        grads[beta] = (zz.grad.clone(), vq.embed.grad.clone())
    # beta scales the encoder-side gradient only; the codebook gradient is the same
    assert torch.allclose(grads[1.0][0], grads[0.25][0] * 4.0, atol=1e-7)
    assert torch.equal(grads[1.0][1], grads[0.25][1])


def test_sync_nu_sends_scaled_task_gradient_to_codebook():
    nu = 0.3
    vq = fixed_vq(sync_nu=nu)
    z = torch.randn(30, 4, requires_grad=True)
    z_q, idx, _ = vq(z)
    assert torch.allclose(z_q, vq.codebook.detach()[idx])  # the forward value is still q
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    expected = torch.zeros_like(vq.embed).index_add_(0, idx, nu * upstream)
    assert torch.allclose(vq.embed.grad, expected, atol=1e-6)


# ---- EMA codebook ------------------------------------------------------------------------------

def test_ema_step_matches_hand_computation():
    gamma, eps = 0.9, 1e-5
    vq = fixed_vq(8, 3, ema_decay=gamma, eps=eps)
    vq.cluster_size.copy_(torch.rand(8) * 3)  # a state that is not the reset one
    vq.embed_avg.copy_(torch.randn(8, 3))
    vq.embed.copy_(vq.embed_avg / vq.cluster_size[:, None].clamp(min=0.1))
    old_size, old_avg, old_codes = vq.cluster_size.clone(), vq.embed_avg.clone(), vq.embed.clone()
    z = torch.randn(64, 3)
    _, idx, loss = vq.train()(z)
    assign = brute_nearest(z, old_codes)
    assert torch.equal(idx, assign)
    counts = torch.tensor([(assign == k).sum().item() for k in range(8)], dtype=torch.float32)
    sums = torch.stack([z[assign == k].sum(0) for k in range(8)])
    size = gamma * old_size + (1 - gamma) * counts
    avg = gamma * old_avg + (1 - gamma) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + 8 * eps) * n
    assert torch.allclose(vq.cluster_size, size, atol=1e-6)
    assert torch.allclose(vq.embed_avg, avg, atol=1e-6)
    assert torch.allclose(vq.codebook, avg / smoothed[:, None], atol=1e-5)
    # the EMA codebook has no codebook loss term: loss = beta * commitment
    assert torch.allclose(loss, vq.beta * ((old_codes[assign] - z) ** 2).mean())
    assert not any(p is vq.embed for p in vq.parameters())


def test_unused_ema_codes_decay_to_exact_zero_not_to_subnormals():
    """An unused code's EMA state shrinks by gamma per step; float32 subnormals (< 1.2e-38) are
    flushed to 0 (CPU arithmetic on them is tens of times slower), normal values are untouched."""
    tiny = torch.finfo(torch.float32).tiny
    gamma = 0.99
    vq = fixed_vq(8, 3, ema_decay=gamma)
    vq.cluster_size.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0, 1e-30, 1e-30, 2 * tiny, 1.5 * tiny]))
    vq.embed_avg.copy_(vq.cluster_size[:, None] * torch.tensor([1.0, -2.0, 0.5]))
    vq.embed.copy_(vq.embed_avg / vq.cluster_size[:, None])
    z = vq.embed[:4].repeat(8, 1) + 0.01 * torch.randn(32, 3)  # only codes 0-3 are used
    _, idx, _ = vq.train()(z)
    assert set(idx.tolist()) <= {0, 1, 2, 3}
    size = gamma * torch.tensor([1e-30, 1e-30, 2 * tiny, 1.5 * tiny], dtype=torch.float64)
    expected = torch.where(size < tiny, 0.0, size).float()  # 1.98 tiny stays, 1.485 tiny stays, ...
    assert torch.equal(vq.cluster_size[4:], expected)
    for _ in range(100):  # 0.99^100 * 2 tiny < tiny: codes 6 and 7 reach the subnormal range
        vq(z)
    for state in (vq.cluster_size, vq.embed_avg, vq.embed):
        assert not ((state != 0) & (state.abs() < tiny)).any()
    assert torch.equal(vq.cluster_size[6:], torch.zeros(2)) and torch.equal(vq.embed_avg[6:, 0], torch.zeros(2))
    assert (vq.cluster_size[4:6] > 0).all() and (vq.cluster_size[:4] > 0.5).all()


def test_flush_subnormal_keeps_normal_values_and_signs():
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([tiny, -tiny, tiny / 2, -tiny / 4, 0.0, 1.0, -3e-30, 2e-45])
    out = common.flush_subnormal_(x.clone())
    assert torch.equal(out, torch.tensor([tiny, -tiny, 0.0, 0.0, 0.0, 1.0, -3e-30, 0.0]))


def test_ema_does_not_update_in_eval_mode():
    vq = fixed_vq(8, 3, ema_decay=0.9).eval()
    before = vq.embed.clone()
    vq(torch.randn(64, 3))
    assert torch.equal(vq.embed, before)


# ---- initialisation ----------------------------------------------------------------------------

def test_uniform_and_gaussian_init():
    torch.manual_seed(0)
    uniform = VectorQuantizer(4096, 8).codebook.detach()
    assert uniform.abs().max() <= 1 / 4096 and uniform.min() < -0.9 / 4096 and uniform.max() > 0.9 / 4096
    gauss = VectorQuantizer(4096, 8, init="gaussian", init_std=3.0).codebook.detach()
    assert abs(gauss.std().item() - 3.0) < 0.05 and abs(gauss.mean().item()) < 0.05


def test_sample_init_picks_distinct_embedding_rows_and_resets_ema_state():
    emb = torch.randn(500, 4)
    vq = VectorQuantizer(32, 4, ema_decay=0.99, init="gaussian", init_std=10.0)
    vq.cluster_size.fill_(7.0)
    vq.steps_unused.fill_(3)
    vq.init_from_embeddings(emb, method="sample", seed=3)
    match = (vq.codebook[:, None, :] == emb[None]).all(-1)  # (codes, embeddings)
    assert (match.sum(1) == 1).all()  # every code is exactly one embedding row
    assert len(set(match.float().argmax(1).tolist())) == 32  # drawn without replacement
    assert torch.equal(vq.cluster_size, torch.ones(32)) and torch.equal(vq.embed_avg, vq.embed)
    assert vq.steps_unused.sum() == 0


def test_init_accepts_spatial_maps_channels_last():
    maps = torch.randn(2, 3, 5, 5)
    vq = VectorQuantizer(10, 3)
    vq.init_from_embeddings(maps, method="sample")
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (vq.codebook[:, None, :] == rows[None]).all(-1).any(1).all()


def distortion(x, codes):
    return torch.cdist(x.double(), codes.double()).min(1).values.pow(2).mean().item()


def test_kmeans_reduces_distortion_versus_sample():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(200, 2, generator=g) * 0.1 + c for c in torch.randn(8, 2, generator=g) * 4])
    sample, km = VectorQuantizer(8, 2), VectorQuantizer(8, 2)
    sample.init_from_embeddings(x, method="sample", seed=5)
    km.init_from_embeddings(x, method="kmeans", seed=5)
    assert distortion(x, km.codebook.detach()) < 0.7 * distortion(x, sample.codebook.detach())
    # kmeans itself: Lloyd never increases the distortion of its starting sample
    c1 = kmeans(x, 8, iters=1, generator=torch.Generator().manual_seed(6))
    c10 = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(6))
    assert distortion(x, c10) <= distortion(x, c1) + 1e-9


def test_one_ema_step_after_init_keeps_codes_near_the_data():
    # Codes start far away (std 50); after a data init the EMA state must follow, or the first
    # EMA step would pull codes back towards the stale averages.
    g = torch.Generator().manual_seed(7)
    data = torch.randn(2000, 4, generator=g) + 10.0
    vq = VectorQuantizer(64, 4, ema_decay=0.99, init="gaussian", init_std=50.0)
    vq.init_from_embeddings(data, method="sample", seed=0)
    before = vq.codebook.clone()
    vq.train()(data)
    assign = brute_nearest(data, before)
    for k in range(64):
        mean_k = data[assign == k].mean(0)
        moved, to_mean = (vq.codebook[k] - before[k]).norm(), (mean_k - before[k]).norm()
        assert moved <= to_mean + 1e-4  # a weighted mean of old code and its cluster mean


# ---- on/off switch and deferred_switch ---------------------------------------------------------

def test_disabled_quantizer_is_identity_without_loss_or_bookkeeping():
    vq = VectorQuantizer(8, 4, ema_decay=0.9, dead_code_steps=1, enabled=False).train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    z_q, idx, loss = vq(z)
    assert z_q is z and idx is None and loss.item() == 0.0
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())
    vq.set_enabled(True)
    z_q, idx, loss = vq(z)
    assert vq.is_enabled and idx.shape == (2, 3, 3) and loss.item() > 0


def test_deferred_switch_collects_ratio_times_codes_and_turns_on():
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(4, 3, 2, 2, generator=g) for _ in range(10)]  # 16 vectors per batch
    seen = []

    def encode(batch):
        seen.append(batch)
        return batch * 2.0

    vq = VectorQuantizer(10, 3, ema_decay=0.9, enabled=False)
    used = deferred_switch(vq, encode, batches, ratio=3, method="sample", seed=1)
    assert used == 30 and len(seen) == 2 and vq.is_enabled  # stops after ceil(30 / 16) batches
    rows = torch.cat([b * 2.0 for b in batches[:2]]).permute(0, 2, 3, 1).reshape(-1, 3)[:30]
    assert (vq.codebook[:, None, :] == rows[None]).all(-1).any(1).all()
    assert torch.equal(vq.embed_avg, vq.embed)


def test_deferred_switch_with_too_few_batches_raises():
    vq = VectorQuantizer(10, 3, enabled=False)
    with pytest.raises(UserError, match="larger than the 8 embeddings"):
        deferred_switch(vq, lambda b: b, [torch.randn(8, 3)], ratio=2)
    assert not vq.is_enabled


# ---- dead-code replacement ---------------------------------------------------------------------

def test_dead_code_is_replaced_after_n_unused_steps():
    vq = VectorQuantizer(4, 2, dead_code_steps=3).train()
    vq.embed.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [100.0, 100.0]]))
    z = torch.tensor([[1.1, 0.0], [0.0, 0.9], [-1.0, 0.1], [0.9, 0.1]])
    live = vq.embed.detach()[:3].clone()
    for step in range(2):
        vq(z)
        assert vq.codebook[3].tolist() == [100.0, 100.0] and vq.steps_unused[3] == step + 1
    vq(z)
    assert (vq.codebook[3] == z).all(1).any()  # replaced by a vector of the batch
    assert torch.equal(vq.embed.detach()[:3], live)  # used codes untouched
    assert vq.steps_unused.tolist() == [0, 0, 0, 0]


def test_dead_codes_get_distinct_batch_vectors_and_ema_state():
    vq = VectorQuantizer(6, 2, ema_decay=0.9, dead_code_steps=1).train()
    vq.embed.copy_(torch.cat([torch.zeros(1, 2), torch.full((5, 2), 1e3)]))
    vq.embed_avg.copy_(vq.embed)
    z = torch.randn(20, 2) * 0.1
    vq(z)
    replaced = vq.codebook[1:]
    match = (replaced[:, None, :] == z[None]).all(-1)
    assert (match.sum(1) == 1).all() and len(set(match.float().argmax(1).tolist())) == 5
    assert torch.equal(vq.embed_avg[1:], vq.embed[1:]) and torch.equal(vq.cluster_size[1:], torch.ones(5))


# ---- layouts and reparameterisations ------------------------------------------------------------

def test_spatial_layout_round_trip():
    vq = fixed_vq(32, 5)
    z = torch.randn(3, 5, 4, 6)
    z_q, idx, loss = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    assert z_q.shape == z.shape and idx.shape == (3, 4, 6)
    assert torch.equal(idx.reshape(-1), brute_nearest(flat, vq.codebook))
    assert torch.allclose(vq.decode_indices(idx), z_q, atol=1e-6)  # z_q = z + (q - z): q up to rounding
    zq_flat, idx_flat, loss_flat = vq(flat)
    assert torch.equal(idx_flat, idx.reshape(-1)) and torch.allclose(loss_flat, loss)
    with pytest.raises(ValueError):
        vq(torch.randn(3, 4, 4, 6))


def test_affine_effective_codebook_and_data_init():
    a = 2.0
    vq = fixed_vq(16, 4, affine_lr=a)
    with torch.no_grad():
        vq.affine_scale.copy_(torch.randn(4) * 0.1)
        vq.affine_bias.copy_(torch.randn(4))
    expected = (1 + a * vq.affine_scale) * vq.embed + a * vq.affine_bias
    assert torch.allclose(vq.codebook, expected)
    emb = torch.randn(100, 4) * 5
    vq.init_from_embeddings(emb, method="sample")
    nearest = torch.cdist(vq.codebook.detach().double(), emb.double()).min(1).values
    assert nearest.max() < 1e-4  # the *effective* codes sit on embedding rows
    z = torch.randn(30, 4, requires_grad=True)
    vq(z)[2].backward()
    assert vq.affine_scale.grad.abs().sum() > 0 and vq.affine_bias.grad.abs().sum() > 0


def test_simvq_starts_as_published():
    """SimVQ's own init (youngsheen/SimVQ): frozen C ~ N(0, 1/dim), a linear layer with bias in
    torch's default init U(-1/sqrt(dim), 1/sqrt(dim)); codes = C W^T + b."""
    torch.manual_seed(0)
    dim = 16
    vq = VectorQuantizer(4096, dim, simvq=True)
    assert not vq.embed.requires_grad and vq.simvq_map.weight.requires_grad and vq.simvq_map.bias.requires_grad
    assert vq.embed.mean().abs() < 0.01 and vq.embed.std().item() == pytest.approx(dim ** -0.5, rel=0.02)
    bound = dim ** -0.5
    for p in (vq.simvq_map.weight, vq.simvq_map.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound  # uniform over the whole interval
    expected = vq.embed.double() @ vq.simvq_map.weight.double().t() + vq.simvq_map.bias.double()
    assert torch.allclose(vq.codebook.double(), expected, atol=1e-6)


def test_simvq_data_init_resets_the_layer_and_replacement_writes_through_it():
    vq = fixed_vq(16, 4, simvq=True)
    emb = torch.randn(100, 4) * 5
    vq.init_from_embeddings(emb, method="sample")
    # the deferred arm: the frozen codebook holds the embeddings, the layer is the identity
    assert torch.equal(vq.simvq_map.weight.detach(), torch.eye(4)) and not vq.simvq_map.bias.detach().any()
    assert torch.cdist(vq.embed.double(), emb.double()).min(1).values.max() < 1e-6
    assert torch.allclose(vq.codebook, vq.embed)
    z = torch.randn(30, 4, requires_grad=True)
    vq(z)[2].backward()
    assert vq.embed.grad is None and vq.simvq_map.weight.grad.abs().sum() > 0
    # after training moved the layer, a replaced code still lands on the data (solved through W, b)
    with torch.no_grad():
        vq.simvq_map.weight.copy_(torch.eye(4) + 0.3 * torch.randn(4, 4))
        vq.simvq_map.bias.copy_(torch.randn(4))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[2, 5]] = True
    before = vq.codebook.detach().clone()
    vq.replace_codes(mask, emb)
    after = vq.codebook.detach()
    assert torch.cdist(after[mask].double(), emb.double()).min(1).values.max() < 1e-4
    assert torch.allclose(after[~mask], before[~mask])


# ---- failure modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(ema_decay=1.5), "ema_decay must lie in"), (dict(ema_decay=0.0), "ema_decay must lie in"),
    (dict(ema_decay=0.9, affine_lr=1.0), "EMA codebook cannot"), (dict(ema_decay=0.9, simvq=True), "EMA codebook cannot"),
    (dict(ema_decay=0.9, sync_nu=0.1), "EMA codebook cannot"), (dict(affine_lr=1.0, simvq=True), "choose one"),
    (dict(init="orthogonal"), "unknown codebook init"), (dict(init="gaussian", init_std=0.0), "init_std must be > 0"),
    (dict(beta=-1.0), "must be >= 0"), (dict(dead_code_steps=-1), "must be >= 0"), (dict(num_codes=0), "at least one code"),
])
def test_invalid_options_raise_user_error(kwargs, message):
    args = dict(num_codes=8, dim=4)
    args.update(kwargs)
    with pytest.raises(UserError, match=message):
        VectorQuantizer(**args)


def test_invalid_init_requests_raise_user_error():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(UserError, match="larger than the 5 embeddings"):
        vq.init_from_embeddings(torch.randn(5, 4))
    with pytest.raises(UserError, match="unknown init method"):
        vq.init_from_embeddings(torch.randn(50, 4), method="farthest")
    with pytest.raises(UserError, match="ratio"):
        deferred_switch(vq, lambda b: b, [torch.randn(50, 4)], ratio=0.5)
