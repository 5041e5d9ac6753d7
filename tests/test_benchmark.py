"""`distill benchmark`: every measurement of every model, on a timm name and a checkpoint, as a table, CSV and JSON."""

from __future__ import annotations

import csv
import json

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY, TINY_VIT, invoke
from distill.weights.checkpoint import build_model, read_checkpoint


def test_benchmark_measures_a_timm_model_and_a_checkpoint(folder, tmp_path):
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", folder, "--workdir", runs, *TINY).exit_code == 0
    assert invoke("student", "--workdir", runs, *TINY, *TINY_VIT).exit_code == 0
    result = invoke("benchmark", "regnety_002", runs / "student", "--res", "16", "--batch-size", "4", "--steps", "1",
                    # one loader worker process: what the benchmark hands it must pickle
                    "--warmup", "0", "--num-workers", "1", "--data-dir", folder, "--teacher", runs / "teach",
                    "--csv", tmp_path / "b.csv", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [row["res"] for row in rows] == [16, 16] and len(list(csv.DictReader(open(tmp_path / "b.csv")))) == 2

    student = build_model(read_checkpoint(runs / "student"))
    regnet = timm.create_model("regnety_002", num_classes=1000)
    for row, model in zip(rows, (regnet, student)):
        assert row["params_m"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, 16, 16))
        assert row["gflops"] == round(counter.get_total_flops() / 1e9, 3)
        for key in ("infer_img_s", "train_alone_img_s", "train_teacher_img_s", "train_cached_img_s",
                    "train_alone_data_img_s", "train_teacher_data_img_s", "train_cached_data_img_s", "peak_memory_mb"):
            assert row[key] > 0, key
    assert rows[1]["token"] is True and rows[1]["teacher"].startswith("regnety_002")
    assert "benchmark" in result.output and "cached" in result.output


def test_an_unknown_model_is_a_sentence():
    result = invoke("benchmark", "regnety_0002", "--no-training", "--res", "16")
    assert result.exit_code == 2 and "no model named 'regnety_0002'" in result.output


def test_benchmark_data_reports_the_loader_alone(folder, tmp_path):
    """`--data` without a model: every part of DeiT's preprocessing timed, the parts adding up to the loader's cost,
    uint8 pixels to the device (the bytes of the pixels, the erasing record and the label), cores from the rate."""
    result = invoke("benchmark", "--data", folder, "--img-size", "16", "--batch-size", "4", "--steps", "3",
                    "--num-workers", "1", "--step-rate", "500", "--json", tmp_path / "loader.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "loader.json").read_text())["loader"]
    parts = report["parts_ms"]
    assert list(parts)[:4] == ["decode", "random-resized crop", "flip", "RandAugment"]
    assert {"to uint8 tensor", "erasing box", "collate", "device part (here on the CPU)"} <= set(parts)
    assert abs(sum(v for k, v in parts.items() if not k.startswith("device")) - report["loader_ms"]) < 1e-3
    assert report["bytes_per_image"] == 3 * 16 * 16 + 5 * 8 + 8 and report["fp32_bytes_per_image"] == 3 * 16 * 16 * 4 + 8
    assert report["images"] == 12 and report["loader_img_s"] > 0
    assert report["cores_per_gpu"]["--step-rate"] == round(500 / report["images_per_s_per_core"], 1)
    assert "the loader alone" in result.output and "cores of augmentation one gpu needs" in result.output.lower()


def test_benchmark_needs_a_model_or_data():
    result = invoke("benchmark")
    assert result.exit_code != 0 and "or pass --data for the loader alone" in result.output


def test_benchmark_data_refusals(tmp_path):
    assert "pass --data too" in invoke("benchmark", "regnety_002", "--step-rate", "100").output
    missing = invoke("benchmark", "--data", str(tmp_path / "nowhere"))
    assert missing.exit_code != 0 and "no such folder" in missing.output
    assert "--json writes the loader's report" in invoke("benchmark", "--data", "digits", "--csv", tmp_path / "x.csv").output
