"""What users read: stage summaries, `distill info`, and `distill evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from distill.checkpoint import Checkpoint, build_model, read_checkpoint
from distill.console import console

HEAD_NAMES = {"top": "model", "fused": "class + distillation (softmax sum)", "cls": "class head", "dist": "distillation head",
              "teacher": "teacher"}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    """A heading line (it may be long: paths) and a table of heads."""
    console.print(f"[bold]{escape(title)}[/]", soft_wrap=True)
    console.print(metrics_table(metrics))


def metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table()
    table.add_column("head")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    disagreement = metrics.get("disagreement", {})
    if disagreement:
        table.add_column("disagrees with teacher", justify="right")
    heads = metrics.get("heads") or {metrics.get("head", "top"): {"top1": metrics.get("top1"), "top5": metrics.get("top5")}}
    for name, values in heads.items():
        rate = disagreement.get(name)
        cells = [HEAD_NAMES.get(name, name), _pct(values.get("top1")), _pct(values.get("top5"))]
        table.add_row(*cells, *(["-" if rate is None else f"{rate:.3f}"] if disagreement else []))
    return table


def print_summary(ckpt: Checkpoint) -> None:
    meta = ckpt.meta
    metrics = meta.get("metrics", {})
    params = meta.get("params")
    print_metrics(metrics, f"{ckpt.stage}: {ckpt.model_name} at {ckpt.img_size} px"
                           f"{f', {params / 1e6:.2f}M params' if params else ''} ({metrics.get('samples', '?')} test images)")
    if "before_top1" in metrics:
        console.print(f"parent at {metrics.get('parent_img_size')} px: top-1 {_pct(metrics.get('parent_top1'))};  "
                      f"at {ckpt.img_size} px before fine-tuning: {_pct(metrics.get('before_top1'))};  "
                      f"after: {_pct(metrics.get('top1'))}")
    if ckpt.stage == "transfer" and metrics.get("per_class_top1"):
        console.print(per_class_table(ckpt.classes, metrics["per_class_top1"]))
    console.print(f"checkpoint: {escape(str(ckpt.path))}", soft_wrap=True)


def per_class_table(classes: list[str], accuracies: list[float | None]) -> Table:
    table = Table(title="per-class top-1", title_justify="left")
    table.add_column("class")
    table.add_column("top-1", justify="right")
    for name, value in zip(classes, accuracies):
        table.add_row(name, _pct(value))
    return table


def _short(record: dict[str, Any] | None) -> str:
    if not record:
        return "none"
    return f"{record.get('stage')} {record.get('model')} sha256 {record.get('sha256', '')[:12]}  {record.get('path')}"


def info_table(ckpt: Checkpoint) -> None:
    meta = ckpt.meta
    data = ckpt.data
    table = Table(title=str(ckpt.path), show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    distillation = meta.get("distillation")
    rows = [
        ("kind / stage", f"{ckpt.kind} / {ckpt.stage}"),
        ("model", f"{ckpt.model_name} {ckpt.model_args}"),
        ("parameters", f"{meta.get('params', 0):,}"),
        ("dataset", data.get("dataset") or data.get("data_dir") or "?"),
        ("classes", f"{len(ckpt.classes)}: {', '.join(ckpt.classes[:10])}{' ...' if len(ckpt.classes) > 10 else ''}"),
        ("train / test images", f"{data.get('train_size', '?')} / {data.get('test_size', '?')}"),
        ("resolution", f"{ckpt.img_size} px, crop ratio {data.get('crop_pct')}, {data.get('interpolation')}"),
        ("normalisation", f"{data.get('norm')}: mean {data.get('mean')}, std {data.get('std')}"),
        ("distillation", "none" if not distillation else
         f"{distillation.get('kind')} (alpha {distillation.get('alpha')}, tau {distillation.get('tau')}, "
         f"token {'yes' if distillation.get('token') else 'no'}"
         + (f", feature loss {distillation['feature_loss']}" if distillation.get("feature_loss") else "") + ")"),
        ("parent", _short(meta.get("parent"))),
        ("teacher", _short(meta.get("teacher"))),
    ]
    if meta.get("trainable"):
        rows.append(("trained", f"{meta['trainable']} ({meta.get('trainable_params', 0):,} parameters)"))
    metrics = meta.get("metrics", {})
    rows.append(("test top-1 / top-5", f"{_pct(metrics.get('top1'))} / {_pct(metrics.get('top5'))} "
                                        f"({metrics.get('samples', '?')} images)"))
    for name, values in (metrics.get("heads") or {}).items():
        rows.append((f"  {HEAD_NAMES.get(name, name)}", f"{_pct(values.get('top1'))} / {_pct(values.get('top5'))}"))
    for name, rate in (metrics.get("disagreement") or {}).items():
        rows.append((f"  disagreement, {HEAD_NAMES.get(name, name)}", f"{rate:.4f}"))
    if "before_top1" in metrics:
        rows.append(("before fine-tuning", f"{_pct(metrics['before_top1'])} at {ckpt.img_size} px; parent "
                                           f"{_pct(metrics.get('parent_top1'))} at {metrics.get('parent_img_size')} px"))
    rows.append(("training time", f"{metrics.get('train_seconds', '?')} s on {meta.get('processes', '?')} process(es)"))
    config = meta.get("config", {})
    rows.append(("config", ", ".join(f"{k}={v}" for k, v in sorted(config.items()))))
    rows.append(("effective lr", f"{meta.get('lr_effective')}"))
    rows.append(("written", f"{meta.get('created')} by distill {meta.get('distill_version')} {meta.get('versions', {})}"))
    rows.append(("file sha256", ckpt.sha256))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def evaluate_checkpoint(path: Path, *, dataset: str | None, data_dir: Path | None, res: int | None,
                        crop_pct: float | None, teacher: Path | None, batch_size: int, num_workers: int,
                        mixed_precision: str, per_class: bool) -> dict[str, Any]:
    """Evaluate a checkpoint at any resolution on any dataset with its classes."""
    from distill.data import Transformed, eval_loader, eval_transform, open_dataset
    from distill.engine import make_accelerator
    from distill.evaluation import evaluate, plain_logits
    from distill.errors import DistillError
    from distill.stages import check_classes, frozen_teacher, read_teacher
    from distill.students import named_outputs, resize

    ckpt = read_checkpoint(path)
    acc = make_accelerator(mixed_precision)
    classes = None
    if dataset is None and data_dir is None:
        dataset = ckpt.data.get("dataset")
        data_dir = Path(ckpt.data["data_dir"]) if ckpt.data.get("data_dir") else None
        classes = ckpt.classes if ckpt.data.get("kept_classes") else None
    data = open_dataset(None if data_dir else dataset, data_dir, classes=classes)
    if data.classes != ckpt.classes:
        raise DistillError(f"{ckpt.path} was trained on other classes than {dataset or data_dir} "
                           f"({len(ckpt.classes)} vs {len(data.classes)}).")
    img_size = res or ckpt.img_size
    model = build_model(ckpt)
    if hasattr(model, "pos_embed") and img_size != ckpt.img_size:
        resize(model, img_size)
    mean, std = tuple(ckpt.data["mean"]), tuple(ckpt.data["std"])
    transform = eval_transform(img_size, mean=mean, std=std, crop_pct=crop_pct or ckpt.data.get("crop_pct", 0.875),
                               interpolation=ckpt.data.get("interpolation", "bicubic"))
    reference = None
    if teacher is not None:
        teacher_ckpt = read_teacher(teacher)
        check_classes(teacher_ckpt, ckpt.classes, str(ckpt.path))
        reference = frozen_teacher(teacher_ckpt, (mean, std), img_size).to(acc.device)
    loader = acc.prepare(eval_loader(Transformed(data.test, transform), batch_size=batch_size, num_workers=num_workers))
    model = acc.prepare(model)
    predict = named_outputs if ckpt.kind == "student" else plain_logits
    metrics = evaluate(model, loader, acc, predict, reference=reference, per_class=per_class)
    if acc.is_main_process:
        print_metrics(metrics, f"{ckpt.path}: {ckpt.model_name} at {img_size} px on {dataset or data_dir} "
                               f"({metrics['samples']} test images)")
        if reference is not None:
            console.print(f"teacher {teacher}: top-1 {_pct(metrics['heads']['teacher']['top1'])}")
        if per_class:
            console.print(per_class_table(ckpt.classes, metrics["per_class_top1"]))
    return metrics
