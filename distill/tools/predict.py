"""`distill predict`: the top-k classes of image files, folders or globs, batched on the device.

Each image gets the checkpoint's own test-time preprocessing (resize to size / crop_pct, centre crop, its
mean/std); a token student's prediction is the paper's fusion of its two heads, as in `distill evaluate`.
"""

from __future__ import annotations

import functools
import os
import csv
import glob
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from distill.weights.checkpoint import Checkpoint, atomic_write_bytes, build_model
from distill.data.sources import IMAGE_EXTENSIONS
from distill.errors import DistillError


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files, folders (searched recursively for images) and globs, in the order given, each file once."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                             and not p.name.startswith("."))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DistillError(f"{item} is no image file, no folder with images, and no pattern matching a file.")
        found += matches
    return list(dict.fromkeys(found))


class ImageFiles(Dataset):
    """Decoded, preprocessed images; an unreadable one yields its error message instead of failing the batch."""

    def __init__(self, files: list[Path], transform: Callable, img_size: int):
        self.files, self.transform, self.img_size = files, transform, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            with Image.open(self.files[index]) as image:
                return self.transform(image.convert("RGB")), index, ""
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), index, str(error) or type(error).__name__


@torch.no_grad()
def predict(ckpt: Checkpoint, files: list[Path], *, top_k: int = 5, tta: str | None = None, batch_size: int = 64,
            num_workers: int = 0, mixed_precision: str = "no", skip_corrupt: bool = False,
            progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(one record per readable image with its top-k classes and probabilities, the unreadable files skipped)."""
    from distill.data import eval_transform
    from distill.training.processes import make_accelerator
    from distill.data.loaders import start_worker
    from distill.speed import choose_kernels, idle_workers
    from distill.students import fused_outputs, fusion_of

    if tta not in (None, "none", "flip"):
        raise DistillError(f"--tta takes flip (or none), not '{tta}'.")
    if top_k < 1:
        raise DistillError("--top-k must be at least 1.")
    acc = make_accelerator(mixed_precision)
    heads = fused_outputs(fusion_of(ckpt.meta))  # a token student's two heads, fused as its accuracy was measured
    model = build_model(ckpt).to(acc.device)
    choose_kernels(acc, [model])
    data = ckpt.data
    transform = eval_transform(ckpt.img_size, mean=tuple(data["mean"]), std=tuple(data["std"]),
                               crop_pct=data.get("crop_pct", 0.875), interpolation=data.get("interpolation", "bicubic"))
    loader = DataLoader(ImageFiles(files, transform, ckpt.img_size), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=acc.device.type == "cuda",
                        worker_init_fn=functools.partial(start_worker, idle=idle_workers(None, acc.device.type),
                                                           parent=os.getpid()))
    classes = ckpt.classes
    k = min(top_k, len(classes))
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    for images, indices, errors in loader:
        bad = [i for i, e in enumerate(errors) if e]
        if bad and not skip_corrupt:
            first = bad[0]
            raise DistillError(f"Cannot read image {files[int(indices[first])]}: {errors[first]}. Remove or replace it, "
                               "or pass --skip-corrupt to skip unreadable images.")
        skipped += [str(files[int(indices[i])]) for i in bad]
        images = transform.finish(images, acc.device)
        with acc.autocast():
            probabilities = _probabilities(heads, model, images)
            if tta == "flip":  # the mean of the image's and its mirror image's probabilities
                probabilities = (probabilities + _probabilities(heads, model, images.flip(-1))) / 2
        top = probabilities.topk(k, dim=-1)
        values, labels = top.values.cpu().tolist(), top.indices.cpu().tolist()
        for row, index in enumerate(indices.tolist()):
            if errors[row]:
                continue
            records.append({"path": str(files[index]), "predictions": [
                {"class": classes[c], "index": c, "probability": round(p, 6)} for c, p in zip(labels[row], values[row])]})
        if progress is not None:
            progress(len(indices))
    return records, skipped


def _probabilities(predict: Callable, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    headline = next(iter(predict(model, images).values()))
    return headline.float().softmax(dim=-1)  # a token student's fused log of mean probabilities gives those back


def render(records: list[dict[str, Any]], fmt: str, top_k: int) -> str:
    """CSV (path, then class and probability for each rank) or JSON (a list of records)."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt != "csv":
        raise DistillError(f"--format takes csv or json, not '{fmt}'.")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = max((len(r["predictions"]) for r in records), default=top_k)
    writer.writerow(["path"] + [f"{what}_{rank}" for rank in range(1, ranks + 1) for what in ("class", "probability")])
    for record in records:
        writer.writerow([record["path"]] + [v for p in record["predictions"] for v in (p["class"], f"{p['probability']:.6f}")])
    return buffer.getvalue()


def write_output(text: str, output: Path | None) -> None:
    if output is None:
        print(text, end="")
    else:
        atomic_write_bytes(Path(output), text.encode())
