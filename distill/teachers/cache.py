"""A teacher's predictions on K augmented views of every training image, stored once and replayed exactly.

FKD (Shen and Xing, 2022): run the teacher once over K augmented views of each training image, keep its top-k
probabilities, and train students with no teacher forward at all. A view is replayed exactly because distill's
augmentation is a pure function of a seed: view v of image i is the training transform seeded by seed(v, i), derived
from the cache's seed, the view and the image (`ViewSeeds`), never stored (for ImageNet's 300 views a stored table
would be 1.5 GB read by every process).

    <folder>/cache.json                what the cache is (teacher, data, augmentation, views, top-k) and whether complete
    <folder>/shard-00000.safetensors   for positions p = v * images + i in one block: top-k probabilities (fp16) and
                                       their classes (int32); each shard written atomically, so a killed run resumes

Built by one loader per process over every position it writes (process r writes shards r, r + world, ...), so its
workers start once. Read through memory maps of the shards: a sample is one row of one mapped file, and a view's
shards stay mapped while an epoch reads it in any order. Caches made before held a seeds.safetensors with the same
seeds; it is no longer read.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import mmap
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distill.weights.checkpoint import atomic_path, atomic_write_bytes
from distill.errors import DistillError
from distill.data.loaders import start_worker
from distill.speed import idle_workers

MANIFEST = "cache.json"
FORMAT = "distill-teacher-cache"


def targets_digest(labels: list[int]) -> str:
    """What ties a cache to the exact training split it was made on: the labels in order."""
    return hashlib.sha256(",".join(map(str, labels)).encode()).hexdigest()


class ViewSeeds:
    """The augmentation seed of image i in view v, as seeds[v][i] (a [views, images] table, computed a view at a
    time: numpy's SeedSequence of (cache seed, view), 0.14 s for ImageNet's 1.28M images; the last view is kept)."""

    def __init__(self, cache_seed: int, views: int, images: int):
        self.cache_seed, self.views, self.images = cache_seed, views, images
        self._kept: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.uint32))  # (view, its row), replaced as one

    def __len__(self) -> int:
        return self.views

    @property
    def shape(self) -> tuple[int, int]:
        return self.views, self.images

    def __getitem__(self, view: int) -> np.ndarray:
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} of {self.views}")
        kept_view, row = self._kept
        if view != kept_view:
            row = np.random.SeedSequence([self.cache_seed, view, 1 << 30]).generate_state(self.images, dtype=np.uint32)
            self._kept = (view, row)
        return row

    def __getstate__(self) -> dict[str, Any]:  # into loader workers without the row
        return {"cache_seed": self.cache_seed, "views": self.views, "images": self.images}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def view_seeds(cache_seed: int, views: int, images: int) -> ViewSeeds:
    return ViewSeeds(cache_seed, views, images)


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


def write_shard(root: Path, shard: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """One shard's rows: the top-k probabilities and their classes, written atomically."""
    with atomic_path(shard_path(root, shard)) as tmp:
        save_file({"topk_values": values.half().contiguous(), "topk_indices": indices.int().contiguous()}, str(tmp))


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True).encode())


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
        # every shard of the view an epoch reads stays mapped (a shuffled epoch reads them in any order), within a
        # bound on open files; each mapping is one file descriptor
        self.open_limit = min(MAX_MAPPED, -(-self.images // self.shard_size) + 2)
        self._mapped: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # a loader worker maps the shards it reads itself
        return {**self.__dict__, "_mapped": OrderedDict()}

    def seeds(self) -> ViewSeeds:
        return ViewSeeds(int(self.manifest.get("seed", 0)), self.views, self.images)

    def top_k_of(self, index: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k probabilities and classes on view `view` of image `index`: one row of one mapped shard."""
        position = view * self.images + index
        shard, row = divmod(position, self.shard_size)
        values, classes = self._shard(shard)
        return torch.from_numpy(values[row].copy()), torch.from_numpy(classes[row].copy())

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._mapped.get(shard)
        if arrays is None:
            arrays = self._mapped[shard] = map_shard(shard_path(self.root, shard))
            if len(self._mapped) > self.open_limit:
                self._mapped.popitem(last=False)
        else:
            self._mapped.move_to_end(shard)
        return arrays

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


MAX_MAPPED = 512  # shards mapped at once by one reading process (one file descriptor each)
DTYPES = {"F16": np.dtype("<f2"), "I32": np.dtype("<i4")}  # safetensors stores little-endian


def map_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shard's top-k values and classes as arrays over one read-only memory map of its file (safetensors' layout:
    an 8-byte header length, a JSON header of dtypes, shapes and offsets, then the raw tensors)."""
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        (length,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8:8 + length])
        arrays = []
        for name in ("topk_values", "topk_indices"):
            entry = header[name]
            start, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            array = np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + length + start)
            arrays.append(array.reshape(entry["shape"]))
        return arrays[0], arrays[1]
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise DistillError(f"The teacher cache shard {path} cannot be read ({error}); run `distill cache-teacher` again.") from None


def fill_shards(root: Path, dataset: Any, seeds: ViewSeeds, teacher: torch.nn.Module, accelerator: Any, *,
                batch_size: int, num_workers: int, top_k: int, shard_size: int, progress: Callable[[int], Any] | None = None
                ) -> int:
    """Run the teacher over every view of every image; each process writes every world-th shard, skipping those already
    written (a killed run resumes), through one loader over all the positions it has left. Returns the shards written."""
    from torch.utils.data import DataLoader

    views, images = seeds.shape
    mine = range(accelerator.process_index, shard_count(views, images, shard_size), accelerator.num_processes)
    pending = []
    for shard in mine:
        if shard_done(root, shard):
            if progress is not None:
                progress(shard)
        else:
            pending.append(shard)
    if not pending:
        return 0
    positions = _Positions(dataset, seeds, pending, shard_size)
    # batches cut at shard boundaries: a shard's batches are the same whichever shards are pending (a resume, another
    # number of processes), so its bytes are too (a kernel may sum another batch size in another order)
    batches = _ShardBatches(positions, batch_size)
    loader = DataLoader(positions, batch_sampler=batches, num_workers=num_workers, generator=torch.Generator(),
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=False,
                        worker_init_fn=functools.partial(start_worker, idle=idle_workers(None, accelerator.device.type),
                                                         parent=os.getpid()))
    shards = iter(pending)
    shard, values, classes, rows = next(shards), [], [], 0
    with torch.no_grad():
        for batch in loader:
            if shard < 0:
                raise RuntimeError("the teacher cache's loader gave more rows than its shards hold")
            with accelerator.autocast():
                logits = teacher(dataset.finish(batch, accelerator.device))
            top = logits.float().softmax(dim=1).topk(min(top_k, logits.shape[1]), dim=1)
            values.append(top.values.cpu())
            classes.append(top.indices.cpu())
            rows += len(values[-1])
            if rows == positions.size(shard):
                write_shard(root, shard, torch.cat(values), torch.cat(classes))
                if progress is not None:
                    progress(shard)
                shard, values, classes, rows = next(shards, -1), [], [], 0
    if shard >= 0:
        raise RuntimeError(f"the teacher cache's loader stopped before shard {shard} was complete")
    return len(pending)


class _Positions(torch.utils.data.Dataset):
    """The images of the given shards' positions, in order: position p is view p // images of image p % images,
    transformed with its view's seed. Only the image is returned (the teacher's input)."""

    def __init__(self, dataset: Any, seeds: ViewSeeds, shards: list[int], shard_size: int):
        self.dataset, self.seeds, self.shards, self.shard_size = dataset, seeds, shards, shard_size
        self.images = seeds.shape[1]
        self.total = seeds.shape[0] * self.images
        self.starts = [0]
        for shard in shards:
            self.starts.append(self.starts[-1] + self.size(shard))

    def size(self, shard: int) -> int:
        return min(self.shard_size, self.total - shard * self.shard_size)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, k: int) -> Any:
        which = bisect.bisect_right(self.starts, k) - 1  # the pending shard position k falls in
        position = self.shards[which] * self.shard_size + (k - self.starts[which])
        view, index = divmod(position, self.images)
        return self.dataset[(index, int(self.seeds[view][index]))][0]


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of `_Positions` indices, in order, never across a shard: each shard's rows in batches of `batch_size`,
    its last batch shorter."""

    def __init__(self, positions: _Positions, batch_size: int):
        self.starts, self.batch_size = positions.starts, batch_size

    def __iter__(self) -> Any:
        for start, end in zip(self.starts, self.starts[1:]):
            for first in range(start, end, self.batch_size):
                yield list(range(first, min(first + self.batch_size, end)))

    def __len__(self) -> int:
        return sum(-(-(end - start) // self.batch_size) for start, end in zip(self.starts, self.starts[1:]))
