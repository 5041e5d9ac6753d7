"""FixRes for the teacher: adapt the last BatchNorm (FixRes's choice, distill's default) or every BatchNorm?

Not part of the test suite. A RegNetY teacher is trained at 32 px on a fixed class-balanced CIFAR-10 subset,
then adapted to each target resolution both ways, through distill's own FixRes stage (classifier + BatchNorm,
test-time preprocessing, SGD). Each adapted teacher is measured on the full 10,000 test images before and
after adaptation, per seed.

    python benchmarks/fixres_bn.py --cifar /tmp/data/cifar10 --res 40 48 --seeds 0 1

Prints a markdown table (and writes benchmarks/results/fixres_bn.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from distill import stages
from distill.stages.finetune import fixres_config
from distill.stages.teach import plan_teach
from distill.config import FinetuneConfig, TeachConfig, resolve

HERE = Path(__file__).resolve().parent


def adapted(teacher: Any, res: int, bn: str, common: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The teacher adapted to `res` with distill's FixRes stage; its accuracy before and after."""
    finetune = resolve(FinetuneConfig, overrides={**common, "res": res, "teacher_bn": bn, "teacher_epochs": epochs})
    ckpt = stages.run_stage(lambda: plan_teach(fixres_config(teacher, finetune)))
    record = ckpt.meta["fixres"]
    return {"before": record["before_top1"], "after": record["after_top1"], "trainable": record["trainable"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill-fixres"))
    parser.add_argument("--res", type=int, nargs="+", default=[40, 48])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--fixres-epochs", type=int, default=2)
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        common = dict(workdir=args.workdir / f"seed{seed}", data_dir=args.cifar, mixed_precision="bf16", batch_size=64,
                      num_workers=2, seed=seed, train_subset=args.train_subset, eval_every=1000)
        teacher = stages.teach(resolve(TeachConfig, overrides={**common, "img_size": 32, "epochs": args.teacher_epochs}))
        row: dict[str, Any] = {"seed": seed, "teacher_top1": teacher.meta["metrics"]["top1"]}
        for res in args.res:
            for bn in ("last", "all"):
                row[f"{res}-{bn}"] = adapted(teacher, res, bn, common, args.fixres_epochs)
        results.append(row)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "fixres_bn.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                      "results": results}, indent=1))

    def cell(values: list[float]) -> str:
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return " / ".join(f"{v:.2f}" for v in values) + f" (mean {statistics.mean(values):.2f}{spread})"

    print(f"teacher at 32 px: {cell([r['teacher_top1'] for r in results])}\n")
    print("| resolution | adapted | trainable tensors | before | after |")
    print("|---|---|---|---|---|")
    for res in args.res:
        for bn in ("last", "all"):
            key = f"{res}-{bn}"
            print(f"| {res} px | {'last BatchNorm' if bn == 'last' else 'every BatchNorm'} | {results[0][key]['trainable']} | "
                  f"{cell([r[key]['before'] for r in results])} | {cell([r[key]['after'] for r in results])} |")


if __name__ == "__main__":
    main()
