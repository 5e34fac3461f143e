"""Shared CPU fixture of the generator tests (generator_maskgit.py, generator_var.py, ...): tiny
trained tokenizers, single-scale (vq) and multi-scale (msvq), with their token dumps, made by
imagenet_tokenizer.py itself on test_imagenet_tokenizer's tiny ImageFolder (3 classes, 32x32
images, 8x8 latent grid, 16 codes, msvq scales 1,2,4,8; train 18 / val 6 / test 6 images;
token dumps of train and val).

Registered in tests/conftest.py, so any test can ask for `tokenizer_runs` (built once per
session, ~5 s) or write a synthetic dump in the real on-disk format with `write_token_dump`.

    def test_x(tokenizer_runs):
        run = tokenizer_runs["vq"]      # or "msvq"
        run.checkpoint, run.tokens["train"], run.data_dir, run.split_file
"""
import os
from dataclasses import dataclass

import pytest
import torch

from test_imagenet_tokenizer import TINY, run_script, write_image_folder  # noqa: F401  (TINY: the tokenizer's size)

SPLITS = ("train", "val")  # what a generator trains on; the test split is its images


@dataclass
class TokenizerRun:
    quantizer: str
    checkpoint: str      # <out>/<name>/best.pt of a trained (Discretization Phase) tokenizer
    tokens: dict         # split -> <out>/<name>/tokens_<split>.pt
    data_dir: str
    split_file: str


def train_tokenizers(root):
    """A baseline tokenizer per quantizer (one epoch of 2 steps) and its train / val dumps."""
    images = write_image_folder(root / "images")
    out = root / "runs" / "out"
    runs = {}
    for quantizer in ("vq", "msvq"):
        run_script(images, out, "--quantizer", quantizer, "--epochs", "1", "--name", quantizer)
        ckpt = out / quantizer / "best.pt"
        for split in SPLITS:
            run_script(images, out, "--quantizer", quantizer, "--name", quantizer, "--dump-tokens", split,
                       "--checkpoint", str(ckpt))
        runs[quantizer] = TokenizerRun(quantizer, str(ckpt), {s: str(out / quantizer / f"tokens_{s}.pt") for s in SPLITS},
                                       str(images), str(out.parent / "split.json"))
    return runs


@pytest.fixture(scope="session")
def tokenizer_runs(tmp_path_factory):
    return train_tokenizers(tmp_path_factory.mktemp("generator_fixture"))


def write_token_dump(path, tokens, labels, codebook_size, quantizer="vq", num_classes=None, **fields):
    """A token dump in imagenet_tokenizer.py's on-disk format from given tokens: vq (N, h, w), msvq
    a list of (N, s, s); int16 as the tokenizer writes them. `fields` override record entries."""
    maps = tokens if isinstance(tokens, list) else [tokens]
    record = {"tokens": [m.to(torch.int16) for m in maps] if quantizer == "msvq" else maps[0].to(torch.int16),
              "labels": labels, "checkpoint": None, "quantizer": quantizer,
              "scales": [int(m.shape[-1]) for m in maps], "codebook_size": codebook_size, "split": "train",
              "split_file": None}
    if num_classes is not None:
        record["num_classes"] = num_classes
    record.update(fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(record, path)
    return path
