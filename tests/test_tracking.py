"""`--log-with`: accelerate's trackers. TensorBoard event files are written and read back with tensorboard's own
EventAccumulator: every optimizer step's loss and lr, each epoch's metrics, the config as hyperparameters."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, TINY_VIT, invoke

pytest.importorskip("tensorboard")


def test_tensorboard_event_files_hold_every_step_and_every_epoch(folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = invoke("student", "--distillation", "none", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY,
                    *TINY_VIT, "--epochs", "2", "--batch-size", "4", "--log-every", "2", "--log-with", "tensorboard")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "student"
    events = list((run / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run folder"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = records[-1]["step"]  # 36 images, batch 4: 9 steps an epoch

    accumulator = EventAccumulator(str(run / "logs"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, steps + 1))  # every step, though read only every 2
    first_epoch = [e.value for e in losses if e.step <= records[0]["step"]]
    assert sum(first_epoch) / len(first_epoch) == pytest.approx(records[0]["train_loss"], abs=1e-4)
    rates = accumulator.Scalars("train/lr")
    assert [e.step for e in rates] == list(range(1, steps + 1)) and all(e.value > 0 for e in rates)
    top1 = accumulator.Scalars("epoch/top1")
    assert [(e.step, round(e.value, 3)) for e in top1] == [(r["step"], round(r["top1"], 3)) for r in records]
    assert {"epoch/train_loss", "epoch/test_loss", "epoch/img_per_s"} <= set(scalars)
    hparams = list((run / "logs").rglob("hparams.yml"))
    assert hparams and "distillation: none" in hparams[0].read_text()


@pytest.mark.parametrize("name, words", [("nosuch", "--log-with takes accelerate's trackers"),
                                         ("swanlab", "needs the swanlab package")])
def test_unknown_or_missing_trackers_are_refused_before_training(folder, tmp_path, name, words):
    result = invoke("student", "--distillation", "none", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY,
                    *TINY_VIT, "--log-with", name)
    assert result.exit_code == 2 and words in result.output
    assert not (tmp_path / "runs" / "student").exists()
