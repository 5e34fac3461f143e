"""llamagen_deferred.py on generated 64x64 ImageFolder trees (train/ and val/), tiny widths, CPU.

The whole pipeline runs once per session (tokenizer with both phases -> evaluation -> ten-crop codes
-> GPT -> samples -> sample metrics); other tests check the models and metrics against
independent computations (numpy SSIM, hand-built LlamaGen checkpoints, full vs cached forward).
"""
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
import evaluate
import llamagen_deferred as lg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 32
TINY = ["--resolution", "64", "--ch", "8", "--ch-mult", "1,2,2,2", "--num-res-blocks", "1", "--attn-resolutions", "8",
        "--z-channels", "8", "--token-dim", "4", "--codebook-size", str(K), "--batch-size", "4", "--num-workers", "0",
        "--lpips-weight", "0", "--device", "cpu", "--eval-batch-size", "4", "--log-every", "1"]
GPT_TINY = ["--gpt-layers", "2", "--gpt-dim", "32", "--gpt-heads", "2", "--gpt-batch-size", "4", "--gpt-epochs", "2"]
CONTINUOUS, EPOCHS, GAN_START = 4, 3, 2  # 12 images / batch 4 = 3 steps per epoch: 9 steps, switch at 4


def write_imagenet(root, per_class=(4, 2)):
    """ImageNet-like ImageFolder trees train/ and val/ of 3 classes; images a little larger than
    64 and not square, so the crops do something."""
    rng = np.random.default_rng(0)
    for part, n in zip(("train", "val"), per_class):
        for c in range(3):
            folder = root / part / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 72 + 4 * i, 80 + 8 * c
                yy, xx = np.mgrid[0:h, 0:w] / 16.0
                base = np.stack([np.sin(xx * (c + 1) + i), np.cos(yy * (i + 1)), np.sin(xx + yy + c)], -1)
                img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)).clip(0, 1) * 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"img{i}.png")
    return root


def run(argv):
    return lg.main(lg.build_parser().parse_args(argv))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Every stage of the deferred arm once; records the switch and what it consumed."""
    root = tmp_path_factory.mktemp("llamagen")
    data = write_imagenet(root / "imagenet")
    out = root / "runs"
    base = TINY + ["--data-dir", str(data), "--out", str(out), "--deferred"]
    switches = []
    original = common.deferred_switch

    def spy(quantizer, encode, batches, ratio, *a, **kw):
        consumed = []

        def counting():
            for b in batches:
                consumed.append(b)
                yield b
        n = original(quantizer, encode, counting(), ratio, *a, **kw)
        switches.append({"batches": len(consumed), "n": n, "codes": quantizer.embed.detach().clone()})
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "deferred_switch", spy)
        run(base + ["--stage", "tokenizer", "--epochs", str(EPOCHS), "--continuous-steps", str(CONTINUOUS),
                    "--gan-start", str(GAN_START), "--ckpt-every", "2"])
    run(base + ["--stage", "tokenizer-eval", "--skip-fid"])
    run(base + ["--stage", "tokens", "--crop-ranges", "1.1,1.05"])
    run(base + GPT_TINY + ["--stage", "gpt"])
    run(base + GPT_TINY + ["--stage", "sample", "--num-samples", "6", "--cfg-scale", "1.0"])
    run(base + GPT_TINY + ["--stage", "sample-eval", "--skip-fid", "--skip-isc"])
    return {"root": root, "data": data, "out": out, "arm": out / "deferred", "switches": switches, "base": base}


# ------------------------------------------------------------------------------------------------
# The tokenizer stage: both phases, one switch, unit codes, GAN after the switch
# ------------------------------------------------------------------------------------------------


def test_both_phases_run_and_the_codebook_is_initialised_once_from_the_first_batch(pipeline):
    assert len(pipeline["switches"]) == 1
    sw = pipeline["switches"][0]
    assert sw["batches"] == 1 and sw["n"] == 2 * K  # --ratio 2: 4 images x 64 positions >= 64, one batch
    assert torch.allclose(sw["codes"].norm(dim=1), torch.ones(K), atol=1e-5)
    ckpt = common.load_checkpoint(str(pipeline["arm"] / "tokenizer" / "last.pt"))
    history = ckpt["history"]
    phases = [h["phase"] for h in history]
    assert phases == ["continuous"] * CONTINUOUS + ["discretization"] * (3 * EPOCHS - CONTINUOUS)
    assert ckpt["state"]["switched_at"] == CONTINUOUS
    # GAN only from GAN_START steps into the Discretization Phase
    d_losses = [h["gan_d"] for h in history]
    assert all(d == 0 for d in d_losses[:CONTINUOUS + GAN_START]) and all(d > 0 for d in d_losses[CONTINUOUS + GAN_START:])
    assert all("perplexity" in h for h in history[CONTINUOUS:]) and "perplexity" not in history[0]
    continuous = common.load_checkpoint(str(pipeline["arm"] / "tokenizer" / "continuous.pt"))
    assert not bool(continuous["model"]["quantizer.enabled"]) and bool(ckpt["model"]["quantizer.enabled"])
    assert torch.allclose(ckpt["codebook"].norm(dim=1), torch.ones(K), atol=1e-5)
    assert not torch.equal(ckpt["codebook_raw"], sw["codes"])  # trained after the switch


def test_resume_reproduces_the_uninterrupted_run(pipeline, tmp_path, monkeypatch):
    args = TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--deferred", "--stage", "tokenizer",
                   "--epochs", str(EPOCHS), "--continuous-steps", str(CONTINUOUS), "--gan-start", str(GAN_START),
                   "--ckpt-every", "2"]
    saves = []
    real_save = common.save_checkpoint

    def killed_after_step_6(path, **state):
        real_save(path, **state)
        saves.append(state["step"])
        if state["step"] == 6 and path.endswith("last.pt"):
            raise KeyboardInterrupt  # a kill right after the step-6 checkpoint
    monkeypatch.setattr(common, "save_checkpoint", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    run(args + ["--resume"])
    resumed = common.load_checkpoint(str(tmp_path / "deferred" / "tokenizer" / "last.pt"))
    full = common.load_checkpoint(str(pipeline["arm"] / "tokenizer" / "last.pt"))
    assert resumed["step"] == full["step"] == 3 * EPOCHS
    for key, value in full["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


def test_tokenizer_eval_and_samples_of_an_unfinished_run_say_so(pipeline, tmp_path, monkeypatch):
    assert common.read_json(str(pipeline["arm"] / "tokenizer.json"))["model_finished"] is True
    finished = common.read_json(str(pipeline["arm"] / "generation.json"))
    assert finished["model_finished"] is True and finished["tokenizer_finished"] is True
    base = TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--deferred"]
    real_save = common.save_checkpoint

    def killed_after_step_6(path, **state):
        real_save(path, **state)
        if state["step"] == 6 and path.endswith("last.pt"):
            raise KeyboardInterrupt  # a kill in the Discretization Phase, 3 steps before the end
    monkeypatch.setattr(common, "save_checkpoint", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(base + ["--stage", "tokenizer", "--epochs", str(EPOCHS), "--continuous-steps", str(CONTINUOUS),
                    "--gan-start", str(GAN_START), "--ckpt-every", "2"])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    run(base + ["--stage", "tokenizer-eval", "--skip-fid"])
    record = common.read_json(str(tmp_path / "deferred" / "tokenizer.json"))
    assert record["model_finished"] is False and record["model_epoch"] == 6
    assert "had not finished" in record["notes"]["model_finished"]
    run(base + GPT_TINY + ["--stage", "sample", "--num-samples", "2", "--gpt-checkpoint",
                           str(pipeline["arm"] / "gpt" / "last.pt"), "--tokenizer-checkpoint",
                           str(tmp_path / "deferred" / "tokenizer" / "last.pt")])
    meta = common.read_json(str(tmp_path / "deferred" / "samples.json"))
    assert meta["model_finished"] is False and meta["tokenizer_finished"] is False


def test_baseline_starts_with_llamagen_uniform_codes_and_quantizes_from_step_0(pipeline, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "deferred_switch", lambda *a, **k: calls.append(1))
    run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--stage", "tokenizer", "--epochs", "1",
                "--gan-weight", "0"])
    ckpt = common.load_checkpoint(str(tmp_path / "baseline" / "tokenizer" / "last.pt"))
    assert not calls and [h["phase"] for h in ckpt["history"]] == ["discretization"] * 3
    assert not os.path.exists(tmp_path / "baseline" / "tokenizer" / "continuous.pt")


def test_switch_codes_raw_stores_the_encoder_outputs_unnormalised(pipeline, tmp_path, monkeypatch):
    seen = []
    original = common.deferred_switch

    def spy(quantizer, encode, batches, ratio, *a, **kw):
        kept = []

        def keep(batch):
            out = encode(batch)
            kept.append(common.latent_rows(out.detach(), quantizer.dim).float())
            return out
        n = original(quantizer, keep, batches, ratio, *a, **kw)
        seen.append((torch.cat(kept), quantizer.embed.detach().clone(), quantizer.codebook.detach().clone()))
        return n
    monkeypatch.setattr(common, "deferred_switch", spy)
    run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--stage", "tokenizer", "--deferred",
                "--epochs", "2", "--continuous-steps", "3", "--gan-weight", "0", "--switch-codes", "raw"])
    (embeddings, stored, effective), = seen
    match = torch.cdist(stored.double(), embeddings.double()).min(1)
    assert match.values.max() < 1e-4 and match.indices.unique().numel() == K  # K distinct raw encoder outputs
    assert not torch.allclose(stored.norm(dim=1), torch.ones(K), atol=1e-2)  # not projected at the switch
    assert torch.allclose(effective.norm(dim=1), torch.ones(K), atol=1e-5)  # the search still sees unit codes
    ckpt = common.load_checkpoint(str(tmp_path / "deferred_raw" / "tokenizer" / "last.pt"))  # its own folder
    assert ckpt["args"]["switch_codes"] == "raw" and not os.path.exists(tmp_path / "deferred")
    with pytest.raises(common.UserError, match="--switch-codes 'raw' -> 'unit'"):  # another run: no resume
        run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--stage", "tokenizer", "--deferred",
                    "--epochs", "2", "--continuous-steps", "3", "--gan-weight", "0", "--resume", "--arm", "deferred_raw"])
    # evaluate.py gives it its own Table 7 / 12 row, never the unit arm's
    arms = [evaluate._arm_of({"args": dict(deferred=d, switch_codes=c, arm=None)})
            for d, c in ((True, "raw"), (True, "unit"), (False, "raw"), (True, None))]
    assert arms == ["deferred_raw", "deferred", "baseline", "deferred"]  # None: a JSON from before the flag


def test_switch_after_all_steps_is_refused_before_training(pipeline, tmp_path):
    with pytest.raises(common.UserError, match="no Discretization Phase"):
        run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path), "--stage", "tokenizer", "--deferred",
                    "--epochs", "1", "--continuous-steps", "3"])
    assert not os.path.exists(tmp_path / "deferred" / "tokenizer" / "last.pt")


# ------------------------------------------------------------------------------------------------
# Evaluation (Table 7), codes, generation stages
# ------------------------------------------------------------------------------------------------


def test_tokenizer_eval_json_and_reconstructions(pipeline):
    rec = common.read_json(str(pipeline["arm"] / "tokenizer.json"))
    m = rec["metrics"]
    assert rec["experiment"] == "llamagen_tokenizer" and rec["method"] == "deferred" and m["num_images"] == 6
    for key in ("psnr", "ssim", "ssim_llamagen", "euclidean", "cosine", "vendi", "euclidean_unit", "vendi_unit",
                "perplexity", "used_codes"):
        assert key in m and np.isfinite(m[key]), key
    assert 1 <= m["vendi_unit"] <= 4 + 1e-6 and m["euclidean_unit"] <= 2.0
    assert "rfid" in rec["notes"] and rec["data_range"] == 1.0
    images = lg.npz_images(str(pipeline["arm"] / "reconstructions.npz"))
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert isinstance(images, np.memmap)  # stored uncompressed: read without loading
    # PSNR recomputed from the saved reconstructions and the ADM centre crops of the val images
    val = lg.imagenet_split(argparse_ns(pipeline), "val", "eval")
    ref = torch.stack([val[i][0] for i in range(len(val))])
    ours = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    expected = (10 * torch.log10(1 / (ours.double() - ref.double()).pow(2).flatten(1).mean(1))).mean()
    assert abs(m["psnr"] - float(expected)) < 1e-4
    assert abs(m["ssim_llamagen"] - float(lg.ssim_llamagen(ours, ref).mean())) < 1e-6


def argparse_ns(pipeline):
    return lg.build_parser().parse_args(pipeline["base"] + ["--stage", "tokenizer-eval"])


def test_image_budgets_keep_a_class_stratified_subset_and_say_which(pipeline, tmp_path, monkeypatch):
    """--max-eval-images / --max-train-images: ImageFolder lists are sorted by class, so "the first
    N" would evaluate (or train the generator on) the first classes only."""
    val = lg.imagenet_split(argparse_ns(pipeline), "val", "eval")
    assert [label for _, label in val.items] == [0, 0, 1, 1, 2, 2]
    assert lg.keep_budget(val, 0) is None and len(val) == 6
    record = lg.keep_budget(val, 3)
    assert sorted(label for _, label in val.items) == [0, 1, 2] and record["per_class"] == {"0": 1, "1": 1, "2": 1}
    ckpt = str(pipeline["arm"] / "tokenizer" / "last.pt")
    scored = []  # r-FID's reference: the same 3 images (the network is not what is tested here)
    monkeypatch.setattr(common, "inception_weights_path", lambda *a, **k: "inception.pth")
    monkeypatch.setattr(common, "fidelity_metrics", lambda recon, ref, **k: scored.append(len(ref)) or {"fid": 1.0})
    run(pipeline["base"] + ["--stage", "tokenizer-eval", "--max-eval-images", "3", "--arm", "budget",
                            "--tokenizer-checkpoint", ckpt])
    result = common.read_json(str(pipeline["out"] / "budget" / "tokenizer.json"))
    assert result["metrics"]["num_images"] == 3 and result["eval_subset"]["per_class"] == {"0": 1, "1": 1, "2": 1}
    assert scored == [3] and result["fid_reference"] == "ImageNet-1K val, 3 images (class-stratified subset of 6, seed 0)"
    run(pipeline["base"] + ["--stage", "tokens", "--max-train-images", "6", "--arm", "budget",
                            "--tokenizer-checkpoint", ckpt])
    tokens = common.load_checkpoint(str(pipeline["out"] / "budget" / "tokens_train.pt"))
    assert tokens["labels"].tolist() == [0, 0, 1, 1, 2, 2] and tokens["train_subset"]["of"] == 12


def test_ten_crop_codes_layout(pipeline):
    record = common.load_checkpoint(str(pipeline["arm"] / "tokens_train.pt"))
    codes = np.load(pipeline["arm"] / "tokens_train.npy")
    assert codes.shape == (12, 20, 8, 8) and codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() < K and record["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # view 4 is the centre crop of the 1.1x centre crop; view 14 the same at 1.05 (TenCrop order)
    model, _ = lg.load_any_tokenizer(str(pipeline["arm"] / "tokenizer" / "last.pt"), 64, "cpu")
    ds = lg.imagenet_split(argparse_ns(pipeline), "train", "eval")
    img = Image.open(os.path.join(ds.root, ds.items[5][0])).convert("RGB")
    for view, crop_range in ((4, 1.1), (14, 1.05)):
        side = int(64 * crop_range)  # 70, 67: ADM centre crop, then TenCrop's centre (torchvision rounds)
        start = int(round((side - 64) / 2))
        crop = lg.center_crop(img, side).crop((start, start, start + 64, start + 64))
        with torch.no_grad():
            idx = model.quantizer(model.encode(lg.to_tensor(crop)[None]))[1][0]
        assert torch.equal(idx, torch.from_numpy(codes[5, view].astype(np.int64)))
    loaded = lg.load_codes(str(pipeline["arm"] / "tokens_train.pt"))
    assert loaded.num_views == 20 and loaded.grid == 8 and loaded.num_classes == 3


def test_samples_npz_and_generation_json(pipeline):
    with np.load(pipeline["arm"] / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 64, 64, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].shape == (6,) and z["labels"].max() < 3
    rec = common.read_json(str(pipeline["arm"] / "generation.json"))
    assert rec["experiment"] == "generator_llamagen" and rec["method"] == "llamagen_deferred"
    assert rec["sampling"]["cfg_scale"] == 1.0 and rec["sampling"]["llamagen_cfg_scale"] == 2.0  # w and s = 1 + w
    assert rec["metrics"]["num_samples"] == 6
    assert "gfid" in rec["notes"] and "isc" in rec["notes"] and rec["tokenizer"]["deferred"] is True


def test_evaluate_renders_tables_7_and_12(pipeline, tmp_path):
    report = evaluate.cmd_tables(evaluate.build_parser().parse_args(
        ["tables", str(pipeline["out"]), "--out", str(tmp_path)]))
    assert "## Table 7" in report and "## Table 12" in report
    t7 = report.split("## Table 7")[1].split("##")[0]
    deferred_row = next(line for line in t7.splitlines() if line.startswith("| + Deferred |"))
    assert "| 6.48 |" in deferred_row and "| 20.82 |" in deferred_row
    raw_row = next(line for line in t7.splitlines() if line.startswith("| + Deferred, raw switch codes |"))
    assert raw_row.split(" | ")[4] == "–" and deferred_row.split(" | ")[4] != "–"  # PSNR ours: the pipeline ran the unit arm
    # VAR's and VQGAN's PSNR / SSIM have a paper value and no reproduction path: the note says why
    assert "PSNR / SSIM ours of VAR and VQGAN stay '–'" in t7 and "not marked *" in t7


def test_gpt_checkpoint_from_codes_and_foreign_gpt_checkpoint_refused(pipeline, tmp_path):
    ckpt = common.load_checkpoint(str(pipeline["arm"] / "gpt" / "last.pt"))
    assert ckpt["vocab_size"] == K and ckpt["num_classes"] == 3 and ckpt["seq_len"] == 64
    args = lg.build_parser().parse_args(pipeline["base"] + GPT_TINY + ["--stage", "sample"])
    model, _, tokenizer_path = lg.load_gpt(args, "cpu")
    assert model.vocab_size == K and tokenizer_path == str(pipeline["arm"] / "tokenizer" / "last.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"output.weight": torch.zeros(3, 3)}}, bad)
    args.gpt_checkpoint = str(bad)
    with pytest.raises(common.UserError, match="not a LlamaGen GPT"):
        lg.load_gpt(args, "cpu")
    args.gpt_layers = 3  # our checkpoint under another architecture
    args.gpt_checkpoint = str(pipeline["arm"] / "gpt" / "last.pt")
    with pytest.raises(common.UserError, match="do not fit"):
        lg.load_gpt(args, "cpu")


# ------------------------------------------------------------------------------------------------
# Late failures checked at start: the switch's codebook, the disk of the sample stage
# ------------------------------------------------------------------------------------------------


def test_a_codebook_the_switch_cannot_fill_is_refused_before_training(pipeline, tmp_path):
    out = tmp_path / "runs"
    # 3 steps per epoch; the switch at step 5 has 1 batch of 4 images x 64 positions = 256 embeddings left
    with pytest.raises(common.UserError, match=r"--codebook-size 200 at --ratio 2 needs 400 embeddings at the "
                                               r"switch, but the 1 batches left in its epoch give 256"):
        run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(out), "--deferred", "--stage", "tokenizer",
                    "--epochs", "3", "--continuous-steps", "5", "--codebook-size", "200"])
    assert not any(p.suffix in (".pt", ".lock") for p in out.rglob("*"))  # nothing trained, lock released
    # at the start of an epoch the same codebook fits (3 batches: 768 embeddings)
    args = lg.build_parser().parse_args(TINY + ["--stage", "tokenizer", "--deferred", "--continuous-steps", "6",
                                                "--codebook-size", "200"])
    lg.check_switch_fits(args, 3, 1)


def sample_stage(pipeline, out, *extra):
    return run(pipeline["base"][:-1] + GPT_TINY + ["--out", str(out), "--arm", "x", "--stage", "sample",
                                                   "--num-samples", "4", "--gpt-checkpoint",
                                                   str(pipeline["arm"] / "gpt" / "last.pt")] + list(extra))


def test_sample_stage_checks_the_disk_at_start_and_a_full_disk_is_one_line(pipeline, tmp_path, monkeypatch):
    import collections
    import errno
    import shutil
    out = tmp_path / "runs"
    usage = collections.namedtuple("usage", "total used free")
    need = 2 * 4 * 64 * 64 * 3  # the rows, then the .npz made from them
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - need + 1, need - 1))
    with pytest.raises(common.UserError, match="--stage sample of 4 images needs 0.0 GB on the disk of "):
        sample_stage(pipeline, out)
    assert not out.exists()
    monkeypatch.undo()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(common.UserError, match=r"cannot write .*\.samples\.npz\.rows\.tmp \(0\.0 GB\): No space left"):
        sample_stage(pipeline, out)
    assert sorted(p.name for p in (out / "x").iterdir()) == []  # no lock, no rows file, no samples


def test_no_rows_file_survives_a_failed_sample_stage_or_the_next_start(pipeline, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    stale = out / "x" / ".samples.npz.rows.tmp"  # what a killed sample stage leaves (sparse, GBs at full scale)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)

    def broken(*args, **kwargs):
        raise common.UserError("sampling failed")
    monkeypatch.setattr(lg, "sample_tokens", broken)
    with pytest.raises(common.UserError, match="sampling failed"):
        sample_stage(pipeline, out)
    assert sorted(p.name for p in (out / "x").iterdir()) == []  # the stale one went at start, the new one at failure
    monkeypatch.undo()
    sample_stage(pipeline, out)
    assert sorted(p.name for p in (out / "x").iterdir()) == ["samples.json", "samples.npz"]


# ------------------------------------------------------------------------------------------------
# LlamaGen-B: causality, cached decoding, guidance, null class
# ------------------------------------------------------------------------------------------------


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    model = lg.LlamaGenGPT(vocab_size=16, num_classes=5, seq_len=16, dim=32, n_layer=2, n_head=2, **kw)
    for p in model.output.parameters():  # zero-init output would make every logit 0
        torch.nn.init.normal_(p, 0, 0.5)
    return model.eval()


def test_gpt_output_starts_at_zero_and_shapes():
    model = lg.LlamaGenGPT(vocab_size=16, num_classes=5, seq_len=16, dim=32, n_layer=2, n_head=2).eval()
    logits = model(torch.randint(16, (3, 15)), torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 16, 16) and torch.count_nonzero(logits) == 0
    assert model.cls_embedding.embedding_table.num_embeddings == 6


def test_gpt_is_causal():
    model = tiny_gpt()
    z = torch.randint(16, (2, 16))
    labels = torch.tensor([1, 3])
    base = model(z[:, :-1], labels)
    for j in (0, 5, 14):
        changed = z.clone()
        changed[:, j] = (changed[:, j] + 1) % 16
        out = model(changed[:, :-1], labels)
        # token j is the input of position j + 1: logits up to position j (which predict z_0..z_j) stay
        assert torch.allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-6)
        assert not torch.allclose(out[:, j + 1:], base[:, j + 1:], atol=1e-4)


def test_kv_cached_decoding_equals_the_full_forward():
    model = tiny_gpt()
    z = torch.randint(16, (3, 16))
    labels = torch.tensor([0, 4, 2])
    full = model(z[:, :-1], labels)
    caches = model.new_caches(3, "cpu", torch.float32)
    steps = [model.step(caches, 0, labels_B=labels)]
    steps += [model.step(caches, i, idx_B1=z[:, i - 1:i]) for i in range(1, 16)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_llamagen_scale_1_equals_the_conditional_logits_through_the_doubled_batch():
    model = tiny_gpt()
    labels = torch.tensor([1, 2, 3])
    both = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    caches = model.new_caches(6, "cpu", torch.float32)
    logits = model.step(caches, 0, labels_B=both)
    cond = model.step(model.new_caches(3, "cpu", torch.float32), 0, labels_B=labels)
    assert torch.allclose(lg.guided_logits(logits[:3], logits[3:], 1.0), cond, atol=1e-6)
    # and --cfg-scale w = 0 (s = 1) is the conditional sample, like a guided one at w ~ 0
    a = lg.sample_tokens(model, labels, cfg_scale=0.0, generator=torch.Generator().manual_seed(3))
    b = lg.sample_tokens(model, labels, cfg_scale=1e-9, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, 16) and torch.equal(a, b)


def test_label_dropout_uses_the_null_class_row():
    model = tiny_gpt(class_dropout=1.0).train()
    emb = model.cls_embedding(torch.tensor([0, 1, 4]))
    null = model.cls_embedding.embedding_table.weight[model.num_classes]
    assert model.num_classes == 5 and torch.equal(emb[:, 0], null.expand(3, -1))
    model.eval()
    assert torch.equal(model.cls_embedding(torch.tensor([2]))[0, 0], model.cls_embedding.embedding_table.weight[2])


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # LlamaGen samples through the shared filter
    assert torch.isinf(common.filter_top_k_top_p(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(common.filter_top_k_top_p(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(common.filter_top_k_top_p(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(common.filter_top_k_top_p(logits, top_p=1.0)).any()


def test_rope_table_class_slot_is_zero_and_rows_rotate_by_row_then_column():
    table = lg.rope_2d_table(grid=4, head_dim=16)
    assert table.shape == (17, 8, 2) and torch.count_nonzero(table[0]) == 0
    # token at row 2, column 3 (raster index 11 -> slot 12): first 4 pairs turn with the row
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).double() / 8)
    assert torch.allclose(table[12, :4, 0].double(), torch.cos(2 * freqs), atol=1e-6)
    assert torch.allclose(table[12, 4:, 1].double(), torch.sin(3 * freqs), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Metrics: LlamaGen's SSIM, PSNR, FID against precomputed statistics, .npz reading
# ------------------------------------------------------------------------------------------------


def skimage_ssim_reference(a, b, data_range, win=7):
    """skimage structural_similarity(a, b, data_range=..., channel_axis=-1) with its defaults
    (uniform window, sample covariance), written out in numpy: (H, W, C) float64 images."""
    h, w, c = a.shape
    n = win * win
    out = []
    for ch in range(c):
        x, y = a[..., ch], b[..., ch]
        vals = []
        for i in range(h - win + 1):
            for j in range(w - win + 1):
                px, py = x[i:i + win, j:j + win].ravel(), y[i:i + win, j:j + win].ravel()
                mx, my = px.mean(), py.mean()
                vx, vy = px.var() * n / (n - 1), py.var() * n / (n - 1)
                cxy = ((px - mx) * (py - my)).mean() * n / (n - 1)
                c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_llamagen_ssim_matches_skimage_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 14, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 12, 14, generator=g)).clamp(0, 1)
    ours = lg.ssim_llamagen(x, y)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        assert abs(float(ours[i]) - skimage_ssim_reference(a, b, 2.0)) < 1e-9
    # data_range 2 on [0, 1] images scores higher than the correct range 1
    assert (ours > lg.ssim_llamagen(x, y, data_range=1.0)).all()


def test_fid_against_statistics_matches_scipy(monkeypatch):
    from scipy import linalg
    g = np.random.default_rng(0)
    feats = g.normal(size=(200, 6))
    ref = g.normal(loc=0.3, size=(300, 6)) @ g.normal(size=(6, 6))
    stats = {"mu": ref.mean(0), "sigma": np.cov(ref, rowvar=False)}
    monkeypatch.setattr(lg, "inception_pool_features", lambda *a, **k: torch.from_numpy(feats))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    expected = ((mu - stats["mu"]) ** 2).sum() + np.trace(sigma + stats["sigma"] - 2 * linalg.sqrtm(sigma @ stats["sigma"]).real)
    assert abs(lg.fid_against_statistics(None, stats, cuda=False) - expected) < 1e-6


def test_fid_reference_npz_with_statistics(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images, mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    ds, stats, what = lg.fid_reference(str(path))
    assert len(ds) == 5 and torch.equal(ds[2], torch.from_numpy(images[2]).permute(2, 0, 1))
    assert stats["sigma"].dtype == np.float64 and "statistics" in what
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    assert np.array_equal(lg.npz_images(str(tmp_path / "c.npz")), images)
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    with pytest.raises(common.UserError, match="uint8"):
        lg.npz_images(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------------
# Public checkpoints: LlamaGen tokenizer import, codebook coverage of three layouts
# ------------------------------------------------------------------------------------------------


def to_llamagen_layout(sd):
    """Our VQ-16 state dict renamed the way LlamaGen's vq_model.py names it, written out rule by rule
    (conv_blocks.{i}.res / .attn / .downsample.conv / .upsample.conv, separate q, k, v, proj_out,
    nin_shortcut, quantize.embedding.weight, the codebook_used buffer)."""
    out = {}
    for key, value in sd.items():
        if key in ("quantizer.enabled", "quantizer.steps_unused"):
            continue
        new = key.replace("quantizer.embed", "quantize.embedding.weight")
        new = new.replace(".levels.", ".conv_blocks.").replace(".blocks.", ".res.").replace(".attns.", ".attn.")
        new = new.replace(".skip.", ".nin_shortcut.").replace(".proj.", ".proj_out.")
        new = new.replace(".down.", ".downsample.conv.").replace(".up.", ".upsample.conv.")
        if ".qkv." in new:
            for name, part in zip("qkv", value.chunk(3, 0)):
                out[new.replace(".qkv.", f".{name}.")] = part.clone()
            continue
        out[new] = value
    out["quantize.codebook_used"] = torch.zeros(65536)
    return out


def test_public_llamagen_tokenizer_loads_and_reconstructs_identically(pipeline, tmp_path):
    args = lg.build_parser().parse_args(TINY + ["--stage", "tokenizer"])
    ours = common.build_tokenizer(lg.tokenizer_cfg(args))
    ours.quantizer.set_enabled(True)
    ours.eval()
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": to_llamagen_layout(ours.state_dict())}, path)
    loaded, cfg = lg.load_any_tokenizer(str(path), 64, "cpu")
    assert (cfg["ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"], cfg["codebook_size"], cfg["token_dim"]) == \
        (8, (1, 2, 2, 2), 1, K, 4)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], ours(x)[0], atol=1e-6)
        assert torch.equal(loaded(x)[1], ours(x)[1])
    # the evaluation stage takes it as the "public" arm (a fresh run folder)
    run(TINY + ["--data-dir", str(pipeline["data"]), "--out", str(tmp_path / "runs"), "--stage", "tokenizer-eval",
                "--arm", "public", "--tokenizer-checkpoint", str(path), "--skip-fid"])
    rec = common.read_json(str(tmp_path / "runs" / "public" / "tokenizer.json"))
    assert rec["method"] == "public" and rec["tokenizer"]["name"] == "llamagen-public" and rec["history"] == []


def write_foreign_checkpoints(folder, codes):
    layouts = {"llamagen": {"model": {"quantize.embedding.weight": codes, "encoder.conv_in.weight": torch.zeros(1)}},
               "var": {"quantize.embedding.weight": codes, "quant_conv.weight": torch.zeros(1)},
               "vqgan": {"state_dict": {"quantize.embedding.weight": codes}, "global_step": 7}}
    paths = {}
    for name, obj in layouts.items():
        paths[name] = folder / f"{name}.ckpt"
        torch.save(obj, paths[name])
    return paths


def test_codebook_of_all_three_public_layouts_raw_and_normalised(tmp_path):
    codes = torch.randn(64, 8) * 3
    for name, path in write_foreign_checkpoints(tmp_path, codes).items():
        save = tmp_path / f"coverage_{name}.json"
        out = evaluate.cmd_codebook(evaluate.build_parser().parse_args(
            ["codebook", str(path), "--view", "both", "--label", name, "--save", str(save)]))
        assert abs(out["raw"]["euclidean"] - common.mean_pairwise_euclidean(codes)) < 1e-6
        unit = codes / codes.norm(dim=1, keepdim=True)
        assert abs(out["normalised"]["euclidean"] - common.mean_pairwise_euclidean(unit)) < 1e-6
        assert abs(out["raw"]["cosine"] - out["normalised"]["cosine"]) < 1e-9
        rec = json.loads(save.read_text())
        assert rec["experiment"] == "codebook" and rec["method"] == name
        assert abs(rec["metrics"]["vendi_unit"] - out["normalised"]["vendi"]) < 1e-9


def test_codebook_missing_key_is_one_line(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(common.UserError, match="no codebook found"):
        evaluate.load_codebook(str(path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "codebook", str(path), "--key",
                           "state_dict.quantize.embedding.weight"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no codebook at key" in proc.stderr


def test_coverage_rows_render_in_table_7(tmp_path):
    codes = torch.randn(64, 8)
    paths = write_foreign_checkpoints(tmp_path, codes)
    evaluate.cmd_codebook(evaluate.build_parser().parse_args(
        ["codebook", str(paths["var"]), "--view", "both", "--label", "var", "--save", str(tmp_path / "r" / "v.json")]))
    report = evaluate.cmd_tables(evaluate.build_parser().parse_args(
        ["tables", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]))
    row = next(line for line in report.splitlines() if line.startswith("| VAR (public)"))
    assert f"| {common.mean_pairwise_euclidean(codes):.2f} |" in row and "| 0.90 |" in row


def test_sampling_under_bf16_autocast_keeps_a_bf16_cache():
    model = tiny_gpt()
    made = []
    original = model.new_caches
    model.new_caches = lambda b, d, dtype: made.append(dtype) or original(b, d, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA path of --stage sample
        idx = lg.sample_tokens(model, torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert made == [torch.bfloat16] and idx.shape == (2, 16) and idx.max() < 16


def test_gpt_reads_a_common_token_dump_and_refuses_bad_ids(tmp_path):
    from generator_fixture import write_token_dump
    tokens = torch.randint(16, (5, 4, 4))
    path = write_token_dump(tmp_path / "tokens_train.pt", tokens, torch.tensor([0, 1, 2, 1, 0]), 16, num_classes=3)
    codes = lg.load_codes(str(path))
    assert (codes.num_views, codes.grid, codes.num_classes, codes.codebook_size) == (1, 4, 3, 16)
    batch = codes.batch(torch.tensor([3, 1]), torch.zeros(2, dtype=torch.long))
    assert batch.dtype == torch.int64 and torch.equal(batch, tokens[[3, 1]].reshape(2, 16))
    # our ten-crop layout: an id outside [0, K) is refused when the file is opened
    np.save(tmp_path / "bad.npy", np.full((2, 3, 4, 4), 16, dtype=np.int16))
    torch.save({"tokens_file": "bad.npy", "labels": torch.tensor([0, 1]), "codebook_size": 16, "num_classes": 2},
               tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match=r"token ids must lie in \[0, 16\)"):
        lg.load_codes(str(tmp_path / "bad.pt"))
