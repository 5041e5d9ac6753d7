"""What users read: stage summaries, `distill info`, and `distill evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from distill.checkpoint import Checkpoint, build_model
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
    if record.get("source") and not record.get("path"):
        return f"{record['source']} ({record.get('note', 'imported when needed')})"
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
         f"token {'yes' if distillation.get('token') else 'no'})"),
        ("parent", _short(meta.get("parent"))),
        ("teacher", _short(meta.get("teacher"))),
    ]
    if meta.get("init"):
        rows.append(("started from", _short(meta["init"])))
    source = meta.get("source")
    if source:  # imported pretrained weights: where they came from, and nothing about training
        rows.append(("source", f"{source.get('source')}" + (f" revision {source['revision']}" if source.get("revision") else "")
                     + f", weights sha256 {source.get('sha256')}"))
        rows.append(("class names", data.get("class_source", "?")))
        rows = [r for r in rows if r[0] not in ("train / test images", "parent")]
        if not meta.get("teacher"):
            rows = [r for r in rows if r[0] != "teacher"]
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
    if not source:
        rows.append(("training time", f"{metrics.get('train_seconds', '?')} s on {meta.get('processes', '?')} process(es)"))
        config = meta.get("config", {})
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in sorted(config.items()))))
        rows.append(("effective lr", f"{meta.get('lr_effective')}"))
    else:
        rows = [r for r in rows if r[0] != "test top-1 / top-5"]
    rows.append(("written", f"{meta.get('created')} by distill {meta.get('distill_version')} {meta.get('versions', {})}"))
    rows.append(("file sha256", ckpt.sha256))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def evaluate_checkpoint(path: Path | str, *, dataset: str | None, data_dir: Path | None, res: int | None,
                        crop_pct: float | None, teacher: Path | str | None, batch_size: int, num_workers: int,
                        mixed_precision: str, per_class: bool, model: str | None = None, teacher_model: str | None = None,
                        teacher_res: str = "student") -> dict[str, Any]:
    """Evaluate a checkpoint at any resolution on any dataset with its classes."""
    from distill.data import Transformed, eval_loader, eval_transform, open_dataset
    from distill.engine import make_accelerator
    from distill.evaluation import evaluate
    from distill.errors import DistillError
    from distill.pretrained import open_source
    from distill.stages import check_classes, frozen_teacher, read_teacher
    from distill.students import named_outputs, resize

    ckpt = open_source(path, model=model)
    acc = make_accelerator(mixed_precision)
    classes = None
    if dataset is None and data_dir is None:
        dataset = ckpt.data.get("dataset")
        data_dir = Path(ckpt.data["data_dir"]) if ckpt.data.get("data_dir") else None
        classes = ckpt.classes if ckpt.data.get("kept_classes") else None
    data = open_dataset(None if data_dir else dataset, data_dir, classes=classes)
    if not ckpt.knows_classes(data.classes):
        raise DistillError(f"{ckpt.path} was trained on other classes than {dataset or data_dir} "
                           f"({len(ckpt.classes)} vs {len(data.classes)}).")
    img_size = res or ckpt.img_size
    net = build_model(ckpt)
    if hasattr(net, "pos_embed") and img_size != ckpt.img_size:
        resize(net, img_size)
    mean, std = tuple(ckpt.data["mean"]), tuple(ckpt.data["std"])
    transform = eval_transform(img_size, mean=mean, std=std, crop_pct=crop_pct or ckpt.data.get("crop_pct", 0.875),
                               interpolation=ckpt.data.get("interpolation", "bicubic"))
    reference = None
    if teacher is not None:
        teacher_ckpt = read_teacher(teacher, model=teacher_model)
        check_classes(teacher_ckpt, ckpt.classes, str(ckpt.path))
        reference = frozen_teacher(teacher_ckpt, (mean, std), img_size, teacher_res).to(acc.device)
    loader = acc.prepare(eval_loader(Transformed(data.test, transform), batch_size=batch_size, num_workers=num_workers))
    net = acc.prepare(net)
    metrics = evaluate(net, loader, acc, named_outputs, reference=reference, per_class=per_class)
    if acc.is_main_process:
        print_metrics(metrics, f"{ckpt.path}: {ckpt.model_name} at {img_size} px on {dataset or data_dir} "
                               f"({metrics['samples']} test images)")
        if reference is not None:
            console.print(f"teacher {teacher}: top-1 {_pct(metrics['heads']['teacher']['top1'])}")
        if per_class:
            console.print(per_class_table(ckpt.classes, metrics["per_class_top1"]))
    return metrics
