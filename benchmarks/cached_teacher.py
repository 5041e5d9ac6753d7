"""A cached teacher against the teacher on the fly: accuracy and training time, on real CIFAR-10, two seeds.

Not part of the test suite. One RegNetY-002 teacher is trained on a fixed class-balanced CIFAR-10 subset. Per
seed, a DeiT student (hard distillation with the token, DeiT's augmentation) trains twice with the same
budget: once running the teacher on every batch, once from a `distill cache-teacher` cache made once with as
many views as the student has epochs. The cache's cost is measured apart: it is paid once and reused by every
student on the same data and augmentation.

    python benchmarks/cached_teacher.py --cifar /tmp/data/cifar10

Results go to benchmarks/results/cached_teacher.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from deit_claims import _cells, _mean, _summary, timed
from distill import stages
from distill.config import CacheConfig, StudentConfig, TeachConfig, resolve

HERE = Path(__file__).resolve().parent
AUGMENTATION = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "scale_min": 0.08}


def run(cifar: Path, workdir: Path, seeds: list[int], budget: dict[str, Any]) -> dict[str, Any]:
    common = dict(data_dir=cifar, img_size=32, mixed_precision="bf16", batch_size=64, num_workers=2,
                  train_subset=budget["train_subset"])
    teacher, seconds = timed(stages.teach, TeachConfig, **common, workdir=workdir, name="teacher", seed=0,
                             model="regnety_002", epochs=budget["teacher_epochs"], eval_every=1000)
    out: dict[str, Any] = {"teacher": {**_summary(teacher), "seconds": round(seconds)}, "caches": {}, "students": {}}
    student = dict(model="deit_tiny", embed_dim=budget["embed_dim"], depth=budget["depth"], num_heads=budget["num_heads"],
                   patch_size=4, epochs=budget["student_epochs"], distillation="hard", token=True, mixup=0.8, cutmix=1.0,
                   eval_every=1000)
    for seed in seeds:
        cache_dir = workdir / f"cache-seed{seed}"
        started = time.perf_counter()  # the cache's views are seeded like a student of this seed
        stages.cache_teacher(resolve(CacheConfig, overrides=dict(
            **common, **AUGMENTATION, workdir=workdir, name=cache_dir.name, seed=seed, teacher=teacher.path,
            epochs=budget["student_epochs"])))
        out["caches"][str(seed)] = {"seconds": round(time.perf_counter() - started)}
        for variant, extra in (("on the fly", {"teacher": teacher.path}), ("cached", {"teacher_cache": cache_dir})):
            values = {**common, **student, **extra, "workdir": workdir / f"seed{seed}", "name": variant.replace(" ", "-"),
                      "seed": seed}
            if variant == "on the fly":
                values.update(AUGMENTATION)
            else:  # the cache fixes the data and the augmentation: the student takes them from it
                values = {k: v for k, v in values.items() if k not in ("data_dir", "img_size", "train_subset")}
            ckpt, seconds = timed(stages.student, StudentConfig, **values)
            out["students"].setdefault(variant, {})[str(seed)] = {**_summary(ckpt), "seconds": round(seconds)}
    return out


def render(results: dict[str, Any], seeds: list[int], budget: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "", f"Budget: `{json.dumps(budget)}`", "",
             f"Teacher: regnety_002, top-1 {results['teacher']['top1']:.2f} ({results['teacher']['seconds']} s).", "",
             f"| student | top-1 (seeds {', '.join(map(str, seeds))}) | mean ± std | training time per run (s) |",
             "|---|---|---|---|"]
    for variant in ("on the fly", "cached"):
        runs = results["students"][variant]
        values = [runs[str(s)]["top1"] for s in seeds]
        times = [runs[str(s)].get("train_seconds", runs[str(s)]["seconds"]) for s in seeds]
        lines.append(f"| {variant} | {_cells(values)} | {_mean(values)} | {' / '.join(f'{t:.0f}' for t in times)} |")
    caches = [results["caches"][str(s)]["seconds"] for s in seeds]
    lines += ["", f"Making each cache ({budget['student_epochs']} views of {budget['train_subset']} images): "
              f"{' / '.join(map(str, caches))} s, mean {statistics.mean(caches):.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill-bench-cache"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=3)
    args = parser.parse_args()
    budget = {key: getattr(args, key) for key in ("train_subset", "teacher_epochs", "student_epochs", "embed_dim", "depth",
                                                   "num_heads")}
    results = run(args.cifar, args.workdir, args.seeds, budget)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "cached_teacher.json").write_text(json.dumps({"machine": machine, "budget": budget, "results": results},
                                                        indent=1))
    command = "python benchmarks/cached_teacher.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("seeds", "workdir", "cifar"))
    (out / "cached_teacher.md").write_text(render(results, args.seeds, budget, command))
    print((out / "cached_teacher.md").read_text())


if __name__ == "__main__":
    main()
