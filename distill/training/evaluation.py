"""Evaluation: top-1/top-5 per head, each test image counted once however many processes share the work."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from distill.weights.naming import precision_name
from distill.speed import choose_kernels

Predict = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
TOP_K = 5


def measured_precision(acc: Accelerator) -> str:
    """What an accuracy was measured in: fp32, bf16, fp16, or tf32 (fp32 on a GPU whose matrix products use TF32)."""
    if acc.mixed_precision == "no" and acc.device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision_name(acc.mixed_precision)


def bare(acc: Accelerator, model: nn.Module) -> nn.Module:
    """The model as timm built it: without accelerate's wrappers (DDP) and without torch.compile's."""
    return acc.unwrap_model(model, keep_torch_compile=False)


def plain_logits(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"top": model(images)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, acc: Accelerator, predict: Predict = plain_logits,
             reference: nn.Module | None = None, per_class: bool = False, attention: str = "auto",
             onednn_linear: bool | None = None) -> dict[str, Any]:
    """Top-1/top-5 and loss per head, each test image counted exactly once across processes.

    Top-5 is measured only with more than 5 classes (with 5 or fewer it is 100 by construction). The result
    says the precision and the resolution it was measured at: the same weights give other numbers in bf16
    than in fp32, and at another resolution. With a `reference` (a teacher), also its accuracy and how often
    each head disagrees with it. `attention` and `onednn_linear` pick the kernels (distill.speed).
    """
    net = bare(acc, model)
    choose_kernels(acc, [net, reference], attention, onednn_linear)
    was_training = net.training
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    headline, img_size = None, None
    finish = getattr(getattr(loader, "dataset", None), "finish", None)  # the device's part of its preprocessing
    for images, labels in loader:
        if finish is not None:
            images = finish(images, acc.device)
        elif isinstance(images, torch.Tensor) and images.is_floating_point():  # a loader of model-ready batches
            images = images.to(acc.device)
        else:
            raise TypeError("evaluate() needs a loader whose dataset has a finish (distill.data.device) for uint8 batches")
        labels = labels.to(acc.device)
        with acc.autocast():
            scores = predict(net, images)
            if reference is not None:
                scores["teacher"] = reference(images)
        headline, img_size = headline or next(iter(scores)), img_size or int(images.shape[-1])
        num_classes = scores[headline].shape[1]
        record = {"label": labels, "loss": F.cross_entropy(scores[headline].float(), labels, reduction="none")}
        for name, value in scores.items():
            top = value.float().topk(min(TOP_K, value.shape[1]), dim=1).indices
            record[f"{name}/pred"] = top[:, 0]
            if num_classes > TOP_K:
                record[f"{name}/top5"] = (top == labels[:, None]).any(dim=1).float()  # gloo gathers no bools
        record = acc.gather_for_metrics(record)
        for key, value in record.items():
            parts.setdefault(key, []).append(value.cpu())
    net.train(was_training)
    merged = {k: torch.cat(v) for k, v in parts.items()}
    labels = merged["label"]
    heads = [k.split("/")[0] for k in merged if k.endswith("/pred")]
    result: dict[str, Any] = {"samples": int(labels.numel()), "loss": round(merged["loss"].mean().item(), 5),
                              "precision": measured_precision(acc), "img_size": img_size}
    per_head = {}
    for name in heads:
        correct = merged[f"{name}/pred"] == labels
        per_head[name] = {"top1": round(correct.float().mean().item() * 100, 3)}
        if f"{name}/top5" in merged:
            per_head[name]["top5"] = round(merged[f"{name}/top5"].float().mean().item() * 100, 3)
    result.update(per_head[headline], head=headline)
    if len(heads) > 1:
        result["heads"] = per_head
    if reference is not None:
        teacher_pred = merged["teacher/pred"]
        result["disagreement"] = {name: round((merged[f"{name}/pred"] != teacher_pred).float().mean().item(), 4)
                                  for name in heads if name != "teacher"}
    if per_class:  # and how the predictions spread over the classes: a model that collapsed onto a few shows it
        predicted = merged[f"{headline}/pred"]
        correct = (predicted == labels).float()
        result["per_class_top1"] = [round(correct[labels == c].mean().item() * 100, 2) if (labels == c).any() else None
                                    for c in range(num_classes)]
        present = [value for value in result["per_class_top1"] if value is not None]
        result["mean_class_top1"] = round(sum(present) / len(present), 3)
        result["predicted_per_class"] = torch.bincount(predicted, minlength=num_classes).tolist()
        result["labels_per_class"] = torch.bincount(labels, minlength=num_classes).tolist()
    return result


def flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """One level of keys for metrics.jsonl: top1, top5, loss, cls_top1, dist_top1, ..."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for name, values in metrics.get("heads", {}).items():
        for key, value in values.items():
            out[f"{name}_{key}"] = value
    for name, value in metrics.get("disagreement", {}).items():
        out[f"{name}_disagreement"] = value
    out["test_loss"] = out.pop("loss", None)
    return out
