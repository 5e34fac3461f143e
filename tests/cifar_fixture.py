"""Tiny CIFAR-10 and Fashion-MNIST folders in their real on-disk formats, for tests only.

torchvision.datasets.CIFAR10 checks the md5 sums of the real files. Tests cannot ship the real data,
so `allow_fixture_checksums` replaces torchvision.datasets.cifar.check_integrity (the one function
both the data and the metadata checks call) by a plain "file exists" check. Production code is
untouched: cifar_sweep.py calls the real CIFAR10 class, which still reads and unpickles the files.
"""
import os
import pickle

import numpy as np


def write_cifar_fixture(root, train_per_batch=48, test_images=64, seed=0):
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta with 'data' (N x 3072 uint8,
    channel-major like the real files) and 'labels'. The real files are Python 2 pickles whose str
    keys read as b'data' under encoding='bytes' and as 'data' under torchvision's encoding='latin1';
    Python 3 cannot write a Python 2 str, so the keys are written as the str torchvision sees.
    Images are smooth colour blobs, so an autoencoder can learn something in a few steps."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0

    def images(n):
        centre = rng.uniform(0, 1, (n, 2, 1, 1))
        colour = rng.uniform(0, 1, (n, 3, 1, 1))
        blob = np.exp(-((xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2) / 0.05)  # (n, 1, 32, 32)
        img = 0.2 + 0.6 * colour * blob + 0.05 * rng.standard_normal((n, 3, 32, 32))
        return (np.clip(img, 0, 1) * 255).astype(np.uint8).reshape(n, 3072)

    def dump(name, n):
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": images(n), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", train_per_batch)
    dump("test_batch", test_images)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"],
            "num_cases_per_batch": train_per_batch, "num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return root


def allow_fixture_checksums():
    """Make torchvision accept fixture files whose md5 differs from the real CIFAR-10 (test-only)."""
    import torchvision.datasets.cifar as cifar
    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


def write_fashion_fixture(root, train_images=192, test_images=64, seed=0):
    """The four Fashion-MNIST idx .gz files (written by tests/test_fashion_mnist.py's independent idx
    writer) in a flat folder, like the Debian package's. Images are 28 x 28 grey blobs on a zero
    background, as Fashion-MNIST's items are; returns (root, {split: (images, labels)})."""
    from test_fashion_mnist import write_split
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    arrays = {}
    for prefix, n in (("train", train_images), ("t10k", test_images)):
        centre = rng.uniform(0.3, 0.7, (n, 2, 1, 1))
        level = rng.uniform(0.4, 1.0, (n, 1, 1))
        blob = np.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) / 0.03)
        images = np.where(blob > 0.05, level * blob, 0.0)  # exactly 0 around the item
        arrays[prefix] = ((images * 255).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8))
        write_split(root, prefix, *arrays[prefix])
    return root, arrays
