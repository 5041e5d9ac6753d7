"""Models out and predictions: the timm folder, ONNX, `distill predict`; and what the teacher reads (--teacher-res)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import timm
import torch

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import build_model, read_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher and a token student on a small image folder."""
    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "shapes", ["circle", "square", "star"], test=6)
    runs = root / "runs"
    assert invoke("teach", "--data-dir", folder, "--workdir", runs, *TINY).exit_code == 0
    result = invoke("student", "--workdir", runs, *TINY, *TINY_VIT)
    assert result.exit_code == 0, result.output
    return runs, folder


def _images(size: int, count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(2))


def test_export_writes_a_timm_folder_timm_reloads_with_the_same_logits_and_onnx_with_the_fused_heads(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    runs, _ = trained
    result = invoke("export", runs / "student", "--out", tmp_path / "out", "--onnx")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(runs / "student")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == ckpt.model_name == "deit_tiny_distilled_patch16_224"
    assert config["num_classes"] == 3 and config["label_names"] == ["circle", "square", "star"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["mean"] == ckpt.data["mean"] and cfg["crop_pct"] == ckpt.data["crop_pct"]
    assert config["distill"]["checkpoint_sha256"] == ckpt.sha256 and config["distill"]["teacher"]["sha256"]
    model = build_model(ckpt)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    images = _images(16)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
        tokens = model.forward_features(images)
        fused = ((model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2).softmax(-1)  # the logit mean, timm's
    assert ckpt.meta["distillation"]["fusion"] == "logits"
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])  # a batch of 3: the batch axis is free
    assert got.shape == (3, 3) and torch.allclose(got, fused, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(got, reloaded(images).softmax(-1), atol=1e-5)  # ONNX and the timm folder: one model
    assert "largest probability difference" in result.output


def _timm_top1(folder, split_dir) -> float:
    """An exported timm folder's top-1 on an image folder's split, read as a timm user would: its own
    pretrained_cfg's transform and its own forward."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    names = json.loads((folder / "config.json").read_text())["label_names"]
    right = total = 0
    with torch.no_grad():
        for label, name in enumerate(names):
            for path in sorted((split_dir / name).iterdir()):
                right += int(model(transform(Image.open(path).convert("RGB"))[None]).argmax() == label)
                total += 1
    return round(100 * right / total, 3)


@pytest.mark.parametrize("fusion", ["logits", "softmax"])
def test_the_exported_timm_model_scores_what_was_recorded_for_a_token_student(trained, tmp_path, fusion):
    """One model, one accuracy: the recorded top-1, `distill evaluate` and the exported timm folder read with timm's
    own transform agree (the default fusion is timm's logit mean); a student fused by its probabilities says, on
    export, that timm's forward differs, and its ONNX keeps its rule."""
    runs, folder = trained
    if fusion == "softmax":
        made = invoke("student", "--workdir", runs, *TINY, *TINY_VIT, "--fusion", "softmax", "--name", "student-softmax")
        assert made.exit_code == 0, made.output
        assert "heads fused by the mean of their probabilities" in made.output
    run = runs / ("student" if fusion == "logits" else "student-softmax")
    ckpt = read_checkpoint(run)
    assert ckpt.meta["distillation"]["fusion"] == fusion
    evaluated = invoke("evaluate", run, "--num-workers", "0")
    assert evaluated.exit_code == 0 and f"{ckpt.meta['metrics']['top1']:.2f}" in evaluated.output
    exported = invoke("export", run, "--out", tmp_path / "out")
    assert exported.exit_code == 0, exported.output
    if fusion == "logits":
        assert "note:" not in exported.output
        assert _timm_top1(tmp_path / "out", folder / "test") == ckpt.meta["metrics"]["top1"]
    else:
        assert "note: this student fuses its heads by the mean of their probabilities" in exported.output


def test_export_refuses_a_file_as_target_and_leaves_it(trained, tmp_path):
    runs, _ = trained
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    result = invoke("export", runs / "teach", "--to", target)  # --to: the older spelling of --out, still taken
    assert result.exit_code == 2 and "is a file" in result.output and target.read_text() == "mine"
    both = invoke("export", runs / "teach", "--out", tmp_path / "a", "--to", tmp_path / "b")
    assert both.exit_code == 2 and "--to is the older spelling of --out" in both.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    nowhere = invoke("export", runs / "teach")
    assert nowhere.exit_code == 2 and "--out DIR" in nowhere.output


def test_predict_agrees_with_evaluate_on_a_folder(trained, tmp_path):
    runs, folder = trained
    evaluated = invoke("evaluate", runs / "student", "--num-workers", "0")
    assert evaluated.exit_code == 0, evaluated.output
    row = next(line for line in evaluated.output.splitlines() if "class + distillation (fused)" in line)
    top1 = float(row.split("│")[2])
    out = tmp_path / "predictions.csv"
    result = invoke("predict", runs / "student", folder / "test", "--top-k", "2", "--num-workers", "0", "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 18 and set(rows[0]) == {"path", "class_1", "probability_1", "class_2", "probability_2"}
    correct = sum(r["class_1"] == r["path"].split("/")[-2] for r in rows)
    assert 100 * correct / len(rows) == pytest.approx(top1, abs=0.01)
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)


def test_predict_flip_tta_json_and_unreadable_images(trained, tmp_path):
    runs, folder = trained
    images = sorted((folder / "test" / "star").glob("*.png"))[:2]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    plain = json.loads(invoke("predict", runs / "teach", *images, "--format", "json", "--top-k", "3",
                              "--num-workers", "0").output)
    flipped = json.loads(invoke("predict", runs / "teach", *images, "--format", "json", "--top-k", "3", "--tta", "flip",
                                "--num-workers", "0").output)
    assert [r["path"] for r in plain] == [str(p) for p in images]
    assert all(abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-4 for r in plain + flipped)
    assert plain != flipped  # the mirror image changes the probabilities
    refused = invoke("predict", runs / "teach", tmp_path / "broken.png", *images, "--num-workers", "0")
    assert refused.exit_code == 2 and f"Cannot read image {tmp_path / 'broken.png'}" in " ".join(refused.output.split())
    skipped = invoke("predict", runs / "teach", tmp_path / "broken.png", *images, "--num-workers", "0", "--skip-corrupt")
    assert skipped.exit_code == 0 and "skipped 1 unreadable image" in skipped.output
    assert len([line for line in skipped.output.splitlines() if ".png," in line]) == 2
    none = invoke("predict", runs / "teach", tmp_path / "nothing-*.png")
    assert none.exit_code == 2 and "no image file" in none.output


def test_the_teacher_reads_the_resolution_asked_for():
    from distill.teachers import FrozenTeacher

    seen = []
    probe = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    probe.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    norm = ((0.5,) * 3, (0.5,) * 3)
    FrozenTeacher(probe, norm, norm, img_size=24)(torch.ones(2, 3, 16, 16))
    FrozenTeacher(probe, norm, norm, img_size=None)(torch.ones(2, 3, 16, 16))
    assert seen == [(24, 24), (16, 16)]
    # Resizing is bicubic on the device: a constant image stays constant.
    upsampled = torch.nn.functional.interpolate(torch.ones(1, 3, 16, 16), size=(24, 24), mode="bicubic")
    assert torch.allclose(upsampled, torch.ones_like(upsampled), atol=1e-5)


def test_teacher_res_resolves_and_is_recorded(trained, tmp_path):
    from distill.weights.checkpoint import read_checkpoint
    from distill.teachers.frozen import teacher_resolution

    runs, _ = trained
    teacher = read_checkpoint(runs / "teach")
    assert [teacher_resolution(teacher, 32, mode) for mode in ("student", "teacher", "48")] == [32, 16, 48]
    result = invoke("student", "--workdir", runs, "--name", "student-at-24", "--teacher-res", "24", *TINY, *TINY_VIT)
    assert result.exit_code == 0, result.output
    assert read_checkpoint(runs / "student-at-24").meta["distillation"]["teacher_res"] == 24
    bad = invoke("student", "--workdir", runs, "--teacher-res", "huge", *TINY, *TINY_VIT)
    assert bad.exit_code == 2 and "--teacher-res must be student, teacher or a resolution" in bad.output


def test_a_student_starts_from_a_deit_without_the_token():
    """--init: the distillation token and head start as copies of the class token and head."""
    from distill.students import fit_deit_weights

    plain = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=48, patch_size=8, embed_dim=32,
                                depth=1, num_heads=2)
    fitted = fit_deit_weights(plain.state_dict(), student, keep_heads=True)
    student.load_state_dict(fitted)
    assert torch.equal(student.dist_token, plain.cls_token) and torch.equal(student.head_dist.weight, plain.head.weight)
    assert torch.equal(student.pos_embed[:, 0], plain.pos_embed[:, 0]) and torch.equal(student.pos_embed[:, 1],
                                                                                         plain.pos_embed[:, 0])
    assert student.pos_embed.shape[1] == 2 + 36  # a 6 x 6 grid resampled from 4 x 4
    assert torch.equal(student.blocks[0].attn.qkv.weight, plain.blocks[0].attn.qkv.weight)
    fresh = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2)
    other = fit_deit_weights(plain.state_dict(), fresh, keep_heads=False)
    assert torch.equal(other["head.weight"], fresh.state_dict()["head.weight"])  # other classes: new heads
