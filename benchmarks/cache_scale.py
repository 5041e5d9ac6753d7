"""The teacher cache at ImageNet scale: build and read rates on a generated dataset of 1,281,167 images, and the size and
time projected for 300 views.

Not part of the test suite. Fake images (one 8 x 8 picture for every entry) and a stand-in teacher (a linear layer to
1,000 classes): what is measured is the cache's own machinery, the index, the seeds, the loader, the shard files and
the reads, not a real teacher's forward pass, which a real build adds (it is the bulk of the work on a GPU).

1. write: every shard of --views views (top-10 of 1,000 classes, fp16 values and int32 classes) written with the
   cache's own write_shard: rows/s and bytes.
2. build: `fill_shards`, the cache's build, over --build-views views of the 1.28M entries (one loader for all the
   positions, --workers workers, batches of 1,024): positions/s. Before: a loader started for every shard of 4,096,
   whose start (its workers forked, the first batch) is measured and counted per view.
3. read: a student's reads of one view in a shuffled order through TeacherCache.target (memory-mapped shards) against
   the reader before (safetensors' safe_open kept for 8 shards at a time, a slice per sample).

    python benchmarks/cache_scale.py --views 30 --build-views 1 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from distill.data import Transformed, eval_transform
from distill.data.images import ImageSource
from distill.teachers.cache import TeacherCache, fill_shards, shard_count, shard_path, view_seeds, write_manifest, write_shard

IMAGES, CLASSES, TOP_K, SHARD = 1_281_167, 1000, 10, 4096  # IMAGES: --images


class FakeImages(ImageSource):
    """1.28M entries, every one the same small picture."""

    def __init__(self, count: int):
        self.count = count
        self.targets = np.arange(count, dtype=np.int64) % CLASSES
        self.picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Image.Image:
        return self.picture


class StandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class OneProcess:
    """What fill_shards asks of accelerate's Accelerator, for one CPU process."""
    process_index, num_processes, device = 0, 1, torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def write_all(root: Path, views: int) -> dict:
    shards = shard_count(views, IMAGES, SHARD)
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(SHARD, TOP_K, generator=generator).sort(dim=1, descending=True).values / TOP_K
    classes = torch.randint(0, CLASSES, (SHARD, TOP_K), generator=generator, dtype=torch.int32)
    started = time.perf_counter()
    for shard in range(shards):
        rows = min(SHARD, views * IMAGES - shard * SHARD)
        write_shard(root, shard, values[:rows], classes[:rows])
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in root.glob("shard-*.safetensors"))
    write_manifest(root, {"complete": True, "views": views, "images": IMAGES, "num_classes": CLASSES, "top_k": TOP_K,
                          "shard_size": SHARD, "seed": 0})
    return {"views": views, "shards": shards, "rows": views * IMAGES, "seconds": round(seconds, 1),
            "rows_per_s": round(views * IMAGES / seconds), "bytes": size, "bytes_per_row": round(size / (views * IMAGES), 2)}


def build(root: Path, views: int, workers: int) -> dict:
    dataset = Transformed(FakeImages(IMAGES), eval_transform(8, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))
    teacher = StandIn().eval()
    started = time.perf_counter()
    written = fill_shards(root, dataset, view_seeds(0, views, IMAGES), teacher, OneProcess(), batch_size=1024,
                          num_workers=workers, top_k=TOP_K, shard_size=SHARD)
    seconds = time.perf_counter() - started
    return {"views": views, "shards": written, "seconds": round(seconds, 1), "positions_per_s": round(views * IMAGES / seconds)}


def loader_start(workers: int, repeats: int = 10) -> float:
    """What the build before paid per shard: a fresh loader over 4,096 positions, its workers forked, its first batch."""
    from torch.utils.data import DataLoader

    dataset = Transformed(FakeImages(IMAGES), eval_transform(8, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))
    keys = [(i, i) for i in range(SHARD)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loader = DataLoader(_Keyed(dataset, keys), batch_size=128, num_workers=workers)
        next(iter(loader))
        times.append(time.perf_counter() - started)
        del loader
    return float(np.median(times))


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, position):
        return self.dataset[self.keys[position]][0]


@functools.lru_cache(maxsize=8)
def _old_open(path: str):
    return safe_open(path, framework="pt")


def old_top_k(root: Path, index: int, view: int):
    position = view * IMAGES + index
    handle = _old_open(str(shard_path(root, position // SHARD)))
    row = position % SHARD
    return handle.get_slice("topk_values")[row:row + 1][0], handle.get_slice("topk_indices")[row:row + 1][0]


def read(root: Path, samples: int, old_samples: int) -> dict:
    order = np.random.default_rng(0).permutation(IMAGES)
    cache = TeacherCache(root)
    started = time.perf_counter()
    for index in order[:samples]:
        cache.target(int(index), 0, "soft")
    now_rate = samples / (time.perf_counter() - started)
    started = time.perf_counter()
    for index in order[:samples]:
        cache.top_k_of(int(index), 1)
    rows_rate = samples / (time.perf_counter() - started)
    started = time.perf_counter()
    for index in order[:old_samples]:
        old_top_k(root, int(index), 2)
    old_rate = old_samples / (time.perf_counter() - started)
    return {"samples": samples, "target_per_s": round(now_rate), "top_k_rows_per_s": round(rows_rate),
            "before_samples": old_samples, "before_rows_per_s": round(old_rate)}


def main() -> None:
    global IMAGES
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "distill-cache-scale")
    parser.add_argument("--views", type=int, default=30)
    parser.add_argument("--build-views", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--old-samples", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache_scale.json")
    parser.add_argument("--images", type=int, default=IMAGES, help="entries of the generated dataset (smaller: a smoke run)")
    args = parser.parse_args()
    IMAGES = args.images
    torch.set_num_threads(1)
    shutil.rmtree(args.root, ignore_errors=True)
    written_root, built_root = args.root / "written", args.root / "built"
    written_root.mkdir(parents=True)
    built_root.mkdir(parents=True)
    result = {"images": IMAGES, "classes": CLASSES, "top_k": TOP_K, "shard_size": SHARD}
    result["write"] = write_all(written_root, args.views)
    print("write", result["write"], flush=True)
    result["read"] = read(written_root, args.samples, args.old_samples)
    print("read", result["read"], flush=True)
    result["build"] = build(built_root, args.build_views, args.workers)
    print("build", result["build"], flush=True)
    start = loader_start(args.workers)
    per_view = -(-IMAGES // SHARD)
    result["before_build"] = {"loader_start_s": round(start, 3), "shards_per_view": per_view,
                              "restart_s_per_view": round(start * per_view, 1)}
    print("before", result["before_build"], flush=True)
    rows_300 = 300 * IMAGES
    result["projection_300_views"] = {
        "bytes": round(rows_300 * result["write"]["bytes_per_row"]),
        "write_s": round(rows_300 / result["write"]["rows_per_s"]),
        "build_s_without_teacher": round(rows_300 / result["build"]["positions_per_s"]),
        "before_restarts_s": round(300 * start * per_view),
        "read_s_per_epoch_one_process": round(IMAGES / result["read"]["target_per_s"]),
        "before_read_s_per_epoch_one_process": round(IMAGES / result["read"]["before_rows_per_s"]),
        "stored_seeds_before_bytes": rows_300 * 8,
    }
    print("projection", result["projection_300_views"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
