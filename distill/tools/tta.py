"""Test-time augmentation: several views of every test image, each measured, and their mean.

- `flip`: the centre crop and its mirror image.
- `five-crop`: the four corner crops and the centre crop of the resized image (torchvision's FiveCrop).
- `multi-res`: the centre crop at several resolutions (default: the model's, a fifth below and a fifth above,
  on the patch grid of a ViT, whose position embeddings are resampled for each as `evaluate --img-size` does).

The combination is the mean of the views' class probabilities, image by image. Every view's own top-1 is
reported beside it, so the gain of the combination over the plain centre crop is read directly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from distill.weights.checkpoint import Checkpoint
from distill.data import ImageSource, Preprocess
from distill.tools.ensemble import combine
from distill.errors import DistillError
from distill.tools.inference import class_probabilities, predictor, preprocessing, top1
from distill.students import patch_size_of, resize

MODES = ("flip", "five-crop", "multi-res")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def flipped(transform: Preprocess) -> Preprocess:
    """A preprocessing followed by a horizontal flip of the image tensor."""
    return Preprocess([*transform.transforms, TensorFlip()], transform.finish)


class TensorFlip:
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flip(-1)


class CornerCrop:
    """One corner of torchvision's five crops (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""

    def __init__(self, size: int, corner: int):
        self.size, self.corner = size, corner

    def __call__(self, image: Image.Image) -> Image.Image:
        return TF.five_crop(image, [self.size, self.size])[self.corner]


@dataclass
class View:
    name: str
    transform: Preprocess
    img_size: int


def default_resolutions(img_size: int, patch: int | None) -> list[int]:
    """The model's resolution, a fifth below and a fifth above it, rounded to the patch grid of a ViT."""
    step = patch or 1
    sizes = [max(step, round(img_size * f / step) * step) for f in (0.8, 1.0, 1.2)]
    return sorted(set(sizes))


def views(mode: str, ckpt: Checkpoint, img_size: int, crop_pct: float | None, model: nn.Module,
          resolutions: list[int] | None = None) -> list[View]:
    """The views of one TTA mode, each with the checkpoint's own preprocessing."""
    if mode not in MODES:
        raise DistillError(f"--tta must be one of {', '.join(MODES)}, not '{mode}'.")
    centre = preprocessing(ckpt, img_size, crop_pct)
    if mode == "flip":
        return [View("centre", centre, img_size), View("flipped", flipped(centre), img_size)]
    if mode == "five-crop":
        resize_step, _, *to_tensor = centre.transforms  # the eval transform: resize, centre crop, uint8 tensor
        corners = [View(name, Preprocess([resize_step, CornerCrop(img_size, k), *to_tensor], centre.finish), img_size)
                   for k, name in enumerate(CORNERS)]
        return corners + [View("centre", centre, img_size)]
    patch = patch_size_of(model) if hasattr(model, "patch_embed") else None
    sizes = resolutions or default_resolutions(img_size, patch)
    off_grid = [s for s in sizes if patch and s % patch]
    if off_grid:
        raise DistillError(f"Resolution {off_grid[0]} is not a multiple of the patch size {patch}.")
    return [View(f"{size} px", preprocessing(ckpt, size, crop_pct), size) for size in sizes]


def evaluate_views(ckpt: Checkpoint, model: nn.Module, source: ImageSource, mode: str, *, img_size: int,
                   crop_pct: float | None = None, resolutions: list[int] | None = None, batch_size: int = 128,
                   num_workers: int = 0, mixed_precision: str = "no") -> dict[str, Any]:
    """Top-1 of every view and of their mean probabilities: {"mode", "views": {name: top1}, "combined", ...}."""
    predict = predictor(ckpt)
    results, probs, labels = {}, [], None
    for view in views(mode, ckpt, img_size, crop_pct, model, resolutions):
        net = model
        if hasattr(model, "pos_embed") and view.img_size != img_size:
            net = copy.deepcopy(model)
            resize(net, view.img_size)
        view_probs, labels = class_probabilities(net, predict, source, view.transform, batch_size=batch_size,
                                                 num_workers=num_workers, mixed_precision=mixed_precision)
        probs.append(view_probs)
        results[view.name] = top1(view_probs, labels)
    combined = combine(torch.stack(probs), "arith")
    return {"mode": mode, "views": results, "combined": top1(combined, labels), "samples": int(labels.numel()),
            "precision": {"no": "fp32"}.get(mixed_precision, mixed_precision), "img_size": img_size}


def print_tta(result: dict[str, Any]) -> None:
    from rich.table import Table

    from distill.console import console

    table = Table(title=f"test-time augmentation: {result['mode']}", title_justify="left")
    table.add_column("view")
    table.add_column("top-1", justify="right")
    for name, value in result["views"].items():
        table.add_row(name, f"{value:.2f}")
    table.add_row("[bold]mean of the views[/]", f"[bold]{result['combined']:.2f}[/]")
    console.print(table)
    console.print(f"on {result['samples']} test images, in {result['precision']}")


def parse_resolutions(text: str | None) -> list[int] | None:
    """`24,32,40` -> [24, 32, 40]; refused with a sentence when not whole numbers of pixels."""
    if not text:
        return None
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"--tta-res takes resolutions in pixels separated by commas (e.g. 24,32,40), not '{text}'.") from None
    if not sizes or min(sizes) < 8:
        raise DistillError(f"--tta-res needs resolutions of at least 8 pixels, not '{text}'.")
    return sizes


def check_mode(mode: str | None, resolutions: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise DistillError(f"--tta must be one of {', '.join(MODES)}, not '{mode}'.")
    if resolutions and mode != "multi-res":
        raise DistillError("--tta-res applies to --tta multi-res only.")
    parse_resolutions(resolutions)
