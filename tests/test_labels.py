"""Everything distill prints is true and labelled: model names, lineage, skipped images, how an accuracy was
measured, which top-k means something, and help texts that are whole."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.checkpoint import read_checkpoint

FIVE = ["circle", "hex", "square", "star", "tri"]
TINY_LABEL = "DeiT-Ti/4 depth 1 width 32 heads 2 @ 16px (deit_tiny_distilled…, 15.3k params)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher trained in bf16 and a tiny distilled student, on five classes, once for this module."""
    root = tmp_path_factory.mktemp("labels")
    data = make_image_folder(root / "five", FIVE)
    runs = root / "runs"
    teacher = invoke("teach", "--data-dir", data, "--workdir", runs, *TINY, "--mixed-precision", "bf16")
    assert teacher.exit_code == 0, teacher.output
    student = invoke("student", "--workdir", runs, *TINY, *TINY_VIT)
    assert student.exit_code == 0, student.output
    return root, runs, teacher.output, student.output


def _row(output: str, key: str) -> str:
    """The value of one row of `distill info` (rows may wrap onto following lines)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("│").split("│")]
        if len(cells) == 2 and cells[0] == key:
            value = [cells[1]]
            for more in lines[i + 1:]:
                extra = [c.strip() for c in more.strip("│").split("│")]
                if len(extra) != 2 or extra[0]:
                    break
                value.append(extra[1])
            return " ".join(value)
    raise AssertionError(f"no row '{key}' in:\n{output}")


# 1. model names -----------------------------------------------------------------------------------
def test_model_labels_say_what_any_timm_model_is():
    from distill.weights.naming import model_label

    assert model_label("deit_tiny_distilled_patch16_224", {"num_classes": 1000}) == \
        "DeiT-Ti/16 @ 224px (deit_tiny_distilled_patch16_224, 5.91M params)"
    assert model_label("deit_tiny_distilled_patch16_224", {"num_classes": 10, "img_size": 32, "patch_size": 8,
                                                           "depth": 2}) == \
        "DeiT-Ti/8 depth 2 @ 32px (deit_tiny_distilled…, 935k params)"
    assert model_label("deit_small_patch16_224", {"num_classes": 10, "img_size": 64}) == \
        "DeiT-S/16 @ 64px (deit_small_patch16…, 21.6M params)"
    assert model_label("regnety_160", {"num_classes": 1000}, img_size=224) == \
        "RegNetY-16GF @ 224px (regnety_160, 83.6M params)"
    assert model_label("regnety_002", {"num_classes": 5}, img_size=32) == "RegNetY-200MF @ 32px (regnety_002, 2.8M params)"
    assert model_label("deit3_small_patch16_224", {"num_classes": 10, "img_size": 32, "patch_size": 8}) == \
        "DeiT III-S/8 @ 32px (deit3_small…, 21.4M params)"
    assert model_label("vit_base_patch16_224", {"num_classes": 10}) == "ViT-B/16 @ 224px (vit_base_patch16_224, 85.8M params)"
    # families it has no name for, and names timm cannot build, fall back to the name
    assert model_label("resnet18", {"num_classes": 10}, img_size=64) == "resnet18 @ 64px (11.2M params)"
    assert model_label("no_such_model_here", {"num_classes": 3}, img_size=16, params=1234) == \
        "no_such_model_here @ 16px (1.23k params)"
    # unknown number of classes (a hub dataset before it is loaded): no parameter count rather than a wrong one
    assert model_label("deit_base_distilled_patch16_224", {"num_classes": None, "img_size": 384}) == \
        "DeiT-B/16 @ 384px (deit_base_distilled_patch16…)"


def test_summaries_info_and_evaluate_show_the_model_as_it_is(trained):
    root, runs, teacher_output, student_output = trained
    assert "teach: RegNetY-200MF @ 16px (regnety_002, 2.8M params)" in teacher_output
    assert f"student: {TINY_LABEL}" in student_output
    assert "deit_tiny_distilled_patch16_224" not in student_output
    info = invoke("info", runs / "student")
    assert info.exit_code == 0, info.output
    assert _row(info.output, "model") == TINY_LABEL
    evaluated = invoke("evaluate", runs / "student", "--num-workers", "0")
    assert evaluated.exit_code == 0, evaluated.output
    assert TINY_LABEL in evaluated.output
    at_32 = invoke("evaluate", runs / "student", "--num-workers", "0", "--res", "32")
    assert "DeiT-Ti/4 depth 1 width 32 heads 2 @ 32px (deit_tiny_distilled…, 16.8k params)" in at_32.output


# 2. lineage ----------------------------------------------------------------------------------------
def test_lineage_says_what_was_inherited_and_a_from_scratch_run_has_no_parent(trained):
    root, runs, _, _ = trained
    target = make_image_folder(root / "target", ["apple", "pear"], seed=1)
    student = read_checkpoint(runs / "student")
    for name, flags in (("moved", []), ("scratch", ["--from-scratch"])):
        result = invoke("transfer", "--workdir", runs, "--data-dir", target, "--name", name, *TINY, *flags)
        assert result.exit_code == 0, result.output
    moved, scratch = read_checkpoint(runs / "moved"), read_checkpoint(runs / "scratch")
    assert scratch.meta["parent"] is None  # its weights never came from the student
    assert scratch.meta["architecture_from"]["sha256"] == student.sha256
    assert moved.meta["parent"]["sha256"] == student.sha256 and moved.meta["parent"]["inherited"] == "weights"
    assert scratch.meta["architecture_from"]["inherited"] == "recipe"
    assert student.meta["teacher"]["inherited"] == "teacher"

    moved_info, scratch_info = invoke("info", runs / "moved").output, invoke("info", runs / "scratch").output
    assert _row(moved_info, "weights").startswith(f"from student {TINY_LABEL}")
    weights = _row(scratch_info, "weights")
    assert weights.startswith("random initialisation; architecture copied from student") and "not used" in weights
    assert "full (from random weights)" in _row(scratch_info, "trained")
    assert "parent" not in scratch_info
    assert _row(invoke("info", runs / "student").output, "weights") == "random initialisation"


# 3. unreadable images --------------------------------------------------------------------------------
def test_every_unreadable_image_is_listed_at_once_and_skipped_ones_are_reported(tmp_path):
    data = make_image_folder(tmp_path / "data", FIVE)
    bad = [data / "train" / "circle" / "a.png", data / "train" / "hex" / "b.jpg", data / "train" / "star" / "c.png",
           data / "test" / "tri" / "d.png", data / "test" / "square" / "e.jpg"]
    bad[0].write_bytes(b"not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(jpeg, format="JPEG")
    bad[1].write_bytes(jpeg.getvalue()[:-40])  # truncated: its header reads, its end is missing
    bad[2].write_bytes(b"")
    bad[3].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad[4].write_bytes(jpeg.getvalue()[:200])
    refused = invoke("teach", "--data-dir", data, *TINY)
    assert refused.exit_code == 2, refused.output
    assert "5 images in" in refused.output and "--skip-corrupt" in refused.output
    assert all(str(path) in refused.output for path in bad), refused.output
    assert not Path("runs").exists()

    skipped = invoke("teach", "--data-dir", data, *TINY, "--skip-corrupt")
    assert skipped.exit_code == 0, skipped.output
    said = " ".join(skipped.output.split())
    assert "skipped 5 unreadable images (3 train, 2 test)" in said and str(bad[0]) in said
    ckpt = read_checkpoint("runs/teach")
    assert ckpt.data["skipped_corrupt"] == 5 and ckpt.data["test_size"] == 5 * 4  # the readable ones
    row = _row(invoke("info", "runs/teach").output, "skipped images")
    assert row.startswith("skipped 5 unreadable images (3 train, 2 test):") and "--skip-corrupt" in row
    assert invoke("evaluate", "runs/teach", "--num-workers", "0").exit_code == 0  # as trained: skipping


def test_the_scan_never_refuses_a_readable_image(tmp_path):
    from distill.data.sources import image_problem

    for fmt in ("JPEG", "PNG", "BMP", "GIF", "WEBP"):
        encoded = io.BytesIO()
        Image.new("RGB", (8, 8), "blue").save(encoded, format=fmt)
        assert image_problem(io.BytesIO(encoded.getvalue())) is None, fmt
        assert image_problem(io.BytesIO(encoded.getvalue() + b"\0" * 100)) is None, fmt  # trailing padding
        assert image_problem(io.BytesIO(encoded.getvalue()[: len(encoded.getvalue()) // 2])) is not None, fmt


# 4. a failed command leaves nothing it created -----------------------------------------------------------
def _corrupt_inside(path: Path) -> None:
    """A PNG whose header and ending are whole but whose compressed pixels are not: only decoding finds it."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 32):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


FAILURES = {
    "missing data folder": (["--data-dir", "missing"], "does not exist"),
    "unknown model": (["--model", "regnety_9999"], "timm has no model"),
    "a batch larger than the data": (["--batch-size", "64"], "fewer than one batch"),
    "a loss that becomes nan before anything is saved": (["--opt", "sgd", "--lr", "1e30", "--no-lr-scale", "--log-every",
                                                          "1", "--drop-path", "0"], "nothing had been saved yet"),
    "an image that only decoding finds broken": ([], "Cannot read image"),
    "the same, found by a loader worker": (["--num-workers", "1"], "Cannot read image"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failed_command_leaves_nothing_behind(tmp_path, folder, case):
    flags, said = FAILURES[case]
    if "decoding" in case or "the same" in case:
        _corrupt_inside(folder / "train" / "star" / "star_0.png")
    before = sorted(p for p in tmp_path.rglob("*"))
    result = invoke("teach", "--data-dir", folder, "--workdir", tmp_path / "new" / "runs", *TINY, *flags)
    assert result.exit_code != 0 and said in result.output, result.output
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_a_failed_overwrite_keeps_the_run_it_would_have_replaced(folder):
    assert invoke("teach", "--data-dir", folder, *TINY).exit_code == 0
    model = Path("runs/teach/model.safetensors")
    stamp = model.stat().st_mtime_ns
    failed = invoke("teach", "--data-dir", folder, *TINY, "--seed", "1", "--overwrite", "--batch-size", "64")
    assert failed.exit_code == 2 and "fewer than one batch" in failed.output
    assert model.stat().st_mtime_ns == stamp and read_checkpoint(model).meta["config"]["seed"] == 0


# 5. how an accuracy was measured -------------------------------------------------------------------------
def test_every_accuracy_says_its_precision_and_resolution(trained):
    root, runs, teacher_output, _ = trained
    assert "measured in bf16 at 16 px" in teacher_output
    teacher = read_checkpoint(runs / "teach")
    assert teacher.meta["metrics"]["precision"] == "bf16" and teacher.meta["metrics"]["img_size"] == 16
    info = invoke("info", runs / "teach").output
    assert _row(info, "test top-1").endswith("(20 images, bf16 at 16 px)")
    evaluated = invoke("evaluate", runs / "teach", "--num-workers", "0", "--res", "32")
    assert evaluated.exit_code == 0, evaluated.output
    said = " ".join(evaluated.output.split())
    assert "measured in fp32 at 32 px" in said
    assert f"recorded in the checkpoint at the end of training: test top-1 {teacher.meta['metrics']['top1']:.2f} " \
           "(20 images, bf16 at 16 px)" in said


# 7. help texts ------------------------------------------------------------------------------------------------
STYLE = re.compile(r"\[/?(bold|italic|dim|red|green|yellow|cyan|magenta)?\]")


def _commands() -> list[str]:
    from typer.main import get_command

    from distill.cli import app

    return [""] + sorted(get_command(app).commands)


@pytest.mark.parametrize("command", _commands(), ids=lambda name: name or "distill")
def test_every_help_text_is_a_whole_sentence_shown_whole(command):
    """Each description is there, a sentence, and printed in full: rich markup eats unescaped [brackets]."""
    from typer.main import get_command

    from distill.cli import app

    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    click_command = get_command(app)
    click_command = click_command.commands[command] if command else click_command
    texts = {"(the command)": click_command.help}
    texts.update({param.name: param.help for param in click_command.params if not getattr(param, "hidden", False)})
    for name, text in texts.items():
        assert text and text.strip(), f"{command} {name}: no description"
        intended = " ".join(STYLE.sub("", text).replace("\\[", "[").split())
        assert intended[0].isupper() or intended.startswith("timm "), f"{command} {name}: '{intended}'"
        assert intended.endswith("."), f"{command} {name}: '{intended}'"
        assert intended in shown, f"{command} {name}: '{intended}' is not shown whole"


# 8. top-k only where it means something ------------------------------------------------------------------------
def test_top5_is_measured_only_with_more_than_five_classes(trained):
    root, runs, teacher_output, student_output = trained
    assert "top-5" not in teacher_output and "top-5" not in student_output
    assert "top5" not in read_checkpoint(runs / "student").meta["metrics"]
    assert "top-5" not in invoke("info", runs / "student").output
    assert "top-5" not in invoke("evaluate", runs / "student", "--num-workers", "0").output

    import torch

    from distill.training.processes import make_accelerator
    from distill.training.evaluation import evaluate

    for classes in (5, 6):
        labels = torch.arange(12) % classes
        scores = torch.nn.functional.one_hot((labels + 1) % classes, classes).float()  # top-1 always wrong
        loader = [(scores, labels)]
        metrics = evaluate(torch.nn.Identity(), loader, make_accelerator("no"))
        assert metrics["top1"] == 0.0
        assert ("top5" in metrics) == (classes > 5)


# 9. distillation settings that apply -------------------------------------------------------------------------
def test_no_distillation_shows_no_distillation_settings(trained):
    root, runs, _, _ = trained
    result = invoke("student", "--workdir", runs, "--name", "plain", *TINY, *TINY_VIT, "--distillation", "none",
                    "--no-token", "--teacher", runs / "teach")
    assert result.exit_code == 0, result.output
    info = invoke("info", runs / "plain").output
    assert _row(info, "distillation") == "none"
    assert "measured against only, not distilled from" in _row(info, "teacher")
    assert _row(invoke("info", runs / "student").output, "distillation") == ("hard (alpha 0.5, distillation token, heads "
                                                                               "fused by their logit mean)")
