"""imagenet_tokenizer.py and the shared pieces it adds to common.py: the multi-scale residual
quantizer (VAR), the VQGAN encoder/decoder, and the training / evaluation / token-dump paths on a
tiny generated ImageFolder (CPU, tiny model, LPIPS weight 0, --skip-fid)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import types

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


def test_msvq_runs_in_float32_under_bf16_autocast():
    # phi convolutions included: under autocast they would run in bf16 and round f_hat
    q = make_msvq().eval()
    f = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        plain = q(f)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = q(f)[0]
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, plain, atol=1e-6)


def test_encoder_decoder_shapes():
    enc = common.Encoder(ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         resolution=128, z_channels=8)
    x = torch.randn(1, 3, 128, 128)
    z = enc(x)
    assert z.shape == (1, 8, 16, 16) and enc.latent_resolution == 16
    dec = common.Decoder(ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         resolution=128, z_channels=8)
    assert dec(z).shape == (1, 3, 128, 128)


# ------------------------------------------------------------------------------------------------
# The script, end to end on a tiny ImageFolder (real split files and loaders, CPU)
# ------------------------------------------------------------------------------------------------

import imagenet_tokenizer as tok  # noqa: E402

TINY = ["--resolution", "32", "--ch", "8", "--ch-mult", "1,2,2", "--num-res-blocks", "1",
        "--attn-resolutions", "8", "--z-channels", "8", "--token-dim", "4", "--codebook-size", "16",
        "--scales", "1,2,4,8", "--test-size", "6", "--val-size", "6", "--batch-size", "4",
        "--num-workers", "0", "--max-steps-per-epoch", "2", "--lpips-weight", "0", "--skip-lpips",
        "--skip-fid", "--select-by", "val_loss", "--device", "cpu"]


def without_sizes(argv):
    """argv without its --test-size / --val-size pairs."""
    drop = {i + k for i, a in enumerate(argv) if a in ("--test-size", "--val-size") for k in (0, 1)}
    return [a for i, a in enumerate(argv) if i not in drop]


def write_image_folder(root):
    """3 classes x 10 PNGs of 32x32 with class-dependent colours (also the generator tests' data)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(10):
            base = np.array([80 * c, 200 - 60 * c, 40 + 50 * c], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


def run_script(image_folder, out, *extra):
    argv = ["--data-dir", str(image_folder), "--out", str(out),
            "--split-file", str(out.parent / "split.json")] + TINY + list(extra)
    args = tok.build_parser().parse_args(argv)
    tok.main(args)
    return args


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """Both tokenizers, both arms, a few steps each; shared split file."""
    out = tmp_path_factory.mktemp("runs") / "out"
    runs = {}
    for quantizer in ("vq", "msvq"):
        for deferred in (False, True):
            extra = ["--quantizer", quantizer] + (["--deferred", "--continuous-epochs", "1", "--epochs", "3"]
                                                  if deferred else ["--epochs", "2"])
            args = run_script(image_folder, out, *extra)
            name = tok.run_name(args)
            with open(out / f"{name}.json") as f:
                runs[(quantizer, deferred)] = (name, json.load(f))
    return out, runs


def test_runs_write_results_with_all_metrics(trained):
    out, runs = trained
    assert set(runs) == {("vq", False), ("vq", True), ("msvq", False), ("msvq", True)}
    for (quantizer, deferred), (name, record) in runs.items():
        m = record["metrics"]
        assert record["experiment"] == "imagenet_tokenizer"
        assert record["method"] == f"{quantizer}_{'deferred' if deferred else 'baseline'}"
        for key in ("mse", "psnr", "ssim", "perplexity", "used_codes", "euclidean", "cosine", "vendi"):
            assert np.isfinite(m[key]), key
        assert m["rfid"] is None and "skip-fid" in record["notes"]["rfid"]
        assert m["num_images"] == 6 and 1 <= m["used_codes"] <= 16
        phases = [h["phase"] for h in record["history"]]
        assert phases == ["continuous"] * deferred + ["discretization"] * 2
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        # usage counted over the whole test split: 6 images x (64 tokens, or 1+4+16+64 for msvq)
        per_image = 64 if quantizer == "vq" else 1 + 4 + 16 + 64
        assert ckpt["code_counts"].sum().item() == 6 * per_image
        model = common.build_tokenizer(ckpt["args"])
        model.load_state_dict(ckpt["model"])
        assert torch.allclose(ckpt["codebook"], model.quantizer.codebook.detach())
        assert m["euclidean"] == pytest.approx(common.mean_pairwise_euclidean(ckpt["codebook"]))
        assert os.path.exists(out / name / "best.pt") and os.path.exists(out / name / "last.pt")
        assert Image.open(out / f"{name}_recon.png").size == (16 * 32, 4 * 32)  # 2 x (originals, reconstructions)


def test_eval_only_reproduces_the_final_evaluation(image_folder, trained):
    out, runs = trained
    name, record = runs[("msvq", False)]
    with pytest.raises(common.UserError, match=rf"{name}\.(json|pt) exists"):  # never replaced silently
        run_script(image_folder, out, "--quantizer", "msvq", "--eval-only", "--checkpoint", common.result_path(out / f"{name}.json", record["checkpoint"]))
    for ext in tok.RESULT_FILES:
        os.remove(out / f"{name}{ext}")
    run_script(image_folder, out, "--quantizer", "msvq", "--eval-only", "--checkpoint", common.result_path(out / f"{name}.json", record["checkpoint"]))
    with open(out / f"{name}.json") as f:
        again = json.load(f)
    for key in ("mse", "psnr", "ssim", "perplexity", "used_codes", "euclidean", "vendi"):
        assert again["metrics"][key] == pytest.approx(record["metrics"][key], rel=1e-6), key


def test_eval_only_uses_the_checkpoints_split_and_keeps_the_test_result(image_folder, trained, tmp_path):
    out, runs = trained
    name, record = runs[("vq", True)]
    before = (out / f"{name}.json").read_bytes()
    # another --out and no --split-file: the split recorded in the checkpoint, not a fresh one
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path)] + TINY +
                                         ["--eval-only", "--checkpoint", common.result_path(out / f"{name}.json", record["checkpoint"]), "--eval-split", "val"])
    tok.main(args)
    assert not any(p.name.startswith("split") for p in tmp_path.iterdir())
    with open(tmp_path / f"{name}_val.json") as f:
        val = json.load(f)
    assert val["eval_split"] == "val" and common.result_path(tmp_path / f"{name}_val.json", val["args"]["split_file"]) == str(
        out.parent / "split.json")
    # a validation evaluation into the run's own folder leaves the test result alone
    run_script(image_folder, out, "--eval-only", "--checkpoint", common.result_path(out / f"{name}.json", record["checkpoint"]), "--eval-split", "val")
    assert (out / f"{name}.json").read_bytes() == before and (out / f"{name}_val.json").exists()


def test_split_of_another_tree_or_scheme_is_refused(image_folder, trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    for c in ("a", "b"):
        os.makedirs(other / c)
        for i in range(8):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(other / c / f"{i}.png")
    common.make_split(str(other), "imagenet100", 0, tmp_path / "other.json", test_size=4, val_size=4)
    for sizes, extra, pattern in ((True, ["--split-file", str(tmp_path / "other.json")], "classes differ"),
                                  (False, ["--split-file", str(out.parent / "split.json"), "--scheme", "odir"],
                                   "not 'odir'")):
        base = ["--data-dir", str(image_folder)] + (TINY if sizes else without_sizes(TINY)) + ["--epochs", "1"]
        args = tok.build_parser().parse_args(base + ["--out", str(tmp_path / "o")] + extra)
        with pytest.raises(common.UserError, match=pattern):
            tok.main(args)
    assert not os.path.exists(tmp_path / "o")


def test_split_file_is_deterministic(image_folder, trained, tmp_path):
    out, _ = trained
    again = common.make_split(str(image_folder), scheme="imagenet100", seed=0, out_path=tmp_path / "s.json",
                              test_size=6, val_size=6)
    with open(out.parent / "split.json") as f:
        shared = json.load(f)
    assert {k: shared[k] for k in ("train", "val", "test")} == {k: again[k] for k in ("train", "val", "test")}
    assert len(shared["test"]) == 6 and len(shared["val"]) == 6 and len(shared["train"]) == 18


@pytest.mark.parametrize("quantizer", ["vq", "msvq"])
def test_token_dump_round_trip(image_folder, trained, quantizer):
    out, runs = trained
    name, _ = runs[(quantizer, True)]
    ckpt_path = out / name / "best.pt"
    run_script(image_folder, out, "--quantizer", quantizer, "--deferred", "--dump-tokens", "test",
               "--checkpoint", str(ckpt_path))
    dump = torch.load(out / name / "tokens_test.pt", weights_only=True)
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = common.build_tokenizer(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    split = common.load_split(out.parent / "split.json")
    data = common.SplitImageDataset(str(image_folder), split, "test", 32)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        recon, indices, _ = model(x)
        decoded = model.decode_indices(dump["tokens"])
    assert torch.equal(dump["labels"], torch.tensor([data[i][1] for i in range(len(data))]))
    if quantizer == "vq":
        assert dump["tokens"].shape == (6, 8, 8) and dump["tokens"].dtype == torch.int16
        assert torch.equal(dump["tokens"].long(), indices)
    else:
        assert [tuple(t.shape) for t in dump["tokens"]] == [(6, s, s) for s in (1, 2, 4, 8)]
        assert all(torch.equal(a.long(), b) for a, b in zip(dump["tokens"], indices))
    # equal up to float rounding (the straight-through sum f + (f_hat - f) is not bit-exact f_hat)
    assert torch.allclose(decoded, recon, atol=1e-4)
    assert dump["checkpoint"] == os.path.abspath(ckpt_path)


class Killed(BaseException):
    """What a kill -9 does to the run: it stops where it is (not an Exception, so nothing catches it)."""


def kill_at(monkeypatch, when):
    """Make common.save_checkpoint "kill" the process just before the write for which
    when(file name, state) is true; returns the list of file names written or attempted."""
    writes = []
    real_save = common.save_checkpoint

    def save_or_die(path, **state):
        writes.append(os.path.basename(path))
        if when(os.path.basename(path), state):
            raise Killed()
        real_save(path, **state)
    monkeypatch.setattr(common, "save_checkpoint", save_or_die)
    return writes


def test_resume_reproduces_the_uninterrupted_run(image_folder, tmp_path, monkeypatch):
    common_args = ["--quantizer", "vq", "--deferred", "--continuous-epochs", "1", "--epochs", "2", "--name", "r"]
    run_script(image_folder, tmp_path / "a", *common_args)
    straight = torch.load(tmp_path / "a" / "r" / "last.pt", weights_only=True)
    # killed when the first Discretization epoch's checkpoints are written: last.pt is the
    # Continuous Phase's
    kill_at(monkeypatch, lambda name, state: state["epoch"] == 2)
    with pytest.raises(Killed):
        run_script(image_folder, tmp_path / "b", *common_args)
    monkeypatch.undo()
    last = tmp_path / "b" / "r" / "last.pt"
    assert torch.load(last, weights_only=True)["history"][-1]["phase"] == "continuous"
    # a Continuous-Phase checkpoint has no tokens to evaluate or dump
    for mode in (["--eval-only"], ["--dump-tokens", "test"]):
        with pytest.raises(common.UserError, match="Continuous Phase"):
            run_script(image_folder, tmp_path / "b", *mode, "--checkpoint", str(last))
    run_script(image_folder, tmp_path / "b", *common_args, "--resume")
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    assert [h["phase"] for h in resumed["history"]] == ["continuous", "discretization"]
    for k, v in straight["model"].items():
        assert torch.allclose(v.float(), resumed["model"][k].float(), atol=1e-6), k


def test_missing_lpips_weights_exit_2_naming_the_file(image_folder, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty_torch_home"))
    cmd = [sys.executable, os.path.join(ROOT, "imagenet_tokenizer.py"), "--data-dir", str(image_folder),
           "--out", str(tmp_path / "o"), "--lpips-weight", "1.0", "--skip-fid", "--select-by", "val_loss",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "alexnet-owt-7be5be79.pth" in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_select_by_fid_without_fid_is_refused(image_folder, tmp_path):
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o"),
                                          "--skip-fid", "--lpips-weight", "0", "--skip-lpips"])
    with pytest.raises(common.UserError, match="select-by"):
        tok.main(args)


@pytest.mark.parametrize("flag, value", [("--ratio", "0.5"), ("--fid-every", "0"), ("--plateau-factor", "1")])
def test_settings_that_would_fail_at_the_switch_fail_at_start(image_folder, tmp_path, flag, value):
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o")] + TINY +
                                         ["--deferred", flag, value])
    with pytest.raises(common.UserError, match=flag):
        tok.main(args)
    assert not os.path.exists(tmp_path / "o")


def test_adaptive_gan_weight_matches_gradient_norm_ratio():
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = layer(x)
    rec, gan = out.pow(2).mean(), -out.sum()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    assert torch.allclose(common.adaptive_gan_weight(rec, gan, layer.weight), expected)


def test_gan_run_trains_the_discriminator(image_folder, tmp_path):
    run_script(image_folder, tmp_path, "--quantizer", "vq", "--epochs", "1", "--gan-weight", "0.5",
               "--disc-layers", "2", "--name", "g")
    ckpt = torch.load(tmp_path / "g" / "last.pt", weights_only=True)
    fresh = common.PatchDiscriminator(n_layers=2).state_dict()
    assert ckpt["args"]["gan_weight"] == 0.5
    # the first conv only moves through the discriminator's optimizer step (BatchNorm statistics
    # would change from forward passes alone)
    assert not torch.equal(ckpt["disc"]["main.0.weight"], fresh["main.0.weight"])


def test_two_process_run_counts_every_test_image_once(image_folder, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): usage is all-reduced over ranks, the test split is
    sharded without padding, so the counts cover each test image exactly once."""
    with socket.socket() as s:  # a free port: other test sessions may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "imagenet_tokenizer.py"), "--data-dir", str(image_folder), "--out", str(tmp_path),
           "--quantizer", "msvq", "--deferred", "--continuous-epochs", "1", "--epochs", "2", "--name", "ddp",
           "--split-file", str(tmp_path / "split.json")] + TINY
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ckpt["code_counts"].sum().item() == 6 * (1 + 4 + 16 + 64)
    with open(tmp_path / "ddp.json") as f:
        assert json.load(f)["metrics"]["num_images"] == 6


def test_missing_inception_weights_fail_before_training(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("DQ_INCEPTION_WEIGHTS", raising=False)
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o"),
                                          "--lpips-weight", "0", "--skip-lpips", "--device", "cpu"])
    with pytest.raises(common.UserError, match=r"Inception.*\.pth"):
        tok.main(args)
    assert not os.path.exists(tmp_path / "o")


def test_tables_put_our_scaled_values_beside_the_papers():
    import evaluate
    metrics = {"rfid": 7.0, "mse": 3.0e-4, "lpips": 2.0e-3, "euclidean": 5.0, "cosine": 0.5, "vendi": 2.0,
               "perplexity": 900.0}
    run = {"experiment": "imagenet_tokenizer", "eval_split": "test", "metrics": metrics,
           "args": {"quantizer": "vq", "deferred": False, "scheme": "imagenet100", "simvq": False, "gan_weight": 0.0}}
    text = evaluate.render_tokenizer_table([run], "Table 3")
    row = next(line for line in text.splitlines() if line.startswith("| MaskGIT ✗"))
    # paper then ours per column; MSE x1e-4 and LPIPS x1e-3 as in the paper's columns
    assert row.split(" | ")[1:9] == ["paper", "1", "12.22", "7.00", "3.91", "3.00", "2.70", "2.00"]
    assert evaluate.render_tokenizer_table([run], "Table 5") is None  # no ODIR run
    absent = next(line for line in text.splitlines() if line.startswith("| VAR ✓")).split(" | ")
    assert absent[1:5] == ["–", "0", "5.04", "–"]  # the paper's value stays, ours is marked absent


def test_tables_average_seeds_and_keep_other_settings_apart():
    import evaluate

    def run(seed, mse, **settings):
        args = {"quantizer": "vq", "deferred": True, "scheme": "imagenet100", "simvq": False, "gan_weight": 0.0,
                "seed": seed, "split_file": f"/runs/s{seed}/split.json", "ch_mult": [1, 1, 2, 4], **settings}
        return {"experiment": "imagenet_tokenizer", "eval_split": "test", "args": args,
                "metrics": {"mse": mse, "rfid": None, "perplexity": 1000.0 + seed}}
    results = [run(0, 3e-4), run(1, 5e-4), run(2, 4e-4, lr=3e-4), run(0, 9e-4, continuous_epochs=20),
               dict(run(3, 1.0), eval_split="val")]  # a validation evaluation is never a table value
    rows = [line.split(" | ") for line in evaluate.render_tokenizer_table(results, "Table 3").splitlines()
            if line.startswith("| MaskGIT ✓")]
    # columns: row, settings, seeds, r-FID paper/ours, MSE paper/ours, ...
    assert [(r[1], r[2], r[6]) for r in rows] == [("paper", "2", "4.00"), ("continuous_epochs=20", "1", "9.00"),
                                                  ("lr=0.0003", "1", "4.00")]
    # the baseline's --continuous-epochs does nothing: it never separates baseline seeds
    base = [dict(run(s, 2e-4), args=dict(run(s, 2e-4)["args"], deferred=False, continuous_epochs=c))
            for s, c in ((0, 200), (1, 5))]
    assert [len(g) for _, g in evaluate.tokenizer_groups(base, evaluate._sel("vq", False))] == [2]


def test_a_kill_before_best_pt_does_not_change_the_reported_result(image_folder, tmp_path, monkeypatch):
    """Issue #7.1: the kill lands just before best.pt of the last epoch is written; after --resume
    the reported (best) checkpoint must be the one of the uninterrupted run."""
    extra = ["--quantizer", "vq", "--epochs", "2", "--name", "k"]
    run_script(image_folder, tmp_path / "a", *extra)
    straight = json.loads((tmp_path / "a" / "k.json").read_text())

    # the kill lands just before best.pt of the last epoch (epoch 2 after it)
    kill_at(monkeypatch, lambda name, state: name == "best.pt" and state["epoch"] == 2)
    with pytest.raises(Killed):
        run_script(image_folder, tmp_path / "b", *extra)
    monkeypatch.undo()
    run_script(image_folder, tmp_path / "b", *extra, "--resume")
    resumed = json.loads((tmp_path / "b" / "k.json").read_text())
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in straight["history"]])
    for key in ("mse", "perplexity", "euclidean"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=1e-6), key


# ------------------------------------------------------------------------------------------------
# Faults and bad input (issue #7): the start-up protocol, one line for every refusal
# ------------------------------------------------------------------------------------------------


def parse(image_folder, out, *extra):
    return tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(out),
                                          "--split-file", str(out.parent / "split.json")] + TINY + list(extra))


@pytest.mark.parametrize("extra, pattern", [
    (["--ratio", "inf"], "--ratio must be a finite number"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--ema-decay", "1"], r"--ema-decay must be \(0, 1\)"),
    (["--resolution", "0"], "--resolution must be >= 1"),
    (["--resolution", "30"], "--resolution 30 must be a multiple of 4"),
    (["--ch-mult", ""], "--ch-mult needs at least one multiplier"),
    (["--ch-mult", "1,0"], "--ch-mult must be >= 1"),
    (["--quantizer", "msvq", "--scales", "1,2,4"], "--scales must increase strictly up to the latent grid 8"),
    (["--min-lr", "1"], "--min-lr 1 must not exceed --lr"),
    (["--simvq", "--ema-decay", "0.9"], "cannot be combined with --ema-decay"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number"),
    (["--scheme", "odir"], "--test-size cannot be set for --scheme odir: it uses the paper's 70/20/10 split"),
    (["--dataset", "fashion-mnist"], "--test-size cannot be set for --dataset fashion-mnist: it uses the official"),
    (["--dataset", "fashion-mnist", "--scheme", "odir"], "--scheme applies to --dataset imagefolder"),
    (["--download"], "--download fetches Fashion-MNIST"),
    # 16 codes at 2:1 need 32 embeddings; 18 training images x 8x8 give 1,152: 600 codes need 1,200
    (["--codebook-size", "600", "--deferred"], r"--codebook-size 600 at --ratio 2 needs 1200 embeddings, but the "
                                               r"18 training images give 1152"),
    (["--codebook-size", "100", "--ratio", "12"], "needs 1200 embeddings"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(image_folder, tmp_path, extra, pattern):
    args = parse(image_folder, tmp_path / "o", *extra)
    with pytest.raises(common.UserError, match=pattern):
        tok.main(args)
    assert not os.path.exists(tmp_path / "o")


def test_a_simvq_baseline_collects_no_embeddings_so_any_codebook_size_fits(image_folder, tmp_path):
    tok.check_codebook_fits(parse(image_folder, tmp_path, "--simvq", "--codebook-size", "5000"), 18, 1)
    with pytest.raises(common.UserError, match="needs 10000 embeddings"):
        tok.check_codebook_fits(parse(image_folder, tmp_path, "--simvq", "--deferred", "--codebook-size", "5000"), 18, 1)


def test_split_file_that_is_a_folder_and_a_foreign_checkpoint_are_one_line_errors(image_folder, tmp_path):
    (tmp_path / "folder").mkdir()
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o"),
                                          "--split-file", str(tmp_path / "folder")] + TINY)
    with pytest.raises(common.UserError, match="is a folder"):
        tok.main(args)
    cifar = tmp_path / "cifar.pt"  # what cifar_sweep.py writes: other args, no encoder settings
    common.save_checkpoint(cifar, model={}, args={"codebook_size": 512, "lr": 3e-4}, codebook=torch.zeros(4, 2))
    with pytest.raises(common.UserError, match=r"cifar\.pt is not an imagenet_tokenizer checkpoint \(no args ch in it\)"):
        tok.main(parse(image_folder, tmp_path / "o", "--eval-only", "--checkpoint", str(cifar)))
    assert not os.path.exists(tmp_path / "o")


def test_an_existing_split_must_match_the_requested_sizes(image_folder, tmp_path):
    common.write_split(common.make_split(str(image_folder), "imagenet100", 0, None, test_size=6, val_size=6),
                       tmp_path / "split.json")
    for extra, pattern in ((["--test-size", "5"], "has 6 test images, not --test-size 5"),
                           (["--test-size", "6", "--val-size", "4"], "has 6 val images, not --val-size 4")):
        argv = without_sizes(TINY)
        args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o"),
                                              "--split-file", str(tmp_path / "split.json")] + argv + extra)
        with pytest.raises(common.UserError, match=pattern):
            tok.main(args)
    # without sizes the scheme's defaults (20,000 / 5,000) are asked for: refused too
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "o"),
                                          "--split-file", str(tmp_path / "split.json")] + argv)
    with pytest.raises(common.UserError, match="not --test-size 20000"):
        tok.main(args)


@pytest.fixture(scope="module")
def finished(image_folder, tmp_path_factory):
    """One finished baseline run with a token dump and a validation evaluation: every kind of file."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_script(image_folder, out, "--epochs", "1", "--name", "f")
    run_script(image_folder, out, "--dump-tokens", "test", "--checkpoint", str(out / "f" / "best.pt"))
    run_script(image_folder, out, "--eval-only", "--eval-split", "val", "--checkpoint", str(out / "f" / "best.pt"))
    return out


@pytest.mark.parametrize("keep", ["f.json", "f.pt", "f_recon.png", "f_val.json", "f_val.pt", "f/best.pt",
                                  "f/last.pt", "f/tokens_test.pt"])
def test_no_file_of_a_run_is_overwritten_without_resume(image_folder, finished, tmp_path, keep):
    out = tmp_path / "out"
    os.makedirs(out / "f")
    (out / keep).write_bytes((finished / keep).read_bytes())
    with pytest.raises(common.UserError, match=rf"{keep} exists: pass --resume"):
        run_script(image_folder, out, "--epochs", "1", "--name", "f")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [keep]


@pytest.mark.parametrize("flag, value", [("--lr", "3e-4"), ("--beta", "0.5"), ("--ratio", "3"), ("--continuous-epochs", "2"),
                                         ("--init-method", "kmeans"), ("--codebook-size", "8"), ("--token-dim", "8"),
                                         ("--ema-decay", "0.9")])
def test_resume_refuses_other_run_defining_settings(image_folder, finished, flag, value):
    with pytest.raises(common.UserError, match=rf"^--resume: .*last\.pt was made with other settings \({flag} "):
        run_script(image_folder, finished, "--epochs", "1", "--name", "f", "--resume", flag, value)


def test_a_live_run_holds_its_name(image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = common.RunLock(str(out / "f.lock")).acquire()  # this process: alive
    try:
        with pytest.raises(common.UserError, match=r"this run is in use by process \d+ \(lock .*f\.lock\)"):
            run_script(image_folder, out, "--epochs", "1", "--name", "f")
    finally:
        lock.release()
    assert sorted(os.listdir(out)) == []


def test_unreadable_image_with_workers_is_one_line(image_folder, tmp_path):
    """Issue #7.7: a DataLoader worker re-raises errors with its traceback; the user sees one line."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "class1" / "03.png").write_bytes(b"not a png")
    cmd = [sys.executable, os.path.join(ROOT, "imagenet_tokenizer.py"), "--data-dir", str(data),
           "--out", str(tmp_path / "o")] + TINY + ["--num-workers", "2", "--test-size", "1", "--val-size", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [f"error: cannot read image {data / 'class1' / '03.png'}: cannot identify image file "
                     f"'{data / 'class1' / '03.png'}'"], proc.stderr[-2000:]


def test_an_out_that_cannot_be_a_folder_is_refused_before_training(image_folder, tmp_path):
    (tmp_path / "file").write_text("x")
    args = tok.build_parser().parse_args(["--data-dir", str(image_folder), "--out", str(tmp_path / "file" / "o")] + TINY)
    with pytest.raises(common.UserError, match=r"--out .* is a file, not a folder"):
        tok.main(args)
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------------------------------------
# Paper details (issue #10): phases, global batch, lr schedules, SimVQ
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, pattern", [
    (["--deferred", "--continuous-epochs", "2", "--epochs", "2"], "--epochs 2 counts both phases"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_epochs_count_both_phases(image_folder, tmp_path, extra, pattern):
    with pytest.raises(common.UserError, match=pattern):
        tok.main(parse(image_folder, tmp_path / "o", *extra))


def test_batch_size_is_global_and_must_divide_by_the_processes(image_folder, tmp_path):
    args = parse(image_folder, tmp_path, "--batch-size", "6")
    tok.validate(args, 2)
    with pytest.raises(common.UserError, match="--batch-size 6 is global: it must divide by the 4 processes"):
        tok.validate(args, 4)
    assert tok.rank_batch(args, common.DistInfo(0, 3, 0, torch.device("cpu"))) == 2


def test_cosine_schedule_anneals_to_the_minimum_over_the_discretization_epochs():
    s = tok.CosineSchedule(1e-3, 1e-5, epochs=4)
    lrs = [s.lr]
    for _ in range(6):
        s.step(1.0)
        lrs.append(s.lr)
    expected = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * min(k, 4) / 4)) for k in range(7)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[2] == pytest.approx((1e-3 + 1e-5) / 2) and lrs[-1] == pytest.approx(1e-5) and not s.stopped
    again = tok.CosineSchedule(1e-3, 1e-5, epochs=4)
    again.load_state_dict(s.state_dict())
    assert again.lr == s.lr and again.done == 6


def test_cosine_run_records_its_lr_and_resume_keeps_its_length(image_folder, tmp_path, capsys):
    extra = ["--deferred", "--continuous-epochs", "1", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-schedule", "cosine",
             "--name", "c"]
    run_script(image_folder, tmp_path / "o", *extra, "--epochs", "3")
    record = json.loads((tmp_path / "o" / "c.json").read_text())
    # constant lr in the Continuous Phase; the cosine over the 2 Discretization epochs
    assert [h["lr"] for h in record["history"]] == pytest.approx([1e-3, 1e-3, (1e-3 + 1e-5) / 2])
    assert [h["phase"] for h in record["history"]] == ["continuous", "discretization", "discretization"]
    printed = capsys.readouterr().out
    assert "Discretization Phase: codebook initialised from" in printed and "quantized" not in printed
    with pytest.raises(common.UserError, match=r"other settings \(--epochs 3 -> 5\)"):
        run_script(image_folder, tmp_path / "o", *extra, "--epochs", "5", "--resume")


def simvq_model(args):
    torch.manual_seed(0)
    model = common.build_tokenizer(args)
    return model, types.SimpleNamespace(model=model)


@pytest.mark.parametrize("quantizer", ["vq", "msvq"])
def test_simvq_baseline_keeps_its_random_codebook_and_only_the_deferred_arm_starts_from_embeddings(
        image_folder, tmp_path, quantizer):
    info = common.DistInfo(0, 1, 0, torch.device("cpu"))
    images = [(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(4)]
    sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)
    for deferred in (False, True):
        args = parse(image_folder, tmp_path, "--simvq", "--quantizer", quantizer,
                     *(["--deferred", "--continuous-epochs", "1"] if deferred else []))
        model, t = simvq_model(args)
        vq = model.quantizer.vq if quantizer == "msvq" else model.quantizer
        random_codes, layer = vq.embed.clone(), vq.simvq_map.weight.detach().clone()
        tok.switch_to_discretization(t, images, sampler, args, info, epoch=1 if deferred else 0)
        assert model.quantizer.is_enabled
        if not deferred:  # SimVQ as published: the frozen N(0, 1/dim) codebook and its random layer
            assert torch.equal(vq.embed, random_codes) and torch.equal(vq.simvq_map.weight, layer)
            assert vq.embed.std().item() == pytest.approx(args.token_dim ** -0.5, rel=0.35)
        else:  # the codes are encoder embeddings, through an identity layer
            with torch.no_grad():
                z = common.latent_rows(torch.cat([model.encode(x) for x, _ in images]), args.token_dim)
            assert torch.equal(vq.simvq_map.weight.detach(), torch.eye(args.token_dim))
            gaps = (model.quantizer.codebook.detach()[:, None] - z[None]).norm(dim=-1).min(1).values
            assert gaps.max() < 1e-6


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (issue #9): --dataset fashion-mnist on tiny files in the real idx format
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """30 training images (3 per class) and 8 test images, a class-dependent bar on zero background."""
    from test_fashion_mnist import write_split as write_idx
    rng = np.random.default_rng(1)

    def images(labels):
        x = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for k, c in enumerate(labels):
            x[k, 2 + 2 * c:8 + 2 * c, 4:24] = 120 + 10 * c + rng.integers(0, 20)
        return x
    root = tmp_path_factory.mktemp("fashion")
    train_labels, test_labels = np.repeat(np.arange(10), 3).astype(np.uint8), (np.arange(8) % 10).astype(np.uint8)
    write_idx(root, "train", images(train_labels), train_labels)
    write_idx(root, "t10k", images(test_labels), test_labels)
    return root


def test_fashion_mnist_run_end_to_end(fashion_dir, tmp_path):
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_dir), "--out", str(tmp_path)] + \
        without_sizes(TINY) + ["--val-size", "10", "--deferred", "--continuous-epochs", "1", "--epochs", "2"]
    tok.main(tok.build_parser().parse_args(argv))
    name = "vq_deferred_fashion-mnist"
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["args"]["scheme"] == "fashion-mnist" and record["args"]["resolution"] == 32
    assert record["args"]["test_size"] is None and record["args"]["val_size"] == 10
    assert record["metrics"]["num_images"] == 8  # the official test file
    split = common.load_split(tmp_path / "split_fashion-mnist.json")
    assert split["sizes"] == {"train": 20, "val": 10, "test": 8}
    # the generators' entry point gives the images the run was evaluated on
    ckpt = torch.load(tmp_path / name / "best.pt", weights_only=True)
    test = common.tokenizer_datasets(ckpt["args"], parts=("test",))["test"]
    assert len(test) == 8 and test[0][0].shape == (3, 32, 32)
    tok.main(tok.build_parser().parse_args(["--data-dir", str(fashion_dir), "--out", str(tmp_path), "--device", "cpu",
                                            "--num-workers", "0", "--dump-tokens", "test",
                                            "--checkpoint", str(tmp_path / name / "best.pt")]))
    dump = torch.load(tmp_path / name / "tokens_test.pt", weights_only=True)
    assert dump["tokens"].shape == (8, 8, 8) and dump["labels"].tolist() == list(range(8))
    # the split belongs to the files: other data with the same class names is refused
    from test_fashion_mnist import write_split as write_idx
    write_idx(tmp_path / "more", "train", np.zeros((40, 28, 28), np.uint8), np.zeros(40, np.uint8))
    write_idx(tmp_path / "more", "t10k", np.zeros((8, 28, 28), np.uint8), np.zeros(8, np.uint8))
    argv[argv.index(str(fashion_dir))] = str(tmp_path / "more")
    with pytest.raises(common.UserError, match="splits 30 training and 8 test images, but .* holds 40 and 8"):
        tok.main(tok.build_parser().parse_args(argv + ["--name", "other"]))


def test_fashion_mnist_runs_get_their_own_table_not_the_papers():
    import evaluate

    def run(deferred, seed, mse):
        args = {"quantizer": "vq", "deferred": deferred, "scheme": "fashion-mnist", "dataset": "fashion-mnist",
                "simvq": False, "gan_weight": 0.0, "seed": seed, "resolution": 32, "epochs": 20,
                "continuous_epochs": 10}
        return {"experiment": "imagenet_tokenizer", "eval_split": "test", "args": args,
                "metrics": {"mse": mse, "perplexity": 100.0 * (1 + deferred), "rfid": None}}
    results = [run(False, 0, 0.010), run(False, 1, 0.012), run(True, 0, 0.008)]
    assert evaluate.render_tokenizer_table(results, "Table 3") is None  # never a paper row
    text = evaluate.render_tokenizer_other_datasets(results, None)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| fashion-mnist")]
    assert [r[2:7] for r in rows] == [["epochs=20", "baseline", "–", "2", "0.01100 ± 0.00141"],
                                      ["epochs=20", "deferred", "10", "1", "0.00800"]]
    assert "r-FID" not in text  # a metric no run computed gets no column


def test_reconstruction_sheet_puts_each_row_of_originals_above_its_reconstructions():
    class Negative(torch.nn.Module):
        def forward(self, x):
            return 1 - x, None, x.new_zeros(())
    images = [(torch.full((3, 4, 4), k / 40), 0) for k in range(20)]
    sheet = tok.reconstruction_sheet(Negative(), images, common.DistInfo(0, 1, 0, torch.device("cpu")), columns=8)
    assert sheet.shape == (3, 4 * 4, 8 * 4) and sheet.dtype == torch.uint8
    block = lambda r, c: sheet[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4]  # noqa: E731
    for k in range(16):
        row, col = divmod(k, 8)
        assert (block(2 * row, col) == round(255 * k / 40)).all()           # original
        assert (block(2 * row + 1, col) == round(255 * (1 - k / 40))).all()  # its reconstruction below


def test_fid_images_limits_the_r_fid_sets_to_the_first_images(image_folder, trained, tmp_path, monkeypatch):
    out, runs = trained
    ckpt = torch.load(out / runs[("vq", False)][0] / "best.pt", weights_only=True)
    model = common.build_tokenizer(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    seen = {}

    def count_pngs(folder, args, device):
        seen.update({sub: sorted(os.listdir(os.path.join(folder, sub))) for sub in ("recon", "real")})
        return 1.0
    monkeypatch.setattr(tok, "score_fid", count_pngs)
    data = common.tokenizer_datasets(ckpt["args"])
    info = common.DistInfo(0, 1, 0, torch.device("cpu"))
    for limit, expected in ((4, 4), (0, 6)):
        args = parse(image_folder, tmp_path, "--fid-images", str(limit))
        tok.evaluate(model, data["test"], args, info, None, fid_dir=str(tmp_path / f"fid{limit}"))
        assert seen["recon"] == seen["real"] == [f"{i:07d}.png" for i in range(expected)]


def test_a_seed_other_than_0_names_its_run_and_its_evaluations(image_folder, tmp_path):
    run_script(image_folder, tmp_path / "o", "--epochs", "1", "--seed", "1")
    assert (tmp_path / "o" / "vq_baseline_imagenet100_s1.json").exists()
    run_script(image_folder, tmp_path / "o", "--eval-only", "--eval-split", "val",
               "--checkpoint", str(tmp_path / "o" / "vq_baseline_imagenet100_s1" / "best.pt"))
    assert (tmp_path / "o" / "vq_baseline_imagenet100_s1_val.json").exists()
