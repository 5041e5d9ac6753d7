"""Where a training step of `distill student` (or, with `--job teach`, of `distill teach`) spends its time.

Not part of the test suite. Runs the real stage (the same plan, engine and loop as `distill student` or
`distill teach`) on a CIFAR-10 folder with timers around each part of the step, on a CPU where every
operation is synchronous so wall-clock timers are exact:

    data wait          the loop waiting for the next batch from the loader workers
    mixup              timm's Mixup/CutMix on the batch
    student forward    the DeiT's forward pass (with --job teach: the RegNet's)
    teacher forward    the frozen teacher's forward pass (inside the loss)
    loss               the rest of the distillation loss
    backward           accelerate's backward
    optimizer          the optimizer step and zero_grad
    other              everything else in the loop (scheduler, EMA, progress bar, host syncs)

    python benchmarks/profile_step.py --data /tmp/data/cifar10 --precision bf16

The job is the speed peer's (../shared/bench/peer_timm.sh): DeiT-Ti with the distillation token at 32 px /
patch 4, a RegNetY-002 teacher, hard token distillation, batch 128, RandAugment, Mixup/CutMix, erasing,
drop path 0.1, 2 data workers. `--job teach`: the same job for `distill teach` (RegNetY-002, no teacher, no drop
path), as benchmarks/peer_ratio.py runs it. The first `--warmup` steps are not counted.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import accelerate
import timm.data
import timm.models.regnet
import timm.models.vision_transformer

from distill.training import engine
from distill import stages
from distill.config import StudentConfig, TeachConfig, resolve
from distill.losses import DistillationLoss
from distill.teachers import FrozenTeacher

TOTALS: dict[str, float] = defaultdict(float)
STATE = {"steps": 0, "counting": False, "warmup": 5}


@contextmanager
def timer(part: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        if STATE["counting"]:
            TOTALS[part] += time.perf_counter() - started


def wrap(owner: Any, name: str, part: str) -> None:
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer(part):
            return original(*args, **kwargs)

    setattr(owner, name, timed)


class TimedLoader:
    """The training loader, with the wait for each batch timed and the steps counted."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            STATE["steps"] += 1
            STATE["counting"] = STATE["steps"] > STATE["warmup"]
            if STATE["steps"] == STATE["warmup"] + 1:
                STATE["started"] = time.perf_counter()
                STATE["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with timer("data wait"):
                try:
                    batch = next(iterator)
                except StopIteration:
                    STATE["ended"] = time.perf_counter()
                    STATE["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - STATE["faults"]
                    STATE["counting"] = False
                    return
            yield batch


def instrument() -> None:
    wrap(timm.data.Mixup, "__call__", "mixup")
    wrap(timm.models.vision_transformer.VisionTransformer, "forward", "student forward")
    wrap(timm.models.regnet.RegNet, "forward", "student forward")
    wrap(FrozenTeacher, "forward", "teacher forward")
    wrap(DistillationLoss, "forward", "loss (with teacher)")
    wrap(accelerate.Accelerator, "backward", "backward")
    wrap(accelerate.optimizer.AcceleratedOptimizer, "step", "optimizer")
    wrap(accelerate.optimizer.AcceleratedOptimizer, "zero_grad", "optimizer")
    original: Callable[..., Any] = engine.train_loader
    engine.train_loader = lambda *args, **kwargs: TimedLoader(original(*args, **kwargs))  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill-profile"))
    parser.add_argument("--job", default="student", choices=("student", "teach"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "no"))
    parser.add_argument("--images", type=int, default=3840, help="training images (30 steps of 128)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="extra student settings, KEY=VALUE (e.g. compile=true)")
    args = parser.parse_args()
    STATE["warmup"] = args.warmup
    common = dict(workdir=args.workdir, data_dir=args.data, img_size=32, num_workers=2, eval_every=1000)
    extra = {k: (v.lower() == "true" if v.lower() in ("true", "false") else int(v) if v.isdigit() else v)
             for k, v in (s.split("=", 1) for s in args.set)}
    name = "-".join([args.job, args.precision, *(s.replace("=", "-") for s in args.set)])
    shutil.rmtree(args.workdir / name, ignore_errors=True)  # always a fresh run: a finished one would be reused
    job = {**common, "name": name, "epochs": 1, "batch_size": 128, "train_subset": args.images, "mixed_precision":
           args.precision, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "scale_min": 0.08,
           "lr": 5e-4, "lr_scale": False}
    if args.job == "teach":
        config: Any = resolve(TeachConfig, overrides={**job, "model": "regnety_002", **extra})
        instrument()
        stages.teach(config)
    else:
        teacher = stages.teach(resolve(TeachConfig, overrides={**common, "epochs": 1, "train_subset": 2000, "name": "teacher"}))
        config = resolve(StudentConfig, overrides={**job, "teacher": teacher.path, "model": "deit_tiny", "patch_size": 4,
                                                   "drop_path": 0.1, **extra})
        instrument()
        stages.student(config)
    steps = STATE["steps"] - args.warmup - 1
    total = STATE["ended"] - STATE["started"]
    print(f"\n{steps} steps of {config.batch_size} images, precision {args.precision}: {total / steps * 1000:.0f} ms a step, "
          f"{steps * config.batch_size / total:.1f} img/s, {STATE['faults'] / steps:,.0f} page faults a step\n")
    parts = dict(TOTALS)
    parts["loss (with teacher)"] = parts.get("loss (with teacher)", 0.0) - parts.get("teacher forward", 0.0)
    parts["loss"] = parts.pop("loss (with teacher)")
    parts["other"] = total - sum(parts.values())
    print("| part | ms a step | share |\n|---|---|---|")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {seconds / steps * 1000:.1f} | {seconds / total * 100:.1f} % |")


if __name__ == "__main__":
    main()
