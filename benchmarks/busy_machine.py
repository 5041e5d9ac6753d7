"""Speed beside a busy program: the quickstart's teach and student, alone and beside one program that keeps a core
busy (`python -c "while True: pass"`), with PyTorch's thread per core (`--threads N`, N the cores: the behaviour
before `--threads auto`) and with `--threads auto` (the default).

Not part of the test suite. Each configuration runs the quickstart's settings (digits 0-4 at 32 px, 2 loader
workers; the student a DeiT-Ti/8 of depth 6 with hard distillation and the token, from the teacher trained first)
for a few epochs, and its rate is the last epoch's training images per second from metrics.jsonl. Alone and busy
runs of one setting follow each other, and the two settings alternate, so drift falls on both.

    python benchmarks/busy_machine.py --rounds 2

Results go to benchmarks/results/busy_machine.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = ["--dataset", "digits", "--classes", "0,1,2,3,4", "--img-size", "32", "--num-workers", "2", "--hflip", "0"]


def job(kind: str, work: Path, name: str, epochs: int) -> list[str]:
    if kind == "teach":
        return ["teach", *BASE, "--workdir", str(work), "--name", name, "--epochs", str(epochs)]
    return ["student", *BASE, "--workdir", str(work), "--name", name, "--epochs", str(epochs),
            "--teacher", str(work / "teacher" / "model.safetensors"), "--model", "deit_tiny", "--depth", "6",
            "--patch-size", "8", "--distillation", "hard", "--token"]


def rate(args: list[str], work: Path, name: str) -> tuple[float, str]:
    """The last epoch's training images per second, and the threads line the run printed (none: one per core)."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-m", "distill", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    threads = next((line.strip() for line in done.stdout.splitlines() if line.strip().startswith("threads ")),
                   "one per core")
    return json.loads((work / name / "metrics.jsonl").read_text().splitlines()[-1])["img_per_s"], threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "busy_machine")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="busy-"))
    rate(job("teach", work, "teacher", args.epochs), work, "teacher")  # the student's teacher
    settings = {"per core (before)": ["--threads", str(cores)], "auto": ["--threads", "auto"]}
    rates: dict[str, list[float]] = {}
    chosen: dict[str, list[str]] = {}
    count = 0
    for round_ in range(args.rounds):
        order = list(settings) if round_ % 2 == 0 else list(reversed(settings))
        for setting in order:
            for kind in ("teach", "student"):
                for busy in (False, True):
                    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                    try:
                        count += 1
                        name = f"run{count}"
                        value = rate(job(kind, work, name, args.epochs) + settings[setting], work, name)
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                    key = f"{kind}|{setting}|{'busy' if busy else 'alone'}"
                    rates.setdefault(key, []).append(value[0])
                    chosen.setdefault(key, []).append(value[1])
                    print(f"{key}: {value[0]:.1f} img/s ({value[1]})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    mean = {key: statistics.mean(values) for key, values in rates.items()}
    lines = [f"{cores} cores, {platform.processor() or platform.machine()}, {args.rounds} round(s) of {args.epochs} epochs "
             "(img/s of the last epoch, mean over rounds)", "",
             "| job | threads | alone | beside a busy program | busy / alone |", "|---|---|---|---|---|"]
    for kind in ("teach", "student"):
        for setting in settings:
            alone, busy = mean[f"{kind}|{setting}|alone"], mean[f"{kind}|{setting}|busy"]
            lines.append(f"| {kind} | {setting} | {alone:.0f} | {busy:.0f} | {busy / alone:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"cores": cores, "epochs": args.epochs, "rates": rates,
                                                                 "threads": chosen}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
