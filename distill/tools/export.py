"""Models out: a timm model folder (config.json + model.safetensors) and, optionally, ONNX.

The folder is what timm's `save_for_hf` writes, so `timm.create_model("local-dir:DIR", pretrained=True)` loads
it and `huggingface_hub.upload_folder` publishes it as it is. Its config.json carries the architecture and
its arguments, num_classes, the label names and the preprocessing (pretrained_cfg), plus a "distill" entry
naming the checkpoint it came from and that checkpoint's lineage.

The ONNX graph outputs class probabilities: softmax for a plain model, and for a token student the softmax of its
two heads fused as its checkpoint records. By default that is the mean of their logits, which is also what the timm
folder computes (timm's forward), so every way out predicts what was measured. A student made with `--fusion
softmax` (the mean of the heads' probabilities, the paper's text) keeps that rule in ONNX, while the timm folder
averages the logits: the report says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.weights.checkpoint import MODEL_FILE, Checkpoint, build_model
from distill.errors import DistillError
from distill.students import fusion_of, has_dist_token, named_outputs

CONFIG_FILE, ONNX_FILE = "config.json", "model.onnx"
ONNX_TOLERANCE = 1e-4  # largest absolute difference allowed between ONNX Runtime's and torch's probabilities


class Probabilities(nn.Module):
    """The model's class probabilities: softmax of its prediction (for a token student, of its fused heads)."""

    def __init__(self, model: nn.Module, fusion: str = "logits"):
        super().__init__()
        self.model, self.fusion = model, fusion

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        headline = next(iter(named_outputs(self.model, images, self.fusion).values()))
        return headline.float().softmax(dim=-1)  # the fused log of mean probabilities comes back as those probabilities


def export_config(ckpt: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_config, data_config) for timm's save_for_hf: label names and descriptions, preprocessing, lineage."""
    data = ckpt.data
    if ckpt.class_ids:  # ImageNet: timm's convention, synsets as names and lemmas as descriptions
        labels: dict[str, Any] = {"label_names": ckpt.class_ids,
                                  "label_descriptions": dict(zip(ckpt.class_ids, ckpt.classes))}
    else:
        labels = {"label_names": ckpt.classes}
    lineage = {key: ckpt.meta.get(key) for key in ("parent", "teacher", "init", "source", "distillation")
               if ckpt.meta.get(key)}
    metrics = {key: value for key, value in (ckpt.meta.get("metrics") or {}).items() if key in ("top1", "top5", "samples")}
    model_config = {**labels, "distill": {"checkpoint_sha256": ckpt.sha256, "stage": ckpt.stage, "kind": ckpt.kind,
                                          "model": ckpt.model_name, "metrics": metrics,
                                          "dataset": data.get("dataset") or data.get("data_dir"), **lineage}}
    data_config = {"input_size": (3, ckpt.img_size, ckpt.img_size), "mean": tuple(data["mean"]), "std": tuple(data["std"]),
                   "crop_pct": data.get("crop_pct", 0.875), "interpolation": data.get("interpolation", "bicubic")}
    return model_config, data_config


def export_checkpoint(ckpt: Checkpoint, to: Path, onnx: bool = False, batch: int = 2) -> dict[str, Any]:
    """Write the timm folder (and ONNX), each file atomically, and check what was written against the checkpoint."""
    import timm
    from timm.models import save_for_hf

    to = Path(to)
    if to.exists() and not to.is_dir():
        raise DistillError(f"--out {to} is a file; give a folder.")
    model = build_model(ckpt)
    model_config, data_config = export_config(ckpt)
    to.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export.", dir=to))
    try:
        save_for_hf(model, str(staging), model_config=model_config, safe_serialization=True, data_config=data_config)
        images = torch.randn(batch, 3, ckpt.img_size, ckpt.img_size, generator=torch.Generator().manual_seed(0))
        if onnx:
            onnx_difference = write_onnx(model, images, staging / ONNX_FILE, fusion_of(ckpt.meta))
        umask = os.umask(0)
        os.umask(umask)
        for name in (CONFIG_FILE, MODEL_FILE) + ((ONNX_FILE,) if onnx else ()):
            os.chmod(staging / name, 0o666 & ~umask)  # the usual permissions, whatever the writer chose
            os.replace(staging / name, to / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    reloaded = timm.create_model(f"local-dir:{to}", pretrained=True).eval()
    with torch.no_grad():
        difference = float((reloaded(images) - model(images)).abs().max())
    if difference > 0:
        raise DistillError(f"The exported folder {to} does not reproduce the checkpoint's logits (max difference "
                           f"{difference:.3g}); please report this.")
    report: dict[str, Any] = {"folder": str(to), "timm_max_difference": difference}
    if has_dist_token(model) and fusion_of(ckpt.meta) != "logits":
        report["fusion_note"] = ("this student fuses its heads by the mean of their probabilities (--fusion softmax), "
                                 "as its recorded accuracy and ONNX do; timm's forward averages their logits, which "
                                 "can rank classes otherwise")
    if onnx:
        report.update(onnx=str(to / ONNX_FILE), onnx_max_difference=onnx_difference)
    return report


def write_onnx(model: nn.Module, images: torch.Tensor, path: Path, fusion: str = "logits") -> float:
    """Export the probabilities to ONNX (dynamic batch) and check them with ONNX Runtime; returns the largest
    absolute difference from torch's, refused above ONNX_TOLERANCE."""
    try:
        import onnxruntime
    except ImportError:
        raise DistillError("--onnx needs onnx and onnxruntime: pip install 'distill[onnx]'.") from None
    wrapped = Probabilities(model, fusion).eval()
    with torch.no_grad():
        expected = wrapped(images).numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow the graph freezes
            torch.onnx.export(wrapped, (images,), str(path), input_names=["images"], output_names=["probabilities"],
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
    except Exception as error:  # the exporter raises many types; one sentence
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(f"torch cannot export this model to ONNX ({first}).") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"images": images.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > ONNX_TOLERANCE:
        raise DistillError(f"The ONNX model differs from torch by {difference:.3g} in probability (tolerance "
                           f"{ONNX_TOLERANCE:g}); it is not written.")
    return difference
