"""What users read of a checkpoint: the summary a stage ends with, and `distill info`."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from distill.weights.checkpoint import Checkpoint
from distill.console import console, listing
from distill.data.sources import describe_skipped
from distill.weights.naming import measured_at

FUSED = {"logits": "the mean of their logits (timm's forward)", "softmax": "the mean of their probabilities"}
HEAD_NAMES = {"top": "model", "fused": "class + distillation (fused)", "cls": "class head", "dist": "distillation head",
              "teacher": "teacher"}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _topk(values: dict[str, Any]) -> str:
    """`92.78 / 99.10`, or `92.78` alone where top-5 was not measured (5 classes or fewer)."""
    return _pct(values.get("top1")) + (f" / {_pct(values['top5'])}" if values.get("top5") is not None else "")


def print_metrics(metrics: dict[str, Any], title: str, meta: dict[str, Any] | None = None,
                  classes: list[str] | None = None) -> None:
    """A heading line (it may be long: paths) and a table of heads, captioned with how it was measured; then the
    best head where it is not the headline, and how the predictions spread over the classes."""
    console.print(f"[bold]{escape(title)}[/]", soft_wrap=True)
    console.print(metrics_table(metrics))
    console.print(f"on {metrics.get('samples', '?')} test images, measured in {measured_at(metrics, meta)}")
    for line in [best_head_line(metrics), *spread_lines(metrics, classes)]:
        if line:
            console.print(escape(line), soft_wrap=True)


def best_head_line(metrics: dict[str, Any]) -> str | None:
    """A token student whose headline (the fused heads) is not its best head says which head is."""
    heads = {name: values.get("top1") for name, values in (metrics.get("heads") or {}).items() if name != "teacher"}
    headline = metrics.get("head")
    if not heads or headline not in heads or None in heads.values():
        return None
    best = max(heads, key=lambda name: heads[name])
    if heads[best] <= heads[headline]:
        return None
    return (f"best head: the {HEAD_NAMES.get(best, best)}, {_pct(heads[best])} (the headline, "
            f"{HEAD_NAMES.get(headline, headline)}, {_pct(heads[headline])})")


# A model has collapsed when one class takes at least this share of the predictions and at least twice its share of
# the labels, or when at least half of the classes (of 4 or more) are never predicted.
COLLAPSE_SHARE = 0.4


def spread_lines(metrics: dict[str, Any], classes: list[str] | None) -> list[str]:
    """Mean per-class accuracy, the classes never predicted and never right, and one line when the predictions
    collapse onto a few classes (a model that calls most images one class can still show a passable top-1)."""
    accuracies, predicted, labels = (metrics.get(key) for key in ("per_class_top1", "predicted_per_class", "labels_per_class"))
    if not accuracies or not predicted or not labels:
        return []
    names = classes if classes and len(classes) == len(accuracies) else [str(i) for i in range(len(accuracies))]
    shown = [i for i, count in enumerate(labels) if count]
    lines = [f"mean per-class top-1 {_pct(metrics.get('mean_class_top1'))} over {len(shown)} classes"]
    never = [names[i] for i in shown if predicted[i] == 0]
    wrong = [names[i] for i in shown if predicted[i] and accuracies[i] == 0]
    if never:
        lines[0] += f"; never predicted: {listing(never)}"
    if wrong:
        lines[0] += f"; never right: {listing(wrong)}"
    total = sum(labels)
    top = max(range(len(predicted)), key=lambda i: predicted[i])
    share = predicted[top] / total if total else 0.0
    if (share >= COLLAPSE_SHARE and predicted[top] >= 2 * labels[top]) or (len(shown) >= 4 and 2 * len(never) >= len(shown)):
        lines.append(f"collapsed: {predicted[top]} of {total} test images ({share * 100:.0f} %) are predicted "
                     f"'{names[top]}', which holds {labels[top]} of them, and {len(never)} of {len(shown)} classes are "
                     "never predicted; the top-1 above hides it")
    return lines


def metrics_table(metrics: dict[str, Any]) -> Table:
    heads = metrics.get("heads") or {metrics.get("head", "top"): {k: metrics.get(k) for k in ("top1", "top5")}}
    table = Table()
    table.add_column("head")
    table.add_column("top-1", justify="right")
    top5 = any(values.get("top5") is not None for values in heads.values())
    if top5:
        table.add_column("top-5", justify="right")
    disagreement = metrics.get("disagreement", {})
    if disagreement:
        table.add_column("disagrees with teacher (%)", justify="right")
    for name, values in heads.items():
        rate = disagreement.get(name)
        cells = [HEAD_NAMES.get(name, name), _pct(values.get("top1"))] + ([_pct(values.get("top5"))] if top5 else [])
        table.add_row(*cells, *(["-" if rate is None else _pct(rate * 100)] if disagreement else []))
    return table


def fine_tune_line(ckpt: Checkpoint) -> str | None:
    """Accuracy before and after a resolution change, each with where it was measured."""
    metrics = ckpt.meta.get("metrics", {})
    if "before_top1" not in metrics:
        return None
    parts = []
    if metrics.get("parent_top1") is not None:
        parts.append(f"parent {_pct(metrics['parent_top1'])} ({metrics.get('parent_precision') or '?'} at "
                     f"{metrics.get('parent_img_size')} px)")
    step = "FixRes adaptation" if ckpt.stage == "teach-fixres" else "fine-tuning"
    parts.append(f"before {step} {_pct(metrics['before_top1'])} ({measured_at(metrics, ckpt.meta, 'before_')})")
    parts.append(f"after {_pct(metrics.get('top1'))} ({measured_at(metrics, ckpt.meta)})")
    return "top-1: " + ";  ".join(parts)


def print_summary(ckpt: Checkpoint) -> None:
    meta = ckpt.meta
    metrics = meta.get("metrics", {})
    print_metrics(metrics, f"{ckpt.stage}: {ckpt.label()}", meta, ckpt.classes)
    fusion = (meta.get("distillation") or {}).get("fusion")
    if "heads" in metrics and fusion in FUSED:
        console.print(f"class + distillation: the two heads fused by {FUSED[fusion]}")
    line = fine_tune_line(ckpt)
    if line:
        console.print(escape(line), soft_wrap=True)
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
    return (f"{record.get('stage')} {record.get('label') or record.get('model')}, sha256 {record.get('sha256', '')[:12]}, "
            f"{record.get('path')}")


def inherited(record: dict[str, Any], meta: dict[str, Any]) -> str:
    """What a run took from a recorded checkpoint; checkpoints written before lineage said so are read by stage."""
    if record.get("inherited"):
        return record["inherited"]
    if meta.get("from_scratch"):
        return "recipe"
    return "teacher" if meta.get("stage") == "student" else "weights"


def lineage_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the weights came from (a parent, or random initialisation, with the architecture's source for a
    from-scratch baseline) and the teacher, each saying what was taken from it."""
    parent, teacher = meta.get("parent"), meta.get("teacher")
    source = meta.get("architecture_from") or (parent if parent and inherited(parent, meta) == "recipe" else None)
    if meta.get("ingredients"):  # a soup: the average of its ingredients' weights
        kept = [record for record in meta["ingredients"] if record.get("in_soup")]
        weights = (f"{(meta.get('soup') or {}).get('method', '')} soup, the average of {len(kept)} of "
                   f"{len(meta['ingredients'])} checkpoints: " + "; ".join(_short(record) for record in kept))
    elif meta.get("source"):  # imported pretrained weights
        weights = f"pretrained, imported from {meta['source'].get('source')}"
    elif meta.get("init"):  # a student started from pretrained weights (--init)
        weights = f"from {_short(meta['init'])} (--init)"
    elif parent and inherited(parent, meta) == "weights":
        weights = f"from {_short(parent)}"
    elif source and source.get("sha256") != (teacher or {}).get("sha256"):
        weights = f"random initialisation; architecture copied from {_short(source)} (its weights are not used)"
    else:
        weights = "random initialisation"
    rows = [("weights", weights)]
    if teacher:
        kind = (meta.get("distillation") or {}).get("kind")
        role = (f"{kind} distillation" if kind not in (None, "none") and inherited(teacher, meta) != "recipe"
                else "measured against only, not distilled from")
        several = meta.get("teachers") or []
        if len(several) > 1:
            rows.append(("teachers", "; ".join(_short(one) for one in several)
                         + f" ({role}{', their mean probabilities' if 'measured' not in role else ''})"))
        else:
            rows.append(("teacher", f"{_short(teacher)} ({role})"))
    else:
        rows.append(("teacher", "none"))
    return rows


def distillation_text(distillation: dict[str, Any] | None) -> str:
    """`hard (alpha 0.5, distillation token)`; `none` says nothing of alpha and tau, which it does not use."""
    if not distillation or distillation.get("kind") in (None, "none"):
        token = distillation and distillation.get("token")
        return "none" + (" (with a distillation token: both heads learn from the labels)" if token else "")
    kind = distillation["kind"]
    tau = f", tau {distillation.get('tau')}" if kind.startswith("soft") else ""
    feature = f", feature loss {distillation['feature_loss']}" if distillation.get("feature_loss") else ""
    token = "distillation token" if distillation.get("token") else "no distillation token"
    short = {"logits": "logit", "softmax": "probability"}.get(distillation.get("fusion"))
    fused = f", heads fused by their {short} mean" if short else ""
    return f"{kind} (alpha {distillation.get('alpha')}{tau}{feature}, {token}{fused})"


def info_table(ckpt: Checkpoint) -> None:
    meta = ckpt.meta
    data = ckpt.data
    table = Table(title=str(ckpt.path), show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("kind / stage", f"{ckpt.kind} / {ckpt.stage}"),
        ("model", ckpt.label()),
        ("timm", f"timm.create_model({ckpt.model_name!r}, **{ckpt.model_args})"),
        ("parameters", f"{meta.get('params', 0):,}"),
        ("dataset", data.get("dataset") or data.get("data_dir") or "?"),
        ("classes", f"{len(ckpt.classes)}: {listing(ckpt.classes, 10)}"),
        ("train / test images", f"{data.get('train_size', '?')} / {data.get('test_size', '?')}"),
    ]
    skipped = describe_skipped(data)
    if skipped:
        rows.append(("skipped images", f"{skipped} (--skip-corrupt)"))
    rows += [
        ("resolution", f"{ckpt.img_size} px, crop ratio {data.get('crop_pct')}, {data.get('interpolation')}"),
        ("normalisation", f"{data.get('norm')}: mean {data.get('mean')}, std {data.get('std')}"),
        ("distillation", distillation_text(meta.get("distillation"))),
        *lineage_rows(meta),
    ]
    source = meta.get("source")
    if source:  # imported pretrained weights: where they came from, and nothing about training
        rows.append(("source", f"{source.get('source')}" + (f" revision {source['revision']}" if source.get("revision") else "")
                     + f", weights sha256 {source.get('sha256')}"))
        rows.append(("class names", data.get("class_source", "?")))
        rows = [r for r in rows if r[0] != "train / test images"]
        if not meta.get("teacher"):
            rows = [r for r in rows if r[0] != "teacher"]
    if meta.get("trainable"):
        scratch = " (from random weights)" if meta.get("from_scratch") else ""
        rows.append(("trained", f"{meta['trainable']}{scratch} ({meta.get('trainable_params', 0):,} parameters)"))
    metrics = meta.get("metrics", {})
    top5 = metrics.get("top5") is not None
    rows.append((f"test top-1{' / top-5' if top5 else ''}",
                 f"{_topk(metrics)} ({metrics.get('samples', '?')} images, {measured_at(metrics, meta)})"))
    for name, values in (metrics.get("heads") or {}).items():
        rows.append((f"  {HEAD_NAMES.get(name, name)}", _topk(values)))
    for name, rate in (metrics.get("disagreement") or {}).items():
        rows.append((f"  disagrees with teacher, {HEAD_NAMES.get(name, name)}", f"{_pct(rate * 100)} %"))
    rows += [("  predictions", line) for line in spread_lines(metrics, ckpt.classes)]
    best = best_head_line(metrics)
    if best:
        rows.append(("  best head", best.removeprefix("best head: ")))
    line = fine_tune_line(ckpt)
    if line:
        rows.append(("resolution change", line.removeprefix("top-1: ")))
    if not source:
        threads = f", {meta['threads']} CPU thread(s) each" if meta.get("threads") else ""
        rows.append(("training time", f"{metrics.get('train_seconds', '?')} s on {meta.get('processes', '?')} process(es)"
                     f"{threads}"))
        config = meta.get("config", {})
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in sorted(config.items()))))
        rows.append(("effective lr", f"{meta.get('lr_effective')}"))
    else:  # an import was not trained here, and its accuracy is the source's to state
        rows = [r for r in rows if not r[0].startswith("test top-1")]
    rows.append(("written", f"{meta.get('created')} by distill {meta.get('distill_version')} {meta.get('versions', {})}"))
    rows.append(("file sha256", ckpt.sha256))
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
