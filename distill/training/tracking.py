"""Experiment trackers through accelerate (`--log-with tensorboard|wandb|mlflow|aim|...`), safe offline.

accelerate's own trackers do the writing: `Accelerator(log_with=..., project_dir=<run folder>)`, then
`init_trackers` with the resolved config as hyperparameters. Runs log under `<run folder>/logs`. Trackers that
would reach a server by default are pointed at the run folder or put offline unless the environment already
says otherwise: wandb in offline mode (sync later with `wandb sync`), MLflow to a file store in the run folder,
ClearML in offline mode, Comet offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


LOG_DIR = "logs"  # under the run folder
OFFLINE = {  # environment variable -> value, set only when the user has not set it
    "wandb": {"WANDB_MODE": "offline"},
    "clearml": {"CLEARML_OFFLINE_MODE": "1"},
    "comet_ml": {"COMET_START_ONLINE": "0"},
}


def offline_environment(names: list[str], run_dir: Path) -> None:
    """Keep every tracker on this machine unless the environment already chose otherwise."""
    for name in names:
        for key, value in OFFLINE.get(name, {}).items():
            os.environ.setdefault(key, value)
    if "mlflow" in names or "all" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (Path(run_dir).resolve() / LOG_DIR / "mlruns").as_uri())
    if "wandb" in names or "all" in names:
        os.environ.setdefault("WANDB_DIR", str(Path(run_dir).resolve() / LOG_DIR))


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as trackers take it: numbers, strings and booleans."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in config.items()
            if value is not None}


def numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a metrics record under a prefix (`test/top1`, `train/loss`, ...)."""
    return {f"{prefix}{key}": value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step")}
