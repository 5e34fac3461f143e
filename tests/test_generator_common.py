"""common.py section 7, what the generator scripts share: frozen tokenizer and token-dump loading
with their one-line errors, epoch batches across ranks, warm-up and plateau schedule, class-balanced
labels, sample files and grids, and the sample metrics' provenance."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import UserError
from generator_fixture import write_token_dump


# ---- frozen tokenizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", ["vq", "msvq"])
def test_frozen_tokenizer_decodes_its_dump_like_the_training_script(tokenizer_runs, quantizer, monkeypatch):
    run = tokenizer_runs[quantizer]
    model, cfg = common.load_tokenizer(run.checkpoint)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert cfg["quantizer"] == quantizer and model.quantizer.is_enabled
    dump = common.load_token_dump(run.tokens["val"])
    val = common.SplitImageDataset(run.data_dir, common.load_split(run.split_file), "val", 32)
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        recon, _, _ = model(x)
        decoded = model.decode_indices(dump.maps(dump.tokens_NL))
    assert torch.allclose(decoded, recon, atol=1e-4)
    assert torch.equal(dump.labels, torch.tensor([val[i][1] for i in range(len(val))]))
    test = common.tokenizer_test_split(cfg)  # the g-FID reference: the tokenizer's own test split
    assert len(test) == 6 and test.items == common.load_split(run.split_file)["test"]
    # its Inception statistics are cached under a name that changes with the folder, the size and
    # the Inception weights
    monkeypatch.setattr(common, "inception_weights_digest", lambda: "a" * 64)
    name = common.tokenizer_test_cache_name(cfg)
    assert name.startswith("dq-test-") and name == common.tokenizer_test_cache_name(dict(cfg))
    assert name != common.tokenizer_test_cache_name(dict(cfg, resolution=64))
    assert name != common.tokenizer_test_cache_name(cfg, data_dir="/elsewhere")
    # --fid-images N: a class-stratified subset of N test images, cached under a name of their own
    four = common.tokenizer_test_split(cfg, limit=4)
    chosen, record = common.tokenizer_test_subset(cfg, limit=4)
    assert len(four) == 4 and all(torch.equal(four[i][0], test[j][0]) for i, j in enumerate(chosen))
    assert sorted({test.items[j][1] for j in chosen}) == [0, 1, 2]  # every class (the first 4 hold two)
    assert record["indices"] == chosen and sum(record["per_class"].values()) == 4 and record["of"] == 6
    assert len(common.tokenizer_test_split(cfg, limit=100)) == 6
    assert common.tokenizer_test_cache_name(cfg, limit=4) not in (name, common.tokenizer_test_cache_name(cfg, limit=5))
    assert common.tokenizer_test_cache_name(cfg, limit=0) == name
    monkeypatch.setattr(common, "inception_weights_digest", lambda: "b" * 64)
    assert common.tokenizer_test_cache_name(cfg) != name
    ident = common.tokenizer_identity(cfg, run.checkpoint)
    assert ident["deferred"] is False and ident["gan"] is False and ident["quantizer"] == quantizer
    assert ident["codebook_size"] == 16 and ident["checkpoint"] == os.path.abspath(run.checkpoint)


def test_augmented_views_of_a_split_plain_first_then_corner_crops_and_mirrors(tokenizer_runs):
    split = common.load_split(tokenizer_runs["vq"].split_file)
    ds = common.SplitImageDataset(tokenizer_runs["vq"].data_dir, split, "train", 32)
    views, label = ds.views(3)
    assert views.shape == (len(common.VIEW_NAMES), 3, 32, 32) == (10, 3, 32, 32) and label == ds[3][1]
    assert torch.equal(views[0], ds[3][0])  # view 0: the image as the tokenizer evaluates it
    assert all(torch.equal(views[2 * k + 1], views[2 * k].flip(-1)) for k in range(5))  # each crop, then its mirror
    big = common.SplitImageDataset._square(common.read_rgb(os.path.join(ds.root, ds.items[3][0])), 36)
    assert common.enlarged_size(32) == 36
    assert torch.equal(views[2], big[:, :32, :32]) and torch.equal(views[8], big[:, 4:, 4:])  # top-left, bottom-right
    assert len({v.numpy().tobytes() for v in views}) == 10


def test_token_dump_of_the_training_split_holds_ten_views_the_plain_one_first(tokenizer_runs):
    """imagenet_tokenizer.py --dump-tokens train writes the tokens of every augmented view; view 0
    is what a plain dump held, view 1 the tokens of the mirror image; validation dumps stay plain."""
    run = tokenizer_runs["vq"]
    dump, val = common.load_token_dump(run.tokens["train"]), common.load_token_dump(run.tokens["val"])
    assert dump.num_views == 10 and dump.record["view_names"] == list(common.VIEW_NAMES) and val.num_views == 1
    model, _ = common.load_tokenizer(run.checkpoint)
    train = common.SplitImageDataset(run.data_dir, common.load_split(run.split_file), "train", 32)
    x = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        plain = model.quantizer(model.encode(x))[1].flatten(1)
        mirror = model.quantizer(model.encode(x.flip(-1)))[1].flatten(1)
    assert torch.equal(dump.tokens_NL, plain) and torch.equal(dump.batch(torch.arange(len(dump))), plain)
    rows = torch.tensor([0, 5, 7])
    assert torch.equal(dump.batch(rows, torch.tensor([1, 1, 1])), mirror[rows])
    assert torch.equal(dump.batch(rows, torch.tensor([0, 1, 0])), torch.stack([plain[0], mirror[5], plain[7]]))


def test_each_epoch_draws_one_view_per_image_from_the_seed():
    import argparse
    a, b = common.epoch_views(500, 10, seed=0, epoch=0), common.epoch_views(500, 10, seed=0, epoch=1)
    assert torch.equal(a, common.epoch_views(500, 10, seed=0, epoch=0))  # deterministic: --resume, every rank
    assert not torch.equal(a, b) and not torch.equal(a, common.epoch_views(500, 10, seed=1, epoch=0))
    assert a.min() == 0 and a.max() == 9 and torch.bincount(a).min() > 25  # uniform over the 10 views
    assert torch.equal(common.epoch_views(7, 1, 0, 3), torch.zeros(7, dtype=torch.long))
    dump = common.TokenDump("x", torch.zeros(500, 4, dtype=torch.long), torch.zeros(500, dtype=torch.long), "vq", (2,),
                            8, 1, {}, views_NVL=torch.zeros(500, 10, 4, dtype=torch.int16))
    args = argparse.Namespace(no_augment=False, seed=0)
    assert torch.equal(common.training_views(args, dump, 1), b)
    assert common.training_views(argparse.Namespace(no_augment=True, seed=0), dump, 1) is None
    assert common.augmentation_record(args, dump)["views_per_image"] == 10


def test_tokenizer_errors_are_one_line(tokenizer_runs, tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        common.load_tokenizer(tmp_path / "absent.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a tokenizer checkpoint"):
        common.load_tokenizer(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        common.load_tokenizer(tmp_path / "text.pt")
    ckpt = torch.load(tokenizer_runs["vq"].checkpoint, weights_only=True)
    ckpt["model"]["quantizer.enabled"] = torch.tensor(False)
    torch.save(ckpt, tmp_path / "continuous.pt")
    with pytest.raises(UserError, match="Continuous Phase"):
        common.load_tokenizer(tmp_path / "continuous.pt")
    ckpt = torch.load(tokenizer_runs["vq"].checkpoint, weights_only=True)
    ckpt["args"]["codebook_size"] = 32
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="do not fit"):
        common.load_tokenizer(tmp_path / "mismatch.pt")


# ---- token dumps --------------------------------------------------------------------------------

def test_token_dumps_of_both_quantizers(tokenizer_runs):
    vq = common.load_token_dump(tokenizer_runs["vq"].tokens["train"])
    raw = torch.load(tokenizer_runs["vq"].tokens["train"], weights_only=True)
    assert raw["tokens"].dtype == torch.int16 and vq.tokens_NL.dtype == torch.int64
    assert vq.tokens_NL.shape == (18, 64) and vq.scales == (8,) and vq.num_classes == 3 and len(vq) == 18
    assert torch.equal(vq.maps(vq.tokens_NL), raw["tokens"][:, 0].long())  # view 0 of the augmented dump
    ms_train = common.load_token_dump(tokenizer_runs["msvq"].tokens["train"])
    raw_ms = torch.load(tokenizer_runs["msvq"].tokens["train"], weights_only=False)["tokens"]
    assert ms_train.views_NVL.shape == (18, 10, 85) and ms_train.views_NVL.dtype == torch.int16
    assert torch.equal(ms_train.views_NVL[:, 3, 1:5], raw_ms[1][:, 3].reshape(18, 4))  # view 3, the 2x2 scale
    ms = common.load_token_dump(tokenizer_runs["msvq"].tokens["val"])
    assert ms.scales == (1, 2, 4, 8) and ms.tokens_NL.shape == (6, 1 + 4 + 16 + 64)
    raw = torch.load(tokenizer_runs["msvq"].tokens["val"], weights_only=True)
    assert all(torch.equal(a, b.long()) for a, b in zip(ms.maps(ms.tokens_NL), raw["tokens"]))
    # VAR's idx_BL layout: scale 1 first, then 2x2 in raster order, ...
    assert torch.equal(ms.tokens_NL[:, 1:5], raw["tokens"][1].reshape(6, 4).long())
    tokens, label = ms[2]
    assert torch.equal(tokens, ms.tokens_NL[2]) and label == ms.labels[2]


def test_token_dump_errors_are_one_line(tmp_path, tokenizer_runs):
    good = torch.randint(0, 8, (5, 4, 4))
    labels = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(UserError, match="token dump not found.*--dump-tokens"):
        common.load_token_dump(tmp_path / "absent.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a token dump"):
        common.load_token_dump(tmp_path / "foreign.pt")
    cases = [
        (dict(tokens=good.clone().index_fill_(0, torch.tensor([1]), 8)), r"ids must lie in \[0, 8\), found 0..8"),
        (dict(labels=torch.tensor([0, 1, 2, 0, 3]), num_classes=3), r"labels must lie in \[0, 3\)"),
        (dict(labels=torch.tensor([0, 1, 2])), "one label per image"),
        (dict(tokens=torch.randint(0, 8, (5, 4, 3))), "one label per image"),
        (dict(tokens=[torch.randint(0, 8, (5, s, s)) for s in (1, 2)], quantizer="msvq", scales=[1, 3]),
         "scales"),
    ]
    for i, (change, pattern) in enumerate(cases):
        kw = dict(tokens=good, labels=labels, codebook_size=8)
        kw.update(change)
        path = write_token_dump(tmp_path / f"bad{i}.pt", **kw)
        with pytest.raises(UserError, match=pattern):
            common.load_token_dump(path)
    ok = common.load_token_dump(write_token_dump(tmp_path / "ok.pt", good, labels, 8, num_classes=4))
    assert ok.num_classes == 4  # recorded count wins over the labels seen
    other = common.load_token_dump(write_token_dump(tmp_path / "k9.pt", good, labels, 9, num_classes=4))
    with pytest.raises(UserError, match="different tokenizers"):
        common.check_dumps_match([ok, other], {"quantizer": "vq", "codebook_size": 8}, "tok.pt")
    with pytest.raises(UserError, match="msvq tokenizer with 16 codes"):
        common.check_dumps_match([ok], {"quantizer": "msvq", "codebook_size": 16}, "tok.pt")


# ---- batches, schedules, labels -----------------------------------------------------------------

def test_epoch_batches_split_each_global_batch_over_ranks():
    one = common.epoch_batches(23, 6, seed=1, epoch=3)
    two = [common.epoch_batches(23, 6, seed=1, epoch=3, rank=r, world_size=2) for r in range(2)]
    assert len(one) == 3 and all(b.numel() == 6 for b in one)  # 23 // 6, incomplete batch dropped
    for b, b0, b1 in zip(one, *two):
        assert torch.equal(b, torch.cat([b0, b1]))
    assert not torch.equal(one[0], common.epoch_batches(23, 6, seed=1, epoch=4)[0])  # reshuffled per epoch
    evaluation = [common.epoch_batches(23, 6, 1, 0, r, 2, shuffle=False) for r in range(2)]
    assert sorted(torch.cat([torch.cat(e) for e in evaluation]).tolist()) == list(range(23))
    with pytest.raises(UserError, match="divisible"):
        common.epoch_batches(23, 5, 0, 0, 0, 2)


def test_plateau_schedule_follows_torch_and_stops_early():
    losses = [1, .9, .95, .96, .97, .99, .89, .9, .91, .92, .93, .94, .95, .96, .97, .98, .99, 1, 1, 1]
    ours = common.PlateauSchedule(1.0, factor=0.5, patience=2, min_lr=0.1, stop_patience=3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, min_lr=0.1)
    best, stopped_at = [], None
    for i, loss in enumerate(losses):
        best.append(ours.step(loss))
        ref.step(loss)
        assert ours.lr == pytest.approx(opt.param_groups[0]["lr"]), i
        if ours.stopped and stopped_at is None:
            stopped_at = i
    assert [i for i, b in enumerate(best) if b] == [0, 1, 6]
    tiny = common.PlateauSchedule(1.0, threshold=0.1)
    assert [tiny.step(v) for v in (1.0, 0.95, 0.99)] == [True, True, False]  # best.pt: any decrease
    assert tiny.bad == 2  # ... while the plateau counts only decreases beyond the threshold
    # lr reaches 0.1 at validation 15; 3 more validations without improvement at the minimum
    assert stopped_at == 18
    again = common.PlateauSchedule(1.0)
    again.load_state_dict(ours.state_dict())
    assert again.state_dict() == ours.state_dict()
    assert [common.warmup_factor(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert common.warmup_factor(0, 0) == 1.0


def test_warm_up_is_counted_in_epochs_and_the_plateau_waits_for_its_end():
    """ODIR's ~4,701 training images (issue 17 item 3): MaskGIT's batch 256 makes 18 steps per
    epoch, VAR's 768 makes 6; one / four epochs of warm-up instead of 5,000 / 500 steps that lasted
    ~278 of 300 / 83 of 200 epochs. --warmup-steps still sets steps. Validations inside the
    warm-up never lower the lr."""
    import argparse
    args = argparse.Namespace(batch_size=256, warmup_epochs=1.0, warmup_steps=None, plateau_patience=5, patience=10)
    plan = common.generator_schedule(args, 4701)
    assert (plan["steps_per_epoch"], plan["warmup_steps"], plan["warmup_epochs"]) == (18, 18, 1.0)
    assert plan["plateau_patience_epochs"] == 5 and plan["patience_epochs"] == 10
    var = common.generator_schedule(argparse.Namespace(**dict(vars(args), batch_size=768, warmup_epochs=4.0)), 4701)
    assert (var["steps_per_epoch"], var["warmup_steps"]) == (6, 24)
    assert common.generator_schedule(argparse.Namespace(**dict(vars(args), warmup_steps=200)), 4701)["warmup_steps"] == 200
    sched = common.PlateauSchedule(1.0, patience=1)
    for loss in (1.0, 1.1, 1.2, 1.3):  # worse and worse, but still warming up
        sched.step(loss, counting=False)
    assert sched.lr == 1.0 and sched.bad == 0 and sched.best == 1.0
    sched.step(1.4)
    sched.step(1.5)
    assert sched.lr == 0.5  # counted after the warm-up: patience 1 exceeded


def test_fid_subset_is_class_stratified_seeded_and_keys_the_cache():
    """A budget of 20 images over classes of 50, 3, 20 and 7 items listed class by class (as an
    ImageFolder part): every class its equal share (5) unless it holds fewer (3), the 2 left over to
    two other classes; the first 20 items (the old rule) would all be class 0."""
    sizes = (50, 3, 20, 7)
    items = [[f"c{c}/{i:03d}.png", c] for c, n in enumerate(sizes) for i in range(n)]
    chosen = common.fid_subset(items, 20)
    counts = [sum(items[i][1] == c for i in chosen) for c in range(4)]
    assert len(chosen) == len(set(chosen)) == 20 and chosen == sorted(chosen)
    assert counts[1] == 3 and sorted(counts[i] for i in (0, 2, 3)) == [5, 6, 6]
    assert chosen == common.fid_subset(items, 20)  # deterministic
    assert any(common.fid_subset(items, 20, seed=s) != chosen for s in range(1, 6))  # the seed draws the images
    assert common.fid_subset(items, 0) is None and common.fid_subset(items, 80) is None
    record = common.fid_subset_record(items, chosen)
    assert record["per_class"] == {str(c): n for c, n in enumerate(counts)} and record["images"] == 20
    assert record["indices"] == chosen and record["of"] == 80


def test_odir_samples_follow_the_test_split_elsewhere_classes_are_balanced(tmp_path):
    """Appendix A.1, "For the ODIR dataset, we use the full original test set": on an odir split the
    default is one sample per test image with its label (its size and class mix); --sample N keeps
    that mix; another scheme gets DEFAULT_SAMPLES class-balanced labels."""
    root = tmp_path / "odir"
    for c, n in enumerate((14, 4, 2)):  # imbalanced classes, as ODIR's
        os.makedirs(root / f"c{c}")
        for i in range(n):
            Image.new("RGB", (8, 8)).save(root / f"c{c}" / f"{i}.png")
    split = common.make_split(str(root), "odir", 0, out_path=str(tmp_path / "split.json"))
    cfg = {"scheme": "odir", "split_file": str(tmp_path / "split.json")}
    test = sorted(label for _, label in split["test"])
    labels, how = common.sample_labels(cfg, None, 3)
    assert labels.tolist() == test and len(test) == 4 and "test split" in how
    doubled, _ = common.sample_labels(cfg, 8, 3)
    assert doubled.tolist() == sorted(test * 2)  # the same class mix at another count
    balanced, how = common.sample_labels({"scheme": "imagenet100"}, None, 7)
    assert len(balanced) == common.DEFAULT_SAMPLES and how == "class-balanced"
    assert torch.equal(balanced, common.balanced_labels(common.DEFAULT_SAMPLES, 7))


@pytest.mark.parametrize("n, classes", [(10, 10), (23, 10), (7, 3), (5, 8)])
def test_balanced_labels(n, classes):
    labels = common.balanced_labels(n, classes)
    counts = torch.bincount(labels, minlength=classes)
    assert labels.shape == (n,) and counts.max() - counts.min() <= 1 and counts.sum() == n
    assert torch.equal(labels, labels.sort().values)
    with pytest.raises(UserError, match="need at least one sample and one class"):
        common.balanced_labels(0, 3)


# ---- samples on disk and their metrics ----------------------------------------------------------

def test_sample_files_and_class_rows_grid(tmp_path):
    labels = torch.tensor([0, 0, 0, 2, 2])
    images = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)])  # grayscale
    common.write_samples(tmp_path / "s", images, labels, tmp_path / "grid.png", per_class=2)
    files = sorted(os.listdir(tmp_path / "s"))
    assert files == ["00000_class0.png", "00001_class0.png", "00002_class0.png", "00003_class2.png",
                     "00004_class2.png"]
    assert np.asarray(Image.open(tmp_path / "s" / files[3])).max() == round(0.75 * 255)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4, 2 * 4, 3)  # 2 classes present -> 2 rows; 2 columns
    assert grid[0, 0, 0] == 0 and grid[0, 4, 0] == round(0.25 * 255)  # class 0: first two samples
    assert grid[4, 0, 0] == round(0.75 * 255) and grid[4, 4, 0] == 255


def test_sample_metrics_record_their_provenance(monkeypatch):
    seen = {}

    def fake_fidelity(generated, reference, fid=True, prc=False, device=None, **cache):
        seen["shapes"] = (tuple(generated.shape), len(reference))
        seen["cache"] = cache
        return dict({"fid": 12.5} if fid else {}, **({"precision": 0.5, "recall": 0.25} if prc else {}))

    def fake_lpips(images, model, max_pairs=None, generator=None):
        seen["lpips"] = (images.shape[1], max_pairs)
        return 0.5

    monkeypatch.setattr(common, "fidelity_metrics", fake_fidelity)
    monkeypatch.setattr(common, "lpips_diversity", fake_lpips)
    images = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = [(torch.rand(3, 32, 32), 0) for _ in range(7)]
    metrics, prov = common.sample_metrics(images, reference, prc=True, lpips_model=object(), lpips_pairs=4)
    assert metrics == {"num_samples": 5, "pixel_diversity": pytest.approx(common.pixel_diversity(images)),
                       "gfid": 12.5, "precision": 0.5, "recall": 0.25, "lpips_diversity": 0.5}
    assert seen["shapes"] == ((5, 3, 32, 32), 7) and seen["lpips"] == (3, 4)  # grayscale -> RGB
    assert prov == {"eval_split": "test", "data_range": 1.0, "pixel_scale": 1.0,
                    "fid_reference": "test split, 7 images", "lpips_pairs": 4}
    assert seen["cache"] == {}
    common.sample_metrics(images, reference, reference_cache="dq-test-abc")
    assert seen["cache"] == {"cache": True, "input2_cache_name": "dq-test-abc"}  # torch-fidelity's own cache
    metrics, prov = common.sample_metrics(images, reference, fid=False)
    assert set(metrics) == {"num_samples", "pixel_diversity"} and prov["fid_reference"] is None
    with pytest.raises(UserError, match="at least 31x31"):  # AlexNet has no feature map left below that
        common.sample_metrics(images[..., :30, :], reference, fid=False, lpips_model=object())


def test_real_anchor_takes_the_samples_class_mix_from_the_reference():
    reference_labels = [0] * 5 + [1] * 2 + [2] * 4 + [3] * 3
    samples = [0, 0, 0, 1, 1, 1, 2]  # class 1: more samples than reference images; class 3: none
    chosen = common.real_anchor_indices(reference_labels, samples, seed=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
    assert [reference_labels[i] for i in chosen] == [0, 0, 0, 1, 1, 2]  # 3 of class 0, all 2 of class 1, 1 of 2
    assert chosen == common.real_anchor_indices(reference_labels, samples, seed=0)  # seeded
    draws = {tuple(common.real_anchor_indices(reference_labels, samples, seed=s)) for s in range(20)}
    assert len(draws) > 1  # another sampling seed draws other images inside a class


def test_sample_metrics_score_real_images_beside_the_samples(monkeypatch):
    seen = []
    monkeypatch.setattr(common, "fidelity_metrics", lambda *a, **k: {"fid": 1.0})
    monkeypatch.setattr(common, "lpips_diversity",
                        lambda images, model, max_pairs=None, generator=None: seen.append(images) or 0.25)
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(10, 1, 32, 32, generator=g)
    reference = [(grey[i].expand(3, -1, -1), i % 2) for i in range(10)]  # RGB items repeating a grey channel
    samples = torch.rand(4, 1, 32, 32, generator=g)
    labels = torch.tensor([0, 0, 1, 1])
    metrics, prov = common.sample_metrics(samples, reference, reference_labels=[i % 2 for i in range(10)],
                                          sample_labels=labels, lpips_model=object(), seed=3)
    chosen = common.real_anchor_indices([i % 2 for i in range(10)], labels, 3)
    assert len(chosen) == 4 and metrics["real_lpips_diversity"] == 0.25
    # independent: the mean L2 distance over the pairs of the chosen grey images, as for the grey samples
    assert metrics["real_pixel_diversity"] == pytest.approx(torch.pdist(grey[chosen].flatten(1)).mean().item(), rel=1e-5)
    assert metrics["pixel_diversity"] == pytest.approx(torch.pdist(samples.flatten(1)).mean().item(), rel=1e-5)
    assert torch.allclose(seen[1], grey[chosen].expand(-1, 3, -1, -1))  # LPIPS sees the anchor in RGB
    assert "4 images of the g-FID reference" in prov["real_anchor"] and "seed 3" in prov["real_anchor"]
    metrics, prov = common.sample_metrics(samples, reference, lpips_model=object())  # no labels: no anchor
    assert "real_pixel_diversity" not in metrics and "real_anchor" not in prov


def test_generate_images_decodes_each_batch(tokenizer_runs):
    model, _ = common.load_tokenizer(tokenizer_runs["msvq"].checkpoint)
    dump = common.load_token_dump(tokenizer_runs["msvq"].tokens["val"])
    calls = []

    def sampler(labels_B):  # returns the dump's own tokens for the requested rows
        calls.append(labels_B.tolist())
        start = sum(len(c) for c in calls[:-1])
        return dump.tokens_NL[start:start + labels_B.shape[0]]

    images, tokens = common.generate_images(sampler, model, dump, dump.labels, batch_size=4,
                                            device="cpu", progress=False)
    assert calls == [dump.labels[:4].tolist(), dump.labels[4:].tolist()]
    assert torch.equal(tokens, dump.tokens_NL)
    with torch.no_grad():
        expected = model.decode_indices(dump.maps(dump.tokens_NL)).clamp(0, 1)
    assert images.shape == (6, 3, 32, 32) and torch.allclose(images, expected, atol=1e-6)


# ---- one command line, one life cycle for both generator scripts -----------------------------------

TINY_GENERATORS = {"vq": ("generator_maskgit", ["--depth", "1", "--width", "16", "--heads", "2", "--mlp-dim", "32",
                                                "--steps", "2"]),
                   "msvq": ("generator_var", ["--depth", "1", "--width", "16", "--heads", "2"])}


@pytest.mark.parametrize("quantizer", ["vq", "msvq"])
def test_both_generators_share_the_command_line_guidance_rule_and_json_provenance(tokenizer_runs, tmp_path, quantizer):
    import importlib
    import json

    module_name, arch = TINY_GENERATORS[quantizer]
    script = importlib.import_module(module_name)
    shared = ["--sample", "4", "--sample-batch-size", "3", "--per-class", "1", "--skip-fid", "--skip-lpips",
              "--batch-size", "6", "--warmup-steps", "1", "--device", "cpu"]

    def run(out, *extra):
        return script.main(script.build_parser().parse_args(
            ["--tokenizer", tokenizer_runs[quantizer].checkpoint, "--out", str(tmp_path / out)] + arch + shared
            + list(extra)))

    # the shared arguments have one meaning and one default in both scripts
    args = vars(script.build_parser().parse_args(["--tokenizer", "x"]))
    assert {k: args[k] for k in ("label_dropout", "min_lr", "plateau_factor", "plateau_patience", "patience", "seed",
                                 "sample", "sample_seed", "lpips_pairs", "per_class")} == \
        {"label_dropout": 0.1, "min_lr": 1e-6, "plateau_factor": 0.5, "plateau_patience": 5, "patience": 10, "seed": 0,
         "sample": None, "sample_seed": 0, "lpips_pairs": None, "per_class": 8}
    assert set(common.GENERATOR_RANGES) <= set(script.RANGES)
    # guidance needs the null class that only label dropout trains: refused before anything is written
    with pytest.raises(UserError, match="--cfg-scale > 0 needs .*--label-dropout > 0"):
        run("refused", "--label-dropout", "0", "--cfg-scale", "1")
    assert not os.path.exists(tmp_path / "refused")
    # a model trained without label dropout samples without guidance; the JSON says how and against what
    run("out", "--label-dropout", "0", "--cfg-scale", "0", "--epochs", "1", "--name", "plain")
    with open(tmp_path / "out" / "plain.json") as f:
        record = json.load(f)
    assert record["sampling"]["guidance"] == script.GUIDANCE and "c - u" in script.GUIDANCE
    assert record["eval_split"] == "test" and record["data_range"] == 1.0 and record["fid_reference"] is None
    assert record["metrics"]["best_epoch"] == 0 and len(record["history"]) == 1
    assert (record["schedule"]["steps_per_epoch"], record["schedule"]["warmup_steps"]) == (3, 1)  # 18 images / 6
    assert record["augmentation"]["views_per_image"] == 10  # the fixture's training dump is augmented
    # --sample-only adopts the checkpoint's --label-dropout 0: guidance is refused there too
    best = str(tmp_path / "out" / "plain" / "best.pt")
    with pytest.raises(UserError, match="--label-dropout > 0"):
        run("out", "--sample-only", "--checkpoint", best, "--cfg-scale", "1", "--name", "guided")
    assert not os.path.exists(tmp_path / "out" / "guided.json")
    # a batch larger than the 18 training images fails at start, for both scripts alike
    with pytest.raises(UserError, match="--batch-size 24 exceeds the 18 training images"):
        run("big", "--batch-size", "24")


# ---- Fashion-MNIST tokenizers: g-FID against their own (official) test split ---------------------

def test_generators_on_a_fashion_mnist_tokenizer_score_against_its_test_split(tmp_path, monkeypatch):
    """A tokenizer trained by imagenet_tokenizer.py --dataset fashion-mnist on tiny files in the real
    idx format, its dumps, then both generators: the dumps carry the class count, and g-FID compares
    the samples with exactly the tokenizer's test images (28x28 greyscale, replicated to 3 channels
    and zero-padded to 32), whose Inception statistics are cached under one name per split."""
    import json

    import generator_maskgit
    import generator_var
    import imagenet_tokenizer as tok
    from test_fashion_mnist import write_split as write_idx
    from test_imagenet_tokenizer import TINY, without_sizes

    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    for prefix, n in (("train", 40), ("t10k", 7)):
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(data, prefix, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), labels)
    test_images = torch.from_numpy(common.read_idx(str(data / "t10k-images-idx3-ubyte.gz"), "images").copy())
    runs, seen = tmp_path / "runs", []

    def fake_fidelity(generated, reference=None, fid=True, prc=False, device=None, **kwargs):
        seen.append((reference, kwargs.get("input2_cache_name")))
        return {"fid": 1.0}
    monkeypatch.setattr(common, "fidelity_metrics", fake_fidelity)
    monkeypatch.setattr(common, "inception_weights_path", lambda *a: "inception.pth")
    monkeypatch.setattr(common, "inception_weights_digest", lambda: "a" * 64)
    for quantizer, script in (("vq", generator_maskgit), ("msvq", generator_var)):
        base = ["--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(runs), "--quantizer", quantizer,
                "--name", quantizer] + without_sizes(TINY) + ["--val-size", "10"]
        tok.main(tok.build_parser().parse_args(base + ["--epochs", "1"]))
        for split in ("train", "val"):
            tok.main(tok.build_parser().parse_args(base + ["--dump-tokens", split,
                                                           "--checkpoint", str(runs / quantizer / "best.pt")]))
        assert torch.load(runs / quantizer / "tokens_val.pt", weights_only=True)["num_classes"] == 10
        script.main(script.build_parser().parse_args(
            ["--tokenizer", str(runs / quantizer / "best.pt"), "--out", str(tmp_path / "gen"), "--depth", "1",
             "--width", "16", "--heads", "2", "--batch-size", "10", "--epochs", "1", "--sample", "10",
             "--skip-lpips", "--fid-images", "6", "--device", "cpu"]
            + (["--steps", "2", "--mlp-dim", "32"] if quantizer == "vq" else [])))
        reference, cache = seen[-1]  # --fid-images 6 of the 7 test images (labels 0..6): a stratified subset
        chosen = reference.indices
        assert len(reference) == 6 and sorted(reference[i][1] for i in range(6)) == sorted(set(chosen))
        x = torch.stack([reference[i][0] for i in range(6)])
        assert x.shape == (6, 3, 32, 32) and torch.equal(x[:, :, 2:30, 2:30], (test_images[chosen].float() / 255)[:, None].expand(-1, 3, -1, -1))
        assert x[:, :, :2].abs().sum() == 0 and cache == common.tokenizer_test_cache_name(
            torch.load(runs / quantizer / "best.pt", weights_only=True)["args"], limit=6)
        with open(tmp_path / "gen" / f"{common.GENERATORS[quantizer]}_{quantizer}.json") as f:
            record = json.load(f)
        assert record["metrics"]["gfid"] == 1.0 and record["fid_reference"].startswith("test split, 6 images")
        assert record["fid_reference_subset"]["indices"] == chosen and record["fid_reference_subset"]["of"] == 7
        # the real-data anchor: one sample per class, so every one of the 6 reference images (6 classes)
        assert record["metrics"]["real_pixel_diversity"] == pytest.approx(torch.pdist(x.flatten(1)).mean().item(),
                                                                          rel=1e-5)
        assert record["real_anchor"].startswith("6 images of the g-FID reference")
        assert record["tokenizer"]["dataset"] == "fashion-mnist" and record["sampling"]["labels"] == "class-balanced"
    assert seen[0][1] == seen[1][1]  # both tokenizers use the same split: one reference cache


def test_only_a_truncating_sampler_gets_an_untruncated_companion():
    """VAR's default top-k 900 / top-p 0.96 truncate: its run also samples with top-k 0 and top-p 1
    (off) as <name>_untruncated; MaskGIT samples the full softmax, its default row is untruncated."""
    import generator_maskgit
    import generator_var
    assert common.untruncated_args(generator_maskgit.build_parser().parse_args(["--tokenizer", "t"]), "x", "c") is None
    var = generator_var.build_parser().parse_args(["--tokenizer", "t"])
    companion = common.untruncated_args(var, "x", "c.pt")
    assert (companion.top_k, companion.top_p, companion.name, companion.sample_only, companion.checkpoint) == \
        (0, 1.0, "x_untruncated", True, "c.pt")
    assert (var.top_k, var.top_p, var.name, var.sample_only) == (900, 0.96, None, False)  # the run's own args unchanged
    for extra in (["--top-k", "0", "--top-p", "1"], ["--skip-untruncated"], ["--sample", "0"]):
        args = generator_var.build_parser().parse_args(["--tokenizer", "t"] + extra)
        assert common.untruncated_args(args, "x", "c") is None
