"""`distill benchmark --data`: the input pipeline alone, without a model.

What a GPU node must know before it trains: how much CPU one training image costs, part by part (decoding, each
augmentation step, collation, and the device's part, timed here on the CPU), how many images per second one core
delivers, how many bytes a batch sends to the device, and so how many cores keep one GPU fed at a given step rate.
Each part is timed in CPU time (the process's, one thread), image by image, with every sample's randomness seeded
as the training loader seeds it; then a real training loader with the run's workers is timed end to end.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import torch

PART_NAMES = {  # timm's and torchvision's class names, as a reader of DeiT's recipe knows the parts
    "RandomResizedCropAndInterpolation": "random-resized crop", "RandomResizedCrop": "random-resized crop",
    "RandomHorizontalFlip": "flip", "RandAugment": "RandAugment", "ColorJitter": "colour jitter",
    "MaybePILToTensor": "to uint8 tensor", "EraseBox": "erasing box", "MaybeToTensor": "to float tensor",
    "ToTensor": "to float tensor", "Normalize": "normalise", "RandomErasing": "random erasing",
    "Resize": "resize", "CenterCrop": "centre crop", "RandomCrop": "random crop",
}


def part_name(step: Callable) -> str:
    name = type(step).__name__
    return PART_NAMES.get(name, name)


def profile_parts(source: Any, transform: Any, images: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """CPU milliseconds per image of each part of `transform` (a Compose; with a `finish`, the device's part too),
    over `images` samples of `source` taken in a seeded shuffled order, one thread."""
    from torch.utils.data import default_collate

    from distill.data.loaders import sample_seeds, seeded_rng

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
        seeds = sample_seeds(seed, 0, images)
        spent: dict[str, float] = defaultdict(float)
        finish = getattr(transform, "finish", None)
        batch: list[Any] = []
        batch_bytes = []
        for position in range(images):
            index = order[position % len(order)]
            clock = time.process_time_ns()
            sample = source.load(index)
            spent["decode"] += time.process_time_ns() - clock
            with seeded_rng(int(seeds[position])):  # its save and restore are the training process's, not a worker's
                now = time.process_time_ns()
                for step in transform.transforms:
                    clock = now
                    sample = step(sample)
                    now = time.process_time_ns()
                    spent[part_name(step)] += now - clock
            batch.append((sample, source.targets[index]))
            if len(batch) == batch_size or position == images - 1:
                clock = time.process_time_ns()
                collated = default_collate(batch)
                now = time.process_time_ns()
                spent["collate"] += now - clock
                batch_bytes.append(_nbytes(collated) / len(batch))
                if finish is not None:
                    finish(collated[0], "cpu")
                    spent["device part (here on the CPU)"] += time.process_time_ns() - now
                batch = []
    finally:
        torch.set_num_threads(threads)
    per_image = {part: ns / images / 1e6 for part, ns in spent.items()}
    device = {k: v for k, v in per_image.items() if k.startswith("device part")}
    loader_ms = sum(v for k, v in per_image.items() if k not in device)
    return {"parts_ms": {k: round(v, 4) for k, v in per_image.items()}, "loader_ms": round(loader_ms, 4),
            "images_per_s_per_core": round(1000 / loader_ms, 1), "bytes_per_image": round(sum(batch_bytes) / len(batch_bytes)),
            "images": images}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def endless(loader: Any) -> Any:
    """A loader's batches epoch after epoch (a sampler with epochs is told each one)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_rate(loader: Any, batches: int) -> float:
    """Images per second of a loader (its workers, seeds and collation) over `batches` batches, once the batches its
    workers prefetched while starting are taken (epochs repeat when the split is short)."""
    stream = endless(loader)
    for _ in range(1 + 2 * loader.num_workers):  # the start, and what DataLoader prefetches (2 batches a worker)
        next(stream)
    started, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += len(next(stream)[1])  # the labels: with erasing on the images are a dict
    return seen / (time.perf_counter() - started)


def cores_needed(step_rate: float, per_core: float) -> float:
    """Cores of augmentation that keep a step of `step_rate` images/s fed, at `per_core` images/s per core."""
    return step_rate / per_core
