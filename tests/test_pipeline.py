"""`distill pipeline`: a recipe runs its stages, re-runs as a no-op, re-runs what changed and what follows."""

from __future__ import annotations

from pathlib import Path

from conftest import invoke
from distill.checkpoint import read_checkpoint

RECIPE = """
workdir = "runs"
data_dir = "{data}"
epochs = 1
batch_size = 8
num_workers = 0
img_size = 16
warmup_epochs = 0

[teach]
model = "regnety_002"

[student]
patch_size = 4
embed_dim = 32
depth = 1
num_heads = 2
{student_extra}
"""


def _write(path: Path, data: Path, student_extra: str = "") -> Path:
    path.write_text(RECIPE.format(data=data, student_extra=student_extra))
    return path


def _stamp(run: str) -> int:
    return Path("runs", run, "model.safetensors").stat().st_mtime_ns


def test_two_stage_recipe_runs_then_reuses_then_reruns_what_changed(tmp_path, folder):
    recipe = _write(tmp_path / "two.toml", folder)
    first = invoke("pipeline", recipe)
    assert first.exit_code == 0, first.output
    teacher, student = read_checkpoint("runs/teach"), read_checkpoint("runs/student")
    assert student.meta["parent"]["sha256"] == teacher.sha256
    stamps = _stamp("teach"), _stamp("student")

    again = invoke("pipeline", recipe)
    assert again.exit_code == 0, again.output
    assert (_stamp("teach"), _stamp("student")) == stamps
    assert again.output.count("reused") == 2

    _write(recipe, folder, "alpha = 0.3")
    plan = invoke("pipeline", recipe, "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "reuse" in plan.output and "re-run" in plan.output and "alpha: 0.5 -> 0.3" in plan.output
    assert (_stamp("teach"), _stamp("student")) == stamps  # a dry run trains nothing
    changed = invoke("pipeline", recipe)
    assert changed.exit_code == 0, changed.output
    assert _stamp("teach") == stamps[0] and _stamp("student") != stamps[1]
    assert read_checkpoint("runs/student").meta["distillation"]["alpha"] == 0.3

    # a change upstream re-runs the teacher and, through its new sha256, the student after it
    recipe.write_text(recipe.read_text().replace('model = "regnety_002"', 'model = "regnety_002"\nseed = 1'))
    plan = invoke("pipeline", recipe, "--dry-run")
    assert "seed: 0 -> 1" in plan.output and "after the stage before it runs" in plan.output
    rerun = invoke("pipeline", recipe)
    assert rerun.exit_code == 0, rerun.output
    new_teacher = read_checkpoint("runs/teach")
    assert new_teacher.sha256 != teacher.sha256
    assert read_checkpoint("runs/student").meta["parent"]["sha256"] == new_teacher.sha256


def test_only_and_from(tmp_path, folder):
    recipe = _write(tmp_path / "two.toml", folder)
    early = invoke("pipeline", recipe, "--only", "student")
    assert early.exit_code == 2 and "does not exist yet" in early.output
    assert invoke("pipeline", recipe, "--only", "teach").exit_code == 0
    assert not Path("runs/student").exists()
    assert invoke("pipeline", recipe, "--from", "student").exit_code == 0
    assert Path("runs/student/model.safetensors").exists()
    wrong = invoke("pipeline", recipe, "--only", "stduent")
    assert wrong.exit_code == 2 and "no stage 'stduent'" in wrong.output


def test_recipe_errors_name_the_nearest_valid_key(tmp_path, folder):
    bad = tmp_path / "bad.toml"
    bad.write_text('[studnet]\nepochs = 1\n')
    result = invoke("pipeline", bad)
    assert result.exit_code == 2 and "did you mean [student]" in result.output
    bad.write_text('[teach]\nlearning_rate = 1.0\n')
    result = invoke("pipeline", bad)
    assert result.exit_code == 2 and "unknown key 'learning_rate'" in result.output


def test_shipped_recipes_plan_cleanly():
    for name in ("quickstart", "cifar10-cpu", "deit-ti", "deit-s", "deit-b"):
        result = invoke("pipeline", name, "--dry-run")
        assert result.exit_code == 0, (name, result.output)
        assert "teach" in result.output
