"""The teacher cache: views replayed bit for bit, a killed cache resumed, mismatches refused, targets mixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint
from distill.teachers.cache import TeacherCache

CACHE = ["--views", "2", "--epochs", "2", "--num-workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = make_image_folder(root / "data", ["circle", "square", "star"], train=12, test=4, size=16)
    runs = root / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    made = invoke("cache-teacher", "--workdir", runs, *CACHE, "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25")
    assert made.exit_code == 0, made.output
    return runs, data


def test_a_replayed_view_is_the_cached_one_bit_for_bit(cached):
    """The student's loader, epoch e, gives view e % views of each image: the very tensor the teacher saw."""
    from distill.config import StudentConfig, resolve
    from distill.stages.common import load_data, resolve_norm, training_transform
    from distill.stages.student import plan_student
    from distill.teachers.frozen import frozen_teacher
    from distill.data import Transformed, train_loader
    from torch.utils.data import default_collate

    runs, _ = cached
    cache = TeacherCache(runs / "teacher-cache")
    plan = plan_student(resolve(StudentConfig, overrides={"workdir": runs, "teacher_cache": runs / "teacher-cache",
                                                                 "epochs": 1, "batch_size": 8, "num_workers": 0}))
    cfg = plan.config
    assert (cfg.aa, cfg.reprob) == ("rand-m9-mstd0.5-inc1", 0.25)  # the cache's augmentation, inherited
    data = load_data(cfg)
    mean, std = resolve_norm(cfg, data)
    transform = training_transform(cfg, mean, std)
    seeds = cache.seeds()
    as_cached = Transformed(data.train, transform)  # what the cache writer read
    as_trained = Transformed(data.train, transform, lambda i, v: torch.tensor([i, v]))
    loader = train_loader(as_trained, batch_size=6, seed=3, rank=0, world=1, num_workers=0, view_seeds=seeds)
    teacher = frozen_teacher(read_checkpoint(runs / "teach"), (mean, std), cfg.img_size)
    for epoch in (0, 1, 2):
        loader.sampler.set_epoch(epoch)
        images, _, keys = next(iter(loader))
        assert all(int(v) == epoch % 2 for _, v in keys.tolist())
        written = default_collate([as_cached[(int(i), int(seeds[v][i]))][0] for i, v in keys.tolist()])
        images = transform.finish(images, "cpu")
        assert torch.equal(images, transform.finish(written, "cpu"))
        probabilities = teacher(images).float().softmax(dim=1)
        for row, (i, v) in enumerate(keys.tolist()):
            values, classes = cache.top_k_of(i, v)
            assert torch.equal(classes.long(), probabilities[row].topk(3).indices)
            assert torch.allclose(values.float(), probabilities[row].topk(3).values, atol=1e-3)


def test_a_student_trains_from_the_cache_with_no_teacher_forward(cached, monkeypatch):
    from distill.teachers import FrozenTeacher

    runs, _ = cached
    calls = []
    original = FrozenTeacher.forward
    monkeypatch.setattr(FrozenTeacher, "forward", lambda self, x: calls.append(len(x)) or original(self, x))
    result = invoke("student", "--workdir", runs, "--teacher-cache", runs / "teacher-cache", *TINY, *TINY_VIT,
                    "--mixup", "0.8", "--cutmix", "1.0", "--name", "cached")
    assert result.exit_code == 0, result.output
    assert calls == [8, 4]  # only the final evaluation's agreement with the teacher: 12 test images, batch 8
    student = read_checkpoint(runs / "cached")
    teacher = read_checkpoint(runs / "teach")
    assert student.meta["teacher"]["sha256"] == teacher.sha256
    assert student.meta["teacher_cache"]["path"] == str((runs / "teacher-cache").resolve())
    assert student.meta["config"]["aa"] == "rand-m9-mstd0.5-inc1"
    assert "teacher cache:" in result.output and "the teacher does not run" in result.output
    assert json.loads((runs / "teacher-cache" / "cache.json").read_text())["erase_noise"] == "cpu"
    assert "random erasing's boxes are filled" not in result.output  # made and read on a CPU: the same noise


def test_a_cache_whose_erasing_noise_was_drawn_elsewhere_says_so(cached, tmp_path):
    import shutil

    runs, _ = cached
    elsewhere = tmp_path / "cache"
    shutil.copytree(runs / "teacher-cache", elsewhere)
    manifest = json.loads((elsewhere / "cache.json").read_text())
    (elsewhere / "cache.json").write_text(json.dumps({**manifest, "erase_noise": "cuda"}))
    result = invoke("student", "--workdir", runs, "--teacher-cache", elsewhere, *TINY, *TINY_VIT, "--name", "elsewhere")
    assert result.exit_code == 0, result.output
    assert "filled with noise drawn on this cpu, the cache's were drawn on a cuda" in " ".join(result.output.split())


def test_a_cache_that_does_not_match_is_refused(cached, tmp_path):
    runs, data = cached
    cases = [
        (["--aa", "none"], "made with other data or augmentation: aa rand-m9-mstd0.5-inc1 (asked: none)"),
        (["--img-size", "32"], "img_size 16 (asked: 32)"),
        (["--distillation", "none"], "nothing to give --distillation none"),
        (["--repeated-aug", "3"], "cannot be combined with --repeated-aug"),
    ]
    for flags, said in cases:
        result = invoke("student", "--workdir", runs, "--teacher-cache", runs / "teacher-cache", *TINY, *TINY_VIT, *flags,
                        "--name", "refused")
        assert result.exit_code == 2 and said in result.output, (flags, result.output)
    other = invoke("teach", "--data-dir", data, "--workdir", runs, *TINY, "--seed", "5", "--name", "teach-other")
    assert other.exit_code == 0
    wrong = invoke("student", "--workdir", runs, "--teacher-cache", runs / "teacher-cache", "--teacher", runs / "teach-other",
                   *TINY, *TINY_VIT, "--name", "refused")
    assert wrong.exit_code == 2 and "made by another teacher" in wrong.output
    half = tmp_path / "half"
    half.mkdir()
    manifest = json.loads((runs / "teacher-cache" / "cache.json").read_text())
    (half / "cache.json").write_text(json.dumps({**manifest, "complete": False}))
    unfinished = invoke("student", "--workdir", runs, "--teacher-cache", half, *TINY, *TINY_VIT, "--name", "refused")
    assert unfinished.exit_code == 2 and "is not finished" in unfinished.output
    assert not (runs / "refused").exists()


def test_changed_data_is_refused_before_training(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b"], train=8, test=2, size=16)
    runs = tmp_path / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    assert invoke("cache-teacher", "--workdir", runs, *CACHE).exit_code == 0
    (data / "train" / "a" / "a_0.png").rename(data / "train" / "b" / "moved.png")  # same count, other labels
    result = invoke("student", "--workdir", runs, "--teacher-cache", runs / "teacher-cache", *TINY, *TINY_VIT)
    assert result.exit_code == 2 and "not the one the teacher cache" in result.output


def test_a_killed_cache_resumes_and_ends_identical(tmp_path):
    data = make_image_folder(tmp_path / "data", ["a", "b", "c"], train=40, test=2, size=32)
    args = ["--data-dir", data, "--img-size", "32", "--views", "4", "--shard-size", "8", "--num-workers", "0",
            "--batch-size", "5", "--aa", "rand-m9-mstd0.5-inc1"]  # batches of 5 and 3: cut at every shard's end
    for workdir in ("straight", "killed"):
        assert invoke("teach", "--workdir", tmp_path / workdir, *args[:4], *TINY[:2], "--num-workers", "0").exit_code == 0
    assert invoke("cache-teacher", "--workdir", tmp_path / "straight", *args).exit_code == 0
    killed = tmp_path / "killed" / "teacher-cache"
    process = subprocess.Popen([sys.executable, "-m", "distill", "cache-teacher", "--workdir", str(tmp_path / "killed"),
                                *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(list(killed.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.01)
    assert process.poll() is None, "the cache was finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not json.loads((killed / "cache.json").read_text())["complete"]
    resumed = invoke("cache-teacher", "--workdir", tmp_path / "killed", *args)
    assert resumed.exit_code == 0, resumed.output
    assert "written now" in resumed.output and "(60 written now)" not in resumed.output
    straight = tmp_path / "straight" / "teacher-cache"
    shards = sorted(p.name for p in straight.glob("shard-*.safetensors"))
    assert len(shards) == 60 and shards == sorted(p.name for p in killed.glob("shard-*.safetensors"))
    for name in shards:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name
    assert not (straight / "seeds.safetensors").exists()  # seeds are derived, not stored

    # other batches (6 and 2 a shard): the same rows in the same shards, within rounding
    assert invoke("cache-teacher", "--workdir", tmp_path / "straight", "--name", "straddled", *args[:-4],
                  "--batch-size", "6", *args[-2:]).exit_code == 0
    straddled = tmp_path / "straight" / "straddled"
    assert sorted(p.name for p in straddled.glob("shard-*.safetensors")) == shards
    one, other = TeacherCache(straight), TeacherCache(straddled)
    assert one.images == other.images == 120
    for index in range(0, 120, 7):
        for view in range(4):
            (a_values, a_classes), (b_values, b_classes) = one.top_k_of(index, view), other.top_k_of(index, view)
            assert torch.equal(a_classes[:1], b_classes[:1]) and torch.allclose(a_values.float(), b_values.float(), atol=2e-3)


def test_cached_targets_are_mixed_with_the_images_lambda_and_box():
    from distill.training.step import TargetMixup

    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cached = torch.rand(6, 4).softmax(dim=1)
    for mixup, cutmix in ((50.0, 0.0), (0.0, 50.0)):  # Beta(50, 50): lambda near 1/2, a box of a fair size
        mixing = TargetMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=4)
        images = torch.rand(6, 3, 16, 16)
        original = images.clone()
        np.random.seed(1)
        mixed_images, mixed_labels, (mixed_cached,) = mixing(images, labels, [cached])
        lam = float(mixed_labels[0, 0])  # label 0 at lam, its partner (label 1) at 1 - lam
        assert 0.2 < lam < 0.8 and float(mixed_labels[0, 1]) == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(mixed_cached, cached * lam + cached.flip(0) * (1 - lam), atol=1e-6)
        if cutmix:  # the box of the partner's pixels covers exactly 1 - lam of the image
            from_partner = (mixed_images == original.flip(0)).all(dim=1)[0] & (mixed_images != original).any(dim=1)[0]
            assert float(from_partner.float().mean()) == pytest.approx(1 - lam, abs=0.01)
        else:
            assert torch.allclose(mixed_images, original * lam + original.flip(0) * (1 - lam), atol=1e-6)


def test_the_cached_loss_is_the_on_the_fly_loss_when_nothing_is_cut():
    from timm.loss import SoftTargetCrossEntropy

    from distill.losses import DistillationLoss

    class Teacher(torch.nn.Module):
        def forward(self, x):
            return x

    torch.manual_seed(0)
    teacher_logits = torch.randn(4, 5)
    student = (torch.randn(4, 5), torch.randn(4, 5))
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    for kind, cached in (("soft", teacher_logits.softmax(dim=1)),
                         ("hard", F.one_hot(teacher_logits.argmax(dim=1), 5).float())):
        live = DistillationLoss(SoftTargetCrossEntropy(), Teacher(), kind, alpha=0.3, tau=2.0)
        replay = DistillationLoss(SoftTargetCrossEntropy(), None, kind, alpha=0.3, tau=2.0, cached=True)
        expected = live(teacher_logits, student, labels)
        assert torch.allclose(replay(None, student, labels, cached), expected, atol=1e-6)
