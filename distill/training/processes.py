"""The processes of a run: the accelerator (and with it the process group and its timeout, the device's kernels
and precision), and what the processes keep in common: BatchNorm statistics, and the place in an epoch where a
resume on another number of them goes on."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from timm.utils import distribute_bn
from torch import nn

from distill.config import processes
from distill.errors import DistillError
from distill.speed import keep_freed_memory

# The process group's timeout, once the group exists: the command line names it when a collective outlasts it.
PROCESS_GROUP: dict[str, float] = {}


def make_accelerator(mixed_precision: str, grad_accum: int = 1, compile: bool = False,
                     log_with: list[str] | None = None, project_dir: Path | None = None, dist_timeout: float = 1800,
                     deterministic: bool = False, tf32: bool = False) -> Accelerator:
    """A fresh Accelerator for one run (a pipeline may change precision between stages); with `compile`,
    accelerate's prepare() hands the model to torch.compile (inductor); with `log_with`, accelerate's trackers
    write under `project_dir`. The first one of a process makes the process group, with `dist_timeout`.

    On CUDA, cuDNN picks its fastest kernels (cudnn.benchmark) and, with `tf32` (training), fp32 matrix products use
    TF32, as timm's and DeiT's training scripts do; with `deterministic`, PyTorch's deterministic kernels instead. The
    tools (evaluate, predict, benchmark) keep full fp32 unless they ask."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DistillError("fp16 mixed precision needs a GPU; on a CPU use --mixed-precision bf16.")
    AcceleratorState._reset_state(reset_partial_state=False)  # keeps the process group, forgets the precision
    # Several processes without CUDA (torchrun on a CPU): accelerate joins them over gloo only when told
    # it runs on the CPU; a single process keeps accelerate's own device choice (CUDA, MPS, XPU, CPU).
    several = processes() > 1
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout)),
                # each process keeps the BatchNorm statistics of its own batches (averaged before evaluations and
                # saves) instead of taking process 0's at every forward pass
                DistributedDataParallelKwargs(broadcast_buffers=False)]
    if torch.cuda.is_available():
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
        torch.backends.cudnn.benchmark = not deterministic
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")  # TF32 or not for fp32 matrix products
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=several and not torch.cuda.is_available(),
                              gradient_accumulation_steps=grad_accum, dynamo_backend="inductor" if compile else None,
                              log_with=log_with or None, project_dir=str(project_dir) if project_dir is not None else None,
                              kwargs_handlers=handlers)
    if several and "seconds" not in PROCESS_GROUP:
        PROCESS_GROUP["seconds"] = dist_timeout
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # distill.speed: no page faults for each step's activations
    return accelerator


def close_processes() -> None:
    """End the process group once the command is done (runs keep it open for the command's next run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def average_batchnorm(acc: Accelerator, *modules: nn.Module | None) -> None:
    """Every process's BatchNorm statistics replaced by their mean over the processes (timm's distribute_bn), so all
    evaluate, and save, the same model. A collective: every process calls it."""
    if acc.num_processes == 1:
        return
    for module in modules:
        if module is not None and any("running_mean" in name for name, _ in module.named_buffers()):
            distribute_bn(module, acc.num_processes, reduce=True)


def resume_skip(progress: dict[str, int], world: int, per_process: int, accumulation: int) -> int:
    """The micro-batches each process skips to resume inside an epoch: the images the saved run had read of it, over
    all its processes, at this run's images per pass. The loaders deal the epoch's images to the processes in turn,
    so the first k passes of all processes read the first k x images-per-pass of the epoch, on any number of them."""
    if not progress.get("batch"):
        return 0
    images = progress.get("images")
    if images is None:  # a state saved before the global position was recorded: same processes, same batch
        return progress["batch"]
    return images // (per_process * world)
