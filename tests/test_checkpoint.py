"""Checkpoints: timm round trip, self-description, atomic writes, and refusing bad files."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from distill.weights.checkpoint import atomic_path, build_model, read_checkpoint, save_checkpoint
from distill.errors import DistillError


def _save_regnet(path, **meta):
    model = timm.create_model("regnety_002", num_classes=3)
    base = {"kind": "teacher", "stage": "teach", "model": {"name": "regnety_002", "args": {"num_classes": 3}},
            "data": {"classes": ["a", "b", "c"], "img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}}
    save_checkpoint(path, model.state_dict(), {**base, **meta})
    return model


def test_round_trip_through_timm_with_strict_loading(tmp_path):
    model = _save_regnet(tmp_path / "m.safetensors")
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    rebuilt = build_model(ckpt)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    # plain timm + safetensors, no distill code, also loads it strictly
    from safetensors.torch import load_file

    plain = timm.create_model(ckpt.model_name, **ckpt.model_args)
    plain.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)


def test_metadata_describes_the_file(tmp_path):
    _save_regnet(tmp_path / "m.safetensors", parent=None, metrics={"top1": 50.0})
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    meta = ckpt.meta
    assert meta["format"] == "distill-checkpoint" and meta["distill_version"]
    assert {"torch", "timm", "accelerate"} <= set(meta["versions"])
    assert meta["created"] and meta["weights_sha256"]
    assert ckpt.classes == ["a", "b", "c"] and ckpt.img_size == 16 and ckpt.kind == "teacher"
    assert len(ckpt.sha256) == 64


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_missing_truncated_corrupted_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    _save_regnet(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match="truncated or corrupted"):
        read_checkpoint(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(DistillError, match="not a readable safetensors"):
        read_checkpoint(tmp_path / "garbage.safetensors")
    # flip one byte inside the weights: the header still parses, the digest catches it
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(DistillError, match="corrupted"):
        build_model(read_checkpoint(tmp_path / "flipped.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DistillError, match="not a distill checkpoint"):
        read_checkpoint(tmp_path / "foreign.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(DistillError, match="pickle"):
        read_checkpoint(tmp_path / "weights.pth")


def test_wrong_kind_is_refused(tmp_path):
    _save_regnet(tmp_path / "m.safetensors")
    with pytest.raises(DistillError, match="teacher checkpoint .* not a student"):
        read_checkpoint(tmp_path / "m.safetensors", expect_kind="student")


def test_header_is_one_json_document(tmp_path):
    _save_regnet(tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert json.loads(header["distill"])["model"]["name"] == "regnety_002"
