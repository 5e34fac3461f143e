"""evaluate.py's generator renderers: Tables 4, 6, 13, 14, 17 (generation columns), the table of
datasets the paper did not use, and Figure 9, from JSONs in the generator convention
(common.write_generator_result) of both generators."""
import argparse
import os

import numpy as np
import torch
from PIL import Image

import common
import evaluate


def write_run(folder, name, generator, deferred, dataset="imagenet100", gan=False, metrics=None, grid_value=None,
              seed=0, sample_seed=0, sample_only=False, **recipe):
    """A generator JSON as the scripts write it (and, with grid_value, its sample grid PNG)."""
    extra = {}
    if grid_value is not None:
        common.write_png(os.path.join(folder, name, "samples_grid.png"), torch.full((3, 8, 16), grid_value,
                                                                                     dtype=torch.uint8))
        extra = {"samples": f"{name}/samples", "grid": f"{name}/samples_grid.png"}
    tokenizer = {"checkpoint": "/x/best.pt", "name": "t", "deferred": deferred, "quantizer": "vq", "scheme": dataset,
                 "dataset": dataset, "gan": gan, "codebook_size": 16384, "simvq": False, "resolution": 128}
    provenance = {"eval_split": "test", "fid_reference": "test split, 20000 images", "data_range": 1.0,
                  "pixel_scale": 1.0, "lpips_pairs": 12497500}
    common.write_generator_result(os.path.join(folder, f"{name}.json"), f"generator_{generator}",
                                  argparse.Namespace(seed=seed, sample_only=sample_only, **recipe), metrics or {}, [],
                                  tokenizer=tokenizer, provenance=provenance,
                                  sampling={"num_samples": 5000, "seed": sample_seed}, checkpoint="/x/g.pt", **extra)


def row(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |")).split(" | ")[1:]


def test_paper_tables_put_ours_beside_the_paper_for_both_generators(tmp_path):
    write_run(tmp_path, "m1", "maskgit", True, metrics={"gfid": 15.0, "pixel_diversity": 70.0,
                                                        "lpips_diversity": 0.6, "num_samples": 5000})
    write_run(tmp_path, "v0", "var", False, metrics={"gfid": 11.0, "pixel_diversity": 72.5, "num_samples": 5000})
    write_run(tmp_path, "o", "var", True, dataset="odir", gan=True, metrics={"gfid": 30.0})
    results = evaluate.load_results(str(tmp_path))
    t4 = evaluate.render_generator_table(results, "Table 4")
    assert row(t4, "MaskGIT ✓")[:8] == ["paper", "1: seed 0 x sample 0", "14.60", "15.00", "80.77", "70.00", "0.677",
                                        "0.600"]
    assert row(t4, "VAR ✗")[2:8] == ["12.88", "11.00", "70.69", "72.50", "0.633", "–"]
    assert row(t4, "MaskGIT ✗")[:4] == ["–", "–", "14.75", "–"]  # no run: the paper's value stays
    assert "test split, 20000 images" in t4
    assert evaluate.render_generator_table(results, "Table 14").count("30.00") == 1
    assert evaluate.render_generator_table(results, "Table 6") is None  # odir without GAN: no run
    # methods follow the tokenizer's arm
    assert sorted(r["method"] for r in results) == ["maskgit_deferred", "var_baseline", "var_deferred"]


def test_other_datasets_and_figure9_from_the_sample_grids(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "fm0", "maskgit", False, dataset="fashion-mnist", metrics={"pixel_diversity": 9.0},
              grid_value=10)
    write_run(runs, "fm1", "maskgit", True, dataset="fashion-mnist", metrics={"pixel_diversity": 9.5},
              grid_value=200)
    write_run(runs, "single", "var", True, dataset="fashion-mnist", grid_value=0)  # one arm only: no figure
    args = argparse.Namespace(runs=str(runs), out=str(tmp_path / "report"), only=None)
    report = evaluate.cmd_tables(args)
    assert "## Generation on other datasets" in report and "Table 4" not in report
    lines = [line for line in report.splitlines() if line.startswith("| maskgit | fashion-mnist")]
    assert [line.split(" | ")[3] for line in lines] == ["✗", "✓"]
    assert "fig9_maskgit_fashion-mnist.png" in report and "fig9_var" not in report
    figure = np.asarray(Image.open(tmp_path / "report" / "fig9_maskgit_fashion-mnist.png").convert("L"))
    middle = figure[figure.shape[0] // 2]
    left, right = middle[: figure.shape[1] // 2], middle[figure.shape[1] // 2:]
    assert 5 <= left.min() <= 15 and 195 <= right.min() <= 205  # the w/o grid left, the w/ grid right


def test_runs_of_one_arm_are_averaged_and_named_not_picked(tmp_path):
    # two training seeds of the deferred MaskGIT arm: Table 4 shows their mean and sample std
    for name, seed, gfid in (("a", 0, 14.0), ("b", 1, 16.0)):
        write_run(tmp_path, name, "maskgit", True, seed=seed, metrics={"gfid": gfid, "num_samples": 5000})
    results = evaluate.load_results(str(tmp_path))
    t4 = row(evaluate.render_generator_table(results, "Table 4"), "MaskGIT ✓")
    assert t4[3] == f"15.00 ± {np.std([14.0, 16.0], ddof=1):.2f}" and t4[1] == "2: seed 0, 1 x sample 0"
    # a resampling with guidance is another recipe: its own row, never in the mean
    write_run(tmp_path, "c", "maskgit", True, sample_only=True, sample_seed=1, cfg_scale=2.0, metrics={"gfid": 9.0})
    lines = [line for line in evaluate.render_generator_table(evaluate.load_results(str(tmp_path)), "Table 4")
             .splitlines() if line.startswith("| MaskGIT ✓ |")]
    assert [line.split(" | ")[1:4] for line in lines] == [["paper", "2: seed 0, 1 x sample 0", "14.60"],
                                                           ["cfg_scale=2.0", "1: seed 0 x sample 1", "14.60"]]
    assert lines[0].split(" | ")[4].startswith("15.00 ±") and lines[1].split(" | ")[4] == "9.00"
    # on other data: one row per arm, over sample seeds of one trained run as well
    for name, sample_seed, lpips in (("c", 0, 0.10), ("d", 1, 0.12), ("e", 2, 0.14)):
        write_run(tmp_path / "fm", name, "maskgit", False, dataset="fashion-mnist", sample_seed=sample_seed,
                  sample_only=sample_seed > 0, metrics={"lpips_diversity": lpips, "num_samples": 1000,
                                                        "real_lpips_diversity": 2 * lpips})
    other = evaluate.render_other_generation(evaluate.load_results(str(tmp_path / "fm")), None)
    header = [c.strip(" |") for c in other.splitlines()[0].split(" | ")]
    cells = next(line for line in other.splitlines() if line.startswith("| maskgit")).split(" | ")
    assert cells[5:9] == ["paper", "3: seed 0 x sample 0, 1, 2", "1000", "–"] and cells[10] == "0.1200 ± 0.0200"
    assert cells[header.index("real_lpips_diversity")].strip(" |") == "0.2400 ± 0.0400"
    assert cells[header.index("real_pixel_diversity")] == "–"  # not measured: absent, not zero


def test_figure9_shows_the_trained_run_of_an_arm_not_a_later_resampling(tmp_path):
    write_run(tmp_path, "a_base", "maskgit", False, dataset="fashion-mnist", grid_value=10)
    write_run(tmp_path, "a_def", "maskgit", True, dataset="fashion-mnist", grid_value=200)
    # a --sample-only run of the baseline arm, last in path order, with another grid
    write_run(tmp_path, "z_base_resample", "maskgit", False, dataset="fashion-mnist", grid_value=100,
              sample_seed=1, sample_only=True)
    evaluate.render_figure9(evaluate.load_results(str(tmp_path)), str(tmp_path))
    figure = np.asarray(Image.open(tmp_path / "fig9_maskgit_fashion-mnist.png").convert("L"))
    left = figure[figure.shape[0] // 2, : figure.shape[1] // 2]
    assert 5 <= left.min() <= 15  # the trained run's grid (10), not the resampling's (100)
