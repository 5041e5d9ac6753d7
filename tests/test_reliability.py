"""Resume after SIGKILL, nothing half-written, NaN stops, and every bad input as one sentence."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, invoke, kill_once_saved, make_image_folder, run_cli
from distill.weights.checkpoint import read_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "distill"


def _teach_args(data, workdir, workers):
    return ["teach", "--data-dir", data, "--workdir", workdir, "--img-size", "32", "--batch-size", "4",
            "--epochs", "2", "--warmup-epochs", "0.5", "--save-every", "1", "--num-workers", str(workers),
            "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, workers):
    """Killed and resumed with `workers` loader workers, against an uninterrupted run with the other count:
    bit-identical weights, whatever the workers and wherever the kill."""
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=40, test=4, size=32)
    reference = invoke(*_teach_args(data, tmp_path / "straight", 2 - workers))
    assert reference.exit_code == 0, reference.output

    _kill_at_step(_teach_args(data, tmp_path / "killed", workers), tmp_path / "killed" / "teach" / "state" / "progress.json",
                  12)  # mid-way through the first of two epochs
    assert not (tmp_path / "killed" / "teach" / "model.safetensors").exists()

    resumed = invoke(*_teach_args(data, tmp_path / "killed", workers))
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming" in resumed.output
    straight = read_checkpoint(tmp_path / "straight" / "teach").state_dict()
    after_kill = read_checkpoint(tmp_path / "killed" / "teach").state_dict()
    assert straight.keys() == after_kill.keys()
    for key in straight:
        assert torch.equal(straight[key], after_kill[key]), key
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "teach" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def _kill_at_step(command: list, progress: Path, step: int) -> None:
    """Start `python -m distill ...` and SIGKILL it once its saved state has reached `step`."""
    kill_once_saved([sys.executable, "-m", "distill", *command], progress, step)


def test_feature_distillation_resumes_its_projection_exactly_and_never_exports_it(tmp_path):
    """DeiT III's parts and feature distillation together (3-Augment, simple random crop, BCE on binarised Mixup
    targets, hard + feature distillation), killed mid-epoch and resumed: the projection is in the saved state and
    comes back, so student and projection end bit-identical to an uninterrupted run; the exported student holds
    exactly timm's keys."""
    import timm
    from safetensors.torch import load_file

    from conftest import TINY_VIT

    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=40, test=4, size=16)
    assert invoke("teach", "--data-dir", data, "--workdir", tmp_path / "teachers", *TINY).exit_code == 0
    teacher = tmp_path / "teachers" / "teach" / "model.safetensors"

    def args(workdir):
        return ["student", "--data-dir", data, "--workdir", workdir, "--teacher", teacher, "--img-size", "16",
                "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0.5", "--save-every", "1", "--num-workers", "0",
                *TINY_VIT, "--no-token", "--distillation", "hard+feature", "--aa", "3a", "--crop", "src", "--loss", "bce",
                "--smoothing", "0", "--bce-target-thresh", "0", "--mixup", "0.8", "--cutmix", "1.0"]

    straight = invoke(*args(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "killed" / "student"
    _kill_at_step(args(tmp_path / "killed"), run / "state" / "progress.json", 12)  # 30 steps an epoch
    assert not (run / "model.safetensors").exists()
    saved = load_file(str(run / "state" / "model_1.safetensors"))
    assert set(saved) == {"projection.weight", "projection.bias"} and saved["projection.weight"].shape == (368, 32)
    resumed = invoke(*args(tmp_path / "killed"))
    assert resumed.exit_code == 0 and "Resuming" in resumed.output, resumed.output

    for name in ("model.safetensors", "state/model_1.safetensors"):  # the student, then the projection
        expected, got = (load_file(str(root / "student" / name)) for root in (tmp_path / "straight", tmp_path / "killed"))
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    exported = read_checkpoint(run)
    model = timm.create_model(exported.model_name, **exported.model_args)
    assert set(exported.state_dict()) == set(model.state_dict())
    assert exported.meta["distillation"]["kind"] == "hard+feature"


WRITER = """
import sys, torch
from distill.weights.checkpoint import save_checkpoint
meta = {"kind": "teacher", "stage": "teach", "model": {"name": "x", "args": {}}, "data": {"classes": ["a"], "img_size": 8}}
versions = [{"w": torch.full((256, 1024), float(v))} for v in range(2)]
save_checkpoint(sys.argv[1], versions[1], {**meta, "version": 1})
print("ready", flush=True)
i = 0
while True:
    save_checkpoint(sys.argv[1], versions[i % 2], {**meta, "version": i % 2})
    i += 1
"""


def test_killing_a_checkpoint_write_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "model.safetensors"
    for attempt in range(3):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        ckpt = read_checkpoint(target)
        weights = ckpt.state_dict()["w"]
        assert torch.all(weights == ckpt.meta["version"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.safetensors"]
    # A killed writer may leave a hidden temporary (ours, or the one safetensors itself writes before its own
    # rename), never a bad target.
    assert all(name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp")) for name in leftovers)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(folder):
    result = invoke("teach", "--data-dir", folder, *TINY, "--epochs", "2", "--opt", "sgd", "--lr", "1e30",
                    "--no-lr-scale", "--save-every", "1", "--drop-path", "0")
    assert result.exit_code == 2
    match = re.search(r"The loss became (nan|inf) at step (\d+) \(epoch 1\)", result.output)
    assert match, result.output
    state = folder.parent / "runs" / "teach" / "state" / "progress.json"
    assert json.loads(state.read_text())["step"] == int(match.group(2)) - 1
    assert not (folder.parent / "runs" / "teach" / "model.safetensors").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_named_and_can_be_skipped(tmp_path, workers):
    data = make_image_folder(tmp_path / "data", ["a", "b"])
    (data / "train" / "b" / "zz_broken.png").write_bytes(b"\x89PNG this is not an image")
    result = invoke("teach", "--data-dir", data, *TINY, "--num-workers", str(workers))
    assert result.exit_code == 2 and "zz_broken.png" in result.output and "--skip-corrupt" in result.output
    assert "Traceback" not in result.output
    skipped = invoke("teach", "--data-dir", data, *TINY, "--skip-corrupt", "--name", "skipping")
    assert skipped.exit_code == 0, skipped.output
    assert read_checkpoint(tmp_path / "runs" / "skipping").meta["data"]["skipped_corrupt"] == 1
    assert "24 training and 8 test images remain (the lines above counted every file)" in " ".join(skipped.output.split())


def test_bad_inputs_are_one_sentence_and_a_non_zero_exit(tmp_path, folder):
    assert invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "runs", *TINY).exit_code == 0
    teacher = tmp_path / "runs" / "teach" / "model.safetensors"
    (tmp_path / "truncated.safetensors").write_bytes(teacher.read_bytes()[:1000])
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    (tmp_path / "recipe.toml").write_text("epoch = 3\n")
    (tmp_path / "typed.toml").write_text('[teach]\nbatch_size = "big"\n')
    (tmp_path / "a-file").write_text("")
    cases = [
        (["info", tmp_path / "missing.safetensors"], "does not exist"),
        (["info", tmp_path / "truncated.safetensors"], "truncated or corrupted"),
        (["info", tmp_path / "foreign.safetensors"], "is a bare weights file: name its timm architecture with --model"),
        (["student", "--teacher", tmp_path / "truncated.safetensors", *TINY], "truncated or corrupted"),
        (["finetune", "--checkpoint", teacher, "--res", "32"], "is a teacher checkpoint"),
        (["teach", "--data-dir", empty, *TINY, "--name", "empty"], "is empty"),
        (["teach", "--recipe", tmp_path / "recipe.toml"], "did you mean 'epochs'"),
        (["teach", "--recipe", tmp_path / "typed.toml"], "'batch_size' should be an integer"),
        (["teach", "--data-dir", folder, "--workdir", tmp_path / "a-file" / "runs", *TINY], "Cannot write to"),
        (["student", "--data-dir", folder, "--workdir", tmp_path / "runs", "--name", "bad", *TINY, "--embed-dim", "33",
          "--num-heads", "2", "--patch-size", "4", "--depth", "1"], "Cannot build"),
        (["teach", "--model", "regnety_9999", "--data-dir", folder, *TINY, "--name", "m"], "timm has no model"),
        (["teach", "--data-dir", folder, *TINY, "--name", "o", "--opt", "adamww"], "no optimizer 'adamww'; did you mean"),
        (["teach", "--data-dir", folder, *TINY, "--name", "a", "--aa", "rand-x9"], "cannot read the augmentation policy"),
        (["teach", "--data-dir", folder, *TINY, "--name", "b", "--batch-size", "7", "--mixup", "0.8"],
         "need an even --batch-size"),
        (["finetune", "--checkpoint", teacher, "--res", "0"], "--img-size must be at least 8 pixels"),
    ]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code != 0, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)


def test_debug_shows_the_traceback(tmp_path):
    quiet = run_cli("info", tmp_path / "missing.safetensors")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stdout + quiet.stderr
    loud = run_cli("--debug", "info", tmp_path / "missing.safetensors")
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "DistillError" in loud.stderr


def test_no_pickle_and_no_remote_code_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


def test_a_run_started_with_other_settings_and_nothing_saved_starts_over(folder):
    run = folder.parent / "runs" / "teach"
    run.mkdir(parents=True)
    (run / "identity.json").write_text('{"config": {"lr": 1.0}}')
    (run / "metrics.jsonl").write_text('{"epoch": 0, "top1": 1.0}\n')
    result = invoke("teach", "--data-dir", folder, *TINY)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_state_that_did_not_record_its_global_batch_resumes_only_on_its_number_of_processes(folder):
    """States saved before global batches were recorded resume on the number of processes that saved them (on
    another one, tests/test_scale.py shows a recorded global batch kept)."""
    assert invoke("teach", "--data-dir", folder, *TINY, "--epochs", "2").exit_code == 0
    run = folder.parent / "runs" / "teach"
    (run / "model.safetensors").unlink()  # as if killed after the last state was saved
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert progress["processes"] == 1 and progress["global_batch"] == 8
    older = {key: value for key, value in progress.items() if key not in ("global_batch", "images")}
    (run / "state" / "progress.json").write_text(json.dumps({**older, "processes": 2}))
    result = invoke("teach", "--data-dir", folder, *TINY, "--epochs", "2")
    assert result.exit_code == 2 and "saved by a run on 2 process(es) that did not record its global batch" in result.output


def test_outputs_get_the_usual_file_permissions(folder):
    old = os.umask(0o022)
    try:
        assert invoke("teach", "--data-dir", folder, *TINY).exit_code == 0
    finally:
        os.umask(old)
    run = folder.parent / "runs" / "teach"
    for name in ("model.safetensors", "config.toml", "metrics.jsonl"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def _start(args: list, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=stderr, start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until the running command writes `path` (it fails the test if the command ends first)."""
    while not path.exists():
        assert process.poll() is None, f"the command ended before {path} appeared"
        time.sleep(0.05)


def test_a_second_command_into_a_run_folder_in_use_is_refused_and_nothing_mixes(folder):
    """Two runs started into one folder: the second is refused with a sentence naming the first, which goes on alone;
    once the first has gone, the folder is free again."""
    args = ["teach", "--data-dir", folder, *TINY, "--epochs", "300"]
    run = folder.parent / "runs" / "teach"
    first = _start(args)
    try:
        _wait_for(run / "state" / "progress.json", first)
        second = invoke(*args, "--seed", "1")
        assert second.exit_code == 2, second.output
        assert f"Another distill command (process {first.pid}) is writing to runs/teach" in second.output
        assert json.loads((run / "identity.json").read_text())["config"]["seed"] == 0
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    after = invoke(*args, "--seed", "1")  # the lock went with the killed process: the usual refusal now
    assert after.exit_code == 2 and "already holds an interrupted run with different settings (seed: 0 -> 1)" in after.output


def test_a_damaged_state_is_refused_and_overwrite_starts_the_run_again(folder):
    args = ["teach", "--data-dir", folder, *TINY, "--epochs", "2"]
    assert invoke(*args).exit_code == 0
    run = folder.parent / "runs" / "teach"
    (run / "model.safetensors").unlink()  # as if killed after its last state was saved
    optimizer = run / "state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    for _ in range(2):  # every rerun says the same, and changes nothing
        refused = invoke(*args)
        assert refused.exit_code == 2, refused.output
        assert "is damaged (optimizer.bin cannot be read (truncated or not a torch file))" in refused.output
        assert "pass --overwrite to start it again" in refused.output and "Traceback" not in refused.output
    again = invoke(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert "holds a damaged saved state" in again.output and "Resuming" not in again.output
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_is_a_sentence_keeps_the_last_state_and_leaves_no_partial_one(tmp_path, folder):
    """A write that fails for lack of room (here the file size limit, which fails a write as a full disk does):
    one sentence naming the folder and the room, the previous state intact, no state.tmp; the same command resumes."""
    import resource

    args = ["teach", "--data-dir", folder, *TINY, "--epochs", "6"]
    run = folder.parent / "runs" / "teach"
    _kill_at_step(args, run / "state" / "progress.json", 4)  # killed after epoch 1's state (4 steps an epoch)
    saved = json.loads((run / "state" / "progress.json").read_text())
    model_bytes = (run / "state" / "model.safetensors").stat().st_size

    def small_files() -> None:  # room for the model's state, not for the optimizer's (twice its size)
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_bytes + 1_000_000, model_bytes + 1_000_000))

    full = subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=small_files, timeout=600)
    text = " ".join((full.stdout + full.stderr).split())
    assert full.returncode == 2, text
    assert "A write into runs/teach failed (" in text and "; its disk has" in text and "GB free" in text
    assert f"resumes from the state saved at epoch {saved['epoch']}, step {saved['step']}" in text
    assert "Traceback" not in text and "enforce fail" not in text
    assert not (run / "state.tmp").exists() and not (run / "state.old").exists()
    assert json.loads((run / "state" / "progress.json").read_text()) == saved
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and "Resuming" in resumed.output, resumed.output


def test_a_killed_training_process_takes_its_loader_workers_with_it(tmp_path, folder):
    """kill -9 of the training process alone: its workers go at once, silently (no broken-pipe traceback)."""
    args = ["teach", "--data-dir", folder, *TINY, "--epochs", "300", "--num-workers", "2"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        main = _start(args, stderr=stderr)
        _wait_for(folder.parent / "runs" / "teach" / "state" / "progress.json", main)
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == main.pid]
        assert len(workers) >= 2, workers  # the training loader's, and the evaluation loader's once it has run
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        time.sleep(1.5)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []
    assert "Traceback" not in log.read_text() and "BrokenPipeError" not in log.read_text()


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_inputs_that_would_train_a_meaningless_model_are_refused_or_named(tmp_path, folder):
    """A one-class dataset is refused; a --train-subset beyond the data, a fine-tune that does not raise the resolution
    and a resolution no automatic patch size tiles each get one line."""
    one = make_image_folder(tmp_path / "one", ["only"])
    refused = invoke("teach", "--data-dir", one, *TINY)
    assert refused.exit_code == 2 and "The data has one class ('only'): a classifier needs at least two" in refused.output
    digits = invoke("teach", *TINY, "--classes", "3", "--name", "three")
    assert digits.exit_code == 2 and "one class ('3')" in digits.output

    subset = invoke("teach", "--data-dir", folder, *TINY, "--train-subset", "1000")
    assert subset.exit_code == 0, subset.output
    assert "--train-subset 1,000 is not fewer than the 36 training images: every one is used" in subset.output

    student = invoke("student", "--data-dir", folder, *TINY, "--patch-size", "4", "--embed-dim", "32", "--depth", "1",
                     "--num-heads", "2", "--distillation", "none")
    assert student.exit_code == 0, student.output
    same = invoke("finetune", "--img-size", "16", *TINY[:-4], "--no-teacher")
    assert "--img-size 16 is the parent's 16 px: FixRes fine-tunes at a higher resolution" in " ".join(same.output.split())

    odd = invoke("student", "--data-dir", folder, *TINY[:-4], "--img-size", "31", "--name", "odd", "--depth", "1")
    text = " ".join(odd.output.split())
    assert odd.exit_code == 2 and "patch size 7 (chosen for this resolution; pass --patch-size" in text
    assert "try --img-size 28 or 35" in text
    thirty = invoke("student", "--data-dir", folder, *TINY[:-4], "--img-size", "30", "--name", "thirty", "--depth", "1",
                    "--embed-dim", "32", "--num-heads", "2", "--distillation", "none")
    assert thirty.exit_code == 0, thirty.output  # the automatic patch tiles 30 px: 6 (a 5 x 5 grid)
    assert read_checkpoint(tmp_path / "runs" / "thirty").model_args["patch_size"] == 6


def test_beside_a_busy_program_a_run_trains_on_the_cores_left(folder):
    """One other program keeping a core busy: the run takes one thread fewer (a thread sharing a core with it would
    stall every step), says so, and still trains; --threads takes only auto or a number."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        automatic = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
        result = subprocess.run([sys.executable, "-m", "distill", "teach", "--data-dir", str(folder), *TINY, "--name",
                                 "busy"], capture_output=True, text=True, env=automatic, timeout=600)
    finally:
        hog.kill()
        hog.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    cores = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=automatic,
                               capture_output=True, text=True).stdout)  # PyTorch's own count, without OMP_NUM_THREADS
    assert f"threads {max(1, cores - 1)} of {cores} cores (auto: other programs keep" in result.stdout
    wrong = invoke("teach", "--data-dir", folder, *TINY, "--threads", "many")
    assert wrong.exit_code == 2 and "--threads takes auto or a number of threads (1 or more), not 'many'" in wrong.output



def test_a_resumed_run_keeps_the_threads_its_state_was_saved_with(folder, monkeypatch):
    """The thread count decides how a CPU sums: a state saved with 1 thread resumes with 1, whatever auto would pick
    now, and the checkpoint records it."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    args = ["teach", "--data-dir", folder, *TINY, "--epochs", "2"]
    assert invoke(*args, "--threads", "1").exit_code == 0
    run = folder.parent / "runs" / "teach"
    assert json.loads((run / "state" / "progress.json").read_text())["threads"] == 1
    (run / "model.safetensors").unlink()  # as if killed after its last state
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "threads 1 (auto: kept from the saved state" in resumed.output
    assert read_checkpoint(run).meta["threads"] == 1
