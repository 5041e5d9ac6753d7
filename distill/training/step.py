"""One training step and what it needs: Mixup/CutMix that also mixes a cached teacher's targets, the losses read
from the device in one go, and the prepared pieces of an epoch. `distill benchmark` times this very step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.utils import ModelEmaV3
from torch import nn

from distill.data.device import Finish

class TargetMixup(Mixup):
    """timm's Mixup/CutMix ('batch' mode, DeiT's), also mixing dense extra targets (a cached teacher's) with the
    very lambda and box of the images: each becomes lam * t + (1 - lam) * t.flip(0), as timm mixes the labels.
    timm returns only the mixed labels, so this calls its `_mix_batch` (which mixes the images in place and
    returns the lambda, corrected for the CutMix box) and mixes the rest alike."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor, extra: list[torch.Tensor] | None = None) -> Any:
        if not extra:
            return (*super().__call__(x, target), [])
        lam = self._mix_batch(x)
        mixed = mixup_target(target, self.num_classes, lam, self.label_smoothing)
        return x, mixed, [t * lam + t.flip(0) * (1.0 - lam) for t in extra]


class LossWatch:
    """The training losses, kept on the device and read in one go: their mean for the log, and the first
    optimizer step whose loss was not finite on any process."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.pending: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.total, self.count, self.recent = 0.0, 0, float("nan")
        self.last: list[tuple[int, float]] = []  # (step, loss) of the last read, for the trackers

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.pending.append(loss.detach().float().reshape(1))
        self.steps.append(step)

    def read(self) -> tuple[int, float] | None:
        """One host sync (and one gather across processes); returns the first bad step and its loss, if any."""
        self.last = []
        if not self.pending:
            return None
        values = torch.cat(self.pending)
        if self.accelerator.num_processes > 1:  # every process reads the same, so all stop together
            values = self.accelerator.gather(values[None]).reshape(self.accelerator.num_processes, -1).t()
        values = values.cpu().reshape(len(self.steps), -1)
        steps, self.pending, self.steps = self.steps, [], []
        finite = torch.isfinite(values).all(dim=1)
        if not finite.all():
            first = int((~finite).nonzero()[0])
            return steps[first], float(values[first][~torch.isfinite(values[first])][0])
        self.total += float(values.mean(dim=1).sum())
        self.count += len(steps)
        self.last = list(zip(steps, values.mean(dim=1).tolist()))
        self.recent = float(values.mean())
        return None

    @property
    def mean(self) -> float:
        return self.total / max(1, self.count)


@dataclass
class Prepared:
    """The pieces one training epoch needs, after accelerate has prepared them."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    criterion: nn.Module
    mixup: TargetMixup | None
    ema: ModelEmaV3 | None
    loader: Any
    batches: int  # micro-batches per epoch: a whole number of optimizer steps
    trained: list[nn.Module]  # the model and any module the criterion trains beside it
    channels_last: bool = False  # the model is convolutional and in channels-last format: so are its inputs
    finish: Finish | None = None  # the device's part of preprocessing; the loader's dataset's when None


def train_step(acc: Accelerator, parts: Prepared, batch: Any, clip_grad: float | None = None,
               channels_last: bool = False) -> torch.Tensor:
    """One micro-batch: to the device, normalised and erased there (distill.data.device), Mixup/CutMix, forward, loss, backward, and (at an update) the optimizer
    step. Returns the loss, left on the device. `distill benchmark` times this very function."""
    images, targets, *extra = batch  # extra: a cached teacher's targets
    images = (parts.finish or parts.loader.dataset.finish)(images, acc.device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = targets.to(acc.device, non_blocking=True)
    extra = [t.to(acc.device, non_blocking=True) for t in extra]
    if parts.mixup is not None:
        images, targets, extra = parts.mixup(images, targets, extra)
    with acc.accumulate(*parts.trained):  # accelerate skips the gradient sync and step between updates
        with acc.autocast():
            loss = parts.criterion(images, parts.model(images), targets, *extra)
        acc.backward(loss)
        if acc.sync_gradients and clip_grad:
            acc.clip_grad_norm_(list(itertools.chain.from_iterable(m.parameters() for m in parts.trained)), clip_grad)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    return loss
