"""Image metrics (common.py section 4): values against independent computations and failure modes."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

import common
from common import UserError


def smooth_images(b=2, h=32, w=40, seed=0):
    """Random images with spatial structure (so SSIM is neither ~0 nor ~1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def noisy(x, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ---- MSE / PSNR ---------------------------------------------------------------------------------

def test_mse_and_psnr_match_hand_computation():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1          # image 0: every value off by 0.1 -> MSE 0.01 -> 20 dB
    y[1, 0, 0, 0] = 0.5  # image 1: one of 48 values off by 0.5 -> MSE 0.25/48
    assert common.mse(x, y) == pytest.approx((48 * 0.01 + 0.25) / 96, rel=1e-6)
    expected = (10 * math.log10(1 / 0.01) + 10 * math.log10(1 / (0.25 / 48))) / 2
    assert common.psnr(x, y) == pytest.approx(expected, rel=1e-6)


def test_psnr_data_range_must_match_the_images():
    x, y = smooth_images(), noisy(smooth_images(), 0.05)
    right = common.psnr(x, y, data_range=1.0)
    # the same images stored as 0-255 values with data_range 255: the same PSNR
    assert common.psnr(255 * x, 255 * y, data_range=255.0) == pytest.approx(right, rel=1e-5)
    # [0, 1] images scored as if 0-255: inflated by exactly 20 log10(255) = 48.13 dB
    assert common.psnr(x, y, data_range=255.0) - right == pytest.approx(20 * math.log10(255), rel=1e-5)


# ---- SSIM ---------------------------------------------------------------------------------------

def reference_ssim(x, y, data_range):
    """Independent SSIM in numpy/scipy, the skimage recipe: Gaussian filtering of the whole
    channel (sigma 1.5, truncate 3.5 -> 11-tap window), population statistics, crop the 5-pixel
    border where the window leaves the image, mean over pixels, then over channels and images."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for a, b in zip(x.double().numpy().reshape(-1, *x.shape[2:]), y.double().numpy().reshape(-1, *y.shape[2:])):
        f = lambda t: gaussian_filter(t, sigma=1.5, truncate=3.5)  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
        scores.append(s[5:-5, 5:-5].mean())
    return float(np.mean(scores))


def test_ssim_matches_independent_scipy_implementation():
    x = smooth_images(b=3, h=33, w=27)
    y = noisy(x, 0.1)
    ours = common.ssim(x, y)
    assert 0.2 < ours < 0.95  # a regime where the stabilisers and the window both matter
    assert ours == pytest.approx(reference_ssim(x, y, 1.0), abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # callers may sit inside autocast_for()
        assert common.ssim(x, y) == pytest.approx(ours, abs=1e-6)


def test_ssim_identity_and_data_range():
    x, y = smooth_images(), noisy(smooth_images(), 0.1)
    assert common.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    right = common.ssim(x, y, data_range=1.0)
    assert common.ssim(255 * x, 255 * y, data_range=255.0) == pytest.approx(right, abs=1e-5)
    # [0, 1] images with L = 255: C1, C2 dwarf the image statistics, SSIM drifts towards 1
    wrong = common.ssim(x, y, data_range=255.0)
    assert wrong == pytest.approx(reference_ssim(x, y, 255.0), abs=1e-5)
    assert wrong > right + 0.1


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(UserError, match="at least 11x11"):
        common.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ---- LPIPS --------------------------------------------------------------------------------------

@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(common.INCEPTION_ENV, raising=False)
    assert common.hub_checkpoint_dir() == str(tmp_path / "torch" / "hub" / "checkpoints")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("net,filename", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_load_lpips_without_backbone_weights_names_file_and_folder(empty_torch_home, net, filename):
    with pytest.raises(UserError) as err:
        common.load_lpips(net)
    message = str(err.value)
    assert filename in message and str(empty_torch_home) in message
    assert f"https://download.pytorch.org/models/{filename}" in message


def test_load_lpips_rejects_unknown_network():
    with pytest.raises(UserError, match="unknown LPIPS network"):
        common.load_lpips("resnet")


def test_lpips_with_real_alexnet_weights(real_weights):
    model = common.load_lpips("alex")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the backbone holds the weights from the cache (not a random initialisation)
    saved = torch.load(f"{real_weights}/alexnet-owt-7be5be79.pth", weights_only=True)["features.0.weight"]
    assert torch.equal(model.net.slice1[0].weight, saved)
    x = smooth_images(b=2, h=64, w=64)
    same = model(x, x)
    assert same.shape == (2,) and same.abs().max() < 1e-6
    small, large = model(x, noisy(x, 0.05)), model(x, noisy(x, 0.3))
    assert (small > 0.001).all() and (large > small).all()


# ---- FID / IS / precision-recall (torch-fidelity) ------------------------------------------------

def test_fidelity_metrics_without_inception_weights_names_the_file(empty_torch_home):
    with pytest.raises(UserError) as err:
        common.fidelity_metrics(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    message = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and str(empty_torch_home) in message
    assert common.INCEPTION_ENV in message


def stand_in_weights(path, fc=torch.ones(2, 2)):
    """A file in place of the Inception weights: a state dict with a logits layer, recorded as
    verified (common.verify_metric_weights) so that the calls below reach torch-fidelity."""
    torch.save({"fc.weight": fc}, path)
    common.mark_weights_verified(str(path), "inception")


@pytest.fixture
def captured_fidelity(empty_torch_home, monkeypatch):
    """A stand-in for torch_fidelity.calculate_metrics, to check which arguments reach it (the
    values come from the real network in the tests below): records the arguments and answers
    with torch-fidelity's result keys."""
    import torch_fidelity
    empty_torch_home.mkdir(parents=True)
    stand_in_weights(empty_torch_home / common.INCEPTION_WEIGHTS)
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return {"frechet_inception_distance": 12.5, "inception_score_mean": 3.0, "inception_score_std": 0.5,
                "precision": 0.7, "recall": 0.6, "f_score": 0.65}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    return calls


def test_fidelity_metrics_arguments_reach_torch_fidelity(captured_fidelity, empty_torch_home, tmp_path):
    generated = torch.rand(5, 3, 8, 8)
    reference = tmp_path / "pngs"
    reference.mkdir()
    out = common.fidelity_metrics(generated, reference, fid=True, isc=True, prc=True, batch_size=7, device="cpu")
    assert set(out) == {"fid", "isc", "isc_std", "precision", "recall"}
    (kw,) = captured_fidelity
    assert kw["feature_extractor"] == "inception-v3-compat"
    assert kw["feature_extractor_weights_path"] == str(empty_torch_home / common.INCEPTION_WEIGHTS)
    assert kw["fid"] and kw["isc"] and kw["prc"] and kw["batch_size"] == 7 and kw["cuda"] is False
    assert kw["input2"] == str(reference) and kw["cache"] is False
    # input1 follows torch-fidelity's convention: a Dataset of uint8 (3, H, W) tensors
    ds = kw["input1"]
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 5
    assert ds[3].dtype == torch.uint8 and ds[3].shape == (3, 8, 8)
    assert torch.equal(ds[3], (generated[3] * 255).round().to(torch.uint8))


def test_fidelity_weights_from_argument_or_environment(captured_fidelity, tmp_path, monkeypatch):
    own = tmp_path / "my_inception.pth"
    stand_in_weights(own)
    images = torch.rand(2, 3, 8, 8)
    common.fidelity_metrics(images, images, weights_path=str(own))
    monkeypatch.setenv(common.INCEPTION_ENV, str(own))
    common.fidelity_metrics(images, images)
    assert [c["feature_extractor_weights_path"] for c in captured_fidelity] == [str(own)] * 2
    monkeypatch.setenv(common.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="missing.pth"):
        common.fidelity_metrics(images, images)


def test_fidelity_input_adapter_and_argument_errors(captured_fidelity, tmp_path):
    pairs = [(torch.full((3, 4, 4), v), 0) for v in (0.0, 0.5, 1.0)]  # an (image, label) dataset
    ds = common.FidelityInput(pairs)
    assert [int(ds[i][0, 0, 0]) for i in range(3)] == [0, 128, 255]
    assert torch.equal(common.FidelityInput([torch.full((3, 2, 2), 7, dtype=torch.uint8)])[0],
                       torch.full((3, 2, 2), 7, dtype=torch.uint8))
    with pytest.raises(UserError, match="need reference"):
        common.fidelity_metrics(torch.rand(2, 3, 8, 8), None, fid=True)
    with pytest.raises(UserError, match="no such folder"):
        common.fidelity_metrics(str(tmp_path / "nowhere"), torch.rand(2, 3, 8, 8))
    common.fidelity_metrics(torch.rand(2, 3, 8, 8), None, fid=False, isc=True)  # IS needs no reference
    assert "input2" not in captured_fidelity[-1]


# Real FID values (0 for identical sets, growing with distortion, equal to the source network's):
# tests/test_weights.py, with the weights converted by `evaluate.py weights`.


def test_fidelity_metrics_refuses_is_without_logits_and_unreadable_weights(empty_torch_home, tmp_path):
    path = tmp_path / "inception.pth"
    stand_in_weights(path, fc=torch.full((3, 2), float("nan")))
    with pytest.raises(UserError, match=r"^Inception Score unavailable with .*inception.pth: it has no logits"):
        common.fidelity_metrics(torch.rand(2, 3, 8, 8), None, fid=False, isc=True, weights_path=str(path))
    path.write_bytes(b"stand-in")
    with pytest.raises(UserError, match=r"^cannot read Inception weights .*inception.pth: "):
        common.fidelity_metrics(torch.rand(2, 3, 8, 8), None, fid=False, isc=True, weights_path=str(path))


def test_tensor_input_matches_the_same_images_saved_as_pngs(tmp_path):
    """torch-fidelity's own input preparation: a folder of PNGs (read recursively) and our adapter
    over the float tensor hand the feature extractor identical uint8 images, so r-FID from saved
    reconstructions and from in-memory tensors agree."""
    from PIL import Image
    from torch_fidelity.utils import prepare_input_from_id
    x = torch.rand(4, 3, 6, 5, generator=torch.Generator().manual_seed(5))
    (tmp_path / "pngs" / "sub").mkdir(parents=True)
    for k, img in enumerate(common.to_uint8(x)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "pngs" / ("sub" if k % 2 else "") / f"{k}.png")
    folder = prepare_input_from_id(1, input1=str(tmp_path / "pngs"), samples_find_deep=True, verbose=False)
    ours = prepare_input_from_id(1, input1=common.FidelityInput(x), verbose=False)
    from_files = sorted((folder[k] for k in range(len(folder))), key=lambda t: t.sum().item())
    from_tensor = sorted((ours[k] for k in range(len(ours))), key=lambda t: t.sum().item())
    assert len(from_files) == 4 and all(a.dtype == torch.uint8 for a in from_files + from_tensor)
    assert all(torch.equal(a, b) for a, b in zip(from_files, from_tensor))


# ---- diversity ----------------------------------------------------------------------------------

def test_pixel_diversity_matches_double_loop():
    x = torch.rand(7, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    pairs = [float((x[i] - x[j]).double().pow(2).sum().sqrt()) for i in range(7) for j in range(i + 1, 7)]
    assert common.pixel_diversity(x) == pytest.approx(np.mean(pairs), rel=1e-5)
    assert common.pixel_diversity(x, scale=255.0) == pytest.approx(255 * np.mean(pairs), rel=1e-5)


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_pair_enumeration_is_the_upper_triangle(n):
    i, j = common._pair_from_linear(torch.arange(n * (n - 1) // 2), n)
    assert torch.equal(torch.stack([i, j]), torch.triu_indices(n, n, 1))


class RecordingDistance(torch.nn.Module):
    """Stub LPIPS: image k is the constant k, the 'distance' of (a, b) is a recorded 10*a + b."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y):
        a, b = x[:, 0, 0, 0].long(), y[:, 0, 0, 0].long()
        self.seen += list(zip(a.tolist(), b.tolist()))
        return (10 * a + b).float()


def test_lpips_diversity_counts_each_unordered_pair_once():
    n = 9
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    stub = RecordingDistance()
    value = common.lpips_diversity(images, stub, batch_size=5)
    expected_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    assert sorted(stub.seen) == expected_pairs  # every pair once, never (j, i) or (i, i)
    assert value == pytest.approx(np.mean([10 * i + j for i, j in expected_pairs]))


def test_lpips_diversity_random_subset_of_distinct_pairs():
    n = 12
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    first, second = RecordingDistance(), RecordingDistance()
    v1 = common.lpips_diversity(images, first, max_pairs=20, generator=torch.Generator().manual_seed(0), batch_size=6)
    v2 = common.lpips_diversity(images, second, max_pairs=20, generator=torch.Generator().manual_seed(0))
    assert len(first.seen) == 20 == len(set(first.seen)) and all(i < j for i, j in first.seen)
    assert sorted(first.seen) == sorted(second.seen) and v1 == pytest.approx(v2)
    assert v1 == pytest.approx(np.mean([10 * i + j for i, j in first.seen]))
    with pytest.raises(UserError, match="at least two"):
        common.lpips_diversity(images[:1], first)


@pytest.mark.parametrize("net,size", [("alex", 40), ("vgg", 32)])
def test_lpips_diversity_over_all_pairs_is_exact(real_weights, net, size):
    """The all-pairs path (features once per image, per-coordinate variances merged over batches)
    equals lpips.LPIPS called on every pair; batches of 4 for 9 images leave a batch of one."""
    model = common.load_lpips(net)
    x = smooth_images(b=9, h=size, w=size, seed=11)
    x = (0.8 * x + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(12))).clamp(0, 1)
    pairs = [float(model(x[i:i + 1], x[j:j + 1])) for i in range(9) for j in range(i + 1, 9)]
    fast = common.lpips_diversity(x, model, batch_size=4)
    assert fast == pytest.approx(np.mean(pairs), rel=1e-5)
    # other batches, other order: the same up to float32 batch effects in the backbone
    assert common.lpips_diversity(x.flip(0), model, batch_size=64) == pytest.approx(fast, rel=1e-7)
    as_uint8 = common.to_uint8(x)
    assert common.lpips_diversity(as_uint8, model, batch_size=5) == pytest.approx(
        common.lpips_diversity(as_uint8.float() / 255, model), rel=1e-7)
    # a random subset of pairs still goes pair by pair, through the same model
    subset = common.lpips_diversity(x, model, max_pairs=7, generator=torch.Generator().manual_seed(0))
    assert min(pairs) <= subset <= max(pairs) and subset != pytest.approx(fast, rel=1e-6)


def test_fid_cache_is_locked_while_torch_fidelity_fills_it(captured_fidelity, monkeypatch):
    """Two workers scoring against one cached reference at once must not both write it (issue 17,
    the two arms of 8_protocol_rerun.sh): the cache's lock is held for the whole torch-fidelity call,
    and only when a cache is used."""
    import fcntl
    import torch_fidelity
    lock = common.fid_cache_files("dq-test-lock")["features"] + ".lock"
    held = []

    def probe(**kwargs):  # another process's attempt at the same lock, made while torch-fidelity runs
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with open(lock, "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", probe)
    images = torch.rand(2, 3, 8, 8)
    common.fidelity_metrics(images, images, cache=True, input2_cache_name="dq-test-lock")
    common.fidelity_metrics(images, images)
    assert held == [True, False]
    with open(lock, "a") as after:  # released afterwards
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_torch_fidelity_reads_in_process_for_tensors_and_num_workers_0(captured_fidelity, tmp_path):
    """torch-fidelity forks up to four DataLoader workers unless save_cpu_ram: never for image
    tensors (nothing to decode) nor for a run with --num-workers 0; folders keep them otherwise."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    images = torch.rand(2, 3, 8, 8)
    common.fidelity_metrics(images, images)
    common.fidelity_metrics(images, folder)
    common.fidelity_metrics(images, folder, num_workers=0)
    common.fidelity_metrics(folder, folder, num_workers=4)
    assert [c["save_cpu_ram"] for c in captured_fidelity] == [True, False, True, False]
