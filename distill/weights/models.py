"""timm model names and construction: the one place a model is made from a name and its arguments.

Every model distill trains or reloads goes through `create`, so an unknown name gets the same sentence
everywhere (teach, student, any --model, a checkpoint's header), and the one architecture timm builds
wrongly (a distillation token on a model without class-token position embeddings, DeiT III's layout)
is repaired in the same place whether it is built new or rebuilt from a checkpoint.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from typing import Any

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from distill.errors import DistillError


@lru_cache(maxsize=1)
def _names_by_stem() -> dict[str, list[str]]:
    """Every timm model name, also under its stem without the patch/resolution suffix (deit3_huge_patch14_224 is
    also found as deit3_huge), so a short or misspelt name finds the full names it was close to."""
    stems: dict[str, list[str]] = {}
    for name in timm.list_models():
        stems.setdefault(name, []).append(name)
        stem = re.split(r"_patch\d|\.", name)[0]
        if stem != name:
            stems.setdefault(stem, []).append(name)
    return stems


def near_names(name: str, count: int = 5) -> list[str]:
    stems = _names_by_stem()
    found: list[str] = []
    for stem in difflib.get_close_matches(name, list(stems), n=8, cutoff=0.6):
        found += [n for n in stems[stem] if n not in found]
    return found[:count]


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, naming the nearest ones it does."""
    if not timm.is_model(name):
        near = near_names(name)
        raise DistillError(f"timm has no model named '{name}'" + (f"; near names: {', '.join(near)}." if near else "."))


def expand_short_name(name: str) -> str:
    """A size without its patch and resolution (deit_tiny, deit3_small, vit_base) as timm names it at 224 px,
    patch 16 where timm has it (deit3_huge -> deit3_huge_patch14_224); a full name is returned as it is."""
    if timm.is_model(name):
        return name
    for candidate in [f"{name}_patch16_224", *sorted(timm.list_models(f"{name}_patch*_224"))]:
        if timm.is_model(candidate):
            return candidate
    check_model_name(name)  # raises, with the near names
    return name


def builds_token(name: str) -> bool:
    """Whether timm builds this model with a distillation token when asked (`distilled=True`): every model of
    timm's DeiT module (deit_*, deit3_*) is made by one factory that takes it; other ViTs (vit_*) have none."""
    from timm.models import is_model_in_modules

    return is_model_in_modules(name, ["deit"])


def _repair_token_layout(model: nn.Module) -> None:
    """timm's VisionTransformerDistilled sizes its position embedding for the patches plus both tokens even when
    the model adds it to the patches alone (`no_embed_class`, DeiT III's layout), which fails on the first
    forward. Sized for the patches, the state dict is timm's deit3_* keys plus the token's (dist_token,
    head_dist.*), and every resolution change of timm's (set_input_size) handles it as for deit3_*."""
    if getattr(model, "dist_token", None) is None or not getattr(model, "no_embed_class", False):
        return
    expected = model.patch_embed.num_patches
    if model.pos_embed.shape[1] != expected:
        model.pos_embed = nn.Parameter(torch.zeros(1, expected, model.embed_dim, dtype=model.pos_embed.dtype,
                                                   device=model.pos_embed.device))
        trunc_normal_(model.pos_embed, std=0.02)  # timm's initialisation of position embeddings


def create(name: str, **args: Any) -> nn.Module:
    """timm.create_model (never pretrained: distill trains its own weights), with the token layout repaired."""
    check_model_name(name)
    model = timm.create_model(name, pretrained=False, **args)
    _repair_token_layout(model)
    return model
