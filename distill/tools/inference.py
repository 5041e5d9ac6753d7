"""Class probabilities of a checkpoint on a split, with its own preprocessing: what soups, ensembles and
test-time augmentation are measured with.

Each image's probabilities come back in the split's order, so several models (or several views of one model)
can be combined image by image. For a student with the distillation token the probabilities are the paper's
fusion of its two heads (as its checkpoint records: the mean of their logits, or of their probabilities), the
headline prediction everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.weights.checkpoint import Checkpoint, class_difference
from distill.data import DataSplits, ImageSource, Preprocess, Transformed, eval_loader, eval_transform, open_dataset
from distill.errors import DistillError
from distill.training.evaluation import Predict, plain_logits
from distill.weights.naming import PRECISIONS
from distill.speed import idle_workers
from distill.students import fused_outputs, fusion_of


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(mixed_precision: str) -> None:
    if mixed_precision not in PRECISIONS:
        raise DistillError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, not '{mixed_precision}'.")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DistillError("fp16 mixed precision needs a GPU; on a CPU use --mixed-precision bf16.")


def predictor(ckpt: Checkpoint) -> Predict:
    """How a checkpoint's scores are read: every head of a student (a token student's two fused by its own rule),
    the logits of anything else."""
    return fused_outputs(fusion_of(ckpt.meta)) if ckpt.kind == "student" else plain_logits


def preprocessing(ckpt: Checkpoint, img_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
    """The checkpoint's own test-time preprocessing (resize, centre crop, its normalisation), optionally at
    another resolution or crop ratio."""
    data = ckpt.data
    return eval_transform(img_size or ckpt.img_size, mean=tuple(data["mean"]), std=tuple(data["std"]),
                          crop_pct=crop_pct or data.get("crop_pct", 0.875), interpolation=data.get("interpolation", "bicubic"))


def checkpoint_data(ckpt: Checkpoint, dataset: str | None = None, data_dir: Path | None = None,
                    skip_corrupt: bool | None = None) -> tuple[DataSplits, str]:
    """The data a checkpoint is measured on (its own unless told), refused when its classes are not the
    checkpoint's; and how to name it."""
    own = dataset is None and data_dir is None
    classes = None
    if own:
        dataset = ckpt.data.get("dataset")
        data_dir = Path(ckpt.data["data_dir"]) if ckpt.data.get("data_dir") else None
        classes = ckpt.classes if ckpt.data.get("kept_classes") else None
    if skip_corrupt is None:
        skip_corrupt = own and bool((ckpt.meta.get("config") or {}).get("skip_corrupt"))
    data = open_dataset(None if data_dir else dataset, data_dir, classes=classes, skip_corrupt=skip_corrupt)
    where = str(data_dir or dataset)
    if not ckpt.knows_classes(data.classes):
        raise DistillError(f"{ckpt.path} was trained on other classes than {where} ("
                           f"{class_difference(ckpt.classes, data.classes, ('the model', 'the data'))}).")
    return data, where


def _autocast(mixed_precision: str, where: torch.device) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(where.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def class_probabilities(model: nn.Module, predict: Predict, source: ImageSource, transform: Preprocess, *,
                        batch_size: int = 128, num_workers: int = 0, mixed_precision: str = "no"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """([images, classes] probabilities of the headline prediction, [images] labels), in the split's order."""
    where = device()
    model = model.to(where).eval()
    loader = eval_loader(Transformed(source, transform), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=where.type == "cuda", idle_workers=idle_workers(None, where.type))
    probs, labels = [], []
    for images, targets in loader:
        with _autocast(mixed_precision, where):
            scores = predict(model, transform.finish(images, where))
        probs.append(next(iter(scores.values())).float().softmax(dim=-1).cpu())
        labels.append(targets)
    return torch.cat(probs), torch.cat(labels)


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return round((probs.argmax(dim=-1) == labels).float().mean().item() * 100, 3)
