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


def _deit_loader(workers: int, folder, epoch: int = 0):
    from distill.data import Transformed, open_dataset, train_loader, train_transform
    from distill.data.transforms import NORMS

    data = open_dataset(None, folder)
    transform = train_transform(16, mean=NORMS["imagenet"][0], std=NORMS["imagenet"][1], aa="rand-m9-mstd0.5-inc1",
                                reprob=0.25, scale_min=0.08)
    loader = train_loader(Transformed(data.train, transform), batch_size=4, seed=3, rank=0, world=1, num_workers=workers)
    loader.sampler.set_epoch(epoch)
    return loader


def test_per_sample_augmentation_never_touches_the_training_generators(folder, monkeypatch):
    """With --num-workers 0 the augmentation runs in the training process: it must leave drop path's and
    Mixup's generators as they were, and never reseed a CUDA generator (torch.manual_seed would)."""
    import random

    import numpy as np

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.manual_seed reseeds every CUDA generator")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    random.seed(1)
    np.random.seed(1)
    torch.default_generator.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(1)
    np.random.seed(1)
    torch.default_generator.manual_seed(1)
    batches = [images for images, _ in _deit_loader(0, folder)]
    assert len(batches) == 9
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_augmentation_is_the_same_with_any_number_of_workers(folder):
    for epoch in (0, 1):
        alone = [images for images, _ in _deit_loader(0, folder, epoch)]
        helped = [images for images, _ in _deit_loader(2, folder, epoch)]
        assert all(torch.equal(a, b) for a, b in zip(alone, helped)) and len(alone) == len(helped) == 9
    assert not torch.equal(alone[0], [images for images, _ in _deit_loader(0, folder, 0)][0])  # epochs differ
