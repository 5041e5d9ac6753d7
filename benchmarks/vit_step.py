"""A timm ViT's training step alone (no distill code): the allocator and attention-kernel figures of results.md §8.

Not part of the test suite. One fresh process per setting, so glibc's allocator starts from its defaults:

    python benchmarks/vit_step.py --precision bf16                       # glibc defaults, fused attention
    python benchmarks/vit_step.py --precision bf16 --keep-freed-memory   # mallopt as distill.speed does
    python benchmarks/vit_step.py --precision bf16 --keep-freed-memory --manual-attention
    python benchmarks/vit_step.py --model deit_small_patch16_224 --img-size 384 --patch-size 16 --batch-size 8 ...
    python benchmarks/vit_step.py --precision no --keep-freed-memory --roofline   # how near the CPU's limit
    python benchmarks/vit_step.py --precision no --keep-freed-memory --onednn-linear --roofline

Prints ms a step, images/s and page faults a step (the minor faults of this process). `--roofline` also counts the
step's floating-point operations (torch's FlopCounterMode: matrix multiplications and convolutions) and sets the
rate achieved against the rate of one large matrix multiplication in the same precision on the same threads, through
PyTorch's `@` (MKL for fp32 on a CPU, oneDNN for bf16) and through oneDNN's linear (what `--onednn-linear` calls).
"""

from __future__ import annotations

import argparse
import resource
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from distill.speed import _linear, keep_freed_memory, set_fused_attention, set_linear_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_distilled_patch16_224")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "no"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--manual-attention", action="store_true")
    parser.add_argument("--onednn-linear", action="store_true", help="linear layers through oneDNN (distill.speed)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--roofline", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        assert keep_freed_memory(), "glibc's mallopt is not available here"
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, patch_size=args.patch_size, num_classes=10,
                              drop_path_rate=0.1)
    set_fused_attention([model], not args.manual_attention)
    set_linear_kernel([model], args.onednn_linear)
    token = hasattr(model, "set_distilled_training")
    if token:
        model.set_distilled_training(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = step_model(images)
            heads = out if token else (out,)
            loss = sum(torch.nn.functional.cross_entropy(h, labels) for h in heads) / len(heads)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    print(f"{args.model} {args.img_size}/{args.patch_size} batch {args.batch_size} {args.precision} "
          f"keep-freed-memory={args.keep_freed_memory} manual-attention={args.manual_attention} "
          f"onednn-linear={args.onednn_linear}: "
          f"{seconds * 1000:.1f} ms a step, {args.batch_size / seconds:.1f} img/s, {faults:,.0f} page faults a step")
    if args.roofline:
        set_linear_kernel([model], False)  # the counter sees PyTorch's matrix multiplications only: the same FLOPs
        with FlopCounterMode(display=False) as counter:
            step()
        achieved = counter.get_total_flops() / seconds / 1e9
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        rates = {}
        for library, product in (("torch @", lambda: a @ b), ("oneDNN linear", lambda: _linear(a, b))):
            product()
            started = time.perf_counter()
            for _ in range(5):
                product()
            rates[library] = 5 * 2 * 4096**3 / (time.perf_counter() - started) / 1e9
        best = max(rates.values())
        print(f"step: {counter.get_total_flops() / 1e9:.1f} GFLOP, {achieved:.0f} GFLOP/s; one 4096x4096 matrix "
              f"multiplication: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
              + f"; the step runs at {achieved / best * 100:.0f} % of the best")


if __name__ == "__main__":
    main()
