"""Where images come from: the embedded digits, a local image folder, or a Hugging Face dataset.

Every source gives the same thing: a train and a test split of (PIL RGB image, class index),
the class names, and a description recorded in checkpoints.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from distill.data.hub import ALIASES, HubAlias, HubImages, load_hub  # noqa: F401  (the hub's sources, read from here)
from distill.data.images import (IMAGE_EXTENSIONS, ArrayImages, DataSplits, FolderImages, ImageSource,  # noqa: F401
                                 SubsetSource, image_problem)
from distill.errors import DistillError
from distill.console import listing

DIGITS_SIZE = 32  # the 8x8 digits are upsampled once, so crops and RandAugment act on a real image
SCAN_BLOCK, SCAN_THREADS = 512, 8  # images checked per task, and threads checking them
SHOWN_SKIPPED = 5  # paths of skipped images shown (and recorded) beside their count


def load_digits() -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes), upsampled to 32 px RGB.

    The split is fixed: stratified, 20 % test, random_state=0, i.e. 1,437 train / 360 test.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    pixels = (bunch.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    upsampled = np.stack([np.asarray(Image.fromarray(p).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)) for p in pixels])
    index = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(index, test_size=0.2, random_state=0, stratify=bunch.target)
    classes = [str(c) for c in bunch.target_names]
    return DataSplits(
        train=ArrayImages(upsampled[train_idx], bunch.target[train_idx]),
        test=ArrayImages(upsampled[test_idx], bunch.target[test_idx]),
        classes=classes,
        info={"dataset": "digits", "source": "sklearn.datasets.load_digits, upsampled to 32 px; "
              "stratified 80/20 split, random_state=0"},
    )


def _scan_folder(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for name in classes:
        found = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        files.append(found)
    return classes, files


def load_folder(root: Path) -> DataSplits:
    """A local image folder: root/train/<class>/* and root/test/<class>/* (or val/, validation/)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DistillError(f"Data folder {root} does not exist.")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DistillError(f"Data folder {root} has no train/ sub-folder (expected train/<class>/<image> and test/<class>/<image>).")
    test_dir = next((root / n for n in ("test", "val", "validation") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DistillError(f"Data folder {root} has no test/ or val/ sub-folder.")
    classes, train_files = _scan_folder(train_dir)
    if not classes or not any(train_files):
        raise DistillError(f"The training split {train_dir} is empty: it needs one sub-folder of images per class.")
    empty = [c for c, f in zip(classes, train_files) if not f]
    if empty:
        raise DistillError(f"Class folder {train_dir / empty[0]} has no images.")
    test_classes, test_files = _scan_folder(test_dir)
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DistillError(f"The test split {test_dir} has classes the training split lacks: {listing(unknown, 5)}.")
    if not any(test_files):
        raise DistillError(f"The test split {test_dir} is empty.")
    index = {c: i for i, c in enumerate(classes)}

    def flatten(names: list[str], groups: list[list[Path]]) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for name, group in zip(names, groups):
            paths += group
            labels += [index[name]] * len(group)
        return paths, labels

    train = FolderImages(train_dir, *flatten(classes, train_files))
    test = FolderImages(test_dir, *flatten(test_classes, test_files))
    return DataSplits(train, test, classes, {"dataset": "folder", "data_dir": str(root.resolve())})


@dataclass(frozen=True)
class Share:
    """This process's part of work that several processes share (every `world`-th item from `rank` on), and how
    their findings are put together: `gather` turns each process's list into all of them, concatenated (a
    collective, reached by every process after the same amount of work, so none waits long in it)."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list], list] | None = None


def find_unreadable(source: ImageSource, share: Share = Share()) -> list[tuple[int, str]]:
    """(index, reason) of every image of a split that cannot be read, by the quick header check, in blocks
    spread over a few threads (the work is mostly waiting for files); with several processes each checks its share
    and all learn every finding."""
    mine = list(range(share.rank, len(source), share.world))
    blocks = [mine[start:start + SCAN_BLOCK] for start in range(0, len(mine), SCAN_BLOCK)]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        results = pool.map(source.problems, blocks)
        found = [(index, problem) for block, problems in zip(blocks, results)
                 for index, problem in zip(block, problems) if problem is not None]
    if share.world > 1 and share.gather is not None:
        found = sorted((index, problem) for index, problem in share.gather(found))
    return found


def check_readable(splits: DataSplits, skip: bool, share: Share = Share()) -> None:
    """List every unreadable image at once, before any training: refuse them, or (--skip-corrupt) leave them out
    and record how many, and which."""
    bad = {"train": find_unreadable(splits.train, share), "test": find_unreadable(splits.test, share)}
    named = [(getattr(splits, split).where(index), reason) for split, found in bad.items() for index, reason in found]
    if not named:
        return
    if not skip:
        them = "it" if len(named) == 1 else "them"
        where = splits.info.get("data_dir") or splits.info.get("dataset") or "the dataset"
        raise DistillError(f"{len(named)} image{'s' if len(named) > 1 else ''} in {where} cannot be read; remove or replace "
                           f"{them}, or pass --skip-corrupt to train without {them}:\n"
                           + "\n".join(f"  {path}: {reason}" for path, reason in named))
    for split, found in bad.items():
        source = getattr(splits, split)
        unreadable = {index for index, _ in found}
        setattr(splits, split, source.subset([i for i in range(len(source)) if i not in unreadable]))
    splits.info.update(skipped_corrupt=len(named), skipped_train=len(bad["train"]), skipped_test=len(bad["test"]),
                       skipped_examples=[path for path, _ in named[:SHOWN_SKIPPED]])


def describe_skipped(info: dict[str, Any]) -> str | None:
    """`skipped 3 unreadable images (2 train, 1 test): a.png, b.png, c.png`, from a data record."""
    count = info.get("skipped_corrupt")
    if not count:
        return None
    split = (f" ({info['skipped_train']} train, {info['skipped_test']} test)" if "skipped_train" in info else "")
    shown = info.get("skipped_examples") or []
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return f"skipped {count} unreadable image{'s' if count > 1 else ''}{split}: {', '.join(shown)}{more}"


def balanced_subset(source: ImageSource, size: int, num_classes: int) -> ImageSource:
    """A fixed class-balanced subset (independent of the run seed, so every run sees the same images)."""
    if size >= len(source):
        return source
    rng = np.random.default_rng(0)
    targets = np.asarray(source.targets)
    per_class = [rng.permutation(np.flatnonzero(targets == c)).tolist() for c in range(num_classes)]
    chosen: list[int] = []
    while len(chosen) < size:
        for group in per_class:
            if group and len(chosen) < size:
                chosen.append(group.pop())
    return source.subset(sorted(chosen))


def keep_classes(splits: DataSplits, names: list[str]) -> DataSplits:
    """Restrict both splits to some classes, renumbered in the dataset's own order."""
    unknown = [n for n in names if n not in splits.classes]
    if unknown:
        raise DistillError(f"Class '{unknown[0]}' is not in this dataset (its classes: {listing(splits.classes, 12)}).")
    kept = [i for i, c in enumerate(splits.classes) if c in set(names)]
    relabel = {old: new for new, old in enumerate(kept)}

    def restrict(source: ImageSource) -> ImageSource:
        return source.subset([i for i, t in enumerate(source.targets) if t in relabel], relabel)

    splits = DataSplits(restrict(splits.train), restrict(splits.test), [splits.classes[i] for i in kept],
                        {**splits.info, "kept_classes": len(kept)})
    if len(splits.test) == 0:
        raise DistillError("The test split has no images of the chosen classes.")
    return splits


def open_dataset(dataset: str | None, data_dir: Path | None, *, skip_corrupt: bool = False,
                 train_subset: int | None = None, classes: list[str] | None = None, share: Share = Share()) -> DataSplits:
    """The one entry point every stage uses. Several processes each open the data at once (a hub dataset is
    downloaded and prepared once, the others waiting on datasets' file lock, not in a collective) and share the
    check of the images."""
    if data_dir is not None:
        splits = load_folder(Path(data_dir))
    elif dataset in (None, "digits"):
        splits = load_digits()
    else:
        splits = load_hub(dataset)
    if classes:
        splits = keep_classes(splits, classes)
    need_two_classes(splits.classes)
    if data_dir is not None or skip_corrupt:  # a hub dataset is checked only when asked: it may be ImageNet's bytes
        check_readable(splits, skip_corrupt, share)
        if len(splits.train) == 0 or len(splits.test) == 0:
            raise DistillError("No readable images are left after skipping the corrupt ones.")
    if train_subset:
        splits.train = balanced_subset(splits.train, train_subset, len(splits.classes))
    splits.info.update(train_size=len(splits.train), test_size=len(splits.test), num_classes=len(splits.classes))
    return splits


def peek_classes(dataset: str | None, data_dir: Path | None, classes: list[str] | None = None) -> list[str] | None:
    """The class names a run would train on, read without decoding an image (folder names, the digits), or
    None where only loading the dataset can tell (the hub). A missing folder is refused here already."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DistillError(f"Data folder {root} does not exist.")
        if not (root / "train").is_dir():
            return None  # loading says what is wrong with it
        names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    elif dataset in (None, "digits"):
        names = [str(digit) for digit in range(10)]
    else:
        return None
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise DistillError(f"Class '{unknown[0]}' is not in this dataset (its classes: {listing(names, 12)}).")
        names = [n for n in names if n in set(classes)]
    if names:  # none: loading says what is wrong with the folder
        need_two_classes(names)
    return names


def need_two_classes(names: list[str]) -> None:
    """A classifier of one class is right by construction (it would train to 100 %): refused."""
    if len(names) == 1:
        raise DistillError(f"The data has one class ('{names[0]}'): a classifier needs at least two (a folder per class "
                           "under train/ and test/, or more names in --classes).")


def peek_train_size(dataset: str | None, data_dir: Path | None, classes: list[str] | None = None,
                    train_subset: int | None = None) -> int | None:
    """How many training images a run would see per epoch, without decoding any (None: unknown before loading)."""
    size: int | None
    if data_dir is not None:
        train = Path(data_dir).expanduser() / "train"
        if not train.is_dir():
            return None
        wanted = set(classes or [])
        size = 0
        for folder in train.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and (not wanted or folder.name in wanted):
                size += sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    elif dataset in (None, "digits"):
        size = 1437 * len(classes) // 10 if classes else 1437  # the fixed 80 % split; classes hold about 10 % each
    elif dataset in ALIASES:
        alias = ALIASES[dataset]
        size = alias.train_size * len(classes) // alias.num_classes if classes else alias.train_size
    else:
        return None
    return min(size, train_subset) if train_subset else size


def describe_source(dataset: str | None, data_dir: Path | None) -> str:
    if data_dir is not None:
        return f"folder {data_dir}"
    return dataset or "digits"
