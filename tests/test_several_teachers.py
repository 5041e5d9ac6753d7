"""Several teachers at once (`--teacher A --teacher B`): the student, or a teacher cache, learns from the mean of their
probabilities, each teacher reading the batch at its own resolution and normalisation; the checkpoint records them all."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.teachers.cache import TeacherCache
from distill.weights.checkpoint import read_checkpoint

CONVNET = ["--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--img-size", "16", "--warmup-epochs", "0",
           "--model", "resnet10t"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two teachers of other kinds, resolutions and normalisations: a RegNetY at 16 px (ImageNet's) and a ResNet at
    24 px (Inception's)."""
    root = tmp_path_factory.mktemp("several")
    data = make_image_folder(root / "data", ["circle", "square", "star"], train=12, test=4, size=24)
    runs = root / "runs"
    assert invoke("teach", "--data-dir", data, "--workdir", runs, *TINY).exit_code == 0
    other = invoke("teach", "--data-dir", data, "--workdir", runs, "--name", "teach-resnet", "--model", "resnet10t",
                   "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--img-size", "24", "--warmup-epochs", "0",
                   "--norm", "inception")
    assert other.exit_code == 0, other.output
    return runs, data


def test_the_mean_of_the_teachers_probabilities_each_at_its_own_resolution_and_normalisation(two):
    from distill.teachers.frozen import frozen_teacher, frozen_teachers

    runs, _ = two
    first, second = read_checkpoint(runs / "teach"), read_checkpoint(runs / "teach-resnet")
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # the student's own, unlike either teacher's
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for tau in (1.0, 3.0):
        ensemble = frozen_teachers([first, second], norm, 16, "teacher", tau=tau)
        alone = [frozen_teacher(ckpt, norm, 16, "teacher") for ckpt in (first, second)]
        mean = sum((teacher(images) / tau).softmax(dim=1) for teacher in alone) / 2
        out = ensemble(images)
        assert torch.allclose((out / tau).softmax(dim=1), mean, atol=1e-6)  # what soft distillation reads
        assert torch.equal(out.argmax(dim=1), mean.argmax(dim=1))  # hard distillation's label
    assert [member.img_size for member in ensemble.members] == [None, 24]  # the ResNet reads at its own 24 px


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_convnet_student_learns_from_two_teachers_and_records_both(two, kind):
    runs, _ = two
    one = invoke("student", "--workdir", runs, "--name", f"one-{kind}", *CONVNET, "--distillation", kind)
    assert one.exit_code == 0, one.output
    made = invoke("student", "--workdir", runs, "--name", f"two-{kind}", *CONVNET, "--distillation", kind,
                  "--teacher", runs / "teach", "--teacher", runs / "teach-resnet", "--teacher-res", "teacher")
    assert made.exit_code == 0, made.output
    said = " ".join(made.output.split())
    assert "2 teachers: the student learns from the mean of their probabilities" in said
    assert said.count("teacher: ") >= 2 and "teach-resnet" in said
    ckpt = read_checkpoint(runs / f"two-{kind}")
    shas = [read_checkpoint(runs / name).sha256 for name in ("teach", "teach-resnet")]
    assert [record["sha256"] for record in ckpt.meta["teachers"]] == shas
    assert ckpt.meta["teacher"]["sha256"] == ckpt.meta["parent"]["sha256"] == shas[0]
    assert ckpt.meta["distillation"]["teacher_res"] == [16, 24]
    assert json.loads((runs / f"two-{kind}" / "identity.json").read_text())["teachers"] == shas
    assert "teachers" not in json.loads((runs / f"one-{kind}" / "identity.json").read_text())
    assert read_checkpoint(runs / f"one-{kind}").meta.get("teachers") is None
    first, second = load_file(read_checkpoint(runs / f"one-{kind}").path), load_file(ckpt.path)
    assert not torch.equal(first["fc.weight"], second["fc.weight"])  # the second teacher changed what it learned
    info = invoke("info", runs / f"two-{kind}")
    assert "teachers" in info.output and "their mean probabilities" in " ".join(info.output.split())


def test_what_several_teachers_cannot_do_is_refused_with_a_sentence(two):
    runs, _ = two
    both = ["--teacher", runs / "teach", "--teacher", runs / "teach-resnet"]
    feature = invoke("student", "--workdir", runs, "--name", "feature", *TINY, *TINY_VIT, *both, "--distillation", "feature")
    assert feature.exit_code == 2 and "regresses one teacher's features" in feature.output, feature.output
    twice = invoke("student", "--workdir", runs, "--name", "twice", *CONVNET, "--teacher", runs / "teach", "--teacher",
                   runs / "teach" / "model.safetensors")
    assert twice.exit_code == 2 and "is given twice" in twice.output, twice.output
    made = invoke("student", "--workdir", runs, "--name", "two-for-finetune", *CONVNET, *both)
    assert made.exit_code == 0, made.output
    tuned = invoke("finetune", "--workdir", runs, "--checkpoint", runs / "two-for-finetune", "--img-size", "24")
    assert tuned.exit_code == 2 and "distilled from 2 teachers" in tuned.output, tuned.output
    assert not (runs / "feature").exists() and not (runs / "twice").exists()


def test_a_cache_of_two_teachers_keeps_the_mean_of_their_probabilities(two):
    """The cached top-k of a view are the top-k of the two teachers' mean probabilities on that very view, each
    teacher reading it at its own resolution; a student replays them and refuses to be told one teacher alone made
    the cache."""
    from torch.utils.data import default_collate

    from distill.config import CacheConfig, resolve
    from distill.data import Transformed
    from distill.stages.common import load_data, resolve_norm, training_transform
    from distill.teachers.frozen import frozen_teachers

    runs, _ = two
    made = invoke("cache-teacher", "--workdir", runs, "--name", "cache-two", "--teacher", runs / "teach", "--teacher",
                  runs / "teach-resnet", "--teacher-res", "teacher", "--views", "2", "--epochs", "2", "--num-workers",
                  "0", "--batch-size", "16", "--top-k", "3", "--img-size", "16")
    assert made.exit_code == 0, made.output
    cache = TeacherCache(runs / "cache-two")
    shas = [read_checkpoint(runs / name).sha256 for name in ("teach", "teach-resnet")]
    assert [record["sha256"] for record in cache.manifest["teachers"]] == shas
    cfg = resolve(CacheConfig, overrides={**cache.manifest["config"], "workdir": runs})  # as the cache was made
    data = load_data(cfg)
    mean, std = resolve_norm(cfg, data)
    transform = training_transform(cfg, mean, std)
    views = Transformed(data.train, transform)
    seeds = cache.seeds()
    ensemble = frozen_teachers([read_checkpoint(runs / "teach"), read_checkpoint(runs / "teach-resnet")], (mean, std),
                               16, "teacher")
    for view in (0, 1):
        batch = default_collate([views[(i, int(seeds[view][i]))][0] for i in range(6)])
        probabilities = ensemble(transform.finish(batch, "cpu")).softmax(dim=1)
        for i in range(6):
            values, classes = cache.top_k_of(i, view)
            assert torch.equal(classes.long(), probabilities[i].topk(3).indices)
            assert torch.allclose(values.float(), probabilities[i].topk(3).values, atol=1e-3)
    student = invoke("student", "--workdir", runs, "--name", "from-cache-two", "--teacher-cache", runs / "cache-two",
                     "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", *TINY_VIT,
                     "--distillation", "soft")
    assert student.exit_code == 0, student.output
    assert "made by" in student.output and "the teachers do not run" in " ".join(student.output.split())
    assert [r["sha256"] for r in read_checkpoint(runs / "from-cache-two").meta["teachers"]] == shas
    alone = invoke("student", "--workdir", runs, "--name", "cache-one", "--teacher-cache", runs / "cache-two",
                   "--teacher", runs / "teach", "--epochs", "1", "--num-workers", "0", *TINY_VIT)
    assert alone.exit_code == 2 and "was made by other teachers" in alone.output, alone.output


def test_a_cache_of_two_teachers_refuses_a_temperature_and_names_its_teachers_when_they_have_moved(two, tmp_path):
    """A cache of several teachers holds their mean at temperature 1, which a --tau cannot turn into the mean at
    another temperature; a student made from it records both teachers even when their files are gone."""
    import shutil

    runs, _ = two
    made = invoke("cache-teacher", "--workdir", runs, "--name", "cache-moved", "--teacher", runs / "teach", "--teacher",
                  runs / "teach-resnet", "--views", "1", "--epochs", "1", "--num-workers", "0", "--batch-size", "16",
                  "--img-size", "16")
    assert made.exit_code == 0, made.output
    moved = tmp_path / "cache"
    shutil.copytree(runs / "cache-moved", moved)
    manifest = json.loads((moved / "cache.json").read_text())
    for record in [manifest["teacher"], *manifest["teachers"]]:
        record["path"] = str(tmp_path / "gone" / "model.safetensors")
    (moved / "cache.json").write_text(json.dumps(manifest))
    student = ["student", "--workdir", runs, "--teacher-cache", moved, "--epochs", "1", "--batch-size", "8",
               "--num-workers", "0", "--warmup-epochs", "0", "--distillation", "soft", *TINY_VIT]
    hot = invoke(*student, "--name", "cache-tau", "--tau", "3")
    assert hot.exit_code == 2 and "--tau 3 would apply its temperature to that mean" in " ".join(hot.output.split()), hot.output
    assert not (runs / "cache-tau").exists()
    made = invoke(*student, "--name", "cache-moved-student")
    assert made.exit_code == 0, made.output
    shas = [read_checkpoint(runs / name).sha256 for name in ("teach", "teach-resnet")]
    assert [r["sha256"] for r in read_checkpoint(runs / "cache-moved-student").meta["teachers"]] == shas
    tuned = invoke("finetune", "--workdir", runs, "--checkpoint", runs / "cache-moved-student", "--img-size", "24")
    assert tuned.exit_code == 2 and "distilled from 2 teachers" in tuned.output, tuned.output


def test_a_second_teacher_of_other_classes_is_refused_with_a_sentence(two, tmp_path):
    """Every teacher is checked against the data, not only the first (whose data the student inherits)."""
    runs, _ = two
    other_data = make_image_folder(tmp_path / "other", ["circle", "square", "triangle"], train=6, test=2, size=16)
    made = invoke("teach", "--data-dir", other_data, "--workdir", runs, "--name", "teach-other-classes", *TINY)
    assert made.exit_code == 0, made.output
    refused = invoke("student", "--workdir", runs, "--name", "other-classes", *CONVNET, "--teacher", runs / "teach",
                     "--teacher", runs / "teach-other-classes")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "teach-other-classes" in said and "trained on other classes" in said, refused.output
    assert "Traceback" not in refused.output and not (runs / "other-classes").exists()
