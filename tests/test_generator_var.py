"""generator_var.py and the next-scale-prediction helpers it adds to common.MultiScaleQuantizer:
teacher-forcing input and the inference step against decode_indices and an independent
re-computation; the VAR transformer's sequence layout, block-causal mask, kv cache, CFG, sampling
and label dropout; and the CLI on a tiny tokenizer fixture (CPU)."""
import pytest
import torch
import torch.nn.functional as F

import common

# ------------------------------------------------------------------------------------------------
# common.MultiScaleQuantizer: teacher-forcing input and the inference step
# ------------------------------------------------------------------------------------------------


def make_msvq(scales=(1, 2, 3, 4), dim=4, codes=32, **kw):
    torch.manual_seed(0)
    q = common.MultiScaleQuantizer(codes, dim, scales=scales, num_phi=2, **kw)
    q.vq.set_codes(torch.ones(codes, dtype=torch.bool), torch.randn(codes, dim))
    with torch.no_grad():  # non-trivial phi convolutions
        for phi in q.phis:
            phi.weight.normal_(0, 0.2)
            phi.bias.normal_(0, 0.1)
    return q.eval()


def random_indices(q, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, q.num_codes, (batch, s, s), generator=g) for s in q.scales]


def reference_inputs(q, indices):
    """Independent re-computation of VAR's idxBl_to_var_input: explicit codebook rows, explicit
    bicubic up-sampling to the grid, the phi chosen by position, area pooling per scale, and a
    row-major flattening written as a loop over (row, column)."""
    grid, codebook = q.scales[-1], q.codebook.detach()
    b = indices[0].shape[0]
    f_hat, seq = torch.zeros(b, q.dim, grid, grid), []
    for k, idx in enumerate(indices[:-1]):
        s = q.scales[k]
        codes = codebook[idx.reshape(b, s * s)].reshape(b, s, s, q.dim).permute(0, 3, 1, 2)
        up = F.interpolate(codes, size=(grid, grid), mode="bicubic") if s != grid else codes
        f_hat = f_hat + q.phis[q.phi_index(k)](up)
        nxt = q.scales[k + 1]
        down = F.adaptive_avg_pool2d(f_hat, nxt)
        seq += [down[:, :, i, j] for i in range(nxt) for j in range(nxt)]
    return torch.stack(seq, 1)


@pytest.mark.parametrize("simvq", [False, True])
def test_teacher_forcing_input_matches_an_independent_recomputation(simvq):
    q = make_msvq(simvq=simvq)
    if simvq:  # a map far from the identity: reading the raw codes would be caught
        with torch.no_grad():
            q.vq.simvq_map.weight.normal_(0, 1)
    indices = random_indices(q, 3)
    with torch.no_grad():
        x = q.teacher_forcing_input(indices)
        ref = reference_inputs(q, indices)
    assert x.shape == (3, sum(s * s for s in q.scales) - 1, 4) and x.dtype == torch.float32
    assert torch.allclose(x, ref, atol=1e-5)


def test_inference_steps_accumulate_to_decode_indices():
    q = make_msvq(scales=(1, 2, 4, 8))
    indices = random_indices(q, 2)
    flat = [i.reshape(2, -1).to(torch.int16) for i in indices]  # dumps store int16, flat is fine too
    with torch.no_grad():
        f_hat, pieces = torch.zeros(2, 4, 8, 8), []
        for k, idx in enumerate(flat):
            f_hat, x = q.next_scale_input(k, f_hat, idx)
            pieces.append(x)
        teacher = q.teacher_forcing_input(indices)
        expected = q.decode_indices(indices)
    assert pieces[-1] is None  # nothing after the last scale
    assert torch.allclose(f_hat, expected, atol=1e-5)
    # the step-by-step inputs are the teacher-forcing input, scale by scale
    assert torch.allclose(torch.cat(pieces[:-1], 1), teacher, atol=1e-6)
    # the input of the finest scale is f_hat before it, not resampled: decode_indices minus h_K
    last = q.phis[q.phi_index(3)](q.vq.lookup(indices[-1]).permute(0, 3, 1, 2))
    assert torch.allclose(teacher[:, -64:], (expected - last).flatten(2).transpose(1, 2), atol=1e-5)
    assert q.token_counts == (1, 4, 16, 64)


def test_teacher_forcing_input_is_float32_under_bf16_autocast():
    q = make_msvq()
    indices = random_indices(q, 2)
    with torch.no_grad():
        plain = q.teacher_forcing_input(indices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = q.teacher_forcing_input(indices)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain, atol=1e-6)


def test_next_scale_input_rejects_a_scale_outside_the_pyramid():
    q = make_msvq()
    with pytest.raises(common.UserError, match="scale index 4"):
        q.next_scale_input(4, torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(common.UserError, match="expected 4 index maps"):
        q.teacher_forcing_input(random_indices(q, 1)[:3])
