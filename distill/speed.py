"""Settings that change how fast a run computes, never what it computes; each measured in docs/results.md section 8.

- glibc's allocator, by default, hands a large freed block back to the kernel (unmapping it, or trimming the top of
  its heap), so the next step's activations of the same size fault in fresh zeroed pages: on a DeiT-Ti step about
  120,000 page faults and 10 to 15 % of the time. `keep_freed_memory` asks glibc (mallopt) to keep freed memory for
  reuse, as jemalloc or tcmalloc would; the process then holds its peak between steps, which it reaches every step
  anyway (PyTorch's caching allocator serves CUDA only). Used on a CPU.
- PyTorch's fused attention kernel (scaled_dot_product_attention) is slow in bf16 on a CPU: timm's own
  unfused attention (two matmuls and a softmax) runs a DeiT-Ti step 1.3x (224 px) to 1.9x (32 px / patch 4)
  faster there, for some more memory (it keeps each layer's attention matrix). In fp32 the two are even, and on a
  GPU the fused kernel is the fast one, so only CPU + bf16 switches by default (`--attention auto`).
- Convolutions run faster on channels-last tensors with oneDNN (CPU) and with tensor cores (GPU, mixed precision):
  `--channels-last` is on by default for convolutional models on a CPU and on a GPU with mixed precision (a ViT's
  one patch convolution is left alone). On a CPU in bf16, PyTorch's channels-last grouped convolution returns
  non-finite gradients, in about one call out of two to eight, when a strided convolution meets a 1x1 input (RegNet's
  last stage at 32 px); it ended a FixRes teacher's run with a NaN loss. `to_channels_last` therefore has such
  convolutions compute a 1x1 input in the standard layout (`_standard_layout_for_1x1`), which no library does.
- Loader workers share a CPU with the training threads. When a worker takes a core, one of PyTorch's threads
  stops and the other waits for it at the end of each parallel operation, so a worker's few milliseconds cost the
  step far more (RegNetY-002 at 32 px: forward and backward 76 ms a step with the data loaded inline, 133 ms beside
  two workers). `--idle-workers` (default on a CPU) runs the workers at Linux's idle priority (SCHED_IDLE; elsewhere
  the lowest nice value): they use the cores the training threads leave, and when they fall behind the loop waits
  for a batch, which frees both cores for them. Augmentation is seeded per sample, so what a run computes does not
  depend on when workers run. The price: a busy program of normal priority beside the run starves its workers.
- PyTorch sends fp32 matrix multiplications on a CPU to MKL, which runs its AVX-512 code only on Intel CPUs: on
  an AMD CPU it runs its AVX2 code, at half the rate oneDNN (also inside PyTorch, used for bf16 and for
  convolutions) reaches with AVX-512 on the same shapes (DeiT-Ti's linear layers: about 190 against 400 GFLOP/s on
  2 Zen 5 cores). PyTorch has no switch for fp32 at full precision (its oneDNN fp32 switch computes in bf16 or
  TF32), so `--onednn-linear` (default on an AVX-512 CPU not made by Intel) has timm's linear layers call oneDNN's
  linear (`_OneDNNLinear`: forward, input and weight gradients all in oneDNN), the same fp32 maths in another
  summation order. Off under autocast, in bf16 and fp16, on a GPU and inside torch.compile, which keep PyTorch's.
- PyTorch runs one compute thread per core, and each parallel operation ends when its slowest thread does. When
  another program keeps a core busy, the thread that shares the core with it is descheduled for whole time slices
  and every other thread waits for it: on 2 cores beside one busy program a run trains 3.5-4x slower than alone, where
  a fair share of the machine would cost 2x. `--threads auto` (the default) looks, as a run starts on a CPU, at how
  many of its cores other programs keep busy (the kernel's per-core counters over 0.1 s) and trains with one thread
  per core left (at least one); alone it keeps PyTorch's thread per core. A user's OMP_NUM_THREADS (torchrun sets 1
  for several processes) is left as it is. This one setting can change what a CPU run computes: PyTorch splits
  parallel sums by thread, so another count sums in another order. The count is printed when it is not one per core,
  saved with the training state, and a resumed run takes it again, so a resume stays exact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache, partial
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError

if TYPE_CHECKING:
    from accelerate import Accelerator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap is kept
_USER_CHOSE_ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process; the loader's forked workers inherit it).
    Left alone when the user chose: DISTILL_KEEP_MALLOC=1, glibc's own MALLOC_* variables or GLIBC_TUNABLES for
    malloc, or another allocator preloaded (jemalloc, tcmalloc, mimalloc). Returns whether it is in effect."""
    if "tuned" in _state:
        return _state["tuned"]
    preload = os.environ.get("LD_PRELOAD", "")
    chosen = (os.environ.get("DISTILL_KEEP_MALLOC") == "1" or any(v in os.environ for v in _USER_CHOSE_ALLOCATOR)
              or "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")))
    tuned = False
    if not chosen:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # glibc only: musl, macOS and Windows have none, and keep their behaviour
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            tuned = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    _state["tuned"] = tuned
    return tuned


def fused_attention(choice: str, device_type: str, mixed_precision: str) -> bool | None:
    """Whether timm's attention layers should use the fused kernel: `fused`/`manual` as asked; `auto` unfused on
    a CPU in bf16 (measured faster), else None (leave timm's choice, which TIMM_FUSED_ATTN also sets)."""
    if choice == "fused":
        return True
    if choice == "manual":
        return False
    if "TIMM_FUSED_ATTN" in os.environ:
        return None
    return False if device_type == "cpu" and mixed_precision == "bf16" else None


def set_fused_attention(modules: Iterable[nn.Module | None], fused: bool | None) -> int:
    """Switch every timm attention layer (they all carry `fused_attn` and implement both paths) in these modules;
    returns how many were switched. The weights and the maths are the same; only the kernel differs."""
    if fused is None:
        return 0
    count = 0
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(getattr(layer, "fused_attn", None), bool):
                layer.fused_attn = fused
                count += 1
    return count


def choose_kernels(acc: "Accelerator", modules: Iterable[nn.Module | None], attention: str = "auto",
                   onednn: bool | None = None) -> None:
    """timm's attention kernel and the linear layers' library for these modules on the accelerator's device and
    precision (--attention, --onednn-linear)."""
    modules = list(modules)
    set_fused_attention(modules, fused_attention(attention, acc.device.type, acc.mixed_precision))
    set_linear_kernel(modules, onednn_linear(onednn, acc.device.type))


@cache
def cpu_vendor() -> str:
    """The CPU's vendor ("GenuineIntel", "AuthenticAMD", ...) from Linux's /proc/cpuinfo; "" where unknown. Read once
    per process (every evaluation chooses kernels again)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_linear_available() -> bool:
    """PyTorch was built with oneDNN and has its linear operator (the one inductor calls on a CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_MISSING = ("--onednn-linear needs a PyTorch built with oneDNN (torch.backends.mkldnn), which this one is not; "
                  "drop the flag.")


def onednn_linear(choice: bool | None, device_type: str) -> bool:
    """--onednn-linear as asked (refused where PyTorch has no oneDNN; config.validate refuses it first), or by default
    (None) on an AVX-512 CPU from another vendor than Intel, where MKL's fp32 matrix multiplication runs its AVX2 code
    at half oneDNN's rate (module docstring). On AVX2-only CPUs both libraries run AVX2: left alone."""
    if choice and not onednn_linear_available():
        raise DistillError(ONEDNN_MISSING)
    if choice is not None:
        return choice and device_type == "cpu"
    return (device_type == "cpu" and cpu_vendor() not in ("", "GenuineIntel") and onednn_linear_available()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's fp32 linear: input @ weight.T (+ bias) over the last dimension, any leading ones."""
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with the forward and both gradients computed by oneDNN (PyTorch defines no gradient for its oneDNN
    linear, so the three products are written here); saves only what the gradients asked for need, as F.linear
    does. Not twice differentiable (oneDNN's linear has no gradient): a double backward raises."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, input: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(input if weight.requires_grad else None, weight if input.requires_grad else None)
        ctx.input_shape = input.shape
        ctx.has_bias = bias is not None
        return _linear(input, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ weight
            grad_input = _linear(grad_2d, weight.t().contiguous()).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:  # grad.T @ input, over the batch; the smaller operand goes first (measured faster)
            input_2d = input.reshape(-1, input.shape[-1])
            grad_weight = (_linear(input_2d.t(), grad_2d.t()).t().contiguous() if input_2d.shape[1] <= grad_2d.shape[1]
                           else _linear(grad_2d.t(), input_2d.t()))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias


def _onednn_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward through oneDNN where it computes the same fp32 maths; PyTorch's own everywhere else."""
    if (input.dtype == torch.float32 and self.weight.dtype == torch.float32 and input.device.type == "cpu"
            and input.dim() >= 2 and input.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _OneDNNLinear.apply(input, self.weight, self.bias)
    return F.linear(input, self.weight, self.bias)


def set_linear_kernel(modules: Iterable[nn.Module | None], onednn: bool) -> int:
    """Have every nn.Linear in these modules compute through oneDNN (or, with onednn False, PyTorch's own forward
    again); returns how many. Weights and state dicts are untouched; a deepcopy (the EMA) keeps the choice."""
    count = 0
    for module in modules:
        for layer in module.modules() if module is not None else ():
            if type(layer) is nn.Linear:
                if onednn:  # a partial, not a bound method: it pickles (by the function's name) and deep-copies
                    layer.forward = partial(_onednn_linear_forward, layer)
                else:
                    layer.__dict__.pop("forward", None)
                count += 1
    return count


def is_convolutional(module: nn.Module) -> bool:
    """More than one 2-D convolution: a convnet, not a ViT with its patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def channels_last(choice: bool | None, device_type: str, mixed_precision: str) -> bool:
    """--channels-last as asked, or by default (None) on a CPU, and on a GPU with mixed precision."""
    if choice is not None:
        return choice
    return device_type == "cpu" or (device_type == "cuda" and mixed_precision in ("bf16", "fp16"))


def _standard_layout_for_1x1(self: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Conv2d._conv_forward, with a 1x1 input and the weight in the standard layout: oneDNN's bf16 channels-last
    strided convolution returns non-finite gradients there (module docstring). Both are needed (either alone still
    fails); on a 1x1 map the copies cost nothing."""
    if input.shape[-2:] == (1, 1):
        input, weight = input.clone(memory_format=torch.contiguous_format), weight.contiguous()
    return nn.Conv2d._conv_forward(self, input, weight, bias)


def to_channels_last(modules: Iterable[nn.Module | None]) -> list[nn.Module]:
    """Put the convolutional ones of these modules in channels-last memory format; returns those. Their strided
    convolutions compute a 1x1 input in the standard layout (see _standard_layout_for_1x1)."""
    converted = [m for m in modules if m is not None and is_convolutional(m)]
    for module in converted:
        module.to(memory_format=torch.channels_last)
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
                conv._conv_forward = partial(_standard_layout_for_1x1, conv)
    return converted


def idle_workers(choice: bool | None, device_type: str) -> bool:
    """--idle-workers as asked, or by default (None) on a CPU, where the workers share cores with the step. On a GPU
    the workers are the CPU's main work and keep their priority."""
    return device_type == "cpu" if choice is None else choice


def lower_worker_priority(worker_id: int) -> None:
    """A DataLoader worker_init_fn: this worker runs only on cores nothing else wants (SCHED_IDLE, Linux), or at the
    lowest nice value where there is no SCHED_IDLE (macOS); nothing where neither exists (Windows)."""
    try:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif hasattr(os, "nice"):
            os.nice(19)
    except OSError:  # a sandbox that forbids it: the worker keeps its priority
        pass


THREAD_SAMPLE_SECONDS = 0.1  # how long the cores are watched before a run chooses its threads
PYTORCH_THREADS = torch.get_num_threads()  # PyTorch's own choice (its physical cores, or OMP_NUM_THREADS), at import


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores_elsewhere(seconds: float = THREAD_SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other programs keep busy, watched for `seconds` while this process sleeps
    (psutil's per-core counters, less this process's own CPU time); None where psutil cannot read them."""
    import psutil  # accelerate's own dependency

    try:
        me = psutil.Process()
        cores = me.cpu_affinity() if hasattr(me, "cpu_affinity") else list(range(psutil.cpu_count() or 1))
        own_before = sum(me.cpu_times()[:2])
        percent = psutil.cpu_percent(interval=seconds, percpu=True)
        own = sum(me.cpu_times()[:2]) - own_before
    except (psutil.Error, OSError):
        return None
    return max(0.0, sum(percent[core] for core in cores if core < len(percent)) / 100 - own / seconds)


def choose_threads(choice: str, device_type: str, kept: int | None = None) -> str | None:
    """Set PyTorch's compute threads for a run (see the module's notes); returns a line saying what was chosen and
    why, or None where nothing was decided (a GPU run, PyTorch's own choice kept). On a CPU the thread count is part
    of what a run computes, not only how fast (parallel sums are split by thread), so a resumed run is given the
    count its state was saved with (`kept`), and that state then resumes bit for bit."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's and accelerate launch's processes here
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return f"threads {int(choice)} (--threads)"
    if device_type != "cpu":
        return None
    if "OMP_NUM_THREADS" in os.environ:
        return f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    if kept:
        torch.set_num_threads(int(kept))
        return f"threads {int(kept)} (auto: kept from the saved state, whose sums a resumed run repeats exactly)"
    if local_processes > 1:  # the job's other processes start beside this one: they are not other programs
        share = max(1, PYTORCH_THREADS // local_processes)
        torch.set_num_threads(share)
        return f"threads {share} (auto: {PYTORCH_THREADS} cores shared by {local_processes} processes)"
    busy = busy_cores_elsewhere()
    taken = int(busy + 0.5) if busy is not None else 0
    threads = max(1, PYTORCH_THREADS - taken)
    torch.set_num_threads(threads)  # alone: PyTorch's own count again (an earlier run in this process may have lowered it)
    if taken == 0:
        return None
    return (f"threads {threads} of {PYTORCH_THREADS} cores (auto: other programs keep {busy:.1f} core(s) busy; "
            "--threads N to choose)")
