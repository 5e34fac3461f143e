"""The start-up protocol of common.py that every script runs before training: argument ranges,
writability, the run lock (two processes, stale locks), temporary-file clean-up, overwrite and
resume rules, one-line errors on failed writes, and the best-before-last checkpoint order."""
import argparse
import errno
import json
import os
import subprocess
import sys

import pytest

import common
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ns(**kw):
    kw.setdefault("resume", False)
    return argparse.Namespace(**kw)


# ------------------------------------------------------------------------------------------------
# Argument ranges
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_float_argument_must_be_finite_even_without_a_range(value):
    with pytest.raises(UserError, match=r"--affine-lr must be a finite number"):
        common.check_ranges(ns(affine_lr=value, lr=1e-3), {})


@pytest.mark.parametrize("spec, good, bad", [
    ("> 0", [1e-9, 3.0], [0.0, -1.0]),
    (">= 1", [1, 1.0, 2.5], [0.999, 0]),
    ("< 1", [0.99, -5], [1, 2]),
    ("<= 1", [1, 0], [1.01]),
    ("(0, 1)", [0.5], [0.0, 1.0]),
    ("[0, 1)", [0.0, 0.5], [1.0, -0.1]),
    ("(0, 1]", [1.0], [0.0]),
    ("[0, 1]", [0.0, 1.0], [1.5]),
])
def test_intervals_accept_and_refuse_their_boundaries(spec, good, bad):
    for v in good:
        common.check_ranges(ns(x=v), {"x": spec})
    for v in bad:
        with pytest.raises(UserError, match=rf"^--x must be {__import__('re').escape(spec)}, got"):
            common.check_ranges(ns(x=v), {"x": spec})


def test_ranges_skip_unset_optionals_and_check_list_elements():
    common.check_ranges(ns(train_subset=None), {"train_subset": ">= 1"})
    with pytest.raises(UserError, match="--scales must be >= 1, got 0"):
        common.check_ranges(ns(scales=(1, 2, 0)), {"scales": ">= 1"})
    with pytest.raises(UserError, match="finite"):
        common.check_ranges(ns(weights=[1.0, float("nan")]), {})


# ------------------------------------------------------------------------------------------------
# start_run: writability, overwrite, resume, temporary files
# ------------------------------------------------------------------------------------------------


def test_out_that_is_a_file_or_unwritable_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        common.start_run(ns(out=str(f / "sub")), name="r", outputs=[])

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(common.tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError, match=r"^--out .* is not writable .*Read-only file system"):
        common.start_run(ns(out=str(tmp_path / "new")), name="r", outputs=[])
    assert not (tmp_path / "new").exists()


def test_a_read_only_run_folder_is_refused_at_start(tmp_path, monkeypatch):
    """--out writable, the run's own folder inside it not: refused before training, not when the
    first epoch's checkpoint is written. (A probe, not chmod: root writes into read-only folders.)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make = common.tempfile.TemporaryFile

    def read_only_run_dir(*a, dir=None, **k):
        if os.path.abspath(dir) == str(run_dir):
            raise OSError(errno.EROFS, "Read-only file system")
        return make(*a, dir=dir, **k)
    monkeypatch.setattr(common.tempfile, "TemporaryFile", read_only_run_dir)
    with pytest.raises(UserError, match=r"^run folder .*run is not writable .*Read-only file system"):
        common.start_run(ns(out=str(tmp_path)), name="r", outputs=[str(run_dir / "last.pt"), str(tmp_path / "r.json")])
    assert not (tmp_path / "r.lock").exists()


def test_checks_run_before_the_lock_so_a_refused_run_leaves_no_trace(tmp_path):
    def missing_data():
        raise UserError("data folder not found: /nowhere")
    with pytest.raises(UserError, match="data folder not found"):
        common.start_run(ns(out=str(tmp_path / "out")), name="r", outputs=[], checks=[missing_data])
    assert not (tmp_path / "out").exists()


def test_outputs_are_never_overwritten_without_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("{}")
    with pytest.raises(UserError, match=r"r\.json exists: pass --resume"):
        common.start_run(ns(out=str(out)), name="r", outputs=[str(out / "r.pt"), str(out / "r.json")])
    assert not (out / "r.lock").exists()  # the refused run released its lock


def test_resume_needs_the_checkpoint_and_the_same_defining_settings(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "r.pt"
    with pytest.raises(UserError, match="--resume: no checkpoint at"):
        common.start_run(ns(out=str(out), resume=True), name="r", outputs=[str(ckpt)], resume_from=str(ckpt))
    common.save_checkpoint(str(ckpt), args={"lr": 1e-3, "scales": [1, 2]}, step=7)
    args = ns(out=str(out), resume=True, lr=3e-3, scales=(1, 2))
    with pytest.raises(UserError, match=r"other settings \(--lr 0\.001 -> 0\.003\)"):
        common.start_run(args, name="r", outputs=[str(ckpt)], defining=("lr", "scales"), resume_from=str(ckpt))
    assert not (out / "r.lock").exists()
    args.lr = 1e-3  # tuple vs the list torch.save kept: the same setting
    with common.start_run(args, name="r", outputs=[str(ckpt)], defining=("lr", "scales"),
                          resume_from=str(ckpt)) as run:
        assert run.checkpoint["step"] == 7 and (out / "r.lock").exists()
    assert not (out / "r.lock").exists()


def test_temporary_files_of_killed_writes_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / ".r.pt.abc123.tmp"
    other_run = out / ".q.pt.abc123.tmp"  # another run's write in progress: not ours to delete
    orphan.write_bytes(b"half a checkpoint")
    other_run.write_bytes(b"x")
    with common.start_run(ns(out=str(out)), name="r", outputs=[str(out / "r.pt")]):
        pass
    assert not orphan.exists() and other_run.exists()


# ------------------------------------------------------------------------------------------------
# The run lock
# ------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time, argparse
sys.path.insert(0, {root!r})
import common
run = common.start_run(argparse.Namespace(out={out!r}, resume=False), name="r", outputs=[])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_while_the_first_holds_the_run(tmp_path):
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, out=out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by process {holder.pid} .*r\.lock"):
            common.start_run(ns(out=out), name="r", outputs=[])
        common.start_run(ns(out=out), name="other", outputs=[]).finish()  # other names are free
    finally:
        holder.kill()  # kill -9: no clean-up runs, the lock stays behind
        holder.wait()
    assert os.path.exists(os.path.join(out, "r.lock"))
    with common.start_run(ns(out=out), name="r", outputs=[]):  # stale: its owner is dead
        owner = json.load(open(os.path.join(out, "r.lock")))
        assert owner["pid"] == os.getpid()


RACER = """
import argparse, sys, time
sys.path.insert(0, {root!r})
import common

def main(_):
    with common.start_run(argparse.Namespace(out={out!r}, resume=False), name="r", outputs=[]):
        time.sleep(3)

common.run_cli(main, argparse.ArgumentParser(), [])
"""


def test_two_processes_racing_for_one_name_one_wins(tmp_path):
    out = str(tmp_path / "out")
    code = RACER.format(root=ROOT, out=out)
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in results) == [0, 2, 2], results
    for c, err in results:
        if c:
            assert err.startswith("error: this run is in use by process") and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "r.lock"))  # the winner released it on exit


def test_a_foreign_host_lock_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "start_time": None}))
    with pytest.raises(UserError, match="on host elsewhere"):
        common.start_run(ns(out=str(out)), name="r", outputs=[])
    assert json.loads((out / "r.lock").read_text())["host"] == "elsewhere"


# ------------------------------------------------------------------------------------------------
# Writes
# ------------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.pt"
    common.save_checkpoint(str(path), step=1)

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0")
    monkeypatch.setattr(common.torch, "save", disk_full)
    with pytest.raises(UserError, match=r"^cannot write .*r\.pt: .*failed writing"):
        common.save_checkpoint(str(path), step=2)
    monkeypatch.undo()
    assert common.load_checkpoint(str(path))["step"] == 1
    assert common.temporary_files_of(str(path)) == []

    def enospc(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="No space left on device"):
        common.atomic_write(str(tmp_path / "x.json"), enospc, "w")


def test_a_bug_in_the_writer_is_not_disguised_as_a_user_error(tmp_path):
    with pytest.raises(TypeError):
        common.write_json(str(tmp_path / "x.json"), {"x": object()})


def test_best_is_written_before_last(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(common, "save_checkpoint", lambda path, **s: order.append(os.path.basename(path)))
    common.save_checkpoints(str(tmp_path / "last.pt"), str(tmp_path / "best.pt"), step=1)
    common.save_checkpoints(str(tmp_path / "last.pt"), None, step=2)
    assert order == ["best.pt", "last.pt", "last.pt"]


def test_dist_timeout_must_be_positive():
    with pytest.raises(UserError, match="--dist-timeout"):
        common.setup_distributed("cpu", timeout_minutes=0)
    with pytest.raises(UserError, match="--dist-timeout"):
        common.setup_distributed("cpu", timeout_minutes=float("nan"))
