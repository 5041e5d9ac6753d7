"""Model soups (Wortsman et al., ICML 2022): the weights of several checkpoints of one architecture averaged.

`uniform` averages every ingredient. `greedy` ranks the ingredients by their accuracy on a held-out split and
adds each in turn, keeping it only when the soup's held-out accuracy does not drop (the paper's rule). The
held-out split comes from the training split, never the test split: the training images the ingredients did
not train on when they used a --train-subset, otherwise a class-balanced part of the training split (which the
ingredients then saw, and the soup says so). Models with BatchNorm get their running statistics re-estimated
on training images after averaging: an average of statistics is not the statistics of the averaged weights.

The soup is an ordinary checkpoint: its metadata lists every ingredient (sha256, path, held-out accuracy,
whether it was kept), and its test accuracy is measured like any stage's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.weights.checkpoint import MODEL_FILE, Checkpoint, build_model, read_checkpoint, save_checkpoint
from distill.data import ImageSource, Transformed, eval_loader
from distill.data.sources import balanced_subset
from distill.errors import DistillError
from distill.tools.summary import inherited
from distill.tools.inference import checkpoint_data, class_probabilities, device, predictor, preprocessing, top1

METHODS = ("uniform", "greedy")
# What must be equal for weights to be averaged, and for the soup to be measured the way its ingredients were.
PREPROCESSING = ("img_size", "mean", "std", "crop_pct", "interpolation")


def check_ingredients(ckpts: list[Checkpoint]) -> None:
    """Refuse ingredients that are not one architecture with one set of classes and one preprocessing."""
    if len(ckpts) < 2:
        raise DistillError("A soup needs at least two checkpoints.")
    first = ckpts[0]
    for other in ckpts[1:]:
        if other.sha256 == first.sha256 or other.path.resolve() == first.path.resolve():
            raise DistillError(f"{other.path} is given twice; each ingredient must be a different checkpoint.")
        if other.classes != first.classes:
            raise DistillError(f"{other.path} was trained on other classes than {first.path} ({len(other.classes)} vs "
                               f"{len(first.classes)}); only checkpoints with the same classes can be averaged.")
        if other.model_name != first.model_name or other.model_args != first.model_args:
            raise DistillError(f"{other.path} is another architecture ({other.label()}) than {first.path} "
                               f"({first.label()}); only checkpoints of one architecture can be averaged.")
        differs = [key for key in PREPROCESSING if other.data.get(key) != first.data.get(key)]
        if differs:
            raise DistillError(f"{other.path} preprocesses its images otherwise than {first.path} ({', '.join(differs)} "
                               "differ); only checkpoints with the same preprocessing can be averaged.")
        if starting_point(other) != starting_point(first):
            raise DistillError(f"{other.path} started from {starting_point(other)[1]}, {first.path} from "
                               f"{starting_point(first)[1]}: a soup averages models trained from one starting point "
                               "(Wortsman et al.), so give ingredients that share it.")


def starting_point(ckpt: Checkpoint) -> tuple[str, str]:
    """Where a checkpoint's training started, as (key, words): the weights of a parent (a transfer, a fine-tune, a
    student with --init), imported weights themselves, or a random initialisation, which its seed fixes."""
    meta = ckpt.meta
    if meta.get("ingredients"):  # a soup starts where its ingredients did
        return tuple(meta.get("starting_point") or ("soup", "a soup"))  # type: ignore[return-value]
    if meta.get("source"):
        return f"imported:{ckpt.sha256}", f"the imported weights {ckpt.path}"
    start = meta.get("init") or (meta.get("parent") if inherited(meta.get("parent") or {}, meta) == "weights" else None)
    if start:
        return f"weights:{start.get('sha256')}", f"the weights of {start.get('path')}"
    seed = (meta.get("config") or {}).get("seed")
    return f"random:{ckpt.model_name}:{seed}", f"a random initialisation (seed {seed})"


def average(state_dicts: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of each floating-point tensor, computed in float64; integer buffers (BatchNorm's
    batch counters) are taken from the first."""
    out = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            if weights is None:  # the sum divided once: the exact mean, whatever the count
                total = sum(sd[key].double() for sd in state_dicts) / len(state_dicts)
            else:
                total = sum(w * sd[key].double() for w, sd in zip(weights, state_dicts))
            out[key] = total.to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, source: ImageSource, transform: Any, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean and variance on these images (a cumulative average over all
    of them, momentum None), weights untouched. Returns the number of images used."""
    where = device()
    model = model.to(where)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for images, _ in eval_loader(Transformed(source, transform), batch_size=batch_size, num_workers=0):
        if len(images) < 2:  # BatchNorm cannot normalise a batch of one
            continue
        model(transform.finish(images, where))
        seen += len(images)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return seen


@dataclass
class HeldOut:
    """The held-out split a greedy soup ranks its ingredients on, and the training images left for BatchNorm."""

    images: ImageSource
    rest: ImageSource
    unseen: bool  # True when the ingredients did not train on these images
    how: str


def held_out_split(train: ImageSource, num_classes: int, train_subset: int | None, size: int | None,
                   seed: int) -> HeldOut:
    """Training images the ingredients did not see (outside their --train-subset), else a class-balanced part of
    the training split drawn with `seed`; `size` caps it (default: a tenth of the training split)."""
    total = len(train)
    size = size or max(num_classes, total // 10)
    indices = np.arange(total)
    seen = np.zeros(total, dtype=bool)
    if train_subset and train_subset < total:
        seen[balanced_subset(_Indexed(train), train_subset, num_classes).indices] = True
    candidates = indices[~seen]
    unseen = bool(seen.any())
    if len(candidates) == 0:
        raise DistillError("The ingredients trained on every training image; there is nothing left to hold out.")
    rng = np.random.default_rng(seed)
    targets = np.asarray(train.targets)[candidates]
    groups = [list(rng.permutation(candidates[targets == c])) for c in range(num_classes)]
    chosen: list[int] = []
    while len(chosen) < min(size, len(candidates)):
        for group in groups:
            if group and len(chosen) < size:
                chosen.append(int(group.pop()))
    chosen_set = set(chosen)
    rest = [i for i in indices.tolist() if i not in chosen_set and (seen[i] or not unseen)]
    how = (f"{len(chosen)} training images outside the ingredients' --train-subset {train_subset} (never trained on)"
           if unseen else f"{len(chosen)} training images drawn class-balanced with seed {seed} (the ingredients trained "
                          "on them too: pass checkpoints trained with --train-subset for a truly unseen split)")
    return HeldOut(train.subset(sorted(chosen)), train.subset(rest), unseen, how)


class _Indexed(ImageSource):
    """A source's labels alone, so a subset's indices can be read without decoding an image."""

    def __init__(self, source: ImageSource):
        self.targets = list(source.targets)


@dataclass
class SoupResult:
    checkpoint: Checkpoint
    ingredients: list[dict[str, Any]]
    held_out_top1: float | None
    test_top1: float


def make_soup(paths: list[Path], out: Path, *, method: str = "uniform", held_out: int | None = None, seed: int = 0,
              bn_images: int = 1000, batch_size: int = 128, num_workers: int = 0, overwrite: bool = False) -> SoupResult:
    """Average the checkpoints (all, or greedily), re-estimate BatchNorm, measure, and write `out/model.safetensors`."""
    if method not in METHODS:
        raise DistillError(f"--method must be one of {', '.join(METHODS)}, not '{method}'.")
    target = Path(out) / MODEL_FILE
    if target.exists() and not overwrite:
        raise DistillError(f"{target} already exists; pass --overwrite to replace it, or --out to write elsewhere.")
    ckpts = [read_checkpoint(p) for p in paths]
    check_ingredients(ckpts)
    first = ckpts[0]
    data, where = checkpoint_data(first)
    subsets = {(c.meta.get("config") or {}).get("train_subset") for c in ckpts}
    split = held_out_split(data.train, len(data.classes), subsets.pop() if len(subsets) == 1 else None, held_out, seed)
    transform, predict = preprocessing(first), predictor(first)
    state_dicts = [c.state_dict() for c in ckpts]
    model = build_model(first)
    batchnorm = has_batchnorm(model)
    calibration = split.rest.subset(list(range(min(bn_images, len(split.rest))))) if batchnorm else None

    def score(sd: dict[str, torch.Tensor], source: ImageSource) -> float:
        model.load_state_dict(sd)
        if calibration is not None:
            recalibrate_batchnorm(model, calibration, transform)
        probs, labels = class_probabilities(model, predict, source, transform, batch_size=batch_size,
                                            num_workers=num_workers)
        return top1(probs, labels)

    records = [{**c.lineage("weights"), "held_out_top1": score(sd, split.images) if method == "greedy" else None,
                "in_soup": method == "uniform"} for c, sd in zip(ckpts, state_dicts)]
    held_top1 = None
    if method == "greedy":
        order = sorted(range(len(ckpts)), key=lambda i: -records[i]["held_out_top1"])
        kept = [order[0]]
        held_top1 = records[order[0]]["held_out_top1"]
        records[order[0]]["in_soup"] = True
        for i in order[1:]:
            trial = score(average([state_dicts[j] for j in kept + [i]]), split.images)
            records[i]["soup_held_out_top1_with_it"] = trial
            if trial >= held_top1:
                kept.append(i)
                held_top1 = trial
                records[i]["in_soup"] = True
        chosen = [state_dicts[i] for i in kept]
    else:
        chosen = state_dicts
    soup = average(chosen)
    model.load_state_dict(soup)
    if calibration is not None:
        recalibrate_batchnorm(model, calibration, transform)
    probs, labels = class_probabilities(model, predict, data.test, transform, batch_size=batch_size,
                                        num_workers=num_workers)
    test_top1 = top1(probs, labels)
    metrics = {"top1": test_top1, "samples": len(labels), "precision": "fp32", "img_size": first.img_size,
               "per_class_top1": [round(((probs.argmax(-1) == labels) & (labels == c)).sum().item() * 100
                                        / max(1, (labels == c).sum().item()), 2) for c in range(len(data.classes))],
               "predicted_per_class": torch.bincount(probs.argmax(-1), minlength=len(data.classes)).tolist(),
               "labels_per_class": torch.bincount(labels, minlength=len(data.classes)).tolist()}
    present = [value for value, count in zip(metrics["per_class_top1"], metrics["labels_per_class"]) if count]
    metrics["mean_class_top1"] = round(sum(present) / len(present), 3)
    meta = {key: first.meta[key] for key in ("kind", "model", "params", "data", "distillation") if key in first.meta}
    meta.update({
        "stage": "soup", "parent": None, "teacher": None, "metrics": metrics,
        "ingredients": records, "starting_point": list(starting_point(first)),
        "soup": {"method": method, "kept": sum(r["in_soup"] for r in records), "of": len(records),
                 "held_out": split.how if method == "greedy" else None, "held_out_unseen": split.unseen,
                 "held_out_top1": held_top1, "batchnorm_recalibrated": batchnorm,
                 "batchnorm_images": len(calibration) if calibration is not None else 0, "seed": seed},
        "config": {"seed": seed, "mixed_precision": "no"}, "processes": 1,
    })
    save_checkpoint(target, model.state_dict(), meta)
    return SoupResult(read_checkpoint(target), records, held_top1, test_top1)


def print_soup(result: SoupResult) -> None:
    """Each ingredient (held-out top-1, kept or not), then the soup's held-out and test top-1."""
    from rich.markup import escape
    from rich.table import Table

    from distill.console import console

    soup = result.checkpoint.meta["soup"]
    table = Table(title=f"{soup['method']} soup of {soup['of']} checkpoints ({result.checkpoint.label()})",
                  title_justify="left")
    table.add_column("ingredient")
    table.add_column("test top-1", justify="right")
    greedy = soup["method"] == "greedy"
    if greedy:
        table.add_column("held-out top-1", justify="right")
        table.add_column("soup held-out with it", justify="right")
    table.add_column("in the soup")
    for record in result.ingredients:
        test = read_checkpoint(record["path"]).meta.get("metrics", {}).get("top1")
        cells = [escape(record["path"]), "-" if test is None else f"{test:.2f}"]
        if greedy:
            trial = record.get("soup_held_out_top1_with_it")
            cells += [f"{record['held_out_top1']:.2f}", "-" if trial is None else f"{trial:.2f}"]
        table.add_row(*cells, "yes" if record["in_soup"] else "no")
    console.print(table)
    if greedy:
        console.print(escape(f"held-out split: {soup['held_out']}; soup held-out top-1 {result.held_out_top1:.2f}"),
                      soft_wrap=True)
    if soup["batchnorm_recalibrated"]:
        console.print(f"BatchNorm statistics re-estimated on {soup['batchnorm_images']} training images.")
    metrics = result.checkpoint.meta["metrics"]
    console.print(escape(f"soup: test top-1 {result.test_top1:.2f} ({metrics['samples']} images, fp32 at "
                         f"{metrics['img_size']} px)"), soft_wrap=True)
    console.print(escape(f"checkpoint: {result.checkpoint.path}"), soft_wrap=True)
