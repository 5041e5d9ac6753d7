"""Training criteria: the base loss on true labels (cross-entropy or DeiT III's binary cross-entropy) and the
DeiT distillation loss around it, with timm's feature distillation as a further teacher term."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from distill.choices import DISTILLATION_KINDS as KINDS, FEATURE_LOSSES


def base_criterion(smoothing: float, soft_targets: bool, loss: str = "ce", bce_threshold: float | None = None
                   ) -> nn.Module:
    """The loss on the true labels.

    ce: soft-target cross-entropy when Mixup/CutMix made the targets (they already carry the label smoothing),
    else label smoothing, else plain. bce (DeiT III; timm's --bce-loss): timm's BinaryCrossEntropy, one sigmoid
    per class, averaged over classes and images; integer labels become one-hot targets with the smoothing, and
    Mixup/CutMix targets are taken as they are. With `bce_threshold` every target above it becomes 1 and the
    rest 0: DeiT III binarises Mixup/CutMix targets at 0 (its engine.py: targets.gt(0.0)), so both classes of a
    mixed image count as present.
    """
    if loss == "bce":
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=bce_threshold)
    if soft_targets:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class FeatureSource(Protocol):
    """Where the student's pre-logits features of the current step come from (distill.students.PreLogits)."""

    dim: int

    def take(self) -> torch.Tensor: ...


class FeatureRegression(nn.Module):
    """Feature distillation (timm's FeatureDistillationTask): a learned linear projection of the student's
    pre-logits regresses the teacher's pre-logits. mse is timm's loss; cosine (1 - cosine similarity) ignores
    the features' scale, which differs by orders of magnitude between a convnet teacher and a ViT student.
    The projection is trained with the student and kept in the resumable state, never in the exported model."""

    def __init__(self, student_dim: int, teacher_dim: int, loss: str = "mse"):
        super().__init__()
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}")
        self.projection = nn.Linear(student_dim, teacher_dim)
        self.loss = loss

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        projected, target = self.projection(student_features).float(), teacher_features.float()
        if self.loss == "mse":
            return F.mse_loss(projected, target)
        return (1 - F.cosine_similarity(projected, target, dim=1)).mean()


class DistillationLoss(nn.Module):
    """DeiT's loss (paper, section 4; the official losses.py), with feature distillation beside it:

        none:    L = L_label(Z_s, y)
        soft:    L = (1 - alpha) L_label(Z_s, y) + alpha tau^2 KL(psi(Z_s / tau), psi(Z_t / tau))
        hard:    L = (1 - alpha) L_label(Z_s, y) + alpha CE(Z_s, argmax Z_t)
        feature: L = (1 - alpha) L_label(Z_s, y) + alpha L_feat(W f_s, f_t)
        soft+feature, hard+feature: the soft or hard loss + alpha L_feat(W f_s, f_t)

    L_label is the base criterion (cross-entropy or BCE); the teacher terms are DeiT's whatever it is, as in
    DeiT III's code, which wraps its BCE in the same DistillationLoss (BCE's mean over classes makes the label
    term smaller than CE's, so a given alpha leans further to the teacher). f_s, f_t are pre-logits features
    and W a learned projection (`learned`, the one part of the criterion that trains).

    With the distillation token the student returns (class logits, distillation logits): the class head takes
    the label term, the distillation head the teacher's logits, and the distillation token's features the
    feature term. When no logit term uses the distillation head (none, feature), both heads learn from the
    labels. The KL is summed and divided by the number of logits, as in the official code whose numbers the
    paper reports (the formula's batch mean is num_classes times larger). The teacher terms never see label
    smoothing.

    With `cached=True` the teacher never runs: its targets come with the batch (`teacher_targets`, dense over
    the classes and mixed with the same Mixup/CutMix lambda as the labels): one-hot top classes for hard
    distillation, probabilities for soft, whose temperature is applied to their logarithm (exact for the
    cached top-k, approximate for the mass spread over the other classes). A cache holds no features, so
    feature distillation always runs its teacher.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None = None, kind: str = "none",
                 alpha: float = 0.5, tau: float = 1.0, features: FeatureSource | None = None, feature_loss: str = "mse",
                 cached: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"distillation must be one of {KINDS}")
        if cached and "feature" in kind:
            raise ValueError("a teacher cache holds no features: feature distillation runs its teacher")
        if kind != "none" and teacher is None and not cached:
            raise ValueError("distillation needs a teacher")
        logits, _, feature = kind.partition("+")
        self.logit_kind = "none" if logits == "feature" else logits
        self.base, self.teacher, self.kind, self.alpha, self.tau, self.cached = base, teacher, kind, alpha, tau, cached
        self.features = features
        self.learned: nn.Module | None = None  # trained beside the model (the engine optimises and prepares it)
        if "feature" in kind:
            if features is None:
                raise ValueError("feature distillation needs the student's features")
            self.learned = FeatureRegression(features.dim, teacher.feature_dim, feature_loss)

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                targets: torch.Tensor, teacher_targets: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, tuple):
            class_out, dist_out = (o.float() for o in outputs)
        else:
            class_out = dist_out = outputs.float()
        label_loss = self.base(class_out, targets)
        if self.logit_kind == "none" and dist_out is not class_out:
            label_loss = (label_loss + self.base(dist_out, targets)) / 2
        if self.kind == "none":
            return label_loss
        if self.cached:
            teacher_logits, teacher_features = teacher_targets.float().clamp_min(1e-12).log(), None  # log-probabilities
        elif self.learned is not None:
            teacher_logits, teacher_features = self.teacher.logits_and_features(inputs)
        else:
            teacher_logits, teacher_features = self.teacher(inputs), None
        teacher_logits = teacher_logits.float()
        loss = label_loss * (1 - self.alpha)
        if self.logit_kind == "soft":
            t = self.tau
            loss = loss + self.alpha * F.kl_div(F.log_softmax(dist_out / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                                                reduction="sum", log_target=True) * (t * t) / dist_out.numel()
        elif self.logit_kind == "hard" and self.cached:  # mixed one-hot top classes, mixed as the true labels are
            loss = loss + self.alpha * torch.sum(-teacher_targets.float() * F.log_softmax(dist_out, dim=-1), dim=-1).mean()
        elif self.logit_kind == "hard":
            loss = loss + self.alpha * F.cross_entropy(dist_out, teacher_logits.argmax(dim=1))
        if self.learned is not None:
            loss = loss + self.alpha * self.learned(self.features.take(), teacher_features)
        return loss
