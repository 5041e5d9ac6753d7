"""An image source: a split of (PIL RGB image, class index) read on demand, whatever holds the images (arrays,
files of a folder, rows of a Hugging Face table), and the quick check of an encoded image made before training."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from distill.errors import DistillError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# What PIL raises on a file it cannot read (a decompression bomb is refused before any decoding).
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# A whole JPEG ends with its end-of-image marker (which cannot occur inside the entropy-coded data), a whole
# PNG with its IEND chunk; both sit in the last bytes of the file, give or take some padding.
ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 64


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

    targets: Sequence[int]  # a list or an int64 array

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
    """Some of a source's images, optionally with their labels renumbered (indices and labels held as arrays, which
    forked loader workers share instead of copying: see FolderImages)."""

    def __init__(self, parent: ImageSource, indices: Sequence[int], relabel: dict[int, int] | None = None):
        self.parent, self.indices = parent, np.asarray(indices, dtype=np.int64)
        chosen = np.asarray(parent.targets, dtype=np.int64)[self.indices]
        self.targets = chosen if relabel is None else np.asarray([relabel[int(t)] for t in chosen], dtype=np.int64)

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
    """One split of an image folder: <root>/<class>/<image>.

    The file names (relative to the root, as bytes) and the labels are numpy arrays, not lists of Path and int
    objects: a forked loader worker reads a list of Python objects and so writes their reference counts, which copies
    every memory page the list touches into each worker of each process (ImageNet's 1.28M Paths: about 585 MB a
    worker); an array of bytes has no per-entry objects, and its pages stay shared (benchmarks/file_list_memory.py)."""

    def __init__(self, root: Path, files: Sequence[Path], targets: Sequence[int]):
        self.root = Path(root)
        self.names = np.array([os.fsencode(Path(f).relative_to(self.root)) for f in files], dtype=np.bytes_)
        self.targets = np.asarray(targets, dtype=np.int64)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.names[index])

    def load(self, index: int) -> Image.Image:
        path = self.path(index)
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
                with open(self.path(index), "rb") as handle:
                    found.append(image_problem(handle))
            except OSError as error:
                found.append(error.strerror or str(error))
        return found

    def where(self, index: int) -> str:
        return str(self.path(index))


@dataclass
class DataSplits:
    """A dataset ready for a stage: both splits, class names, and what to record about it."""

    train: ImageSource
    test: ImageSource
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)
