"""Shared helpers: tiny real image folders, a CLI runner, and small settings that keep every run to seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["COLUMNS"] = "200"  # tables are read by the tests: one row per line
# One compute thread in every run a test makes (the thread count decides how a CPU sums, and the tests compare runs
# bit for bit; the tests run two at a time, one per core). Tests of the automatic choice take it away themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Flags that shrink any stage to a few seconds on a CPU.
TINY = ["--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--img-size", "16", "--warmup-epochs", "0"]
TINY_VIT = ["--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2"]


def make_image_folder(root: Path, classes: list[str], train: int = 12, test: int = 4, size: int = 16,
                      seed: int = 0) -> Path:
    """A folder of real (generated) PNGs whose class is visible: each class has its own colour and stripe."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[:, :, index % 3] += 120
                pixels[(index * 3) % size: (index * 3) % size + 3, :, :] = 255
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test in its own folder, with its own dataset cache and no debug mode."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "distill-cache"))
    monkeypatch.delenv("DISTILL_DEBUG", raising=False)
    from distill import cli

    cli._debug["on"] = False
    yield


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "shapes", ["circle", "square", "star"])


def invoke(*args: str):
    """Run the CLI in this process; returns typer's result (exit_code, output)."""
    from distill.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m distill` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="session")
def flowers12(tmp_path_factory) -> Path:
    """The real 12-class flower photos from ../shared/data, unpacked once."""
    archive = SHARED_DATA / "flowers12.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} is not here (real-data tests need the shared data folder)")
    target = tmp_path_factory.mktemp("flowers12")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    roots = [p.parent for p in target.rglob("train")]
    return roots[0]


def kill_once_saved(command: list, progress: Path, step: int, *, cwd: Path | None = None, env: dict | None = None,
                    marker: str | None = None) -> None:
    """Start `command` and SIGKILL it once its saved state (`progress`, a progress.json) has reached `step`: its whole
    process group, and every process whose command line holds `marker` (torchrun's workers may sit in groups of
    their own). A lost machine, as a test can make one."""
    process = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(progress.read_text())["step"] >= step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    for proc in Path("/proc").iterdir() if marker else []:
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass
    process.wait()
