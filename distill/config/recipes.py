"""Recipes: defaults <- TOML recipe <- command-line flags. Reading a recipe, checking its keys and values, taking a
stage's part of a pipeline recipe, and writing the resolved config.toml."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from distill.config.checks import parse_schedule, validate
from distill.config.fields import StageConfig, config_fields, field_types
from distill.config.stages import CONFIGS, STAGES
from distill.errors import DistillError


def _coerce(f: dataclasses.Field, kind: type, value: Any, where: str) -> Any:
    """Check one recipe value against its field's type, converting only what is unambiguous."""
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif typing.get_origin(kind) is list:  # several paths (--teacher A --teacher B); one alone is a list of one
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if items and all(isinstance(item, (str, Path)) for item in items):
            return [Path(item) for item in items]
    elif kind is str:
        if isinstance(value, int) and not isinstance(value, bool):  # `threads = 2`, `classes = 3`: what was meant
            value = str(value)
        if isinstance(value, str):
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise DistillError(f"{where}: '{f.name}' must be one of {', '.join(choices)}, not '{value}'.")
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", Path: "a path (string)", str: "a string",
             list[Path]: "a path or a list of paths"}
    raise DistillError(f"{where}: '{f.name}' should be {names.get(kind, getattr(kind, '__name__', kind))}, not {value!r}.")


def check_keys(cls: type[StageConfig], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse unknown keys with the nearest valid one, and values of the wrong type."""
    known = {f.name: f for f in config_fields(cls)}
    kinds = field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(known))}."
            raise DistillError(f"{where}: unknown key '{key}' for stage '{cls.stage}'{hint}")
        checked[key] = _coerce(known[key], kinds[key], value, where)
    return checked


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DistillError(f"Recipe {path} does not exist.") from None
    except IsADirectoryError:
        raise DistillError(f"Recipe {path} is a folder, not a TOML file.") from None
    except tomllib.TOMLDecodeError as error:
        raise DistillError(f"Recipe {path} is not valid TOML: {error}.") from None


def check_recipe(recipe: dict[str, Any], where: str) -> None:
    """Refuse unknown sections and top-level keys that no stage takes, naming the nearest valid one."""
    every_key = {f.name for cls in CONFIGS.values() for f in config_fields(cls)}
    for key, value in recipe.items():
        if isinstance(value, dict):
            if key not in STAGES:
                near = difflib.get_close_matches(key, list(STAGES), n=1)
                hint = f"; did you mean [{near[0]}]?" if near else f"; sections are {', '.join(STAGES)}."
                raise DistillError(f"{where}: unknown section [{key}]{hint}")
        elif key not in every_key:
            near = difflib.get_close_matches(key, sorted(every_key), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "."
            raise DistillError(f"{where}: unknown key '{key}'{hint}")


def transfer_targets(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """[transfer] is one target; [transfer.NAME] tables are several, named."""
    section = recipe.get("transfer")
    if not section:
        return {}
    if all(isinstance(v, dict) for v in section.values()):
        return dict(section)
    return {"": dict(section)}


# Top-level keys a stage does not take from the shared part of a pipeline recipe: a fine-tune trains at its
# --img-size and a transfer keeps its parent's resolution, unless their own section says otherwise.
NOT_SHARED = {"finetune": {"img_size"}, "transfer": {"img_size"}}


def layer(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """`higher` over `lower`; a data source given above replaces the other kind of source given below."""
    merged = {**lower, **{k: v for k, v in higher.items() if v is not None}}
    for given, other in (("data_dir", "dataset"), ("dataset", "data_dir")):
        if higher.get(given) is not None and higher.get(other) is None:
            merged.pop(other, None)
    return merged


def stage_section(recipe: dict[str, Any], stage: str, target: str | None = None) -> dict[str, Any]:
    """The keys a stage takes from a recipe: the top-level keys it knows (shared by all stages) plus its
    own section. A flat file is a one-stage recipe; a file with [teach], [student], ... sections is a
    pipeline recipe, and any stage command can read its own part of it."""
    known = {f.name for f in config_fields(CONFIGS[stage])}
    if any(isinstance(v, dict) for v in recipe.values()):  # a pipeline recipe; a flat one is all this stage's
        known -= NOT_SHARED.get(stage, set())
    shared = {k: v for k, v in recipe.items() if not isinstance(v, dict) and k in known}
    if stage != "transfer":
        return layer(shared, recipe.get(stage, {}))
    targets = transfer_targets(recipe)
    if target in targets:
        own = targets[target]
    elif len(targets) > 1:
        raise DistillError(f"This recipe has several transfer targets ({', '.join(targets)}); pick one with "
                           "--dataset NAME, or run them all with `distill pipeline`.")
    else:
        own = next(iter(targets.values()), {})
    return layer(shared, own)


# Older spellings a stage still reads, each the same setting as its current name: finetune's `res` is `img_size`.
OLDER_SPELLINGS = {"finetune": {"res": "img_size"}}


def current_spelling(cls: type[StageConfig], values: dict[str, Any], where: str) -> dict[str, Any]:
    """One layer of settings (a recipe, its pipeline part, the flags) with older spellings read as the current
    names, so a later layer's `img_size` replaces an earlier layer's `res` as it would an `img_size`."""
    values = dict(values)
    for old, new in OLDER_SPELLINGS.get(cls.stage, {}).items():
        given = values.pop(old, None)
        if given is None:
            continue
        if values.get(new) not in (None, given):
            flag = "--" if where == "command line" else ""
            raise DistillError(f"{where}: {flag}{old.replace('_', '-') if flag else old} is the older spelling of "
                               f"{flag}{new.replace('_', '-') if flag else new}; give one of them (here {given} and "
                               f"{values[new]}).")
        values[new] = given
    return values


def resolve(cls: type[StageConfig], recipe_path: Path | None = None, overrides: dict[str, Any] | None = None,
            recipe_values: dict[str, Any] | None = None) -> StageConfig:
    """defaults <- recipe <- flags given on the command line (None means 'not given')."""
    values: dict[str, Any] = {}
    if recipe_path is not None:
        recipe = read_toml(Path(recipe_path))
        check_recipe(recipe, str(recipe_path))
        # A transfer recipe with several [transfer.NAME] targets: --dataset NAME picks one.
        target = (overrides or {}).get("dataset") if cls.stage == "transfer" else None
        section = current_spelling(cls, stage_section(recipe, cls.stage, target), str(recipe_path))
        values.update(check_keys(cls, section, str(recipe_path)))
    if recipe_values:
        values = layer(values, check_keys(cls, current_spelling(cls, recipe_values, "recipe"), "recipe"))
    values = layer(values, current_spelling(cls, overrides or {}, "command line"))
    values = check_keys(cls, values, "command line") if overrides else values
    if values.get("img_size_schedule") and values.get("img_size") is None:  # the run ends at the schedule's last size
        values["img_size"] = parse_schedule(values["img_size_schedule"])[-1][1]
    if values.get("global_batch") is not None and values.get("grad_accum", 1) != 1:
        raise DistillError("--grad-accum follows from --global-batch and --batch-size (the most one process takes at "
                           "once); give --global-batch or --grad-accum, not both.")
    config = cls(**values)
    validate(config)
    return config


def write_toml(path: Path, values: dict[str, Any]) -> None:
    from distill.weights.checkpoint import atomic_write_bytes  # here, so that `distill --help` loads no torch

    atomic_write_bytes(path, tomli_w.dumps(values).encode())
