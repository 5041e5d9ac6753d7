"""The values a run leaves to `auto`: the precision (the launcher's, else bf16 on a GPU that has it), the global
batch (and how the processes share it), the learning rate (the stage's reference recipe at its own batch, scaled
linearly above it) and the regularisation profile (DeiT's for long runs, light for short ones)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from distill.config.checks import validate
from distill.config.fields import LONG_RUN_IMAGES, LR_REFERENCE_BATCH, ReferenceRate, StageConfig
from distill.errors import DistillError

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
# What `accelerate launch` and `accelerate config` leave in the environment for the processes they start.
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"

# --profile: the regularisation a run gets by default. DeiT's Table 9 is what the paper measured, on ImageNet
# for 300 epochs (384M images seen); on every small run measured here it costs accuracy (flowers12: 7 points at 15
# epochs, 12 at 100; docs/results.md). `auto` gives DeiT's from 10M images seen (ImageNet-1k for 8 epochs,
# CIFAR for 200), light augmentation below: a boundary chosen between the two, not measured at it.
PROFILES: dict[str, dict[str, Any]] = {
    "deit": {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "scale_min": 0.08,
             "warmup_epochs": 5.0},
    "short": {"aa": "none", "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "scale_min": 0.5, "warmup_epochs": 1.0},
}


def processes() -> int:
    """How many training processes this run has: torchrun and accelerate launch say so before any is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_precision() -> tuple[str, str]:
    """--mixed-precision auto: the launcher's bf16 or fp16 (its `no` is also what it sets when nothing is configured,
    so it is not taken as a choice), else bf16 on a GPU that has it, else fp32; and why, for the run's first line."""
    launcher = os.environ.get(LAUNCHER_PRECISION, "").strip().lower()
    if launcher in ("bf16", "fp16"):
        return launcher, f"the launcher's choice, {LAUNCHER_PRECISION}={launcher}"
    import torch  # here: the command line starts without torch

    if torch.cuda.is_available():  # Ampere and later compute in bf16; older GPUs only emulate it, slowly
        if torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")))[0] >= 8:
            return "bf16", "a GPU with bf16"
        return "no", "a GPU without bf16; --mixed-precision fp16 to use its fp16"
    return "no", "no GPU; --mixed-precision bf16 on a CPU with bf16 instructions"


MAX_WORKERS = 32  # per training process: beyond it a node's memory, not its cores, runs out first


def auto_workers() -> tuple[int, str]:
    """--num-workers auto, and why. On a GPU the workers are the CPU's main work (a DeiT step on an H100 wants 14 to 18
    cores of augmentation): every core of the machine but one for each training process, shared among the processes
    on it. On a CPU the workers share the cores with the training threads at idle priority (distill.speed), so half of
    a process's cores do, at least 2."""
    from distill.speed import usable_cores  # here: the command line starts without torch

    cores = usable_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, cores // local)
    import torch

    if torch.cuda.is_available():
        workers = min(MAX_WORKERS, max(1, share - 1))
        return workers, f"{cores} cores for {local} process(es), one core each kept for the training step"
    return min(MAX_WORKERS, max(2, share // 2)), f"{cores} cores for {local} process(es), no GPU: half a process's cores"


def split_batch(global_batch: int, world: int, limit: int, even: bool = False) -> tuple[int, int]:
    """How `world` processes share a global batch: (images per process per forward pass, micro-batches accumulated
    per optimizer step), the largest share per pass that is at most `limit` (and even, for Mixup/CutMix)."""
    if global_batch % world:
        sharing = [str(n) for n in range(1, min(global_batch, 512) + 1) if global_batch % n == 0][:14]
        raise DistillError(f"The global batch {global_batch} cannot be shared evenly by {world} processes; run on "
                           f"{', '.join(sharing)} ... processes, or give a --global-batch that is a multiple of {world}.")
    share = global_batch // world
    fits = [size for size in range(min(limit, share), 0, -1) if share % size == 0 and not (even and size % 2)]
    if not fits:
        raise DistillError(f"Mixup/CutMix need an even batch on each process, and {world} processes share the global "
                           f"batch {global_batch} as {share} each, which no even batch divides; give another "
                           "--global-batch (or pass --mixup 0 --cutmix 0).")
    return fits[0], share // fits[0]


def auto_rate(reference: ReferenceRate, global_batch: int) -> float:
    """The reference rate at the reference's own batch, scaled linearly above that batch and held below it.

    The linear rule (Goyal et al.; DeiT) is how the paper's recipes grow with the batch. Below the reference
    batch it would shrink an Adam rate toward nothing (DeiT's 5e-4 per 512 is 3.1e-5 at batch 32), and short
    runs at such rates barely learn (measured in docs/results.md); so it never scales down.
    """
    return reference.rate * max(1.0, global_batch / reference.batch)


def resolve_auto(config: StageConfig, world: int | None = None, train_size: int | None = None,
                 recorded_batch: int | None = None, recorded_precision: str | None = None
                 ) -> tuple[StageConfig, list[str]]:
    """Fill the values left to `auto` (precision, global batch, learning rate, regularisation profile) for this run,
    and say what was chosen.

    A function of the config, the number of processes, the training-set size (counted without decoding) and the
    global batch and precision a run folder already records (`recorded_batch`, `recorded_precision`: an interrupted
    or finished run keeps its own on any number of processes and any machine), so a dry run resolves exactly what the
    run will.
    """
    world = world or processes()
    updates: dict[str, Any] = {}
    notes: list[str] = []
    unused = getattr(config, "unused", ())
    late: list[str] = []  # said after the learning rate and the profile
    if config.mixed_precision == "auto":
        updates["mixed_precision"], why = auto_precision()
        if recorded_precision in PRECISION_NAMES and recorded_precision != updates["mixed_precision"]:
            updates["mixed_precision"], why = recorded_precision, f"kept from the run already in {config.run_dir()}"
        late.append(f"precision {PRECISION_NAMES[updates['mixed_precision']]} (auto: {why})")
    batch = config.global_batch or recorded_batch or config.batch_size * config.grad_accum * world
    if "global_batch" not in unused:
        updates["global_batch"] = batch
        if config.global_batch is None and recorded_batch and recorded_batch != config.batch_size * config.grad_accum * world:
            late.append(f"global batch {batch}, kept from the run already in {config.run_dir()} (it started on another "
                        "number of processes)")
    if config.lr is None and "lr" not in unused:
        reference = config.reference_lr
        rate = auto_rate(reference, batch)
        updates["lr"] = rate * LR_REFERENCE_BATCH / batch if config.lr_scale else rate
        how = "scaled linearly above" if batch > reference.batch else "held at and below"
        notes.append(f"lr {rate:.3g} at global batch {batch} (auto: {reference.source}; {how} that batch)")
    profile, why = config.profile, "--profile"
    if profile == "auto":
        seen = config.epochs * train_size if train_size else None
        profile = "deit" if seen is not None and seen >= LONG_RUN_IMAGES else "short"
        why = (f"{config.epochs} epoch(s) x {train_size:,} images {'>=' if profile == 'deit' else '<'} "
               f"{LONG_RUN_IMAGES // 1_000_000}M" if seen is not None else "training-set size unknown before loading")
    chosen = {key: value for key, value in PROFILES[profile].items()
              if getattr(config, key, 0) is None and key not in unused}
    updates.update(chosen)
    if chosen:
        notes.append(f"{profile} profile ({why}): " + ", ".join(f"{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                                                                  else f"{key} {value}" for key, value in chosen.items()))
    if config.num_workers is None and "num_workers" not in unused:
        updates["num_workers"], why = auto_workers()
        late.append(f"{updates['num_workers']} loader workers per process (auto: {why})")
    resolved = dataclasses.replace(config, **updates)
    validate(resolved)
    if resolved.sync_bn and world > 1 and "sync_bn" not in unused:
        import torch

        if not torch.cuda.is_available():
            raise DistillError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only.")
    notes += late
    if "global_batch" not in unused:
        mixing = (resolved.mixup or 0) > 0 or (resolved.cutmix or 0) > 0
        per_process, accumulation = split_batch(batch, world, resolved.batch_size, even=mixing)
        if world > 1 or accumulation > 1:
            rate = f", lr {resolved.effective_lr(world):.3g}" if "lr" not in unused else ""
            notes.append(f"global batch {batch} = {world} x {per_process} x {accumulation} (processes x images per "
                         f"process x accumulated micro-batches){rate}")
        if resolved.repeated_aug > 1 and world == 1:
            notes.append(f"repeated augmentation {resolved.repeated_aug} off on one process, where its copies would "
                         "share a batch: an epoch reads every image once")
    return resolved, notes
