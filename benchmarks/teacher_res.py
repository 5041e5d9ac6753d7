"""--teacher-res student against --teacher-res teacher, measured on real CIFAR-10.

Not part of the test suite. A regnety_002 teacher is trained at 64 px on a fixed class-balanced CIFAR-10
subset (the 32 px images upsampled), then, per seed, two DeiT students at 32 px distil from it with the
same budget: one hands the teacher its own 32 px batch (the paper's way, and the default), the other
resizes the batch on the device to the 64 px the teacher was trained at.

    python benchmarks/teacher_res.py --cifar ../shared/data/cifar10.tar.gz

Results go to benchmarks/results/teacher_res.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deit_claims import _cells, _mean, _summary, timed, unpack  # noqa: E402

from distill import stages  # noqa: E402
from distill.config import StudentConfig, TeachConfig  # noqa: E402
from distill.tools.evaluate import evaluate_checkpoint  # noqa: E402


def run(cifar: Path, workdir: Path, budget: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    common = dict(data_dir=cifar, batch_size=budget["batch_size"], num_workers=2, train_subset=budget["train_subset"],
                  eval_every=1000)
    teacher, took = timed(stages.teach, TeachConfig, **common, workdir=workdir, name="teach-64", model="regnety_002",
                          img_size=budget["teacher_res"], epochs=budget["teacher_epochs"], seed=0)
    out: dict[str, Any] = {"teacher": _summary(teacher), "seconds": {"teacher": took}, "students": {}}
    at_student_res = evaluate_checkpoint(teacher.path, dataset=None, data_dir=None, res=budget["student_res"],
                                         crop_pct=None, teacher=None, batch_size=256, num_workers=2,
                                         mixed_precision="no", per_class=False)
    out["teacher_at_student_res"] = at_student_res["top1"]
    deit = dict(model="deit_tiny", embed_dim=budget["embed_dim"], depth=budget["depth"], num_heads=budget["num_heads"],
                patch_size=4, img_size=budget["student_res"], epochs=budget["student_epochs"])
    for seed in seeds:
        for mode in ("student", "teacher"):
            ckpt, took = timed(stages.student, StudentConfig, **common, **deit, workdir=workdir / f"seed{seed}",
                               name=f"student-{mode}", teacher=teacher.path, teacher_res=mode, seed=seed)
            out["students"].setdefault(mode, []).append({"seed": seed, "seconds": round(took, 1), **_summary(ckpt)})
    return out


def render(result: dict[str, Any], budget: dict[str, Any], command: str) -> str:
    students = result["students"]
    lines = [f"Command: `{command}`", "", f"Budget: `{json.dumps(budget)}`", "",
             f"Teacher regnety_002 trained at {budget['teacher_res']} px: top-1 {result['teacher']['top1']:.2f} at "
             f"{budget['teacher_res']} px, {result['teacher_at_student_res']:.2f} when tested at {budget['student_res']} px "
             f"({result['seconds']['teacher']:.0f} s).", "",
             "| --teacher-res | teacher reads | student fused top-1 (per seed) | mean | teacher top-1 on the student's "
             "test batches | disagreement, fused head | seconds per student |", "|---|---|---|---|---|---|---|"]
    for mode, runs in students.items():
        reads = budget["student_res"] if mode == "student" else budget["teacher_res"]
        top1 = [r["top1"] for r in runs]
        teacher_top1 = [r["heads"]["teacher"]["top1"] for r in runs]
        disagreement = [100 * r["disagreement"]["fused"] for r in runs]
        seconds = [r["seconds"] for r in runs]
        lines.append(f"| {mode} | {reads} px | {_cells(top1)} | {_mean(top1)} | {_cells(teacher_top1)} | "
                     f"{_cells(disagreement)} % | {' / '.join(f'{s:.0f}' for s in seconds)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 image folder or its .tar.gz")
    parser.add_argument("--workdir", type=Path, default=Path("runs-teacher-res"))
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--teacher-res", type=int, default=64)
    parser.add_argument("--student-res", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    cifar = args.cifar if args.cifar.is_dir() else unpack(args.cifar, args.workdir / "cifar10")
    budget = {k: getattr(args, k) for k in ("train_subset", "teacher_res", "student_res", "teacher_epochs",
                                            "student_epochs", "embed_dim", "depth", "num_heads", "batch_size")}
    started = time.perf_counter()
    result = run(cifar, args.workdir, budget, args.seeds)
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "teacher_res.json").write_text(json.dumps({"budget": budget, **result}, indent=2))
    command = "python benchmarks/teacher_res.py " + " ".join(sys.argv[1:])
    (out / "teacher_res.md").write_text(render(result, budget, command))
    print(render(result, budget, command))


if __name__ == "__main__":
    main()
