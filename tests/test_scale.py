"""Many processes, shrunk to two over gloo on a CPU, through the real commands: no rank waits in a collective while
another prepares data, the launcher's precision reaches the run, the global batch is the same on any number of
processes (and is kept by a resume on another number), repeated augmentation follows DeiT's rule, ranks that do
not share the work folder stop with a sentence, and BatchNorm statistics agree across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import TINY, TINY_VIT, invoke, kill_once_saved, make_image_folder
from distill.teachers import norms_in_forward_order
from distill.weights.checkpoint import read_checkpoint

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")

# A launcher for the tests: `distill` as torchrun starts it, after an optional change that a test needs on every
# rank (a slower image check, a per-rank work folder, a record of BatchNorm statistics at each evaluation).
LAUNCHER = '''
import json, os, sys, time
rank = os.environ.get("RANK", "0")
sys.argv = [a.replace("RANKDIR", rank) for a in sys.argv]
if os.environ.get("SLOW_CHECK") and rank in os.environ.get("SLOW_RANKS", rank).split(","):
    # each image's check takes SLOW_CHECK seconds, on every rank (or on SLOW_RANKS only)
    import distill.data.images as images
    quick = images.image_problem
    def slow(handle):
        time.sleep(float(os.environ["SLOW_CHECK"]))
        with open(f"checked-{rank}", "a") as tally:  # how many images this rank checked
            tally.write("x")
        return quick(handle)
    images.image_problem = slow
if os.environ.get("SLOW_STATE"):  # reading each file of a saved state in full takes SLOW_STATE seconds
    import distill.training.runfolder as runfolder
    whole = runfolder.state_damage
    def slow_state(state, names):
        time.sleep(float(os.environ["SLOW_STATE"]) * len(names))
        with open(f"state-checked-{rank}", "a") as tally:  # how many files this rank read
            tally.write("x" * len(names))
        return whole(state, names)
    runfolder.state_damage = slow_state
if os.environ.get("BN_RECORD"):  # each rank writes the BatchNorm statistics it evaluates with
    import distill.training.engine as engine
    measure = engine.evaluate
    def recorded(net, *args, **kwargs):
        stats = {k.removeprefix("module."): v.double().sum().item() for k, v in net.state_dict().items()
                 if "running_" in k}
        with open(f"{os.environ['BN_RECORD']}-{rank}.jsonl", "a") as handle:
            handle.write(json.dumps(stats) + "\\n")
        return measure(net, *args, **kwargs)
    engine.evaluate = recorded
if os.environ.get("SLOW_WRITE") and rank == "0":  # process 0's checkpoint write takes SLOW_WRITE seconds more
    import distill.training.engine as engine
    write = engine.save_checkpoint
    def slow_write(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_WRITE"]))
        return write(*args, **kwargs)
    engine.save_checkpoint = slow_write
    if os.environ.get("STALL"):  # ... and process 0 shows no sign of life meanwhile (a disk that does not answer)
        import distill.training.waiting as waiting
        waiting.beat_interval = lambda timeout: 3600
if os.environ.get("SLOW_SHARD") and rank in os.environ.get("SLOW_RANKS", rank).split(","):
    import distill.teachers.cache as cache  # each teacher-cache shard takes SLOW_SHARD seconds more to write
    write_shard = cache.write_shard
    def slow_shard(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_SHARD"]))
        return write_shard(*args, **kwargs)
    cache.write_shard = slow_shard
from distill.cli import main
main()
'''


def torchrun(tmp_path: Path, *args: str, processes: int = 2, env: dict | None = None, timeout: int = 600,
             **popen) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch_distill.py"
    launcher.write_text(LAUNCHER)
    command = [TORCHRUN, "--nproc_per_node", str(processes), str(launcher), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


@needs_torchrun
def test_a_slow_data_check_on_every_rank_outlasts_a_short_process_group_timeout(tmp_path):
    """Each rank checks its share of the images in parallel: none waits in a collective meanwhile, so a 5-second
    process-group timeout is never reached although the check takes longer than that."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)  # 48 images, 24 per rank
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--dist-timeout", "5",
                      env={"SLOW_CHECK": "0.3"})  # 24 x 0.3 s = 7.2 s of sleeping in each rank's check
    assert result.returncode == 0, result.stdout + result.stderr
    checked = [len((tmp_path / f"checked-{rank}").read_text()) for rank in (0, 1)]
    assert checked == [24, 24]  # each rank slept through its half, longer than the timeout, and the run finished
    assert read_checkpoint(tmp_path / "runs" / "teach").meta["processes"] == 2


@needs_torchrun
@pytest.mark.parametrize("slow, waiting", [(1, 0), (0, 1)])
def test_a_collective_that_outlasts_the_timeout_is_one_sentence(tmp_path, slow, waiting):
    """A rank that falls behind (its share of the image check takes 6 s, process 0's included) makes the other give
    up after --dist-timeout, with a sentence that names it, instead of waiting for ever."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--dist-timeout", "2",
                      env={"SLOW_CHECK": "0.25", "SLOW_RANKS": str(slow)}, timeout=300)
    assert result.returncode != 0
    assert f"Process {waiting} waited more than --dist-timeout 2 s" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout


@needs_torchrun
def test_a_checkpoint_write_longer_than_the_timeout_is_waited_for(tmp_path):
    """Process 0 takes 8 s to write the checkpoint under a 3-second process-group timeout: the other process waits for
    it outside any collective, as long as it shows progress, and the run finishes."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--dist-timeout", "3",
                      env={"SLOW_WRITE": "8"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_checkpoint(tmp_path / "runs" / "teach").meta["processes"] == 2


@needs_torchrun
def test_a_writer_that_stops_showing_progress_is_named_by_the_process_that_waits(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--dist-timeout", "3",
                      env={"SLOW_WRITE": "20", "STALL": "1"}, timeout=300)
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert ("Process 1 waited more than --dist-timeout 3 s for process 0 while it was writing the checkpoint, and it "
            "showed no progress") in said, result.stdout + result.stderr
    assert "Traceback" not in result.stdout


@needs_torchrun
def test_a_teacher_cache_resumed_by_one_process_alone_outlasts_a_short_timeout(tmp_path):
    """A killed cache resumes where process 0's shards were all written and process 1's were not: process 1 takes 5 s
    to write them under a 3-second process-group timeout while process 0, with nothing to do, waits for it outside
    any collective (each shard written is a beat); the cache completes with the same bytes."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)  # 36 training images
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    cache = ["cache-teacher", "--workdir", runs, "--views", "2", "--shard-size", "8", "--batch-size", "8",
             "--num-workers", "0"]
    first = torchrun(tmp_path, *cache)
    assert first.returncode == 0, first.stdout + first.stderr
    shards = sorted((runs / "teacher-cache").glob("shard-*.safetensors"))
    assert len(shards) == 9  # 72 views in shards of 8
    written = {path.name: path.read_bytes() for path in shards}
    for path in shards[1::2]:  # process 1's shards: 1, 3, 5, 7
        path.unlink()
    manifest = runs / "teacher-cache" / "cache.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))  # as a killed run left it
    second = torchrun(tmp_path, *cache, "--dist-timeout", "3", env={"SLOW_SHARD": "1.25", "SLOW_RANKS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 written now" in " ".join(second.stdout.split())
    assert json.loads(manifest.read_text())["complete"] is True
    assert {path.name: path.read_bytes() for path in (runs / "teacher-cache").glob("shard-*.safetensors")} == written
    # A student taught by the cache on two processes, process 0's checkpoint write 5 s under the 3-second timeout:
    # both processes found the cache's teacher, so the agreement with it is measured.
    student = torchrun(tmp_path, "student", "--workdir", runs, "--teacher-cache", runs / "teacher-cache", *TINY,
                       *TINY_VIT, "--epochs", "2", "--distillation", "soft", "--dist-timeout", "3",
                       env={"SLOW_WRITE": "5"})
    assert student.returncode == 0, student.stdout + student.stderr
    taught = read_checkpoint(runs / "student")
    assert taught.meta["processes"] == 2 and "disagreement" in taught.meta["metrics"], taught.meta["metrics"]


@needs_torchrun
def test_ranks_that_see_different_work_folders_stop_with_a_sentence(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs-RANKDIR", *TINY,
                      "--dist-timeout", "12", timeout=300)  # rank 1 looks for process 0's file for 3 s
    assert result.returncode != 0
    assert "must share the work folder" in result.stdout and result.stdout.count("error:") == 1  # rank 0 only
    assert not (tmp_path / "runs-0" / "teach").exists() and not (tmp_path / "runs-1" / "teach").exists()


def test_the_launchers_precision_reaches_the_run_and_a_flag_overrides_it(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    chosen = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY)
    assert chosen.exit_code == 0, chosen.output
    assert "precision bf16" in chosen.output and "the launcher's choice" in chosen.output
    assert read_checkpoint(tmp_path / "runs" / "teach").meta["config"]["mixed_precision"] == "bf16"
    told = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY, "--name", "fp32",
                  "--mixed-precision", "no")
    assert told.exit_code == 0 and "precision fp32" in told.output
    assert read_checkpoint(tmp_path / "runs" / "fp32").meta["config"]["mixed_precision"] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default when nothing is configured
    plain = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY, "--name", "plain")
    assert plain.exit_code == 0 and "precision fp32" in plain.output  # a CPU: fp32 unless the launcher says more
    assert read_checkpoint(tmp_path / "runs" / "plain").meta["config"]["mixed_precision"] == "no"


class Positions(torch.utils.data.Dataset):
    """Image i is the number i: what a loader yields says which images it read."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return torch.tensor(index), 0


def _epoch(count: int, world: int, rank: int, repeated_aug: int, batch: int = 4, epoch: int = 0) -> list[int]:
    from distill.data.loaders import train_loader

    loader = train_loader(Positions(count), batch_size=batch, seed=7, rank=rank, world=world, num_workers=0,
                          repeated_aug=repeated_aug)
    loader.sampler.set_epoch(epoch)
    return [int(i) for images, _ in loader for i in images]


def test_repeated_augmentation_follows_deits_rule():
    """On one process an epoch reads every image once (DeiT samples repeatedly only when distributed); on two, the
    epoch is DeiT's pattern: the shuffled images each thrice in a row, dealt round-robin to the processes, each
    process keeping floor(N // 256 * 256 / processes) of its share."""
    from distill.data.loaders import epoch_seed

    count = 600
    alone = _epoch(count, 1, 0, repeated_aug=3, batch=8)
    assert len(alone) == count // 8 * 8 and len(set(alone)) == len(alone)
    for epoch in (0, 1):
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(7, epoch))
        order = [i for i in torch.randperm(count, generator=generator).tolist() for _ in range(3)]
        keep = count // 256 * 256 // 2
        for rank in (0, 1):
            expected = order[rank::2][:keep]
            got = _epoch(count, 2, rank, repeated_aug=3, batch=4, epoch=epoch)
            assert got == expected[:len(got)] and len(got) == keep // 4 * 4


def test_a_resume_on_another_number_of_processes_continues_at_the_next_image():
    """The images two processes read in the first k steps of an epoch, and those one process reads after skipping
    the same k steps, are the whole epoch, each image once: the global position is what a resume keeps."""
    from distill.training.processes import resume_skip

    count, per_process = 96, 4
    two = [_epoch(count, 2, rank, repeated_aug=1, batch=per_process) for rank in (0, 1)]
    steps = 5  # optimizer steps done at global batch 8 (2 processes x 4)
    consumed = {i for rank in two for i in rank[:steps * per_process]}
    skip = resume_skip({"batch": steps, "images": steps * 8, "processes": 2, "global_batch": 8}, world=1, per_process=4,
                       accumulation=2)
    assert skip == steps * 2  # one process, 4 images x 2 accumulated micro-batches a step
    rest = _epoch(count, 1, 0, repeated_aug=1, batch=per_process)[skip * per_process:]
    assert consumed.isdisjoint(rest) and len(consumed) + len(rest) == count


def test_the_recipes_global_batch_and_lr_are_the_same_on_one_and_two_processes(monkeypatch):
    """deit-b's dry run on 1, 2 and 16 processes (as torchrun and accelerate launch say: WORLD_SIZE) resolves the
    paper's global batch and one learning rate for every stage; the per-process batch and the accumulation follow."""
    plans = {}
    for world in ("1", "2", "16"):
        monkeypatch.setenv("WORLD_SIZE", world)
        result = invoke("pipeline", "deit-b", "--dry-run")
        assert result.exit_code == 0, result.output
        plans[world] = result.output
    for world, text in plans.items():
        assert "global batch 1024" in text, text
    rates = {world: [line.split(": ")[0] + line.split("), lr ")[1] for line in text.splitlines() if "), lr " in line]
             for world, text in plans.items()}
    assert len(rates["1"]) == 8 and rates["1"] == rates["2"] == rates["16"]  # every stage, one lr on any number
    assert "1024 = 1 x 128 x 8" in plans["1"] and "1024 = 2 x 128 x 4" in plans["2"] and "1024 = 16 x 64 x 1" in plans["16"]


@needs_torchrun
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_killed_run_resumes_on_another_number_of_processes_at_the_same_global_batch(tmp_path, before, after):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=32, test=4)  # 96 images: 12 steps of 8
    args = ["teach", "--data-dir", str(data), "--workdir", str(tmp_path / "runs"), "--img-size", "16", "--epochs", "1",
            "--global-batch", "8", "--batch-size", "4", "--num-workers", "0", "--warmup-epochs", "0", "--save-every", "1",
            "--log-every", "1"]
    launcher = tmp_path / "launch_distill.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "runs" / "teach"
    kill_once_saved([TORCHRUN, "--nproc_per_node", str(before), launcher, *args], run / "state" / "progress.json", 5,
                    cwd=tmp_path, env=env, marker=str(launcher))
    saved = json.loads((run / "state" / "progress.json").read_text())
    assert saved["processes"] == before and saved["global_batch"] == 8 and saved["step"] >= 5
    result = torchrun(tmp_path, *args, processes=after)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"step {saved['step']}" in result.stdout and "global batch 8 kept" in result.stdout
    ckpt = read_checkpoint(run)
    assert ckpt.meta["processes"] == after and ckpt.meta["config"]["global_batch"] == 8
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1] and lines[-1]["step"] == 12  # 12 steps an epoch, none redone
    assert all(np.isfinite(line["train_loss"]) and line["train_loss"] < 2.0 for line in lines)  # the curve joins


@needs_torchrun
def test_batchnorm_statistics_agree_across_ranks_at_evaluation_and_in_the_saved_teacher(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    record = tmp_path / "bn"
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--epochs", "2",
                      env={"BN_RECORD": str(record)})
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [[json.loads(line) for line in Path(f"{record}-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) >= 2 and seen[0][0]  # every evaluation, with BatchNorm statistics
    assert seen[0] == seen[1]
    saved = read_checkpoint(tmp_path / "runs" / "teach").state_dict()
    assert {k: v.double().sum().item() for k, v in saved.items() if "running_" in k} == pytest.approx(seen[0][-1])


@needs_torchrun
def test_a_convnet_student_is_fine_tuned_by_fixres_on_two_processes(tmp_path):
    """FixRes of a convnet student (its teacher adapted first, then its classifier and last BatchNorm) on two processes
    under a 5-second process-group timeout while each rank's share of the image check takes longer and process 0's
    checkpoint writes take 6 s: both runs finish in the one folder both processes name for the adapted teacher, the
    ranks evaluate with the same BatchNorm statistics, and nothing but the classifier and the last BatchNorm moves."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)  # 48 images, 24 per rank
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    made = invoke("student", "--workdir", runs, "--name", "resnet", *TINY, "--model", "resnet10t")
    assert made.exit_code == 0, made.output
    record = tmp_path / "bn"
    result = torchrun(tmp_path, "finetune", "--checkpoint", runs / "resnet", "--workdir", runs, "--name", "resnet-24",
                      "--img-size", "24", "--epochs", "2", "--teacher-epochs", "1", "--batch-size", "4", "--num-workers",
                      "0", "--dist-timeout", "5", env={"SLOW_CHECK": "0.3", "BN_RECORD": str(record), "SLOW_WRITE": "6"})
    assert result.returncode == 0, result.stdout + result.stderr
    adapted = list(runs.glob("teach-fixres-24-*"))
    assert len(adapted) == 1 and read_checkpoint(runs / "resnet-24").meta["teacher"]["sha256"] == read_checkpoint(
        adapted[0]).sha256
    checked = [len((tmp_path / f"checked-{rank}").read_text()) for rank in (0, 1)]
    assert checked[0] == checked[1] and checked[0] * 0.3 > 5  # each rank's check outlasted the timeout
    seen = [[json.loads(line) for line in Path(f"{record}-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    assert len(seen[0]) >= 3 and seen[0] == seen[1]  # teacher's and student's evaluations, the same on both ranks
    ckpt = read_checkpoint(runs / "resnet-24")
    assert ckpt.meta["processes"] == 2 and ckpt.meta["fixres"]["bn"] == "last"
    before, after = read_checkpoint(runs / "resnet").state_dict(), ckpt.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    last = norms_in_forward_order(timm.create_model("resnet10t", num_classes=3), 24)[-1]
    assert {"fc.weight", f"{last}.weight", f"{last}.running_mean"} <= changed, sorted(changed)
    assert changed <= {k for k in before if k.startswith((f"{last}.", "fc."))}, sorted(changed)
    saved = {k: v.double().sum().item() for k, v in after.items() if "running_" in k}
    assert saved == pytest.approx(seen[0][-1])


@needs_torchrun
def test_a_pipeline_runs_its_stages_one_after_another_on_two_processes(tmp_path):
    """Every stage of one command runs in the same process group: the second stage's processes still find it."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    recipe = tmp_path / "two.toml"
    recipe.write_text(f'workdir = "runs"\ndata_dir = "{data}"\nepochs = 1\nbatch_size = 4\nnum_workers = 0\n'
                      'img_size = 16\nwarmup_epochs = 0\n[teach]\nmodel = "regnety_002"\n[student]\npatch_size = 4\n'
                      'embed_dim = 32\ndepth = 1\nnum_heads = 2\n')
    result = torchrun(tmp_path, "pipeline", recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    student = read_checkpoint(tmp_path / "runs" / "student")
    assert student.meta["processes"] == 2 and student.meta["teacher"]["path"] == str(tmp_path / "runs" / "teach" /
                                                                                      "model.safetensors")


@needs_torchrun
def test_sync_bn_on_a_cpu_with_several_processes_is_refused_with_a_sentence(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=12, test=4)
    result = torchrun(tmp_path, "teach", "--data-dir", data, "--workdir", tmp_path / "runs", *TINY, "--sync-bn")
    assert result.returncode != 0 and "--sync-bn" in result.stdout and "CUDA" in result.stdout
    assert not (tmp_path / "runs" / "teach").exists()


def test_progress_lines_when_the_output_is_not_a_terminal(folder, tmp_path):
    result = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY, "--epochs", "2",
                    "--batch-size", "4", "--log-every", "3")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith("step ")]
    assert len(lines) == 6 and all("img/s" in line and "loss" in line and "lr" in line and "ETA" in line for line in lines)


def test_a_run_recorded_before_the_global_batch_existed_is_still_the_same_run(tmp_path):
    """A folder whose record predates --global-batch and --sync-bn (they were added later) names the same run as one
    that has them at the values the record implies; any other difference is still a different run."""
    from distill.training.runfolder import IDENTITY_FILE, folder_status

    now = {"stage": "teach", "config": {"epochs": 2, "batch_size": 32, "global_batch": 64, "sync_bn": False},
           "parent": None, "teacher": None}
    older = {"stage": "teach", "config": {"epochs": 2, "batch_size": 32}, "parent": None, "teacher": None}
    run = tmp_path / "teach"
    run.mkdir()
    (run / IDENTITY_FILE).write_text(json.dumps(older))
    assert folder_status(run, now).state == "interrupted"
    assert folder_status(run, {**now, "config": {**now["config"], "sync_bn": True}}).state == "changed-interrupted"
    assert folder_status(run, {**now, "config": {**now["config"], "epochs": 3}}).state == "changed-interrupted"


def test_loader_workers_follow_the_cores_and_the_processes_of_the_machine(monkeypatch, folder):
    """--num-workers auto: on a GPU node every core but one per training process, shared by its processes (8 GPUs on
    64 cores: 7 each); on a CPU half a process's cores, at least 2; the run's first lines say which."""
    import torch

    from distill.config.auto import auto_workers

    with monkeypatch.context() as machine:
        machine.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
        machine.setenv("LOCAL_WORLD_SIZE", "8")
        machine.setattr(torch.cuda, "is_available", lambda: True)
        assert auto_workers()[0] == 7
        machine.setenv("LOCAL_WORLD_SIZE", "1")
        assert auto_workers()[0] == 32  # at most 32 a process
        machine.setattr(torch.cuda, "is_available", lambda: False)
        assert auto_workers()[0] == 32
        machine.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert auto_workers()[0] == 2
    result = invoke("teach", "--data-dir", folder, "--epochs", "1", "--batch-size", "8", "--img-size", "16",
                    "--warmup-epochs", "0")
    assert result.exit_code == 0, result.output
    cores = len(os.sched_getaffinity(0))
    expected = min(32, max(2, cores // 2))
    assert f"{expected} loader workers per process (auto: {cores} cores for 1 process(es), no GPU" in result.output


@needs_torchrun
def test_a_resume_reads_its_saved_state_on_every_rank_within_a_short_process_group_timeout(tmp_path):
    """Two processes with DeiT's augmentation (uint8 batches with erasing boxes, through loader workers) are killed
    once a state is saved, then resumed with a 5-second process-group timeout while reading each saved file in full
    takes 2.5 s: each rank reads its share of the files at once, so no rank waits in a collective for the whole
    state's reading (12 s and more on one rank); the epoch's rate counts the images of both ranks."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=32, test=4)  # 96 images: 12 steps of 8
    args = ["teach", "--data-dir", str(data), "--workdir", str(tmp_path / "runs"), "--img-size", "16", "--epochs", "1",
            "--global-batch", "8", "--batch-size", "4", "--num-workers", "2", "--warmup-epochs", "0", "--save-every", "1",
            "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]
    launcher = tmp_path / "launch_distill.py"
    launcher.write_text(LAUNCHER)
    run = tmp_path / "runs" / "teach"
    kill_once_saved([TORCHRUN, "--nproc_per_node", "2", launcher, *args], run / "state" / "progress.json", 4,
                    cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, marker=str(launcher))
    files = [p for p in (run / "state").iterdir() if p.is_file()]
    result = torchrun(tmp_path, *args, "--dist-timeout", "5", env={"SLOW_STATE": "2.5"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming" in result.stdout
    read = [len((tmp_path / f"state-checked-{rank}").read_text()) for rank in (0, 1)]
    assert sum(read) == len(files) >= 5 and abs(read[0] - read[1]) <= 1  # each file once, shared evenly
    (line,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 12 and read_checkpoint(run).meta["processes"] == 2
