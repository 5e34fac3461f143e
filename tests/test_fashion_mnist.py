"""Fashion-MNIST idx reader (common.py section 6): files written in the exact on-disk format, the
two folder layouts, --download through torchvision, and one-line errors for broken files."""
import gzip
import os
import re

import numpy as np
import pytest
import torch

import common
from common import UserError

STEMS = {"images": "{}-images-idx3-ubyte", "labels": "{}-labels-idx1-ubyte"}


def idx_bytes(array, magic=None):
    """An idx file's bytes, built independently of the reader: magic (0x08 type byte, ndim), one
    big-endian uint32 per dimension, then the uint8 data."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def write_split(folder, prefix, images, labels, compress=True, raw=None):
    """Write one split's two idx files into `folder` (gzip when `compress`); `raw` maps
    'images' / 'labels' to bytes to write instead (corruption cases)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for kind, array in (("images", images), ("labels", labels)):
        data = (raw or {}).get(kind, idx_bytes(array))
        path = os.path.join(folder, STEMS[kind].format(prefix) + (".gz" if compress else ""))
        with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
            f.write(data)
        paths[kind] = path
    return paths


def make_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def test_flat_folder_of_gz_files_round_trips(tmp_path):
    train, test = make_data(7, 0), make_data(3, 1)
    write_split(tmp_path, "train", *train)
    write_split(tmp_path, "t10k", *test)
    for is_train, (images, labels) in ((True, train), (False, test)):
        x, y = common.load_fashion_mnist(tmp_path, train=is_train)
        assert x.dtype == torch.uint8 and x.shape == (len(images), 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(images),)
        assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_torchvision_layout_with_plain_files_is_preferred(tmp_path):
    images, labels = make_data(5)
    write_split(tmp_path / "FashionMNIST" / "raw", "t10k", images, labels, compress=False)
    write_split(tmp_path, "t10k", *make_data(4, 9))  # a flat copy beside it is not the one read
    x, y = common.load_fashion_mnist(tmp_path, train=False)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    # our parse agrees with torchvision's own idx reader
    from torchvision.datasets.mnist import read_image_file, read_label_file
    raw = tmp_path / "FashionMNIST" / "raw"
    assert torch.equal(x, read_image_file(str(raw / "t10k-images-idx3-ubyte")))
    assert torch.equal(y, read_label_file(str(raw / "t10k-labels-idx1-ubyte")))


def test_download_goes_through_torchvision_then_reads_its_layout(tmp_path, monkeypatch):
    import torchvision

    images, labels = make_data(6)
    calls = []

    def fake_fashion_mnist(root, train, download):
        calls.append((os.fspath(root), train, download))
        write_split(os.path.join(root, "FashionMNIST", "raw"), "train" if train else "t10k", images, labels)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    x, y = common.load_fashion_mnist(tmp_path / "new", train=True, download=True)
    assert calls == [(os.fspath(tmp_path / "new"), True, True)]
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)

    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError, match=r"^Fashion-MNIST download into .* failed: Error downloading") as err:
        common.load_fashion_mnist(tmp_path / "other", train=True, download=True)
    assert "\n" not in str(err.value)


def raises_one_line_error(tmp_path, match, train=True):
    with pytest.raises(UserError, match=match) as err:
        common.load_fashion_mnist(tmp_path, train=train)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_folder_and_missing_file(tmp_path):
    raises_one_line_error(tmp_path / "nowhere", r"^data folder not found: .*nowhere$")
    raises_one_line_error(tmp_path, r"^Fashion-MNIST file train-images-idx3-ubyte\[\.gz\] not found in ")
    paths = write_split(tmp_path, "train", *make_data(3))
    os.remove(paths["labels"])
    msg = raises_one_line_error(tmp_path, r"^Fashion-MNIST file train-labels-idx1-ubyte\[\.gz\] not found in ")
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg


def test_truncated_gz_names_the_file(tmp_path):
    paths = write_split(tmp_path, "train", *make_data(20))
    blob = open(paths["images"], "rb").read()
    with open(paths["images"], "wb") as f:
        f.write(blob[:len(blob) // 2])
    raises_one_line_error(tmp_path, rf"^cannot read {re.escape(paths['images'])}: Compressed file ended")


def test_not_gzip_names_the_file(tmp_path):
    paths = write_split(tmp_path, "train", *make_data(3))
    with open(paths["labels"], "wb") as f:
        f.write(b"<html>404 Not Found</html>")
    raises_one_line_error(tmp_path, rf"^cannot read {re.escape(paths['labels'])}: Not a gzipped file")


@pytest.mark.parametrize("kind, magic", [("images", 2049), ("labels", 2051), ("images", 0x0D03)])
def test_wrong_magic_number(tmp_path, kind, magic):
    images, labels = make_data(3)
    array = {"images": images, "labels": labels}[kind]
    paths = write_split(tmp_path, "train", images, labels, raw={kind: idx_bytes(array, magic=magic)})
    expected = common.IDX_MAGIC[kind]
    raises_one_line_error(tmp_path, rf"^{re.escape(paths[kind])} is not an idx {kind} file \(magic number {magic}, expected {expected}\)$")


def test_data_shorter_or_longer_than_its_header(tmp_path):
    images, labels = make_data(4)
    paths = write_split(tmp_path, "train", images, labels, raw={"images": idx_bytes(images)[:-28]})
    raises_one_line_error(tmp_path, rf"^{re.escape(paths['images'])} holds 3108 bytes of data, its header says 3136 .*truncated")
    paths = write_split(tmp_path, "train", images, labels, raw={"labels": idx_bytes(labels) + b"\0"})
    raises_one_line_error(tmp_path, rf"^{re.escape(paths['labels'])} holds 5 bytes of data, its header says 4 ")
    paths = write_split(tmp_path, "train", images, labels, raw={"labels": b"\0\0\x08"})
    raises_one_line_error(tmp_path, rf"^{re.escape(paths['labels'])} is truncated: 3 bytes")


def test_inconsistent_files(tmp_path):
    images, labels = make_data(4)
    write_split(tmp_path, "t10k", images, labels[:3])
    raises_one_line_error(tmp_path, r"holds 3 labels for the 4 images of ", train=False)
    write_split(tmp_path, "t10k", images[:, :20, :20], labels)
    raises_one_line_error(tmp_path, r"images of 20x20, Fashion-MNIST's are 28x28", train=False)
    write_split(tmp_path, "t10k", images, np.array([0, 1, 10, 2]))
    raises_one_line_error(tmp_path, r"label 10 outside the 10 classes", train=False)


@pytest.mark.skipif(not os.path.isdir(common.FASHION_MNIST_APT_DIR),
                    reason="the Debian package dataset-fashion-mnist is not installed (optional)")
def test_real_files_from_the_debian_package():
    counts = {}
    for train, per_class in ((True, 6000), (False, 1000)):
        x, y = common.load_fashion_mnist(common.FASHION_MNIST_APT_DIR, train=train)
        counts[train] = len(x)
        assert x.shape[1:] == (28, 28) and x.dtype == torch.uint8
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
        assert 0 < x.float().mean() < 255 and x.max() == 255 and x.min() == 0
    assert counts[True] + counts[False] == 70000
    assert len(common.FASHION_MNIST_CLASSES) == 10 and common.FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_augmented_views_shift_the_garment_by_zero_padding(tmp_path):
    """Fashion-MNIST's views (common.augmented_views): view 0 is the item itself (28 -> 32 zero
    padding), the corner crops of the image padded to 36 (not resized: no blur) shift the garment by
    2 pixels each way, every crop is followed by its mirror."""
    images, labels = make_data(12)
    write_split(str(tmp_path), "train", images, labels)
    write_split(str(tmp_path), "t10k", images[:3], labels[:3])
    split = common.make_fashion_mnist_split(str(tmp_path), 0, val_size=2)
    files = {"train": common.load_fashion_mnist(str(tmp_path), True)}
    ds = common.FashionMNISTSplit(files, split, "train", 32)
    views, label = ds.views(1)
    garment = ds[1][0][:, 2:30, 2:30]
    assert views.shape == (10, 3, 32, 32) and label == ds[1][1] and torch.equal(views[0], ds[1][0])
    for k, (top, left) in enumerate(((4, 4), (4, 0), (0, 4), (0, 0))):  # top-left crop: the garment moves right/down
        assert torch.equal(views[2 + 2 * k][:, top:top + 28, left:left + 28], garment)
        assert torch.equal(views[3 + 2 * k], views[2 + 2 * k].flip(-1))
        assert views[2 + 2 * k].sum().item() == pytest.approx(garment.sum().item())  # only zero padding was cut
