"""generator_maskgit.py: the MaskGIT invariants (shared/generators.md section 2), an overfit run,
the script end to end on the tiny tokenizer fixture (samples, JSON, resume after a kill, two
torchrun ranks) and its one-line errors."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
import generator_maskgit as gm
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--width", "32", "--heads", "2", "--mlp-dim", "64", "--batch-size", "6",
        "--warmup-steps", "2", "--steps", "4", "--sample", "6", "--per-class", "2", "--skip-fid", "--skip-lpips",
        "--device", "cpu"]


def tiny_model(codes=8, classes=3, seq_len=16, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return gm.MaskGITTransformer(codes, classes, seq_len, depth=2, width=32, heads=2, mlp_dim=64,
                                 dropout=dropout).eval()


# ---- training masks and loss --------------------------------------------------------------------

def test_mask_count_follows_the_cosine_schedule():
    n, b = 64, 4000
    masked = gm.random_mask(b, n, generator=torch.Generator().manual_seed(5))
    r = torch.rand(b, generator=torch.Generator().manual_seed(5))  # the same first draw
    expected = torch.ceil(torch.cos(math.pi / 2 * r) * n).clamp(1, n)
    assert torch.equal(masked.sum(1), expected.long())
    assert masked.sum(1).min() >= 1 and masked.sum(1).max() <= n
    # positions uniform: every position masked about equally often
    per_position = masked.float().mean(0)
    assert (per_position - per_position.mean()).abs().max() < 0.05


def test_loss_ignores_logits_at_unmasked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 8, generator=g)
    target = torch.randint(0, 8, (3, 5), generator=g)
    masked = torch.rand(3, 5, generator=g) < 0.5
    masked[0, 0] = True
    total, count = gm.token_loss_sum(logits, target, masked, label_smoothing=0.1)
    changed = logits.clone()
    changed[~masked] = torch.randn(int((~masked).sum()), 8, generator=g) * 10
    assert torch.equal(gm.token_loss_sum(changed, target, masked, 0.1)[0], total)
    assert gm.token_loss_sum(changed, target, masked, 0.1, all_tokens=True)[0] != \
        gm.token_loss_sum(logits, target, masked, 0.1, all_tokens=True)[0]
    # independent value: smoothed cross-entropy = (1 - eps) NLL + eps * mean over classes of -log p
    logp = logits.log_softmax(-1)
    per = -(0.9 * logp.gather(-1, target[..., None])[..., 0] + 0.1 * logp.mean(-1))
    assert count == masked.sum() and total.item() == pytest.approx(per[masked].sum().item(), rel=1e-5)


def test_token_ids_mask_class_and_null_never_collide():
    model = tiny_model(codes=8, classes=3)
    assert model.mask_id == 8 and model.tok_emb.num_embeddings == 8 + 1 + 3 + 1
    classes = model.class_token(torch.arange(4))  # 3 classes + the null class (index num_classes)
    assert classes.tolist() == [9, 10, 11, 12] and classes.max() == model.tok_emb.num_embeddings - 1
    labels = torch.tensor([0, 1, 2, 1])
    assert torch.equal(gm.drop_labels(labels, 0.0, 3), labels)
    assert torch.equal(gm.drop_labels(labels, 1.0 - 1e-9, 3), torch.full((4,), 3))
    dropped = gm.drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, 3, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3} and (dropped == 3).float().mean() == pytest.approx(0.1, abs=0.01)
    # the head scores codes only: the sampler can never draw [MASK] or a class token
    logits = model(torch.full((2, 16), model.mask_id), torch.tensor([0, 3]))
    assert logits.shape == (2, 16, 8)


def test_official_initialisation_and_weight_decay_groups():
    model = gm.MaskGITTransformer(8, 3, 16, depth=2, width=64, heads=4, mlp_dim=128)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * 2 + 1  # embeddings, two per block, MLM head
    assert all(torch.equal(m.weight, torch.ones(64)) and not m.bias.any() and m.eps == 1e-12 for m in norms)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    assert all(p.abs().max() <= 0.04 for p in matrices)
    flat = torch.cat([p.flatten() for p in matrices])
    assert flat.std().item() == pytest.approx(0.02 * 0.88, rel=0.05)  # a normal cut at 2 std keeps 0.88 of it
    assert not any(p.any() for n, p in model.named_parameters() if p.dim() == 1 and "norm" not in n
                   and "head.2" not in n)  # biases start at zero
    opt = gm.build_optimizer(model, gm.build_parser().parse_args(["--tokenizer", "x"]))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.045 and plain["weight_decay"] == 0.0
    assert sum(p.numel() for p in decayed["params"]) == sum(p.numel() for p in matrices)
    assert opt.defaults["betas"] == (0.9, 0.96)


# ---- parallel decoding --------------------------------------------------------------------------

def test_decoding_schedule_matches_the_official_formula():
    n, t_steps = 64, 8
    counts = gm.masked_after_steps(n, t_steps)
    official = [math.floor(n * math.cos(math.pi / 2 * (t + 1) / t_steps)) for t in range(t_steps - 1)]
    assert counts[:-1] == official and counts[-1] == 0  # no clamping needed at N=64, T=8
    assert gm.masked_after_steps(4, 4) == [3, 2, 1, 0]  # clamped: one revealed per step at least
    assert gm.masked_after_steps(5, 1) == [0]
    with pytest.raises(UserError, match="--steps 17 exceeds the 16 tokens"):
        gm.masked_after_steps(16, 17)


def test_decoding_never_changes_a_fixed_token_and_leaves_no_mask():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 0, 1])
    history = []
    out = gm.sample_tokens(model, labels, steps=6, generator=torch.Generator().manual_seed(1), history=history)
    expected_masked = gm.masked_after_steps(16, 6)
    assert len(history) == 6 and torch.equal(history[-1], out)
    assert [int((h == model.mask_id).sum(1).unique().item()) for h in history] == expected_masked
    before = torch.full_like(out, model.mask_id)
    for step in history:
        fixed = before != model.mask_id
        assert torch.equal(step[fixed], before[fixed])  # revealed tokens stay as they are
        before = step
    assert out.shape == (5, 16) and out.dtype == torch.long and out.min() >= 0 and out.max() < 8


def test_classifier_free_guidance_zero_is_the_conditional_model():
    model = tiny_model()
    with torch.no_grad():  # large weights: at the 0.02 init the class barely moves the draws
        for p in model.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    idx = torch.randint(0, 9, (4, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 2])
    cond = model(idx, labels)
    uncond = model(idx, torch.full_like(labels, 3))
    assert torch.equal(gm.guided_logits(model, idx, labels, 0.0), cond)
    assert torch.allclose(gm.guided_logits(model, idx, labels, 2.0), cond + 2.0 * (cond - uncond), atol=1e-5)
    draws = [gm.sample_tokens(model, labels, 4, torch.Generator().manual_seed(3), cfg_scale=w) for w in (0.0, 0.0, 3.0)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_one_random_stream_gives_distinct_batches():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 1, 1])
    first, second = gm.sample_tokens(model, labels, 4, gen), gm.sample_tokens(model, labels, 4, gen)
    assert not torch.equal(first, second)  # the same seed per batch would repeat the images


def test_a_two_layer_model_overfits_two_class_patterns():
    """Each class is one fixed 4x4 grid of 8 codes: a trained model samples exactly that grid."""
    torch.manual_seed(0)
    patterns = torch.randint(0, 8, (2, 16))
    tokens, labels = patterns.repeat(8, 1), torch.arange(2).repeat(8)
    model = tiny_model(codes=8, classes=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        masked = gm.random_mask(16, 16)
        total, count = gm.token_loss_sum(model(tokens.masked_fill(masked, model.mask_id), labels), tokens, masked,
                                         label_smoothing=0.0)
        opt.zero_grad()
        (total / count).backward()
        opt.step()
    model.eval()
    assert (total / count).item() < 0.05
    out = gm.sample_tokens(model, torch.tensor([0, 1, 0, 1]), 4, torch.Generator().manual_seed(0))
    assert torch.equal(out, patterns[[0, 1, 0, 1]])


# ---- the script on the tokenizer fixture --------------------------------------------------------

def run_generator(tokenizer_runs, out, *extra):
    args = gm.build_parser().parse_args(["--tokenizer", tokenizer_runs["vq"].checkpoint, "--out", str(out)] + TINY
                                        + list(extra))
    return gm.main(args), args


def test_run_writes_samples_checkpoints_and_the_json(tokenizer_runs, tmp_path):
    metrics, args = run_generator(tokenizer_runs, tmp_path, "--epochs", "2")
    name = "maskgit_vq"
    with open(tmp_path / f"{name}.json") as f:
        record = json.load(f)
    assert record["experiment"] == "generator_maskgit" and record["method"] == "maskgit_baseline"
    # paths relative to the JSON's folder, so that a clone of the results can follow them
    assert record["tokenizer"]["checkpoint"] == os.path.relpath(tokenizer_runs["vq"].checkpoint, tmp_path)
    assert common.result_path(tmp_path / f"{name}.json", record["args"]["tokenizer"]) == tokenizer_runs["vq"].checkpoint
    assert record["checkpoint"] == os.path.join(name, "best.pt") and record["args"]["out"] == "."
    assert record["tokenizer"]["deferred"] is False and record["tokenizer"]["quantizer"] == "vq"
    assert record["sampling"]["steps"] == 4 and record["sampling"]["num_samples"] == 6
    assert record["eval_split"] == "test" and record["data_range"] == 1.0 and "gfid" in record["notes"]
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert record["metrics"]["val_loss"] == min(h["val_loss"] for h in record["history"])
    saved = torch.load(tmp_path / name / "samples_tokens.pt", weights_only=True)
    assert saved["tokens"].shape == (6, 8, 8) and saved["tokens"].min() >= 0 and saved["tokens"].max() < 16
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2]  # class-balanced
    files = sorted(os.listdir(tmp_path / name / "samples"))
    assert len(files) == 6 and files[0] == "00000_class0.png"
    assert (tmp_path / record["grid"]).exists() and (tmp_path / record["samples"]).is_dir()
    assert metrics["pixel_diversity"] > 0 and 1 <= metrics["token_used_codes"] <= 16
    # validation loss: fixed masks, label dropout and dropout off -> the same value on every call
    dumps = gm.load_inputs(args)[1:]
    model = gm.build_generator(args, dumps[0])
    model.load_state_dict(torch.load(tmp_path / name / "best.pt", weights_only=True)["model"])
    info = common.setup_distributed("cpu")
    args.label_dropout = 0.9
    assert gm.validation_loss(model, dumps[1], args, info) == pytest.approx(record["metrics"]["val_loss"], rel=1e-6)
    import evaluate  # the JSON renders in its paper table (the fixture's split scheme is imagenet100)
    table = evaluate.render_generator_table(evaluate.load_results(str(tmp_path)), "Table 4")
    cells = next(line for line in table.splitlines() if line.startswith("| MaskGIT ✗")).split(" | ")
    assert cells[4] == "–" and cells[6] == f"{metrics['pixel_diversity']:.2f}"  # g-FID skipped, pixel distance
    # sampling again from the checkpoint with other settings is a new run
    again, _ = run_generator(tokenizer_runs, tmp_path, "--sample-only", "--checkpoint", str(tmp_path / name / "best.pt"),
                             "--cfg-scale", "1.5", "--name", "cfg", "--depth", "3")
    with open(tmp_path / "cfg.json") as f:
        cfg_run = json.load(f)
    assert cfg_run["args"]["depth"] == 2 and cfg_run["sampling"]["cfg_scale"] == 1.5  # architecture of the checkpoint
    assert cfg_run["args"]["epochs"] == record["args"]["epochs"] != 300  # and the cap it trained under
    assert again["val_loss"] == record["metrics"]["val_loss"]
    with pytest.raises(UserError, match="exists"):  # nothing is overwritten without --resume
        run_generator(tokenizer_runs, tmp_path, "--epochs", "2")


class Killed(BaseException):
    """Stands for a kill -9 in the middle of writing a checkpoint."""


def test_resume_after_a_kill_reaches_the_same_result(tokenizer_runs, tmp_path, monkeypatch):
    run_generator(tokenizer_runs, tmp_path / "straight", "--epochs", "3", "--sample", "0")
    straight = torch.load(tmp_path / "straight" / "maskgit_vq" / "last.pt", weights_only=True)

    real_save, writes = common.save_checkpoint, []

    def killing_save(path, **state):
        writes.append(os.path.basename(path))
        if writes.count("last.pt") == 2:  # epoch 1's last.pt: a partial temporary file, then death
            (tmp_path / "killed" / "maskgit_vq" / ".last.pt.abc.tmp").write_bytes(b"partial")
            raise Killed()
        real_save(path, **state)

    monkeypatch.setattr(common, "save_checkpoint", killing_save)
    with pytest.raises(Killed):
        run_generator(tokenizer_runs, tmp_path / "killed", "--epochs", "3", "--sample", "0")
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "killed" / "maskgit_vq" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(UserError, match="other settings"):
        run_generator(tokenizer_runs, tmp_path / "killed", "--epochs", "3", "--sample", "0", "--resume", "--lr", "1e-3")
    run_generator(tokenizer_runs, tmp_path / "killed", "--epochs", "3", "--sample", "0", "--resume")
    resumed = torch.load(tmp_path / "killed" / "maskgit_vq" / "last.pt", weights_only=True)
    assert not common.temporary_files_of(tmp_path / "killed" / "maskgit_vq" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 3
    assert [h["val_loss"] for h in resumed["state"]["history"]] == [h["val_loss"] for h in straight["state"]["history"]]
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_two_torchrun_ranks_train_and_validate_on_the_whole_split(tokenizer_runs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "generator_maskgit.py"), "--tokenizer", tokenizer_runs["vq"].checkpoint,
           "--out", str(tmp_path), "--epochs", "2", "--name", "ddp"] + TINY
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "ddp.json") as f:
        record = json.load(f)
    assert record["metrics"]["num_samples"] == 6 and len(record["history"]) == 2
    # the all-reduced validation loss equals one process's loss over the whole validation dump
    args = gm.build_parser().parse_args(["--tokenizer", tokenizer_runs["vq"].checkpoint] + TINY)
    _, train_dump, val_dump = gm.load_inputs(args)
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    model = gm.build_generator(ckpt["args"], train_dump)
    model.load_state_dict(ckpt["model"])
    single = gm.validation_loss(model, val_dump, args, common.setup_distributed("cpu"))
    assert single == pytest.approx(record["history"][-1]["val_loss"], rel=1e-5)


# ---- errors -------------------------------------------------------------------------------------

def test_missing_tokenizer_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "generator_maskgit.py"), "--tokenizer", str(tmp_path / "nope.pt"),
           "--out", str(tmp_path / "o")] + TINY
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no such checkpoint" in proc.stderr and "nope.pt" in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_bad_inputs_fail_before_training(tokenizer_runs, tmp_path):
    vq, msvq = tokenizer_runs["vq"], tokenizer_runs["msvq"]
    cases = [
        (["--tokenizer", vq.checkpoint, "--tokens-dir", str(tmp_path)], "token dump not found.*tokens_train.pt"),
        (["--tokenizer", msvq.checkpoint], "multi-scale"),
        (["--tokenizer", vq.checkpoint, "--tokens-dir", os.path.dirname(msvq.checkpoint)], "msvq tokens"),
        (["--tokenizer", vq.checkpoint, "--steps", "65"], "--steps 65 exceeds the 64 tokens"),
        (["--tokenizer", vq.checkpoint, "--width", "33"], "divisible by --heads"),
        (["--tokenizer", vq.checkpoint, "--sample-only"], "needs --checkpoint"),
        (["--tokenizer", vq.checkpoint, "--sample-only", "--checkpoint", vq.checkpoint], "not a generator_maskgit"),
        (["--tokenizer", vq.checkpoint, "--per-class", "50000"], r"--per-class must be \[1, 32\]"),  # a 2 GB grid
    ]
    for extra, pattern in cases:
        args = gm.build_parser().parse_args(["--out", str(tmp_path / "o")] + TINY + extra)
        with pytest.raises(UserError, match=pattern):
            gm.main(args)
    assert not os.path.exists(tmp_path / "o")
    # a Continuous-Phase tokenizer has no tokens
    ckpt = torch.load(vq.checkpoint, weights_only=True)
    ckpt["model"]["quantizer.enabled"] = torch.tensor(False)
    os.makedirs(tmp_path / "cont")
    torch.save(ckpt, tmp_path / "cont" / "best.pt")
    args = gm.build_parser().parse_args(["--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "cont" / "best.pt"),
                                         "--tokens-dir", os.path.dirname(vq.checkpoint)] + TINY)
    with pytest.raises(UserError, match="Continuous Phase"):
        gm.main(args)


def test_resume_without_best_pt_says_what_is_missing(tokenizer_runs, tmp_path):
    """best.pt (the sampled, reported model) gone beside last.pt: --resume names it at start,
    instead of training nothing and asking for more --epochs."""
    run_generator(tokenizer_runs, tmp_path, "--epochs", "1", "--sample", "0")
    os.remove(tmp_path / "maskgit_vq" / "best.pt")
    with pytest.raises(UserError, match=r"--resume: .*best\.pt \(the reported model\) is missing beside .*last\.pt"):
        run_generator(tokenizer_runs, tmp_path, "--epochs", "1", "--sample", "0", "--resume")
