"""Self-describing safetensors checkpoints, atomic writes, and finding a stage's parent.

A checkpoint's tensors are exactly timm's state dict, so `timm.create_model(name, **args)` plus
`load_state_dict(strict=True)` rebuilds it (`distill.weights.models.create` for a deit3_* student with the distillation
token, whose position embedding timm sizes wrongly; the keys are still timm's). Its header metadata (one JSON document under the key
"distill") says what it is, how it was built and from which parent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill import __version__
from distill.errors import DistillError
from distill.weights.naming import measured_at, model_label
from distill.console import listing

FORMAT = "distill-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "model-ema.safetensors"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A reader never sees a half-written file: an interrupted write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; the result gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes: stored in the header, it catches corrupted weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors + self-description atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "distill_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        "versions": _versions(),
        **meta,
        "weights_sha256": weights_digest(tensors),
    }
    header = {"format": FORMAT, "distill": json.dumps(meta, sort_keys=True, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        canonical_header(Path(tmp))
    return Path(path)


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place: safetensors writes them in hash-map order,
    so the same tensors and metadata would otherwise give files with different sha256s."""
    with open(path, "rb+") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > size:  # cannot happen for a compact header; leave the file as written
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))  # the format allows trailing spaces in the header


def _versions() -> dict[str, str]:
    import accelerate
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__}


@dataclass
class Checkpoint:
    """A distill checkpoint on disk: its path and its metadata (tensors are read on demand)."""

    path: Path
    meta: dict[str, Any]
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def written(self) -> bool:
        """On disk (a pipeline's plan stands in the checkpoints it has yet to write: see stages.common.Expected)."""
        return True

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "?")

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def model_name(self) -> str:
        return self.meta["model"]["name"]

    @property
    def model_args(self) -> dict[str, Any]:
        return dict(self.meta["model"]["args"])

    @property
    def data(self) -> dict[str, Any]:
        return self.meta.get("data", {})

    @property
    def classes(self) -> list[str]:
        return list(self.data.get("classes") or [])

    @property
    def img_size(self) -> int:
        return int(self.data["img_size"])

    @property
    def class_ids(self) -> list[str]:
        return list(self.data.get("class_ids") or [])

    def knows_classes(self, names: list[str]) -> bool:
        """`names` are this model's classes: by name, or by id (an ImageNet folder named by synsets)."""
        return list(names) == self.classes or (bool(self.class_ids) and list(names) == self.class_ids)

    def describe(self) -> str:
        return f"{self.path} ({self.stage}, {self.model_name}, {self.img_size} px, {len(self.classes)} classes)"

    def label(self) -> str:
        """What the model is, e.g. `DeiT-Ti/8 depth 2 @ 32px (deit_tiny_distilled…, 1.2M params)`."""
        return model_label(self.model_name, self.model_args, img_size=self.img_size, params=self.meta.get("params"))

    def accuracy(self) -> str:
        """`test top-1 92.78 (360 images, bf16 at 32 px)`, or an empty string when none is recorded."""
        metrics = self.meta.get("metrics") or {}
        if not isinstance(metrics.get("top1"), (int, float)):
            return ""
        return f"test top-1 {metrics['top1']:.2f} ({metrics.get('samples', '?')} images, {measured_at(metrics, self.meta)})"

    def lineage(self, inherited: str) -> dict[str, Any]:
        """What a child records about a checkpoint it comes from, and what it took from it: `weights` (it
        started from them), `teacher` (it learned from its outputs) or `recipe` (only its architecture and
        settings: a from-scratch baseline, or a teacher only measured against)."""
        record = {"sha256": self.sha256, "path": str(Path(self.path).resolve()), "stage": self.stage,
                  "kind": self.kind, "model": self.model_name, "label": self.label(), "inherited": inherited}
        if self.meta.get("source"):  # imported weights: where they came from
            record["source"] = self.meta["source"].get("source")
        return record

    def state_dict(self) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError) as error:
            raise DistillError(f"Checkpoint {self.path} cannot be read ({error}); it is truncated or corrupted.") from None
        expected = self.meta.get("weights_sha256")
        if expected and weights_digest(tensors) != expected:
            raise DistillError(f"Checkpoint {self.path} is corrupted: its weights do not match the digest in its header.")
        return tensors


def read_checkpoint(path: Path | str, expect_kind: str | None = None, role: str = "checkpoint") -> Checkpoint:
    """Open a checkpoint's header, refusing anything that is not a readable distill checkpoint."""
    path = Path(path)
    if not path.exists():
        raise DistillError(f"The {role} {path} does not exist.")
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.exists():
            raise DistillError(f"The {role} {path} is a folder without a {MODEL_FILE}.")
        path = candidate
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise DistillError(f"The {role} {path} is a pickle-based file; distill reads only safetensors checkpoints it wrote.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise DistillError(f"The {role} {path} is not a readable safetensors file ({error}); "
                           "it may be truncated or corrupted.") from None
    if header.get("format") != FORMAT or "distill" not in header:
        raise DistillError(f"The {role} {path} is a safetensors file but not a distill checkpoint (its header has no distill "
                           "metadata).")
    try:
        meta = json.loads(header["distill"])
    except json.JSONDecodeError:
        raise DistillError(f"The {role} {path} has corrupted distill metadata.") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DistillError(f"The {role} {path} was written by a newer distill (format {meta.get('format_version')}); upgrade distill.")
    for key in ("kind", "stage", "model", "data"):
        if key not in meta:
            raise DistillError(f"The {role} {path} lacks '{key}' in its metadata.")
    ckpt = Checkpoint(path=path, meta=meta)
    if expect_kind and ckpt.kind not in (expect_kind, "pretrained"):  # imported weights can play either role
        raise DistillError(f"The {role} {path} is a {ckpt.kind} checkpoint (from `distill {ckpt.stage}`), not a {expect_kind}.")
    return ckpt


def build_model(ckpt: Checkpoint, **overrides: Any) -> torch.nn.Module:
    """Rebuild the timm model a checkpoint describes and load its weights strictly (returned in eval mode)."""
    from distill.weights.models import create

    args = {**ckpt.model_args, **overrides}
    try:
        model = create(ckpt.model_name, **args)
    except Exception as error:  # an unknown name or argument from a foreign or future file
        raise DistillError(f"timm cannot build '{ckpt.model_name}' with {args} from {ckpt.path}: {error}") from None
    try:
        model.load_state_dict(ckpt.state_dict(), strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise DistillError(f"The weights in {ckpt.path} do not fit {ckpt.model_name}: {first}") from None
    return model.eval()


def stage_checkpoints(workdir: Path) -> list[Checkpoint]:
    """Every readable distill checkpoint directly under `workdir/*/`, oldest first."""
    found: list[Checkpoint] = []
    for candidate in sorted(Path(workdir).glob(f"*/{MODEL_FILE}")):
        try:
            found.append(read_checkpoint(candidate))
        except DistillError:
            continue
    return sorted(found, key=lambda c: c.meta.get("created", ""))


def find_by_sha256(workdir: Path, sha256: str) -> Checkpoint | None:
    """A checkpoint under `workdir` with this file hash (lineage survives a moved work folder)."""
    return next((c for c in stage_checkpoints(workdir) if c.sha256 == sha256), None)


def class_difference(known: list[str], classes: list[str], sides: tuple[str, str] = ("the first", "the second")) -> str:
    """How two class lists differ, in a few words: counts, names only one side has, or the first position
    that differs (for messages refusing a mismatch)."""
    data = set(classes)
    only_known = [c for c in known if c not in data]
    only_data = [c for c in classes if c not in set(known)]
    detail = f"{len(known)} classes vs {len(classes)}"
    if only_known or only_data:
        detail += (f"; only {sides[0]} has {listing(only_known, 4) or 'none'}, only {sides[1]} has "
                   f"{listing(only_data, 4) or 'none'}")
    else:
        detail += "; same names in a different order"
    first = next((i for i, (a, b) in enumerate(zip(known, classes)) if a != b), None)
    if first is not None and len(known) == len(classes):
        detail += f"; class {first} is '{known[first]}' for {sides[0]}, '{classes[first]}' for {sides[1]}"
    return detail
