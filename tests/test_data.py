"""Data (common.py section 6): reproducible split files and the split image dataset."""
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import UserError

CLASS_SIZES = {"cat": 8, "dog": 8, "eel": 5}  # 21 images, one class smaller than the others


@pytest.fixture
def image_folder(tmp_path):
    """A tiny ImageFolder tree of PNGs (sizes vary; a nested folder and a non-image file too)."""
    root = tmp_path / "data"
    for c, (name, count) in enumerate(CLASS_SIZES.items()):
        for k in range(count):
            folder = root / name / ("nested" if k == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            color = (40 * c, 10 * k, 200)
            Image.new("RGB", (20 + k, 16 + c), color).save(folder / f"img_{k:02d}.png")
        (root / name / "notes.txt").write_text("not an image")
    return root


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))


def test_imagenet100_split_is_deterministic_disjoint_and_class_uniform(image_folder, tmp_path):
    a = common.make_split(image_folder, "imagenet100", 0, tmp_path / "a.json", test_size=7, val_size=5)
    common.make_split(image_folder, "imagenet100", 0, tmp_path / "b.json", test_size=7, val_size=5)
    c = common.make_split(image_folder, "imagenet100", 1, tmp_path / "c.json", test_size=7, val_size=5)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a["test"] != c["test"]
    assert a["classes"] == sorted(CLASS_SIZES)
    paths = {part: [p for p, _ in a[part]] for part in common.SPLIT_PARTS}
    assert len(paths["test"]) == 7 and len(paths["val"]) == 5 and len(paths["train"]) == 21 - 12
    assert sorted(sum(paths.values(), [])) == all_files(image_folder)  # disjoint, covering every image
    for part in ("test", "val"):
        per_class = Counter(label for _, label in a[part])
        counts = [per_class[c] for c in range(3)]
        assert max(counts) - min(counts) <= 1, (part, counts)
    # labels follow the class folder
    assert all(p.split("/")[0] == a["classes"][label] for part in common.SPLIT_PARTS for p, label in a[part])


def test_balanced_counts_fill_small_classes_then_spread_the_rest():
    import random
    counts = common._balanced_counts([2, 9, 9, 9], 14, random.Random(0))
    assert sum(counts) == 14 and counts[0] == 2 and max(counts[1:]) - min(counts[1:]) <= 1
    assert common._balanced_counts([3, 3], 6, random.Random(0)) == [3, 3]


def test_odir_split_proportions(image_folder, tmp_path):
    split = common.make_split(image_folder, "odir", 3, tmp_path / "odir.json")
    sizes = {part: len(split[part]) for part in common.SPLIT_PARTS}
    assert sizes == {"train": 15, "test": round(0.2 * 21), "val": round(0.1 * 21)}
    assert sorted(p for part in common.SPLIT_PARTS for p, _ in split[part]) == all_files(image_folder)
    assert common.make_split(image_folder, "odir", 4, tmp_path / "odir4.json")["test"] != split["test"]


def test_split_errors_leave_existing_file_untouched(image_folder, tmp_path):
    out = tmp_path / "split.json"
    out.write_text("keep me")
    with pytest.raises(UserError, match="too few"):
        common.make_split(image_folder, "imagenet100", 0, out, test_size=15, val_size=6)
    with pytest.raises(UserError, match="unknown split scheme"):
        common.make_split(image_folder, "cifar", 0, out)
    with pytest.raises(UserError, match="not found"):
        common.make_split(tmp_path / "missing", "odir", 0, out)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        common.make_split(tmp_path / "empty", "odir", 0, out)
    assert out.read_text() == "keep me"


def test_load_split_round_trip_and_validation(image_folder, tmp_path):
    split = common.make_split(image_folder, "odir", 0, tmp_path / "s.json")
    assert common.load_split(tmp_path / "s.json") == split
    with pytest.raises(UserError, match="no such file"):
        common.load_split(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        common.load_split(tmp_path / "bad.json")
    broken = dict(split, test=[["x.png", 7]])  # label outside the 3 classes
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="'test'"):
        common.load_split(tmp_path / "broken.json")
    (tmp_path / "partial.json").write_text(json.dumps({"scheme": "odir"}))
    with pytest.raises(UserError, match="not a split file"):
        common.load_split(tmp_path / "partial.json")


def test_split_image_dataset_shapes_values_and_labels(image_folder, tmp_path):
    split = common.make_split(image_folder, "odir", 0, tmp_path / "s.json")
    ds = common.SplitImageDataset(None, split, "train", 12)
    assert len(ds) == 15
    for k in range(len(ds)):
        x, label = ds[k]
        relpath, expected_label = split["train"][k]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and label == expected_label
        # every source image is one solid colour, so resizing and cropping must keep it exactly
        color = torch.tensor(Image.open(image_folder / relpath).getpixel((0, 0)), dtype=torch.float32) / 255
        assert torch.allclose(x, color.view(3, 1, 1).expand_as(x), atol=1 / 255)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_split_image_dataset_crop_and_flip(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    img = np.zeros((20, 40, 3), dtype=np.uint8)   # 40 wide, 20 high: left half red, right half blue
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    Image.fromarray(img).save(root / "a" / "x.png")
    Image.fromarray(img[:, ::-1].copy()).convert("L").save(root / "a" / "y.png")  # greyscale -> RGB
    split = {"root": str(root), "train": [["a/x.png", 0], ["a/y.png", 0]]}
    plain = common.SplitImageDataset(None, split, "train", 10)[0][0]
    # shorter side 20 -> 10, width 40 -> 20, centre crop keeps columns 5..14: red left, blue right
    assert plain.shape == (3, 10, 10)
    assert plain[0, :, :4].min() > 0.9 and plain[2, :, 6:].min() > 0.9
    grey = common.SplitImageDataset(None, split, "train", 10)[1][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    torch.manual_seed(0)
    aug = common.SplitImageDataset(None, split, "train", 10, train_augment=True)
    draws = [aug[0][0] for _ in range(20)]
    flipped = [torch.equal(d, plain.flip(-1)) for d in draws]
    assert all(f or torch.equal(d, plain) for f, d in zip(flipped, draws))
    assert 0 < sum(flipped) < 20


def test_split_image_dataset_errors(image_folder, tmp_path):
    split = common.make_split(image_folder, "odir", 0, tmp_path / "s.json")
    with pytest.raises(UserError, match="not found"):
        common.SplitImageDataset(tmp_path / "moved", split, "train", 8)
    with pytest.raises(UserError, match="unknown split part"):
        common.SplitImageDataset(None, split, "training", 8)
    os.remove(image_folder / split["test"][0][0])
    with pytest.raises(UserError, match="cannot read image"):
        common.SplitImageDataset(None, split, "test", 8)[0]


def test_split_records_its_sizes_and_a_tampered_file_is_refused(image_folder, tmp_path):
    split = common.make_split(image_folder, "imagenet100", 0, tmp_path / "s.json", test_size=7, val_size=5)
    assert split["sizes"] == {"train": 9, "val": 5, "test": 7}
    assert common.load_split(tmp_path / "s.json")["sizes"] == split["sizes"]
    (tmp_path / "t.json").write_text(json.dumps(dict(split, test=split["test"][:6])))
    with pytest.raises(UserError, match=r"recorded sizes .* differ from its parts"):
        common.load_split(tmp_path / "t.json")
    old = {k: v for k, v in split.items() if k != "sizes"}  # written before sizes were recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert common.load_split(tmp_path / "old.json")["sizes"] == split["sizes"]
    with pytest.raises(UserError, match="is a folder"):
        common.load_split(tmp_path)


def test_write_split_keeps_the_first_writers_file(image_folder, tmp_path, monkeypatch):
    first = common.make_split(image_folder, "imagenet100", 0, None, test_size=7, val_size=5)
    second = common.make_split(image_folder, "imagenet100", 1, None, test_size=7, val_size=5)
    path = tmp_path / "splits" / "s.json"
    assert not path.parent.exists()  # out_path None: computed, not written
    assert common.write_split(first, path) == first
    assert common.write_split(second, path) == first  # a later run gets the existing split
    # two runs that both saw no file: the second one's link fails and it reads the first one's
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p) == str(path) else real_exists(p))
    assert common.write_split(second, path) == first
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temporary file left


def test_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # what PIL makes of a 16-bit PNG
    rgb = np.asarray(common.read_rgb(tmp_path / "g16.png"))
    expected = np.round(ramp / 257.0).astype(np.uint8)  # 65535 -> 255, linear
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert (rgb == 255).mean() < 0.01  # PIL's own convert('RGB') saturates ~99% of these pixels
    split = {"root": str(tmp_path), "train": [["g16.png", 0]]}
    x = common.SplitImageDataset(None, split, "train", 64)[0][0]
    assert torch.allclose(x[0], torch.from_numpy(expected).float() / 255, atol=1e-6)


def test_images_without_a_known_range_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    with pytest.raises(common.ImageReadError, match=r"i32\.tif: 32-bit integer pixels have no known range"):
        common.read_rgb(tmp_path / "i32.tif")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(common.ImageReadError, match=r"cannot read image .*junk\.png: cannot identify"):
        common.read_rgb(tmp_path / "junk.png")


def test_image_read_error_from_a_worker_keeps_one_line():
    """torch re-raises a worker's error as exc_type('Caught ... ' + the worker traceback)."""
    try:
        raise common.ImageReadError("cannot read image /d/x.png: truncated")
    except common.ImageReadError:
        import traceback
        wrapped = ("Caught ImageReadError in DataLoader worker process 1.\nOriginal " + traceback.format_exc())
    assert str(common.ImageReadError(message=wrapped)) == "cannot read image /d/x.png: truncated"
    assert str(common.ImageReadError("plain message")) == "plain message"


# ---- Fashion-MNIST as a tokenizer dataset ---------------------------------------------------------


@pytest.fixture
def fashion_dir(tmp_path):
    """Tiny Fashion-MNIST files in the real idx format: 50 training images (5 per class) and 12
    test images, a bright square on the zero background."""
    from test_fashion_mnist import write_split as write_idx
    rng = np.random.default_rng(0)

    def images(n):
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        for k in range(n):
            r, c = rng.integers(2, 20, 2)
            x[k, r:r + 6, c:c + 6] = rng.integers(1, 256)
        return x
    root = tmp_path / "fashion"
    write_idx(root, "train", images(50), np.repeat(np.arange(10), 5).astype(np.uint8))
    write_idx(root, "t10k", images(12), (np.arange(12) % 10).astype(np.uint8))
    return root


def test_fashion_mnist_split_keeps_the_official_test_set_and_draws_a_balanced_val(fashion_dir, tmp_path):
    split = common.make_fashion_mnist_split(fashion_dir, seed=0, val_size=20, out_path=tmp_path / "s.json")
    assert split["sizes"] == {"train": 30, "val": 20, "test": 12} and split["scheme"] == "fashion-mnist"
    assert split["classes"] == list(common.FASHION_MNIST_CLASSES)
    assert split["test"] == [[f"test/{i}", i % 10] for i in range(12)]  # the official test file, in order
    train_ids = [p for p, _ in split["train"]] + [p for p, _ in split["val"]]
    assert sorted(train_ids) == sorted(f"train/{i}" for i in range(50))  # disjoint, covering the train file
    assert Counter(label for _, label in split["val"]) == {c: 2 for c in range(10)}  # class-balanced
    assert all(int(p.split("/")[1]) // 5 == label for p, label in split["val"])  # labels from the file
    assert common.load_split(tmp_path / "s.json") == split
    again = common.make_fashion_mnist_split(fashion_dir, seed=0, val_size=20)
    other = common.make_fashion_mnist_split(fashion_dir, seed=1, val_size=20)
    assert again == split and other["val"] != split["val"]
    with pytest.raises(UserError, match="--val-size 50 must leave training images"):
        common.make_fashion_mnist_split(fashion_dir, seed=0, val_size=50)


def test_tokenizer_datasets_pad_fashion_mnist_to_32_and_replicate_the_channel(fashion_dir, tmp_path):
    common.make_fashion_mnist_split(fashion_dir, seed=0, val_size=10, out_path=tmp_path / "s.json")
    cfg = {"dataset": "fashion-mnist", "data_dir": str(fashion_dir), "split_file": str(tmp_path / "s.json"),
           "resolution": 32}
    data = common.tokenizer_datasets(cfg)
    raw_x, raw_y = common.load_fashion_mnist(fashion_dir, train=False)
    assert {k: len(v) for k, v in data.items()} == {"train": 40, "val": 10, "test": 12}
    for i in range(12):
        x, y = data["test"][i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == int(raw_y[i])
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        assert torch.equal(x[0, 2:30, 2:30], raw_x[i].float() / 255)  # every pixel kept, exactly
        assert x[:, :2].abs().sum() == 0 and x[:, 30:].abs().sum() == 0 and x[:, :, :2].abs().sum() == 0
    only_test = common.tokenizer_datasets(cfg, parts=("test",))
    assert list(only_test) == ["test"] and torch.equal(only_test["test"][3][0], data["test"][3][0])
    with pytest.raises(UserError, match="--resolution 24 would crop them"):
        common.tokenizer_datasets(dict(cfg, resolution=24))
    # a split file of other data: labels disagree with the files
    from test_fashion_mnist import write_split as write_idx
    write_idx(tmp_path / "other", "train", np.zeros((50, 28, 28), np.uint8), np.zeros(50, np.uint8))
    write_idx(tmp_path / "other", "t10k", np.zeros((12, 28, 28), np.uint8), np.zeros(12, np.uint8))
    with pytest.raises(UserError, match="labels differ from the Fashion-MNIST files"):
        common.tokenizer_datasets(cfg, data_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match="split file .* is missing"):
        common.tokenizer_datasets(dict(cfg, split_file=str(tmp_path / "none.json")))


def test_tokenizer_datasets_of_an_image_folder_run(image_folder, tmp_path):
    split = common.make_split(image_folder, "odir", 0, tmp_path / "s.json")
    cfg = {"data_dir": str(image_folder), "split_file": str(tmp_path / "s.json"), "resolution": 12}  # no "dataset"
    data = common.tokenizer_datasets(cfg)
    assert {k: len(v) for k, v in data.items()} == split["sizes"]
    assert torch.equal(data["test"][0][0], common.SplitImageDataset(None, split, "test", 12)[0][0])


@pytest.mark.skipif(not os.path.isdir(common.FASHION_MNIST_APT_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_split():
    split = common.make_fashion_mnist_split(common.FASHION_MNIST_APT_DIR, seed=0, val_size=5000)
    assert split["sizes"] == {"train": 55000, "val": 5000, "test": 10000}
    assert Counter(label for _, label in split["val"]) == {c: 500 for c in range(10)}
