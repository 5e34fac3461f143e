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


# ---- items 5 and 6: dumps keep their split and tokenizer; generators compare them, not paths ------

def tokenizer_main(run, out, *extra):
    import imagenet_tokenizer as tok
    from test_imagenet_tokenizer import TINY as TOK_TINY
    return tok.main(tok.build_parser().parse_args(["--data-dir", run.data_dir, "--out", str(out), "--split-file",
                                                   run.split_file] + TOK_TINY + list(extra)))


@pytest.fixture(scope="module")
def other_tokenizers(tokenizer_runs, tmp_path_factory):
    """Two more vq tokenizers on the fixture's split: 'same_k' (another seed, 16 codes) and 'k32'
    (32 codes), each with its train / val dumps: {name: (checkpoint, tokens folder)}."""
    out = tmp_path_factory.mktemp("other_tokenizers")
    found = {}
    for name, extra in (("same_k", ["--seed", "1"]), ("k32", ["--codebook-size", "32"])):
        tokenizer_main(tokenizer_runs["vq"], out, "--quantizer", "vq", "--epochs", "1", "--name", name, *extra)
        ckpt = str(out / name / "best.pt")
        for split in ("train", "val"):
            tokenizer_main(tokenizer_runs["vq"], out, "--name", name, "--dump-tokens", split, "--checkpoint", ckpt)
        found[name] = (ckpt, str(out / name))
    return found


def copy_dumps(run, folder, **changes):
    """The fixture's train / val dumps copied into `folder`, with record fields changed per part
    ({part: {field: value}}; a value None removes the field)."""
    os.makedirs(folder, exist_ok=True)
    for part in ("train", "val"):
        record = torch.load(run.tokens[part], weights_only=True)
        for key, value in changes.get(part, {}).items():
            record.pop(key) if value is None else record.__setitem__(key, value)
        torch.save(record, os.path.join(folder, f"tokens_{part}.pt"))
    return str(folder)


def test_dumps_take_the_split_of_their_checkpoint(tokenizer_runs, tmp_path):
    run = tokenizer_runs["vq"]
    split = common.load_split(run.split_file)
    swapped = dict(split, train=split["test"] + split["train"][6:], test=split["train"][:6])  # sizes unchanged
    common.write_json(tmp_path / "other.json", swapped)
    with pytest.raises(UserError, match="not the split .* was trained on"):
        tokenizer_main(run, tmp_path / "o", "--dump-tokens", "train", "--checkpoint", run.checkpoint,
                       "--split-file", str(tmp_path / "other.json"))
    assert not os.path.exists(tmp_path / "o")
    # the same split under another path (a run copied to another machine) is the same split
    common.write_json(tmp_path / "copy.json", split)
    tokenizer_main(run, tmp_path / "ok", "--name", "vq", "--dump-tokens", "val", "--checkpoint", run.checkpoint,
                   "--split-file", str(tmp_path / "copy.json"))
    record = torch.load(tmp_path / "ok" / "vq" / "tokens_val.pt", weights_only=True)
    assert record["split"] == "val" and record["split_sha256"] == common.split_fingerprint(split)
    assert torch.equal(record["tokens"], torch.load(run.tokens["val"], weights_only=True)["tokens"])


def test_generators_refuse_test_tokens_and_mixed_splits(tokenizer_runs, tmp_path):
    run = tokenizer_runs["vq"]
    cases = [({"train": {"split": "test"}}, "holds the tokens of the 'test' split, not 'train'"),
             ({"val": {"split": "test"}}, "'test' split, not 'val'"),
             ({"val": {"split_sha256": "0" * 64, "split_file": "/elsewhere/split.json"}}, "different split files")]
    for i, (changes, pattern) in enumerate(cases):
        folder = copy_dumps(run, tmp_path / f"dumps{i}", **changes)
        with pytest.raises(UserError, match=pattern):
            run_maskgit(tokenizer_runs, tmp_path / "o", "--tokens-dir", folder)
    assert not os.path.exists(tmp_path / "o")


def test_generators_compare_the_tokenizer_not_its_path(tokenizer_runs, other_tokenizers, tmp_path):
    run = tokenizer_runs["vq"]
    same_k, k32 = other_tokenizers["same_k"], other_tokenizers["k32"]
    # the dumps' recorded checkpoint path no longer exists (copied runs): another tokenizer with
    # the same codebook size is still refused, the right one at another path accepted
    moved = copy_dumps(run, tmp_path / "moved", train={"checkpoint": "/gone/best.pt"},
                       val={"checkpoint": "/gone/best.pt"})
    with pytest.raises(UserError, match="another tokenizer"):
        gm.load_inputs(gm.build_parser().parse_args(["--tokenizer", same_k[0], "--tokens-dir", moved] + TINY))
    os.makedirs(tmp_path / "copy")
    copied = str(tmp_path / "copy" / "best.pt")
    with open(run.checkpoint, "rb") as src, open(copied, "wb") as dst:
        dst.write(src.read())
    gm.load_inputs(gm.build_parser().parse_args(["--tokenizer", copied, "--tokens-dir", moved] + TINY))
    fingerprint = common.tokenizer_fingerprint_of(run.checkpoint)
    assert fingerprint == common.tokenizer_fingerprint_of(copied)
    assert fingerprint["codebook_size"] == common.tokenizer_fingerprint_of(same_k[0])["codebook_size"] == 16
    assert fingerprint["codebook_sha256"] != common.tokenizer_fingerprint_of(same_k[0])["codebook_sha256"]
    # a generator checkpoint whose tokenizer path is gone: --sample-only with another tokenizer of
    # the same K or of another K is one line before anything is written
    run_maskgit(tokenizer_runs, tmp_path / "g", "--epochs", "1", "--sample", "0", "--name", "m")
    best = tmp_path / "g" / "m" / "best.pt"
    ckpt = torch.load(best, weights_only=False)  # our own file (RNG states: numpy until issue 16 item 1)
    assert ckpt["tokenizer"] == fingerprint
    ckpt["args"]["tokenizer"] = "/gone/best.pt"
    torch.save(ckpt, best)
    for other, pattern in ((same_k, "another tokenizer"), (k32, "codebook size 16 vs 32")):
        args = ["--sample-only", "--checkpoint", str(best), "--name", "s", "--tokens-dir", other[1]]
        with pytest.raises(UserError, match=pattern):
            gm.main(gm.build_parser().parse_args(["--tokenizer", other[0], "--out", str(tmp_path / "s")] + TINY + args))
    # a checkpoint older than fingerprints: weights of another K are one line, not a RuntimeError
    del ckpt["tokenizer"]
    torch.save(ckpt, best)
    with pytest.raises(UserError, match="weights do not fit a MaskGIT for the dump's 32 codes"):
        gm.main(gm.build_parser().parse_args(["--tokenizer", k32[0], "--out", str(tmp_path / "s")] + TINY
                                             + ["--sample-only", "--checkpoint", str(best), "--tokens-dir", k32[1]]))


def test_maskgit_refuses_a_dump_of_another_grid(tokenizer_runs, tmp_path):
    from generator_fixture import write_token_dump
    for part in ("train", "val"):
        write_token_dump(tmp_path / "d" / f"tokens_{part}.pt", torch.randint(0, 16, (18, 4, 4)),
                         torch.arange(18) % 3, 16, num_classes=3, split=part)
    with pytest.raises(UserError, match=r"token maps of sides \[4\].* writes \[8\]"):
        run_maskgit(tokenizer_runs, tmp_path / "o", "--tokens-dir", str(tmp_path / "d"))


# ---- item 7: results say whether their model finished; tables count finished runs, once -----------

class Killed(BaseException):
    """Stands for a kill -9 of a training run."""


def killed_after_first_epoch(monkeypatch, script, *args):
    """`script(*args)`, killed right after it wrote its first last.pt."""
    real_save = common.save_checkpoint

    def killing_save(path, **state):
        real_save(path, **state)
        if path.endswith("last.pt"):
            raise Killed()
    monkeypatch.setattr(common, "save_checkpoint", killing_save)
    with pytest.raises(Killed):
        script(*args)
    monkeypatch.setattr(common, "save_checkpoint", real_save)


def test_unfinished_models_are_labelled_and_left_out_of_tables(tokenizer_runs, tmp_path, monkeypatch):
    import shutil

    import evaluate
    runs = tmp_path / "runs"
    run_maskgit(tokenizer_runs, runs, "--epochs", "2", "--name", "done")
    record = read(runs / "done.json")
    assert record["model_finished"] is True and record["model_epoch"] >= 1 and len(record["model_sha256"]) == 64
    assert "model_finished" not in record["notes"]
    # a run killed after its first of three epochs, sampled from its last.pt
    killed_after_first_epoch(monkeypatch, run_maskgit, tokenizer_runs, tmp_path / "killed", "--epochs", "3",
                             "--sample", "0", "--name", "k")
    run_maskgit(tokenizer_runs, runs, "--sample-only", "--checkpoint", str(tmp_path / "killed" / "k" / "last.pt"),
                "--name", "from_unfinished")
    unfinished = read(runs / "from_unfinished.json")
    assert unfinished["model_finished"] is False and unfinished["model_epoch"] == 1
    assert "had not finished" in unfinished["notes"]["model_finished"]
    # --sample-only of the finished run's best.pt (written at an earlier epoch) says finished
    run_maskgit(tokenizer_runs, tmp_path / "again", "--sample-only", "--checkpoint", str(runs / "done" / "best.pt"),
                "--name", "again")
    again = read(tmp_path / "again" / "again.json")
    assert again["model_finished"] is True and again["model_sha256"] == record["model_sha256"]
    # two copies of one JSON are one run; the unfinished model's JSON is no run of the table
    os.makedirs(runs / "copy")
    shutil.copy(runs / "done.json", runs / "copy" / "done.json")
    left_out = []
    results = evaluate.load_results(str(runs), left_out)
    assert len(results) == 1 and os.path.basename(results[0]["path"]) == "done.json"
    reasons = sorted(why.split(" (")[0] for _, why in left_out)
    assert reasons[0] == "its model had not finished training" and reasons[1].startswith("the same run as")
    report = evaluate.cmd_tables(evaluate.build_parser().parse_args(["tables", str(runs), "--out", str(tmp_path / "t")]))
    table4 = report.split("## Table 4")[1].split("##")[0]
    rows = [line.split(" | ") for line in table4.splitlines() if line.startswith("| MaskGIT ✗")]
    assert len(rows) == 1 and rows[0][2] == "1: seed 0 x sample 0"
    assert "## Results left out" in report and "from_unfinished.json: its model had not finished" in report


def test_tokenizer_results_say_whether_their_model_finished(tokenizer_runs, tmp_path, monkeypatch):
    run = tokenizer_runs["vq"]
    assert read(os.path.join(os.path.dirname(os.path.dirname(run.checkpoint)), "vq.json"))["model_finished"] is True
    killed_after_first_epoch(monkeypatch, tokenizer_main, run, tmp_path, "--epochs", "3", "--name", "k")
    tokenizer_main(run, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "k" / "last.pt"), "--name", "k")
    record = read(tmp_path / "k.json")
    assert record["model_finished"] is False and record["model_epoch"] == 1
    assert "had not finished" in record["notes"]["model_finished"]


# ---- item 8: one-line errors instead of tracebacks, null with a reason instead of meaningless numbers --

def test_degenerate_numbers_are_null_with_a_reason(tmp_path):
    import math
    # perplexity of nothing counted, pixel diversity of one sample: no number
    assert common.perplexity_from_counts(torch.zeros(8)) is None
    assert common.pixel_diversity(torch.rand(1, 3, 8, 8)) is None
    # the mean pairwise distance of huge codes: float32 squares overflowed into NaN
    codes = torch.tensor([[0.0, 0.0], [3e19, 4e19], [0.0, 5e19]])
    expected = (5e19 + 5e19 + math.sqrt(10) * 1e19) / 3
    assert common.mean_pairwise_euclidean(codes) == pytest.approx(expected, rel=1e-5)
    assert common.mean_pairwise_euclidean(codes / 1e19) == pytest.approx(expected / 1e19, rel=1e-5)
    # a NaN metric (g-FID from a NaN reference) is written as null and the notes say why
    common.write_result(tmp_path / "r.json", "x", "m", {"seed": 0}, {"gfid": math.nan, "mse": 0.5}, notes={"a": "b"})
    record = read(tmp_path / "r.json")
    assert record["metrics"] == {"gfid": None, "mse": 0.5}
    assert record["notes"]["a"] == "b" and "not finite" in record["notes"]["gfid"]


def test_one_nan_run_does_not_turn_a_row_into_nan(tmp_path):
    import evaluate
    from test_evaluate_generators import row, write_run
    for name, seed, gfid in (("a", 0, 14.0), ("b", 1, 16.0)):
        write_run(tmp_path, name, "maskgit", True, seed=seed, metrics={"gfid": gfid})
    record = read(tmp_path / "a.json")  # a third seed whose JSON says NaN (written before NaN became null)
    record["args"]["seed"], record["metrics"]["gfid"] = 2, float("nan")
    with open(tmp_path / "c.json", "w") as f:
        json.dump(record, f)
    cell = row(evaluate.render_generator_table(evaluate.load_results(str(tmp_path)), "Table 4"), "MaskGIT ✓")[3]
    assert cell.startswith("15.00 ± 1.41") and "1 non-finite left out" in cell


def test_codebook_of_an_empty_npy_is_one_line(tmp_path):
    import evaluate
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(UserError, match="cannot read .*empty.npy as a numpy array"):
        evaluate.load_codebook(str(tmp_path / "empty.npy"))


def test_tables_refuse_broken_files_in_one_line(tmp_path):
    import evaluate
    from test_evaluate_generators import write_run
    write_run(tmp_path / "runs", "a", "maskgit", True, metrics={"gfid": 14.0})
    parse = evaluate.build_parser().parse_args
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        evaluate.cmd_tables(parse(["tables", str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "t")]))
    (tmp_path / "runs" / "latin1.json").write_bytes('{"experiment": "é"}'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        evaluate.cmd_tables(parse(["tables", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]))
    os.remove(tmp_path / "runs" / "latin1.json")
    record = read(tmp_path / "runs" / "a.json")
    record["metrics"]["gfid"] = "14.0"
    with open(tmp_path / "runs" / "s.json", "w") as f:
        json.dump(record, f)
    with pytest.raises(UserError, match="metric 'gfid' is the string"):
        evaluate.cmd_tables(parse(["tables", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]))


def test_generator_start_up_refuses_degenerate_settings(tokenizer_runs, tmp_path):
    from generator_fixture import write_token_dump
    cases = [(["--seed", "-1"], "--seed must be"), (["--sample-seed", str(2 ** 70)], "--sample-seed must be"),
             (["--temperature", "1e-40"], "--temperature must be"), (["--cfg-scale", "1e300"], "--cfg-scale must be")]
    for extra, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            run_maskgit(tokenizer_runs, tmp_path / "o", *extra)
    for part in ("train", "val"):  # an empty dump
        write_token_dump(tmp_path / "d" / f"tokens_{part}.pt", torch.zeros(0, 8, 8, dtype=torch.long),
                         torch.zeros(0, dtype=torch.long), 16, num_classes=3, split=part)
    with pytest.raises(UserError, match="holds no images"):
        run_maskgit(tokenizer_runs, tmp_path / "o", "--tokens-dir", str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "o")


def test_llamagen_start_up_refuses_degenerate_inputs(tmp_path):
    import numpy as np

    import llamagen_deferred as lg
    parse = lg.build_parser().parse_args
    for extra, pattern in ((["--ch-mult", ","], "--ch-mult needs"), (["--crop-ranges", ","], "--crop-ranges needs"),
                           (["--seed", "-1"], "--seed must be")):
        with pytest.raises(UserError, match=pattern):
            lg.main(parse(["--stage", "tokenizer", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")] + extra))
    np.savez(tmp_path / "none.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3))
    os.makedirs(tmp_path / "empty")
    for extra, pattern in ((["--samples", str(tmp_path / "none.npz"), "--skip-fid"], "holds no images"),
                           (["--samples", str(tmp_path / "ref.npz"), "--fid-reference", str(tmp_path / "ref.npz")],
                            "mu / sigma must have shapes"),
                           (["--samples", str(tmp_path / "ref.npz"), "--fid-reference", str(tmp_path / "empty")],
                            "holds no images")):
        with pytest.raises(UserError, match=pattern):
            lg.main(parse(["--stage", "sample-eval", "--out", str(tmp_path / "o"), "--skip-isc", "--device", "cpu"]
                          + extra))
    assert not os.path.exists(tmp_path / "o")


# ---- item 10: one meaning per flag ----------------------------------------------------------------

def test_cfg_scale_zero_is_the_conditional_model_in_llamagen_too():
    import llamagen_deferred as lg
    from test_llamagen_deferred import tiny_gpt
    model, labels = tiny_gpt(), torch.tensor([1, 2, 3])

    def conditional(generator):  # the unguided model's draws, written out
        caches, out = model.new_caches(3, "cpu", torch.float32), []
        logits = model.step(caches, 0, labels_B=labels)
        for i in range(model.seq_len):
            if i:
                logits = model.step(caches, i, idx_B1=out[-1][:, None])
            out.append(torch.multinomial(logits.float().softmax(-1), 1, generator=generator)[:, 0])
        return torch.stack(out, 1)
    ours = lg.sample_tokens(model, labels, cfg_scale=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, conditional(torch.Generator().manual_seed(5)))
    assert lg.llamagen_scale(1.0) == 2.0  # the default w = 1 is LlamaGen's s = 2.0


def test_top_p_has_one_meaning_in_var_and_llamagen():
    import generator_var as gv
    import llamagen_deferred as lg
    from test_llamagen_deferred import tiny_gpt
    for parser, ranges, extra in ((gv.build_parser(), gv.RANGES, ["--tokenizer", "x"]),
                                  (lg.build_parser(), lg.GPT_RANGES, ["--stage", "sample"])):
        for top_p in ("0", "1", "0.5"):
            common.check_ranges(parser.parse_args(extra + ["--top-p", top_p]), ranges)  # 0 and 1: off in both
    model, labels = tiny_gpt(), torch.tensor([1, 2, 3])
    off = [lg.sample_tokens(model, labels, top_p=p, generator=torch.Generator().manual_seed(1)) for p in (0.0, 1.0)]
    assert torch.equal(off[0], off[1])
