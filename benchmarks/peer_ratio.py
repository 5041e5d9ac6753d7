"""Paired speed ratio against the peer, timm's own train.py, on the same job.

Not part of the test suite. For each job and precision, `distill` and timm's train.py run one after the other on
the same CIFAR-10 folder, and the ratio of their training images per second (data loading included) is recorded:

    student   `distill student` against train.py --kd-model-name regnety_002 --kd-distill-type token
              --kd-token-distill-type hard (../shared/bench/peer_timm.sh, exactly)
    teach     `distill teach` (RegNetY-002) against train.py --model regnety_002 without distillation (the same
              script with its distillation flags removed and the model swapped)

The job is the peer script's: 32 px, batch 128, RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8 / CutMix 1.0,
random erasing 0.25, random-resized crop from 0.08, label smoothing 0.1, drop path 0.1 (the DeiT), 2 data
workers. Both rates cover the same work from the same starting point: distill's is its first epoch's (a fixed
subset of 61 batches for the student, 301 for the teacher, timed from the creation of the loader to the last step),
the peer's is the running mean train.py logs at batch 60 (or 300: the same number of steps, timed from the creation
of its loader). The peer runs under a time limit (`--peer-seconds`) that must let it reach that batch. Each pair runs in the order distill, peer, and with
`--rounds 2` again as peer, distill, so drift over time falls on both sides.

    TIMM_TRAIN=/tmp/timm_train.py python benchmarks/peer_ratio.py --data /tmp/data/cifar10 --precisions bf16 no

Results go to benchmarks/results/peer_ratio.json and .md. Run on a quiet machine: absolute rates drift here, the
ratio of a pair much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER = HERE.parent.parent / "shared" / "bench" / "peer_timm.sh"
# timm's train.py logs its running mean at batches 0, 5, 10, ...: the rates compare this many steps on each side
# (the teacher's steps take a fifth of the student's: more of them, so that start-up weighs alike).
STEPS = {"student": 61, "teach": 301}
JOB = ["--img-size", "32", "--batch-size", "128", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8",
       "--cutmix", "1.0", "--scale-min", "0.08", "--smoothing", "0.1", "--num-workers", "2", "--epochs", "1",
       "--warmup-epochs", "0"]
STUDENT = ["--model", "deit_tiny", "--patch-size", "4", "--drop-path", "0.1", "--distillation", "hard", "--token"]


def distill_rate(stage: str, args: list[str], precision: str, workdir: Path, name: str) -> float:
    """Run one distill stage for one epoch, afresh, and read its training rate from the run's metrics."""
    shutil.rmtree(workdir / name, ignore_errors=True)  # a finished run with the same settings would be reused
    command = [sys.executable, "-m", "distill", stage, *args, *JOB, "--train-subset", str(STEPS[stage] * 128),
               "--mixed-precision", precision,
               "--workdir", str(workdir), "--name", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"distill {stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([r for r in records if r.get("epoch") == 1][-1]["img_per_s"])


def peer_script(job: str) -> Path:
    """peer_timm.sh as it is for the student; for the teacher, without distillation and with the teacher's model."""
    text = PEER.read_text()
    if job == "teach":
        text = text.replace("--model deit_tiny_distilled_patch16_224 --model-kwargs img_size=32 patch_size=4",
                            "--model regnety_002")
        text = re.sub(r" --kd-model-name regnety_002 \\\n\s*--kd-distill-type token --kd-token-distill-type hard", "", text)
        text = text.replace("--drop-path 0.1 ", "")
        assert "--kd-" not in text.split("amp=")[1], "the peer script changed: update peer_ratio.py"
    path = Path(tempfile.mkdtemp()) / "peer.sh"
    path.write_text(text + 'echo "log: $P/log.txt"\n')
    return path


def peer_rate(job: str, precision: str, data: Path, seconds: int) -> float:
    env = {**os.environ, "DATA": str(data), "PY": sys.executable}
    done = subprocess.run(["bash", str(peer_script(job)), "bf16" if precision == "bf16" else "fp32", str(seconds)],
                          capture_output=True, text=True, env=env)
    log = re.search(r"^log: (.+)$", done.stdout, re.MULTILINE)
    if not re.search(r"img/s: ([0-9.]+)", done.stdout) or not log:
        raise SystemExit(f"the peer failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    # "Train: 0 [  60/390 ( 16%)]  Loss: ... Time: 1.2s, 104/s  (1.3s, 98.5/s)": the running mean at batch 60
    text = Path(log.group(1)).read_text()
    found = re.search(rf"\[\s*{STEPS[job] - 1}/\d+ .*?\(\s*[0-9.]+s,\s+([0-9.]+)/s\)", text)
    if not found:
        raise SystemExit(f"the peer did not reach batch {STEPS[job] - 1} in {seconds} s; raise --peer-seconds.\n{text[-1500:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 image folder (train/, test/).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill-peer-ratio"))
    parser.add_argument("--jobs", nargs="+", default=["student", "teach"], choices=["student", "teach"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "no"], choices=["bf16", "no"])
    parser.add_argument("--peer-seconds", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=1, help="1: distill then peer; 2: also peer then distill.")
    args = parser.parse_args()
    if not os.environ.get("TIMM_TRAIN"):
        raise SystemExit("set TIMM_TRAIN to timm's train.py (from the timm source repository)")
    workdir = args.workdir.resolve()
    teacher = workdir / "teacher"
    if not (teacher / "model.safetensors").exists():  # the peer script's teacher: one short epoch on 2,000 images
        subprocess.run([sys.executable, "-m", "distill", "teach", "--data-dir", str(args.data), "--img-size", "32",
                        "--epochs", "1", "--train-subset", "2000", "--workdir", str(workdir), "--name", "teacher"],
                       check=True, capture_output=True)
    rows: list[dict[str, Any]] = []
    for job in args.jobs:
        stage_args = ["--data-dir", str(args.data)] + (
            ["--teacher", str(teacher), *STUDENT] if job == "student" else ["--model", "regnety_002"])
        for precision in args.precisions:
            for round_ in range(args.rounds):
                order = ["distill", "peer"] if round_ % 2 == 0 else ["peer", "distill"]
                rates = {}
                for side in order:
                    rates[side] = (distill_rate(job, stage_args, precision, workdir, f"{job}-{precision}")
                                   if side == "distill" else peer_rate(job, precision, args.data, args.peer_seconds))
                row = {"job": job, "precision": "bf16" if precision == "bf16" else "fp32", "order": " then ".join(order),
                       "distill_img_s": rates["distill"], "timm_img_s": rates["peer"],
                       "ratio": round(rates["distill"] / rates["peer"], 3)}
                print(row, flush=True)
                rows.append(row)
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "command": " ".join(sys.argv), "rows": rows}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "peer_ratio.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| job | precision | order | distill img/s | timm train.py img/s | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['precision']} | {r['order']} | {r['distill_img_s']:.1f} | {r['timm_img_s']:.1f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    (results / "peer_ratio.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
