"""`distill report`: one self-contained HTML page of a work folder, with its PNG figures beside it, that opens
offline (no script, no font or style from elsewhere).

It reads only the run files: every `<run>/model.safetensors` header (what the run is, its lineage, its final
metrics) and `<run>/metrics.jsonl` (one line per epoch). It shows:

- training curves per stage: train and test loss, test top-1 of each head, learning rate, per epoch;
- the lineage of every checkpoint as a graph (weights, teacher, soup ingredients, architecture copied);
- accuracy against parameters and against the recorded training throughput, as DeiT's throughput figure;
- the teacher/head disagreement of token students, as DeiT's table of decision agreement;
- per-class accuracy, and FixRes before and after (the accuracy at the old resolution, at the new one
  before adaptation, and after).
Every number on the page is a value of the run files, formatted; none is computed anew.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.weights.checkpoint import MODEL_FILE, Checkpoint, stage_checkpoints
from distill.errors import DistillError
from distill.weights.naming import count
from distill.console import listing

METRICS_FILE = "metrics.jsonl"
HEADS = {"top1": "headline", "cls_top1": "class head", "dist_top1": "distillation head", "ema_top1": "EMA"}
EDGE_STYLES = {"weights": ("#1f77b4", "-"), "teacher": ("#d62728", "--"), "recipe": ("#7f7f7f", ":"),
               "ingredient": ("#2ca02c", "-")}
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
code { font-size: .85em; color: #555; }
.note { color: #555; font-size: .9em; }
"""


@dataclass
class Run:
    """One run folder of the work folder: its checkpoint and its per-epoch history."""

    name: str
    ckpt: Checkpoint
    history: list[dict[str, Any]]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.ckpt.meta.get("metrics") or {}


def collect(workdir: Path) -> list[Run]:
    """Every finished run directly under the work folder, oldest first."""
    runs = []
    for ckpt in stage_checkpoints(workdir):
        history_path = ckpt.path.parent / METRICS_FILE
        history = ([json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
                   if history_path.exists() else [])
        runs.append(Run(ckpt.path.parent.name, ckpt, history))
    return runs


def pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.2f}"


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# -- figures ---------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DistillError("distill report draws its figures with matplotlib; install it (pip install 'distill[report]').") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(run: Run, path: Path) -> bool:
    """Loss, top-1 per head and lr against the epoch; False when the run has no history."""
    records = [r for r in run.history if r.get("epoch", 0) >= 1]
    if not records:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    epochs = [r["epoch"] for r in records]
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            axes[0].plot(*zip(*points), marker="o", label=label)
    axes[0].set_title("loss")
    for key, label in HEADS.items():
        points = [(r["epoch"], r[key]) for r in run.history if isinstance(r.get(key), (int, float))]
        if points and not (key == "top1" and "fused_top1" in records[0]):
            axes[1].plot(*zip(*points), marker="o", label=label)
        elif points:
            axes[1].plot(*zip(*points), marker="o", label="fused (headline)")
    axes[1].set_title("test top-1 (%)")
    rates = [r.get("lr") for r in records]
    axes[2].plot(epochs, rates, marker="o")
    axes[2].set_title("learning rate (end of epoch)")
    if all(isinstance(rate, (int, float)) and rate > 0 for rate in rates):
        axes[2].set_yscale("log")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.grid(alpha=.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.suptitle(f"{run.name}: {run.ckpt.label()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def lineage_edges(runs: list[Run]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Nodes (sha256 -> name) and edges (from, to, kind) of every checkpoint's recorded lineage."""
    names = {run.ckpt.sha256: run.name for run in runs}
    edges = []

    def add(record: dict[str, Any] | None, child: str, kind: str | None = None) -> None:
        if not record or not record.get("sha256"):
            return
        if record["sha256"] not in names:  # outside the work folder: named by its folder
            names[record["sha256"]] = Path(record.get("path", "?")).parent.name + " (elsewhere)"
        edge = (record["sha256"], child, kind or record.get("inherited") or "weights")
        if edge not in edges:
            edges.append(edge)

    for run in runs:
        meta, sha = run.ckpt.meta, run.ckpt.sha256
        add(meta.get("parent"), sha)
        if (meta.get("teacher") or {}).get("sha256") != (meta.get("parent") or {}).get("sha256"):
            add(meta.get("teacher"), sha)
        for record in (meta.get("teachers") or [])[1:]:  # several teachers: the first is the parent
            add(record, sha)
        add(meta.get("architecture_from"), sha, "recipe")
        for record in meta.get("ingredients") or []:
            add(record, sha, "ingredient")
    return names, edges


def lineage_png(runs: list[Run], path: Path) -> list[tuple[str, str, str]]:
    """The checkpoints as boxes in columns by generation, arrows from what each came from."""
    names, edges = lineage_edges(runs)
    depth = {sha: 0 for sha in names}
    for _ in range(len(names)):  # longest path from a root; lineage has no cycles
        for source, target, _kind in edges:
            depth[target] = max(depth[target], depth[source] + 1)
    columns: dict[int, list[str]] = {}
    for sha in names:
        columns.setdefault(depth[sha], []).append(sha)
    where = {sha: (d, -i) for d, shas in columns.items() for i, sha in enumerate(shas)}
    plt = _pyplot()
    tallest = max(len(c) for c in columns.values())
    fig, axis = plt.subplots(figsize=(3 + 2.6 * len(columns), 1 + 0.9 * tallest))
    for source, target, kind in edges:
        colour, line = EDGE_STYLES.get(kind, ("#000", "-"))
        axis.annotate("", xy=where[target], xytext=where[source],
                      arrowprops={"arrowstyle": "->", "color": colour, "linestyle": line, "shrinkA": 38, "shrinkB": 38,
                                  "connectionstyle": "arc3,rad=0.08"})
    for sha, (x, y) in where.items():
        axis.text(x, y, names[sha], ha="center", va="center", fontsize=8,
                  bbox={"boxstyle": "round", "facecolor": "#f4f4f4", "edgecolor": "#888"})
    for kind, (colour, line) in EDGE_STYLES.items():
        axis.plot([], [], color=colour, linestyle=line, label=kind)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_xlim(-0.7, max(columns) + 0.7)
    axis.set_ylim(-tallest + 0.4, 0.6)
    axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return edges


def accuracy_png(runs: list[Run], path: Path) -> bool:
    """Top-1 against parameters and against recorded training throughput, one marker per data set."""
    points = [(run, run.history[-1].get("img_per_s") if run.history else None) for run in runs
              if isinstance(run.metrics.get("top1"), (int, float))]
    if not points:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    datasets = sorted({dataset_name(run) for run, _ in points})
    markers = "osD^v<>p*h"
    for run, speed in points:
        marker = markers[datasets.index(dataset_name(run)) % len(markers)]
        params = run.ckpt.meta.get("params")
        if params:
            axes[0].scatter(params, run.metrics["top1"], marker=marker)
            axes[0].annotate(run.name, (params, run.metrics["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if speed:
            axes[1].scatter(speed, run.metrics["top1"], marker=marker)
            axes[1].annotate(run.name, (speed, run.metrics["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters")
    axes[1].set_xlabel("training images/s (last epoch, as recorded)")
    for axis in axes:
        axis.set_ylabel("test top-1 (%)")
        axis.grid(alpha=.3)
    for i, name in enumerate(datasets):
        axes[0].scatter([], [], marker=markers[i % len(markers)], color="#555", label=name)
    axes[0].legend(fontsize=7, title="data", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def dataset_name(run: Run) -> str:
    data = run.ckpt.data
    source = data.get("dataset") or Path(data.get("data_dir") or "?").name
    return f"{source}: {listing(run.ckpt.classes, 5)}"


# -- tables ----------------------------------------------------------------------------------------
def summary_table(runs: list[Run]) -> str:
    rows = [[esc(run.name), esc(run.ckpt.stage), esc(run.ckpt.label()), esc(dataset_name(run)),
             esc(count(run.ckpt.meta["params"])) if run.ckpt.meta.get("params") else "-", pct(run.metrics.get("top1")),
             esc(run.metrics.get("precision", "-")), esc(run.metrics.get("img_size", "-")),
             esc(run.history[-1].get("img_per_s", "-")) if run.history else "-"] for run in runs]
    return table(["run", "stage", "model", "data", "params", "test top-1", "precision", "px", "train img/s"], rows)


def agreement_table(runs: list[Run]) -> str | None:
    """For token students: each head's disagreement with the labels (100 - top-1) and with the teacher (%)."""
    rows = []
    for run in runs:
        metrics = run.metrics
        heads, disagreement = metrics.get("heads") or {}, metrics.get("disagreement") or {}
        if not disagreement:
            continue
        for head, values in heads.items():
            rate = disagreement.get(head)
            rows.append([esc(run.name), esc(head), pct(values.get("top1")),
                         "-" if rate is None else f"{rate * 100:.2f}"])
    if not rows:
        return None
    return table(["run", "head", "test top-1 (%)", "decisions unlike the teacher's (%)"], rows)


def per_class_table(run: Run) -> str | None:
    values = run.metrics.get("per_class_top1")
    if not values:
        return None

    def cell(value: Any) -> str:
        if not isinstance(value, (int, float)):
            return "-"
        shade = int(255 - 1.3 * (100 - value))
        return f'<span style="background: rgb(255,{max(shade, 120)},{max(shade, 120)})">{value:.2f}</span>'

    return table(["class", *[esc(c) for c in run.ckpt.classes]], [[esc(run.name), *[cell(v) for v in values]]])


def fixres_table(runs: list[Run]) -> str | None:
    rows = []
    for run in runs:
        metrics = run.metrics
        if "before_top1" not in metrics:
            continue
        rows.append([esc(run.name), esc(run.ckpt.stage),
                     f"{pct(metrics.get('parent_top1'))} at {esc(metrics.get('parent_img_size', '-'))} px",
                     f"{pct(metrics.get('before_top1'))} at {esc(metrics.get('before_img_size', '-'))} px",
                     f"{pct(metrics.get('top1'))} at {esc(metrics.get('img_size', '-'))} px"])
    if not rows:
        return None
    return table(["run", "stage", "parent, at its resolution", "before, at the new resolution", "after"], rows)


def soup_table(runs: list[Run]) -> str | None:
    rows = []
    for run in runs:
        for record in run.ckpt.meta.get("ingredients") or []:
            rows.append([esc(run.name), esc(Path(record.get("path", "?")).parent.name),
                         pct(record.get("held_out_top1")), "yes" if record.get("in_soup") else "no"])
    return table(["soup", "ingredient", "held-out top-1", "in the soup"], rows) if rows else None


# -- the page --------------------------------------------------------------------------------------
def write_report(workdir: Path, out: Path | None = None) -> Path:
    """Write `<out>/index.html` and its PNGs (default out: <workdir>/report); returns the page's path."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise DistillError(f"The work folder {workdir} does not exist.")
    runs = collect(workdir)
    if not runs:
        raise DistillError(f"{workdir} holds no finished run (no */{MODEL_FILE}); run a stage first.")
    out = Path(out) if out is not None else workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>distill report: {esc(workdir.resolve().name)}</h1>",
             f"<p class='note'>The runs under <code>{esc(workdir.resolve())}</code>; every figure below is "
             "read from their checkpoints and metrics files.</p>", "<h2 id='summary'>Runs</h2>", summary_table(runs)]
    parts.append("<h2 id='curves'>Training curves</h2>")
    for run in runs:
        name = f"curves-{run.name}.png"
        if curves_png(run, out / name):
            parts.append(f"<h3>{esc(run.name)}</h3><img src='{esc(name)}' alt='training curves of {esc(run.name)}'>")
    parts.append("<h2 id='lineage'>Lineage</h2>")
    edges = lineage_png(runs, out / "lineage.png")
    parts.append("<img src='lineage.png' alt='lineage graph'>")
    names, _ = lineage_edges(runs)
    parts.append(table(["from", "to", "what was taken"],
                       [[esc(names[a]), esc(names[b]), esc(kind)] for a, b, kind in edges]))
    parts.append("<h2 id='accuracy'>Accuracy against parameters and throughput "
                 "<span class='ref'>(DeiT, Figure 3.3)</span></h2>")
    if accuracy_png(runs, out / "accuracy.png"):
        parts.append("<img src='accuracy.png' alt='accuracy against parameters and throughput'>")
        parts.append("<p class='note'>Each run is measured on its own data (the marker says which); throughput is the "
                     "training throughput its last epoch recorded.</p>")
    agreement = agreement_table(runs)
    parts.append("<h2 id='agreement'>Teacher and heads <span class='ref'>(DeiT, Table 3.4)</span></h2>")
    parts.append(agreement or "<p class='note'>No run was measured against a teacher.</p>")
    parts.append("<h2 id='per-class'>Per-class accuracy (test top-1, %)</h2>")
    parts += [t for t in (per_class_table(run) for run in runs) if t]
    parts.append("<h2 id='fixres'>FixRes: before and after</h2>")
    parts.append(fixres_table(runs) or "<p class='note'>No run changed resolution.</p>")
    soups = soup_table(runs)
    if soups:
        parts += ["<h2 id='soups'>Soups</h2>", soups]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>distill report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
