"""Data loaders whose augmentation is a pure function of (run seed, epoch, position).

Each training sample's random transform is seeded from where it falls in the epoch, not from
whatever state a worker process happens to be in. A run resumed mid-epoch therefore sees exactly
the images an uninterrupted run would have seen, whatever the number of workers or processes.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distill.data.sources import ImageSource
from distill.errors import DistillError


def sample_seed(run_seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([run_seed, epoch, position]).generate_state(1)[0])


def epoch_seed(run_seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([run_seed, epoch]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for one sample, then restore the caller's generators."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class Transformed(Dataset):
    """A source with a transform. Given an (index, seed) key, the transform's randomness is seeded."""

    def __init__(self, source: ImageSource, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            image = self.source.load(index)
            with seeded_rng(seed):
                return self.transform(image), self.source.targets[index]
        return self.transform(self.source.load(key)), self.source.targets[key]


class SeededSampler(Sampler):
    """Wraps a distributed sampler and pairs each index with a seed from its global position."""

    def __init__(self, inner: Sampler, run_seed: int, rank: int, world: int):
        self.inner, self.run_seed, self.rank, self.world = inner, run_seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.inner):
            yield index, sample_seed(self.run_seed, self.epoch, position * self.world + self.rank)

    def __len__(self) -> int:
        return len(self.inner)


class EpochOffsetRepeatSampler(RepeatAugSampler):
    """timm's repeated-augmentation sampler, with the run seed mixed into its per-epoch shuffle."""

    def __init__(self, *args: Any, run_seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.run_seed = run_seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch_seed(self.run_seed, epoch))


def train_loader(dataset: Transformed, *, batch_size: int, seed: int, rank: int, world: int, num_workers: int,
                 repeated_aug: int = 1, pin_memory: bool = False) -> DataLoader:
    """Shuffled, sharded over processes, drop_last (Mixup needs even, full batches)."""
    if repeated_aug > 1:
        inner: Sampler = EpochOffsetRepeatSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  num_repeats=repeated_aug, run_seed=seed)
    else:
        inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler = SeededSampler(inner, seed, rank, world)
    if len(sampler) < batch_size:
        raise DistillError(f"The training split gives {len(sampler)} images per process, fewer than one batch of {batch_size}; "
                           "lower --batch-size.")
    # A private generator: creating a loader iterator then draws no number from the global RNG, which
    # drop path and Mixup use, so a resumed run's random stream matches an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=torch.Generator())


def eval_loader(dataset: Transformed, *, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator())
