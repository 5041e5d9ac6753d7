"""Data loaders whose augmentation is a pure function of (run seed, epoch, position).

Each training sample's random transform is seeded from where it falls in the epoch, not from
whatever state a worker process happens to be in. A run resumed mid-epoch therefore sees exactly
the images an uninterrupted run would have seen, whatever the number of workers or processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import random
import signal
from typing import Any, Callable, Iterator

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distill.data.device import Finish
from distill.data.sources import ImageSource
from distill.errors import DistillError
from distill.speed import lower_worker_priority


def sample_seeds(run_seed: int, epoch: int, count: int) -> np.ndarray:
    """The augmentation seed of every position of an epoch, in one call (a prefix never depends on `count`)."""
    return np.random.SeedSequence([run_seed, epoch]).generate_state(count, dtype=np.uint32)


def epoch_seed(run_seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([run_seed, epoch, 1 << 31]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed, for one sample's transform, the CPU generators timm and torchvision draw from: python's
    `random`, numpy's global state and torch's CPU generator. Never torch.manual_seed, which also
    reseeds every CUDA generator (drop path on a GPU) and costs about 90 us a call.

    In a loader worker these generators belong to the worker alone, so they are simply reseeded. In
    the training process itself (--num-workers 0) the caller's states are restored afterwards, so
    drop path and Mixup draw exactly what they would have drawn without the loader.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        saved = random.getstate(), np.random.get_state(legacy=False), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if not in_worker:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


ViewTarget = Callable[[int, int], torch.Tensor]


class Transformed(Dataset):
    """A source with a transform. Given an (index, seed) key, the transform's randomness is seeded; given an
    (index, seed, view) key, the sample also carries `view_target(index, view)` (a cached teacher's target)."""

    def __init__(self, source: ImageSource, transform: Callable, view_target: ViewTarget | None = None):
        self.source, self.transform, self.view_target = source, transform, view_target

    def __len__(self) -> int:
        return len(self.source)

    @property
    def finish(self) -> Finish:
        """What the device does to this dataset's batches (distill.data.device)."""
        return self.transform.finish

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[Any, ...]:
        if isinstance(key, tuple):
            index, seed, *view = key
            image = self.source.load(index)
            with seeded_rng(seed):
                image = self.transform(image)
            if view and self.view_target is not None:
                return image, self.source.targets[index], self.view_target(index, view[0])
            return image, self.source.targets[index]
        return self.transform(self.source.load(key)), self.source.targets[key]


class SeededSampler(Sampler):
    """Wraps a distributed sampler and pairs each index with a seed from its global position, or, with
    `view_seeds` (a teacher cache's: view_seeds[v][i], len() views), with the seed of view epoch % views of that image."""

    def __init__(self, inner: Sampler, run_seed: int, rank: int, world: int, view_seeds: Any = None):
        self.inner, self.run_seed, self.rank, self.world = inner, run_seed, rank, world
        self.view_seeds = view_seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        if self.view_seeds is not None:
            view = self.epoch % len(self.view_seeds)
            seeds = self.view_seeds[view]
            for index in self.inner:
                yield index, int(seeds[index]), view
            return
        seeds = sample_seeds(self.run_seed, self.epoch, len(self.inner) * self.world)
        for position, index in enumerate(self.inner):
            yield index, int(seeds[position * self.world + self.rank])

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
                 repeated_aug: int = 1, pin_memory: bool = False, view_seeds: Any = None,
                 idle_workers: bool = False) -> DataLoader:
    """Shuffled, sharded over processes, drop_last (Mixup needs even, full batches). `idle_workers`: the workers
    run at idle CPU priority (distill.speed.lower_worker_priority).

    Repeated augmentation runs with several processes only: each image comes `repeated_aug` times in a row and the
    processes take turns, so the copies mostly land on different processes, and an epoch reads 1/repeated_aug of the
    images (DeiT's sampler and epoch). DeiT's code samples this way on one process too (main.py: `if True:  #
    args.distributed`), where the copies share a batch and an epoch reads a third of the images; distill reads
    every image once there instead, a deliberate difference."""
    if repeated_aug > 1 and world > 1:
        inner: Sampler = EpochOffsetRepeatSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  num_repeats=repeated_aug, run_seed=seed)
    else:
        inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler = SeededSampler(inner, seed, rank, world, view_seeds)
    if len(sampler) < batch_size:
        raise DistillError(f"The training split gives {len(sampler)} images per process, fewer than one batch of {batch_size}; "
                           "lower --batch-size.")
    # A private generator: creating a loader iterator then draws no number from the global RNG, which
    # drop path and Mixup use, so a resumed run's random stream matches an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=torch.Generator(),
                      worker_init_fn=functools.partial(start_worker, idle=idle_workers, parent=os.getpid()))


def eval_loader(dataset: Transformed, *, batch_size: int, num_workers: int, pin_memory: bool = False,
                idle_workers: bool = False, persistent: bool = False) -> DataLoader:
    """In order, every image once. `persistent`: its workers stay between evaluations (a run evaluates every epoch,
    and forking tens of workers each time costs seconds on a GPU node); they keep the transform they were forked
    with, so a run whose transform changes (--img-size-schedule) does not ask for it."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=persistent and num_workers > 0,
                      generator=torch.Generator(), worker_init_fn=functools.partial(start_worker, idle=idle_workers, parent=os.getpid()))


def start_worker(worker_id: int, idle: bool = False, parent: int | None = None) -> None:
    """A DataLoader worker's first act: it dies with the process that started it (Linux's parent-death signal), so
    a training process killed outright (kill -9, a lost node's job teardown) leaves no worker behind to print a
    broken-pipe traceback or hold memory; then, with `idle`, it lowers its priority (distill.speed)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if parent is not None and os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(0)
    if idle:
        lower_worker_priority(worker_id)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: workers keep DataLoader's own watchdog
        return None


_prctl = _find_prctl()
