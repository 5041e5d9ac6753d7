"""Every shipped recipe runs through every stage: the real pipeline, shrunk by overrides only.

A tiny image folder replaces the recipe's data, one epoch replaces its schedule, a tiny width and depth
and a small resolution replace its model; everything else (precision, augmentation, optimiser, the lr
rule, repeated augmentation, FixRes, transfer targets) is the recipe's own and goes through the same
code as the full run. A recipe added to distill/recipes/ is covered the day it is added.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint
from distill.config import NOT_SHARED, STAGES, config_fields, read_toml, stage_section, transfer_targets
from distill.config import CONFIGS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "distill" / "recipes").glob("*.toml"))
DIGITS = [str(d) for d in range(10)]  # the quickstart's class names, so its class filters keep working

SHRINK = {"epochs": 1, "batch_size": 4, "global_batch": 8, "num_workers": 0, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
          "num_heads": 2, "warmup_epochs": 0, "train_subset": 40, "eval_every": 1}
SHRINK_SCOPED = {"teach.model": "regnety_002", "finetune.img_size": 48, "finetune.teacher_epochs": 1}


VIT_SIZES = ("patch_size", "embed_dim", "depth", "num_heads")  # refused for a convnet student, which timm sizes


def vit_student(values: dict) -> bool:
    return str(values.get("student", {}).get("model", "deit")).startswith(("deit", "vit"))


def shrink_flags(data: Path, values: dict) -> list[str]:
    """The shrinking; a convnet student keeps timm's size. Every model trains at 32 px: at 16 px a stride-32 network's
    last BatchNorm normalises one value per image, and 4 images in bf16 overflowed it (NaN within 10 steps, a
    ResNet-50 student and, on an AMX CPU, the RegNetY teacher)."""
    shrink = {k: v for k, v in SHRINK.items() if vit_student(values) or k not in VIT_SIZES}
    flags = [f"data_dir={data}", "workdir=runs"]
    flags += [f"{key}={value}" for key, value in {**shrink, **SHRINK_SCOPED}.items()]
    return [part for flag in flags for part in ("--set", flag)]


def overridden(stage: str) -> set[str]:
    keys = set(SHRINK) - NOT_SHARED.get(stage, set()) | {"data_dir", "dataset", "workdir", "name", "overwrite",
                                                           "teacher", "checkpoint"}
    return keys | {k.split(".")[1] for k in SHRINK_SCOPED if k.startswith(stage + ".")}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_every_stage_shrunk(recipe, tmp_path):
    data = make_image_folder(tmp_path / "data", DIGITS, train=4, test=2, size=16)
    values = read_toml(recipe)
    flags = shrink_flags(data, values)
    plan = invoke("pipeline", recipe, *flags, "--dry-run")
    assert plan.exit_code == 0, plan.output
    result = invoke("pipeline", recipe, *flags)
    assert result.exit_code == 0, result.output

    runs = Path("runs")
    made = {}
    for stage in ("teach", "student", "finetune"):
        if stage in values:
            made[stage] = read_checkpoint(runs / stage)
    targets = transfer_targets(values)
    for target in targets:
        made[f"transfer-{target}" if target else "transfer"] = read_checkpoint(runs / (f"transfer-{target}" if target
                                                                                        else "transfer-data"))
    assert made, "the recipe trained nothing"

    # what the recipe says reaches the checkpoint, wherever the shrinking did not override it
    for label, ckpt in made.items():
        stage = label.split("-")[0]
        section = stage_section(values, stage, label.partition("-")[2] or None if stage == "transfer" else None)
        fields = {f.name for f in config_fields(CONFIGS[stage])}
        for key, value in section.items():
            if key in fields and key not in overridden(stage):
                recorded = ckpt.meta["config"].get(key)
                assert recorded == value or str(recorded) == str(value), (label, key, recorded, value)

    # the chain: each stage's parent is the one before it, at the resolutions the recipe implies
    if "teach" in made and "student" in made:
        assert made["student"].meta["parent"]["sha256"] == made["teach"].sha256
        assert made["student"].img_size == made["teach"].img_size == SHRINK["img_size"]
    if "finetune" in made:
        tuned = made["finetune"]
        higher = SHRINK_SCOPED["finetune.img_size"]
        assert tuned.img_size == higher and tuned.meta["parent"]["sha256"] == made["student"].sha256
        if tuned.meta["distillation"]["kind"] != "none":
            adapted = read_checkpoint(tuned.meta["teacher"]["path"])
            assert adapted.stage == "teach-fixres" and adapted.img_size == higher
            assert adapted.meta["parent"]["sha256"] == made["teach"].sha256
    parent = made.get("finetune") or made.get("student")
    for label, ckpt in made.items():
        if label.startswith("transfer"):
            assert ckpt.meta["parent"]["sha256"] == parent.sha256
            assert ckpt.img_size == parent.img_size


def test_the_recipe_test_covers_every_stage_somewhere():
    covered = set()
    for recipe in RECIPES:
        values = read_toml(recipe)
        covered |= {stage for stage in STAGES if stage in values}
    assert covered == set(STAGES)
