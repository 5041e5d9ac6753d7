"""Preprocessing: timm's DeiT augmentation, with RandAugment's posterize repaired for Pillow 13."""

from __future__ import annotations

import random

import numpy as np
import pytest
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
    assert out["pixels"].shape == (3, 16, 16) and out["pixels"].dtype == torch.uint8


def test_eval_transform_resizes_then_centre_crops():
    out = eval_transform(32, mean=MEAN, std=STD, crop_pct=0.875)(Image.new("RGB", (64, 48)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def _finished(transform, sample, device="cpu"):
    """One sample through the device's part (distill.data.device.Finish), as a batch of one."""
    batch = {k: v[None] for k, v in sample.items()} if isinstance(sample, dict) else sample[None]
    return transform.finish(batch, device)[0].cpu()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reprob", [0.0, 0.25])
def test_uint8_pixels_finished_on_the_device_are_timms_float_pipeline(reprob, device):
    """The loader's uint8 pixels, normalised by Finish, equal timm's ToTensor + Normalize in the worker bit for bit;
    random erasing erases the very box timm's RandomErasing erased (the same draws of the sample's seeded stream),
    with other noise: outside the box every value is equal, inside every value is noise."""
    from timm.data import create_transform

    from distill.data.loaders import seeded_rng

    image = _colourful(40, 24)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    new = train_transform(16, mean=mean, std=std, aa="rand-m9-mstd0.5-inc1", reprob=reprob)
    old = create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=reprob, re_mode="pixel",
                           re_count=1, mean=mean, std=std, interpolation="bicubic", color_jitter=0.3)
    erased = 0
    for seed in range(200):
        with seeded_rng(seed):
            sample = new(image)
        with seeded_rng(seed):
            reference = old(image)
        finished = _finished(new, sample, device)
        plain = _finished(new, sample["pixels"] if isinstance(sample, dict) else sample, device)
        inside = torch.zeros_like(finished, dtype=torch.bool)
        if isinstance(sample, dict) and sample["erase"][2] > 0:
            top, left, height, width, _ = sample["erase"].tolist()
            inside[:, top:top + height, left:left + width] = True
            erased += 1
        assert torch.equal(finished[~inside], reference[~inside]) and torch.equal(plain[~inside], reference[~inside])
        assert (reference[inside] != plain[inside]).all() and (finished[inside] != plain[inside]).all()
        assert not torch.equal(finished[inside], reference[inside]) or not inside.any()
    assert (30 <= erased <= 70) if reprob else erased == 0  # 50 expected at 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_eval_preprocessing_equals_timms_float_pipeline(device):
    from timm.data import create_transform

    image = _colourful(50, 37)
    reference = create_transform(32, is_training=False, crop_pct=0.875, mean=MEAN, std=(0.2, 0.3, 0.4),
                                 interpolation="bicubic")(image)
    new = eval_transform(32, mean=MEAN, std=(0.2, 0.3, 0.4), crop_pct=0.875)
    assert torch.equal(_finished(new, new(image), device), reference)


def test_erasing_noise_is_a_function_of_the_sample_alone():
    """The same samples finished in another batch, in another order, give the same pixels (resume, teacher cache)."""
    from distill.data.loaders import seeded_rng

    transform = train_transform(16, mean=MEAN, std=STD, aa=None, reprob=1.0)
    samples = []
    for seed in range(4):
        with seeded_rng(seed):
            samples.append(transform(_colourful(20, 20)))
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("pixels", "erase")}
    reordered = {k: v.flip(0) for k, v in batch.items()}
    first, second = transform.finish(batch), transform.finish(reordered).flip(0)
    assert torch.equal(first, second)
    assert all(s["erase"][2] > 0 for s in samples)  # every image erased at probability 1
    assert not torch.equal(first[0], first[1])


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
    def finished(workers, epoch):
        loader = _deit_loader(workers, folder, epoch)
        return [loader.dataset.finish(images) for images, _ in loader]

    for epoch in (0, 1):
        alone, helped = finished(0, epoch), finished(2, epoch)
        assert all(torch.equal(a, b) for a, b in zip(alone, helped)) and len(alone) == len(helped) == 9
    assert not torch.equal(alone[0], finished(0, 0)[0])  # epochs differ


# -- DeiT III: 3-Augment and the simple random crop ----------------------------------------------------
PLAIN = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # no normalisation: outputs are the augmented pixels / 255


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _seeded(transform, image, seeds):
    """The transform as the training loader runs it: one private seed per sample."""
    from distill.data.loaders import seeded_rng

    outputs = []
    for seed in seeds:
        with seeded_rng(seed):
            outputs.append(_finished(transform, transform(image)))
    return outputs


def _colourful(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_three_augment_applies_exactly_one_of_grayscale_solarisation_blur_uniformly():
    """With the crop and colour jitter made neutral, every output is the image after one of DeiT III's three
    operations: grayscale, solarisation at 128, or a Gaussian blur; each about a third of the time."""
    from PIL import ImageOps

    image = _colourful(16, 16)
    transform = train_transform(16, mean=PLAIN[0], std=PLAIN[1], aa="3a", color_jitter=0.0, scale_min=1.0, hflip=0.0)
    gray = np.asarray(image.convert("L").convert("RGB"))
    solarised = np.asarray(ImageOps.solarize(image, 128))
    counts = {"gray": 0, "solarised": 0, "blurred": 0}
    for out in _seeded(transform, image, range(300)):
        assert out.shape == (3, 16, 16)
        pixels = _pixels(out)
        if np.array_equal(pixels, gray):
            counts["gray"] += 1
        elif np.array_equal(pixels, solarised):
            counts["solarised"] += 1
        else:  # a blur (radius 0.1 to 2) keeps the colours and never sharpens
            assert np.abs(np.diff(pixels.astype(int), axis=1)).mean() <= np.abs(np.diff(np.asarray(image).astype(int),
                                                                                          axis=1)).mean()
            counts["blurred"] += 1
    assert all(70 <= count <= 130 for count in counts.values()), counts  # 100 expected each, 4 standard deviations


def test_three_augment_keeps_colour_jitter_and_randaugment_drops_it():
    """DeiT III adds colour jitter 0.3 after its three operations; timm switches jitter off for RandAugment."""
    from torchvision.transforms import ColorJitter

    def jitters(aa):
        return [t for t in train_transform(16, mean=MEAN, std=STD, aa=aa, color_jitter=0.3).transforms
                if isinstance(t, ColorJitter)]

    (jitter,) = jitters("3a")
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.7, 1.3) and jitter.hue is None
    assert jitters("rand-m9-mstd0.5-inc1") == []


@pytest.mark.parametrize("aa,crop", [("3a", "rrc"), ("3a", "src"), ("rand-m9-mstd0.5-inc1", "src")])
def test_deit3_augmentation_is_a_function_of_the_sample_seed(aa, crop):
    image = _colourful(40, 24)
    transform = train_transform(16, mean=MEAN, std=STD, aa=aa, crop=crop, reprob=0.25)
    first, again = _seeded(transform, image, [7, 8, 9]), _seeded(transform, image, [7, 8, 9])
    assert all(a.shape == (3, 16, 16) and torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_simple_random_crop_pads_four_pixels_and_crops_a_square_anywhere_along_the_long_side():
    """The shorter side becomes the training size (here it already is: no resampling), 4 px of reflection on
    every side, one random square: every output is one window of the padded image, never a zoom, and the
    windows cover every offset (0..16 along the 24-px side, 0..8 along the 16-px one)."""
    width, height, size = 24, 16, 16
    pixels = np.zeros((height, width, 3), dtype=np.uint8)  # a pixel's value says where it is
    pixels[..., 0] = np.arange(width)[None, :] * 10
    pixels[..., 1] = np.arange(height)[:, None] * 15
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    transform = train_transform(size, mean=PLAIN[0], std=PLAIN[1], crop="src", hflip=0.0, color_jitter=0.0)
    lefts, tops = [], []
    for out in _seeded(transform, Image.fromarray(pixels), range(400)):
        assert out.shape == (3, size, size)
        crop = _pixels(out)
        matches = [(top, left) for top in range(padded.shape[0] - size + 1) for left in range(padded.shape[1] - size + 1)
                   if np.array_equal(padded[top:top + size, left:left + size], crop)]
        assert len(matches) == 1, "not a window of the padded image"
        tops.append(matches[0][0])
        lefts.append(matches[0][1])
    assert set(lefts) == set(range(17)) and set(tops) == set(range(9))
    assert abs(np.mean(lefts) - 8) < 1.0 and abs(np.mean(tops) - 4) < 0.6


def test_simple_random_crop_resizes_the_shorter_side_to_the_training_size():
    image = _colourful(64, 32)  # 2:1 -> 32 x 16 before padding at 16 px
    transform = train_transform(16, mean=PLAIN[0], std=PLAIN[1], crop="src", hflip=0.0, color_jitter=0.0)
    resized = np.asarray(image.resize((32, 16), Image.Resampling.BICUBIC))
    padded = np.pad(resized, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    for out in _seeded(transform, image, range(5)):
        crop = _pixels(out)
        assert any(np.array_equal(padded[t:t + 16, l:l + 16], crop) for t in range(9) for l in range(25))
