"""Training criteria: the base loss on true labels and the DeiT distillation loss around it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

KINDS = ("none", "soft", "hard")


def base_criterion(smoothing: float, soft_targets: bool) -> nn.Module:
    """Cross-entropy on the true labels: soft targets when Mixup/CutMix made them (they already carry
    the label smoothing), else label smoothing, else plain."""
    if soft_targets:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """DeiT's loss (paper, section 4; the official losses.py):

        none: L = CE(Z_s, y)
        soft: L = (1 - alpha) CE(Z_s, y) + alpha tau^2 KL(psi(Z_s / tau), psi(Z_t / tau))
        hard: L = (1 - alpha) CE(Z_s, y) + alpha CE(Z_s, argmax Z_t)

    With the distillation token the student returns (class logits, distillation logits): the class
    head takes the label term, the distillation head the teacher term. Without a teacher, both heads
    learn from the labels. The KL is summed and divided by the number of logits, as in the official
    code whose numbers the paper reports (the formula's batch mean is num_classes times larger).
    The teacher term never sees label smoothing.

    With `cached=True` the teacher never runs: its targets come with the batch (`teacher_targets`, dense over
    the classes and mixed with the same Mixup/CutMix lambda as the labels): one-hot top classes for hard
    distillation, probabilities for soft, whose temperature is applied to their logarithm (exact for the
    cached top-k, approximate for the mass spread over the other classes).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None = None, kind: str = "none",
                 alpha: float = 0.5, tau: float = 1.0, cached: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distillation must be one of {KINDS}")
        if kind != "none" and teacher is None and not cached:
            raise ValueError("soft and hard distillation need a teacher")
        self.base, self.teacher, self.kind, self.alpha, self.tau, self.cached = base, teacher, kind, alpha, tau, cached

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                targets: torch.Tensor, teacher_targets: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, tuple):
            class_out, dist_out = (o.float() for o in outputs)
        else:
            class_out = dist_out = outputs.float()
        label_loss = self.base(class_out, targets)
        if self.kind == "none":
            if dist_out is class_out:
                return label_loss
            return (label_loss + self.base(dist_out, targets)) / 2
        if self.cached:
            teacher_logits = teacher_targets.float().clamp_min(1e-12).log()  # log-probabilities: logits up to a constant
        else:
            teacher_logits = self.teacher(inputs).float()
        if self.kind == "soft":
            t = self.tau
            teacher_loss = F.kl_div(F.log_softmax(dist_out / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                                    reduction="sum", log_target=True) * (t * t) / dist_out.numel()
        elif self.cached:  # mixed one-hot top classes: the hard labels, mixed as the true labels are
            teacher_loss = torch.sum(-teacher_targets.float() * F.log_softmax(dist_out, dim=-1), dim=-1).mean()
        else:
            teacher_loss = F.cross_entropy(dist_out, teacher_logits.argmax(dim=1))
        return label_loss * (1 - self.alpha) + teacher_loss * self.alpha
