"""`distill transfer`: new heads on a new target; full, attention-only and head-only; with a target teacher."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    source = make_image_folder(root / "source", ["circle", "square", "star"])
    target = make_image_folder(root / "target", ["apple", "pear", "plum", "fig"], seed=1)
    runs = root / "runs"
    assert invoke("teach", "--data-dir", source, "--workdir", runs, *TINY).exit_code == 0
    result = invoke("student", "--workdir", runs, *TINY, *TINY_VIT)
    assert result.exit_code == 0, result.output
    return runs, target


def _changed(parent, child):
    old, new = parent.state_dict(), child.state_dict()
    return {k for k in old if k in new and old[k].shape == new[k].shape and not torch.equal(old[k], new[k])}


@pytest.mark.parametrize("mode", ["full", "attn", "head"])
def test_transfer_trains_exactly_the_chosen_parameters(pretrained, mode):
    runs, target = pretrained
    flags = {"full": [], "attn": ["--attn-only"], "head": ["--head-only"]}[mode]
    result = invoke("transfer", "--workdir", runs, "--data-dir", target, "--name", f"t-{mode}", *TINY, *flags,
                    "--opt", "adamw", "--lr", "0.05")
    assert result.exit_code == 0, result.output
    parent = read_checkpoint(runs / "student")
    child = read_checkpoint(runs / f"t-{mode}")
    assert child.classes == ["apple", "fig", "pear", "plum"] and child.model_args["num_classes"] == 4
    assert child.state_dict()["head.weight"].shape[0] == 4 and child.state_dict()["head_dist.weight"].shape[0] == 4
    assert child.meta["parent"]["sha256"] == parent.sha256 and child.meta["trainable"] == mode
    changed = _changed(parent, child)
    if mode == "head":
        assert changed == set()  # only the new heads (whose shape changed) learned
    elif mode == "attn":
        assert changed and all(k.startswith("blocks.") and ".attn." in k for k in changed)
    else:
        assert any(".mlp." in k for k in changed) and "pos_embed" in changed
    assert len(child.meta["metrics"]["per_class_top1"]) == 4
    assert "per-class top-1" in result.output and "plum" in result.output


def test_transfer_keeps_distilling_from_a_teacher_trained_on_the_target(pretrained):
    runs, target = pretrained
    made = invoke("teach", "--data-dir", target, "--workdir", runs, "--name", "teach-target",
                  "--init", runs / "teach", *TINY)
    assert made.exit_code == 0, made.output
    target_teacher = read_checkpoint(runs / "teach-target")
    assert target_teacher.meta["parent"]["sha256"] == read_checkpoint(runs / "teach").sha256
    assert target_teacher.classes == ["apple", "fig", "pear", "plum"]
    result = invoke("transfer", "--workdir", runs, "--data-dir", target, "--name", "t-distilled", *TINY,
                    "--teacher", runs / "teach-target")
    assert result.exit_code == 0, result.output
    child = read_checkpoint(runs / "t-distilled")
    assert child.meta["teacher"]["sha256"] == target_teacher.sha256
    assert child.meta["distillation"]["kind"] == "hard" and "disagreement" in child.meta["metrics"]


def test_transfer_refusals(pretrained):
    runs, target = pretrained
    assert "--dataset" in invoke("transfer", "--workdir", runs, *TINY).output
    wrong = invoke("transfer", "--workdir", runs, "--data-dir", target, "--name", "bad", *TINY, "--teacher", runs / "teach")
    assert wrong.exit_code == 2 and "trained on other classes" in wrong.output
    both = invoke("transfer", "--workdir", runs, "--data-dir", target, "--attn-only", "--head-only", *TINY)
    assert both.exit_code == 2 and "one of --attn-only and --head-only" in both.output


def test_from_scratch_baseline_has_the_same_architecture(pretrained):
    runs, target = pretrained
    result = invoke("transfer", "--workdir", runs, "--data-dir", target, "--name", "t-scratch", *TINY, "--from-scratch")
    assert result.exit_code == 0, result.output
    child = read_checkpoint(runs / "t-scratch")
    assert child.meta["from_scratch"] is True and child.model_name == read_checkpoint(runs / "student").model_name


def test_transfer_takes_the_fine_tune_of_the_current_student_and_refuses_a_stale_one(tmp_path):
    source = make_image_folder(tmp_path / "source", ["circle", "square", "star"])
    target = make_image_folder(tmp_path / "target", ["apple", "pear"], seed=1)
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", source, "--workdir", runs, *TINY).exit_code == 0
    assert invoke("student", "--workdir", runs, *TINY, *TINY_VIT).exit_code == 0
    tuned = invoke("finetune", "--workdir", runs, "--res", "24", *TINY[:2], "--batch-size", "8", "--num-workers", "0",
                   "--no-teacher")
    assert tuned.exit_code == 0, tuned.output
    moved = invoke("transfer", "--workdir", runs, "--data-dir", target, *TINY)
    assert moved.exit_code == 0, moved.output
    assert read_checkpoint(runs / "transfer-target").meta["parent"]["sha256"] == read_checkpoint(runs / "finetune").sha256
    assert f"parent: {runs / 'finetune' / 'model.safetensors'}" in moved.output
    retrained = invoke("student", "--workdir", runs, *TINY, *TINY_VIT, "--seed", "1", "--overwrite")
    assert retrained.exit_code == 0, retrained.output
    stale = invoke("transfer", "--workdir", runs, "--data-dir", target, *TINY, "--name", "again")
    assert stale.exit_code == 2 and "was not fine-tuned from" in stale.output and "--checkpoint" in stale.output
