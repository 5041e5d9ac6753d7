"""Training throughput in fp32 and bf16 (autocast, as `--mixed-precision bf16` runs it) for distill's models.

Not part of the test suite. Times full training steps (forward, loss, backward, AdamW) of the
models distill trains, at the sizes its recipes use, and prints a markdown table:

    python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import platform
import time

import timm
import torch
import torch.nn.functional as F

MODELS = [
    # (label, timm name, constructor arguments, resolution, batch)
    ("RegNetY-200MF teacher, 32 px", "regnety_002", {}, 32, 64),
    ("DeiT-Ti width, depth 6, 32 px, patch 4", "deit_tiny_distilled_patch16_224",
     {"img_size": 32, "patch_size": 4, "depth": 6}, 32, 64),
    ("DeiT-Ti (depth 6, width 96), 32 px, patch 4", "deit_tiny_distilled_patch16_224",
     {"img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 96}, 32, 64),
    ("DeiT-Ti, 224 px (the paper's model)", "deit_tiny_distilled_patch16_224", {}, 224, 32),
    ("DeiT-S, 224 px (the paper's model)", "deit_small_distilled_patch16_224", {}, 224, 16),
]


def images_per_second(name: str, kwargs: dict, res: int, batch: int, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
            out = sum(out) / len(out) if isinstance(out, tuple) else out
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | batch | fp32 img/s | bf16 img/s | bf16 speed-up |")
    print("|---|---|---|---|---|")
    for label, name, kwargs, res, batch in MODELS:
        fp32 = images_per_second(name, kwargs, res, batch, False, args.steps)
        bf16 = images_per_second(name, kwargs, res, batch, True, args.steps)
        print(f"| {label} | {batch} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
