"""A teacher's predictions on K augmented views of every training image, stored once and replayed exactly.

FKD (Shen and Xing, 2022): run the teacher once over K augmented views of each training image, keep its top-k
probabilities, and train students with no teacher forward at all. A view is replayed exactly because distill's
augmentation is a pure function of a seed: view v of image i is the training transform seeded by seeds[v, i].

    <folder>/cache.json                what the cache is (teacher, data, augmentation, views, top-k) and whether complete
    <folder>/seeds.safetensors         seeds [views, images] (uint32 as int64)
    <folder>/shard-00000.safetensors   for positions p = v * images + i in one block: top-k probabilities (fp16) and
                                       their classes (int32); each shard written atomically, so a killed run resumes
"""

from __future__ import annotations

import functools
import os
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill.weights.checkpoint import atomic_path, atomic_write_bytes
from distill.errors import DistillError
from distill.data.loaders import start_worker
from distill.speed import idle_workers

MANIFEST, SEEDS = "cache.json", "seeds.safetensors"
FORMAT = "distill-teacher-cache"


def targets_digest(labels: list[int]) -> str:
    """What ties a cache to the exact training split it was made on: the labels in order."""
    return hashlib.sha256(",".join(map(str, labels)).encode()).hexdigest()


def view_seeds(cache_seed: int, views: int, images: int) -> np.ndarray:
    """The augmentation seed of every view of every image: [views, images]."""
    return np.stack([np.random.SeedSequence([cache_seed, view, 1 << 30]).generate_state(images, dtype=np.uint32)
                     for view in range(views)])


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard:05d}.safetensors"


def shard_count(views: int, images: int, shard_size: int) -> int:
    return -(-(views * images) // shard_size)


def shard_done(root: Path, shard: int) -> bool:
    """A shard is done when its file is a whole safetensors file (writes are atomic, so any file present is)."""
    path = shard_path(root, shard)
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {"topk_values", "topk_indices"} <= set(handle.keys())
    except (SafetensorError, OSError):
        return False


def write_shard(root: Path, shard: int, probabilities: torch.Tensor, top_k: int) -> None:
    values, indices = probabilities.float().topk(min(top_k, probabilities.shape[1]), dim=1)
    with atomic_path(shard_path(root, shard)) as tmp:
        save_file({"topk_values": values.half().contiguous(), "topk_indices": indices.int().contiguous()}, str(tmp))


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True).encode())


def write_seeds(root: Path, seeds: np.ndarray) -> None:
    with atomic_path(Path(root) / SEEDS) as tmp:
        save_file({"seeds": torch.from_numpy(seeds.astype(np.int64))}, str(tmp))


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


class TeacherCache:
    """A finished cache: its manifest, its seeds, and the teacher's targets for any (image, view)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise DistillError(f"{self.root} is not a teacher cache (no {MANIFEST}); make one with `distill cache-teacher`.")
        if not manifest.get("complete"):
            raise DistillError(f"The teacher cache {self.root} is not finished; run the same `distill cache-teacher` command "
                               "again to complete it.")
        self.manifest = manifest
        self.views, self.images = int(manifest["views"]), int(manifest["images"])
        self.num_classes, self.top_k = int(manifest["num_classes"]), int(manifest["top_k"])
        self.shard_size = int(manifest["shard_size"])

    def seeds(self) -> np.ndarray:
        try:
            return load_file(str(self.root / SEEDS))["seeds"].numpy().astype(np.uint32)
        except (SafetensorError, OSError, KeyError) as error:
            raise DistillError(f"The teacher cache {self.root} is damaged ({SEEDS}: {error}).") from None

    def top_k_of(self, index: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k probabilities and classes on view `view` of image `index`."""
        position = view * self.images + index
        handle = _open_shard(str(shard_path(self.root, position // self.shard_size)))
        row = position % self.shard_size
        return handle.get_slice("topk_values")[row:row + 1][0], handle.get_slice("topk_indices")[row:row + 1][0]

    def target(self, index: int, view: int, kind: str) -> torch.Tensor:
        """A dense target over the classes: the probabilities (top-k kept, the rest of the mass spread evenly over
        the other classes) for soft distillation, the one-hot top class for hard; mixed later like the labels."""
        values, classes = self.top_k_of(index, view)
        dense = torch.zeros(self.num_classes)
        if kind == "hard":
            dense[int(classes[0])] = 1.0
            return dense
        rest = max(0.0, 1.0 - float(values.float().sum()))
        if self.num_classes > len(classes):
            dense.fill_(rest / (self.num_classes - len(classes)))
        dense[classes.long()] = values.float()
        return dense


@lru_cache(maxsize=8)
def _open_shard(path: str) -> Any:
    """Shards stay open (memory-mapped) in each process that reads them, a few at a time."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise DistillError(f"The teacher cache shard {path} cannot be read ({error}); run `distill cache-teacher` again.") from None


def fill_shards(root: Path, dataset: Any, seeds: np.ndarray, teacher: torch.nn.Module, accelerator: Any, *,
                batch_size: int, num_workers: int, top_k: int, shard_size: int, progress: Any = None) -> int:
    """Run the teacher over every view of every image, shard by shard; shards already written are skipped, so
    a killed run resumes. Each process writes every world-th shard. Returns the number of shards written."""
    from torch.utils.data import DataLoader

    views, images = seeds.shape
    written = 0
    for shard in range(accelerator.process_index, shard_count(views, images, shard_size), accelerator.num_processes):
        if shard_done(root, shard):
            if progress is not None:
                progress(shard)
            continue
        positions = range(shard * shard_size, min((shard + 1) * shard_size, views * images))
        keys = [(p % images, int(seeds[p // images, p % images])) for p in positions]
        loader = DataLoader(_Keyed(dataset, keys), batch_size=batch_size, num_workers=num_workers,
                            generator=torch.Generator(),
                            worker_init_fn=functools.partial(start_worker, idle=idle_workers(None, accelerator.device.type),
                                                           parent=os.getpid()))
        chunks = []
        with torch.no_grad():
            for batch, _ in loader:
                with accelerator.autocast():
                    chunks.append(teacher(dataset.finish(batch, accelerator.device)).float().softmax(dim=1).cpu())
        write_shard(root, shard, torch.cat(chunks), top_k)
        written += 1
        if progress is not None:
            progress(shard)
    return written


class _Keyed(torch.utils.data.Dataset):
    """A dataset read at given (index, seed) keys, in order."""

    def __init__(self, dataset: Any, keys: list[tuple[int, int]]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, position: int) -> Any:
        return self.dataset[self.keys[position]]
