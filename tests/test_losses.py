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


# -- DeiT III's binary cross-entropy ---------------------------------------------------------------------
def bce(logits, targets):
    """Binary cross-entropy with logits, by hand: the mean over every image and class."""
    total, count = 0.0, 0
    for row, target_row in zip(logits.tolist(), targets):
        for x, t in zip(row, target_row):
            p = 1 / (1 + math.exp(-x))
            total -= t * math.log(p) + (1 - t) * math.log(1 - p)
            count += 1
    return total / count


def test_bce_on_labels_is_one_hot_with_label_smoothing_by_hand():
    smoothing, classes = 0.1, 3
    off, on = smoothing / classes, 1 - smoothing + smoothing / classes
    loss = base_criterion(smoothing, soft_targets=False, loss="bce")(STUDENT, LABELS)
    assert loss.item() == pytest.approx(bce(STUDENT, [[on, off, off], [off, on, off]]), rel=1e-6)


def test_bce_takes_mixup_targets_as_they_are_or_binarised_at_the_threshold():
    """DeiT III: targets.gt(0.0) after Mixup/CutMix, so both classes of a mixed image are 1."""
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    soft = base_criterion(0.0, soft_targets=True, loss="bce")(STUDENT, mixed)
    assert soft.item() == pytest.approx(bce(STUDENT, mixed.tolist()), rel=1e-6)
    binary = base_criterion(0.0, soft_targets=True, loss="bce", bce_threshold=0.0)(STUDENT, mixed)
    assert binary.item() == pytest.approx(bce(STUDENT, [[1, 1, 0], [0, 1, 1]]), rel=1e-6)


def test_bce_with_timm_mixup_targets_in_the_real_loop():
    """timm's Mixup hands the criterion dense targets; the BCE of the whole step is the hand value on them."""
    from timm.data import Mixup

    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=3)
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    _, targets = mixup(images, labels)
    assert targets.shape == (2, 3)
    criterion = DistillationLoss(base_criterion(0.0, soft_targets=True, loss="bce", bce_threshold=0.0))
    expected = bce(STUDENT, (targets > 0).float().tolist())
    assert criterion(IMAGES, STUDENT, targets).item() == pytest.approx(expected, rel=1e-6)


def test_hard_distillation_composes_with_bce_as_deit3_code_does():
    """The label term is BCE, the teacher term stays DeiT's cross-entropy on the teacher's argmax."""
    criterion = DistillationLoss(base_criterion(0.0, soft_targets=False, loss="bce"), FixedTeacher(TEACHER), "hard",
                                 alpha=0.5)
    loss = criterion(IMAGES, (STUDENT, DIST_HEAD), LABELS)
    expected = 0.5 * bce(STUDENT, [[1, 0, 0], [0, 1, 0]]) + 0.5 * mean_ce(DIST_HEAD, [1, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# -- feature distillation ----------------------------------------------------------------------------------
class FeatureTeacher(FixedTeacher):
    """Preset logits and pre-logits features."""

    def __init__(self, logits, features):
        super().__init__(logits)
        self.features = features
        self.feature_dim = features.shape[1]

    def logits_and_features(self, images):
        return self.logits, self.features


class Caught:
    """Stands in for the student's pre-logits catcher: the features of 'the last forward'."""

    def __init__(self, features):
        self.features, self.dim = features, features.shape[1]

    def take(self):
        return self.features


STUDENT_FEATURES = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
TEACHER_FEATURES = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.0]])
PROJECTION = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0.0, 0.5, -0.5])  # W (3 x 2), b


def feature_criterion(kind, feature_loss="mse", alpha=0.5):
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), FeatureTeacher(TEACHER, TEACHER_FEATURES), kind, alpha=alpha,
                                 features=Caught(STUDENT_FEATURES), feature_loss=feature_loss)
    with torch.no_grad():
        criterion.learned.projection.weight.copy_(PROJECTION[0])
        criterion.learned.projection.bias.copy_(PROJECTION[1])
    return criterion


def projected():
    weight, bias = (p.tolist() for p in PROJECTION)
    return [[sum(w * f for w, f in zip(row, features)) + b for row, b in zip(weight, bias)]
            for features in STUDENT_FEATURES.tolist()]


def test_feature_distillation_mse_by_hand():
    squared = [(p - t) ** 2 for prow, trow in zip(projected(), TEACHER_FEATURES.tolist()) for p, t in zip(prow, trow)]
    expected = 0.5 * mean_ce(STUDENT, LABELS) + 0.5 * sum(squared) / len(squared)
    assert feature_criterion("feature")(IMAGES, STUDENT, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_feature_distillation_cosine_by_hand_and_beside_hard_labels():
    cosines = []
    for p, t in zip(projected(), TEACHER_FEATURES.tolist()):
        dot = sum(a * b for a, b in zip(p, t))
        cosines.append(dot / math.sqrt(sum(a * a for a in p)) / math.sqrt(sum(b * b for b in t)))
    feature_term = sum(1 - c for c in cosines) / len(cosines)
    loss = feature_criterion("hard+feature", "cosine", alpha=0.3)(IMAGES, (STUDENT, DIST_HEAD), LABELS)
    expected = 0.7 * mean_ce(STUDENT, LABELS) + 0.3 * mean_ce(DIST_HEAD, [1, 2]) + 0.3 * feature_term
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_feature_only_trains_both_token_heads_on_the_labels():
    criterion = feature_criterion("feature", alpha=0.5)
    loss = criterion(IMAGES, (STUDENT, DIST_HEAD), LABELS)
    label_term = (mean_ce(STUDENT, LABELS) + mean_ce(DIST_HEAD, LABELS)) / 2
    feature_term = feature_criterion("feature", alpha=1.0)(IMAGES, STUDENT, LABELS).item()
    assert loss.item() == pytest.approx(0.5 * label_term + 0.5 * feature_term, rel=1e-6)


def test_the_student_features_are_its_pre_logits_the_distillation_tokens_for_a_token_model():
    """What feature distillation regresses: the input of the classifier (plain model) or of the distillation
    head (token model), caught during a training forward only."""
    import timm

    from distill.students import PreLogits

    images = torch.rand(2, 3, 16, 16)
    for name in ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"):
        model = timm.create_model(name, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        caught = PreLogits(model)
        assert caught.dim == 32
        model.eval()
        model(images)
        with pytest.raises(RuntimeError):
            caught.take()  # evaluation keeps nothing
        model.train()
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)
        model(images)
        tokens = model.forward_features(images)  # no dropout or drop path in this model: the same forward
        expected = tokens[:, 1] if "distilled" in name else tokens[:, 0]
        assert torch.allclose(caught.take(), expected)


def test_a_teachers_logits_reach_the_loss_in_fp32_under_mixed_precision():
    """The teacher's body runs in bf16, its classifier in fp32 on the bf16 features: the hard label's argmax and the
    soft target's softmax read logits that were never rounded to bf16."""
    import timm

    from types import SimpleNamespace

    from distill.speed import choose_kernels

    torch.manual_seed(0)
    model = timm.create_model("regnety_002", num_classes=10)
    norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    teacher = FrozenTeacher(model, norm, norm)
    run = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    choose_kernels(run, [teacher], "auto", True)  # as every run does (oneDNN's linear layers where chosen)
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher(images)
        body = model.forward_features(images)
        rounded = model.forward_head(body)
    assert logits.dtype == torch.float32 and body.dtype == torch.bfloat16 and rounded.dtype == torch.bfloat16
    assert torch.equal(logits, model.forward_head(body.float()))
    assert not torch.equal(logits, rounded.float())  # the head in bf16 would have rounded them
