"""What a stage, `evaluate` and `info` say of a model: mean per-class accuracy, classes never predicted, a collapse
in one line, the best head of a token student, one unit for teacher disagreement."""

from __future__ import annotations

import re

import torch

from conftest import TINY, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint, save_checkpoint


def test_a_stage_summary_shows_mean_per_class_accuracy_and_a_collapse_is_named(tmp_path):
    data = make_image_folder(tmp_path / "four", ["a", "b", "c", "d"])
    trained = invoke("teach", "--data-dir", data, *TINY)
    assert trained.exit_code == 0, trained.output
    metrics = read_checkpoint("runs/teach").meta["metrics"]
    per_class = metrics["per_class_top1"]
    assert metrics["mean_class_top1"] == round(sum(per_class) / 4, 3)
    assert sum(metrics["predicted_per_class"]) == sum(metrics["labels_per_class"]) == 16
    assert f"mean per-class top-1 {metrics['mean_class_top1']:.2f} over 4 classes" in trained.output

    # the same model with its classifier pushed to one class: every test image predicted 'c'
    ckpt = read_checkpoint("runs/teach")
    weights = ckpt.state_dict()
    bias = next(key for key in weights if key.endswith("head.fc.bias"))
    weights[bias] = torch.tensor([0.0, 0.0, 1e4, 0.0])
    save_checkpoint(tmp_path / "collapsed.safetensors", weights, ckpt.meta)
    result = invoke("evaluate", tmp_path / "collapsed.safetensors", "--data-dir", data)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "mean per-class top-1 25.00 over 4 classes; never predicted: a, b, d" in text
    assert ("collapsed: 16 of 16 test images (100 %) are predicted 'c', which holds 4 of them, and 3 of 4 classes are "
            "never predicted") in text


def test_a_token_students_best_head_is_named_and_disagreement_is_a_percentage(tmp_path):
    data = make_image_folder(tmp_path / "shapes", ["circle", "square", "star"])
    assert invoke("teach", "--data-dir", data, *TINY).exit_code == 0
    student = invoke("student", "--data-dir", data, *TINY, "--patch-size", "4", "--embed-dim", "32", "--depth", "1",
                     "--num-heads", "2", "--distillation", "hard", "--token")
    assert student.exit_code == 0, student.output
    ckpt = read_checkpoint("runs/student")
    metrics = ckpt.meta["metrics"]
    rate = metrics["disagreement"]["fused"]
    assert re.search(rf"class \+ distillation \(fused\).*{rate * 100:.2f}", student.output)  # a percentage, as the report

    # recorded metrics in which the class head beats the fused heads: the summary and `info` say so
    heads = {"fused": {"top1": 25.0}, "cls": {"top1": 50.0}, "dist": {"top1": 33.33}}
    meta = {**ckpt.meta, "metrics": {**metrics, "top1": 25.0, "head": "fused", "heads": heads}}
    save_checkpoint(tmp_path / "weaker-fused.safetensors", ckpt.state_dict(), meta)
    info = invoke("info", tmp_path / "weaker-fused.safetensors")
    assert info.exit_code == 0, info.output
    assert "the class head, 50.00 (the headline, class + distillation (fused), 25.00)" in " ".join(info.output.split())
    assert f"{rate * 100:.2f} %" in info.output


def test_a_cut_class_list_says_so(tmp_path):
    """Refusals name the classes that differ, and a list cut short says how long it was."""
    model_data = make_image_folder(tmp_path / "letters", ["a", "b", "c", "d", "e"])
    other_data = make_image_folder(tmp_path / "more", ["a", "f", "g", "h", "i", "j"])
    assert invoke("teach", "--data-dir", model_data, *TINY).exit_code == 0
    refused = invoke("evaluate", "runs/teach", "--data-dir", other_data)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2, text
    assert "only the model has b, c, d, e, only the data has f, g, h, i, ... (5 in all)" in text
