"""`distill pipeline`: one recipe runs teach -> student -> finetune -> transfer, each stage feeding the next.

A stage whose output exists with the same resolved config and the same parent is reused; one that
was interrupted resumes; one whose config or parent changed runs again, and so does everything
downstream of it (their parent's sha256 changes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.table import Table

from distill import stages
from distill.checkpoint import MODEL_FILE, Checkpoint
from distill.config import CONFIGS, StageConfig, check_keys, check_recipe, read_toml, resolve, stage_section, transfer_targets
from distill.engine import console
from distill.errors import DistillError


@dataclass
class Step:
    """One stage of a pipeline, with its config resolved and its parent wired in."""

    label: str
    stage: str
    config: StageConfig


def find_recipe(name: str | Path | None) -> Path:
    """A recipe path, or the name of one shipped with distill (quickstart, cifar10-cpu, deit-b, ...)."""
    if name is None:
        name = "quickstart"
    path = Path(name)
    if path.exists():
        return path
    shipped = resources.files("distill") / "recipes" / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name.removesuffix(".toml") for p in (resources.files("distill") / "recipes").iterdir()
                       if p.name.endswith(".toml"))
    raise DistillError(f"Recipe {name} does not exist (shipped recipes: {', '.join(available)}).")


def build_steps(recipe_path: Path, overrides: dict[str, Any] | None = None) -> list[Step]:
    """Every stage the recipe names, in pipeline order, each reading its parent from the step before."""
    recipe = read_toml(recipe_path)
    check_recipe(recipe, str(recipe_path))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    steps: list[Step] = []
    outputs: dict[str, Path] = {}

    def config_for(stage: str, target: str | None = None, wiring: dict[str, Any] | None = None) -> StageConfig:
        cls = CONFIGS[stage]
        values = check_keys(cls, stage_section(recipe, stage, target), str(recipe_path))
        known = {k: v for k, v in overrides.items() if k in cls.__dataclass_fields__}
        for key, value in (wiring or {}).items():
            values.setdefault(key, value)
        values.setdefault("overwrite", True)  # a changed recipe means: run the stage again
        return resolve(cls, overrides=known, recipe_values=values)

    if "teach" in recipe:
        cfg = config_for("teach")
        steps.append(Step("teach", "teach", cfg))
        outputs["teach"] = cfg.run_dir() / MODEL_FILE
    if "student" in recipe:
        cfg = config_for("student", wiring={"teacher": outputs.get("teach")} if "teach" in outputs else None)
        steps.append(Step("student", "student", cfg))
        outputs["student"] = cfg.run_dir() / MODEL_FILE
    if "finetune" in recipe:
        cfg = config_for("finetune", wiring={"checkpoint": outputs.get("student")} if "student" in outputs else None)
        steps.append(Step("finetune", "finetune", cfg))
        outputs["finetune"] = cfg.run_dir() / MODEL_FILE
    parent = outputs.get("finetune") or outputs.get("student")
    for target in transfer_targets(recipe):
        wiring: dict[str, Any] = {"checkpoint": parent} if parent else {}
        if target:
            wiring["name"] = f"transfer-{target}"
        cfg = config_for("transfer", target, wiring)
        steps.append(Step(f"transfer-{target}" if target else "transfer", "transfer", cfg))
    if not steps:
        raise DistillError(f"Recipe {recipe_path} names no stage; add [teach], [student], [finetune] or [transfer] sections.")
    return steps


def select(steps: list[Step], only: str | None, start: str | None) -> list[Step]:
    labels = [s.label for s in steps] + sorted({s.stage for s in steps})
    for wanted in (only, start):
        if wanted is not None and wanted not in labels:
            raise DistillError(f"This recipe has no stage '{wanted}' (it has {', '.join(s.label for s in steps)}).")
    if only is not None:
        return [s for s in steps if only in (s.label, s.stage)]
    if start is not None:
        first = next(i for i, s in enumerate(steps) if start in (s.label, s.stage))
        return steps[first:]
    return steps


def _runner(stage: str):
    return {"teach": stages.teach, "student": stages.student, "finetune": stages.finetune, "transfer": stages.transfer}[stage]


def _check_parent_exists(step: Step) -> None:
    for key in ("teacher", "checkpoint"):
        path = getattr(step.config, key, None)
        if path is not None and not Path(path).exists():
            raise DistillError(f"Stage {step.label} needs {path}, which does not exist yet; run the earlier stages first "
                               "(without --only/--from).")


def plan(steps: list[Step]) -> list[stages.PlanItem]:
    """What would run, be reused or resumed, and why, without training anything."""
    items: list[stages.PlanItem] = []
    upstream_pending = False
    for step in steps:
        parent_path = getattr(step.config, "teacher", None) or getattr(step.config, "checkpoint", None)
        if upstream_pending or (parent_path is not None and not Path(parent_path).exists()):
            items.append(stages.PlanItem(step.label, step.config.run_dir(), "run", "after the stage before it runs"))
            upstream_pending = True
            continue
        before = len(items)
        _runner(step.stage)(step.config, plan=items)
        if any(item.action != "reuse" for item in items[before:]):
            upstream_pending = True
    return items


def print_plan(items: list[stages.PlanItem]) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("stage", "folder", "action", "why"):
        table.add_column(column)
    colours = {"reuse": "green", "run": "yellow", "resume": "cyan", "re-run": "magenta"}
    for item in items:
        table.add_row(item.stage, str(item.run_dir), f"[{colours[item.action]}]{item.action}[/]", item.why)
    console.print(table)


def run(steps: list[Step]) -> list[tuple[Step, Checkpoint, str, float]]:
    """Run the steps in order; returns (step, checkpoint, what happened, seconds) for each."""
    results = []
    for step in steps:
        _check_parent_exists(step)
        before = plan([step])
        action = before[-1].action if before else "run"
        console.rule(f"[bold]{step.label}[/]  ({action})")
        started = time.perf_counter()
        ckpt = _runner(step.stage)(step.config)
        results.append((step, ckpt, action, time.perf_counter() - started))
    return results


def summary_table(results: list[tuple[Step, Checkpoint, str, float]]) -> Table:
    table = Table(title="pipeline", title_justify="left")
    for column, justify in (("stage", "left"), ("model", "left"), ("res", "right"), ("params", "right"),
                            ("top-1", "right"), ("time", "right"), ("", "left")):
        table.add_column(column, justify=justify)
    for step, ckpt, action, seconds in results:
        metrics = ckpt.meta.get("metrics", {})
        params = ckpt.meta.get("params", 0)
        table.add_row(step.label, ckpt.model_name, str(ckpt.img_size), f"{params / 1e6:.2f}M",
                      f"{metrics.get('top1', float('nan')):.2f}",
                      f"{seconds:.0f} s" if action != "reuse" else f"({metrics.get('train_seconds', 0):.0f} s)",
                      "reused" if action == "reuse" else action)
    return table

