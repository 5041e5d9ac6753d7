"""The cost of the check every image folder gets before training, against decoding every image once.

Not part of the test suite. For each split of each folder given, times distill's check (header read and
ending found, `find_unreadable`) and a full decode of every image (what leaving out unreadable images
cost before), and prints a markdown table. CPU seconds count every thread; wall seconds depend on the
disk cache and on what else runs:

    python benchmarks/image_check.py /path/to/cifar10 /path/to/flowers
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from distill.data.sources import ImageSource, find_unreadable, load_folder


def timed(action: Callable[[], list], passes: int) -> tuple[float, float, int]:
    """Mean wall and CPU seconds of one pass, and what the pass found."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        found = action()
    return (time.perf_counter() - wall) / passes, (time.process_time() - cpu) / passes, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--passes", type=int, default=3, help="Passes over each split; the first warms the disk cache.")
    args = parser.parse_args()
    print("| folder | split | images | check: wall s / CPU s | full decode: wall s / CPU s | unreadable |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        splits = load_folder(folder)
        for name, source in (("train", splits.train), ("test", splits.test)):
            find_unreadable(source)  # warm the disk cache for both
            check = timed(lambda: find_unreadable(source), args.passes)
            decode = timed(lambda: [p for p in ImageSource.problems(source, list(range(len(source)))) if p], args.passes)
            print(f"| {folder} | {name} | {len(source)} | {check[0]:.2f} / {check[1]:.2f} | {decode[0]:.2f} / "
                  f"{decode[1]:.2f} | {check[2]} |", flush=True)


if __name__ == "__main__":
    main()
