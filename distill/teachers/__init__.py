"""Teachers: build a RegNetY (or any timm convnet), run it frozen, adapt it to a new resolution (FixRes)."""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import nn

from distill.errors import DistillError


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise DistillError(f"timm has no model named '{name}'{hint}.")


def build_teacher(name: str, num_classes: int, drop_path: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised teacher and the constructor arguments that rebuild it."""
    check_model_name(name)
    args = {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **args)
    return model, args


class FrozenTeacher(nn.Module):
    """A teacher that always runs in eval mode, without gradients, on the student's own input.

    If the student's normalisation differs from the teacher's, the input is renormalised first,
    so the teacher sees the pixel statistics it was trained on.
    """

    def __init__(self, model: nn.Module, teacher_norm: tuple[Sequence[float], Sequence[float]],
                 input_norm: tuple[Sequence[float], Sequence[float]]):
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in teacher_norm)
        i_mean, i_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in input_norm)
        # x_teacher = (x * i_std + i_mean - t_mean) / t_std = x * scale + shift
        self.renormalise = not (torch.allclose(t_mean, i_mean) and torch.allclose(t_std, i_std))
        self.register_buffer("scale", i_std / t_std, persistent=False)
        self.register_buffer("shift", (i_mean - t_mean) / t_std, persistent=False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        return self.model(images)


def freeze_for_fixres(model: nn.Module) -> list[str]:
    """FixRes adaptation: only the classifier and the BatchNorm layers learn; the rest is frozen.

    BatchNorm layers stay in train mode, so their statistics are re-estimated at the new resolution.
    Returns the names of the parameters left trainable.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    classifier = model.get_classifier()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or module is classifier:
            for name, parameter in module.named_parameters(prefix=module_name):
                parameter.requires_grad_(True)
                trainable.append(name)
    if not trainable:
        raise DistillError("This teacher has neither BatchNorm layers nor a classifier to adapt with FixRes.")
    return trainable
