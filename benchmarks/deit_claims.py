"""The DeiT paper's distillation claims, measured where distillation has something to give.

Not part of the test suite. Real CIFAR-10, every figure on the full 10,000 test images. The regime: a convnet teacher
far above a small DeiT trained from scratch (timm's resnet10t on all 50,000 training images at 48 px, where its last
feature map is 2 x 2, not the 1 x 1 a stride-32 network ends in at 32 px), and students that see a fixed subset
at 32 px, the teacher reading each of their batches at its own 48 px (`--teacher-res teacher`). Every value not
named in SCALES is distill's default. Per seed:

1. students: no distillation, soft, hard, hard with the token (Table 3.3), each one's disagreement with the teacher
   (Table 3.4), the token student's class head, distillation head and fused heads;
2. Table 3.2's question, a convnet against a transformer teacher of similar accuracy: the transformer teacher is the
   DeiT of the student's size trained as the no-distillation student is (as the paper's DeiT-B teacher is a DeiT-B
   trained without distillation); the convnet of similar accuracy is the teacher's architecture trained briefly on the
   students' images; a hard + token student from each;
3. FixRes (Table 3.10): the hard + token student fine-tuned at a higher resolution, before and after;
4. a small convnet as the student, without distillation and with hard distillation, and FixRes for it.

The teacher and the weaker convnet are trained once (seed 0) and shared by every seed: runs in the same --workdir
reuse them. One seed per run is fine, and two runs may go side by side once the teachers exist: each seed writes its
own JSON, and the tables merge every seed file found.

    pip install -e ".[bench]"
    python benchmarks/deit_claims.py --seeds 0        # then --seeds 1 (or both at once: --seeds 0 1)
    python benchmarks/deit_claims.py --scale gpu      # the same comparison, larger, for one GPU (8 minutes on an H200)

Results: benchmarks/results/deit_claims-<scale>-seed<N>.json, the merged tables in deit_claims-<scale>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

from distill import stages
from distill.config import FinetuneConfig, StudentConfig, TeachConfig, resolve
from distill.weights.checkpoint import Checkpoint, read_checkpoint

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# What each scale sets; everything else is distill's default (learning rates, profile, precision, workers, ...).
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {  # 2 CPU cores: about 25 minutes of teachers once, then about 35 minutes a seed
        "teacher": {"model": "resnet10t", "img_size": 48, "epochs": 8, "batch_size": 128, "opt": "sgd", "lr": 0.4,
                    "weight_decay": 5e-4, "crop": "src"},  # ResNet's own recipe: SGD, 0.1 at batch 128, decay 5e-4
        "matched_epochs": 1,
        "matched": {"train_subset": 10000, "epochs": 2},  # the convnet near the DeiT teacher's accuracy
        "student": {"model": "deit_tiny", "embed_dim": 128, "depth": 6, "num_heads": 2, "patch_size": 4, "img_size": 32,
                    "train_subset": 10000, "epochs": 8, "batch_size": 64},  # the DeiT teacher's budget
        "student_epochs": 4,  # each student's; about 7 minutes each at 1 thread, two seeds side by side
        "finetune": {"img_size": 48, "train_subset": 5000, "epochs": 2, "teacher_epochs": 1, "lr": 8e-4,
                     "min_lr": 1e-6, "warmup_epochs": 1.0},  # short-run values (DeiT: 30 epochs at 5e-6)
        # a small convnet as the student (at 32 px its last map is 1 x 1), and its FixRes to 48 px (last BatchNorm)
        "convnet": {"model": "regnety_002", "img_size": 32, "train_subset": 10000, "epochs": 4, "batch_size": 64},
    },
    "gpu": {  # one GPU: the whole training set for every model, DeiT-Ti at full depth, longer schedules
        "teacher": {"model": "resnet18", "img_size": 64, "epochs": 15, "batch_size": 256, "opt": "sgd", "lr": 0.4,
                    "weight_decay": 5e-4, "crop": "src"},
        "matched_epochs": 1,
        "matched": {"train_subset": 10000, "epochs": 2},
        "student": {"model": "deit_tiny", "patch_size": 4, "img_size": 32, "epochs": 15, "batch_size": 256},
        "student_epochs": 15,
        "finetune": {"img_size": 48, "epochs": 3, "teacher_epochs": 1, "lr": 8e-4, "min_lr": 1e-6,
                     "warmup_epochs": 1.0},
        "convnet": {"model": "regnety_002", "img_size": 32, "epochs": 15, "batch_size": 256},
    },
}
# The paper's variants, each with the official code's settings for it (alpha 0.5, tau 1.0); none is tuned here.
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"distillation": "none", "token": False},
    "soft": {"distillation": "soft", "token": False},
    "hard": {"distillation": "hard", "token": False},
    "hard+token": {"distillation": "hard", "token": True},
}


def unpack(archive: Path, target: Path) -> Path:
    """Unpack an image-folder archive once; returns the folder holding train/ and test/."""
    if not any(target.rglob("train")):
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return next(p.parent for p in target.rglob("train") if (p.parent / "test").is_dir())


def configured(cls, **values: Any) -> Any:
    """A stage's config, evaluated after its last epoch only: an evaluation leaves training as it was (the same weights
    to the bit; checked on a small student with drop path and loader workers), and skipping the others saves about
    13 minutes a seed here."""
    return resolve(cls, overrides={"eval_every": values["epochs"], **values})


def timed(stage, cls, **values: Any) -> tuple[Checkpoint, float]:
    started = time.perf_counter()
    ckpt = stage(configured(cls, **values))
    return ckpt, time.perf_counter() - started


def teachers(scale: dict[str, Any], data: Path, workdir: Path) -> tuple[dict[str, Any], dict[str, Checkpoint]]:
    """The three teachers, trained once with seed 0: the convnet, the same convnet after one epoch, and a DeiT of the
    student's size trained as the no-distillation student is (same images, same epochs)."""
    common = dict(workdir=workdir, data_dir=data, seed=0)
    started = time.perf_counter()
    taught = {
        "teacher": stages.teach(configured(TeachConfig, **common, **scale["teacher"], name="teacher")),
        "teacher-1-epoch": stages.teach(configured(
            TeachConfig, **common, **{**scale["teacher"], "epochs": scale["matched_epochs"]}, warmup_epochs=0.2,
            name="teacher-1-epoch")),
        "deit-teacher": stages.teach(configured(TeachConfig, **common, **scale["student"], name="deit-teacher")),
        "teacher-matched": stages.teach(configured(
            TeachConfig, **common, **{**scale["teacher"], **scale["matched"]}, warmup_epochs=0.2, name="teacher-matched")),
    }
    return {**{k: _summary(v) for k, v in taught.items()}, "seconds": time.perf_counter() - started}, taught


def one_seed(seed: int, scale: dict[str, Any], data: Path, workdir: Path, taught: dict[str, Checkpoint]) -> dict[str, Any]:
    folder = workdir / f"seed{seed}"
    common = dict(workdir=folder, data_dir=data, seed=seed, teacher_res="teacher",
                  **{**scale["student"], "epochs": scale["student_epochs"]})
    out: dict[str, Any] = {"seed": seed, "seconds": {}, "students": {}}

    started = time.perf_counter()
    for name, variant in VARIANTS.items():
        ckpt, _ = timed(stages.student, StudentConfig, **common, name=f"student-{name}", teacher=taught["teacher"].path,
                        **variant)
        out["students"][name] = _summary(ckpt)
    out["seconds"]["students"] = time.perf_counter() - started

    # Table 3.2: a transformer teacher against a convnet teacher of similar accuracy, a hard + token student from each.
    started = time.perf_counter()
    for label, key in (("hard+token, DeiT teacher", "deit-teacher"),
                       ("hard+token, matched convnet teacher", "teacher-matched")):
        ckpt, _ = timed(stages.student, StudentConfig, **common, name=f"student-from-{key}", teacher=taught[key].path,
                        **VARIANTS["hard+token"])
        out["students"][label] = _summary(ckpt)
    out["seconds"]["teacher comparison"] = time.perf_counter() - started

    # FixRes: the paper's best variant (distill's default) is fine-tuned, chosen in advance, not by test accuracy.
    tuned, took = timed(stages.finetune, FinetuneConfig, workdir=folder, data_dir=data, seed=seed, name="finetune",
                        checkpoint=folder / "student-hard+token" / "model.safetensors", **scale["finetune"])
    out["finetune"] = _summary(tuned)
    out["fixres_teacher"] = _summary(read_checkpoint(tuned.meta["teacher"]["path"]))
    out["seconds"]["finetune"] = took

    # A convnet student, distilled or not, and FixRes for it (classifier and last BatchNorm at the new resolution).
    started = time.perf_counter()
    convnet = dict(workdir=folder, data_dir=data, seed=seed, teacher_res="teacher", **scale["convnet"])
    out["convnet"] = {}
    for kind in ("none", "hard"):
        ckpt, _ = timed(stages.student, StudentConfig, **convnet, name=f"convnet-{kind}", teacher=taught["teacher"].path,
                        distillation=kind)
        out["convnet"][kind] = _summary(ckpt)
    adapted, _ = timed(stages.finetune, FinetuneConfig, workdir=folder, data_dir=data, seed=seed, name="convnet-fixres",
                       checkpoint=folder / "convnet-hard" / "model.safetensors",
                       **{k: v for k, v in scale["finetune"].items() if k != "epochs"}, epochs=1)
    out["convnet"]["fixres"] = _summary(adapted)
    out["seconds"]["convnet"] = time.perf_counter() - started
    out.update(two_teachers(seed, scale, data, workdir, taught, out))
    return out


def two_teachers(seed: int, scale: dict[str, Any], data: Path, workdir: Path, taught: dict[str, Checkpoint],
                 out: dict[str, Any]) -> dict[str, Any]:
    """One teacher or two: the convnet student, hard, from the mean of the convnet teacher's and the DeiT teacher's
    probabilities, each reading the batch at its own resolution (48 and 32 px)."""
    folder = workdir / f"seed{seed}"
    convnet = dict(workdir=folder, data_dir=data, seed=seed, teacher_res="teacher", **scale["convnet"])
    ckpt, took = timed(stages.student, StudentConfig, **convnet, name="convnet-hard-two-teachers", distillation="hard",
                       teacher=[taught["teacher"].path, taught["deit-teacher"].path])
    return {"convnet": {**out.get("convnet", {}), "hard, two teachers": _summary(ckpt)},
            "seconds": {**out.get("seconds", {}), "two teachers": took}}


def _summary(ckpt: Checkpoint) -> dict[str, Any]:
    metrics = ckpt.meta.get("metrics", {})
    keep = ("top1", "top5", "samples", "heads", "disagreement", "before_top1", "parent_top1", "parent_img_size",
            "train_seconds")
    return {"path": str(ckpt.path), "model": ckpt.model_name, "img_size": ckpt.img_size, "params": ckpt.meta.get("params"),
            **{k: metrics[k] for k in keep if k in metrics}}


def _cells(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" if values else ""


def _get(result: dict[str, Any], *keys: str) -> float | None:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def render(shared: dict[str, Any], results: list[dict[str, Any]], command: str) -> str:
    """The measured tables, in markdown: each seed's value, then the mean."""
    seeds = ", ".join(str(r["seed"]) for r in results)
    head = f"seeds {seeds}"
    lines = [f"Command: `{command}`", ""]
    t = shared["teacher"]
    lines += ["### Teachers (trained once, seed 0)", "", "| teacher | params | res | top-1 |", "|---|---|---|---|"]
    for key, label in (("teacher", f"{t['model']} (the teacher)"), ("teacher-1-epoch", "the same convnet, one epoch"),
                       ("teacher-matched", "the same convnet, 2 epochs on the students' 10,000 images"),
                       ("deit-teacher", "DeiT of the student's size, no distillation")):
        s = shared[key]
        lines.append(f"| {label} | {s['params'] / 1e6:.2f}M | {s['img_size']} | {s['top1']:.2f} |")

    lines += ["", f"### Students (Table 3.3) and their disagreement with the teacher (Table 3.4); {head}", "",
              "| student | top-1 | mean | disagrees with the teacher (%) | mean |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        rows = [("", "top")] if name != "hard+token" else [(" class head", "cls"), (" distillation head", "dist"),
                                                           (" class + distillation (fused)", "fused")]
        for suffix, head_name in rows:
            keys = ("top1",) if head_name == "top" else ("heads", head_name, "top1")
            vals = [_get(r["students"][name], *keys) for r in results]
            rate_key = "top" if head_name == "top" else head_name
            rates = [100 * (_get(r["students"][name], "disagreement", rate_key) or 0.0) for r in results]
            lines.append(f"| {name}{suffix} | {_cells(vals)} | {_mean(vals)} | {_cells(rates)} | {_mean(rates)} |")
    lines.append(f"| (the teacher, {t['model']} at {t['img_size']} px) | {t['top1']:.2f} | | | |")

    lines += ["", f"### Table 3.2: a convnet or a transformer teacher of similar accuracy; {head}", "",
              "| hard + token student taught by | teacher top-1 | student top-1 (fused) | mean |", "|---|---|---|---|"]
    for label, key, teacher in (("the DeiT teacher", "hard+token, DeiT teacher", "deit-teacher"),
                                ("the convnet of similar accuracy", "hard+token, matched convnet teacher",
                                 "teacher-matched"),
                                ("the convnet teacher", "hard+token", "teacher")):
        vals = [r["students"][key]["top1"] for r in results]
        lines.append(f"| {label} | {shared[teacher]['top1']:.2f} | {_cells(vals)} | {_mean(vals)} |")

    res, base = results[0]["finetune"]["img_size"], results[0]["finetune"].get("parent_img_size")
    lines += ["", f"### FixRes: the hard + token student fine-tuned {base} -> {res} px (Table 3.10); {head}", "",
              "| | top-1 | mean |", "|---|---|---|"]
    for label, get in ((f"student at {base} px", lambda r: r["finetune"]["parent_top1"]),
                       (f"at {res} px, before fine-tuning", lambda r: r["finetune"]["before_top1"]),
                       (f"at {res} px, after fine-tuning", lambda r: r["finetune"]["top1"]),
                       (f"teacher adapted to {res} px (FixRes)", lambda r: r["fixres_teacher"]["top1"])):
        vals = [get(r) for r in results]
        lines.append(f"| {label} | {_cells(vals)} | {_mean(vals)} |")

    c = results[0]["convnet"]
    lines += ["", f"### A convnet student ({c['none']['model']}, {c['none']['params'] / 1e6:.2f}M, "
              f"{c['none']['img_size']} px): distilled or not, and FixRes; {head}", "",
              "| | top-1 | mean | disagrees with the teacher (%) |", "|---|---|---|---|"]
    for label, key in (("no distillation", "none"), ("hard distillation", "hard"),
                       ("hard, two teachers: the mean of the convnet's and the DeiT teacher's probabilities (disagrees "
                        "with that mean)", "hard, two teachers")):
        if not all(key in r["convnet"] for r in results):
            continue
        vals = [r["convnet"][key]["top1"] for r in results]
        rates = [100 * (_get(r["convnet"][key], "disagreement", "top") or 0.0) for r in results]
        lines.append(f"| {label} | {_cells(vals)} | {_mean(vals)} | {_cells(rates)} |")
    fix = c["fixres"]
    for label, get in ((f"hard, at {fix['img_size']} px before FixRes", lambda r: r["convnet"]["fixres"]["before_top1"]),
                       (f"hard, at {fix['img_size']} px after FixRes (classifier + last BatchNorm, 1 epoch)",
                        lambda r: r["convnet"]["fixres"]["top1"])):
        vals = [get(r) for r in results]
        lines.append(f"| {label} | {_cells(vals)} | {_mean(vals)} | |")

    lines += ["", "### Wall-clock time (seconds)", "", "| part | " + " | ".join(f"seed {r['seed']}" for r in results)
              + " |", "|---|" + "---|" * len(results)]
    for part in results[0]["seconds"]:
        lines.append(f"| {part} | " + " | ".join(f"{r['seconds'][part]:.0f}" for r in results) + " |")
    trained = sum(v.get("train_seconds", 0) for v in shared.values() if isinstance(v, dict))  # reused: still their training
    lines.append(f"| (teachers, once: training) | {trained:.0f} |" + " |" * (len(results) - 1))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--cifar", type=Path, default=Path("../shared/data/cifar10.tar.gz"))
    parser.add_argument("--workdir", type=Path, help="where the runs go [default: /tmp/distill-claims/SCALE]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--teachers-only", action="store_true", help="train the shared teachers and stop")
    parser.add_argument("--add-two-teachers", action="store_true", help="run only the two-teacher student and add it "
                        "to each seed's JSON (made before that part existed)")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    workdir = args.workdir or Path("/tmp/distill-claims") / args.scale
    data = unpack(args.cifar, workdir / "data" / "cifar10")
    shared, taught = teachers(scale, data, workdir)
    RESULTS.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (RESULTS / f"deit_claims-{args.scale}-teachers.json").write_text(json.dumps({"scale": scale, "teachers": shared},
                                                                                indent=1))
    if args.teachers_only:
        return
    for seed in args.seeds:
        path = RESULTS / f"deit_claims-{args.scale}-seed{seed}.json"
        if args.add_two_teachers:
            before = json.loads(path.read_text())
            result = {**before, **two_teachers(seed, scale, data, workdir, taught, before)}
            result["machine_two_teachers"] = machine
            path.write_text(json.dumps(result, indent=1))
            continue
        result = {**one_seed(seed, scale, data, workdir, taught), "machine": machine}
        path.write_text(json.dumps(result, indent=1))
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"deit_claims-{args.scale}-seed*.json"))]
    command = f"python benchmarks/deit_claims.py --scale {args.scale} --seeds N"
    table = render(shared, sorted(results, key=lambda r: r["seed"]), command)
    (RESULTS / f"deit_claims-{args.scale}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
