"""`distill soup`: the uniform average is exact, greedy ranks on a held-out part of the training split, BatchNorm
statistics are re-estimated, lineage lists every ingredient, and mismatches are refused with a sentence."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint
from distill.data.sources import load_folder
from distill.tools.soup import held_out_split


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    data = make_image_folder(root / "data", ["circle", "square", "star"])
    other = make_image_folder(root / "other", ["apple", "pear", "plum", "fig"], seed=1)
    runs = root / "runs"
    # ingredients as a soup takes them: one starting point (the same seed), trained otherwise (here the lr)
    for index, lr in enumerate((0.032, 0.064, 0.128)):
        result = invoke("student", "--distillation", "none", "--no-token", "--data-dir", data, "--workdir", runs,
                        "--name", f"s{index}", "--lr", lr, "--train-subset", 27, *TINY, *TINY_VIT)
        assert result.exit_code == 0, result.output
    for index, lr in enumerate((0.032, 0.128)):
        result = invoke("teach", "--data-dir", data, "--workdir", runs, "--name", f"t{index}", "--lr", lr, *TINY)
        assert result.exit_code == 0, result.output
    assert invoke("student", "--distillation", "none", "--no-token", "--data-dir", data, "--workdir", runs, "--name",
                  "seeded", "--seed", 1, "--train-subset", 27, *TINY, *TINY_VIT).exit_code == 0
    assert invoke("student", "--distillation", "none", "--no-token", "--data-dir", data, "--workdir", runs, "--name",
                  "deeper", *TINY, *TINY_VIT[:-4], "--depth", "2", "--num-heads", "2").exit_code == 0
    assert invoke("student", "--distillation", "none", "--no-token", "--data-dir", other, "--workdir", runs, "--name",
                  "other", *TINY, *TINY_VIT).exit_code == 0
    moved = invoke("transfer", "--checkpoint", runs / "s1", "--data-dir", data, "--workdir", runs, "--name", "moved", *TINY)
    assert moved.exit_code == 0, moved.output
    return runs, data


def test_uniform_soup_is_the_exact_average_and_lists_its_ingredients(runs):
    runs, _ = runs
    paths = [runs / f"s{seed}" for seed in (0, 1, 2)]
    result = invoke("soup", *paths, "--out", runs / "soup-u", "--num-workers", 0)
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(runs / "soup-u")
    ingredients = [read_checkpoint(p) for p in paths]
    weights = soup.state_dict()
    for key, value in weights.items():
        expected = sum(c.state_dict()[key].double() for c in ingredients) / 3
        assert torch.equal(value, expected.float()), key
    assert [r["sha256"] for r in soup.meta["ingredients"]] == [c.sha256 for c in ingredients]
    assert all(r["in_soup"] for r in soup.meta["ingredients"])
    assert soup.stage == "soup" and soup.classes == ingredients[0].classes
    assert soup.meta["soup"]["batchnorm_recalibrated"] is False
    assert 0 <= soup.meta["metrics"]["top1"] <= 100 and soup.meta["metrics"]["samples"] == 12
    info = invoke("info", runs / "soup-u")
    assert "uniform soup, the average of 3 of 3 checkpoints" in info.output.replace("\n", " ").replace("│", "")


def test_greedy_soup_ranks_on_images_the_ingredients_never_trained_on(runs):
    runs, data = runs
    paths = [runs / f"s{seed}" for seed in (0, 1, 2)]
    result = invoke("soup", *paths, "--method", "greedy", "--out", runs / "soup-g", "--num-workers", 0)
    assert result.exit_code == 0, result.output
    meta = read_checkpoint(runs / "soup-g").meta
    records = meta["ingredients"]
    order = sorted(records, key=lambda r: -r["held_out_top1"])  # ties keep the order given, as the soup does
    assert order[0]["in_soup"]  # the best ingredient on the held-out split starts the soup
    assert meta["soup"]["held_out_unseen"] and "outside the ingredients' --train-subset 27" in meta["soup"]["held_out"]
    current = order[0]["held_out_top1"]
    for record in order[1:]:  # each is kept exactly when the soup's held-out accuracy does not drop with it
        kept = record["soup_held_out_top1_with_it"] >= current
        assert record["in_soup"] == kept
        current = record["soup_held_out_top1_with_it"] if kept else current
    assert meta["soup"]["held_out_top1"] == current
    # The held-out split: training images only, outside the ingredients' 27-image subset.
    train = load_folder(data).train
    split = held_out_split(train, 3, 27, None, 0)
    held = {train.where(i) for i in split.images.indices}
    trained_on = {train.where(i) for i in split.rest.indices}
    assert held and not held & trained_on and all("/train/" in p for p in held)
    assert len(trained_on) == 27


def test_batchnorm_statistics_are_re_estimated(runs):
    runs, _ = runs
    result = invoke("soup", runs / "t0", runs / "t1", "--out", runs / "soup-bn", "--num-workers", 0)
    assert result.exit_code == 0, result.output
    assert "BatchNorm statistics re-estimated" in result.output
    soup = read_checkpoint(runs / "soup-bn")
    assert soup.meta["soup"]["batchnorm_recalibrated"] and soup.meta["soup"]["batchnorm_images"] > 0
    weights, a, b = soup.state_dict(), read_checkpoint(runs / "t0").state_dict(), read_checkpoint(runs / "t1").state_dict()
    means = [k for k in weights if k.endswith("running_mean")]
    assert means
    assert not all(torch.allclose(weights[k], (a[k] + b[k]) / 2) for k in means)  # statistics measured, not averaged
    conv = next(k for k in weights if k.endswith("conv.weight"))
    assert torch.equal(weights[conv], ((a[conv].double() + b[conv].double()) / 2).float())  # weights still averaged


@pytest.mark.parametrize("other, words", [("deeper", "another architecture"), ("other", "other classes"),
                                          ("s0", "given twice"),
                                          ("moved", "started from the weights of"),
                                          ("seeded", "started from a random initialisation (seed 1)")])
def test_mismatches_are_refused_with_a_sentence(runs, other, words):
    runs, _ = runs
    result = invoke("soup", runs / "s0", runs / other, "--out", runs / "bad", "--num-workers", 0)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert not (runs / "bad").exists()


def test_bad_method_and_single_checkpoint_are_refused(runs):
    runs, _ = runs
    assert "--method must be one of uniform, greedy" in invoke("soup", runs / "s0", runs / "s1", "--method", "best").output
    assert "at least two checkpoints" in invoke("soup", runs / "s0").output
