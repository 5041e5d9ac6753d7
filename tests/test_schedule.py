"""`--img-size-schedule`: progressive resizing within a stage, position embeddings resampled at each change, the
schedule recorded, and a run killed after a change resumed bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint
from test_reliability import _kill_at_step


def _args(data, workdir, *extra):
    return ["student", "--distillation", "none", "--data-dir", data, "--workdir", workdir, *TINY, *TINY_VIT,
            "--img-size-schedule", "8:0,12:1,16:2", "--epochs", "3", "--batch-size", "4", *extra]


def test_the_resolution_follows_the_schedule_and_the_checkpoint_records_it(folder, tmp_path):
    result = invoke(*_args(folder, tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "student"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["img_size"] for r in records] == [8, 12, 16]  # each epoch measured at its own resolution
    ckpt = read_checkpoint(run)
    assert ckpt.meta["img_size_schedule"] == [{"epoch": 0, "img_size": 8}, {"epoch": 1, "img_size": 12},
                                              {"epoch": 2, "img_size": 16}]
    assert ckpt.img_size == 16 and ckpt.meta["config"]["img_size_schedule"] == "8:0,12:1,16:2"
    assert ckpt.state_dict()["pos_embed"].shape == (1, 2 + 16, 32)  # two tokens and a 4 x 4 grid at 16 px
    assert "resolution 12 px from epoch 2 on" in result.output


def test_a_convnet_follows_the_schedule_too(folder, tmp_path):
    result = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY, "--epochs", "2",
                    "--img-size-schedule", "12:0,16:1")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "runs" / "teach" / "metrics.jsonl").read_text().splitlines()]
    assert [r["img_size"] for r in records] == [12, 16]


def test_a_run_killed_after_a_change_resumes_exactly(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4, size=16)
    straight = invoke(*_args(data, tmp_path / "straight", "--save-every", "1", "--ema"))
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "killed" / "student"
    _kill_at_step(_args(data, tmp_path / "killed", "--save-every", "1", "--ema"), run / "state" / "progress.json", 12)
    assert not (run / "model.safetensors").exists()
    resumed = invoke(*_args(data, tmp_path / "killed", "--save-every", "1", "--ema"))
    assert resumed.exit_code == 0 and "Resuming" in resumed.output, resumed.output
    for name in ("model.safetensors", "model-ema.safetensors"):
        a = read_checkpoint(tmp_path / "straight" / "student" / name).state_dict()
        b = read_checkpoint(run / name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.parametrize("schedule, words", [
    ("8:0,12:1", "ends at 12 px but --img-size is 16"),
    ("16:1", "must start at epoch 0"),
    ("8:0,16:5", "changes the resolution at epoch 5"),
    ("10:0,16:1", "10 px is not a multiple of the patch size 4"),
    ("big", "RESOLUTION:EPOCH pairs"),
])
def test_bad_schedules_are_refused_with_a_sentence(folder, tmp_path, schedule, words):
    result = invoke("student", "--distillation", "none", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY,
                    *TINY_VIT, "--epochs", "2", "--img-size-schedule", schedule)
    assert result.exit_code == 2 and words in result.output, result.output
