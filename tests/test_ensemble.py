"""`distill ensemble` and `distill evaluate --tta`: members with different architectures and resolutions, each
with its own preprocessing; the means match a hand computation; the views of test-time augmentation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import build_model, read_checkpoint
from timm.data import create_transform
from distill.data.sources import load_folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data = make_image_folder(root / "data", ["circle", "square", "star"])
    other = make_image_folder(root / "other", ["apple", "pear"], seed=1)
    runs = root / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY, "--img-size", "24").exit_code == 0
    result = invoke("student", "--workdir", runs, *TINY, *TINY_VIT)  # hard distillation, with the token
    assert result.exit_code == 0, result.output
    assert invoke("student", "--distillation", "none", "--no-token", "--data-dir", other, "--workdir", runs,
                  "--name", "other", *TINY, *TINY_VIT).exit_code == 0
    return runs, data


def by_hand(path, data, flip=False, img_size=None):
    """Each test image through the checkpoint's own preprocessing, one at a time: the probabilities of its
    headline prediction (for a token student, the softmax of its two heads' mean logits, its recorded fusion)."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt)
    if img_size:
        model.set_input_size(img_size=(img_size, img_size))
    transform = create_transform(img_size or ckpt.img_size, is_training=False, mean=tuple(ckpt.data["mean"]),  # timm's,
                                 std=tuple(ckpt.data["std"]), crop_pct=ckpt.data["crop_pct"],  # in float, by hand
                                 interpolation=ckpt.data["interpolation"])
    test = load_folder(data).test
    rows = []
    with torch.no_grad():
        for path_ in (test.path(i) for i in range(len(test))):
            x = transform(Image.open(path_).convert("RGB"))[None]
            x = x.flip(-1) if flip else x
            if getattr(model, "dist_token", None) is not None:
                tokens = model.forward_features(x)
                probs = ((model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2).softmax(-1)
            else:
                probs = model(x).softmax(-1)
            rows.append(probs[0])
    return torch.stack(rows), torch.tensor(test.targets)


@pytest.mark.parametrize("mean", ["arith", "geo"])
def test_ensemble_of_two_architectures_at_two_resolutions_matches_a_hand_computation(runs, mean, tmp_path):
    runs, data = runs
    result = invoke("ensemble", runs / "student", runs / "teach", "--mean", mean, "--out", tmp_path / "preds",
                    "--num-workers", 0)
    assert result.exit_code == 0, result.output
    student, labels = by_hand(runs / "student", data)  # 16 px, DeiT, fused heads
    teacher, _ = by_hand(runs / "teach", data)  # 24 px, RegNetY
    if mean == "arith":
        expected = (student + teacher) / 2
    else:
        expected = torch.sqrt(student * teacher)
        expected = expected / expected.sum(-1, keepdim=True)
    saved = load_file(str(tmp_path / "preds" / "predictions.safetensors"))
    assert torch.allclose(saved["members"][0], student, atol=1e-5)
    assert torch.allclose(saved["members"][1], teacher, atol=1e-5)
    assert torch.allclose(saved["ensemble"], expected, atol=1e-5) and torch.equal(saved["labels"], labels)
    summary = json.loads((tmp_path / "preds" / "ensemble.json").read_text())
    top1 = round((expected.argmax(-1) == labels).float().mean().item() * 100, 3)
    assert summary["top1"] == pytest.approx(top1) and summary["mean"] == mean
    assert [m["img_size"] for m in summary["members"]] == [16, 24]
    assert summary["members"][0]["top1"] == pytest.approx((student.argmax(-1) == labels).float().mean().item() * 100, abs=1e-3)
    with safe_open(str(tmp_path / "preds" / "predictions.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["ensemble"])["top1"] == summary["top1"]
    assert f"{top1:.2f}" in result.output and "mean member" in result.output


def test_ensemble_refusals(runs):
    runs, _ = runs
    other = invoke("ensemble", runs / "student", runs / "other", "--num-workers", 0)
    assert other.exit_code == 2 and "other classes" in other.output
    assert invoke("ensemble", runs / "student", runs / "teach", "--mean", "median").exit_code == 2
    assert "at least two" in invoke("ensemble", runs / "student").output


def test_tta_flip_reports_each_view_and_their_mean(runs):
    runs, data = runs
    result = invoke("evaluate", runs / "student", "--tta", "flip", "--num-workers", 0)
    assert result.exit_code == 0, result.output
    centre, labels = by_hand(runs / "student", data)
    flipped, _ = by_hand(runs / "student", data, flip=True)

    def top1(p):
        return f"{(p.argmax(-1) == labels).float().mean().item() * 100:.2f}"

    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") == 3}
    assert lines["centre"] == top1(centre) and lines["flipped"] == top1(flipped)
    assert lines["mean of the views"] == top1((centre + flipped) / 2)


def test_tta_five_crop_and_multi_res_views(runs):
    runs, data = runs
    five = invoke("evaluate", runs / "teach", "--tta", "five-crop", "--num-workers", 0)
    assert five.exit_code == 0, five.output
    for name in ("top-left", "top-right", "bottom-left", "bottom-right", "centre", "mean of the views"):
        assert name in five.output
    multi = invoke("evaluate", runs / "student", "--tta", "multi-res", "--num-workers", 0)
    assert multi.exit_code == 0, multi.output
    assert "12 px" in multi.output and "16 px" in multi.output and "20 px" in multi.output  # on the patch-4 grid
    at20, labels = by_hand(runs / "student", data, img_size=20)
    row = next(line for line in multi.output.splitlines() if "20 px" in line)
    assert f"{(at20.argmax(-1) == labels).float().mean().item() * 100:.2f}" in row


def test_tta_refusals(runs):
    runs, _ = runs
    bad = invoke("evaluate", runs / "student", "--tta", "ten-crop")
    assert bad.exit_code == 2 and "--tta must be one of flip, five-crop, multi-res" in bad.output
    off_grid = invoke("evaluate", runs / "student", "--tta", "multi-res", "--tta-res", "16,18", "--num-workers", 0)
    assert off_grid.exit_code == 2 and "not a multiple of the patch size 4" in off_grid.output
