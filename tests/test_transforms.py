"""Preprocessing: timm's DeiT augmentation, with RandAugment's posterize repaired for Pillow 13."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment

from distill.data.transforms import _posterize_any_bits, eval_transform, repair_rand_augment, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def test_posterize_with_zero_bits_gives_a_black_image_instead_of_raising():
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(_posterize_any_bits(image, 0)).max() == 0
    assert np.asarray(_posterize_any_bits(image, 4)).tolist() == np.asarray(auto_augment.posterize(image, 4)).tolist()


def test_deit_policy_at_magnitude_ten_reaches_zero_bits_and_survives():
    """The DeiT policy's PosterizeIncreasing asks for 0 bits when the sampled magnitude clips at 10."""
    policy = auto_augment.rand_augment_transform("rand-m10-n1-mstd0-inc1", {})
    posterize = next(op for op in policy.ops if op.name == "PosterizeIncreasing")
    assert posterize.level_fn(10.0, posterize.hparams) == (0,)  # what timm asks of Pillow
    posterize.prob = 1.0
    policy.ops = [posterize]
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    repair_rand_augment(policy)
    assert np.asarray(policy(image)).max() == 0


def test_many_images_through_the_full_deit_augmentation():
    transform = train_transform(16, mean=MEAN, std=STD, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for _ in range(3000):  # about one image in several hundred meets posterize with 0 bits
        out = transform(image)
    assert out.shape == (3, 16, 16)


def test_eval_transform_resizes_then_centre_crops():
    out = eval_transform(32, mean=MEAN, std=STD, crop_pct=0.875)(Image.new("RGB", (64, 48)))
    assert out.shape == (3, 32, 32)
