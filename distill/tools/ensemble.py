"""Ensembles: several checkpoints evaluated together, each with its own preprocessing.

Members may be different architectures at different resolutions (a RegNetY at 32 px beside a DeiT at 48 px):
each sees the test images through its own resize, crop and normalisation, and the ensemble combines their class
probabilities image by image, as the arithmetic mean (`arith`) or the normalised geometric mean (`geo`, the mean
of the log-probabilities, renormalised). They must share the classes, in the same order.

With `save`, the predictions are kept: `predictions.safetensors` (each member's probabilities, the ensemble's,
the labels) and `ensemble.json` (members, their lineage and accuracies, the ensemble's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distill.weights.checkpoint import atomic_path, atomic_write_bytes, build_model, class_difference, read_checkpoint
from distill.errors import DistillError
from distill.tools.inference import checkpoint_data, class_probabilities, preprocessing, predictor, top1

MEANS = ("arith", "geo")
PREDICTIONS_FILE, SUMMARY_FILE = "predictions.safetensors", "ensemble.json"


def combine(probs: torch.Tensor, mean: str = "arith") -> torch.Tensor:
    """[members, images, classes] probabilities -> [images, classes]: their arithmetic mean, or their geometric
    mean renormalised to sum to one."""
    if mean not in MEANS:
        raise DistillError(f"--mean must be one of {', '.join(MEANS)}, not '{mean}'.")
    if mean == "arith":
        return probs.mean(dim=0)
    return probs.clamp_min(1e-12).log().mean(dim=0).softmax(dim=-1)


@dataclass
class EnsembleResult:
    members: list[dict[str, Any]]
    top1: float
    mean: str
    samples: int
    where: str
    probs: torch.Tensor  # [members, images, classes]
    combined: torch.Tensor
    labels: torch.Tensor

    @property
    def mean_member_top1(self) -> float:
        return round(sum(m["top1"] for m in self.members) / len(self.members), 3)

    @property
    def best_member_top1(self) -> float:
        return max(m["top1"] for m in self.members)


def evaluate_ensemble(paths: list[Path], *, mean: str = "arith", dataset: str | None = None, data_dir: Path | None = None,
                      batch_size: int = 128, num_workers: int = 0, mixed_precision: str = "no",
                      save: Path | None = None) -> EnsembleResult:
    if mean not in MEANS:
        raise DistillError(f"--mean must be one of {', '.join(MEANS)}, not '{mean}'.")
    if len(paths) < 2:
        raise DistillError("An ensemble needs at least two checkpoints.")
    ckpts = [read_checkpoint(p) for p in paths]
    first = ckpts[0]
    for other in ckpts[1:]:
        if other.classes != first.classes:
            raise DistillError(f"{other.path} was trained on other classes than {first.path} "
                               f"({class_difference(other.classes, first.classes)}); an ensemble's members must share "
                               "their classes.")
    data, where = checkpoint_data(first, dataset, data_dir)
    members, probs, labels = [], [], None
    for ckpt in ckpts:
        member_probs, member_labels = class_probabilities(build_model(ckpt), predictor(ckpt), data.test, preprocessing(ckpt),
                                                          batch_size=batch_size, num_workers=num_workers,
                                                          mixed_precision=mixed_precision)
        labels = member_labels if labels is None else labels
        probs.append(member_probs)
        members.append({**ckpt.lineage("weights"), "img_size": ckpt.img_size, "top1": top1(member_probs, labels)})
    stacked = torch.stack(probs)
    combined = combine(stacked, mean)
    result = EnsembleResult(members, top1(combined, labels), mean, int(labels.numel()), where, stacked, combined, labels)
    if save is not None:
        write_predictions(Path(save), result, mixed_precision)
    return result


def write_predictions(folder: Path, result: EnsembleResult, mixed_precision: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"mean": result.mean, "top1": result.top1, "samples": result.samples, "data": result.where,
               "precision": {"no": "fp32"}.get(mixed_precision, mixed_precision), "members": result.members,
               "mean_member_top1": result.mean_member_top1, "best_member_top1": result.best_member_top1}
    tensors = {"members": result.probs.contiguous(), "ensemble": result.combined.contiguous(),
               "labels": result.labels.contiguous()}
    with atomic_path(folder / PREDICTIONS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"ensemble": json.dumps(summary, default=str)})
    atomic_write_bytes(folder / SUMMARY_FILE, json.dumps(summary, indent=1, default=str).encode())


def print_ensemble(result: EnsembleResult, save: Path | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from distill.console import console

    table = Table(title=f"ensemble of {len(result.members)} on {result.where} ({result.mean} mean of probabilities)",
                  title_justify="left")
    table.add_column("member")
    table.add_column("model")
    table.add_column("top-1", justify="right")
    for member in result.members:
        table.add_row(escape(member["path"]), escape(member["label"]), f"{member['top1']:.2f}")
    table.add_row("[bold]ensemble[/]", "", f"[bold]{result.top1:.2f}[/]")
    console.print(table)
    console.print(f"mean member {result.mean_member_top1:.2f}, best member {result.best_member_top1:.2f}, ensemble "
                  f"{result.top1:.2f}, on {result.samples} test images")
    if save is not None:
        console.print(escape(f"predictions: {Path(save) / PREDICTIONS_FILE}, summary: {Path(save) / SUMMARY_FILE}"),
                      soft_wrap=True)
