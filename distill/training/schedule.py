"""Progressive resizing within a stage: `--img-size-schedule 24:0,32:10` trains at 24 px from epoch 0 and at 32 px
from epoch 10 on (epochs counted from 0, as in the metrics' `epoch - 1`).

At each change every ViT of the run (the model, its EMA copy, a ViT teacher) has the patch part of its position
embeddings resampled bicubically (timm's `resample_abs_pos_embed`, through `distill.students.resize`), and the
optimizer holds the resampled embedding in place of the old one: its moments (AdamW's averages, SGD's momentum),
which belonged to the old grid, start afresh. A run resumed from a saved state is put back at the resolution that
state was saved at before the state is loaded, so it continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from distill.errors import DistillError
from distill.students import patch_size_of, resize


def resolution_at(steps: list[tuple[int, int]], epoch: int) -> int | None:
    """The training resolution of an epoch (None without a schedule)."""
    size = None
    for start, value in steps:
        if epoch >= start:
            size = value
    return size


def vits(modules: Iterable[nn.Module | None]) -> list[nn.Module]:
    """Every distinct ViT (a module with position embeddings and timm's set_input_size) inside these modules."""
    found: dict[int, nn.Module] = {}
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if hasattr(sub, "pos_embed") and hasattr(sub, "set_input_size") and hasattr(sub, "patch_embed"):
                found.setdefault(id(sub), sub)
    return list(found.values())


def current_size(model: nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def check_grid(models: list[nn.Module], steps: list[tuple[int, int]]) -> None:
    for model in models:
        patch = patch_size_of(model)
        for _, size in steps:
            if size % patch:
                raise DistillError(f"--img-size-schedule's {size} px is not a multiple of the patch size {patch}.")


def set_resolution(models: list[nn.Module], size: int, optimizer: Any = None) -> bool:
    """Resample every ViT that is not at `size` yet; the optimizer then holds each new position embedding in
    place of the old one (with fresh moments). Returns whether anything changed."""
    changed = False
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper keeps the torch optimizer inside
    for model in models:
        if current_size(model) == size:
            continue
        old = model.pos_embed
        resize(model, size)
        new = model.pos_embed
        new.requires_grad_(old.requires_grad)
        changed = True
        if inner is None:
            continue
        for group in inner.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        inner.state.pop(old, None)
    return changed
