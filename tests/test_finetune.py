"""`distill finetune`: position-embedding resampling, the FixRes teacher, and a fine-tune end to end."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint
from distill.errors import DistillError
from distill.students import resize


def _vit(img_size=16, patch=4, token=True):
    name = "deit_tiny_distilled_patch16_224" if token else "deit_tiny_patch16_224"
    return timm.create_model(name, img_size=img_size, patch_size=patch, embed_dim=32, depth=1, num_heads=2, num_classes=3)


def test_resampling_to_the_same_resolution_is_the_identity():
    model = _vit()
    before = model.pos_embed.detach().clone()
    resize(model, 16)
    assert torch.equal(model.pos_embed, before)


def test_resampling_up_keeps_token_embeddings_and_interpolates_the_grid_bicubically():
    model = _vit(16, 4)  # 4x4 grid
    old = model.pos_embed.detach().clone()
    resize(model, 32)  # 8x8 grid
    new = model.pos_embed.detach()
    assert new.shape == (1, 2 + 64, 32)
    assert torch.equal(new[:, :2], old[:, :2])  # class and distillation tokens untouched
    grid = old[:, 2:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    def interpolated(mode):
        out = F.interpolate(grid, size=(8, 8), mode=mode, align_corners=False, antialias=True)
        return out.permute(0, 2, 3, 1).reshape(1, 64, 32)

    assert torch.allclose(new[:, 2:], interpolated("bicubic"), atol=1e-6)  # timm's antialiased bicubic
    assert not torch.allclose(new[:, 2:], interpolated("bilinear"), atol=1e-4)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_a_resolution_off_the_patch_grid_is_refused():
    with pytest.raises(DistillError, match="not a multiple of the patch size 4"):
        resize(_vit(16, 4), 18)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = make_image_folder(root / "data", ["circle", "square", "star"])
    runs = root / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    result = invoke("student", "--workdir", runs, *TINY, *TINY_VIT)
    assert result.exit_code == 0, result.output
    return runs


def test_finetune_with_the_automatic_fixres_teacher(trained):
    runs = trained
    result = invoke("finetune", "--workdir", runs, "--img-size", "24", "--epochs", "1", "--teacher-epochs", "1",
                    "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0")
    assert result.exit_code == 0, result.output
    # the first line names the student being fine-tuned, and the teacher's adaptation says what it is
    assert result.output.startswith(f"finetune of {runs / 'student' / 'model.safetensors'}: first teach-fixres into ")
    assert "teacher adapted to 24 px for the fine-tune (FixRes): " in result.output
    student = read_checkpoint(runs / "student")
    original = read_checkpoint(runs / "teach")
    fixres_dir = next(runs.glob("teach-fixres-24-*"))  # named by resolution, the teacher's sha256 and its settings
    assert re.fullmatch(f"teach-fixres-24-{original.sha256[:8]}-[0-9a-f]{{6}}", fixres_dir.name), fixres_dir.name
    fixres = read_checkpoint(fixres_dir)
    tuned = read_checkpoint(runs / "finetune")
    # the adapted teacher: its own checkpoint, at 24 px, child of the original teacher
    assert (fixres.kind, fixres.stage, fixres.img_size) == ("teacher", "teach-fixres", 24)
    assert fixres.meta["parent"]["sha256"] == original.sha256
    old, new = original.state_dict(), fixres.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".bn." in k or k.startswith("head.") or "running" in k or "num_batches" in k for k in changed)
    assert any("running_mean" in k for k in changed)  # BatchNorm statistics re-estimated
    assert not any(k.endswith("conv.weight") for k in changed)  # convolutions frozen
    # the fine-tuned student: 24 px, child of the student, taught by the adapted teacher, same variant
    assert tuned.img_size == 24 and tuned.model_args["img_size"] == 24
    assert tuned.meta["parent"]["sha256"] == student.sha256 and tuned.meta["teacher"]["sha256"] == fixres.sha256
    assert {**tuned.meta["distillation"], "teacher_res": 16} == student.meta["distillation"]
    assert tuned.meta["distillation"]["teacher_res"] == 24  # the student's own batch, now at 24 px
    assert tuned.state_dict()["pos_embed"].shape == (1, 2 + 36, 32)
    metrics = tuned.meta["metrics"]
    assert {"before_top1", "parent_top1", "top1"} <= set(metrics) and metrics["parent_img_size"] == 16
    assert "before fine-tuning" in result.output
    # a second fine-tune reuses the adapted teacher
    stamp = (fixres_dir / "model.safetensors").stat().st_mtime_ns
    again = invoke("finetune", "--workdir", runs, "--res", "24", "--epochs", "1", "--teacher-epochs", "1",
                   "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", "--name", "finetune-b", "--no-teacher")
    assert again.exit_code == 0, again.output
    assert read_checkpoint(runs / "finetune-b").meta["distillation"]["kind"] == "none"
    third = invoke("finetune", "--workdir", runs, "--res", "24", "--epochs", "2", "--teacher-epochs", "1",
                   "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", "--name", "finetune-c")
    assert third.exit_code == 0, third.output
    assert (fixres_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # another seed adapts its own teacher beside the first, which stays as it was
    seeded = invoke("finetune", "--workdir", runs, "--res", "24", "--epochs", "1", "--teacher-epochs", "1",
                    "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", "--name", "finetune-seed1",
                    "--seed", "1")
    assert seeded.exit_code == 0, seeded.output
    adapted = sorted(runs.glob("teach-fixres-24-*"))
    assert len(adapted) == 2 and (fixres_dir / "model.safetensors").stat().st_mtime_ns == stamp
    other = read_checkpoint(next(path for path in adapted if path != fixres_dir))
    assert read_checkpoint(runs / "finetune-seed1").meta["teacher"]["sha256"] == other.sha256 != fixres.sha256
    # --res, the older spelling of --img-size, names the same run: it is reused as it is
    reused = invoke("finetune", "--workdir", runs, "--res", "24", "--epochs", "1", "--teacher-epochs", "1",
                    "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0")
    assert reused.exit_code == 0 and "already finished with these settings" in reused.output, reused.output
    both = invoke("finetune", "--workdir", runs, "--res", "24", "--img-size", "32")
    assert both.exit_code == 2 and "--res is the older spelling of --img-size" in both.output
    # any checkpoint evaluates at any resolution
    evaluated = invoke("evaluate", runs / "student", "--img-size", "24", "--num-workers", "0",
                       "--teacher", fixres_dir)
    assert evaluated.exit_code == 0, evaluated.output
    assert "distillation head" in evaluated.output and "teacher" in evaluated.output


def test_finetune_refuses_a_resolution_off_the_grid(trained):
    result = invoke("finetune", "--workdir", trained, "--res", "22", *TINY[:2])
    assert result.exit_code == 2 and "not a multiple of the patch size 4" in result.output


def test_finetune_needs_a_resolution(trained):
    result = invoke("finetune", "--workdir", trained)
    assert result.exit_code == 2 and "--img-size" in result.output


def test_a_full_fixres_teacher_trains_every_layer(trained):
    """--teacher-bn full: FixRes's full fine-tuning, every layer of the teacher learns at the new resolution."""
    runs = trained
    result = invoke("finetune", "--workdir", runs, "--img-size", "24", "--epochs", "1", "--teacher-epochs", "1",
                    "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", "--teacher-bn", "full",
                    "--name", "finetune-full")
    assert result.exit_code == 0, result.output
    original = read_checkpoint(runs / "teach")
    fixres = read_checkpoint(next(runs.glob(f"teach-fixres-24-full-{original.sha256[:8]}-*")))
    assert fixres.meta["fixres"]["bn"] == "full"
    assert fixres.meta["fixres"]["trainable"] == len(list(timm.create_model("regnety_002").parameters()))
    old, new = original.state_dict(), fixres.state_dict()
    assert any(k.endswith("conv.weight") and not torch.equal(old[k], new[k]) for k in old)  # convolutions learned too
