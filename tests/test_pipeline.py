"""`distill pipeline`: a recipe runs its stages, re-runs as a no-op, re-runs what changed and what follows."""

from __future__ import annotations

from pathlib import Path

from conftest import invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint

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


TINY_LABEL = "DeiT-Ti/4 depth 1 width 32 heads 2 @ 16px (deit_tiny_distilled…, 15.2k params)"


def _write(path: Path, data: Path, student_extra: str = "") -> Path:
    path.write_text(RECIPE.format(data=data, student_extra=student_extra))
    return path


def _stamp(run: str) -> int:
    return Path("runs", run, "model.safetensors").stat().st_mtime_ns


def test_two_stage_recipe_runs_then_reuses_then_reruns_what_changed(tmp_path, folder):
    recipe = _write(tmp_path / "two.toml", folder)
    first = invoke("pipeline", recipe)
    assert first.exit_code == 0, first.output
    summary = first.output[first.output.rindex("pipeline"):]  # the table after the runs: each model as it is
    assert f"{TINY_LABEL} │" in summary and "RegNetY-200MF @ 16px (regnety_002, 2.8M params)" in summary
    assert "fp32 at 16 px" in summary
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
    assert TINY_LABEL in plan.output
    assert (_stamp("teach"), _stamp("student")) == stamps  # a dry run trains nothing
    assert "(needs --overwrite)" in plan.output
    # a finished run is never replaced without --overwrite: refused before anything trains
    refused = invoke("pipeline", recipe)
    assert refused.exit_code == 2, refused.output
    assert "would replace 1 run(s) made otherwise" in refused.output and "alpha: 0.5 -> 0.3" in refused.output
    assert "--overwrite" in refused.output and "Traceback" not in refused.output
    assert (_stamp("teach"), _stamp("student")) == stamps
    changed = invoke("pipeline", recipe, "--overwrite")
    assert changed.exit_code == 0, changed.output
    assert "holds a finished run with different settings (alpha: 0.5 -> 0.3); it is replaced" in changed.output
    assert _stamp("teach") == stamps[0] and _stamp("student") != stamps[1]
    assert read_checkpoint("runs/student").meta["distillation"]["alpha"] == 0.3

    # a change upstream re-runs the teacher and, through its new sha256, the student after it
    recipe.write_text(recipe.read_text().replace('model = "regnety_002"', 'model = "regnety_002"\nseed = 1'))
    plan = invoke("pipeline", recipe, "--dry-run")
    assert "seed: 0 -> 1" in plan.output and "after teach" in plan.output
    rerun = invoke("pipeline", recipe, "--overwrite")
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


def test_a_dry_run_of_the_papers_recipe_in_an_empty_folder_lists_every_stage_with_its_resolution():
    result = invoke("pipeline", "deit-b", "--dry-run")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    table = {cells[0]: cells for cells in ([c.strip() for c in row.strip("│").split("│")] for row in rows)}
    expected = {"teach": "224px", "student": "224px", "teach-fixres": "384px", "finetune": "384px",
                "transfer-cifar10": "384px", "transfer-cifar100": "384px", "transfer-flowers102": "384px",
                "transfer-stanford_cars": "384px"}
    assert {stage: cells[1].split("@ ")[1].split()[0] for stage, cells in table.items()} == expected
    assert table["teach"][1] == "RegNetY-16GF @ 224px (regnety_160)"  # ImageNet's classes are unknown before loading
    assert table["student"][1] == "DeiT-B/16 @ 224px (deit_base_distilled_patch16_224)"
    assert table["finetune"][1] == "DeiT-B/16 @ 384px (deit_base_distilled_patch16…)"
    assert all(cells[3] == "run" for cells in table.values())
    assert not Path("runs").exists()  # planning writes nothing


def test_a_recipe_with_a_conflict_fails_its_dry_run_with_a_sentence(tmp_path, folder):
    other = make_image_folder(tmp_path / "other", ["apple", "pear", "plum"])
    cases = {
        '[finetune]\nres = 22\n': "Stage finetune: Resolution 22 is not a multiple of the patch size 4",
        '[finetune]\nres = 24\nimg_size = 16\n': "res is the older spelling of img_size; give one of them (here 24 and 16)",
        '[transfer]\ndata_dir = "{other}"\ndistillation = "soft"\n': "--distillation soft needs a teacher trained on the "
                                                                 "target",
    }
    cases = {key.replace("{other}", str(other)): value for key, value in cases.items()}
    cases[f'data_dir = "{other}"'] = ("Stage student: The teacher runs/teach/model.safetensors was trained on other "
                                      "classes than the dataset")
    for extra, expected in cases.items():
        recipe = tmp_path / "conflict.toml"
        student = extra if extra.startswith("data_dir") else ""
        recipe.write_text(RECIPE.format(data=folder, student_extra=student) + ("" if student else extra))
        result = invoke("pipeline", recipe, "--dry-run")
        assert result.exit_code == 2 and expected in result.output, (extra, result.output)
        assert "Traceback" not in result.output and not Path("runs").exists()


def test_set_overrides_every_stage_one_stage_or_is_refused(tmp_path, folder):
    recipe = _write(tmp_path / "two.toml", folder)
    result = invoke("pipeline", recipe, "--set", "seed=3", "--set", "student.depth=2", "--only", "teach")
    assert result.exit_code == 0, result.output
    assert read_checkpoint("runs/teach").meta["config"]["seed"] == 3
    plan = invoke("pipeline", recipe, "--set", "seed=3", "--set", "student.depth=2", "--dry-run")
    assert "reuse" in plan.output  # the same overrides give the same teacher
    for bad, said in (("studnet.depth=2", "no stage 'studnet'; did you mean 'student'"), ("depht=2", "did you mean 'depth'"),
                      ("teach.res=3", "stage teach has no key 'res'"), ("depth", "takes KEY=VALUE")):
        refused = invoke("pipeline", recipe, "--set", bad, "--dry-run")
        assert refused.exit_code == 2 and said in refused.output, (bad, refused.output)
