"""The factor study of issue 15: cifar_sweep.py's factor flags (--network vqgan, --lr-schedule,
--lpips-weight, --init-method, --pixel-range, --adam-betas / --amsgrad), the spread of the encoder
outputs a switch draws its codebook from (common.deferred_switch keep=), `evaluate.py codebook
--plot` and the factor-study renderer."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch

import cifar_sweep
import common
import evaluate
import imagenet_tokenizer
from cifar_fixture import write_fashion_fixture
from common import run_cli


def parse(*argv):
    return cifar_sweep.build_parser().parse_args([str(a) for a in argv])


def resolved(*argv):
    return cifar_sweep.resolve_args(parse(*argv))


def sweep(*argv):
    return run_cli(cifar_sweep.main, cifar_sweep.build_parser(), ["--num-workers", "0", *map(str, argv)])


def one_line_error(capsys, fn):
    with pytest.raises(SystemExit) as stop:
        fn()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion_fixture(str(tmp_path_factory.mktemp("fashion")))[0]


# ---- identity: defaults change nothing, every factor is named and run-defining ------------------


def test_defaults_keep_the_names_and_identities_of_earlier_runs():
    args = resolved("--dataset", "fashion-mnist", "--method", "deferred_ema", "--codebook-size", 4096, "--epochs", 10)
    assert cifar_sweep.run_name(args) == "deferred_ema_K4096_ep10_cont5_s0_fashion-mnist"
    identity = cifar_sweep.defining_args(args)
    new = {"network", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "lr_schedule", "min_lr",
           "lpips_weight", "init_method", "pixel_range", "adam_betas", "amsgrad"}
    assert not new & set(identity)
    # a result written before these options existed has the same identity
    old = {k: v for k, v in vars(args).items() if k not in new}
    assert cifar_sweep.defining_args(old) == identity


@pytest.mark.parametrize("flags, tag", [
    (["--network", "vqgan"], "vqgan"), (["--network", "vqgan", "--ch", 32, "--ch-mult", "1,2,4"], "vqgan-ch32-m1.2.4"),
    (["--lr-schedule", "cosine"], "cos"), (["--lr-schedule", "cosine", "--min-lr", 1e-6], "cos1e-06"),
    (["--lpips-weight", 1], "lpips1"), (["--init-method", "kmeans"], "init-kmeans"), (["--pixel-range", 1], "px1"),
    (["--adam-betas", "0.5,0.9"], "betas0.5-0.9"), (["--no-amsgrad"], "noams"), (["--token-dim", 8], "d8"),
    (["--ratio", 2], "ratio2"), (["--batch-size", 64], "bs64")])
def test_every_factor_is_named_and_run_defining(flags, tag):
    base = resolved("--method", "baseline_ema", "--codebook-size", 64)
    args = resolved("--method", "baseline_ema", "--codebook-size", 64, *flags)
    assert cifar_sweep.run_name(args) == f"baseline_ema_{tag}_K64_ep300_cont0_s0"
    assert cifar_sweep.defining_args(args) != cifar_sweep.defining_args(base)


@pytest.mark.parametrize("flags, fragment", [
    (["--ch", 16], "--ch sets the VQGAN network: add --network vqgan"),
    (["--network", "vqgan", "--ch-mult", "1,2"], "--ch-mult needs three levels"),
    (["--network", "vqgan", "--attn-resolutions", "4"], "--attn-resolutions 4"),
    (["--method", "gaussian", "--init-method", "sample"], "--init-method does not apply"),
    (["--lr-schedule", "cosine", "--lr", 1e-6], "--min-lr 1e-05 must not exceed --lr 1e-06"),
    (["--adam-betas", "0.9"], "--adam-betas takes two numbers"),
    (["--adam-betas", "0.9,1.5"], "--adam-betas must be [0, 1)"),
    (["--pixel-range", 0], "--pixel-range must be > 0")])
def test_bad_factor_options_are_refused_in_one_line(tmp_path, capsys, flags, fragment):
    err = one_line_error(capsys, lambda: sweep("--preset", "smoke", "--codebook-size", 32, "--data-dir",
                                               tmp_path / "nowhere", "--out", tmp_path / "out", *flags))
    assert fragment in err and not (tmp_path / "out").exists()


def test_factor_grid_changes_one_factor_per_cell_with_both_arms():
    configs = cifar_sweep.factor_configs()
    cells = list(dict.fromkeys(cell for cell, _ in configs))
    assert len(configs) == 2 * len(cells) == 26 and cells[0] == "base (failing recipe)"
    base = cifar_sweep.defining_args(resolved(*sum(([f"--{k.replace('_', '-')}", v]
                                                    for k, v in configs[0][1].items()), [])))
    for cell in cells[1:-1]:
        arms = [c for name, c in configs if name == cell]
        assert [a["continuous_epochs"] for a in arms] == [0, 5] and {a["epochs"] for a in arms} == {10}
        args = parse()
        vars(args).update(arms[0])
        changed = {k for k, v in cifar_sweep.defining_args(cifar_sweep.resolve_args(args)).items()
                   if base.get(k) != v} | {k for k in base if k not in cifar_sweep.defining_args(args)}
        # one factor: one option, or the options that go together (the network's widths, cosine's
        # min lr, Adam's betas and amsgrad, the gradient codebook's method name)
        assert changed in ({"method"}, {"token_dim"}, {"lr"}, {"lpips_weight"}, {"batch_size"}, {"ratio"},
                           {"init_method"}, {"pixel_range"}, {"lr_schedule", "min_lr"}, {"adam_betas", "amsgrad"},
                           {"network", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels"}), cell


# ---- the networks and the loss -------------------------------------------------------------------


def test_pixel_range_scales_what_the_networks_see_not_the_loss():
    torch.manual_seed(0)
    half = cifar_sweep.build_model(resolved("--preset", "smoke", "--method", "gaussian", "--codebook-size", 16))
    one = cifar_sweep.build_model(resolved("--preset", "smoke", "--method", "gaussian", "--codebook-size", 16,
                                           "--pixel-range", 1))
    one.load_state_dict(half.state_dict())
    half.eval(), one.eval()
    x = torch.rand(2, 3, 32, 32) - 0.5
    with torch.no_grad():
        z_q, _, _ = half.quantizer(half.encoder(2 * x))
        expected = half.decoder(z_q) / 2  # the networks on [-1, 1] pixels, the output back on [-0.5, 0.5]
        assert torch.allclose(one(x)[0], expected, atol=1e-6)
        assert torch.equal(one.encode(x), half.encoder(2 * x))
        plain = half.decoder(half.quantizer(half.encoder(x))[0])  # range 0.5: exactly the classic VQ-VAE
        assert torch.equal(half(x)[0], plain)


def test_vqgan_network_is_the_tokenizers_encoder_decoder_with_8x8_tokens():
    args = resolved("--dataset", "fashion-mnist", "--network", "vqgan", "--token-dim", 8, "--codebook-size", 64,
                    "--attn-resolutions", "16")
    model = cifar_sweep.build_model(args)
    encoder, decoder = model.encoder[0], model.decoder[1]
    assert isinstance(encoder, common.Encoder) and isinstance(decoder, common.Decoder)
    reference = common.Encoder(in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                               resolution=32, z_channels=16)
    assert [tuple(p.shape) for p in encoder.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert any(isinstance(m, common.AttnBlock) for m in encoder.levels[1].attns)
    x = torch.rand(3, 1, 32, 32) - 0.5
    assert model.encode(x).shape == (3, 8, 8, 8)
    assert model(x)[0].shape == x.shape


def test_cosine_schedule_is_the_tokenizers(tmp_path):
    args = resolved("--method", "deferred", "--epochs", 6, "--continuous-epochs", 2, "--lr", 1e-3,
                    "--lr-schedule", "cosine", "--min-lr", 1e-5)
    lrs = [cifar_sweep.epoch_lr(args, e) for e in range(6)]
    independent = [1e-3, 1e-3] + [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(independent, rel=1e-12)
    schedule = imagenet_tokenizer.CosineSchedule(1e-3, 1e-5, epochs=4)  # over the 4 Discretization epochs
    tokenizer = [schedule.lr]
    for _ in range(3):
        schedule.step(1.0)
        tokenizer.append(schedule.lr)
    assert lrs[2:] == pytest.approx(tokenizer, rel=1e-12)
    assert cifar_sweep.epoch_lr(resolved("--lr", 2e-4), 7) == 2e-4  # constant (appendix A.1)


def test_lpips_term_sees_rgb_unit_range_images_and_is_weighted():
    seen = []

    def fake_lpips(a, b):
        seen.append((a, b))
        return (a - b).abs().mean((1, 2, 3))
    args = types.SimpleNamespace(lpips_weight=0.5)
    recon, x = torch.rand(4, 1, 32, 32) - 0.5, torch.rand(4, 1, 32, 32) - 0.5
    vq = torch.tensor(0.25)
    total = cifar_sweep.penalties(recon, x, vq, args, fake_lpips)
    a, b = seen[0]
    assert a.shape == b.shape == (4, 3, 32, 32) and torch.equal(a[:, 2], recon[:, 0] + 0.5) and float(b.min()) >= 0
    assert float(total) == pytest.approx(0.25 + 0.5 * float((recon - x).abs().mean()), rel=1e-6)
    assert cifar_sweep.penalties(recon, x, vq, args, None) is vq


# ---- the switch keeps what it drew from ----------------------------------------------------------


def test_deferred_switch_keeps_a_sample_of_what_it_drew_from_without_changing_the_codebook():
    z = torch.randn(40, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    batches = [z[i:i + 8] for i in range(0, 40, 8)]
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    plain = common.VectorQuantizer(32, 4, enabled=False)
    kept_q = common.VectorQuantizer(32, 4, enabled=False)
    common.deferred_switch(plain, lambda b: b, batches, ratio=10, seed=3)
    kept = {}
    common.deferred_switch(kept_q, lambda b: b, batches, ratio=10, seed=3, keep=kept)
    assert torch.equal(plain.codebook, kept_q.codebook)  # callers without keep see no change
    collected = rows[:320]
    sample = kept["embeddings"]
    assert sample.shape == (320, 4)  # fewer than SWITCH_SAMPLE: all of them, in a seeded order
    assert torch.equal(sample[sample[:, 0].argsort()], collected[collected[:, 0].argsort()])
    small = common.embedding_sample(collected, None, seed=3, limit=50)
    assert small.shape == (50, 4) and len({tuple(r.tolist()) for r in small}) == 50
    assert torch.equal(small, common.embedding_sample(collected, None, seed=3, limit=50))
    assert all((collected == r).all(1).any() for r in small)


def brute_euclidean(x):
    d = torch.cdist(x.double(), x.double())
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1)))


def test_a_run_with_every_factor_records_the_switch_spreads(fashion, tmp_path, monkeypatch):
    calls = []

    def fake_lpips(net="alex", device="cpu"):  # the real one is tested in test_image_metrics
        def distance(a, b):
            calls.append(tuple(a.shape))
            return (a - b).pow(2).mean((1, 2, 3))
        return distance
    monkeypatch.setattr(cifar_sweep, "load_lpips", fake_lpips)
    flags = ["--network", "vqgan", "--ch", 8, "--z-channels", 8, "--token-dim", 8, "--lr-schedule", "cosine",
             "--lr", 1e-3, "--lpips-weight", 1, "--init-method", "kmeans", "--pixel-range", 1, "--adam-betas", "0.5,0.9",
             "--no-amsgrad", "--ratio", 2]
    sweep("--dataset", "fashion-mnist", "--data-dir", fashion, "--preset", "smoke", "--method", "deferred",
          "--codebook-size", 32, "--epochs", 3, "--continuous-epochs", 1, "--out", tmp_path, *flags)
    args = resolved("--dataset", "fashion-mnist", "--preset", "smoke", "--method", "deferred", "--codebook-size", 32,
                    "--epochs", 3, "--continuous-epochs", 1, *flags)
    name = cifar_sweep.run_name(args)
    record = json.loads((tmp_path / f"{name}.json").read_text())
    ckpt = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert [h["lr"] for h in record["history"]] == pytest.approx([1e-3, 1e-3, 1e-5 + 0.5 * (1e-3 - 1e-5)])
    switch = record["history"][1]
    embeddings, codebook = ckpt["switch_embeddings"], ckpt["switch_codebook"]
    assert embeddings.shape == (64, 8)  # ratio 2 x 32 codes, all kept
    assert switch["switch_embeddings_euclidean"] == pytest.approx(brute_euclidean(embeddings), rel=1e-5)
    assert switch["switch_euclidean"] == pytest.approx(brute_euclidean(codebook), rel=1e-5)
    assert record["metrics"]["switch_embeddings_euclidean"] == switch["switch_embeddings_euclidean"]
    # k-means: centres of the collected outputs, not a sample of them
    assert not all((embeddings == c).all(1).any() for c in codebook)
    group = ckpt["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.5, 0.9) and group["amsgrad"] is False
    # LPIPS is in the objective of every training step (6 per epoch) and of the final evaluation
    assert len([c for c in calls if c == (32, 3, 32, 32)]) == 3 * 6 and (64, 3, 32, 32) in calls


def test_missing_lpips_weights_are_one_line_before_anything_is_written(fashion, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    err = one_line_error(capsys, lambda: sweep("--dataset", "fashion-mnist", "--data-dir", fashion, "--preset", "smoke",
                                               "--codebook-size", 32, "--lpips-weight", 1, "--out", tmp_path / "out"))
    assert "alexnet-owt-7be5be79.pth" in err and not (tmp_path / "out").exists()


def test_tokenizer_records_the_switch_spreads(fashion, tmp_path):
    from test_imagenet_tokenizer import TINY, without_sizes  # the tokenizer tests' tiny model
    argv = ["--dataset", "fashion-mnist", "--data-dir", fashion, "--out", tmp_path] + without_sizes(TINY) + [
        "--quantizer", "vq", "--epochs", "2", "--val-size", "8"]
    imagenet_tokenizer.main(imagenet_tokenizer.build_parser().parse_args([str(a) for a in argv]))
    record = json.loads((tmp_path / "vq_baseline_fashion-mnist.json").read_text())
    ckpt = torch.load(tmp_path / "vq_baseline_fashion-mnist.pt", weights_only=True)
    switch = record["history"][0]
    assert switch["switch_embeddings_euclidean"] == pytest.approx(brute_euclidean(ckpt["switch_embeddings"]), rel=1e-5)
    assert switch["switch_euclidean"] == pytest.approx(brute_euclidean(ckpt["switch_codebook"]), rel=1e-5)
    assert record["metrics"]["switch_euclidean"] == switch["switch_euclidean"]
    # the sample init: every fresh code is one of the kept encoder outputs (all of them at this size)
    assert all((ckpt["switch_embeddings"] == c).all(1).any() for c in ckpt["switch_codebook"])


# ---- evaluate.py codebook --plot -----------------------------------------------------------------


def test_pca_projection_matches_an_svd():
    codes = torch.randn(50, 5, generator=torch.Generator().manual_seed(1)) * torch.tensor([5.0, 3.0, 1, 1, 1])
    extra = torch.randn(7, 5)
    projected, other = evaluate.pca_2d(codes, extra)
    centred = codes.double().numpy() - codes.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(2):
        assert np.allclose(np.abs(projected[:, k]), np.abs(centred @ vt[k]))
        sign = np.sign(projected[0, k] / (centred @ vt[k])[0])
        assert np.allclose(other[:, k], sign * ((extra.double().numpy() - codes.double().numpy().mean(0)) @ vt[k]))


def test_plot_draws_usage_codes_and_switch_embeddings(tmp_path, monkeypatch, capsys):
    codes = torch.randn(16, 4)
    counts = torch.zeros(16)
    counts[:3] = torch.tensor([5.0, 2.0, 1.0])
    path = tmp_path / "run.pt"
    common.save_checkpoint(path, codebook=codes, code_counts=counts, switch_embeddings=torch.randn(40, 4))
    drawn = {}
    real = evaluate.codebook_figure
    monkeypatch.setattr(evaluate, "codebook_figure",
                        lambda *a: (drawn.update(zip(("path", "codes", "counts", "embeddings", "title"), a)), real(*a)))
    run_cli(evaluate.main, evaluate.build_parser(), ["codebook", str(path), "--plot", str(tmp_path / "c.png")])
    assert drawn["embeddings"].shape == (40, 4) and torch.equal(drawn["counts"], counts.double())
    assert "perplexity" in drawn["title"] and "switch embeddings" in drawn["title"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npy = tmp_path / "codes.npy"  # no counts, no embeddings: the PCA alone
    np.save(npy, codes.numpy())
    run_cli(evaluate.main, evaluate.build_parser(), ["codebook", str(npy), "--plot", str(tmp_path / "n.png")])
    assert drawn["counts"] is None and drawn["embeddings"] is None and (tmp_path / "n.png").exists()


def test_plot_refuses_bad_input_in_one_line(tmp_path, capsys):
    good = tmp_path / "run.pt"
    common.save_checkpoint(good, codebook=torch.randn(8, 2))
    no_codebook = tmp_path / "other.pt"
    common.save_checkpoint(no_codebook, weights=torch.randn(8, 2))
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")

    def refused(*argv):
        return one_line_error(capsys, lambda: run_cli(evaluate.main, evaluate.build_parser(),
                                                      ["codebook", *map(str, argv)]))
    assert "no such file" in refused(tmp_path / "nope.pt", "--plot", tmp_path / "a.png")
    assert "no codebook found" in refused(no_codebook, "--plot", tmp_path / "a.png")
    assert "does not exist" in refused(good, "--plot", tmp_path / "missing" / "a.png")
    assert "exists: not overwritten" in refused(good, "--plot", existing)
    assert "*.png" in refused(good, "--plot", tmp_path / "a.pdf")
    assert existing.read_bytes() == b"keep" and not (tmp_path / "a.png").exists()


# ---- the factor-study renderer -------------------------------------------------------------------


def fake_run(config, seed, perplexity, switch_spread, failed=False):
    """A result JSON as cifar_sweep writes it, for the cell `config` of the Fashion-MNIST CPU recipe."""
    args = parse("--dataset", "fashion-mnist", "--channels", 32, "--res-channels", 16, "--train-subset", 10000,
                 "--seed", seed)
    vars(args).update(config)
    args = cifar_sweep.resolve_args(args)
    metrics = {"perplexity": perplexity, "used_codes": int(perplexity) + 1, "mse": 0.01, "euclidean": 1.0,
               "switch_euclidean": switch_spread, "switch_embeddings_euclidean": switch_spread}
    return {"experiment": "fashion-mnist", "method": args.method, "args": json.loads(json.dumps(vars(args))),
            "metrics": metrics, "history": [], "path": f"{cifar_sweep.run_name(args)}.json",
            **({"failed": "diverged"} if failed else {})}


def test_factor_study_table_puts_both_arms_of_each_cell_side_by_side(tmp_path):
    cells = {}
    for cell, config in cifar_sweep.factor_configs():
        cells.setdefault(cell, []).append(config)
    base, lpips = cells["base (failing recipe)"], cells["LPIPS weight 1"]
    results = [fake_run(base[0], 0, 20.0, 0.1), fake_run(base[0], 1, 30.0, 0.3), fake_run(base[1], 0, 1000.0, 2.0),
               fake_run(lpips[0], 0, 900.0, 0.5), fake_run(lpips[1], 0, 1200.0, 2.5),
               fake_run(lpips[1], 1, 5.0, 2.5, failed=True)]
    # a base written before the factor options existed (its args lack them) is the same base
    for key in ("network", "lr_schedule", "min_lr", "lpips_weight", "init_method", "pixel_range", "adam_betas",
                "amsgrad", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels"):
        results[2]["args"].pop(key)
    text = evaluate.render_factor_study(results, str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["base (failing recipe)"][1:4] == ["2 / 1", "0.025", "yes"]  # mean 25 / 1000
    assert rows["base (failing recipe)"][4] == "25.0 ± 7.1 / 1000.0"
    assert rows["base (failing recipe)"][7] == "0.200 ± 0.141 / 2.000"
    assert rows["LPIPS weight 1"][1:4] == ["1 / 1", "0.750", "no"]  # the failed run is left out
    assert "token dim 8" not in rows
    png = [f for f in os.listdir(tmp_path) if f.startswith("factors_")]
    assert len(png) == 1 and png[0] in text
    assert evaluate.render_factor_study(results[:3], str(tmp_path)) is None  # the base alone is no study


def test_paper_tables_leave_out_runs_with_a_factor_option():
    config = cifar_sweep.grid_configs("table8")[0]
    plain = fake_run(config, 0, 10.0, 0.1)
    plain["experiment"] = "cifar10"
    plain["args"].update(dataset="cifar10", channels=128, res_channels=64, train_subset=None)
    other = json.loads(json.dumps(plain))
    other["args"]["lpips_weight"] = 1.0
    assert evaluate._cifar_runs([plain, other], config) == [plain]
