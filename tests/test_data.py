"""Data sources: the embedded digits, image folders, Hugging Face datasets (local copies), and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import invoke, make_image_folder
from distill.data import open_dataset
from distill.data.sources import load_hub
from distill.errors import DistillError


def test_digits_is_embedded_with_a_fixed_split():
    splits = open_dataset("digits", None)
    assert (len(splits.train), len(splits.test)) == (1437, 360)
    assert splits.classes == [str(d) for d in range(10)]
    image, label = splits.train[0]
    assert image.mode == "RGB" and image.size == (32, 32) and 0 <= label < 10
    again = open_dataset(None, None)
    assert again.test.targets == splits.test.targets  # the same split every time


def test_image_folder(folder):
    splits = open_dataset(None, folder)
    assert splits.classes == ["circle", "square", "star"]
    assert (len(splits.train), len(splits.test)) == (36, 12)
    image, label = splits.test[5]
    assert image.size == (16, 16) and splits.classes[label] == "square"


def test_class_filter_and_balanced_subset(folder):
    splits = open_dataset(None, folder, classes=["star", "circle"], train_subset=10)
    assert splits.classes == ["circle", "star"]  # the dataset's own order
    assert len(splits.train) == 10 and sorted(set(splits.train.targets)) == [0, 1]
    targets = splits.train.targets.tolist()
    assert abs(targets.count(0) - targets.count(1)) <= 1
    with pytest.raises(DistillError, match="Class 'moon' is not in this dataset"):
        open_dataset(None, folder, classes=["moon"])


def test_folder_errors_are_sentences(tmp_path, folder):
    with pytest.raises(DistillError, match="does not exist"):
        open_dataset(None, tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DistillError, match="training split .* is empty"):
        open_dataset(None, tmp_path / "empty")
    (folder / "test" / "triangle").mkdir()
    Image.new("RGB", (16, 16)).save(folder / "test" / "triangle" / "t.png")
    with pytest.raises(DistillError, match="classes the training split lacks: triangle"):
        open_dataset(None, folder)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "data", ["a", "b"])
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DistillError, match="(?s)1 image in .* cannot be read.*--skip-corrupt.*broken.png"):
        open_dataset(None, root)  # found by the scan before any training
    skipped = open_dataset(None, root, skip_corrupt=True)
    assert skipped.info["skipped_corrupt"] == 1 and len(skipped.train) == 2 * 12  # the readable ones
    assert skipped.info["skipped_examples"] == [str(bad)]
    from distill.data.sources import FolderImages

    with pytest.raises(DistillError, match="Cannot read image .*broken.png"):  # and by the loader, should one pass
        FolderImages(root, [bad], [0]).load(0)


def _hub_copy(tmp_path, as_parquet: bool):
    """A dataset in the hub's own layout (parquet shards with Image and ClassLabel features), on disk."""
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["cat", "dog", "emu"])})

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"img": images, "fine_label": [i % 3 for i in range(n)]}, features=features)

    root = tmp_path / "local-hub-copy"
    if as_parquet:
        (root / "data").mkdir(parents=True)
        split(9).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
        split(6).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict({"train": split(9), "test": split(6)}).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("as_parquet", [True, False], ids=["hub-layout", "save_to_disk"])
def test_hub_dataset_from_a_local_copy(tmp_path, as_parquet):
    root = _hub_copy(tmp_path, as_parquet)
    splits = load_hub(str(root))
    assert splits.classes == ["cat", "dog", "emu"]
    assert (len(splits.train), len(splits.test)) == (9, 6)
    image, label = splits.train[4]
    assert image.mode == "RGB" and label == 1
    assert splits.info["columns"] == ["img", "fine_label"]


def test_unreachable_hub_is_one_sentence_and_exit_2():
    result = invoke("teach", "--dataset", "nobody/no-such-dataset-here", "--epochs", "1")
    assert result.exit_code == 2
    assert "Cannot reach the Hugging Face hub" in result.output and "--data-dir" in result.output
    assert "Traceback" not in result.output


def test_skip_corrupt_checks_a_hub_dataset_from_its_stored_bytes(tmp_path):
    """A hub dataset is checked only with --skip-corrupt, from its encoded bytes, without decoding them."""
    import io

    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(encoded, format="PNG")
    good = {"bytes": encoded.getvalue(), "path": None}
    train = datasets.Dataset.from_dict({"img": [good] * 5 + [{"bytes": b"junk", "path": None}],
                                        "label": [0, 1, 0, 1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"img": [good] * 4, "label": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "copy"))
    assert len(open_dataset(str(tmp_path / "copy"), None).train) == 6  # not checked unless asked
    skipped = open_dataset(str(tmp_path / "copy"), None, skip_corrupt=True)
    assert len(skipped.train) == 5 and skipped.info["skipped_corrupt"] == 1
    assert skipped.info["skipped_examples"] == [f"row 5 of {tmp_path / 'copy'}[train]"]


def test_an_image_folder_is_held_as_arrays_that_forked_workers_share(tmp_path):
    """File names and labels are numpy arrays (no Python object per image, whose reference counts a forked worker
    would write, copying the list into every worker); a subset (--classes, --train-subset, --skip-corrupt) too. A
    worker of a real loader reads them, and the images load by name."""
    import numpy as np

    from distill.data.sources import balanced_subset, load_folder

    data = make_image_folder(tmp_path / "data", ["a", "b", "c"])
    splits = load_folder(data)
    train = splits.train
    assert isinstance(train.names, np.ndarray) and train.names.dtype.kind == "S" and train.names.dtype != object
    assert isinstance(train.targets, np.ndarray) and train.targets.dtype == np.int64
    assert train.where(0) == str(data / "train" / "a" / "a_0.png") and train.load(0).size == (16, 16)
    part = balanced_subset(train, 6, 3)
    assert isinstance(part.indices, np.ndarray) and isinstance(part.targets, np.ndarray)
    assert sorted(part.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    from torch.utils.data import DataLoader

    labels = [int(label) for _, label in DataLoader(part, batch_size=None, num_workers=1, collate_fn=lambda x: x)]
    assert labels == part.targets.tolist()
