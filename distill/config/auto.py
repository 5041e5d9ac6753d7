"""The values a run leaves to `auto`: the learning rate (the stage's reference recipe at its own batch, scaled
linearly above it) and the regularisation profile (DeiT's for long runs, light for short ones)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from distill.config.checks import validate
from distill.config.fields import LONG_RUN_IMAGES, LR_REFERENCE_BATCH, ReferenceRate, StageConfig

# --profile: the regularisation a run gets by default. DeiT's Table 9 is what the paper measured, on ImageNet
# for 300 epochs (384M images seen); on every small run measured here it costs accuracy (flowers12: 7 points at 15
# epochs, 12 at 100; docs/results.md). `auto` gives DeiT's from 10M images seen (ImageNet-1k for 8 epochs,
# CIFAR for 200), light augmentation below: a boundary chosen between the two, not measured at it.
PROFILES: dict[str, dict[str, Any]] = {
    "deit": {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "scale_min": 0.08,
             "warmup_epochs": 5.0},
    "short": {"aa": "none", "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "scale_min": 0.5, "warmup_epochs": 1.0},
}


def processes() -> int:
    """How many training processes this run has: torchrun and accelerate launch say so before any is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_rate(reference: ReferenceRate, global_batch: int) -> float:
    """The reference rate at the reference's own batch, scaled linearly above that batch and held below it.

    The linear rule (Goyal et al.; DeiT) is how the paper's recipes grow with the batch. Below the reference
    batch it would shrink an Adam rate toward nothing (DeiT's 5e-4 per 512 is 3.1e-5 at batch 32), and short
    runs at such rates barely learn (measured in docs/results.md); so it never scales down.
    """
    return reference.rate * max(1.0, global_batch / reference.batch)


def resolve_auto(config: StageConfig, world: int | None = None, train_size: int | None = None
                 ) -> tuple[StageConfig, list[str]]:
    """Fill the values left to `auto` (learning rate, regularisation profile) for this run, and say what was chosen.

    A function of the config, the number of processes and the training-set size (counted without decoding),
    so a dry run resolves exactly what the run will.
    """
    world = world or processes()
    updates: dict[str, Any] = {}
    notes: list[str] = []
    batch = config.global_batch(world)
    unused = getattr(config, "unused", ())
    if config.lr is None and "lr" not in unused:
        reference = config.reference_lr
        rate = auto_rate(reference, batch)
        updates["lr"] = rate * LR_REFERENCE_BATCH / batch if config.lr_scale else rate
        how = "scaled linearly above" if batch > reference.batch else "held at and below"
        notes.append(f"lr {rate:.3g} at global batch {batch} (auto: {reference.source}; {how} that batch)")
    profile, why = config.profile, "--profile"
    if profile == "auto":
        seen = config.epochs * train_size if train_size else None
        profile = "deit" if seen is not None and seen >= LONG_RUN_IMAGES else "short"
        why = (f"{config.epochs} epoch(s) x {train_size:,} images {'>=' if profile == 'deit' else '<'} "
               f"{LONG_RUN_IMAGES // 1_000_000}M" if seen is not None else "training-set size unknown before loading")
    chosen = {key: value for key, value in PROFILES[profile].items()
              if getattr(config, key, 0) is None and key not in unused}
    updates.update(chosen)
    if chosen:
        notes.append(f"{profile} profile ({why}): " + ", ".join(f"{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                                                                  else f"{key} {value}" for key, value in chosen.items()))
    resolved = dataclasses.replace(config, **updates)
    validate(resolved)
    return resolved, notes
