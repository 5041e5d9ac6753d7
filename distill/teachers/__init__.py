"""Teachers: build a RegNetY (or any timm convnet), run it frozen, adapt it to a new resolution (FixRes)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.weights.models import create


def build_teacher(name: str, num_classes: int, drop_path: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised teacher and the constructor arguments that rebuild it."""
    args = {"num_classes": num_classes}
    model = create(name, drop_path_rate=drop_path, **args)
    return model, args


class FrozenTeacher(nn.Module):
    """A teacher that always runs in eval mode, without gradients, on the student's own input.

    If the student's normalisation differs from the teacher's, the input is renormalised first,
    so the teacher sees the pixel statistics it was trained on. With `img_size`, the batch is resized
    (bicubic, antialiased when shrinking, on the batch's device) to that resolution first: a teacher
    trained at 224 px can then read a 32 px student's batch at the resolution it knows.
    """

    def __init__(self, model: nn.Module, teacher_norm: tuple[Sequence[float], Sequence[float]],
                 input_norm: tuple[Sequence[float], Sequence[float]], img_size: int | None = None):
        super().__init__()
        self.img_size = img_size
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in teacher_norm)
        i_mean, i_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in input_norm)
        # x_teacher = (x * i_std + i_mean - t_mean) / t_std = x * scale + shift
        self.renormalise = not (torch.allclose(t_mean, i_mean) and torch.allclose(t_std, i_std))
        self.register_buffer("scale", i_std / t_std, persistent=False)
        self.register_buffer("shift", (i_mean - t_mean) / t_std, persistent=False)
        self.body: Any = None  # the compiled forward_features, with --compile

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def _renormalised(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.img_size is not None and tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            shrink = images.shape[-1] > self.img_size
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                                   antialias=shrink)
        return images

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return (self.body or self.model.forward_features)(self._renormalised(images))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.model, "forward_head"):  # not a timm model: no head to run apart
            return self.model(self._renormalised(images))
        return _head_in_fp32(self.model, self._features(images))

    @property
    def feature_dim(self) -> int:
        """Width of the teacher's pre-logits features (timm's head_hidden_size, else num_features)."""
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    @torch.no_grad()
    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pre-logits features (timm's forward_head(pre_logits=True)) from one pass of the body."""
        body = self._features(images)
        return _head_in_fp32(self.model, body), _head_in_fp32(self.model, body, pre_logits=True)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers as one: each reads the batch at its own resolution and normalisation, and their output
    is tau times the log of the mean of their probabilities at temperature tau. The loss's softmax(output / tau) is
    then exactly that mean (soft distillation), and its argmax the mean's top class (hard; evaluation's agreement).
    Written by hand: neither timm nor accelerate has an ensemble of teachers."""

    def __init__(self, members: Sequence[FrozenTeacher], tau: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tau = tau

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(member(images).float() / self.tau, dim=1) for member in self.members])
        return self.tau * (torch.logsumexp(log_probs, dim=0) - math.log(len(self.members)))


def _head_in_fp32(model: nn.Module, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """A teacher's head (timm's forward_head: pooling, norm, classifier) run in fp32 under mixed precision: the body
    runs in bf16/fp16, but the logits the loss takes its argmax and softmax of are not rounded to bf16's 8 bits of
    mantissa, where near-ties would flip the hard label (DeiT's fp16 keeps 11; this keeps 24). Written by hand: timm
    has no switch for a head's precision."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return model.forward_head(features.float(), **kwargs)


def norms_in_forward_order(model: nn.Module, img_size: int) -> list[str]:
    """The names of the BatchNorm layers in the order a forward pass runs them (one pass on a blank image)."""
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return order


def _stay_in_eval(module: nn.Module) -> None:
    """Keep a module in eval mode whatever `model.train()` says: a frozen BatchNorm keeps its statistics."""
    module.train = lambda mode=True: nn.Module.train(module, False)  # type: ignore[method-assign]
    module.eval()


def freeze_for_fixres(model: nn.Module, bn: str = "last", img_size: int = 224) -> list[str]:
    """FixRes adaptation: only the classifier and BatchNorm learn; everything else is frozen.

    bn="last": the BatchNorm that runs last before the global pooling (FixRes, section 4: "the classifier and
    the batch normalization layer preceding the global average pooling"), its statistics re-estimated at the new
    resolution; every other BatchNorm keeps its statistics (eval mode). bn="all": every BatchNorm layer. bn="full":
    every layer (FixRes's fine-tuning of the whole network at the test resolution, its section 5's alternative).
    Returns the names of the parameters left trainable.
    """
    if bn == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return [name for name, _ in model.named_parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    norms = norms_in_forward_order(model, img_size)
    adapted = set(norms[-1:] if bn == "last" else norms)
    modules = dict(model.named_modules())
    for name in norms:
        if name not in adapted:
            _stay_in_eval(modules[name])
    classifier = model.get_classifier()
    trainable = []
    for module_name, module in model.named_modules():
        if module_name in adapted or module is classifier:
            for name, parameter in module.named_parameters(prefix=module_name):
                parameter.requires_grad_(True)
                trainable.append(name)
    if not trainable:
        raise DistillError("This teacher has neither BatchNorm layers nor a classifier to adapt with FixRes.")
    return trainable
