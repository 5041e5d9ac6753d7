"""The input pipeline's CPU cost per 224-px training image, part by part, before and after the uint8 path, and the
paired rate of distill's training loader against timm's own loader on the same recipe.

Not part of the test suite. Images: flowers12's training photos (224 x 224 JPEGs from ../shared/data) rescaled to
500 x 375 and saved as JPEG quality 90, about the size of an average ImageNet photo (real ImageNet photos carry more
detail than these upscaled ones, so decoding them costs somewhat more). Recipe: DeiT's (random-resized crop from 8 %,
flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 'pixel', bicubic, ImageNet normalisation).

- parts: distill.tools.loader_profile.profile_parts (process CPU time, one thread, every sample seeded as the loader
  seeds it) on "before": timm's float ending in the worker (to float tensor, normalise, random erasing), and "now":
  uint8 pixels and the erasing box in the worker, normalisation and the box's noise on the device (timed here on the
  CPU, in the training process).
- pair: images/s of timm's create_loader (no prefetcher, as on a CPU; RandAugment's posterize repaired as distill
  repairs it, or timm's loader raises on Pillow 13) and of distill's train_loader, both with --workers workers over
  --batches batches of 64 after the first, rounds alternating.

    python benchmarks/loader_parts.py --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_loader, create_transform
from timm.data.dataset import ImageDataset
from torchvision import transforms

from distill.data import NORMS, Transformed, train_loader
from distill.data.sources import load_folder
from distill.data.transforms import repair_rand_augment, train_transform
from distill.tools.loader_profile import loader_rate, profile_parts

RECIPE = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, scale_min=0.08)


def make_folder(flowers: Path, out: Path, size: tuple[int, int] = (500, 375)) -> Path:
    if (out / "test").is_dir():
        return out
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(flowers) as archive:
            archive.extractall(scratch, filter="data")
        for path in sorted(Path(scratch).glob("*/*/*.jpg")):  # train/ and test/
            target = out / path.parent.parent.name / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
    return out


def before_transform(res: int) -> transforms.Compose:
    mean, std = NORMS["imagenet"]
    primary, secondary, final = create_transform(res, is_training=True, scale=(RECIPE["scale_min"], 1.0), hflip=0.5,
                                                 color_jitter=0.3, auto_augment=RECIPE["aa"], interpolation="bicubic",
                                                 re_prob=RECIPE["reprob"], re_mode="pixel", re_count=1, mean=mean,
                                                 std=std, separate=True)
    return repair_rand_augment(transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms]))


def timm_loader(folder: Path, res: int, batch: int, workers: int):
    dataset = ImageDataset(str(folder / "train"))
    mean, std = NORMS["imagenet"]
    loader = create_loader(dataset, input_size=(3, res, res), batch_size=batch, is_training=True, use_prefetcher=False,
                           no_aug=False, re_prob=RECIPE["reprob"], re_mode="pixel", scale=(RECIPE["scale_min"], 1.0),
                           hflip=0.5, color_jitter=0.3, auto_augment=RECIPE["aa"], interpolation="bicubic", mean=mean,
                           std=std, num_workers=workers, device=torch.device("cpu"), persistent_workers=True)
    repair_rand_augment(dataset.transform)
    return loader


def distill_loader(folder: Path, res: int, batch: int, workers: int):
    mean, std = NORMS["imagenet"]
    transform = train_transform(res, mean=mean, std=std, **RECIPE)
    source = load_folder(folder).train
    return train_loader(Transformed(source, transform), batch_size=batch, seed=0, rank=0, world=1, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flowers", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/flowers12.tar.gz")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "distill-loader-parts")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--images", type=int, default=720)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loader_parts.json")
    args = parser.parse_args()
    folder = make_folder(args.flowers, args.folder)
    source = load_folder(folder).train
    mean, std = NORMS["imagenet"]
    for index in range(len(source)):  # every file read once first: both variants then decode from the page cache
        source.load(index)
    result = {"res": args.res, "images": args.images, "folder": "flowers12 train at 500 x 375, JPEG q90"}
    result["before"] = profile_parts(source, before_transform(args.res), args.images, 64)
    result["now"] = profile_parts(source, train_transform(args.res, mean=mean, std=std, **RECIPE), args.images, 64)
    for name in ("before", "now"):
        print(name, json.dumps(result[name]["parts_ms"]), "total", result[name]["loader_ms"], "per core",
              result[name]["images_per_s_per_core"], flush=True)
    pairs = []
    timm_dl = timm_loader(folder, args.res, 64, args.workers)
    ours_dl = distill_loader(folder, args.res, 64, args.workers)
    for round_ in range(args.rounds):
        first, second = (("timm", timm_dl), ("distill", ours_dl)) if round_ % 2 == 0 else (("distill", ours_dl), ("timm", timm_dl))
        measured = {name: loader_rate(loader, args.batches) for name, loader in (first, second)}
        pairs.append({k: round(v, 1) for k, v in measured.items()})
        print(f"round {round_ + 1}: timm {measured['timm']:.1f} img/s, distill {measured['distill']:.1f} img/s, "
              f"ratio {measured['distill'] / measured['timm']:.3f}", flush=True)
    result["pairs"] = pairs
    result["workers"] = args.workers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
