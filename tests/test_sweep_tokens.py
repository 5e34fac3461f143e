"""cifar_sweep.py's VQ-VAE as a tokenizer of the generators (issue 15 item 3): --dump-tokens of a
finished Fashion-MNIST run (files in the real idx format), its split, decoding through
common.load_tokenizer against the sweep's own quantize -> decode, MaskGIT trained and scored on the
dumps against exactly the tokenizer's test images, and the one-line refusals."""
import json
import os
import shutil

import pytest
import torch

import cifar_sweep
import common
from cifar_fixture import write_fashion_fixture
from common import UserError

TRAIN, TEST, VAL = 240, 64, 40  # smoke preset: trains on the first 192 training images
RUN = ["--dataset", "fashion-mnist", "--preset", "smoke", "--method", "deferred_ema", "--codebook-size", "32",
       "--num-workers", "0", "--device", "cpu"]
NAME = "deferred_ema_K32_ep2_cont1_s0_smoke_fashion-mnist"


def sweep(*argv):
    return cifar_sweep.main(cifar_sweep.build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished smoke run on tiny Fashion-MNIST files and its three dumps."""
    root = tmp_path_factory.mktemp("sweep_tokens")
    data, arrays = write_fashion_fixture(str(root / "data"), train_images=TRAIN, test_images=TEST)
    out = root / "runs"
    base = RUN + ["--data-dir", data, "--out", out]
    sweep(*base)
    for part in ("train", "val", "test"):
        sweep(*base, "--dump-tokens", part, "--val-size", VAL)
    return {"data": data, "arrays": arrays, "out": out, "base": base, "ckpt": str(out / f"{NAME}.pt"),
            "folder": out / NAME}


def test_split_trains_on_the_run_images_and_validates_on_unseen_ones(run):
    split = common.load_split(str(run["folder"] / "split.json"))
    labels = {"train": run["arrays"]["train"][1], "test": run["arrays"]["t10k"][1]}
    assert split["sizes"] == {"train": 192, "val": VAL, "test": TEST} and split["subsets"] == {"train": 192, "test": 64}
    assert [item for item, _ in split["train"]] == [f"train/{i}" for i in range(192)]  # what the run trained on
    val = [int(item.split("/")[1]) for item, _ in split["val"]]
    assert len(set(val)) == VAL and min(val) >= 192 and all(item.startswith("train/") for item, _ in split["val"])
    assert [item for item, _ in split["test"]] == [f"test/{i}" for i in range(TEST)]
    for part in ("train", "val", "test"):
        for item, label in split[part]:
            name, i = item.split("/")
            assert label == int(labels[name][int(i)])


def test_dumps_decode_as_the_sweep_quantizes_and_decodes(run):
    """The dumps hold the indices of cifar_sweep's own forward on its own (padded) images, and the
    frozen tokenizer of common.load_tokenizer decodes them to that forward's reconstruction + 0.5."""
    dumps = {p: torch.load(run["folder"] / f"tokens_{p}.pt", weights_only=True) for p in ("train", "val", "test")}
    assert dumps["train"]["tokens"].shape == (192, 10, 8, 8) and dumps["train"]["views"] == 10
    assert dumps["val"]["tokens"].shape == (VAL, 8, 8) and dumps["test"]["tokens"].shape == (TEST, 8, 8)
    assert all(d["tokens"].dtype == torch.int16 and d["quantizer"] == "vq" and d["codebook_size"] == 32
               and d["num_classes"] == 10 for d in dumps.values())
    assert {d["split"] for d in dumps.values()} == {"train", "val", "test"}
    assert len({d["split_sha256"] for d in dumps.values()}) == 1
    fingerprint = common.tokenizer_fingerprint_of(run["ckpt"])
    assert all(d["tokenizer"] == fingerprint for d in dumps.values()) and fingerprint["grid"] == 8

    ckpt = torch.load(run["ckpt"], weights_only=True)
    args = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(RUN + ["--data-dir", run["data"]]))
    own = cifar_sweep.build_model(args)
    own.load_state_dict(ckpt["model"])
    own.eval()
    tokenizer, cfg = common.load_tokenizer(run["ckpt"])
    with torch.no_grad():
        for part, train in (("test", False), ("train", True)):
            images = cifar_sweep.load_fashion(run["data"], train, False, 192 if train else None)
            recon, indices, _ = own(cifar_sweep.to_input((images,), torch.device("cpu")))
            tokens = dumps[part]["tokens"][:, 0] if part == "train" else dumps[part]["tokens"]  # view 0: the plain image
            assert torch.equal(tokens.long(), indices)
            decoded = tokenizer.decode_indices(tokens)
            assert decoded.shape == (len(images), 3, 32, 32)
            assert torch.allclose(decoded, (recon + 0.5).expand(-1, 3, -1, -1), atol=1e-5)
    # the g-FID reference: exactly the test images the run was evaluated on, padded as it saw them
    reference = common.tokenizer_test_split(cfg)
    x = torch.stack([reference[i][0] for i in range(len(reference))])
    padded = cifar_sweep.load_fashion(run["data"], False, False, None).float() / 255
    assert torch.equal(x, padded.expand(-1, 3, -1, -1))
    assert cfg["deferred"] is True and cfg["name"] == NAME and common.tokenizer_run_folder(run["ckpt"]) == str(run["folder"])


def test_maskgit_trains_samples_and_scores_against_the_tokenizer_test_images(run, tmp_path, monkeypatch):
    import generator_maskgit
    seen = []

    def fake_fidelity(generated, reference=None, fid=True, prc=False, device=None, **kwargs):
        seen.append((generated, reference, kwargs.get("input2_cache_name")))
        return {"fid": 1.0}
    monkeypatch.setattr(common, "fidelity_metrics", fake_fidelity)
    monkeypatch.setattr(common, "inception_weights_path", lambda *a: "inception.pth")
    monkeypatch.setattr(common, "inception_weights_digest", lambda: "a" * 64)
    generator_maskgit.main(generator_maskgit.build_parser().parse_args(
        ["--tokenizer", run["ckpt"], "--out", str(tmp_path / "gen"), "--depth", "1", "--width", "16", "--heads", "2",
         "--mlp-dim", "32", "--batch-size", "16", "--epochs", "1", "--sample", "10", "--steps", "2", "--skip-lpips",
         "--fid-images", "20", "--device", "cpu"]))
    generated, reference, cache = seen[-1]
    assert generated.shape == (10, 3, 32, 32)
    chosen = reference.indices  # a class-stratified 20 of the 64 test images
    padded = cifar_sweep.load_fashion(run["data"], False, False, None).float() / 255
    x = torch.stack([reference[i][0] for i in range(len(reference))])
    assert len(chosen) == 20 and torch.equal(x, padded[chosen].expand(-1, 3, -1, -1))
    _, cfg = common.load_tokenizer(run["ckpt"])
    assert cache == common.tokenizer_test_cache_name(cfg, limit=20)
    with open(tmp_path / "gen" / f"maskgit_{NAME}.json") as f:
        record = json.load(f)
    assert record["method"] == "maskgit_deferred" and record["tokenizer"]["name"] == NAME
    assert record["tokenizer"]["dataset"] == "fashion-mnist" and record["metrics"]["gfid"] == 1.0
    assert record["fid_reference"].startswith("test split, 20 images") and record["fid_reference_subset"]["of"] == TEST
    assert record["metrics"]["num_samples"] == 10 and record["sampling"]["labels"] == "class-balanced"


def one_line(match, fn, *args):
    with pytest.raises(UserError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)


def test_refusals_are_one_line(run, tmp_path):
    import generator_maskgit
    import generator_var
    base = run["base"]
    # an unfinished run: its checkpoint is not at the run's last epoch (written while it trains)
    ckpt = torch.load(run["ckpt"], weights_only=True)
    ckpt["epoch"] = 1
    os.makedirs(tmp_path / "busy")
    torch.save(ckpt, tmp_path / "busy" / f"{NAME}.pt")
    busy = base[:-2] + ["--out", tmp_path / "busy"]
    one_line(r"whose training has not finished \(epoch 1 of 2\)", sweep, *busy, "--dump-tokens", "val")
    assert not os.path.exists(tmp_path / "busy" / NAME)
    ckpt["epoch"], ckpt["args"]["dataset"] = 2, "cifar10"
    torch.save(ckpt, tmp_path / "busy" / "cifar.pt")
    one_line("is a cifar_sweep.py run on cifar10: only its Fashion-MNIST runs", common.load_tokenizer,
             str(tmp_path / "busy" / "cifar.pt"))
    one_line(r"no checkpoint .*: train the run first", sweep, *busy[:-1], tmp_path / "none", "--dump-tokens", "val")
    one_line("tokens_val.pt exists: a token dump is never replaced", sweep, *base, "--dump-tokens", "val")
    one_line("not --grid", sweep, *base, "--grid", "cpu-fig5", "--dump-tokens", "val")
    one_line("only Fashion-MNIST runs", sweep, *base, "--dataset", "cifar10", "--dump-tokens", "val")
    os.makedirs(tmp_path / "copy")
    shutil.copy(run["ckpt"], tmp_path / "copy")
    copy = base[:-2] + ["--out", tmp_path / "copy"]
    one_line("trained with --train-subset 192, not 100", sweep, *copy, "--train-subset", "100", "--dump-tokens", "val")
    one_line(f"trained on the first 192 of the {TRAIN} training images, which leaves 48 unseen", sweep,
             *copy, "--val-size", "100", "--dump-tokens", "val")
    # generators: another tokenizer's dumps, a test dump given as training data, the multi-scale generator
    other = tmp_path / "other"
    os.makedirs(other)
    ckpt = torch.load(run["ckpt"], weights_only=True)
    ckpt["model"]["quantizer.embed"] = ckpt["model"]["quantizer.embed"] + 1.0
    torch.save(ckpt, other / f"{NAME}.pt")
    gen = ["--out", str(tmp_path / "gen"), "--epochs", "1", "--batch-size", "16", "--skip-fid", "--skip-lpips",
           "--device", "cpu"]

    def maskgit(*argv):
        generator_maskgit.load_inputs(generator_maskgit.build_parser().parse_args(list(argv) + gen))
    one_line("belongs to another tokenizer", maskgit, "--tokenizer", str(other / f"{NAME}.pt"), "--tokens-dir",
             str(run["folder"]))
    leaked = tmp_path / "leaked"
    os.makedirs(leaked)
    shutil.copy(run["folder"] / "tokens_test.pt", leaked / "tokens_train.pt")
    shutil.copy(run["folder"] / "tokens_val.pt", leaked / "tokens_val.pt")
    one_line("holds the tokens of the 'test' split, not 'train'", maskgit, "--tokenizer", run["ckpt"], "--tokens-dir",
             str(leaked))
    one_line("is a vq tokenizer .*use generator_maskgit.py", lambda: generator_var.load_inputs(
        generator_var.build_parser().parse_args(["--tokenizer", run["ckpt"]] + gen)))
