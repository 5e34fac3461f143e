"""Trust what is reported (issue 16, items 2, 5, 6, 7, 8, 10): a run's samples folder holds exactly
the samples its JSON describes; token dumps and generators keep their split and tokenizer
provenance; results say whether their model finished and tables count each run once; degenerate
inputs are one line and meaningless numbers are null with a reason; flags mean one thing."""
import json
import os

import pytest
import torch

import common
import generator_maskgit as gm
from common import UserError
from test_generator_maskgit import TINY


def run_maskgit(tokenizer_runs, out, *extra, quantizer="vq"):
    args = gm.build_parser().parse_args(["--tokenizer", tokenizer_runs[quantizer].checkpoint, "--out", str(out)]
                                        + TINY + list(extra))
    return gm.main(args)


def read(path):
    with open(path) as f:
        return json.load(f)


# ---- item 2: samples/ holds exactly the samples of the JSON ---------------------------------------

def test_write_samples_replaces_the_whole_folder(tmp_path, monkeypatch):
    images, labels = torch.rand(5, 3, 4, 4), torch.tensor([0, 0, 1, 1, 1])
    common.write_samples(tmp_path / "s", images, labels, tmp_path / "g.png")
    common.write_samples(tmp_path / "s", images[:2], labels[:2], tmp_path / "g.png")
    assert sorted(os.listdir(tmp_path / "s")) == ["00000_class0.png", "00001_class0.png"]
    # a failure half-way leaves the previous folder as it was and no temporary folder
    real, written = common.write_png, []

    def failing(path, image):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt
        real(path, image)
    monkeypatch.setattr(common, "write_png", failing)
    with pytest.raises(KeyboardInterrupt):
        common.write_samples(tmp_path / "s", images, labels, tmp_path / "g.png")
    assert sorted(os.listdir(tmp_path / "s")) == ["00000_class0.png", "00001_class0.png"]
    assert sorted(os.listdir(tmp_path)) == ["g.png", "s"]


def test_resampled_run_holds_only_its_new_samples(tokenizer_runs, tmp_path):
    run_maskgit(tokenizer_runs, tmp_path, "--epochs", "1", "--name", "r")
    assert len(os.listdir(tmp_path / "r" / "samples")) == 6
    # a kill during an earlier sampling left a temporary folder and a temporary PNG behind
    os.makedirs(tmp_path / "r" / ".samples.abc.tmp")
    (tmp_path / "r" / ".samples.abc.tmp" / "00007_class2.png").write_bytes(b"png")
    (tmp_path / "r" / "samples" / ".00009_class2.png.xyz.tmp").write_bytes(b"partial")
    run_maskgit(tokenizer_runs, tmp_path, "--epochs", "1", "--name", "r", "--resume", "--sample", "3")
    record = read(tmp_path / "r.json")
    files = sorted(os.listdir(tmp_path / record["samples"]))
    assert record["metrics"]["num_samples"] == 3 and files == ["00000_class0.png", "00001_class1.png",
                                                              "00002_class2.png"]
    assert sorted(os.listdir(tmp_path / "r")) == ["best.pt", "last.pt", "samples", "samples_grid.png",
                                                  "samples_tokens.pt"]
    # --sample 0 on resume: no samples in the JSON, none left beside it
    run_maskgit(tokenizer_runs, tmp_path, "--epochs", "1", "--name", "r", "--resume", "--sample", "0")
    assert "samples" not in read(tmp_path / "r.json")
    assert sorted(os.listdir(tmp_path / "r")) == ["best.pt", "last.pt"]
