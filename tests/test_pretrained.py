"""Pretrained weights in: timm/NAME.TAG, hf-hub:, local-dir: and weights files, with no network.

Weights are made here with timm (random, but real models), laid out as the Hugging Face cache lays out a
download (HF_HOME/hub/models--ORG--REPO/snapshots/<revision>/ plus refs/main) and read with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo

from conftest import TINY, invoke, make_image_folder
from distill.weights.checkpoint import build_model, file_sha256, read_checkpoint
from distill.weights.pretrained import open_source

REVISION = "0123456789abcdef0123456789abcdef01234567"
CLASSES = ["circle", "square", "star"]
TINY32 = ["--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0"]  # TINY, at 32 px
TINY_DEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def hub_snapshot(home: Path, repo: str) -> Path:
    """The folder a download of `repo` at REVISION lands in, inside the hub cache under `home`."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def timm_folder(model: torch.nn.Module, folder: Path, **config) -> Path:
    """A timm model folder (config.json + model.safetensors), as timm's own save_for_hf writes it."""
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), model_config=config, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """HF_HOME with three models in its hub cache: two timm tags (real architectures, random weights) and a tiny
    DeiT as a timm model folder with its own class names."""
    home = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name in ("regnety_002.pycls_in1k", "deit_tiny_patch16_224.fb_in1k"):
        model = timm.create_model(name.split(".")[0])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(hub_snapshot(home, f"timm/{name}") / "model.safetensors"))
    tiny = timm.create_model("deit_tiny_patch16_224", num_classes=3, **TINY_DEIT)
    timm_folder(tiny, hub_snapshot(home, "someone/tiny-deit"), label_names=CLASSES)
    return home


@pytest.fixture
def offline(hub, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _logits(model: torch.nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_a_timm_tag_imports_once_with_its_revision_classes_and_preprocessing(offline):
    result = invoke("import", "timm/regnety_002.pycls_in1k")
    assert result.exit_code == 0, result.output
    ckpt = open_source("timm/regnety_002.pycls_in1k")
    weights = hub_snapshot(offline, "timm/regnety_002.pycls_in1k") / "model.safetensors"
    source = ckpt.meta["source"]
    assert (source["source"], source["revision"], source["sha256"]) == (
        "timm/regnety_002.pycls_in1k", REVISION, file_sha256(weights))
    info = ImageNetInfo("imagenet-1k")
    assert ckpt.kind == "pretrained" and ckpt.model_name == "regnety_002" and ckpt.model_args["num_classes"] == 1000
    assert ckpt.classes == info.label_descriptions() and ckpt.class_ids == info.label_names()
    assert (ckpt.img_size, ckpt.data["crop_pct"], ckpt.data["interpolation"], ckpt.data["norm"]) == (
        224, 0.875, "bicubic", "imagenet")
    reference = timm.create_model("regnety_002")
    reference.load_state_dict(load_file(str(weights)))
    assert torch.equal(_logits(build_model(ckpt), 64), _logits(reference, 64))
    again = open_source("timm/regnety_002.pycls_in1k")
    assert again.path == ckpt.path and again.sha256 == ckpt.sha256  # written once, then reused
    assert "imported:" in result.output and "ImageNetInfo" in invoke("info", "timm/regnety_002.pycls_in1k").output


def test_the_imported_file_is_the_same_wherever_it_is_imported(offline, tmp_path, monkeypatch):
    first = open_source("timm/regnety_002.pycls_in1k")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "elsewhere"))
    second = open_source("timm/regnety_002.pycls_in1k")
    assert second.path != first.path and second.sha256 == first.sha256  # children's lineage survives a new cache


def test_hub_folders_local_folders_and_weights_files_import_alike(offline, tmp_path):
    hub = open_source("hf-hub:someone/tiny-deit")
    assert hub.classes == CLASSES and hub.class_ids == [] and hub.meta["source"]["revision"] == REVISION
    assert hub.model_args["img_size"] == 32 and hub.model_args["patch_size"] == 8 and hub.img_size == 32
    folder = hub_snapshot(offline, "someone/tiny-deit")
    local = open_source(f"local-dir:{folder}")
    plain = open_source(str(folder))  # a timm model folder given as a plain path
    assert local.path == plain.path and local.meta["source"]["sha256"] == file_sha256(folder / "model.safetensors")
    expected = _logits(build_model(hub), 32)
    assert torch.equal(_logits(build_model(local), 32), expected)

    fine_tuned = timm.create_model("regnety_002", num_classes=10).eval()  # a user's own 10-class weights
    torch.save({"model": fine_tuned.state_dict()}, tmp_path / "mine.pth")  # the official DeiT layout: {"model": ...}
    save_file(fine_tuned.state_dict(), str(tmp_path / "mine.safetensors"))
    for name in ("mine.pth", "mine.safetensors"):
        refused = invoke("info", tmp_path / name)
        assert refused.exit_code == 2 and "name its timm architecture with --model" in refused.output
        ckpt = open_source(tmp_path / name, model="regnety_002")
        assert ckpt.meta["source"]["sha256"] == file_sha256(tmp_path / name) and ckpt.meta["source"]["model"] == "regnety_002"
        assert ckpt.model_args["num_classes"] == 10 and ckpt.classes == [str(i) for i in range(10)]
        assert torch.equal(_logits(build_model(ckpt), 64), _logits(fine_tuned, 64))
    wrong = invoke("info", tmp_path / "mine.pth", "--model", "regnety_004")
    assert wrong.exit_code == 2 and "do not fit timm's regnety_004" in wrong.output and "check --model" in wrong.output


def test_a_pickle_with_python_objects_is_refused_never_unpickled(tmp_path):
    import collections

    torch.save({"model": timm.create_model("regnety_002").state_dict(), "args": collections.Counter(a=1),
                "hook": print}, tmp_path / "trusted.pth")
    result = invoke("info", tmp_path / "trusted.pth", "--model", "regnety_002")
    assert result.exit_code == 2 and "weights_only=True" in result.output and "Traceback" not in result.output
    imports = tmp_path / "distill-cache" / "imports"
    assert not imports.exists() or list(imports.iterdir()) == []  # a failed import leaves no folder, no lock file


def test_an_unreachable_hub_is_one_sentence_naming_the_offline_ways(tmp_path, monkeypatch, folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # HF_HOME: an empty cache of this test's own
    result = invoke("student", "--teacher", "timm/regnety_160.deit_in1k", "--data-dir", folder, *TINY)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "HF_HUB_OFFLINE is set and timm/regnety_160.deit_in1k is not in the Hugging Face cache" in text
    assert "local-dir:PATH" in text and "--model NAME" in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists()


def test_unknown_tags_and_architectures_are_named(offline):
    wrong_tag = invoke("info", "timm/regnety_002.no_such_tag")
    assert wrong_tag.exit_code == 2 and "pycls_in1k" in wrong_tag.output
    assert "timm has no model named 'regnety_9000'" in invoke("info", "timm/regnety_9000.x").output


# The Hugging Face imagenet-1k dataset (ILSVRC/imagenet-1k) names its labels by these strings (its classes.py,
# synset -> name, in label order); a few, including both classes named "crane" and both "maillot"s.
HUB_IMAGENET_NAMES = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 134: "crane", 517: "crane",
                      638: "maillot", 639: "maillot, tank suit", 999: "toilet tissue, toilet paper, bathroom tissue"}


def test_imagenet_classes_match_the_hub_dataset_names_and_synset_folders(offline, tmp_path):
    from distill.config import StudentConfig, resolve
    from distill.stages.student import plan_student
    from distill.teachers.frozen import check_classes
    from distill.errors import DistillError

    teacher = open_source("timm/regnety_002.pycls_in1k")
    for index, name in HUB_IMAGENET_NAMES.items():
        assert teacher.classes[index] == name
    check_classes(teacher, list(teacher.classes), "the hub's imagenet-1k")  # by name
    synsets = ImageNetInfo("imagenet-1k").label_names()
    root = tmp_path / "imagenet"
    for split in ("train", "test"):
        for synset in synsets:
            (root / split / synset).mkdir(parents=True)
    plan = plan_student(resolve(StudentConfig, overrides={"teacher": "timm/regnety_002.pycls_in1k", "data_dir": root,
                                                          "img_size": 32, "patch_size": 8}))
    assert plan.classes == synsets and plan.model["args"]["num_classes"] == 1000  # by synset
    (root / "train" / synsets[5]).rename(root / "train" / "n99999999")
    with pytest.raises(DistillError, match=f"only the data has n99999999; class 5 is '{synsets[5]}'"):
        plan_student(resolve(StudentConfig, overrides={"teacher": "timm/regnety_002.pycls_in1k", "data_dir": root,
                                                       "img_size": 32, "patch_size": 8}))


def test_the_papers_distilled_deit_names_its_teacher(offline):
    """The official distilled DeiTs carry their distillation and their teacher, so finetune keeps distilling."""
    from distill.weights.pretrained import PAPER_DISTILLED, PAPER_TEACHER

    assert PAPER_DISTILLED.fullmatch("deit_base_distilled_patch16_384.fb_in1k")
    assert not PAPER_DISTILLED.fullmatch("deit_base_patch16_224.fb_in1k")
    plain = open_source("timm/deit_tiny_patch16_224.fb_in1k")
    assert plain.meta["teacher"] is None and "distillation" not in plain.meta and PAPER_TEACHER.startswith("timm/")


def test_round_trip_import_teach_student_finetune_transfer_export(offline, tmp_path):
    """Imported weights through every stage, then out as a timm folder that timm reloads with the same logits."""
    source = make_image_folder(tmp_path / "shapes", CLASSES, size=32)
    target = make_image_folder(tmp_path / "fruit", ["apple", "fig"], size=32, seed=1)
    runs = tmp_path / "runs"
    taught = invoke("teach", "--init", "timm/regnety_002.pycls_in1k", "--data-dir", source, "--img-size", "32",
                    "--workdir", runs, *TINY32)
    assert taught.exit_code == 0, taught.output
    teacher = read_checkpoint(runs / "teach")
    imported = open_source("timm/regnety_002.pycls_in1k")
    assert teacher.meta["parent"]["sha256"] == imported.sha256
    assert teacher.meta["parent"]["source"] == "timm/regnety_002.pycls_in1k" and teacher.classes == CLASSES

    student = invoke("student", "--init", "hf-hub:someone/tiny-deit", "--workdir", runs, "--img-size", "32",
                     "--teacher-res", "teacher", *TINY32)
    assert student.exit_code == 0, student.output
    ckpt = read_checkpoint(runs / "student")
    assert ckpt.model_name == "deit_tiny_distilled_patch16_224" and ckpt.model_args["embed_dim"] == 32
    assert ckpt.meta["init"]["source"] == "hf-hub:someone/tiny-deit" and ckpt.meta["distillation"]["teacher_res"] == 32

    tuned = invoke("finetune", "--res", "48", "--workdir", runs, "--teacher-epochs", "1", *TINY32)
    assert tuned.exit_code == 0, tuned.output
    moved = invoke("transfer", "--data-dir", target, "--workdir", runs, *TINY32)
    assert moved.exit_code == 0, moved.output
    final = read_checkpoint(runs / "transfer-fruit")
    assert final.classes == ["apple", "fig"] and final.img_size == 48

    exported = invoke("export", runs / "transfer-fruit", "--to", tmp_path / "out")
    assert exported.exit_code == 0, exported.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224" and config["num_classes"] == 2
    assert config["label_names"] == ["apple", "fig"] and config["pretrained_cfg"]["input_size"] == [3, 48, 48]
    assert config["distill"]["checkpoint_sha256"] == final.sha256
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert torch.equal(_logits(reloaded, 48), _logits(build_model(final), 48))
    again = open_source(tmp_path / "out")  # and back in: the folder imports as any timm folder
    assert again.classes == ["apple", "fig"] and torch.equal(_logits(build_model(again), 48), _logits(reloaded, 48))
