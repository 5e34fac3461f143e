"""cifar_sweep.py and its evaluate.py renderers, on a tiny CIFAR-10 folder in torchvision's real format.

The fixture (tests/cifar_fixture.py) is read by the real torchvision.datasets.CIFAR10; only its md5
check is replaced, in the test process (monkeypatch) and in the torchrun launcher the DDP test writes.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cifar_sweep
import common
import evaluate
from cifar_fixture import allow_fixture_checksums, write_cifar_fixture, write_fashion_fixture
from common import perplexity_from_counts, run_cli
from race import race

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("mse", "perplexity", "used_codes", "euclidean", "cosine", "vendi")
TEST_IMAGES = 64  # smoke preset: the first 64 test images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_fixture(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(autouse=True)
def fixture_checksums(monkeypatch):
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def sweep(*argv):
    return run_cli(cifar_sweep.main, cifar_sweep.build_parser(), ["--num-workers", "0", *map(str, argv)])


def smoke(data_dir, out, method, *extra):
    """Run one smoke configuration; returns (json record, checkpoint, run name)."""
    args = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(
        ["--preset", "smoke", "--method", method, "--codebook-size", "32", *map(str, extra)]))
    name = cifar_sweep.run_name(args)
    sweep("--preset", "smoke", "--method", method, "--codebook-size", 32, "--data-dir", data_dir, "--out", out, *extra)
    with open(os.path.join(out, name + ".json")) as f:
        record = json.load(f)
    return record, torch.load(os.path.join(out, name + ".pt"), weights_only=True), name


def test_fixture_is_read_by_the_real_loader(data_dir):
    import pickle
    with open(os.path.join(data_dir, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f)["data"]
    images = cifar_sweep.load_cifar(data_dir, train=False, download=False, subset=None)
    assert images.dtype == torch.uint8 and images.shape == (TEST_IMAGES, 3, 32, 32)
    # channel-major rows of 3072 -> (3, 32, 32): torchvision's HWC round trip must give them back
    assert torch.equal(images, torch.from_numpy(raw.reshape(-1, 3, 32, 32)))
    assert len(cifar_sweep.load_cifar(data_dir, True, False, None)) == 5 * 48


# ---- --dataset fashion-mnist ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion_fixture(str(tmp_path_factory.mktemp("fashion")))


def test_fashion_images_are_zero_padded_to_the_network_size(fashion):
    root, arrays = fashion
    images = cifar_sweep.load_fashion(root, train=False, download=False, subset=None)
    assert images.dtype == torch.uint8 and images.shape == (64, 1, 32, 32)
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(arrays["t10k"][0]))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(images[:, 0][:, border].max()) == 0  # the padding is background
    assert len(cifar_sweep.load_fashion(root, True, False, 100)) == 100


def test_fashion_mnist_run_measures_the_28_pixel_images(fashion, tmp_path):
    """One channel in and out; the reported MSE is over the 28 x 28 original pixels, recomputed
    here from the saved model and the raw idx arrays, independently of the script's evaluation."""
    root, arrays = fashion
    sweep("--dataset", "fashion-mnist", "--data-dir", root, "--preset", "smoke", "--method", "deferred_ema",
          "--codebook-size", 32, "--out", tmp_path)
    name = "deferred_ema_K32_ep2_cont1_s0_smoke_fashion-mnist"
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["experiment"] == "fashion-mnist" and record["args"]["dataset"] == "fashion-mnist"
    assert (record["eval_split"], record["eval_images"], record["data_range"]) == ("test", 64, 1.0)
    args = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(
        ["--dataset", "fashion-mnist", "--preset", "smoke", "--codebook-size", "32"]))
    model = cifar_sweep.build_model(args)
    model.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True)["model"])
    model.eval()
    assert model.encoder[0].in_channels == 1 and model.decoder[-1].out_channels == 1
    x = torch.from_numpy(arrays["t10k"][0]).float()[:, None] / 255.0  # (64, 1, 28, 28) in [0, 1]
    with torch.no_grad():
        recon = model(torch.nn.functional.pad(x - 0.5, (2, 2, 2, 2), value=-0.5))[0][..., 2:30, 2:30] + 0.5
    assert record["metrics"]["mse"] == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)


def test_bad_fashion_data_dir_is_one_line(fashion, tmp_path, capsys):
    import gzip
    root, _ = fashion
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(root):
        (broken / f).write_bytes(open(os.path.join(root, f), "rb").read())

    def error(data_dir):
        with pytest.raises(SystemExit) as exit_info:
            sweep("--dataset", "fashion-mnist", "--data-dir", data_dir, "--preset", "smoke", "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
        return err
    assert error(tmp_path / "nowhere").startswith("error: data folder not found")
    images = broken / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])  # truncated .gz
    assert error(broken).startswith(f"error: cannot read {images}: Compressed file ended")
    with gzip.open(images, "wb") as f:  # a labels file where the images should be: wrong magic
        f.write(gzip.open(broken / "t10k-labels-idx1-ubyte.gz").read())
    assert error(broken).startswith(f"error: {images} is not an idx images file (magic number 2049")


def test_missing_folder_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep("--preset", "smoke", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CIFAR-10 not found") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", sorted(cifar_sweep.METHODS))
def test_every_method_writes_a_valid_result(data_dir, tmp_path, method):
    record, ckpt, name = smoke(data_dir, str(tmp_path), method)
    assert record["experiment"] == "cifar10" and record["method"] == method
    assert record["args"]["codebook_size"] == 32 and record["run_name"] == name
    assert all(np.isfinite(record["metrics"][k]) for k in REQUIRED)
    assert record["model_finished"] is True and record["model_epoch"] == record["args"]["epochs"]
    args = record["args"]
    history = record["history"]
    assert [h["epoch"] for h in history] == list(range(args["epochs"]))
    for h in history:  # the quantizer is off exactly in the Continuous Phase
        assert h["phase"] == ("continuous" if h["epoch"] < args["continuous_epochs"] else "discretization")
        assert (h["quantized_steps"] > 0) == (h["phase"] == "discretization")
        # usage of the epoch's training assignments (Figure 8), only while quantizing
        assert (h["train_perplexity"] is None) == (h["phase"] == "continuous")
        assert h["train_perplexity"] is None or 1 <= h["train_perplexity"] <= 32
        assert np.isfinite(h["val_loss"]) and np.isfinite(h["train_loss"])
    # usage counted over the whole test split; perplexity recomputed independently from the counts
    counts = ckpt["code_counts"]
    assert int(counts.sum()) == TEST_IMAGES * 8 * 8
    assert record["metrics"]["perplexity"] == pytest.approx(perplexity_from_counts(counts))
    if method != "posthoc_kmeans":  # the last epoch's test evaluation is the result (not recomputed)
        assert record["metrics"]["mse"] == history[-1]["val_mse"]
    assert record["metrics"]["used_codes"] == int((counts > 0).sum())
    assert ckpt["codebook"].shape == (32, 32)
    # per-epoch coverage curves: usage and spread at every evaluation while quantizing, recomputed
    # independently for the last one; the spread of the codebook the switch wrote, in its epoch
    last = history[-1]
    quantizing = [h for h in history if h["phase"] == "discretization"]
    assert all("val_used_codes" in h and "codebook_euclidean" in h for h in quantizing)
    assert not any("val_perplexity" in h for h in history if h["phase"] == "continuous")
    if method != "posthoc_kmeans":
        assert last["val_used_codes"] == record["metrics"]["used_codes"]
        assert last["codebook_euclidean"] == pytest.approx(record["metrics"]["euclidean"], rel=1e-5)
        assert last["codebook_cosine"] == pytest.approx(record["metrics"]["cosine"], rel=1e-5)
    switched = [h for h in history if "switch_euclidean" in h]
    if cifar_sweep.METHODS[method]["switch"] is None:  # gaussian: quantizing from the start, no switch
        assert switched == [] and ckpt["switch_codebook"] is None
    elif method == "posthoc_kmeans":  # switched after the last epoch: no epoch of its own
        assert switched == [] and torch.equal(ckpt["switch_codebook"], ckpt["codebook"])
    else:
        assert [h["epoch"] for h in switched] == [args["continuous_epochs"]]
        pairs = torch.cdist(ckpt["switch_codebook"].double(), ckpt["switch_codebook"].double())
        assert switched[0]["switch_euclidean"] == pytest.approx(float(pairs.sum() / (32 * 31)), rel=1e-5)
    # appendix A.1: Adam with amsgrad, lr 3e-4
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["amsgrad"] is True and group["lr"] == 3e-4 and group["weight_decay"] == 0


@pytest.mark.parametrize("method,codes,expected", [
    ("deferred_ema", 512, 5120),  # 10:1 over as many batches as needed (2,048 outputs per smoke batch)
    ("lru_kmeans", 32, 2048),     # SoundStream: k-means of exactly the first batch
])
def test_switch_collects_the_documented_number_of_embeddings(data_dir, tmp_path, monkeypatch, method, codes, expected):
    real_switch = cifar_sweep.deferred_switch
    seen = []

    def spy(quantizer, encode, batches, ratio, **kwargs):
        seen.append((real_switch(quantizer, encode, batches, ratio, **kwargs), kwargs["method"]))
        return seen[-1][0]

    monkeypatch.setattr(cifar_sweep, "deferred_switch", spy)
    smoke(data_dir, str(tmp_path), method, "--codebook-size", codes, "--epochs", 1, "--continuous-epochs", 0)
    assert seen == [(expected, "sample" if method == "deferred_ema" else "kmeans")]


def test_paper_network_shapes():
    """Appendix A.1: 128 downsampling channels, two residual blocks of hidden width 64, token dim 32;
    32 x 32 images -> 8 x 8 tokens."""
    args = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(["--method", "deferred"]))
    model = cifar_sweep.build_model(args)
    x = torch.zeros(2, 3, 32, 32)
    z = model.encoder(x)
    assert z.shape == (2, 32, 8, 8)
    assert model(x)[0].shape == x.shape
    for stack in (model.encoder[5], model.decoder[1]):
        assert len(stack.blocks) == 2
        convs = [m for m in stack.blocks[0] if isinstance(m, torch.nn.Conv2d)]
        assert [tuple(c.weight.shape) for c in convs] == [(64, 128, 3, 3), (128, 64, 1, 1)]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """An output folder holding one finished smoke run (deferred_ema, 32 codes, seed 0)."""
    out = tmp_path_factory.mktemp("finished")
    import torchvision.datasets.cifar as cifar
    saved = cifar.check_integrity
    allow_fixture_checksums()
    try:
        smoke(data_dir, str(out), "deferred_ema")
    finally:
        cifar.check_integrity = saved
    return out


@pytest.mark.parametrize("bad", [
    ["--resume", "--seed", "5"],               # no checkpoint to continue
    [],                                        # the run exists: continuing it needs --resume
    ["--resume", "--lr", "1e-3"],              # its checkpoint was made with another recipe ...
    ["--resume", "--channels", "16"],          # ... or another network
    ["--codebook-size", "20000", "--seed", "5"],   # more codes than one epoch of encoder outputs (192 x 64)
    ["--ratio", "0.5", "--seed", "5"],         # (both used to fail only at the switch, after the AE phase)
    ["--batch-size", "0", "--seed", "5"],
    ["--lr", "-1", "--seed", "5"],
    ["--num-workers", "-1", "--seed", "5"],
    ["--train-subset", "0", "--seed", "5"],    # 0 used to mean "all images"
    ["--out", "FILE", "--seed", "5"],          # --out names a file
])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(data_dir, finished_run, capsys, bad):
    a_file = finished_run / "deferred_ema_K32_ep2_cont1_s0_smoke.json"
    bad = [str(a_file) if v == "FILE" else v for v in bad]
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        sweep("--preset", "smoke", "--method", "deferred_ema", "--codebook-size", 32, "--data-dir", data_dir,
              "--out", finished_run, *bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


# The validation table: every number (finite, in range) and every rule between arguments and the
# data is checked before anything is created or trained.
@pytest.mark.parametrize("bad, message", [
    (["--ratio", "inf"], "--ratio must be a finite number, got inf"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--affine-lr", "nan"], "--affine-lr must be a finite number, got nan"),
    (["--sync-nu", "-1"], "--sync-nu must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--init-std", "0"], "--init-std must be > 0"),
    (["--ema-decay", "1"], r"--ema-decay must be \(0, 1\)"),
    (["--dist-timeout", "nan"], "--dist-timeout must be a positive number of minutes"),
    (["--res-blocks", "-1"], "--res-blocks must be >= 0"),
    (["--preset", "paper", "--codebook-size", "8"], "outside the paper's range"),
    (["--method", "gaussian", "--continuous-epochs", "1"], "quantizes from the start"),
    (["--continuous-epochs", "3"], r"--continuous-epochs 3 exceeds the run's --epochs 2"),
    (["--method", "alternated", "--affine-lr", "2"], "alternated optimisation steps the raw codes"),
    # one training image gives 64 encoder outputs: 10:1 for 32 codes cannot be met (was a silent 2:1)
    (["--train-subset", "1"], r"the switch needs 320 encoder outputs \(--ratio 10 x --codebook-size 32\), but one "
                              r"epoch of 1 training images gives 64"),
])
def test_validation_table_refuses_at_start_and_creates_nothing(data_dir, tmp_path, capsys, monkeypatch, bad, message):
    trained = []
    monkeypatch.setattr(cifar_sweep, "train", lambda *a: trained.append(1))
    with pytest.raises(SystemExit) as exit_info:
        sweep("--preset", "smoke", "--codebook-size", 32, "--data-dir", data_dir, "--out", tmp_path / "out", *bad)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists() and trained == []


def test_unwritable_out_is_refused_before_training(data_dir, capsys, monkeypatch):
    monkeypatch.setattr(cifar_sweep, "train", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit):
        sweep("--preset", "smoke", "--data-dir", data_dir, "--out", "/proc/dq_cifar_out")  # even root cannot write
    assert capsys.readouterr().err.startswith("error: --out /proc/dq_cifar_out is not writable")


def test_two_processes_racing_for_one_run_the_second_is_refused(data_dir, tmp_path, capsys):
    """Two settings that share a run name (--beta is not part of it; --lr now is, so issue #7's
    --lr 3e-4 / 3e-3 pair gets two names) into one --out at once: the second is refused with one
    line while the first holds the run; the first's result records its own beta."""
    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--method", "deferred_ema", "--codebook-size", "32", "--data-dir", data_dir,
            "--out", out, "--device", "cpu"]

    def second():
        with pytest.raises(SystemExit) as exit_info:
            sweep(*argv, "--beta", "0.5")
        return exit_info.value.code, capsys.readouterr().err

    code1, err1, pid, (code2, err2) = race(tmp_path, "cifar_sweep", "train",
                                           argv + ["--beta", "0.25", "--num-workers", 0], second)
    name = "deferred_ema_K32_ep2_cont1_s0_smoke"
    assert code2 == 2 and err2.count("\n") == 1, err2
    assert err2.startswith(f"error: this run is in use by process {pid} ") and f"{name}.lock" in err2
    assert code1 == 0, err1[-2000:]
    assert json.loads((out / f"{name}.json").read_text())["args"]["beta"] == 0.25
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.pt"]


def test_grid_takes_one_lock_per_run_and_cleans_its_temporaries(data_dir, tmp_path, monkeypatch, capsys):
    """A grid run whose name is held by a live process (here: pid 1, always alive) is refused; the
    runs before it have finished, and a temporary file left by a killed write of one is removed."""
    configs = [cifar_sweep.run_config("baseline_ema", 32, continuous_epochs=0, epochs=2),
               cifar_sweep.run_config("deferred_ema", 32, continuous_epochs=1, epochs=2)]
    monkeypatch.setattr(cifar_sweep, "grid_configs", lambda name: configs)
    out = tmp_path / "out"
    out.mkdir()
    held = "deferred_ema_K32_ep2_cont1_s0_smoke"
    (out / f"{held}.lock").write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname(),
                                                   "start_time": None}))
    orphan = out / ".baseline_ema_K32_ep2_cont0_s0_smoke.pt.x1y2z3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    with pytest.raises(SystemExit):
        sweep("--grid", "table8", "--preset", "smoke", "--data-dir", data_dir, "--out", out)
    assert capsys.readouterr().err.strip().endswith(f"in use by process 1 (lock {out / held}.lock); "
                                                    "wait for it, or delete the lock if that process is gone")
    assert sorted(p.name for p in out.iterdir()) == ["baseline_ema_K32_ep2_cont0_s0_smoke.json",
                                                     "baseline_ema_K32_ep2_cont0_s0_smoke.pt", f"{held}.lock"]


def test_methods_configure_the_quantizer_as_documented():
    def quantizer(method, **extra):
        argv = ["--preset", "smoke", "--method", method] + [f"--{k}={v}" for k, v in extra.items()]
        return cifar_sweep.build_model(cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(argv))).quantizer
    assert quantizer("baseline_ema").ema_decay == 0.99 and quantizer("baseline").ema_decay is None
    assert quantizer("affine").affine_lr == 5.0 and quantizer("sync").sync_nu == 0.1
    q = quantizer("affine_sync")
    assert (q.affine_lr, q.sync_nu) == (2.0, 2.0)
    assert quantizer("lru_kmeans").dead_code_steps == 100
    g = quantizer("gaussian", **{"init-std": 10})  # N(0, 10^2) codes, quantizing from the start
    assert g.is_enabled and 8.0 < float(g.embed.std()) < 12.0
    assert not quantizer("deferred").is_enabled
    paper = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(["--method", "deferred"]))
    assert (paper.continuous_epochs, paper.epochs, paper.batch_size, paper.channels) == (50, 300, 128, 128)
    # --epochs alone keeps the method's paper split (deferred_ema: 150 of 300 epochs continuous)
    short = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(["--method", "deferred_ema",
                                                                            "--epochs", "20"]))
    assert (short.continuous_epochs, short.epochs) == (10, 20)
    assert cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(["--method", "alternated"])).beta == 0.0
    with pytest.raises(cifar_sweep.UserError, match="posthoc_kmeans never trains with quantization"):
        cifar_sweep.validate(cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(
            ["--method", "posthoc_kmeans", "--continuous-epochs", "5"])))


def test_alternated_step_equals_sgd_with_momentum_on_the_codebook_loss():
    """AlternatedQuantizer against torch.optim.SGD(lr 50, momentum 0.9) on mean ||c_k(i) - z_i||^2
    with the assignments of the nearest-code search, over three training forwards; the forward
    output is the moved codes (straight-through), and evaluation does not move anything."""
    torch.manual_seed(0)
    q = common.AlternatedQuantizer(8, 4, beta=0.0)
    q.embed.data.copy_(torch.randn(8, 4))
    ref = q.embed.detach().clone().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=50.0, momentum=0.9)
    q.train()
    for _ in range(3):
        z = torch.randn(64, 4) * 0.1
        idx = torch.cdist(z, ref.detach()).argmin(1)
        sgd.zero_grad()
        ((ref[idx] - z) ** 2).mean().backward()
        sgd.step()
        z_q, indices, loss = q(z)
        assert torch.equal(indices, idx)
        assert torch.allclose(q.embed, ref.detach(), atol=1e-5)
        assert torch.allclose(z_q, ref.detach()[idx], atol=1e-5)
        assert loss.item() == pytest.approx(((ref.detach()[idx] - z) ** 2).mean().item(), rel=1e-4)
    q.eval()
    before = q.embed.clone()
    q(torch.randn(64, 4))
    assert torch.equal(q.embed, before) and int(q.inner_steps) == 3


def test_a_diverging_run_records_its_failure_and_a_grid_goes_on(data_dir, tmp_path, monkeypatch, capsys):
    """The loss becomes NaN in the second epoch (the first epoch's loss is poisoned from outside):
    the JSON records the failure and the history up to it, the checkpoint of epoch 1 stays, the run
    ends with one line; in a grid the next run still runs."""
    real_epoch = cifar_sweep.train_epoch
    calls = []

    def poisoned(*a, **k):
        stats = real_epoch(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            stats.update(finite=False, train_loss=float("nan"))
        return stats
    monkeypatch.setattr(cifar_sweep, "train_epoch", poisoned)
    configs = [cifar_sweep.run_config("affine_sync", 32, epochs=3), cifar_sweep.run_config("baseline", 32, epochs=1)]
    monkeypatch.setattr(cifar_sweep, "grid_configs", lambda name: configs)
    sweep("--grid", "fig7", "--preset", "smoke", "--data-dir", data_dir, "--out", tmp_path)
    err = capsys.readouterr().out
    assert "failed: affine_sync_alr2_nu2_K32_ep3_cont0_s0_smoke: loss became nan at epoch 1" in err
    failed = json.loads((tmp_path / "affine_sync_alr2_nu2_K32_ep3_cont0_s0_smoke.json").read_text())
    assert failed["metrics"] == {} and failed["failed"].startswith("loss became nan at epoch 1")
    assert failed["model_finished"] is False and failed["model_epoch"] == 1
    assert [(h["epoch"], h.get("diverged", False)) for h in failed["history"]] == [(0, False), (1, True)]
    assert torch.load(tmp_path / "affine_sync_alr2_nu2_K32_ep3_cont0_s0_smoke.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "baseline_K32_ep1_cont0_s0_smoke.json").exists()  # the grid went on


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Reference run: EMA codebook, dead-code replacement every step (uses the global RNG)."""
    import torchvision.datasets.cifar as cifar
    saved = cifar.check_integrity
    allow_fixture_checksums()
    try:
        return smoke(data_dir, str(tmp_path_factory.mktemp("ref")), "deferred_ema",
                     "--epochs", 3, "--continuous-epochs", 1, "--dead-code-steps", 1)[0]
    finally:
        cifar.check_integrity = saved


@pytest.mark.parametrize("kill_after_saves", [1, 2])  # before the switch / inside the Discretization Phase
def test_resume_after_kill_gives_the_same_result(data_dir, tmp_path, monkeypatch, uninterrupted, kill_after_saves):
    real_save = cifar_sweep.save_checkpoint
    saves = []

    def save_then_die(path, **state):
        real_save(path, **state)
        saves.append(state["epoch"])
        if len(saves) == kill_after_saves:
            raise KeyboardInterrupt("simulated kill")

    extra = ("--epochs", 3, "--continuous-epochs", 1, "--dead-code-steps", 1)
    monkeypatch.setattr(cifar_sweep, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        smoke(data_dir, str(tmp_path), "deferred_ema", *extra)
    monkeypatch.setattr(cifar_sweep, "save_checkpoint", real_save)
    trained = []
    real_evaluate = cifar_sweep.evaluate
    monkeypatch.setattr(cifar_sweep, "evaluate", lambda *a: trained.append(1) or real_evaluate(*a))
    resumed = smoke(data_dir, str(tmp_path), "deferred_ema", *extra, "--resume")[0]
    assert len(trained) == 3 - kill_after_saves  # only the remaining epochs ran (the last one's test is the result)
    assert resumed["metrics"] == uninterrupted["metrics"]
    def without_timing(history):  # wall-clock seconds per epoch differ between any two runs
        return [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in history]
    assert without_timing(resumed["history"]) == without_timing(uninterrupted["history"])
    assert all(h["train_seconds"] > 0 and h["val_seconds"] > 0 for h in resumed["history"])


def test_posthoc_kmeans_never_trains_the_decoder_on_quantized_inputs(data_dir, tmp_path, monkeypatch):
    real_switch = cifar_sweep.switch
    seen = {}

    def spy(model, loader, args, epoch):  # snapshot the decoder the moment quantization turns on
        seen["decoder"] = {k: v.clone() for k, v in model.decoder.state_dict().items()}
        seen["epoch"] = epoch
        return real_switch(model, loader, args, epoch)

    monkeypatch.setattr(cifar_sweep, "switch", spy)
    record, ckpt, _ = smoke(data_dir, str(tmp_path), "posthoc_kmeans")
    assert seen["epoch"] == len(record["history"]) == 2  # after the last training epoch
    assert all(h["quantized_steps"] == 0 and h["phase"] == "continuous" for h in record["history"])
    after = {k[len("decoder."):]: v for k, v in ckpt["model"].items() if k.startswith("decoder.")}
    assert after.keys() == seen["decoder"].keys()
    assert all(torch.equal(after[k], seen["decoder"][k]) for k in after)
    assert bool(ckpt["model"]["quantizer.enabled"])
    # the final test does go through the k-means codebook: its MSE differs from the continuous one
    assert record["metrics"]["mse"] != record["history"][-1]["val_mse"]


def test_grid_skips_finished_runs_and_runs_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    out.mkdir()
    ran = []
    resumed = []
    monkeypatch.setattr(cifar_sweep, "train_run", lambda args, info: (ran.append(cifar_sweep.run_name(args)),
                                                                      resumed.append(args.resume)))
    configs = cifar_sweep.grid_configs("table8")
    names = []
    for config in configs:
        args = cifar_sweep.build_parser().parse_args([])
        vars(args).update(config)
        names.append(cifar_sweep.run_name(cifar_sweep.resolve_args(args)))
    for name in names[1:]:
        (out / f"{name}.json").write_text("{}")
    sweep("--grid", "table8", "--out", out)
    assert ran == names[:1] == ["baseline_ema_K8192_ep300_cont0_s0"]
    (out / f"{names[2]}.json").unlink()  # (the mocked run above wrote nothing for names[0])
    ran.clear()
    sweep("--grid", "table8", "--grid-shard", "1/2", "--out", out)  # shard 1 of 2 holds config 1 only
    assert ran == []
    (out / f"{names[2]}.pt").write_bytes(b"")  # a started run is continued, a new one starts fresh
    resumed.clear()
    sweep("--grid", "table8", "--grid-shard", "0/2", "--out", out)  # configs 0 and 2
    assert ran == [names[0], names[2]] and resumed == [False, True]
    # one name, one run: across every grid the same name always means the same run-defining
    # settings, so tables sharing a run reuse it and nothing collides
    every = {}
    for grid in cifar_sweep.GRIDS:
        for config in cifar_sweep.grid_configs(grid):
            args = cifar_sweep.build_parser().parse_args([])
            vars(args).update(config)
            args = cifar_sweep.resolve_args(args)
            key = tuple(sorted(cifar_sweep.defining_args(args).items()))
            every.setdefault(cifar_sweep.run_name(args), set()).add(key)
    assert all(len(v) == 1 for v in every.values())
    # fig5 + table8/9/10/11 + fig8 minus shared runs (fig6, fig7) + cpu-table9 (its 150-epoch row is fig5's)
    # + cpu-factors (13 cells x 2 arms, none shared)
    assert len(every) == 26 + 1 + 7 + 4 + 30 + 6 + 5 + 26
    assert "alternated_lr0.001_K1024_ep300_cont0_s0" in every  # a learning rate other than the paper's is named


# Injected into each torchrun rank by the launcher below (from outside the script): after every
# epoch, `evaluate` is called on every rank with the model; the wrapper records the codebook that
# rank holds, and `to_input` records a hash of the first batch each rank converts.
RANK_SPY = """
import hashlib, json, os
import cifar_sweep
_seen = {"rank": int(os.environ["RANK"]), "codebook_sha256": [], "first_batch_sha256": None}
_evaluate, _to_input = cifar_sweep.evaluate, cifar_sweep.to_input


def _sha(t):
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def evaluate(model, loader, args, device, *rest):
    _seen["codebook_sha256"].append(_sha(model.quantizer.codebook))
    with open(os.path.join(os.environ["SPY_DIR"], f"rank{_seen['rank']}.json"), "w") as f:
        json.dump(_seen, f)
    return _evaluate(model, loader, args, device, *rest)


def to_input(batch, device):
    if _seen["first_batch_sha256"] is None:
        _seen["first_batch_sha256"] = _sha(batch[0])
    return _to_input(batch, device)


cifar_sweep.evaluate, cifar_sweep.to_input = evaluate, to_input
"""


def test_two_process_ddp_keeps_identical_codebooks(data_dir, tmp_path):
    """torchrun with 2 gloo processes: every rank's codebook is recorded after each epoch."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\n"
        f"sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n"
        "from cifar_fixture import allow_fixture_checksums\n"
        "allow_fixture_checksums()\n" + RANK_SPY +
        "from common import run_cli\n"
        "run_cli(cifar_sweep.main, cifar_sweep.build_parser())\n")
    out, spy = tmp_path / "out", tmp_path / "spy"
    spy.mkdir()
    method = ("lru_kmeans", "--dead-code-steps", "1")  # gradient codebook, k-means init, replacement
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           "--preset", "smoke", "--method", *method, "--codebook-size", "32", "--epochs", "3", "--data-dir",
           data_dir, "--out", str(out), "--num-workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SPY_DIR=str(spy))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "lru_kmeans_dead1_K32_ep3_cont0_s0_smoke"
    ranks = [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)]
    # evaluated after each of the 3 epochs (the last one is the result), on both ranks, with one codebook
    assert len(ranks[0]["codebook_sha256"]) == 3 and ranks[0]["codebook_sha256"] == ranks[1]["codebook_sha256"]
    assert len(set(ranks[0]["codebook_sha256"])) == 3  # the codebook did change every epoch
    # the ranks trained on different shards, so equality is the sync, not identical inputs
    assert ranks[0]["first_batch_sha256"] != ranks[1]["first_batch_sha256"]
    ckpt = torch.load(out / f"{name}.pt", weights_only=True)
    assert hashlib.sha256(ckpt["codebook"].numpy().tobytes()).hexdigest() == ranks[0]["codebook_sha256"][-1]
    record = json.loads((out / f"{name}.json").read_text())
    assert record["world_size"] == 2 and int(ckpt["code_counts"].sum()) == TEST_IMAGES * 64
    assert not list(out.glob("*.lock"))


# ---- evaluate.py renderers, from fixture JSONs with known numbers --------------------------------


def paper_args(config, *argv):
    """The args a paper-preset run of one grid configuration records (extra command-line flags)."""
    args = cifar_sweep.build_parser().parse_args(list(argv))
    vars(args).update(config)
    return vars(cifar_sweep.resolve_args(args))


def fake_result(out, config, mse, perplexity, vendi, euclidean=1.5, history=None, argv=(), name=None):
    args = paper_args(config, *argv)
    record = {"experiment": "cifar10", "method": config["method"], "args": args,
              "metrics": {"mse": mse, "perplexity": perplexity, "vendi": vendi, "euclidean": euclidean,
                          "cosine": 0.9, "used_codes": 10},
              "history": history or [{"epoch": 0, "val_loss": 0.02}, {"epoch": 1, "val_loss": 0.01}]}
    name = name or "_".join(f"{k}{v}" for k, v in sorted(config.items()))
    (out / f"{name}.json").write_text(json.dumps(record))


def test_evaluate_renders_figures_7_and_8_from_histories(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    loss = [0.05, 0.04, 0.2]
    # Figure 7: one finished seed, one that failed in its third epoch
    fake_result(runs, cifar_sweep.grid_configs("fig7")[0], 0.012, 400.0, 1.5, name="f7s0", argv=("--seed", "0"),
                history=[{"epoch": e, "train_loss": v} for e, v in enumerate(loss)])
    record = {"experiment": "cifar10", "method": "affine_sync", "failed": "loss became nan at epoch 2",
              "args": paper_args(cifar_sweep.grid_configs("fig7")[0], "--seed", "1"), "metrics": {},
              "history": [{"epoch": 0, "train_loss": 0.06}, {"epoch": 1, "train_loss": 0.03},
                          {"epoch": 2, "train_loss": None, "diverged": True}]}
    (runs / "f7s1.json").write_text(json.dumps(record))
    # Figure 8: perplexity falling towards 1 at one (size, lr), two seeds averaged
    config = cifar_sweep.grid_configs("fig8")[0]
    for seed, perp in ((0, [30.0, 3.0, 1.0]), (1, [50.0, 5.0, 1.0])):
        fake_result(runs, config, 0.05, 1.0, 1.0, name=f"f8s{seed}", argv=("--seed", str(seed), "--lr", "1e-4"),
                    history=[{"epoch": e, "train_loss": 0.03, "train_perplexity": p} for e, p in enumerate(perp)])
    sync = cifar_sweep.grid_configs("table11")[4 * 5]  # Sync (sync_nu=0.1) at 1K: only a failed run
    (runs / "sync.json").write_text(json.dumps(dict(record, method="sync", args=paper_args(sync))))
    report = run_cli(evaluate.main, evaluate.build_parser(), ["tables", str(runs), "--out", str(tmp_path / "rep")])
    fig7 = report.split("## Figure 7")[1].split("## ")[0]
    assert "| 0 | 3 | 0.20000 | 0.04000 | finished |" in fig7
    assert "| 1 | 3 | 0.03000 | 0.03000 | failed: loss became nan at epoch 2 |" in fig7
    fig8 = report.split("## Figure 8")[1].split("## ")[0]
    assert "| 1024 | 0.0001 | 2 | 40.0 | 1.0 | 0.03000 | 0.03000 | finished |" in fig8
    # Table 11 shows the failed configuration as failed, the finished one as a number
    t11 = report.split("## Table 11")[1]
    assert "| Affine + Sync (default) | – | failed |" not in t11  # a finished seed exists: its mean is shown
    assert "| Affine + Sync (default) | – | 12.00 |" in t11
    assert "| Sync (sync_nu=0.1) | 12.17 | failed |" in t11
    for png in ("fig7_cifar10_affine_sync_1024.png", "fig8_cifar10_alternated.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_renders_every_cifar_table(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    written = set()
    for grid in cifar_sweep.GRIDS:
        for i, config in enumerate(cifar_sweep.grid_configs(grid)):
            key = tuple(sorted(config.items()))
            if key not in written:
                written.add(key)
                # distinctive numbers: mse 0.0xyz -> "xy.z0" in units of 1e-3
                fake_result(runs, config, mse=0.00123 + 1e-5 * len(written), perplexity=1000.0 + len(written),
                            vendi=1.0 + 0.001 * len(written))
    # one known run, checked by value in several tables
    t8 = cifar_sweep.grid_configs("table8")[1]  # posthoc_kmeans
    fake_result(runs, t8, mse=0.0314, perplexity=2777.77, vendi=2.3456)
    # runs that differ in a run-defining option other than the seed are not averaged in
    for i, argv in enumerate([("--lr", "1e-3"), ("--ratio", "2"), ("--preset", "smoke")]):
        fake_result(runs, t8, mse=0.5, perplexity=1.0, vendi=1.0, argv=argv, name=f"other{i}")
    fake_result(runs, cifar_sweep.grid_configs("table11")[15], mse=0.5, perplexity=1.0, vendi=1.0,
                argv=("--affine-lr", "3"), name="affine_lr3")  # Table 11's affine row is affine_lr=5
    report = run_cli(evaluate.main, evaluate.build_parser(), ["tables", str(runs), "--out", str(tmp_path / "rep")])
    for title in ("Figure 5", "Figure 6", "Table 8", "Table 9", "Table 10", "Table 11"):
        assert title in report
    table8 = report.split("## Table 8")[1].split("## ")[0]
    assert "| Post-hoc k-means (300 ep AE) | 21.0 | 31.40 | 2724.57 | 2777.77 | 2.04 | 2.35 |" in table8
    assert "| 2018.63 " in report.split("## Table 9")[1] and "3143.12" in report  # paper values beside ours
    t10 = report.split("## Table 10")[1].split("## ")[0]
    assert "Gaussian Init (sigma = 10)" in t10 and "2207.4" in t10 and "1.953" in t10
    t11 = report.split("## Table 11")[1]
    assert "| LRU + K-means | 12.24 |" in t11 and "6030.98" in t11
    assert "| Affine + Sync (default) | – |" in t11  # the paper's failed 1K run
    affine = next(line for line in t11.splitlines() if line.startswith("| Affine (affine_lr=5) |"))
    assert float(affine.split("|")[3]) < 2  # ours at 1K: the affine_lr=3 run (MSE 500) is not averaged in
    assert (tmp_path / "rep" / "fig5_cifar10.png").stat().st_size > 0
    assert (tmp_path / "rep" / "fig6_cifar10_val_loss.png").stat().st_size > 0
    # Figure 6 holds the eight Table 11 methods' curves, final value from the history
    assert report.split("## Figure 6")[1].count("| 0.01000 |") == 8


def test_evaluate_renders_size_sweeps_and_method_tables_of_other_recipes(tmp_path):
    """The CPU family's shape (cpu-fig5 + cpu-table11 on fashion-mnist with a small recipe): one
    Figure-5-like PNG and table with mean ± std over seeds, one table of the methods at one size;
    runs of the paper's CIFAR-10 recipe are left to the paper tables."""
    runs = tmp_path / "runs"
    runs.mkdir()
    recipe = ("--dataset", "fashion-mnist", "--epochs", "10", "--train-subset", "6000", "--channels", "32",
              "--res-channels", "16")
    for method, k, seed, mse in [("baseline_ema", 16, 0, 0.020), ("baseline_ema", 16, 1, 0.022),
                                 ("deferred_ema", 16, 0, 0.018), ("deferred_ema", 16, 1, 0.018),
                                 ("baseline_ema", 64, 0, 0.015), ("deferred_ema", 64, 0, 0.012),
                                 ("lru_kmeans", 64, 0, 0.011), ("alternated", 64, 0, 0.05)]:
        config = {"method": method, "codebook_size": k}
        fake_result(runs, config, mse, 10.0 * k, 1.5, name=f"{method}{k}s{seed}", argv=recipe + ("--seed", str(seed)),
                    history=[{"epoch": 0, "train_loss": 0.1, "train_perplexity": 5.0}])
        record = json.loads((runs / f"{method}{k}s{seed}.json").read_text())
        record["experiment"] = "fashion-mnist"
        (runs / f"{method}{k}s{seed}.json").write_text(json.dumps(record))
    fake_result(runs, cifar_sweep.grid_configs("fig5")[0], 0.5, 1.0, 1.0, name="paper_recipe")
    report = run_cli(evaluate.main, evaluate.build_parser(), ["tables", str(runs), "--out", str(tmp_path / "rep")])
    sweep_part = report.split("## Figure 5 on other data")[1].split("## ")[0]
    assert "fashion-mnist: channels=32, epochs=10, res_channels=16, train_subset=6000" in sweep_part
    assert "| 16 | baseline_ema | 2 | 21.00 ± 1.41 | 160.0 ± 0.0 |" in sweep_part
    assert "| 64 | deferred_ema | 1 | 12.00 | 640.0 |" in sweep_part
    assert "| 16384 |" not in sweep_part and "500.00" not in sweep_part  # the paper recipe's run is not here
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("fig5_fashion-mnist_*.png"))
    assert len(pngs) == 1 and pngs[0] in sweep_part
    methods_part = report.split("## Table 11 methods at one codebook size")[1].split("## ")[0]
    assert "fashion-mnist: channels=32, epochs=10, res_channels=16, train_subset=6000, 64 codes" in methods_part
    rows = [line for line in methods_part.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| Baseline + EMA", "| LRU + K-means", "| Deferred + EMA (Ours)",
                                                "| Alternated optimisation"]
    assert "| Alternated optimisation | 1 | 50.00 |" in methods_part and "| 16 codes" not in methods_part
    assert list((tmp_path / "rep").glob("methods_K64_fashion-mnist_*.png"))


def test_evaluate_renders_coverage_curves_and_continuous_duration_from_real_runs(data_dir, tmp_path):
    """Both arms trained for real (smoke recipe, 4 epochs, evaluated every 2): the curve table shows
    each arm's recorded test usage, spread and MSE at the evaluated epochs, '–' where the deferred
    arm was not quantizing yet; three Continuous Phase lengths with 2 Discretization epochs each make
    a Table 9 whose cells are those runs' final metrics."""
    out = str(tmp_path / "runs")
    recs = {}
    for method, cont, epochs in [("baseline_ema", 0, 4), ("deferred_ema", 2, 4), ("deferred_ema", 0, 2),
                                 ("deferred_ema", 1, 3)]:
        recs[(method, cont)] = smoke(data_dir, out, method, "--epochs", epochs, "--continuous-epochs", cont,
                                     "--val-every", 2)[0]
    report = run_cli(evaluate.main, evaluate.build_parser(), ["tables", out, "--out", str(tmp_path / "rep")])
    curves = report.split("## Coverage over training")[1].split("\n## ")[0]
    base, deferred = recs[("baseline_ema", 0)]["history"], recs[("deferred_ema", 2)]["history"]
    assert [h["epoch"] for h in base if "val_used_codes" in h] == [1, 3]
    row2 = [line for line in curves.splitlines() if line.startswith("| 2 |")][0].split(" | ")
    # epoch 2: baseline perplexity, deferred '–' (Continuous Phase), then used codes of both arms
    assert row2[1] == evaluate.fmt(base[1]["val_perplexity"], 2) and row2[2] == "–"
    row4 = [line for line in curves.splitlines() if line.startswith("| 4 |")][0].split(" | ")
    assert row4[4] == str(deferred[3]["val_used_codes"])
    assert row4[6] == evaluate.fmt(deferred[3]["codebook_euclidean"], 2)
    assert list((tmp_path / "rep").glob("curves_K32_cifar10_*.png"))
    table9 = report.split("## Table 9 on other data")[1].split("\n## ")[0]
    assert "32 codes, 2 Discretization epochs" in table9 and "| Continuous epochs | 0 | 1 | 2 |" in table9
    perp = [line for line in table9.splitlines() if line.startswith("| Perplexity ours")][0].split(" | ")[1:]
    assert [p.strip(" |") for p in perp] == [evaluate.fmt(recs[("deferred_ema", c)]["metrics"]["perplexity"], 1)
                                             for c in (0, 1, 2)]


@pytest.mark.parametrize("deferred_mse,says", [
    ([5.0, 4.0, 2.0, 1.0], "cross for good between epochs 20 and 30"),  # above until 20, below from 30
    ([1.0, 4.0, 2.0, 1.0], "cross for good between epochs 20 and 30"),  # a dip at 10 is not a crossing
    ([1.0, 1.0, 1.0, 1.0], "lower test MSE at every evaluation"),
    ([1.0, 1.0, 1.0, 9.0], "does not end below"),
])
def test_mse_crossing_is_where_the_deferred_arm_stays_below(deferred_mse, says):
    epochs = np.array([10, 20, 30, 40])
    curves = {"baseline_ema": {"val_mse": (epochs, np.full(4, 3.0))},
              "deferred_ema": {"val_mse": (epochs, np.array(deferred_mse))}}
    assert says in evaluate._mse_crossing(curves, ("baseline_ema", "deferred_ema"))


def test_evaluated_points_keep_every_seed_at_the_epochs_all_of_them_evaluated():
    """Two seeds, one evaluated at an extra epoch and one missing a value: only the shared epochs
    stay, one row per seed in run order, so the curve's mean and its seed band come from the same
    points."""
    def run(values):  # {epoch from 0: value}; None = not recorded at that evaluation
        return {"history": [{"epoch": e, "val_mse": v} for e, v in values.items()]}
    seed0 = run({9: 4.0, 19: 3.0, 29: 2.0})
    seed1 = run({9: 6.0, 19: None, 29: 1.0, 39: 0.5})
    epochs, values = evaluate._evaluated_points([seed0, seed1], "val_mse")
    assert epochs.tolist() == [10, 30]
    assert values.tolist() == [[4.0, 2.0], [6.0, 1.0]]
    assert values.mean(0).tolist() == [5.0, 1.5]
    assert evaluate._evaluated_points([seed0], "val_mse")[1].shape == (1, 3)


def test_coverage_curves_average_two_seeds_and_draw_their_range(tmp_path, monkeypatch):
    """Two seeds per arm: the curve table shows the seed mean at each evaluation, and the plot
    draws each arm's seed range as a band (one fill per arm and panel) around that mean."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for method, cont in (("baseline_ema", 0), ("deferred_ema", 1)):
        for seed, scale in ((0, 1.0), (1, 3.0)):
            history = [{"epoch": e, "val_mse": 0.004 * scale / (e + 1) / (1 + cont),
                        **({} if e < cont else {"val_perplexity": 10.0 * scale * (e + 1), "val_used_codes": 4 * (e + 1),
                                                "codebook_euclidean": 0.5 * scale})} for e in range(3)]
            fake_result(runs, {"method": method, "codebook_size": 16}, 0.003, 30.0, 1.0, name=f"{method}s{seed}",
                        argv=("--epochs", "3", "--continuous-epochs", str(cont), "--seed", str(seed)), history=history)
    import matplotlib.axes
    fills = []
    real_fill = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda ax, x, lo, hi, **kw: fills.append((list(x), list(lo), list(hi))) or real_fill(
                            ax, x, lo, hi, **kw))
    report = run_cli(evaluate.main, evaluate.build_parser(), ["tables", str(runs), "--out", str(tmp_path / "rep")])
    curves = report.split("## Coverage over training")[1].split("\n## ")[0]
    row3 = [line for line in curves.splitlines() if line.startswith("| 3 |")][0].split(" | ")
    assert row3[1] == evaluate.fmt(20.0 * 3, 2) and row3[2] == evaluate.fmt(20.0 * 3, 2)  # mean of 30 and 90
    assert row3[7] == evaluate.fmt(8.0 / 3, 2)  # baseline MSE x1e-3: mean of 4/3 and 12/3
    assert row3[8].strip(" |") == evaluate.fmt(4.0 / 3, 2)  # deferred: half of it
    assert len(fills) == 8  # 4 panels x 2 arms
    mse_bands = [(x, lo, hi) for x, lo, hi in fills if max(hi) < 1]
    assert len(mse_bands) == 2
    for (x, lo, hi), factor in zip(mse_bands, (1.0, 0.5)):  # baseline first: seed 0 the minimum, seed 1 the maximum
        assert list(x) == [1, 2, 3]
        assert np.allclose(lo, [factor * 4e-3 / e for e in (1, 2, 3)])
        assert np.allclose(hi, [factor * 12e-3 / e for e in (1, 2, 3)])
