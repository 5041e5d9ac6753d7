"""`distill teach` end to end: run folder, checkpoint, reuse of finished runs, precision, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, invoke, run_cli
from distill.weights.checkpoint import build_model, read_checkpoint


def test_tiny_teach_end_to_end(folder):
    result = invoke("teach", "--data-dir", folder, *TINY, "--epochs", "2")
    assert result.exit_code == 0, result.output
    run = folder.parent / "runs" / "teach"
    assert {"model.safetensors", "config.toml", "metrics.jsonl", "state", "identity.json"} <= {p.name for p in run.iterdir()}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all({"top1", "test_loss", "train_loss", "lr", "img_per_s"} <= set(line) for line in lines)
    assert not any("top5" in line for line in lines)  # 3 classes: top-5 would be 100 by construction
    ckpt = read_checkpoint(run / "model.safetensors")
    meta = ckpt.meta
    assert (ckpt.kind, ckpt.stage, ckpt.model_name) == ("teacher", "teach", "regnety_002")
    assert ckpt.classes == ["circle", "square", "star"] and ckpt.img_size == 16
    assert meta["parent"] is None and meta["config"]["epochs"] == 2 and meta["data"]["crop_pct"] == 0.875
    assert meta["metrics"]["samples"] == 12 and 0 <= meta["metrics"]["top1"] <= 100
    assert meta["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    model = build_model(ckpt)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    assert "test top-1" in result.output or "top-1" in result.output


def test_finished_run_is_reused_and_a_changed_one_refused(folder):
    assert invoke("teach", "--data-dir", folder, *TINY).exit_code == 0
    path = folder.parent / "runs" / "teach" / "model.safetensors"
    written = path.stat().st_mtime_ns
    again = invoke("teach", "--data-dir", folder, *TINY, "--num-workers", "1")  # workers do not change the result
    assert again.exit_code == 0 and "already finished" in again.output
    assert path.stat().st_mtime_ns == written
    first = invoke("teach", "--data-dir", folder, *TINY, "--lr", "0.01")
    changed = " ".join(first.output.split())
    # the lr each run trains with, as the first printed it ("lr 0.001 at global batch 8"), and the per-512 base beside
    assert first.exit_code == 2 and "different settings (lr: 0.001 -> 0.0001563 at global batch 8; per 512 images 0.064 -> 0.01)" in changed
    assert path.stat().st_mtime_ns == written
    assert invoke("teach", "--data-dir", folder, *TINY, "--lr", "0.01", "--overwrite").exit_code == 0
    assert read_checkpoint(path).meta["config"]["lr"] == 0.01


def test_bf16_autocast_runs_on_cpu(folder):
    from distill.training.processes import make_accelerator

    acc = make_accelerator("bf16")
    layer = torch.nn.Linear(8, 8)
    with acc.autocast():
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # the matmuls run in bf16 on the CPU
    result = invoke("teach", "--data-dir", folder, *TINY, "--mixed-precision", "bf16")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(folder.parent / "runs" / "teach")
    assert ckpt.meta["config"]["mixed_precision"] == "bf16"
    assert all(v.dtype == torch.float32 for k, v in ckpt.state_dict().items() if v.is_floating_point())


def test_fp16_without_gpu_is_refused(folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = invoke("teach", "--data-dir", folder, *TINY, "--mixed-precision", "fp16")
    assert result.exit_code == 2 and "fp16 mixed precision needs a GPU" in result.output


def test_one_epoch_on_the_embedded_digits():
    result = invoke("teach", "--epochs", "1", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint("runs/teach/model.safetensors")
    assert ckpt.meta["data"]["dataset"] == "digits" and ckpt.meta["metrics"]["samples"] == 360


def test_module_entry_point_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("distill ")
    helped = run_cli("student", "--help", env={"COLUMNS": "250"})
    assert helped.returncode == 0 and "global batch / 512" in helped.stdout and "--no-token" in helped.stdout
    assert "by name, comma-separated (e.g. cat,dog; the digits' names are 0 to 9)" in " ".join(helped.stdout.split())


def test_gradient_accumulation_and_ema(folder):
    result = invoke("teach", "--data-dir", folder, *TINY, "--batch-size", "4", "--grad-accum", "3", "--ema",
                    "--ema-decay", "0.9")
    assert result.exit_code == 0, result.output
    run = folder.parent / "runs" / "teach"
    ckpt = read_checkpoint(run)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert line["step"] == 3  # 36 images / batch 4 = 9 micro-batches = 3 optimizer steps
    assert ckpt.meta["lr_effective"] == pytest.approx(ckpt.meta["config"]["lr"] * 4 * 3 / 512)
    assert "ema_top1" in line
    ema = read_checkpoint(run / "model-ema.safetensors")
    assert ema.meta["ema"] == {"decay": 0.9, "warmup": False, "step": 3, "last_decay": 0.9}  # DeiT's fixed decay
    assert ema.meta["metrics"]["samples"] == 12
    weights, averaged = ckpt.state_dict(), ema.state_dict()
    assert weights.keys() == averaged.keys()
    assert any(not torch.equal(weights[k], averaged[k]) for k in weights if weights[k].is_floating_point())
    warmed = invoke("teach", "--data-dir", folder, *TINY, "--batch-size", "4", "--grad-accum", "3", "--ema",
                    "--ema-warmup", "--name", "warmup")
    assert warmed.exit_code == 0, warmed.output
    record = read_checkpoint(folder.parent / "runs" / "warmup" / "model-ema.safetensors").meta["ema"]
    assert record["last_decay"] == pytest.approx(1 - (1 + 2) ** (-2 / 3))  # timm's warmup at the third update


def test_ema_decay_used_at_a_given_step():
    """DeiT's 0.99996 from the first update to the last of a 300-epoch ImageNet run (375k steps at batch 1024);
    timm's warmup reaches only 0.99981 there."""
    from distill.config import TeachConfig
    from distill.training.engine import ema_step, make_ema

    model = torch.nn.Linear(2, 2)
    fixed = TeachConfig(ema=True)
    warm = TeachConfig(ema=True, ema_warmup=True)
    for step in (1, 2, 1000, 375_000):
        assert make_ema(model, fixed).get_decay(ema_step(fixed, step)) == 0.99996
    assert make_ema(model, warm).get_decay(ema_step(warm, 375_000)) == pytest.approx(1 - 375_000 ** (-2 / 3))
    assert make_ema(model, warm).get_decay(ema_step(warm, 375_000)) == pytest.approx(0.99981, abs=1e-5)


def test_schedule_never_rises_above_the_scaled_peak(folder):
    # At a small batch the lr rule puts the peak (1e-5 x 4 / 512) below --warmup-lr and --min-lr.
    result = invoke("teach", "--data-dir", folder, *TINY, "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "4",
                    "--lr", "1e-5", "--warmup-lr", "1e-3", "--min-lr", "1e-4", "--name", "low-lr")
    assert result.exit_code == 0, result.output
    run = folder.parent / "runs" / "low-lr"
    peak = read_checkpoint(run).meta["lr_effective"]
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rates) == 3 and all(rate <= peak * (1 + 1e-9) for rate in rates)


def test_images_per_second_counts_images_with_random_erasing_on(folder):
    """With erasing on a batch's images are a dict (pixels and boxes): the epoch's rate still counts its images."""
    result = invoke("teach", "--data-dir", folder, *TINY, "--epochs", "1", "--reprob", "1.0")
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(line) for line in (folder.parent / "runs" / "teach" / "metrics.jsonl").read_text().splitlines()]
    assert line["img_per_s"] * line["epoch_time_s"] == pytest.approx(32, rel=0.05)  # 36 images: 4 batches of 8
