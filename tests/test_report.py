"""`distill report`: one HTML page with each plot and table, PNGs beside it, and no number that is not in the
run files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import TINY, TINY_VIT, invoke, make_image_folder
from distill.weights.naming import count

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "data", ["circle", "square", "star"])
    target = make_image_folder(root / "target", ["apple", "pear"], seed=1)
    runs = root / "runs"
    for command in (["teach", "--data-dir", data, *TINY, "--epochs", "2"],
                    ["student", *TINY, *TINY_VIT, "--epochs", "2"],
                    ["finetune", "--res", "24", *TINY[:-4], *TINY[-2:], "--teacher-epochs", "1"],
                    ["transfer", "--data-dir", target, *TINY],
                    ["student", *TINY, "--model", "resnet10t", "--name", "student-resnet"]):  # a convnet student too
        result = invoke(*command, "--workdir", runs)
        assert result.exit_code == 0, result.output
    return runs


def numbers_in_run_files(runs: Path) -> set[str]:
    """Every number the run files hold, written every way the report writes numbers, and every number inside
    their strings (paths, names, classes)."""
    from distill.weights.checkpoint import stage_checkpoints

    found: set[str] = set()

    def walk(value):
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            found.update({str(value), f"{value:.2f}", f"{value * 100:.2f}", count(value).rstrip("kMB")})
        elif isinstance(value, str):
            found.update(re.findall(r"\d+(?:\.\d+)?", value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for ckpt in stage_checkpoints(runs):
        walk(ckpt.meta)
        walk(str(ckpt.path))
        metrics = ckpt.path.parent / "metrics.jsonl"
        if metrics.exists():
            walk([json.loads(line) for line in metrics.read_text().splitlines()])
    return found


def test_the_page_holds_every_plot_and_table_and_only_numbers_from_the_run_files(workdir):
    result = invoke("report", workdir)
    assert result.exit_code == 0, result.output
    page = (workdir / "report" / "index.html").read_text()
    for section in ("summary", "curves", "lineage", "accuracy", "agreement", "per-class", "fixres"):
        assert f"id='{section}'" in page
    images = re.findall(r"<img src='([^']+)'", page)
    names = {p.parent.name for p in workdir.glob("*/model.safetensors")}
    assert {f"curves-{name}.png" for name in names} <= set(images)
    assert {"lineage.png", "accuracy.png"} <= set(images)
    for image in images:  # beside the page, real PNGs; nothing fetched from elsewhere
        assert (workdir / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page and "<script" not in page
    # The tables: teacher agreement of the student's heads, FixRes before/after of the teacher and the fine-tune,
    # the lineage with what each run took, the per-class rows of every run.
    agreement = page.split("id='agreement'")[1].split("<h2")[0]
    assert all(f"<td>{head}</td>" in agreement for head in ("fused", "cls", "dist"))
    fixres = page.split("id='fixres'")[1].split("<h2")[0]
    assert "<td>finetune</td>" in fixres and any(f"<td>{n}</td>" in fixres for n in names if n.startswith("teach-fixres"))
    lineage = page.split("id='lineage'")[1].split("<h2")[0]
    assert "<td>teach</td><td>student</td><td>teacher</td>" in lineage
    assert "<td>student</td><td>finetune</td><td>weights</td>" in lineage
    assert page.split("id='per-class'")[1].count("<td>transfer-target</td>") == 1
    assert "<td>teach</td><td>student-resnet</td><td>teacher</td>" in lineage  # a convnet student beside the DeiTs
    summary = page.split("id='summary'")[1].split("<h2")[0]
    assert "<td>student-resnet</td><td>student</td><td>resnet10t @ 16px (4.92M params)</td>" in summary, summary

    visible = re.sub(r"<style>.*?</style>|<span class='ref'>.*?</span>|<[^>]+>", " ", page, flags=re.S)
    allowed = numbers_in_run_files(workdir)
    strays = [n for n in re.findall(r"\d+(?:\.\d+)?", visible) if n not in allowed]
    assert not strays, f"numbers on the page that the run files do not hold: {strays[:10]}"


def test_a_folder_without_runs_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("report", tmp_path / "empty")
    assert result.exit_code == 2 and "holds no finished run" in result.output
    assert invoke("report", tmp_path / "missing").exit_code == 2
