"""Memory each forked loader worker copies of an image folder's file list: a list of Path objects (before) against
the numpy arrays FolderImages holds now, for a generated ImageNet-sized list (1,281,167 names like
train/n01440764/n01440764_10026.JPEG; no files are needed).

Not part of the test suite. Each worker is forked after the list is built, reads every entry in a random order (as
a shuffled epoch does: `where(i)` and the label), and reports its private dirty memory (/proc/self/smaps_rollup), the
pages it no longer shares with the parent; the parent's own size for the list is measured as RSS growth.

    python benchmarks/file_list_memory.py --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
from pathlib import Path

import numpy as np

from distill.data.images import FolderImages

CLASSES, PER_CLASS = 1000, 1281


def private_dirty_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


class PathList:
    """The list the folder source held before: one Path and one int object per image."""

    def __init__(self, root: Path, files: list[Path], targets: list[int]):
        self.root, self.files, self.targets = root, files, targets

    def where(self, index: int) -> str:
        return str(self.files[index])


def read_all(source: object, order: np.ndarray, out: mp.Queue) -> None:
    start = private_dirty_mb()
    for index in order:
        source.where(int(index))
        int(source.targets[int(index)])
    out.put(private_dirty_mb() - start)


def names(root: Path) -> tuple[list[Path], list[int]]:
    files = [root / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG" for c in range(CLASSES) for i in range(PER_CLASS)]
    return files, [c for c in range(CLASSES) for _ in range(PER_CLASS)]


def one_variant(kind: str, workers: int, out: mp.Queue) -> None:
    """In a process of its own: build the source (its temporary lists dropped), then fork the workers."""
    import gc

    root = Path("/data/imagenet/train")
    before = rss_mb()
    files, targets = names(root)
    source = PathList(root, files, targets) if kind == "before" else FolderImages(root, files, targets)
    del files, targets
    gc.collect()
    built = rss_mb() - before
    order = np.random.default_rng(0).permutation(len(source.targets))
    queue: mp.Queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=read_all, args=(source, order, queue)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    copied = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    out.put((len(source.targets), built, copied))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for kind, name in (("before", "list of Path (before)"), ("now", "numpy arrays (now)")):
        queue: mp.Queue = mp.get_context("fork").Queue()
        proc = mp.get_context("fork").Process(target=one_variant, args=(kind, args.workers, queue))
        proc.start()
        entries, built, copied = queue.get()
        proc.join()
        print(f"| {name} | {entries:,} | {built:.0f} | {', '.join(f'{mb:.0f}' for mb in copied)} |", flush=True)


if __name__ == "__main__":
    print("| file list | entries | held by the training process (MB) | copied into each worker (MB) |\n|---|---|---|---|")
    main()
