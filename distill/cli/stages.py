"""The stage commands (teach, student, finetune, cache-teacher, transfer) and `pipeline`: one flag per config field."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from distill.cli.app import _console, _debug, _is_main_process, app, run_guarded
from distill.config import CONFIGS, StageConfig, config_fields, field_types, resolve


def _option_for(f: Any, kind: type) -> inspect.Parameter:
    meta = f.metadata
    flag = meta.get("flag") or ("--" + f.name.replace("_", "-"))
    if kind is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag[2:]}"
    default = None if f.default is dataclasses.MISSING else f.default
    shown = None if default is None else ("on" if default is True else "off" if default is False else str(default))
    help_text = escape(meta.get("help", ""))
    annotation = Optional[kind]
    option = typer.Option(None, flag, help=help_text, hidden=meta.get("hidden", False),
                          show_default=shown if shown is not None else False, rich_help_panel=meta.get("panel"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def stage_command(stage: str, runner: Callable[[StageConfig], Any], doc: str) -> None:
    """Register `distill <stage>` with one flag per config field, plus --recipe and --debug."""
    cls = CONFIGS[stage]
    kinds = field_types(cls)
    params = [inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--recipe", help=escape("TOML recipe: flat keys, or a pipeline recipe's "
                                                     "top level plus its [" + stage + "] section. Flags override it."),
                                                     rich_help_panel="Run"))]
    params += [_option_for(f, kinds[f.name]) for f in config_fields(cls) if f.name not in getattr(cls, "unused", ())]
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--debug", help="Show full tracebacks.", rich_help_panel="Run")))

    def command(**kwargs: Any) -> None:
        recipe, debug = kwargs.pop("recipe"), kwargs.pop("debug")
        kwargs.update({name: None for name in getattr(cls, "unused", ())})
        _debug["on"] = _debug["on"] or debug

        def action() -> None:
            config = resolve(cls, recipe, kwargs)
            ckpt = runner(config)
            if _is_main_process() and ckpt is not None:
                from distill.tools.summary import print_summary

                print_summary(ckpt)

        run_guarded(action)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = stage
    app.command(stage)(command)


def _stages() -> dict[str, Callable[[StageConfig], Any]]:
    from distill import stages

    return {"teach": stages.teach, "student": stages.student, "finetune": stages.finetune, "transfer": stages.transfer,
            "cache-teacher": stages.cache_teacher}


def _lazy(stage: str) -> Callable[[StageConfig], Any]:
    return lambda config: _stages()[stage](config)


stage_command("teach", _lazy("teach"),
              "Train a teacher (RegNetY by default) with the DeiT recipe. With no arguments: a small RegNetY on the "
              "embedded digits, in about two minutes on a laptop CPU.")
stage_command("student", _lazy("student"),
              "Distil a DeiT student from a teacher: --distillation none|soft|hard, --token/--no-token "
              "(default: hard with the distillation token, the paper's best).")
stage_command("finetune", _lazy("finetune"),
              "FixRes fine-tune a student at a higher --img-size: position embeddings resampled (bicubic), the teacher adapted to the "
              "same resolution, distillation kept.")
stage_command("cache-teacher", _lazy("cache-teacher"),
              "Run a teacher once over K augmented views of every training image and keep its top-k probabilities, so "
              "that `distill student --teacher-cache DIR` trains with no teacher forward at all (FKD).")
stage_command("transfer", _lazy("transfer"),
              "Transfer a student to --dataset (cifar10, cifar100, flowers102, stanford_cars, any hub id) or --data-dir, "
              "with new heads; --attn-only, --head-only, or --teacher to keep distilling.")


@app.command()
def pipeline(
    recipe: Optional[str] = typer.Argument(None, help=escape("A recipe file, or the name of a shipped one (quickstart, "
                                           "cifar10-cpu, deit-ti, deit-s, deit-b, deit3-s, deit3-b) [default: quickstart].")),
    only: Optional[str] = typer.Option(None, "--only", help="Run just this stage (its parent must exist)."),
    start: Optional[str] = typer.Option(None, "--from", help="Start at this stage; earlier outputs are taken as they are."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run, be reused or resumed, and why."),
    workdir: Optional[Path] = typer.Option(None, help=escape("Work folder [default: the recipe's].")),
    mixed_precision: Optional[str] = typer.Option(None, help="Override every stage's precision: no, bf16 or fp16."),
    num_workers: Optional[int] = typer.Option(None, help="Override every stage's data-loading workers."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe value: KEY=VALUE for every stage "
                                             "that has KEY, STAGE.KEY=VALUE for one stage, transfer.TARGET.KEY=VALUE for "
                                             "one transfer target (repeatable; VALUE is read as TOML)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run again the stages whose settings or parent changed, "
                                   "replacing their finished or interrupted runs (without it the pipeline refuses)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
) -> None:
    """Run every stage of a recipe, each feeding the next; finished stages are reused, interrupted ones resumed."""
    _debug["on"] = _debug["on"] or debug

    def action() -> None:
        from distill.stages import pipeline as pipe

        path = pipe.find_recipe(recipe)
        overrides = {"workdir": workdir, "mixed_precision": mixed_precision, "num_workers": num_workers,
                     "overwrite": overwrite or None}
        steps = pipe.select(pipe.build_steps(path, overrides, sets), only, start)
        if dry_run:
            if _is_main_process():
                pipe.print_plan(pipe.plan(steps))
            return
        results = pipe.run(steps)
        if _is_main_process():
            _console().print(pipe.summary_table(results))

    run_guarded(action)
