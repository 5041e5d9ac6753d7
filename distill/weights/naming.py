"""How a model is shown to a reader: by what it is, not only by the timm name it was built from.

A timm name states a size, a patch and a resolution (`deit_tiny_distilled_patch16_224`), and distill builds
models that keep the name but change all three (`--img-size 32 --patch-size 8 --depth 2`). The label says
what the weights really are: family and size, patch, the depth, width and heads where they differ from the
named size, the resolution and the parameter count, followed by the timm name cut where it stops being true:

    DeiT-Ti/8 depth 2 @ 32px (deit_tiny_distilled…, 1.2M params)
    RegNetY-200MF @ 32px (regnety_002, 2.8M params)

Any timm model works: the architecture is read from the model itself, built on the meta device (no memory,
no weights, a few milliseconds), and compared with the model its name builds by default. A model timm cannot
build (a foreign or future name) falls back to its name, resolution and the parameter count given.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

SIZES = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H", "giant": "g",
         "gigantic": "G"}
_SIZE = "|".join(SIZES)
FAMILIES = ((re.compile(rf"deit3_({_SIZE})_"), "DeiT III-"), (re.compile(rf"deit_({_SIZE})_"), "DeiT-"),
            (re.compile(rf"vit_({_SIZE})_"), "ViT-"))
REGNET = re.compile(r"regnet([xy])_(\d{3,4})(?:_|$)")


@dataclass(frozen=True)
class Shape:
    """What a built model is: its patch, width, depth and heads (ViTs), input size and parameter count."""

    params: int
    patch: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    img_size: int | None = None


def family(name: str) -> str | None:
    """The name the papers use for a timm architecture (DeiT-Ti, ViT-B, RegNetY-16GF), or None when unknown."""
    base = name.split(".")[0]
    for pattern, prefix in FAMILIES:
        match = pattern.match(base + "_")
        if match:
            return prefix + SIZES[match.group(1)]
    match = REGNET.match(base)
    if match:  # regnety_002 is 0.2 GFLOPs, regnety_160 16 GFLOPs
        gflops = int(match.group(2)) / 10
        size = f"{gflops * 1000:.0f}MF" if gflops < 1 else f"{gflops:g}GF"
        return f"RegNet{match.group(1).upper()}-{size}"
    return None


def _first(value: Any) -> int | None:
    """224 from 224, (224, 224) or [224]; None from None or an empty sequence."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return None if value is None else int(value)


@functools.lru_cache(maxsize=128)
def _shape(name: str, args_json: str) -> Shape | None:
    import timm
    import torch

    args = {k: v for k, v in json.loads(args_json).items() if v is not None}
    try:
        with torch.device("meta"):  # the architecture without allocating or initialising weights
            model = timm.create_model(name, pretrained=False, **args)
    except Exception:  # any name or argument timm does not take: describe the model by its name alone
        return None
    params = sum(p.numel() for p in model.parameters())
    patch_embed = getattr(model, "patch_embed", None)
    patch = _first(getattr(patch_embed, "patch_size", None))
    img_size = _first(getattr(patch_embed, "img_size", None))
    if img_size is None:
        img_size = _first(((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or ())[-1:])
    blocks = getattr(model, "blocks", None)
    transformer = (isinstance(blocks, (torch.nn.Sequential, torch.nn.ModuleList)) and len(blocks) > 0
                   and hasattr(blocks[0], "attn"))
    width = getattr(model, "embed_dim", None) if transformer else None
    heads = getattr(blocks[0].attn, "num_heads", None) if transformer else None
    return Shape(params=params, patch=patch, width=width if isinstance(width, int) else None,
                 depth=len(blocks) if transformer else None, heads=heads, img_size=img_size)


def shape_of(name: str, args: dict[str, Any] | None = None) -> Shape | None:
    """The architecture `timm.create_model(name, **args)` builds, or None when timm cannot build it."""
    return _shape(name, json.dumps(args or {}, sort_keys=True, default=str))


def count(params: int) -> str:
    """1234567 -> 1.23M."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if params >= scale:
            return f"{params / scale:.3g}{unit}"
    return str(params)


def true_name(name: str, patch: int | None, img_size: int | None, default_img_size: int | None) -> str:
    """The timm name cut before its first part that is no longer true (a patch or resolution it was built
    without): deit_tiny_distilled_patch16_224 with patch 8 -> deit_tiny_distilled…"""
    base, _, tag = name.partition(".")
    parts = base.split("_")
    for index, part in enumerate(parts):
        patch_part = re.fullmatch(r"patch(\d+)", part)
        false_patch = patch_part is not None and patch is not None and int(patch_part.group(1)) != patch
        false_size = (index == len(parts) - 1 and index > 0 and part.isdigit() and img_size is not None
                      and int(part) == default_img_size and int(part) != img_size)
        if false_patch or false_size:
            return "_".join(parts[:index]) + "…"
    return name


def model_label(name: str, args: dict[str, Any] | None = None, *, img_size: int | None = None,
                params: int | None = None) -> str:
    """`DeiT-Ti/8 depth 2 @ 32px (deit_tiny_distilled…, 1.2M params)`: what the model is.

    `args` are the timm constructor arguments it was built with; `img_size` the resolution it runs at (for a
    convnet the only place it is known); `params` its parameter count when known (else counted when the
    number of classes is known, else left out).
    """
    args = dict(args or {})
    built = shape_of(name, args)
    named = shape_of(name, {})
    size = img_size or _first(args.get("img_size")) or (built.img_size if built and built.patch else None)
    if params is None and built is not None and args.get("num_classes") is not None:
        params = built.params
    label = family(name)
    words = [label or name]
    if built is not None and named is not None:
        if built.patch is not None:
            if label:
                words[0] += f"/{built.patch}"
            elif built.patch != named.patch:
                words.append(f"patch {built.patch}")
        for key in ("depth", "width", "heads"):
            value = getattr(built, key)
            if value is not None and value != getattr(named, key):
                words.append(f"{key} {value}")
    if size:
        words.append(f"@ {size}px")
    details = []
    if label:
        details.append(true_name(name, built.patch if built else None, size, named.img_size if named else None))
    if params:
        details.append(f"{count(params)} params")
    return " ".join(words) + (f" ({', '.join(details)})" if details else "")


PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def precision_name(mixed_precision: str) -> str:
    """What accelerate's --mixed-precision setting means for the numbers: no -> fp32."""
    return PRECISIONS.get(mixed_precision, mixed_precision)


def measured_at(metrics: dict[str, Any], meta: dict[str, Any] | None = None, prefix: str = "") -> str:
    """`bf16 at 32 px`: how an accuracy was measured. The same weights score differently in bf16 and fp32, and
    at another resolution. Checkpoints written before metrics carried it fall back to the run's settings."""
    meta = meta or {}
    precision = metrics.get(f"{prefix}precision") or precision_name((meta.get("config") or {}).get("mixed_precision", "?"))
    size = metrics.get(f"{prefix}img_size") or (meta.get("data") or {}).get("img_size", "?")
    return f"{precision} at {size} px"
