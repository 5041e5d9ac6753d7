"""Where images come from: the embedded digits, a local image folder, or a Hugging Face dataset.

Every source gives the same thing: a train and a test split of (PIL RGB image, class index),
the class names, and a description recorded in checkpoints.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from distill.errors import DistillError

DIGITS_SIZE = 32  # the 8x8 digits are upsampled once, so crops and RandAugment act on a real image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# What PIL raises on a file it cannot read (a decompression bomb is refused before any decoding).
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# A whole JPEG ends with its end-of-image marker (which cannot occur inside the entropy-coded data), a whole
# PNG with its IEND chunk; both sit in the last bytes of the file, give or take some padding.
ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 64
SCAN_BLOCK, SCAN_THREADS = 512, 8
SHOWN_SKIPPED = 5  # paths of skipped images shown (and recorded) beside their count


@dataclass(frozen=True)
class HubAlias:
    """How to read a well-known dataset from the Hugging Face hub."""

    hub_id: str
    image: str
    label: str
    train: str
    test: str
    train_size: int  # images in the training split(s), known before anything is downloaded
    num_classes: int


# Built-in targets. Column and split names are those of the hub copies named here.
ALIASES: dict[str, HubAlias] = {
    "cifar10": HubAlias("uoft-cs/cifar10", "img", "label", "train", "test", 50_000, 10),
    "cifar100": HubAlias("uoft-cs/cifar100", "img", "fine_label", "train", "test", 50_000, 100),
    # The paper's Flowers-102 training set is train + validation (2,040 images); test has 6,149.
    "flowers102": HubAlias("dpdl-benchmark/oxford_flowers102", "image", "label", "train+validation", "test", 2_040, 102),
    "stanford_cars": HubAlias("tanganke/stanford_cars", "image", "label", "train", "test", 8_144, 196),
    "imagenet-1k": HubAlias("ILSVRC/imagenet-1k", "image", "label", "train", "validation", 1_281_167, 1000),
}


def image_problem(handle: BinaryIO) -> str | None:
    """Why an encoded image cannot be read, or None: a quick check made before training.

    PIL reads the header (format, size, mode) without decoding the pixels, and a JPEG or PNG must end as a whole
    one does, which catches truncated files. Only a file that fails the ending check, or is in another format,
    is decoded in full to be sure, so a readable file is never reported. Corruption inside the compressed data
    can still pass; the loader then names that file when it meets it.
    """
    try:
        handle.seek(0, io.SEEK_END)
        handle.seek(max(0, handle.tell() - TAIL_BYTES))
        tail = handle.read()
        handle.seek(0)
        with Image.open(handle) as image:
            ending = ENDINGS.get(image.format or "")
            if ending is None or ending not in tail:
                image.load()
    except UnidentifiedImageError:  # its message repeats the file object
        return "not an image PIL can identify"
    except UNREADABLE as error:
        return str(error) or type(error).__name__
    return None


class ImageSource(Dataset):
    """Labelled images: `targets` is known without decoding, `load(i)` decodes one to RGB."""

    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Where image `index` comes from, for error messages."""
        return f"image {index}"

    def problems(self, indices: list[int]) -> list[str | None]:
        """Why each of these images cannot be read (None: readable). Here by decoding them; sources of encoded
        files override it with the quick header check."""
        found: list[str | None] = []
        for index in indices:
            try:
                self.load(index)
                found.append(None)
            except DistillError as error:
                found.append(error.sentence)
        return found

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), self.targets[index]

    def subset(self, indices: Sequence[int], relabel: dict[int, int] | None = None) -> "ImageSource":
        return SubsetSource(self, list(indices), relabel)


class SubsetSource(ImageSource):
    """Some of a source's images, optionally with their labels renumbered."""

    def __init__(self, parent: ImageSource, indices: list[int], relabel: dict[int, int] | None = None):
        self.parent, self.indices = parent, indices
        self.targets = [parent.targets[i] if relabel is None else relabel[parent.targets[i]] for i in indices]

    def load(self, index: int) -> Image.Image:
        return self.parent.load(self.indices[index])

    def problems(self, indices: list[int]) -> list[str | None]:
        return self.parent.problems([self.indices[i] for i in indices])

    def where(self, index: int) -> str:
        return self.parent.where(self.indices[index])


class ArrayImages(ImageSource):
    """Images held in memory as uint8 arrays (the embedded digits)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int]):
        self.images, self.targets = images, [int(t) for t in targets]

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def problems(self, indices: list[int]) -> list[str | None]:
        return [None] * len(indices)  # decoded arrays: nothing can be unreadable


class FolderImages(ImageSource):
    """One split of an image folder: <root>/<class>/<image>."""

    def __init__(self, root: Path, files: list[Path], targets: list[int]):
        self.root, self.files, self.targets = root, files, targets

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except UNREADABLE as error:
            # Every folder is checked before training (check_readable), so the damage is inside the compressed
            # data, which that check (and so --skip-corrupt) does not decode.
            raise DistillError(f"Cannot read image {path}: {error}. Its damage is inside the compressed data, which the "
                               "check before training does not decode; remove or replace it.") from None

    def problems(self, indices: list[int]) -> list[str | None]:
        found: list[str | None] = []
        for index in indices:
            try:
                with open(self.files[index], "rb") as handle:
                    found.append(image_problem(handle))
            except OSError as error:
                found.append(error.strerror or str(error))
        return found

    def where(self, index: int) -> str:
        return str(self.files[index])


class HubImages(ImageSource):
    """One split of a Hugging Face dataset with an image column and a class-label column."""

    def __init__(self, table: Any, image_column: str, label_column: str, name: str):
        self.table = table.select_columns([image_column, label_column])
        self.image_column, self.name = image_column, name
        self.targets = [int(t) for t in self.table[label_column]]

    def load(self, index: int) -> Image.Image:
        try:
            image = self.table[index][self.image_column]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            return image.convert("RGB")
        except UNREADABLE as error:
            raise DistillError(f"Cannot decode {self.where(index)}: {error}. Pass --skip-corrupt to skip such images.") from None

    def problems(self, indices: list[int]) -> list[str | None]:
        """The header check on the stored bytes, read without decoding (datasets' Image(decode=False))."""
        from datasets import Image as ImageFeature

        if not isinstance(self.table.features[self.image_column], ImageFeature):
            return super().problems(indices)
        if getattr(self, "_encoded", None) is None:
            self._encoded = self.table.cast_column(self.image_column, ImageFeature(decode=False))
        raw = self._encoded[indices][self.image_column]
        found: list[str | None] = []
        for item in raw:
            try:
                if item.get("bytes") is not None:
                    found.append(image_problem(io.BytesIO(item["bytes"])))
                else:
                    with open(item["path"], "rb") as handle:
                        found.append(image_problem(handle))
            except (OSError, TypeError) as error:
                found.append(str(error) or type(error).__name__)
        return found

    def where(self, index: int) -> str:
        return f"row {index} of {self.name}"


@dataclass
class DataSplits:
    """A dataset ready for a stage: both splits, class names, and what to record about it."""

    train: ImageSource
    test: ImageSource
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)


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
        raise DistillError(f"The test split {test_dir} has classes the training split lacks: {', '.join(unknown[:5])}.")
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


def _hub_error(name: str, error: Exception) -> DistillError:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, ConnectionError) or any(s in text for s in ("Couldn't reach", "ConnectionError", "Name or service",
                                                                     "OfflineModeIsEnabled", "Connection refused",
                                                                     "LocalEntryNotFound")):
        return DistillError(f"Cannot reach the Hugging Face hub to load '{name}'; download it where you have a connection and "
                            "point --dataset at the local copy (a folder of the hub repository or from save_to_disk), or "
                            "use --data-dir with a train/ and test/ image folder.")
    if "DatasetNotFoundError" in text or "doesn't exist on the Hub" in text or "FileNotFoundError" in text:
        return DistillError(f"Dataset '{name}' was not found on the hub or on disk (gated datasets need `huggingface-cli login`).")
    return DistillError(f"Cannot load dataset '{name}': {str(error).splitlines()[0] if str(error) else type(error).__name__}.")


def _pick_columns(features: Any, alias: HubAlias | None, name: str) -> tuple[str, str]:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    if alias and alias.image in features and alias.label in features:
        return alias.image, alias.label
    image = next((k for k, v in features.items() if isinstance(v, ImageFeature)), None)
    label = next((k for k, v in features.items() if isinstance(v, ClassLabel)), None)
    if image is None or label is None:
        raise DistillError(f"Dataset '{name}' needs an image column and a class-label column; it has "
                           f"{', '.join(f'{k} ({type(v).__name__})' for k, v in features.items())}.")
    return image, label


def load_hub(name: str) -> DataSplits:
    """A dataset from the Hugging Face hub (by alias or id) or a local copy of one. Never runs remote code."""
    import datasets

    alias = ALIASES.get(name)
    hub_id = alias.hub_id if alias else name
    local = Path(hub_id).expanduser()
    try:
        if local.is_dir() and (local / "dataset_dict.json").exists():
            splits = datasets.load_from_disk(str(local))
        else:
            splits = datasets.load_dataset(str(local) if local.is_dir() else hub_id)
    except DistillError:
        raise
    except Exception as error:  # the hub raises many types; each becomes one sentence
        raise _hub_error(name, error) from None
    if not isinstance(splits, datasets.DatasetDict):
        raise DistillError(f"Dataset '{name}' has no named splits; it needs a train and a test split.")
    train_name = alias.train if alias else "train"
    test_name = alias.test if alias else next((s for s in ("test", "validation", "val", "valid") if s in splits), None)

    def take(split: str) -> Any:
        parts = split.split("+")
        missing = [p for p in parts if p not in splits]
        if missing:
            raise DistillError(f"Dataset '{name}' has no '{missing[0]}' split (it has {', '.join(splits)}).")
        tables = [splits[p] for p in parts]
        return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)

    if test_name is None:
        raise DistillError(f"Dataset '{name}' has no test or validation split (it has {', '.join(splits)}).")
    train_table, test_table = take(train_name), take(test_name)
    image_col, label_col = _pick_columns(train_table.features, alias, name)
    classes = list(train_table.features[label_col].names)
    train = HubImages(train_table, image_col, label_col, f"{name}[{train_name}]")
    test = HubImages(test_table, image_col, label_col, f"{name}[{test_name}]")
    if len(train) == 0:
        raise DistillError(f"The training split of '{name}' is empty.")
    if len(test) == 0:
        raise DistillError(f"The test split of '{name}' is empty.")
    if min(test.targets) < 0:
        raise DistillError(f"The '{test_name}' split of '{name}' is unlabelled; choose a labelled split as test.")
    info = {"dataset": name, "hub_id": hub_id, "train_split": train_name, "test_split": test_name,
            "columns": [image_col, label_col]}
    return DataSplits(train, test, classes, info)


def find_unreadable(source: ImageSource) -> list[tuple[int, str]]:
    """(index, reason) of every image of a split that cannot be read, by the quick header check, in blocks
    spread over a few threads (the work is mostly waiting for files)."""
    blocks = [list(range(start, min(start + SCAN_BLOCK, len(source)))) for start in range(0, len(source), SCAN_BLOCK)]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        results = pool.map(source.problems, blocks)
        return [(index, problem) for block, problems in zip(blocks, results)
                for index, problem in zip(block, problems) if problem is not None]


def check_readable(splits: DataSplits, skip: bool) -> None:
    """List every unreadable image at once, before any training: refuse them, or (--skip-corrupt) leave them out
    and record how many, and which."""
    bad = {"train": find_unreadable(splits.train), "test": find_unreadable(splits.test)}
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
        raise DistillError(f"Class '{unknown[0]}' is not in this dataset (its classes: {', '.join(splits.classes[:12])}"
                           f"{' ...' if len(splits.classes) > 12 else ''}).")
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
                 train_subset: int | None = None, classes: list[str] | None = None) -> DataSplits:
    """The one entry point every stage uses."""
    if data_dir is not None:
        splits = load_folder(Path(data_dir))
    elif dataset in (None, "digits"):
        splits = load_digits()
    else:
        splits = load_hub(dataset)
    if classes:
        splits = keep_classes(splits, classes)
    if data_dir is not None or skip_corrupt:  # a hub dataset is checked only when asked: it may be ImageNet's bytes
        check_readable(splits, skip_corrupt)
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
            raise DistillError(f"Class '{unknown[0]}' is not in this dataset (its classes: {', '.join(names[:12])}"
                               f"{' ...' if len(names) > 12 else ''}).")
        return [n for n in names if n in set(classes)]
    return names


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
