"""A tiny CIFAR-10 folder in torchvision's real on-disk format, for tests only.

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
