"""`python evaluate.py codebook` end to end, as a subprocess: our checkpoints, foreign checkpoints
with dotted state-dict keys, .npy arrays, and one-line errors with exit status 2. Expected values
come from scipy's pdist and numpy, independent of common.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

import common
from common import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = {"num_codes", "dim", "euclidean", "cosine", "vendi", "vendi_centred"}


def evaluate(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "codebook", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def kernel_vendi(k):
    lam = np.linalg.eigvalsh(k / np.trace(k))
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def expected_suite(codes):
    t = np.asarray(codes, dtype=np.float64)
    c = t - t.mean(0)
    return {"num_codes": t.shape[0], "dim": t.shape[1], "euclidean": pdist(t).mean(),
            "cosine": pdist(t, "cosine").mean(), "vendi": kernel_vendi(t @ t.T), "vendi_centred": kernel_vendi(c @ c.T)}


def assert_suite_json(proc, codes, extra=()):
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert set(metrics) == SUITE | set(extra)
    for key, value in expected_suite(codes).items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    return metrics


@pytest.fixture
def codes():
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) + 0.2


def test_our_checkpoint_with_counts(tmp_path, codes):
    counts = torch.zeros(64)
    counts[:4] = torch.tensor([10.0, 10.0, 10.0, 10.0])
    path = tmp_path / "run.pt"
    save_checkpoint(path, codebook=codes, code_counts=counts, step=3, args={"lr": 1e-3})
    metrics = assert_suite_json(evaluate(path, "--json"), codes, extra=("perplexity", "used_codes"))
    assert metrics["perplexity"] == pytest.approx(4.0) and metrics["used_codes"] == 4
    text = evaluate(path)  # the human-readable form names every metric
    assert text.returncode == 0 and all(k in text.stdout for k in SUITE | {"perplexity"})


def test_foreign_checkpoint_with_dotted_state_dict_key(tmp_path, codes):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": codes, "quantize.proj.weight": torch.eye(8),
                               "encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}, "global_step": 7}, path)
    assert_suite_json(evaluate(path, "--key", "state_dict.quantize.embedding.weight", "--json"), codes)


def test_npy_codebook(tmp_path, codes):
    path = tmp_path / "codes.npy"
    np.save(path, codes.numpy())
    assert_suite_json(evaluate(path, "--json"), codes)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert proc.stdout == ""


def test_missing_file_and_wrong_key_are_one_line_errors(tmp_path, codes):
    assert_one_line_error(evaluate(tmp_path / "nope.pt"), "no such file")
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": codes}}, path)
    assert_one_line_error(evaluate(path, "--key", "state_dict.quantizer.weight"), "state_dict.quantizer.weight")
    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {"vq.codes": codes}}, unknown)
    assert_one_line_error(evaluate(unknown), "--key")  # no known codebook key: asks for one
    bad = tmp_path / "vector.npy"
    np.save(bad, np.arange(5.0))
    assert_one_line_error(evaluate(bad), "(num_codes, dim)")


def run_in_process(capsys, *argv):
    """evaluate.py's CLI in this process (faster than a subprocess): (exit status, stdout, stderr)."""
    import evaluate as ev
    from common import run_cli
    try:
        run_cli(ev.main, ev.build_parser(), [str(a) for a in argv])
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


def assert_refused(capsys, fragment, *argv):
    status, out, err = run_in_process(capsys, *argv)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], lines[0]


def test_values_that_are_not_a_codebook_are_one_line_errors(tmp_path, capsys, codes):
    path = tmp_path / "run.pt"
    save_checkpoint(path, codebook=codes, args={"lr": 1e-3})
    assert_refused(capsys, "the value at 'args' in", "codebook", path, "--key", "args")  # a dict
    strings = tmp_path / "names.npy"
    np.save(strings, np.array([["a", "b"], ["c", "d"]]))
    assert_refused(capsys, "holds <U1 values, not numbers", "codebook", strings)
    bad = codes.clone()
    bad[3, 1] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    assert_refused(capsys, "NaN or infinite", "codebook", tmp_path / "nan.npy")


@pytest.mark.parametrize("counts, fragment", [
    (torch.ones(63), "has shape (63,), not one count for each of the 64 codes"),
    (torch.ones(64, 1), "has shape (64, 1)"),
    (torch.cat([torch.ones(63), torch.tensor([-1.0])]), "negative, NaN or infinite"),
    (torch.cat([torch.ones(63), torch.tensor([float("nan")])]), "negative, NaN or infinite"),
    ("many", "not a tensor of numbers"),
])
def test_bad_code_counts_are_refused_not_turned_into_a_perplexity(tmp_path, capsys, codes, counts, fragment):
    path = tmp_path / "run.pt"
    save_checkpoint(path, codebook=codes, code_counts=counts)
    assert_refused(capsys, fragment, "codebook", path)


def test_tables_refuse_a_result_json_without_args(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"experiment": "imagenet_tokenizer", "metrics": {"mse": 0.1}}))
    assert_refused(capsys, "r.json is a result JSON without its 'args'", "tables", tmp_path, "--out", tmp_path / "rep")


def test_save_never_overwrites_and_records_paths_relative_to_the_json(tmp_path, capsys, codes):
    ckpt = tmp_path / "ckpts" / "run.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, codebook=codes)
    save = tmp_path / "results" / "coverage.json"
    status, _, err = run_in_process(capsys, "codebook", ckpt, "--label", "var", "--save", save)
    assert status == 0, err
    record = json.loads(save.read_text())
    assert record["source"] == os.path.join("..", "ckpts", "run.pt") and record["args"]["path"] == record["source"]
    assert common.result_path(save, record["source"]) == str(ckpt)
    before = save.read_bytes()
    assert_refused(capsys, "exists", "codebook", ckpt, "--label", "var", "--save", save)
    assert save.read_bytes() == before
