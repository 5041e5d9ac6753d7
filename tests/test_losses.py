"""The distillation loss pinned on hand-made logits, and the frozen teacher's state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from distill.losses import DistillationLoss, base_criterion
from distill.teachers import FrozenTeacher


class FixedTeacher(torch.nn.Module):
    """Returns preset logits whatever the input: the loss must use exactly these."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


STUDENT = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
DIST_HEAD = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
TEACHER = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])  # argmax: 1, 2
LABELS = torch.tensor([0, 1])
IMAGES = torch.zeros(2, 3, 4, 4)


def ce(logits, target):
    """Cross-entropy of one row, by hand."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def mean_ce(rows, targets):
    return sum(ce(r.tolist(), int(t)) for r, t in zip(rows, targets)) / len(rows)


def test_none_is_the_base_loss():
    loss = DistillationLoss(torch.nn.CrossEntropyLoss())(IMAGES, STUDENT, LABELS)
    assert loss.item() == pytest.approx(mean_ce(STUDENT, LABELS))


def test_hard_distillation_by_hand():
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "hard", alpha=0.5)(IMAGES, STUDENT, LABELS)
    expected = 0.5 * mean_ce(STUDENT, LABELS) + 0.5 * mean_ce(STUDENT, [1, 2])
    assert loss.item() == pytest.approx(expected)


def test_hard_distillation_with_token_splits_the_heads():
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "hard", alpha=0.5)(
        IMAGES, (STUDENT, DIST_HEAD), LABELS)
    expected = 0.5 * mean_ce(STUDENT, LABELS) + 0.5 * mean_ce(DIST_HEAD, [1, 2])
    assert loss.item() == pytest.approx(expected)


def test_soft_distillation_by_hand():
    tau, alpha = 3.0, 0.1
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), "soft", alpha=alpha, tau=tau)(
        IMAGES, STUDENT, LABELS)
    kl_sum = 0.0
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist()):
        p_s = [math.exp(v / tau) / sum(math.exp(u / tau) for u in s_row) for v in s_row]
        p_t = [math.exp(v / tau) / sum(math.exp(u / tau) for u in t_row) for v in t_row]
        kl_sum += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = (1 - alpha) * mean_ce(STUDENT, LABELS) + alpha * tau * tau * kl_sum / STUDENT.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_mixup_targets_reach_the_label_term_and_not_the_teacher_term():
    soft_targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    criterion = DistillationLoss(base_criterion(0.1, soft_targets=True), FixedTeacher(TEACHER), "hard", alpha=0.5)
    assert isinstance(criterion.base, SoftTargetCrossEntropy)
    loss = criterion(IMAGES, (STUDENT, DIST_HEAD), soft_targets)
    label_term = -(soft_targets * F.log_softmax(STUDENT, dim=1)).sum(1).mean().item()
    expected = 0.5 * label_term + 0.5 * mean_ce(DIST_HEAD, [1, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_never_touches_the_teacher_term():
    smoothed = DistillationLoss(base_criterion(0.3, soft_targets=False), FixedTeacher(TEACHER), "hard", alpha=1.0)
    assert smoothed(IMAGES, STUDENT, LABELS).item() == pytest.approx(mean_ce(STUDENT, [1, 2]))


def test_token_student_without_teacher_trains_both_heads_on_labels():
    loss = DistillationLoss(torch.nn.CrossEntropyLoss())(IMAGES, (STUDENT, DIST_HEAD), LABELS)
    assert loss.item() == pytest.approx((mean_ce(STUDENT, LABELS) + mean_ce(DIST_HEAD, LABELS)) / 2)


def test_frozen_teacher_stays_in_eval_mode_without_gradients_and_renormalises():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(2, 3, 6, 6))
    teacher = FrozenTeacher(net, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    teacher.train()
    assert not teacher.training and not net.training and not net[1].training
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 6, 6, requires_grad=True)
    out = teacher(images)
    assert not out.requires_grad
    running_mean = net[1].running_mean.clone()
    teacher(images)
    assert torch.equal(running_mean, net[1].running_mean)  # BatchNorm statistics untouched
    # the student's pixels x (mean 0, std 1) become (x - 0.5) / 0.25 for a teacher trained that way
    with torch.no_grad():
        assert torch.allclose(out, net((images - 0.5) / 0.25), atol=1e-5)
