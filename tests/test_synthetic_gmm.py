"""synthetic_gmm.py: data, mode-coverage metric, outputs, identical arms under --compare, exact
resume, bad input, divergence, and the evaluate.py renderer."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import synthetic_gmm as sg
from common import run_cli
from race import race

# A few epochs are enough to exercise every phase (init, Continuous, switch, VQ, final).
FAST = ["--epochs", "4", "--continuous-epochs", "2", "--log-every", "1", "--ckpt-every", "2"]


def run(argv):
    return sg.main(sg.build_parser().parse_args(argv))


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    run(["--compare", "--out", str(out)] + FAST)
    return out


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 48])
def test_mixture_is_standardised_ten_by_thousand(dim):
    args = sg.build_parser().parse_args(["--data-dim", str(dim)])
    x, labels, means = sg.make_mixture(args)
    assert x.shape == (10_000, dim) and x.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [1000] * 10
    xd = x.double()
    assert torch.allclose(xd.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xd.std(0, unbiased=False), torch.ones(dim, dtype=torch.float64), atol=1e-5)
    # the standardised means are where each cluster's points are (1000 samples: mean error ~ 0.03 std)
    cluster_means = torch.stack([xd[labels == k].mean(0) for k in range(10)])
    assert torch.allclose(cluster_means, means.double(), atol=0.05)
    # modes are separated: nearest other mean far beyond the within-cluster spread
    within = torch.stack([xd[labels == k].std(0).mean() for k in range(10)]).max()
    between = torch.cdist(means.double(), means.double()) + torch.eye(10) * 1e9
    assert between.min() > 4 * within


def test_impossible_centre_packing_is_a_user_error():
    rng = np.random.default_rng(0)
    with pytest.raises(sg.UserError, match=r"cannot place 10 centres 5\.0 apart in \[-1\.0, 1\.0\]\^2"):
        sg.cluster_centres(2, 10, box=1.0, min_separation=5.0, rng=rng)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = sg.epoch_order(100, 0, 3)
    assert torch.equal(a, sg.epoch_order(100, 0, 3))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, sg.epoch_order(100, 0, 4))
    assert not torch.equal(a, sg.epoch_order(100, 1, 3))


# ---- mode coverage ------------------------------------------------------------------------------

def test_mode_coverage_hand_made_case():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    recon = torch.cat([
        means[0] + 0.1 * torch.ones(10, 2),          # cluster 0: reconstructed at its own mode
        means[0].expand(10, 2),                     # cluster 1: collapsed onto mode 0
        means[2].expand(9, 2),                      # cluster 2: 9 at its own mode ...
        torch.tensor([[9.0, 1.0]]),                 # ... and 1 near mode 1 (1/30 < 5%)
    ])
    covered, own = sg.mode_coverage(recon, means, labels)
    assert covered == 2
    assert own == pytest.approx(19 / 30)
    covered, _ = sg.mode_coverage(recon, means, labels, min_share=0.03)
    assert covered == 3


def test_within_mode_spread_hand_made_case():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 14.0]])
    labels = torch.tensor([0, 0, 1, 1])
    centre = torch.tensor([[1.0, 0.0], [1.0, 0.0], [10.0, 12.0], [10.0, 12.0]])
    assert sg.within_mode_spread(x, x, labels) == pytest.approx(1.0)
    assert sg.within_mode_spread(centre, x, labels) == pytest.approx(0.0)
    assert sg.within_mode_spread(centre + 0.5 * (x - centre), x, labels) == pytest.approx(0.25)
    # only cluster 1 keeps its spread: its variance (4) over the total (1 + 4)
    assert sg.within_mode_spread(torch.cat([centre[:2], x[2:]]), x, labels) == pytest.approx(0.8)


# ---- outputs of a short --compare run -----------------------------------------------------------

def test_compare_writes_results_checkpoints_and_figures(compare_dir):
    args = sg.build_parser().parse_args(["--compare"] + FAST)
    x, labels, means = sg.make_mixture(args)
    for method in ("baseline", "deferred"):
        name = f"{method}_d2_t1_s0"
        record = read(compare_dir / f"{name}.json")
        assert record["experiment"] == "synthetic_gmm" and record["method"] == method
        assert record["model_finished"] is True and record["model_epoch"] == record["args"]["epochs"]
        m = record["metrics"]
        for key in ("mse", "perplexity", "used_codes", "euclidean", "cosine", "vendi",
                    "modes_covered", "own_mode_share", "within_mode_spread"):
            assert key in m and math.isfinite(m[key])
        ckpt = torch.load(compare_dir / f"{name}.pt", weights_only=True)
        assert ckpt["codebook"].shape == (128, 1) and ckpt["epoch"] == 4
        counts = ckpt["code_counts"]
        assert counts.sum() == 10_000 and m["used_codes"] == int((counts > 0).sum())
        p = counts.double() / counts.sum()
        p = p[p > 0]
        assert m["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
        # metrics recomputed from the saved weights, independently of the script's evaluate()
        model = sg.VQVAE(args)
        model.load_state_dict(ckpt["model"])
        model.eval()
        with torch.no_grad():
            z = model.encoder(x)
            idx = torch.cdist(z, model.quantizer.codebook).argmin(1)
            recon = model.decoder(model.quantizer.codebook[idx])
        assert m["mse"] == pytest.approx(((recon - x) ** 2).mean().item(), rel=1e-5)
        # usage over the whole dataset; float32 near-ties (codes 1e-5 apart) may flip a few points
        assert (torch.bincount(idx, minlength=128) - counts.long()).abs().sum() <= 20
        # history: the codebook initialisation, then every epoch; deferred switches after 2 epochs
        phases = [(h["epoch"], h["phase"]) for h in record["history"]]
        if method == "baseline":
            assert phases == [(0, "discretization"), (1, "discretization"), (2, "discretization"),
                              (3, "discretization"), (4, "discretization")]
        else:
            assert phases == [(1, "continuous"), (2, "continuous"), (2, "discretization"), (3, "discretization"),
                              (4, "discretization")]
        # the model right after the switch, before any Discretization-Phase step, is marked
        assert [h["epoch"] for h in record["history"] if h.get("switch")] == [0 if method == "baseline" else 2]
        assert record["history"][-1]["mse"] == pytest.approx(m["mse"])
    for png in ("compare_d2_t1_s0_fig2.png", "compare_d2_t1_s0_fig3.png"):
        with open(compare_dir / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_defaults_are_the_paper_setting(compare_dir):
    """Sections 6.1 and A.1: 10 x 1,000 points, codebook 128, batch 256, AdamW lr 1e-3, beta 0.25,
    EMA decay 0.9, 200 epochs (deferred: 100 + 100), MLPs of three linear layers with ReLU."""
    args = sg.build_parser().parse_args([])
    assert (args.clusters, args.points_per_cluster, args.codebook_size, args.batch_size, args.lr, args.beta,
            args.ema_decay, args.epochs, args.continuous_epochs, args.hidden) == (10, 1000, 128, 256, 1e-3, 0.25, 0.9,
                                                                          200, 100, 32)
    model = sg.VQVAE(args)
    for net in (model.encoder, model.decoder):
        assert [type(m) for m in net] == [torch.nn.Linear, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert model.quantizer.beta == 0.25
    group = torch.load(compare_dir / "baseline_d2_t1_s0.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["decoupled_weight_decay"] is True and group["lr"] == 1e-3  # AdamW


def test_compare_arms_start_from_identical_weights(compare_dir):
    base = read(compare_dir / "baseline_d2_t1_s0.json")
    deferred = read(compare_dir / "deferred_d2_t1_s0.json")
    assert base["init_digest"] == deferred["init_digest"]
    other_seed = sg.build_parser().parse_args(["--seed", "1"])
    assert sg.state_digest(sg.build_model(other_seed, torch.device("cpu"))) != base["init_digest"]
    # the baseline codebook comes from the untrained encoder: narrower than the deferred one
    assert base["init_codebook"]["euclidean"] < deferred["init_codebook"]["euclidean"]


def test_single_arm_48d_uses_tsne_panels(tmp_path):
    run(["--deferred", "--data-dim", "48", "--token-dim", "32", "--tsne-points", "60", "--out", str(tmp_path)]
        + FAST)
    record = read(tmp_path / "deferred_d48_t32_s0.json")
    assert record["metrics"]["dim"] == 32
    assert (tmp_path / "deferred_d48_t32_s0_fig2.png").stat().st_size > 0
    assert (tmp_path / "deferred_d48_t32_s0_fig3.png").stat().st_size > 0


# ---- resume -------------------------------------------------------------------------------------

class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in the script catches it."""


def kill_at_epoch(monkeypatch, epoch):
    """The process dies as epoch `epoch` starts (after `epoch` epochs), as a kill would: no extra
    checkpoint, no result. Injected from outside through the function that orders each epoch."""
    real = sg.epoch_batches

    def batches(x, seed, e, batch_size):
        if e == epoch:
            raise Killed(f"killed at epoch {e}")
        return real(x, seed, e, batch_size)
    monkeypatch.setattr(sg, "epoch_batches", batches)


def kill_before_result(monkeypatch):
    """The process dies between an arm's final checkpoint and its JSON."""
    def die(*a, **k):
        raise Killed("killed before the result")
    monkeypatch.setattr(sg, "write_result", die)


@pytest.mark.parametrize("arm,kill", [("--deferred", 3), ("--deferred", 5), ("--compare", 3), ("--deferred", "result")])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch, arm, kill):
    """The last checkpoint before a kill at epoch 3 or 5 is the one of epoch 2 or 4, so the resumed
    run redoes epochs, including the switch at epoch 3; a kill after the final checkpoint leaves
    only the result to write."""
    argv = [arm, "--epochs", "6", "--continuous-epochs", "3", "--ckpt-every", "2", "--log-every", "1", "--no-figures"]
    run(argv + ["--out", str(tmp_path / "full")])
    with monkeypatch.context() as m:
        kill_before_result(m) if kill == "result" else kill_at_epoch(m, kill)
        with pytest.raises(Killed):
            run(argv + ["--out", str(tmp_path / "killed")])
    assert not (tmp_path / "killed" / "deferred_d2_t1_s0.json").exists()
    with pytest.raises(SystemExit) as refused:  # a fresh start does not overwrite the killed run
        run_cli(sg.main, sg.build_parser(), argv + ["--out", str(tmp_path / "killed")])
    assert refused.value.code == 2
    run(argv + ["--out", str(tmp_path / "killed"), "--resume"])
    names = ["deferred"] if arm == "--deferred" else ["baseline", "deferred"]
    for method in names:
        full = read(tmp_path / "full" / f"{method}_d2_t1_s0.json")
        resumed = read(tmp_path / "killed" / f"{method}_d2_t1_s0.json")
        assert resumed["metrics"] == full["metrics"]
        assert resumed["history"] == full["history"]
        a = torch.load(tmp_path / "full" / f"{method}_d2_t1_s0.pt", weights_only=True)
        b = torch.load(tmp_path / "killed" / f"{method}_d2_t1_s0.pt", weights_only=True)
        assert torch.equal(a["codebook"], b["codebook"])
    assert not list((tmp_path / "killed").glob("*.lock")) and not list((tmp_path / "killed").glob(".*.tmp"))


# ---- bad input and divergence -------------------------------------------------------------------

def cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(sg.main, sg.build_parser(), argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("bad", [
    ["--token-dim", "0"],
    ["--token-dim", "33"],                       # wider than the hidden layer (32)
    ["--codebook-size", "20000"],                # more codes than the 10,000 points
    ["--ratio", "0.5"],
    ["--deferred", "--continuous-epochs", "200"],        # no epochs left for the Discretization Phase
    ["--resume"],                                # nothing to resume
    ["--resume", "--lr", "0.01"],                # checkpoint made with other settings
    [],                                          # the run exists: rerunning it needs --resume
    ["--seed", "1", "--out", "FILE"],            # --out names a file (used to fail after training)
    ["--seed", "1", "--points-per-cluster", "1", "--codebook-size", "4"],  # no spread to measure (was 0/0)
])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(tmp_path, capsys, bad):
    (tmp_path / "baseline_d2_t1_s0.json").write_text("earlier result\n")
    if "0.01" in bad:  # a checkpoint from a run with the default lr
        default_args = vars(sg.build_parser().parse_args([]))
        torch.save({"args": default_args}, tmp_path / "baseline_d2_t1_s0.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = ["--out", str(tmp_path)] if "FILE" not in bad else []
    code, err = cli([str(tmp_path / "baseline_d2_t1_s0.json") if v == "FILE" else v for v in bad] + out, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# The validation table: every number is checked before anything is created (RANGES, validate).
@pytest.mark.parametrize("bad, message", [
    (["--ratio", "inf"], "--ratio must be a finite number, got inf"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--center-box", "nan"], "--center-box must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--cluster-std", "-1"], "--cluster-std must be > 0"),
    (["--ema-decay", "1"], r"--ema-decay must be \(0, 1\), got 1\.0"),
    (["--beta", "-0.1"], "--beta must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--dist-timeout", "0"], "--dist-timeout must be"),
    (["--min-separation", "nan"], "--min-separation must be a finite number"),
    (["--ratio", "100"], r"needs 12800 embeddings at the switch, but one epoch holds only the 10000 data points"),
    (["--center-box", "1"], r"cannot place 10 centres 5\.0 apart"),
])
def test_validation_table_refuses_at_start_and_creates_nothing(tmp_path, capsys, bad, message):
    code, err = cli(bad + ["--compare", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_refused_before_training(capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(sg, "train_arm", lambda *a, **k: trained.append(1))
    code, err = cli(["--out", "/proc/dq_synthetic_out"], capsys)  # not writable, even for root
    assert code == 2 and err.startswith("error: --out /proc/dq_synthetic_out is not writable")
    assert trained == []


def test_every_file_of_a_run_is_protected_and_orphan_temporaries_are_removed(tmp_path, capsys):
    """Without --resume, an existing figure of the run is refused like its JSON; a temporary file
    left by a killed write of one of the run's files is removed at start, another run's is kept."""
    (tmp_path / "compare_d2_t1_s0_fig3.png").write_bytes(b"earlier figure")
    code, err = cli(["--compare", "--out", str(tmp_path)] + FAST, capsys)
    assert code == 2 and "compare_d2_t1_s0_fig3.png exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare_d2_t1_s0_fig3.png"]
    (tmp_path / "compare_d2_t1_s0_fig3.png").unlink()
    orphan = tmp_path / ".deferred_d2_t1_s0.pt.k1ll3d.tmp"
    other = tmp_path / ".deferred_d2_t1_s1.pt.k1ll3d.tmp"
    orphan.write_bytes(b"half a checkpoint")
    other.write_bytes(b"another run's write")
    run(["--compare", "--no-figures", "--out", str(tmp_path)] + FAST)
    assert not orphan.exists() and other.exists()


def test_two_processes_racing_for_one_run_the_second_is_refused(tmp_path, capsys):
    """Same run name, different settings (lr), started while the first holds the run: the second
    gets one line naming the first; the first finishes and its result records its own lr."""
    out = tmp_path / "out"
    argv = ["--epochs", "2", "--no-figures", "--out", str(out)]
    code1, err1, pid, (code2, err2) = race(tmp_path, "synthetic_gmm", "train_arm", argv + ["--lr", "1e-3"],
                                           lambda: cli(argv + ["--lr", "3e-3"], capsys))
    assert code2 == 2 and err2.count("\n") == 1, err2
    assert err2.startswith(f"error: this run is in use by process {pid} ") and "baseline_d2_t1_s0.lock" in err2
    assert code1 == 0, err1
    assert read(out / "baseline_d2_t1_s0.json")["args"]["lr"] == 1e-3
    assert not (out / "baseline_d2_t1_s0.lock").exists()


def test_divergence_stops_with_one_line_and_keeps_earlier_results(tmp_path, capsys):
    run(["--epochs", "2", "--no-figures", "--out", str(tmp_path)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, err = cli(["--epochs", "2", "--no-figures", "--lr", "1e6", "--seed", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "loss became" in err and "epoch 1" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_command_line_error_through_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "synthetic_gmm.py", "--token-dim", "40", "--out", str(tmp_path)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--token-dim" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---- evaluate.py renderer -----------------------------------------------------------------------

def fake_result(method, seed, mse, modes, ema=False, dim=2, token_dim=1, **other_args):
    metrics = {"mse": mse, "modes_covered": modes, "own_mode_share": modes / 10, "perplexity": 2.0 * modes,
               "used_codes": 10 * modes, "euclidean": 0.1 * modes, "cosine": 0.0, "vendi": 1.0}
    args = dict(vars(sg.build_parser().parse_args([])), data_dim=dim, token_dim=token_dim, ema=ema, seed=seed,
                **other_args)
    return {"experiment": "synthetic_gmm", "method": method + ("_ema" if ema else ""), "args": args,
            "metrics": metrics}


def test_renderer_tabulates_each_setting_with_seed_means(tmp_path):
    results = [fake_result("baseline", 0, 0.2, 6), fake_result("baseline", 1, 0.4, 8),
               fake_result("deferred", 0, 0.1, 10), fake_result("deferred", 1, 0.1, 10),
               fake_result("deferred", 0, 0.3, 9, ema=True, dim=48, token_dim=32),
               fake_result("baseline", 2, 0.9, 1, epochs=50, lr=0.01),  # another setting: its own row
               fake_result("baseline", 3, 0.4, 8, continuous_epochs=50)]  # irrelevant to the baseline: a seed
    text = evaluate.RENDERERS["Figure 2 (synthetic)"](results, str(tmp_path))
    lines = text.splitlines()
    base = next(line for line in lines if "| 2 → 1 |" in line and "| paper | baseline |" in line)
    assert "0.333 ± 0.115" in base and "7.3 ± 1.2" in base and "| 3 |" in base  # means over 3 seeds
    other = next(line for line in lines if "| lr=0.01, epochs=50 | baseline |" in line)
    assert "| 1 | 0.900 |" in other
    ema = next(line for line in lines if "48 → 32" in line)
    assert "deferred" in ema and "EMA" in ema and "0.300" in ema
    assert "collapse" in text  # the paper's qualitative claim is shown beside our numbers
    assert evaluate.RENDERERS["Figure 2 (synthetic)"]([], str(tmp_path)) is None


def test_renderer_reads_real_results(compare_dir, tmp_path):
    text = evaluate.RENDERERS["Figure 2 (synthetic)"](evaluate.load_results(str(compare_dir)), str(tmp_path))
    assert "| baseline |" in text and "| deferred |" in text


def test_committed_results_with_old_argument_names_are_read_under_todays(tmp_path):
    """results/synthetic was written when --data-dim was --dim and --continuous-epochs was
    --ae-epochs; evaluate.py maps those keys when reading and renders the committed numbers."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "synthetic")
    raw = read(os.path.join(folder, "deferred_d48_t32_s0.json"))
    assert "dim" in raw["args"] and "data_dim" not in raw["args"]  # the committed file, untouched
    results = evaluate.load_results(folder)
    assert len(results) == 24 and all("dim" not in r["args"] and "ae_epochs" not in r["args"] for r in results)
    record = next(r for r in results if r["path"].endswith("deferred_d48_t32_s0.json"))
    assert (record["args"]["data_dim"], record["args"]["continuous_epochs"]) == (48, 100)
    text = evaluate.RENDERERS["Figure 2 (synthetic)"](results, str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| 48 → 32 | gradient | paper | deferred |")]
    mse = [r["metrics"]["mse"] for r in results if r["path"].endswith(tuple(f"deferred_d48_t32_s{s}.json"
                                                                               for s in range(3)))]
    assert len(rows) == 1 and f"| 3 | {np.mean(mse):.3f} ± {np.std(mse, ddof=1):.3f} |" in rows[0]
    # the header and 8 settings: the seeds of each are grouped
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 8


def test_kde_bandwidth_resolves_ten_close_modes_that_scotts_rule_merges():
    """Figure 3(b): ten modes 0.3 apart with widths 0.04 ... 0.4, like the trained encoder's outputs.
    The histogram-following bandwidth shows ten peaks at the ten means; Scott's rule (the default
    of gaussian_kde, used before) shows fewer."""
    from scipy.signal import find_peaks
    from scipy.stats import gaussian_kde
    rng = np.random.default_rng(0)
    means = np.array([-1.7, -1.36, -1.04, -0.76, -0.35, -0.03, 0.95, 1.49, 2.4, 5.0])
    widths = np.array([0.09, 0.06, 0.06, 0.09, 0.04, 0.04, 0.08, 0.08, 0.43, 0.36])
    values = np.concatenate([m + w * rng.standard_normal(1000) for m, w in zip(means, widths)])
    grid = np.linspace(values.min() - 0.4, values.max() + 0.4, 800)

    def peaks(density):
        return grid[find_peaks(density, prominence=0.02 * density.max())[0]]
    ours = peaks(sg.kde_density(values, grid))
    assert len(ours) == 10 and (np.abs(ours - means) < np.maximum(0.05, widths / 2)).all()
    assert len(peaks(gaussian_kde(values)(grid))) < 8
    assert np.trapezoid(sg.kde_density(values, grid), grid) == pytest.approx(1.0, abs=1e-3)
