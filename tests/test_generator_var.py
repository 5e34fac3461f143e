"""generator_var.py and the next-scale-prediction helpers it adds to common.MultiScaleQuantizer:
teacher-forcing input and the inference step against decode_indices and an independent
re-computation; the VAR transformer's sequence layout, block-causal mask, kv cache, CFG, sampling
and label dropout; and the CLI on a tiny tokenizer fixture (CPU)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import evaluate
import generator_var as gv

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


# ------------------------------------------------------------------------------------------------
# The VAR transformer: layout, mask, kv cache, guidance, sampling, label dropout
# ------------------------------------------------------------------------------------------------


SCALES = (1, 2, 4, 8)


def tiny_var(scales=SCALES, vocab=32, token_dim=4, num_classes=3, **kw):
    torch.manual_seed(0)
    kw = dict(dict(depth=2, width=32, heads=2, drop_path_rate=0.0), **kw)
    model = gv.VAR(num_classes, vocab, token_dim, scales, **kw).init_weights(head=1.0, adaln_gamma=1.0)
    return model.eval()


def test_sequence_layout_slices_and_levels():
    assert gv.scale_slices(SCALES) == [(0, 1), (1, 5), (5, 21), (21, 85)]
    assert gv.scale_slices(common.VAR_SCALES)[-1] == (424, 680)  # VAR's L = 680 at 256 px / 16 x 16
    model = tiny_var()
    assert model.L == 85 and model.first_l == 1
    assert model.level.tolist() == [0] + [1] * 4 + [2] * 16 + [3] * 64
    idx = [torch.randint(0, 32, (2, s, s)).to(torch.int16) for s in SCALES]
    flat = gv.flatten_scales(idx)
    assert flat.shape == (2, 85) and flat.dtype == torch.long
    q = make_msvq(scales=SCALES)  # the flat layout is what teacher forcing reads too
    assert torch.equal(q.teacher_forcing_input(flat), q.teacher_forcing_input(idx))
    with pytest.raises(common.UserError, match=r"expected \(B, 85\) indices"):
        q.teacher_forcing_input(flat[:, :84])
    # row-major inside a scale: position (i, j) of scale 2 (4 x 4) sits at 5 + 4 i + j
    assert flat[1, 5 + 4 * 2 + 3] == idx[2][1, 2, 3]


def test_block_causal_mask_against_an_explicit_loop():
    mask = gv.block_causal_mask(SCALES)
    level = [k for k, s in enumerate(SCALES) for _ in range(s * s)]
    expected = torch.tensor([[level[i] >= level[j] for j in range(85)] for i in range(85)])
    assert torch.equal(mask, expected)


def test_later_scales_cannot_change_earlier_logits_but_same_scale_tokens_interact():
    model = tiny_var()
    labels = torch.tensor([0, 2])
    x = torch.randn(2, 84, 4)
    with torch.no_grad():
        base = model(labels, x)
        for k in range(len(SCALES) - 1):
            _, end = model.slices[k]
            y = x.clone()
            y[:, end - 1:] += torch.randn_like(y[:, end - 1:])  # inputs of scales > k (x omits the start token)
            out = model(labels, y)
            assert torch.allclose(out[:, :end], base[:, :end], atol=1e-5), k
            assert not torch.allclose(out[:, end:], base[:, end:], atol=1e-3)
        # one input token of scale 2 changes the logits of the other tokens of scale 2 (bidirectional)
        y = x.clone()
        y[:, 5 - 1] += 3.0  # sequence position 5, the first token of scale 2
        out = model(labels, y)
        assert not torch.allclose(out[:, 6:21], base[:, 6:21], atol=1e-4)
        assert torch.allclose(out[:, :5], base[:, :5], atol=1e-5)
        # the class reaches every position through AdaLN and the start token
        other = model(torch.tensor([1, 1]), x)
        assert (other - base).abs().amax(-1).min() > 0


def test_kv_cached_decoding_fed_ground_truth_reproduces_the_masked_forward():
    q = make_msvq(scales=SCALES)
    model = tiny_var()
    labels = torch.tensor([0, 1, 2])
    gt = random_indices(q, 3, seed=5)
    seen = []

    def pick(k, logits):
        seen.append(logits)
        return gt[k].reshape(3, -1)
    with torch.no_grad():
        full = model(labels, q.teacher_forcing_input(gt))
        indices, f_hat = gv.decode_scales(model, q, labels, pick, guided=False)
    for k, (b, e) in enumerate(model.slices):
        assert seen[k].shape == (3, e - b, 32)
        assert torch.allclose(seen[k], full[:, b:e], atol=1e-4), k
    assert all(torch.equal(a, g) for a, g in zip(indices, gt))
    assert torch.allclose(f_hat, q.decode_indices(gt), atol=1e-5)


def test_guidance_grows_with_the_scale_and_cfg_zero_is_conditional():
    assert gv.guidance_scale(1.5, 0, 10) == 0.0 and gv.guidance_scale(1.5, 9, 10) == 1.5
    assert gv.guidance_scale(2.0, 3, 4) == 2.0 and gv.guidance_scale(2.0, 0, 1) == 0.0
    cond, uncond = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    both = torch.cat([cond, uncond])
    assert torch.equal(gv.guided_logits(both, 0.0), cond)
    assert torch.allclose(gv.guided_logits(both, 1.5), 2.5 * cond - 1.5 * uncond)
    # greedy decoding under cfg 0 is greedy conditional decoding, whatever the null class predicts
    q, model = make_msvq(scales=SCALES), tiny_var()
    labels = torch.tensor([0, 2])
    greedy = lambda k, logits: logits.argmax(-1)  # noqa: E731
    with torch.no_grad():
        plain, _ = gv.decode_scales(model, q, labels, greedy, guided=False)
        guided, _ = gv.generate(model, q, labels, cfg=0.0, top_k=1, top_p=0.0, generator=torch.Generator())
        model.class_emb.weight[-1].normal_(0, 5)  # a different null class changes nothing at cfg 0
        again, _ = gv.generate(model, q, labels, cfg=0.0, top_k=1, top_p=0.0, generator=torch.Generator())
        # ... and at scale 0 even under strong guidance (t = 0 there)
        strong, _ = gv.generate(model, q, labels, cfg=50.0, top_k=1, top_p=0.0, generator=torch.Generator())
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, guided, again))
    assert torch.equal(strong[0], plain[0])


def test_top_k_top_p_filtering_and_sampling():
    logits = torch.log(torch.tensor([[[0.5, 0.05, 0.3, 0.15]]]))
    keep = lambda out: torch.isfinite(out).reshape(-1).tolist()  # noqa: E731
    assert keep(gv.filter_top_k_top_p(logits, top_k=2)) == [True, False, True, False]
    assert keep(gv.filter_top_k_top_p(logits, top_p=0.8)) == [True, False, True, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(gv.filter_top_k_top_p(logits, top_p=0.81)) == [True, False, True, True]
    assert keep(gv.filter_top_k_top_p(logits, top_p=0.1)) == [True, False, False, False]
    assert keep(gv.filter_top_k_top_p(logits, top_k=0, top_p=0.0)) == [True] * 4
    g = torch.Generator().manual_seed(0)
    draws = gv.sample_logits(logits.expand(1, 4000, 4), 0, 0.0, g)
    freq = torch.bincount(draws.reshape(-1), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.05, 0.3, 0.15]), atol=0.03)
    # top_k = 1 is deterministic whatever the generator's state
    rand = torch.randn(3, 6, 9)
    a = gv.sample_logits(rand, 1, 0.0, torch.Generator().manual_seed(1))
    b = gv.sample_logits(rand, 1, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(a, rand.argmax(-1))


def test_one_generator_stream_gives_different_samples_batch_after_batch():
    q, model = make_msvq(scales=SCALES), tiny_var()
    labels = torch.tensor([1, 1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first, _ = gv.generate(model, q, labels, cfg=1.5, top_k=0, top_p=0.0, generator=g)
        second, _ = gv.generate(model, q, labels, cfg=1.5, top_k=0, top_p=0.0, generator=g)
        replay, _ = gv.generate(model, q, labels, cfg=1.5, top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert [tuple(i.shape) for i in first] == [(2, s, s) for s in SCALES]
    assert all(0 <= int(i.min()) and int(i.max()) < 32 for i in first)
    assert not torch.equal(first[-1], second[-1])  # the stream moves on
    assert all(torch.equal(a, b) for a, b in zip(first, replay))  # and is reproducible from the seed


def test_label_dropout_maps_to_the_null_class_in_training_only():
    model = tiny_var(label_dropout=0.1)
    labels = torch.randint(0, 3, (20000,))
    assert torch.equal(model.eval().drop_labels(labels), labels)
    dropped = model.train().drop_labels(labels)
    changed = dropped != labels
    assert torch.all(dropped[changed] == 3)  # num_classes, the extra row of class_emb
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert model.class_emb.num_embeddings == 4


def test_var_defaults_follow_build_vae_var():
    model = gv.VAR(10, 64, 8, SCALES, depth=4)
    assert model.width == 256 and model.blocks[0].attn.heads == 4
    assert model.drop_path_rate == pytest.approx(0.1 * 4 / 24)
    assert [b.drop_path_p for b in model.blocks][0] == 0.0
    assert model.blocks[-1].drop_path_p == pytest.approx(0.1 * 4 / 24)
    assert model.blocks[0].norm.eps == 1e-6 and model.blocks[0].mlp[0].out_features == 1024
    model.init_weights()
    ada = model.blocks[0].ada[-1].weight
    std = (1 / (3 * 256)) ** 0.5
    assert ada[:512].std().item() == pytest.approx(std * 1e-3, rel=0.1)  # gates start near zero
    assert ada[512:].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert model.head.out.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    assert torch.all(model.blocks[0].attn.log_tau == torch.log(torch.tensor(4.0)))


def test_param_groups_exclude_biases_norms_and_position_embeddings_from_decay():
    model = tiny_var()
    decay, plain = gv.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {"pos_start", "pos_embed", "lvl_embed.weight", "blocks.0.attn.log_tau", "blocks.0.attn.q_bias",
            "head.out.bias"} <= plain_names
    assert {"class_emb.weight", "word_embed.weight", "blocks.1.attn.qkv.weight", "head.out.weight"} <= decay_names
    assert len(plain_names) + len(decay_names) == len(list(model.parameters()))


def test_a_few_steps_overfit_a_fixed_batch():
    q = make_msvq(scales=SCALES)
    model = tiny_var(label_dropout=0.0).train()
    labels = torch.arange(3)
    idx_BL = gv.flatten_scales(random_indices(q, 3, seed=7))
    opt = torch.optim.AdamW(gv.param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(50):
        loss = gv.token_loss(gv.teacher_forced_logits(model, q, labels, idx_BL), idx_BL)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.3)  # near-uniform start
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    with torch.no_grad():  # greedy decoding now reproduces the memorised token pyramids
        out, _ = gv.decode_scales(model, q, labels, lambda k, logits: logits.argmax(-1), guided=False)
    assert torch.equal(gv.flatten_scales(out), idx_BL)


# ------------------------------------------------------------------------------------------------
# The script on the shared tokenizer fixture (tests/generator_fixture.py: msvq scales 1,2,4,8)
# ------------------------------------------------------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--depth", "2", "--width", "32", "--heads", "2", "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "2",
         "--skip-fid", "--skip-lpips", "--device", "cpu"]


def cli_argv(run, out, *extra):
    return ["--tokenizer", run.checkpoint, "--out", str(out)] + SMALL + list(extra)


def cli_args(run, out, *extra):
    return gv.build_parser().parse_args(cli_argv(run, out, *extra))


def run_cli(argv, capsys):
    """The script's entry point in-process: (exit status, stderr)."""
    try:
        common.run_cli(gv.main, gv.build_parser(), argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_cli_trains_samples_and_writes_the_result(tokenizer_runs, tmp_path):
    run = tokenizer_runs["msvq"]
    gv.main(cli_args(run, tmp_path, "--epochs", "3", "--sample", "7", "--sample-batch-size", "4"))
    record = json.load(open(tmp_path / "var_msvq.json"))
    assert record["experiment"] == "generator_var" and record["method"] == "var_baseline"
    assert record["tokenizer"]["quantizer"] == "msvq" and common.result_path(
        tmp_path / "var_msvq.json", record["tokenizer"]["checkpoint"]) == run.checkpoint
    m = record["metrics"]
    assert m["num_samples"] == 7 and m["pixel_diversity"] > 0 and 1 <= m["token_used_codes"] <= 16
    assert "gfid" not in m and "skip-fid" in record["notes"]["gfid"]
    assert record["sampling"]["cfg_scale"] == 1.5 and record["sampling"]["labels"] == "class-balanced"
    history = record["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and len(history[0]["val_loss_per_scale"]) == 4
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert m["val_loss"] == min(h["val_loss"] for h in history)  # the sampled checkpoint is the best one
    samples = sorted(os.listdir(tmp_path / record["samples"]))
    assert len(samples) == 7 and samples[0] == "00000_class0.png" and samples[-1] == "00006_class2.png"
    assert os.path.exists(tmp_path / record["grid"])
    tokens = torch.load(tmp_path / "var_msvq" / "samples_tokens.pt", weights_only=True)
    assert [tuple(t.shape) for t in tokens["tokens"]] == [(7, s, s) for s in SCALES]
    assert tokens["labels"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    # sampling again from the trained generator, under another name and guidance
    gv.main(cli_args(run, tmp_path, "--sample-only", "--checkpoint", str(tmp_path / record["checkpoint"]), "--name", "again",
                     "--sample", "4", "--cfg-scale", "0", "--depth", "7"))
    again = json.load(open(tmp_path / "again.json"))
    assert again["args"]["depth"] == 2 and again["sampling"]["cfg_scale"] == 0  # architecture from the checkpoint
    assert again["history"] == history and again["metrics"]["num_samples"] == 4
    # evaluate.py renders both runs in the VAR row of Table 4 (ImageNet-100 scheme, no GAN, baseline),
    # one line per recipe (guidance and sample count differ)
    table = evaluate.render_generator_table(evaluate.load_results(str(tmp_path)), "Table 4")
    rows = [line.rstrip(" |").split(" | ")[1:] for line in table.splitlines() if line.startswith("| VAR ✗ |")]
    assert sorted(row[-1] for row in rows) == ["4", "7"]  # the samples column
    cells = next(row for row in rows if row[-1] == "7")
    assert cells[1:6] == ["1: seed 0 x sample 0", "12.88", "–", "70.69", f"{m['pixel_diversity']:.2f}"]


def cross_entropy_by_counting(dump, context):
    """Mean -log p of every training token under the empirical distribution of the tokens at its
    position among the images that share its context(image, first position of its scale)."""
    total = 0.0
    for b, e in gv.scale_slices(dump.scales):
        for p in range(b, e):
            groups = {}
            for i in range(len(dump)):
                groups.setdefault(context(i, b), []).append(int(dump.tokens_NL[i, p]))
            total += sum(-math.log(g.count(v) / len(g)) for g in groups.values() for v in g)
    return total / dump.tokens_NL.numel()


def test_overfits_the_fixture_dump_through_the_tokenizers_own_quantizer(tokenizer_runs):
    run = tokenizer_runs["msvq"]
    dump = common.load_token_dump(run.tokens["train"])
    tokenizer, cfg = common.load_tokenizer(run.checkpoint)
    assert dump.scales == SCALES
    # Counting, no model: the best loss of any predictor that sees what VAR sees at scale k (class,
    # tokens of coarser scales, position), and the loss of class + position alone. A model that
    # learns from the teacher-forcing input ends between the two; below the first, the input
    # would leak the targets.
    t, y = dump.tokens_NL, dump.labels
    floor = cross_entropy_by_counting(dump, lambda i, b: (int(y[i]), tuple(t[i, :b].tolist())))
    marginal = cross_entropy_by_counting(dump, lambda i, b: int(y[i]))
    torch.manual_seed(0)
    model = gv.VAR(dump.num_classes, dump.codebook_size, cfg["token_dim"], dump.scales, depth=2, width=32, heads=2,
                   drop_path_rate=0.0, label_dropout=0.0).init_weights(head=1.0, adaln_gamma=1.0).train()
    opt = torch.optim.AdamW(gv.param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(150):
        loss = gv.token_loss(gv.teacher_forced_logits(model, tokenizer.quantizer, dump.labels, dump.tokens_NL),
                             dump.tokens_NL)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert floor - 1e-4 <= loss.item() < marginal, (floor, loss.item(), marginal)


def test_kill_and_resume_reaches_the_uninterrupted_result(tokenizer_runs, tmp_path, monkeypatch):
    run = tokenizer_runs["msvq"]
    extra = ("--epochs", "4", "--sample", "0")
    gv.main(cli_args(run, tmp_path / "full", *extra))

    class Killed(Exception):
        pass
    real = common.save_checkpoint
    writes = []

    def dying_writer(path, **state):  # the process dies right after the epoch-2 checkpoint is on disk
        real(path, **state)
        writes.append(path)
        if path.endswith("last.pt") and state["state"]["epoch"] == 2:
            raise Killed()
    monkeypatch.setattr(common, "save_checkpoint", dying_writer)
    with pytest.raises(Killed):
        gv.main(cli_args(run, tmp_path / "killed", *extra))
    monkeypatch.setattr(common, "save_checkpoint", real)
    assert not os.path.exists(tmp_path / "killed" / "var_msvq.json")
    gv.main(cli_args(run, tmp_path / "killed", *extra, "--resume"))
    full = torch.load(tmp_path / "full" / "var_msvq" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "var_msvq" / "last.pt", weights_only=True)
    assert [h["val_loss"] for h in resumed["state"]["history"]] == [h["val_loss"] for h in full["state"]["history"]]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_two_gloo_ranks_train_like_one_process_on_the_global_batch(tokenizer_runs, tmp_path):
    # no label dropout and no stochastic depth: the only randomness left is the data order, which
    # both runs take from (seed, epoch); each rank gets half of every global batch
    run = tokenizer_runs["msvq"]
    argv = ["--tokenizer", run.checkpoint] + SMALL + \
        ["--epochs", "2", "--label-dropout", "0", "--drop-path", "0", "--sample", "4", "--cfg-scale", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "generator_var.py")] + argv + ["--out", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gv.main(gv.build_parser().parse_args(argv + ["--out", str(tmp_path / "single")]))
    dist, single = (json.load(open(tmp_path / out / "var_msvq.json")) for out in ("dist", "single"))
    assert dist["metrics"]["num_samples"] == 4 and len(os.listdir(tmp_path / "dist" / dist["samples"])) == 4
    for a, b in zip(dist["history"], single["history"]):
        assert a["step"] == b["step"] == 3 * (a["epoch"] + 1)  # 18 images, global batch 6
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_bad_inputs_are_one_line_errors(tokenizer_runs, tmp_path, capsys):
    msvq, vq = tokenizer_runs["msvq"], tokenizer_runs["vq"]
    base = ["--out", str(tmp_path / "out")] + SMALL
    # a single-scale tokenizer: VAR needs the scale pyramid
    code, err = run_cli(["--tokenizer", vq.checkpoint] + base, capsys)
    assert code == 2 and "is a vq tokenizer" in err and "generator_maskgit.py" in err and err.count("\n") == 1
    # a missing tokenizer checkpoint, a vq dump beside an msvq tokenizer, missing dumps
    code, err = run_cli(["--tokenizer", str(tmp_path / "gone" / "best.pt")] + base, capsys)
    assert code == 2 and "no such checkpoint" in err and "gone" in err and err.count("\n") == 1
    vq_dumps = os.path.dirname(vq.tokens["train"])
    code, err = run_cli(["--tokenizer", msvq.checkpoint, "--tokens-dir", vq_dumps] + base, capsys)
    assert code == 2 and "vq" in err and err.count("\n") == 1
    code, err = run_cli(["--tokenizer", msvq.checkpoint, "--tokens-dir", str(tmp_path)] + base, capsys)
    assert code == 2 and "token dump not found" in err
    # --resume without a run, guidance without a trained null class, --sample-only without a checkpoint
    good = ["--tokenizer", msvq.checkpoint] + base
    code, err = run_cli(good + ["--resume"], capsys)
    assert code == 2 and "no checkpoint" in err
    code, err = run_cli(good + ["--label-dropout", "0"], capsys)
    assert code == 2 and "--label-dropout" in err
    code, err = run_cli(good + ["--sample-only"], capsys)
    assert code == 2 and "--checkpoint" in err
    code, err = run_cli(good + ["--batch-size", "8", "--grad-accum", "3"], capsys)
    assert code == 2 and "--grad-accum" in err
    assert not os.path.exists(tmp_path / "out" / "var_msvq")  # nothing was created by a refused run


def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch():
    q = make_msvq(scales=SCALES)
    labels, idx_BL = torch.tensor([0, 1, 2, 0, 1, 2]), gv.flatten_scales(random_indices(q, 6, seed=3))
    params = []
    for accum in (1, 3):
        model = tiny_var(label_dropout=0.0).train()
        opt = torch.optim.AdamW(gv.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
        args = gv.build_parser().parse_args(["--tokenizer", "x", "--grad-accum", str(accum), "--clip", "0.5"])
        loss, norm = gv.train_step(model, q, labels, idx_BL, opt, args, torch.device("cpu"))
        params.append((loss, norm, [p.detach().clone() for p in model.parameters()]))
    (loss1, norm1, after1), (loss3, norm3, after3) = params
    assert loss3.item() == pytest.approx(loss1.item(), rel=1e-5) and norm3.item() == pytest.approx(norm1.item(), rel=1e-4)
    assert norm1 > 0.5  # the clip was active, on the summed gradient
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after1, after3))


def test_parameter_counts_match_vars_published_model_sizes():
    # VAR's README: VAR-d16 310M, VAR-d20 600M parameters (ImageNet, 1,000 classes, 4,096 codes)
    with torch.device("meta"):
        sizes = {d: sum(p.numel() for p in gv.VAR(1000, 4096, 32, common.VAR_SCALES, depth=d).parameters())
                 for d in (16, 20)}
    assert 310e6 <= sizes[16] < 311e6 and 600e6 <= sizes[20] < 601e6
