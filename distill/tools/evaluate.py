"""`distill evaluate`: any checkpoint's accuracy on any dataset and resolution, per head, beside a teacher, with
test-time augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from distill.console import console
from distill.data import Transformed, eval_loader, eval_transform
from distill.data.sources import describe_skipped
from distill.errors import DistillError
from distill.speed import idle_workers
from distill.students import fused_outputs, fusion_of, resize
from distill.teachers.frozen import check_classes, check_teacher, frozen_teacher
from distill.tools.inference import checkpoint_data
from distill.tools.summary import FUSED, per_class_table, print_metrics
from distill.tools.tta import check_mode, evaluate_views, parse_resolutions, print_tta
from distill.training.processes import make_accelerator
from distill.training.evaluation import bare, evaluate
from distill.weights.checkpoint import build_model
from distill.weights.naming import PRECISIONS, model_label
from distill.weights.pretrained import open_source


def evaluate_checkpoint(path: Path | str, *, dataset: str | None, data_dir: Path | None, res: int | None,
                        crop_pct: float | None, teacher: Path | str | None, batch_size: int, num_workers: int,
                        mixed_precision: str, per_class: bool, skip_corrupt: bool | None = None, model: str | None = None,
                        teacher_model: str | None = None, teacher_res: str = "student", tta: str | None = None,
                        tta_res: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint at any resolution on any dataset with its classes; on its own data, also show the
    accuracy it recorded when trained, and how that was measured (precision and resolution may differ)."""
    if mixed_precision not in PRECISIONS:
        raise DistillError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, not '{mixed_precision}'.")
    if tta is not None or tta_res is not None:
        check_mode(tta, tta_res)
    ckpt = open_source(path, model=model)
    acc = make_accelerator(mixed_precision)
    own = dataset is None and data_dir is None
    data, where = checkpoint_data(ckpt, dataset, data_dir, skip_corrupt)  # the checkpoint's own data unless told
    skipped = describe_skipped(data.info)
    img_size = res or ckpt.img_size
    net = build_model(ckpt)
    args = ckpt.model_args
    if hasattr(net, "pos_embed") and img_size != ckpt.img_size:
        resize(net, img_size)
        args["img_size"] = img_size
    label = model_label(ckpt.model_name, args, img_size=img_size, params=sum(p.numel() for p in net.parameters()))
    mean, std = tuple(ckpt.data["mean"]), tuple(ckpt.data["std"])
    transform = eval_transform(img_size, mean=mean, std=std, crop_pct=crop_pct or ckpt.data.get("crop_pct", 0.875),
                               interpolation=ckpt.data.get("interpolation", "bicubic"))
    reference = None
    if teacher is not None:
        teacher_ckpt = check_teacher(open_source(teacher, model=teacher_model, role="teacher"))
        check_classes(teacher_ckpt, ckpt.classes, str(ckpt.path))
        reference = frozen_teacher(teacher_ckpt, (mean, std), img_size, teacher_res=teacher_res).to(acc.device)
    loader = acc.prepare(eval_loader(Transformed(data.test, transform), batch_size=batch_size, num_workers=num_workers,
                                     idle_workers=idle_workers(None, acc.device.type)))
    net = acc.prepare(net)
    metrics = evaluate(net, loader, acc, fused_outputs(fusion_of(ckpt.meta)), reference=reference, per_class=True)
    if acc.is_main_process:
        if skipped:
            console.print(f"--skip-corrupt: {escape(skipped)}", soft_wrap=True)
        print_metrics(metrics, f"{ckpt.path}: {label} on {where}", classes=ckpt.classes)
        if "heads" in metrics and "fused" in metrics["heads"]:
            console.print(f"class + distillation: the two heads fused by {FUSED[fusion_of(ckpt.meta)]}")
        if own and ckpt.accuracy():
            console.print(escape(f"recorded in the checkpoint at the end of training: {ckpt.accuracy()}"), soft_wrap=True)
        if per_class:
            console.print(per_class_table(ckpt.classes, metrics["per_class_top1"]))
    if tta is not None:
        metrics["tta"] = evaluate_views(ckpt, bare(acc, net), data.test, tta, img_size=img_size, crop_pct=crop_pct,
                                        resolutions=parse_resolutions(tta_res), batch_size=batch_size,
                                        num_workers=num_workers, mixed_precision=mixed_precision)
        if acc.is_main_process:
            print_tta(metrics["tta"])
    return metrics
