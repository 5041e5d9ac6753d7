"""DeiT III's recipe parts and feature distillation, each against the DeiT part it replaces, on real CIFAR-10.

Not part of the test suite. The scale of benchmarks/deit_claims.py (a fixed class-balanced subset of 8,000
training images, the full 10,000 test images, 32 px, bf16, batch 64, a DeiT-Ti of width 96, depth 6, 3 heads,
patch 4, 4 epochs), one RegNetY teacher trained once and used by every student, two seeds. Every student is
the same base run, hard distillation without the token, with DeiT's augmentation (random-resized crop from
0.08, RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, CutMix 1.0, label smoothing 0.1, cross-entropy), and each
variant changes one part of it:

    3-Augment            --aa 3a                                   (DeiT III's augmentation for RandAugment)
    BCE                  --loss bce --bce-target-thresh 0 --smoothing 0   (DeiT III's loss, as its code runs it)
    feature              --distillation feature                     (timm's feature distillation, MSE)
    simple random crop   --crop src                                 (DeiT III's crop for ImageNet-21k)

Random erasing is off in all of them (DeiT III drops it), warmup is one epoch of the four.

    python benchmarks/deit3_parts.py --cifar ../shared/data/cifar10.tar.gz

Results go to benchmarks/results/deit3_parts.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from deit_claims import _cells, _mean, _summary, timed, unpack
from distill import stages
from distill.config import StudentConfig, TeachConfig

HERE = Path(__file__).resolve().parent
BASE: dict[str, Any] = {"distillation": "hard", "token": False, "alpha": 0.5, "aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8,
                        "cutmix": 1.0, "smoothing": 0.1, "reprob": 0.0, "scale_min": 0.08, "crop": "rrc", "loss": "ce",
                        "warmup_epochs": 1.0}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (what it changes, the flags it changes)
    "base": ("hard distillation, RandAugment, CE, random-resized crop", {}),
    "3-Augment": ("--aa 3a", {"aa": "3a"}),
    "BCE": ("--loss bce --bce-target-thresh 0 --smoothing 0", {"loss": "bce", "bce_target_thresh": 0.0, "smoothing": 0.0}),
    "feature": ("--distillation feature (MSE)", {"distillation": "feature"}),
    "simple random crop": ("--crop src", {"crop": "src"}),
}
PAIRS = [("RandAugment against 3-Augment", "base", "3-Augment"), ("CE against BCE", "base", "BCE"),
         ("hard against feature distillation", "base", "feature"),
         ("random-resized crop against simple random crop", "base", "simple random crop")]


def run(cifar: Path, workdir: Path, seeds: list[int], budget: dict[str, Any]) -> dict[str, Any]:
    common = dict(data_dir=cifar, img_size=32, mixed_precision="bf16", batch_size=budget["batch_size"], num_workers=2,
                  train_subset=budget["train_subset"], eval_every=1000)
    teacher, seconds = timed(stages.teach, TeachConfig, **common, workdir=workdir, name="teach-regnety", seed=0,
                             model="regnety_002", epochs=budget["teacher_epochs"])
    out: dict[str, Any] = {"teacher": {**_summary(teacher), "seconds": round(seconds)}, "students": {}}
    deit = dict(model="deit_tiny", embed_dim=budget["embed_dim"], depth=budget["depth"], num_heads=budget["num_heads"],
                patch_size=4, epochs=budget["student_epochs"], teacher=teacher.path)
    for seed in seeds:
        for name, (_, change) in VARIANTS.items():
            ckpt, seconds = timed(stages.student, StudentConfig, **common, **deit, **{**BASE, **change},
                                  workdir=workdir / f"seed{seed}", name=name.replace(" ", "-"), seed=seed)
            out["students"].setdefault(name, {})[str(seed)] = {**_summary(ckpt), "seconds": round(seconds)}
    return out


def render(results: dict[str, Any], seeds: list[int], budget: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "", f"Budget: `{json.dumps(budget)}`", "",
             f"Teacher (one for every student): regnety_002, top-1 {results['teacher']['top1']:.2f}.", "",
             f"| student | changes | top-1 (seeds {', '.join(map(str, seeds))}) | mean ± std | time per run (s) |",
             "|---|---|---|---|---|"]
    students = results["students"]
    for name, (what, _) in VARIANTS.items():
        values = [students[name][str(s)]["top1"] for s in seeds]
        times = [students[name][str(s)]["seconds"] for s in seeds]
        lines.append(f"| {name} | {what} | {_cells(values)} | {_mean(values)} | {_cells(times).replace('.00', '')} |")
    lines += ["", "| comparison | difference per seed (second minus first) | mean |", "|---|---|---|"]
    for label, first, second in PAIRS:
        deltas = [students[second][str(s)]["top1"] - students[first][str(s)]["top1"] for s in seeds]
        lines.append(f"| {label} | {' / '.join(f'{d:+.2f}' for d in deltas)} | {statistics.mean(deltas):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=Path("../shared/data/cifar10.tar.gz"),
                        help="CIFAR-10 as an image-folder archive, or the unpacked folder (train/ and test/)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill-bench-deit3"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=3)
    args = parser.parse_args()
    budget = {"train_subset": args.train_subset, "batch_size": 64, "teacher_epochs": args.teacher_epochs,
              "student_epochs": args.student_epochs, "embed_dim": args.embed_dim, "depth": args.depth,
              "num_heads": args.num_heads}
    cifar = args.cifar if args.cifar.is_dir() else unpack(args.cifar, args.workdir / "data" / "cifar10")
    results = run(cifar, args.workdir, args.seeds, budget)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "deit3_parts.json").write_text(json.dumps({"machine": machine, "budget": budget, "results": results}, indent=1))
    command = "python benchmarks/deit3_parts.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("seeds", "workdir", "cifar"))
    command += " --seeds " + " ".join(map(str, args.seeds))
    (out / "deit3_parts.md").write_text(render(results, args.seeds, budget, command))
    print((out / "deit3_parts.md").read_text())


if __name__ == "__main__":
    main()
