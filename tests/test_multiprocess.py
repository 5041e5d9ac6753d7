"""Several processes (torchrun, gloo on CPU): each test image counted once, one process writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint


def test_two_processes_train_count_each_test_image_once_and_write_once(tmp_path):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun is not installed")
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=5)  # 15 test images: uneven shards
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", "distill", "teach", "--data-dir", str(data),
               "--workdir", str(tmp_path / "runs"), *TINY, "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "teach"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # one writer: no duplicated lines
    assert all(line["samples"] == 15 for line in lines)
    ckpt = read_checkpoint(run / "model.safetensors")
    assert ckpt.meta["processes"] == 2 and ckpt.meta["metrics"]["samples"] == 15
    assert ckpt.meta["lr_effective"] == pytest.approx(ckpt.meta["config"]["lr"] * 8 * 2 / 512)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in (run / "state").iterdir() if p.name.startswith("random_states")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    assert result.stdout.count("epoch   2/2") == 1  # only the main process prints


def test_two_processes_train_a_feature_projection_beside_the_student(tmp_path):
    """The criterion's projection is prepared like the model (one DDP module per process, gradients averaged,
    accumulation respected) and saved once in the resumable state; the student exported alone."""
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun is not installed")
    from safetensors.torch import load_file

    from conftest import TINY_VIT, invoke

    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=5)
    assert invoke("teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY).exit_code == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", "distill", "student", "--workdir", str(tmp_path / "runs"), *TINY,
               *TINY_VIT, "--batch-size", "4", "--grad-accum", "2", "--no-token", "--distillation", "hard+feature",
               "--loss", "bce", "--aa", "3a"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "student"
    ckpt = read_checkpoint(run)
    assert ckpt.meta["processes"] == 2 and ckpt.meta["distillation"]["kind"] == "hard+feature"
    assert not any(key.startswith("projection") for key in ckpt.state_dict())
    assert set(load_file(str(run / "state" / "model_1.safetensors"))) == {"projection.weight", "projection.bias"}


def test_two_processes_write_a_teacher_cache_one_process_reads_alike(tmp_path):
    """Each process writes its own shards (every second one); the cache equals the one a single process writes, byte
    for byte, and reads the same."""
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun is not installed")
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=2)
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    cache = ["--views", "3", "--shard-size", "8", "--batch-size", "5", "--num-workers", "0", "--aa", "rand-m9-mstd0.5-inc1",
             "--reprob", "0.25"]
    assert invoke("cache-teacher", "--workdir", runs, "--name", "alone", *cache).exit_code == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", "distill", "cache-teacher", "--workdir", str(runs),
               "--name", "shared", *cache]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    alone = sorted(p.name for p in (runs / "alone").glob("shard-*.safetensors"))
    assert len(alone) == 14 and alone == sorted(p.name for p in (runs / "shared").glob("shard-*.safetensors"))
    for name in alone:  # 3 views x 36 images in shards of 8: 14 shards, the last one of 4 rows
        assert (runs / "alone" / name).read_bytes() == (runs / "shared" / name).read_bytes(), name
