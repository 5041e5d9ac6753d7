"""Datasets from the Hugging Face hub (by alias or id) or a local copy of one: the built-in targets and how their
columns and splits are read."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distill.data.images import UNREADABLE, DataSplits, ImageSource, image_problem
from distill.errors import DistillError


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
