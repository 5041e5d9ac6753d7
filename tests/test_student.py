"""`distill student`: every distillation variant end to end, metadata, strict reload, refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.teachers import norms_in_forward_order
from distill.weights.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny teacher on a tiny real-image folder, trained once for this module."""
    root = tmp_path_factory.mktemp("student")
    data = make_image_folder(root / "data", ["circle", "square", "star"])
    result = invoke("teach", "--data-dir", data, "--workdir", root / "runs", *TINY)
    assert result.exit_code == 0, result.output
    return root, data


@pytest.mark.parametrize("variant", [["--distillation", "none", "--no-token"], ["--distillation", "soft", "--no-token"],
                                     ["--distillation", "hard", "--no-token"], ["--distillation", "hard", "--token"],
                                     ["--distillation", "soft", "--token"]],
                         ids=["none", "soft", "hard", "hard+token", "soft+token"])
def test_each_variant_trains_and_says_what_it_is(taught, variant):
    root, _ = taught
    name = "student-" + "-".join(variant).replace("--", "")
    result = invoke("student", "--workdir", root / "runs", "--name", name, *TINY, *TINY_VIT, *variant,
                    "--alpha", "0.5", "--tau", "2.0", "--teacher", root / "runs" / "teach")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(root / "runs" / name / "model.safetensors")
    teacher = read_checkpoint(root / "runs" / "teach" / "model.safetensors")
    kind, token = variant[1], variant[2] == "--token"
    fused = {"fusion": "logits"} if token else {}  # a token student's heads: their logit mean, timm's, by default
    assert ckpt.meta["distillation"] == {"kind": kind, "alpha": 0.5, "tau": 2.0, "token": token, "teacher_res": 16, **fused}
    assert ckpt.meta["parent"]["sha256"] == teacher.sha256 and ckpt.meta["teacher"]["sha256"] == teacher.sha256
    assert ckpt.classes == teacher.classes and ckpt.meta["data"]["data_dir"] == teacher.meta["data"]["data_dir"]
    assert ckpt.model_name == ("deit_tiny_distilled_patch16_224" if token else "deit_tiny_patch16_224")
    metrics = ckpt.meta["metrics"]
    assert "teacher" in metrics["heads"] and set(metrics["disagreement"]) >= ({"fused", "cls", "dist"} if token else {"top"})
    # timm alone rebuilds it, strictly
    model = timm.create_model(ckpt.model_name, **ckpt.model_args)
    model.load_state_dict(load_file(ckpt.path), strict=True)
    model.eval()
    out = model(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 3)


def test_the_default_teacher_is_runs_teach_even_beside_a_newer_teacher(taught, tmp_path):
    """A target teacher made later (`teach --init T --name teach-other`) is a teacher checkpoint too, and
    newer; the student's default stays the folder `distill teach` writes, and the run says which it took."""
    root, _ = taught
    other = make_image_folder(tmp_path / "other", ["apple", "pear"])
    made = invoke("teach", "--workdir", root / "runs", "--data-dir", other, "--init", root / "runs" / "teach",
                  "--name", "teach-other", *TINY)
    assert made.exit_code == 0, made.output
    result = invoke("student", "--workdir", root / "runs", "--name", "auto", *TINY, *TINY_VIT)
    assert result.exit_code == 0, result.output
    teacher = read_checkpoint(root / "runs" / "teach")
    assert f"teacher: {root / 'runs' / 'teach' / 'model.safetensors'} (RegNetY-200MF @ 16px (regnety_002, 2.8M params)" in result.output
    assert "3 classes, test top-1" in result.output
    ckpt = read_checkpoint(root / "runs" / "auto")
    assert ckpt.meta["teacher"]["sha256"] == teacher.sha256
    assert ckpt.meta["distillation"]["kind"] == "hard" and ckpt.meta["distillation"]["token"] is True
    assert "class + distillation" in result.output and "disagrees with teacher" in result.output


def test_teacher_with_other_classes_is_refused_before_training(taught, tmp_path):
    root, _ = taught
    other = make_image_folder(tmp_path / "other", ["circle", "square", "moon"])
    result = invoke("student", "--workdir", root / "runs", "--name", "mismatch", "--data-dir", other, *TINY, *TINY_VIT)
    assert result.exit_code == 2
    assert "trained on other classes" in result.output and "moon" in result.output
    assert not (root / "runs" / "mismatch" / "model.safetensors").exists()


def test_no_distillation_without_a_teacher_stands_alone(taught):
    root, data = taught
    result = invoke("student", "--workdir", root / "runs", "--name", "alone", "--data-dir", data, *TINY, *TINY_VIT,
                    "--distillation", "none", "--no-token")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(root / "runs" / "alone")
    assert ckpt.meta["parent"] is None and ckpt.meta["teacher"] is None and "disagreement" not in ckpt.meta["metrics"]


def test_a_student_is_not_a_teacher(taught):
    root, _ = taught
    invoke("student", "--workdir", root / "runs", "--name", "s1", *TINY, *TINY_VIT, "--distillation", "none",
           "--teacher", root / "runs" / "teach")
    result = invoke("student", "--workdir", root / "runs", "--name", "s2", "--teacher", root / "runs" / "s1", *TINY)
    assert result.exit_code == 2 and "is a student checkpoint" in result.output and "not a teacher" in result.output


def test_no_teacher_anywhere_is_a_sentence(tmp_path, folder):
    result = invoke("student", "--workdir", tmp_path / "empty", "--data-dir", folder, *TINY, *TINY_VIT)
    assert result.exit_code == 2 and "No teacher at" in result.output and "--teacher CKPT" in result.output


def test_without_runs_teach_other_teachers_are_named_not_taken(tmp_path, folder):
    assert invoke("teach", "--workdir", tmp_path / "runs", "--data-dir", folder, "--name", "teach-a", *TINY).exit_code == 0
    result = invoke("student", "--workdir", tmp_path / "runs", *TINY, *TINY_VIT)
    assert result.exit_code == 2 and "No teacher at" in result.output and "teach-a" in result.output
    assert not (tmp_path / "runs" / "student").exists()


def test_a_deit3_student_with_the_token_keeps_timm_keys_plus_the_token(taught):
    """deit3_* (LayerScale, position embeddings on the patches only) with timm's distillation token: the
    checkpoint holds timm's deit3 keys and shapes plus dist_token and head_dist, it trains with feature
    distillation beside the hard labels, and a FixRes fine-tune resamples its position embeddings."""
    root, _ = taught
    result = invoke("student", "--workdir", root / "runs", "--name", "deit3", *TINY, *TINY_VIT, "--model", "deit3_small",
                    "--token", "--layer-scale", "1e-4", "--distillation", "hard+feature", "--feature-loss", "cosine",
                    "--teacher", root / "runs" / "teach")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(root / "runs" / "deit3")
    assert ckpt.model_name == "deit3_small_patch16_224" and ckpt.model_args["distilled"] is True
    assert ckpt.meta["distillation"] == {"kind": "hard+feature", "alpha": 0.5, "tau": 1.0, "token": True,
                                         "feature_loss": "cosine", "teacher_res": 16, "fusion": "logits"}
    weights = load_file(ckpt.path)
    plain = timm.create_model("deit3_small_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                              num_classes=3).state_dict()
    assert set(weights) == set(plain) | {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert all(weights[key].shape == plain[key].shape for key in plain)
    assert torch.all(weights["blocks.0.ls1.gamma"] != 0)  # LayerScale, trained from 1e-4
    tuned = invoke("finetune", "--workdir", root / "runs", "--name", "deit3-24", "--checkpoint", ckpt.path, "--res", "24",
                   *[flag for flag in TINY if flag not in ("--img-size", "16")], "--no-teacher")
    assert tuned.exit_code == 0, tuned.output
    resized = read_checkpoint(root / "runs" / "deit3-24")
    assert resized.img_size == 24 and load_file(resized.path)["pos_embed"].shape == (1, 36, 32)


@pytest.mark.parametrize("model", ["vit_small", "vit_small_patch16_224"])
def test_a_vit_without_a_token_in_timm_trains_plain_and_is_refused_with_the_token(taught, model):
    root, _ = taught
    refused = invoke("student", "--workdir", root / "runs", "--name", "vit-token", *TINY, *TINY_VIT, "--model", model,
                     "--token")
    assert refused.exit_code == 2 and "has no distillation token" in refused.output and "--no-token" in refused.output
    assert not (root / "runs" / "vit-token").exists()
    plain = invoke("student", "--workdir", root / "runs", "--name", f"vit-{model}", *TINY, *TINY_VIT, "--model", model)
    assert plain.exit_code == 0, plain.output  # --token unset: none for a model timm has none for
    made = read_checkpoint(root / "runs" / f"vit-{model}")
    assert made.model_name == "vit_small_patch16_224" and made.meta["distillation"]["token"] is False


def test_a_convnet_student_distils_exports_and_predicts(taught, tmp_path):
    """Any timm classifier as the student: a ResNet built as timm defines it, hard and soft distillation without a
    token, its timm export reloading with identical logits, predict agreeing with the model; token and sizing flags
    refused with a sentence."""
    root, data = taught
    runs = root / "runs"
    for kind in ("hard", "soft"):
        made = invoke("student", "--workdir", runs, "--name", f"resnet-{kind}", *TINY, "--model", "resnet10t",
                      "--distillation", kind)
        assert made.exit_code == 0, made.output
        student = read_checkpoint(runs / f"resnet-{kind}")
        assert (student.model_name, student.model_args) == ("resnet10t", {"num_classes": 3})
        assert student.meta["distillation"]["kind"] == kind and student.meta["distillation"]["token"] is False
    onnx = importlib.util.find_spec("onnxruntime") is not None  # in the test extras; --onnx needs it
    exported = invoke("export", runs / "resnet-hard", "--out", tmp_path / "exported", *(["--onnx"] if onnx else []))
    assert exported.exit_code == 0 and "logits identical" in exported.output, exported.output
    model = timm.create_model("local-dir:" + str(tmp_path / "exported"), pretrained=True).eval()
    if onnx:  # the ONNX model gives the timm folder's probabilities
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "exported" / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(images).softmax(-1)
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), expected, atol=1e-5)
    image = sorted((data / "test" / "star").iterdir())[0]
    predicted = invoke("predict", runs / "resnet-hard", image, "--format", "json")
    assert predicted.exit_code == 0, predicted.output
    from distill.tools.inference import preprocessing

    ckpt = read_checkpoint(runs / "resnet-hard")
    from PIL import Image

    pixels = preprocessing(ckpt)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        logits = model(preprocessing(ckpt).finish(pixels))
    top = ckpt.classes[int(logits.argmax())]
    assert f'"class": "{top}"' in predicted.output.split("predictions")[1].split("}")[0]
    for extra, said in ((["--token"], "has no distillation token"), (["--depth", "2"], "--depth sizes a ViT")):
        refused = invoke("student", "--workdir", runs, "--name", "resnet-refused", *TINY, "--model", "resnet10t", *extra)
        assert refused.exit_code == 2 and said in refused.output, refused.output
    evaluated = invoke("evaluate", runs / "resnet-hard", "--num-workers", "0")
    assert evaluated.exit_code == 0 and f"{ckpt.meta['metrics']['top1']:.2f}" in evaluated.output, evaluated.output
    moved = invoke("transfer", "--workdir", runs, "--checkpoint", runs / "resnet-hard", "--data-dir", data, *TINY,
                   "--classes", "circle,star", "--name", "resnet-transfer")
    assert moved.exit_code == 0, moved.output
    transferred = read_checkpoint(runs / "resnet-transfer")
    assert (transferred.model_name, transferred.model_args) == ("resnet10t", {"num_classes": 2})
    assert transferred.meta["parent"]["sha256"] == ckpt.sha256
    souped = invoke("soup", runs / "resnet-hard", runs / "resnet-soft", "--out", tmp_path / "soup", "--num-workers", "0",
                    "--batch-size", "8")
    assert souped.exit_code == 0, souped.output
    soup, soft = load_file(tmp_path / "soup" / "model.safetensors"), load_file(read_checkpoint(runs / "resnet-soft").path)
    hard = load_file(ckpt.path)
    assert torch.allclose(soup["fc.weight"], (hard["fc.weight"] + soft["fc.weight"]) / 2, atol=1e-6)
    timed = invoke("benchmark", runs / "resnet-hard", "--no-training", "--batch-size", "2", "--steps", "1",
                   "--warmup", "0", "--json", tmp_path / "bench.json")
    assert timed.exit_code == 0, timed.output
    assert json.loads((tmp_path / "bench.json").read_text())[0]["model"].startswith("resnet10t")


def test_a_convnet_student_is_fine_tuned_by_fixres(taught):
    """FixRes for a convnet student: by default only its classifier and its last BatchNorm train at the new resolution
    (on test-time preprocessing), the teacher adapted as for a ViT, accuracy before and after recorded; --bn full trains
    every layer; --bn on a ViT is refused."""
    root, _ = taught
    runs = root / "runs"
    made = invoke("student", "--workdir", runs, "--name", "resnet-fixres", *TINY, "--model", "resnet10t")
    assert made.exit_code == 0, made.output
    parent = read_checkpoint(runs / "resnet-fixres")
    before = load_file(parent.path)
    tuned = invoke("finetune", "--workdir", runs, "--name", "resnet-24", "--checkpoint", parent.path, "--img-size", "24",
                   "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "8", "--num-workers", "0")
    assert tuned.exit_code == 0, tuned.output
    ckpt = read_checkpoint(runs / "resnet-24")
    assert (ckpt.model_name, ckpt.model_args, ckpt.img_size) == ("resnet10t", {"num_classes": 3}, 24)
    metrics = ckpt.meta["metrics"]
    assert metrics["parent_top1"] == parent.meta["metrics"]["top1"] and "before_top1" in metrics and "top1" in metrics
    said = " ".join(tuned.output.split())
    assert f"before fine-tuning {metrics['before_top1']:.2f} (fp32 at 24 px)" in said, tuned.output
    assert "a convnet: FixRes trains its classifier and last BatchNorm at 24 px on test-time preprocessing" in said
    recorded = ckpt.meta["config"]  # what ran: test-time preprocessing, nothing random, no SyncBatchNorm
    assert (recorded["aa"], recorded["mixup"], recorded["cutmix"], recorded["reprob"], recorded["drop_path"],
            recorded["sync_bn"]) == ("none", 0.0, 0.0, 0.0, 0.0, False)
    assert ckpt.meta["fixres"]["bn"] == "last" and ckpt.meta["teacher"]["path"].endswith(
        "model.safetensors") and "teach-fixres-24-" in ckpt.meta["teacher"]["path"]
    after = load_file(ckpt.path)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    last = norms_in_forward_order(timm.create_model("resnet10t", num_classes=3), 24)[-1]
    assert {"fc.weight", f"{last}.weight", f"{last}.running_mean"} <= changed, sorted(changed)
    assert changed <= {k for k in before if k.startswith((f"{last}.", "fc."))}, sorted(changed)  # nothing else moved
    full = invoke("finetune", "--workdir", runs, "--name", "resnet-24-full", "--checkpoint", parent.path, "--img-size",
                  "24", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "8", "--num-workers", "0", "--bn", "full")
    assert full.exit_code == 0, full.output
    every = load_file(read_checkpoint(runs / "resnet-24-full").path)
    assert not torch.equal(before["conv1.0.weight"], every["conv1.0.weight"])
    vit = invoke("student", "--workdir", runs, "--name", "vit-for-bn", *TINY, *TINY_VIT)
    assert vit.exit_code == 0, vit.output
    refused = invoke("finetune", "--workdir", runs, "--name", "vit-bn", "--checkpoint", runs / "vit-for-bn",
                     "--img-size", "24", "--bn", "last")
    assert refused.exit_code == 2 and "--bn adapts a convnet's BatchNorm layers" in refused.output, refused.output


def test_an_unknown_model_is_the_same_sentence_with_near_names_everywhere(taught):
    root, data = taught
    runs = root / "runs"
    cases = [["teach", "--model", "deit_huge", "--data-dir", data],
             ["student", "--model", "deit_huge", "--token"], ["student", "--model", "deit_huge", "--no-token"],
             ["student", "--model", "deit3_smal"]]
    for args in cases:
        result = invoke(*args, "--workdir", runs, "--name", "unknown", *TINY)
        assert result.exit_code == 2, (args, result.output)
        name = args[2]
        assert f"error: timm has no model named '{name}'; near names: " in result.output, (args, result.output)
    assert "deit3_huge_patch14_224" in invoke("student", "--model", "deit_huge", "--workdir", runs, *TINY).output
    assert "deit3_small_patch16_224" in invoke("student", "--model", "deit3_smal", "--workdir", runs, *TINY).output
    assert not (runs / "unknown").exists()
