"""Train and test preprocessing, built by timm, with one repair of timm's RandAugment: the loader's part, ending in
uint8 pixels, and the device's (distill.data.device.Finish: normalisation and random erasing's noise)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image
from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
                        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, str_to_interp_mode
from torchvision import transforms

from distill.data.device import EraseBox, Finish
from distill.data.sources import ImageSource

NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def norm_name(mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]) -> str:
    """The name of a known normalisation (imagenet, inception, clip), else 'custom'."""
    for name, (known_mean, known_std) in NORMS.items():
        if all(abs(a - b) < 1e-4 for a, b in zip((*mean, *std), (*known_mean, *known_std))):
            return name
    return "custom"


def measure_norm(source: ImageSource, max_images: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a training split (the 'dataset' normalisation)."""
    step = max(1, len(source) // max_images)
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(source), step):
        pixels = np.asarray(source.load(i), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels ** 2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, except that 0 bits gives the black image older Pillow returned.

    With the DeiT policy rand-m9-mstd0.5-inc1 the sampled magnitude is clipped at 10 in about 2 % of
    draws, and PosterizeIncreasing then asks for 0 bits (roughly one image in several hundred);
    Pillow 13 raises on that, which stops a training run mid-epoch. With the Pillow DeiT was
    trained with, that image came out all black.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def repair_rand_augment(transform: Callable) -> Callable:
    """Swap the posterize op inside every timm RandAugment of a transform (see `_posterize_any_bits`)."""
    stack = [transform]
    while stack:
        node = stack.pop()
        if isinstance(node, auto_augment.RandAugment):
            for op in node.ops:
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = _posterize_any_bits
        stack.extend(getattr(node, "transforms", []) or [])
    return transform


class Preprocess(transforms.Compose):
    """A loader's transforms, which end in uint8 pixels, and `finish`, what the device does to their batches."""

    def __init__(self, steps: list[Callable], finish: Finish):
        super().__init__(steps)
        self.finish = finish


PAD = 4  # DeiT III's simple random crop pads 4 pixels on every side


def simple_random_crop(img_size: int, hflip: float, interpolation: str) -> list[Callable]:
    """DeiT III's simple random crop (its augment.py, --src): the shorter side resized to the training size,
    4 pixels of reflection padding, a random square crop (so along the long side), then the flip. torchvision's
    own pieces; the crop draws from torch's CPU generator, which the loader seeds per sample."""
    return [transforms.Resize(img_size, interpolation=str_to_interp_mode(interpolation)),
            transforms.RandomCrop(img_size, padding=PAD, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(p=hflip)]


def train_transform(img_size: int, *, mean: tuple[float, ...], std: tuple[float, ...], aa: str | None = None,
                    reprob: float = 0.0, color_jitter: float = 0.3, scale_min: float = 0.08, hflip: float = 0.5,
                    interpolation: str = "bicubic", crop: str = "rrc") -> Preprocess:
    """DeiT's training augmentation, built by timm: random-resized crop, flip, then RandAugment (`aa` rand-...)
    or DeiT III's 3-Augment (`aa` 3a: one of grayscale, solarisation, Gaussian blur per image, chosen uniformly,
    with colour jitter kept on), random erasing ('pixel' mode: its box drawn here, its noise on the device). `crop`
    src puts DeiT III's simple random crop in place of the random-resized crop, the rest unchanged."""
    primary, secondary, final = create_transform(  # the third part (to tensor, normalise, erase): Finish's and EraseBox's
        img_size, is_training=True, scale=(scale_min, 1.0), hflip=hflip, color_jitter=color_jitter,
        auto_augment=None if aa in (None, "", "none") else aa, interpolation=interpolation,
        re_prob=reprob, re_mode="pixel", re_count=1, mean=mean, std=std, separate=True,
    )
    first = simple_random_crop(img_size, hflip, interpolation) if crop == "src" else list(primary.transforms)
    last: list[Callable] = [MaybePILToTensor()] + [EraseBox(t) for t in final.transforms if isinstance(t, RandomErasing)]
    return repair_rand_augment(Preprocess(first + list(secondary.transforms) + last, Finish(mean, std)))


def eval_transform(img_size: int, *, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 0.875,
                   interpolation: str = "bicubic") -> Preprocess:
    """Test-time preprocessing: resize to img_size / crop_pct, centre-crop img_size (timm's), normalised on the device."""
    timm_steps = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                  mean=mean, std=std).transforms
    if type(timm_steps[-1]).__name__ != "Normalize" or type(timm_steps[-2]).__name__ != "MaybeToTensor":
        raise RuntimeError(f"timm's evaluation transform changed shape: {timm_steps}")
    return Preprocess(timm_steps[:-2] + [MaybePILToTensor()], Finish(mean, std))
