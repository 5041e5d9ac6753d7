"""`distill pipeline`: one recipe runs teach -> student -> finetune -> transfer, each stage feeding the next.

A stage whose output exists with the same resolved config and the same parent is reused; one that
was interrupted resumes; one whose config or parent changed runs again with --overwrite, and so does
everything downstream of it (their parent's sha256 changes). Without --overwrite a pipeline that would
replace a run refuses before it trains anything, as a single stage's command does. A dry run plans every
stage exactly as the run would, with the outputs not written yet stood in by their expected headers.
"""

from __future__ import annotations

import difflib
import os
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from distill.config import (CONFIGS, NOT_SHARED, STAGES, StageConfig, check_keys, check_recipe, config_fields, layer,
                            read_toml, resolve, stage_section, transfer_targets)
from distill.console import console
from distill.errors import DistillError
from distill.stages.common import Expected, Expecting, StagePlan
from distill.stages.runner import PLANNERS, run_stage
from distill.training.runfolder import IDENTITY_FILE
from distill.weights.checkpoint import MODEL_FILE, Checkpoint
from distill.weights.naming import measured_at, model_label


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
    raise DistillError(f"Recipe {name} does not exist (shipped recipes: {', '.join(shipped_recipes())}).")


def shipped_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in (resources.files("distill") / "recipes").iterdir()
                  if p.name.endswith(".toml"))


def parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """`--set KEY=VALUE` (every stage that has KEY), `--set STAGE.KEY=VALUE`, `--set transfer.TARGET.KEY=VALUE`.

    Values are read as TOML (1, 0.5, true, "text"); anything else is taken as a string (a path).
    """
    scoped: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"--set takes KEY=VALUE or STAGE.KEY=VALUE, not '{item}'.")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        *scope, name = key.strip().split(".")
        if scope and scope[0] not in STAGES:
            near = difflib.get_close_matches(scope[0], list(STAGES), n=1)
            raise DistillError(f"--set {item}: no stage '{scope[0]}'" + (f"; did you mean '{near[0]}'?" if near else "."))
        if len(scope) > 2 or (len(scope) == 2 and scope[0] != "transfer"):
            raise DistillError(f"--set {item}: only transfer has named targets (transfer.NAME.KEY=VALUE).")
        scoped.setdefault(".".join(scope), {})[name] = value
    every_key = {f.name for cls in CONFIGS.values() for f in config_fields(cls)}
    for scope, values in scoped.items():
        known = every_key if not scope else {f.name for f in config_fields(CONFIGS[scope.split(".")[0]])}
        for name in values:
            if name not in known:
                near = difflib.get_close_matches(name, sorted(known), n=1)
                raise DistillError(f"--set: {'no stage takes' if not scope else f'stage {scope} has no'} key '{name}'"
                                   + (f"; did you mean '{near[0]}'?" if near else "."))
    return scoped


def build_steps(recipe_path: Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> list[Step]:
    """Every stage the recipe names, in pipeline order, each reading its parent from the step before.

    Above the recipe come `overrides` (every stage that has the key) and the `--set` items, most specific last.
    """
    recipe = read_toml(recipe_path)
    check_recipe(recipe, str(recipe_path))
    scoped = parse_sets(sets)
    scoped[""] = layer(scoped.get("", {}), {k: v for k, v in (overrides or {}).items() if v is not None})
    steps: list[Step] = []
    outputs: dict[str, Path] = {}

    def config_for(stage: str, target: str | None = None, wiring: dict[str, Any] | None = None) -> StageConfig:
        cls = CONFIGS[stage]
        values = check_keys(cls, stage_section(recipe, stage, target), str(recipe_path))
        for key, value in (wiring or {}).items():
            values.setdefault(key, value)
        given: dict[str, Any] = {}
        for scope in ["", stage] + ([f"{stage}.{target}"] if target else []):
            skip = NOT_SHARED.get(stage, set()) if scope == "" else set()  # as a recipe's top-level keys
            given = layer(given, {k: v for k, v in scoped.get(scope, {}).items()
                                  if k in cls.__dataclass_fields__ and k not in skip})
        return resolve(cls, overrides=given, recipe_values=values)

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


def plan_step(step: Step, expecting: Expecting) -> StagePlan:
    """A step's plan; a refusal names the stage it comes from."""
    try:
        return PLANNERS[step.stage](step.config, expecting)
    except DistillError as error:
        raise DistillError(f"Stage {step.label}: {error.sentence}") from None


@dataclass
class PlanRow:
    """One line of a dry run: a run folder, what would happen to it, and why."""

    label: str
    plan: StagePlan
    action: str  # run | reuse | resume | re-run
    why: str


def describe(label: str, plan: StagePlan) -> PlanRow:
    status = plan.status()
    if status is None:
        waiting = plan.parent if isinstance(plan.parent, Expected) else plan.teacher
        if (plan.run_dir / MODEL_FILE).exists() or (plan.run_dir / IDENTITY_FILE).exists():
            why = f"after {waiting.path.parent.name}, whose new output replaces its parent"
            return PlanRow(label, plan, "re-run", why + ("" if plan.config.overwrite else " (needs --overwrite)"))
        return PlanRow(label, plan, "run", f"after {waiting.path.parent.name}")
    action, why = {
        "finished": ("reuse", "finished with the same settings and parent"),
        "interrupted": ("resume", f"interrupted at epoch {(status.progress or {}).get('epoch', 0) + 1}"
                        if status.progress else "started, nothing saved yet"),
        "empty": ("run", "no run yet"),
        "changed-finished": ("re-run", f"changed: {status.detail}"),
        "changed-interrupted": (("re-run", f"changed: {status.detail}") if status.progress is not None else
                                ("run", f"started with other settings, nothing saved ({status.detail})")),
        "damaged": ("re-run", f"its saved state is damaged: {status.detail}"),
    }[status.state]
    if action == "re-run" and not plan.config.overwrite:
        why += " (needs --overwrite)"
    return PlanRow(label, plan, action, why)


def plan(steps: list[Step]) -> list[PlanRow]:
    """What every step would do, resolved against the parents it would get, without training anything."""
    rows: list[PlanRow] = []
    expecting: dict[Path, Checkpoint] = {}
    for step in steps:
        resolved = plan_step(step, expecting)
        for label, each in [(b.stage, b) for b in resolved.before] + [(step.label, resolved)]:
            row = describe(label, each)
            rows.append(row)
            if row.action != "reuse":
                expecting[(each.run_dir / MODEL_FILE).resolve()] = each.expected()
    return rows


def print_plan(rows: list[PlanRow]) -> None:
    workdirs = sorted({str(row.plan.config.workdir) for row in rows})
    table = Table(title=f"plan, in {', '.join(workdirs)}", title_justify="left")
    for column in ("stage", "model", "folder", "action", "why"):
        table.add_column(column)
    colours = {"reuse": "green", "run": "yellow", "resume": "cyan", "re-run": "magenta"}
    for row in rows:
        model = row.plan.model
        label = model_label(model.get("name", "?"), model.get("args"), img_size=row.plan.config.img_size)
        table.add_row(row.label, escape(label), escape(row.plan.run_dir.name), f"[{colours[row.action]}]{row.action}[/]",
                      escape(row.why))
    console.print(table)
    for row in rows:
        for note in row.plan.notes:
            console.print(f"{row.label}: {escape(note)}", soft_wrap=True)


def _check_parent_exists(step: Step) -> None:
    for key in ("teacher", "checkpoint"):
        given = getattr(step.config, key, None)
        for path in given if isinstance(given, list) else [given] if given is not None else []:
            if Path(path).exists():
                continue
            raise DistillError(f"Stage {step.label} needs {path}, which does not exist yet; run the earlier stages first "
                               "(without --only/--from).")


def run(steps: list[Step]) -> list[tuple[Step, Checkpoint, str, float]]:
    """Run the steps in order; returns (step, checkpoint, what happened, seconds) for each. A run the pipeline would
    replace without --overwrite is refused first, before any stage trains."""
    if steps:  # the first step's parents must be there already; the plan stands in the later ones'
        _check_parent_exists(steps[0])
    refused = [row for row in plan(steps) if row.action == "re-run" and not row.plan.config.overwrite]
    if refused:
        listed = "; ".join(f"{row.label} ({row.plan.run_dir}: {row.why.removesuffix(' (needs --overwrite)')})"
                           for row in refused)
        raise DistillError(f"This pipeline would replace {len(refused)} run(s) made otherwise: {listed}. Pass "
                           "--overwrite to run them again (each replaced run is named as it goes), or --workdir to "
                           "start in another folder.")
    results = []
    for step in steps:
        _check_parent_exists(step)
        action = describe(step.label, plan_step(step, {})).action
        if os.environ.get("RANK", "0") == "0":  # one header, not one per process
            console.rule(f"[bold]{step.label}[/]  ({action})")
        started = time.perf_counter()
        ckpt = run_stage(lambda step=step: plan_step(step, {}))
        results.append((step, ckpt, action, time.perf_counter() - started))
    return results


def summary_table(results: list[tuple[Step, Checkpoint, str, float]]) -> Table:
    table = Table(title="pipeline", title_justify="left")
    for column, justify in (("stage", "left"), ("model", "left"), ("top-1", "right"), ("measured", "left"),
                            ("time", "right"), ("", "left")):
        table.add_column(column, justify=justify)
    for step, ckpt, action, seconds in results:
        metrics = ckpt.meta.get("metrics", {})
        table.add_row(step.label, escape(ckpt.label()), f"{metrics.get('top1', float('nan')):.2f}",
                      measured_at(metrics, ckpt.meta),
                      f"{seconds:.0f} s" if action != "reuse" else f"({metrics.get('train_seconds', 0):.0f} s)",
                      "reused" if action == "reuse" else action)
    return table
