"""`distill benchmark`: the paper's Table 3.5 (parameters, throughput) for any timm model or distill checkpoint.

For each model, in a process of its own (so that its peak memory is its own): parameters, GFLOPs of one
forward pass (torch's FlopCounterMode; a multiply-add counts 2), inference images/s, and training images/s
of distill's own step (`engine.train_step`: Mixup/CutMix, forward, loss, backward, optimizer) as a student
alone, with a teacher on the fly, and with a cached teacher's targets; each once on synthetic batches (the
step alone) and once through the data pipeline (decoding and augmentation in loader workers). Peak memory is
CUDA's allocator peak on a GPU, the process's peak resident set on a CPU.
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distill.console import console
from distill.errors import DistillError

VARIANTS = ("alone", "teacher", "cached")


@dataclass
class BenchSettings:
    batch_size: int = 64
    res: int = 224
    steps: int = 10
    warmup: int = 3
    mixed_precision: str = "no"
    teacher: str = "regnety_002"
    training: bool = True
    data_dir: Path | None = None
    num_workers: int = 2
    compile: bool = False
    channels_last: bool | None = None  # None: the training stages' default (distill.speed.channels_last)
    onednn_linear: bool | None = None  # None: the training stages' default (distill.speed.onednn_linear)


def build(source: str, res: int, num_classes: int | None = None) -> tuple[nn.Module, str, int]:
    """A model from a distill checkpoint (path) or a timm name, at `res`: (model, what it is, classes)."""
    import timm

    from distill.weights.checkpoint import build_model, read_checkpoint
    from distill.students import resize

    if Path(source).exists():
        ckpt = read_checkpoint(source)
        model = build_model(ckpt)
        if hasattr(model, "pos_embed") and ckpt.img_size != res:
            resize(model, res)
        return model, f"{ckpt.model_name} ({ckpt.path})", len(ckpt.classes)
    if not timm.is_model(source):
        from distill.weights.models import check_model_name

        check_model_name(source)
    classes = num_classes or 1000
    try:
        model = timm.create_model(source, pretrained=False, num_classes=classes, img_size=res)
    except TypeError:  # convnets take any resolution and no img_size
        model = timm.create_model(source, pretrained=False, num_classes=classes)
    return model, source, classes


def _rate(step: Callable[[], Any], images: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        result = step()
    if isinstance(result, torch.Tensor):
        float(result.detach().float().sum())  # wait for the device once, at the end
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images * steps / (time.perf_counter() - started)


def _gflops(model: nn.Module, res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, res, res))
    return counter.get_total_flops() / 1e9


def uniform_target(classes: int, index: int, view: int) -> torch.Tensor:
    """A stand-in cached teacher target (what a cache read costs is not the question here); picklable, so the
    loader's worker processes can take it."""
    return torch.full((classes,), 1.0 / classes)


def measure(source: str, settings: BenchSettings) -> dict[str, Any]:
    """Everything for one model, in this process."""
    from timm.optim import create_optimizer_v2

    from distill.data import NORMS, Finish, Transformed, open_dataset, train_loader
    from distill.tools.loader_profile import endless
    from distill.training.processes import make_accelerator
    from distill.training.step import Prepared, TargetMixup, train_step
    from distill.losses import DistillationLoss, base_criterion
    from distill.speed import channels_last, choose_kernels, idle_workers, to_channels_last
    from distill.students import has_dist_token, set_distilled_training
    from distill.teachers import FrozenTeacher

    torch.manual_seed(0)
    model, what, classes = build(source, settings.res)
    row: dict[str, Any] = {"model": what, "res": settings.res, "batch": settings.batch_size,
                           "precision": settings.mixed_precision,
                           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                           "gflops": round(_gflops(model, settings.res), 3)}
    acc = make_accelerator(settings.mixed_precision, compile=settings.compile)
    choose_kernels(acc, [model], onednn=settings.onednn_linear)  # the kernels `distill student` would use here
    device = acc.device
    nhwc = channels_last(settings.channels_last, device.type, settings.mixed_precision)
    batch = torch.randn(settings.batch_size, 3, settings.res, settings.res)
    nhwc_inputs = bool(nhwc and to_channels_last([model]))
    if nhwc_inputs:
        batch = batch.contiguous(memory_format=torch.channels_last)
    inference = acc.prepare(model).eval()
    batch = batch.to(device)
    with torch.no_grad(), acc.autocast():
        row["infer_img_s"] = round(_rate(lambda: inference(batch), settings.batch_size, settings.steps, settings.warmup,
                                         device), 1)
    if settings.training:
        teacher_model, teacher_what, _ = build(settings.teacher, settings.res, classes)
        if nhwc:
            to_channels_last([teacher_model])
        teacher = FrozenTeacher(teacher_model, NORMS["imagenet"], NORMS["imagenet"]).to(device)
        choose_kernels(acc, [teacher], onednn=settings.onednn_linear)
        if settings.compile:
            teacher.model = torch.compile(teacher.model)
        row["teacher"] = teacher_what
        mean, std = NORMS["imagenet"]
        splits = open_dataset(None if settings.data_dir else "digits", settings.data_dir)
        if len(splits.classes) > classes:  # a model with fewer classes than the data: as many classes as it has
            splits = open_dataset(None if settings.data_dir else "digits", settings.data_dir,
                                  classes=splits.classes[:classes])
        transform = deit_train_transform(settings.res)
        token = has_dist_token(model)
        set_distilled_training(model, True)
        for variant in VARIANTS:
            model.train()
            optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
            prepared, optimizer = acc.prepare(model, optimizer)
            kind = "none" if variant == "alone" else "hard"
            criterion = DistillationLoss(base_criterion(0.1, True), teacher if variant == "teacher" else None, kind,
                                         cached=variant == "cached")
            mixup = TargetMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
            parts = Prepared(prepared, optimizer, None, criterion, mixup, None, None, 0, [prepared],
                             finish=Finish(mean, std))
            labels = torch.randint(0, classes, (settings.batch_size,))
            pixels = torch.randint(0, 256, (settings.batch_size, 3, settings.res, settings.res), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0)).to(device)  # as a loader ships them
            cached = [torch.softmax(torch.randn(settings.batch_size, classes), dim=1)] if variant == "cached" else []

            def synthetic() -> torch.Tensor:
                return train_step(acc, parts, (pixels, labels, *cached), channels_last=nhwc_inputs)

            row[f"train_{variant}_img_s"] = round(_rate(synthetic, settings.batch_size, settings.steps, settings.warmup,
                                                        device), 1)
            target = functools.partial(uniform_target, classes) if variant == "cached" else None
            data = Transformed(splits.train, transform, target)
            loader = train_loader(data, batch_size=settings.batch_size, seed=0, rank=0, world=1,
                                  num_workers=settings.num_workers, view_seeds=_views(len(data)) if target else None,
                                  idle_workers=idle_workers(None, device.type))
            batches = endless(loader)
            parts.finish = data.finish
            row[f"train_{variant}_data_img_s"] = round(_rate(
                lambda: train_step(acc, parts, next(batches), channels_last=nhwc_inputs),
                settings.batch_size, settings.steps, settings.warmup, device), 1)
        row["token"] = token
    if device.type == "cuda":
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        row["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _views(images: int) -> Any:
    import numpy as np

    return np.arange(images, dtype=np.uint32)[None]


def _child(source: str, settings: BenchSettings, queue: Any) -> None:
    try:
        queue.put(("ok", measure(source, settings)))
    except DistillError as error:
        queue.put(("error", error.sentence))
    except Exception as error:  # reported as a sentence by the parent
        queue.put(("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


def run(sources: list[str], settings: BenchSettings) -> list[dict[str, Any]]:
    """Each model in a fresh process of its own, one after the other."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for source in sources:
        queue = context.Queue()
        process = context.Process(target=_child, args=(source, settings, queue))
        process.start()
        status, value = queue.get()
        process.join()
        if status == "error":
            raise DistillError(f"Benchmarking {source} failed: {value}")
        rows.append(value)
        console.print(f"{value['model']}: inference {value['infer_img_s']} img/s"
                      + (f", training {value.get('train_alone_img_s')} img/s alone" if settings.training else ""),
                      soft_wrap=True)
    return rows


def table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    out = Table(title="benchmark (images/s: inference, then training steps: alone, with a teacher on the fly, with a "
                      "cached teacher; +data: through the data pipeline)", title_justify="left")
    columns = [("model", "model"), ("params M", "params_m"), ("GFLOPs", "gflops"), ("infer", "infer_img_s")]
    for variant in VARIANTS:
        columns += [(variant, f"train_{variant}_img_s"), ("+data", f"train_{variant}_data_img_s")]
    columns.append(("peak MB", "peak_memory_mb"))
    columns = [(title, key) for title, key in columns if any(key in row for row in rows)]
    for title, _ in columns:
        out.add_column(title, justify="left" if title == "model" else "right", overflow="fold")
    for row in rows:
        out.add_row(*[str(row.get(key, "-")) for _, key in columns])
    return out


def deit_train_transform(res: int) -> Any:
    """DeiT's training preprocessing (RandAugment m9, random erasing 0.25, random-resized crop from 8 %) at `res`."""
    from distill.data import NORMS, train_transform

    mean, std = NORMS["imagenet"]
    return train_transform(res, mean=mean, std=std, aa="rand-m9-mstd0.5-inc1", reprob=0.25, scale_min=0.08)


def loader_report(data: str, settings: BenchSettings, step_rates: dict[str, float] | None) -> dict[str, Any]:
    """The input pipeline alone on `data` (a dataset name or an image folder): parts, per core, bytes, a real loader's
    rate with the benchmark's workers, and the cores one GPU needs at each step rate (1000 images/s if none)."""
    from distill.data import Transformed, open_dataset, train_loader
    from distill.tools.loader_profile import cores_needed, loader_rate, profile_parts

    folder = Path(data).expanduser()
    if folder.is_dir():
        splits = open_dataset(None, folder)
    elif not data or data.startswith((".", "/", "~")) or "\\" in data:
        raise DistillError(f"--data {data}: no such folder (a dataset name or an image folder).")
    else:
        splits = open_dataset(data, None)
    transform = deit_train_transform(settings.res)
    images = settings.batch_size * max(settings.steps, 1)
    report = {"data": data, "res": settings.res, "batch": settings.batch_size,
              **profile_parts(splits.train, transform, images, settings.batch_size)}
    report["fp32_bytes_per_image"] = 3 * settings.res ** 2 * 4 + 8  # what workers shipped before: normalised fp32
    report["workers"] = settings.num_workers
    loader = train_loader(Transformed(splits.train, transform), batch_size=settings.batch_size, seed=0, rank=0, world=1,
                          num_workers=settings.num_workers)
    report["loader_img_s"] = round(loader_rate(loader, max(settings.steps, 1)), 1)
    rates = step_rates or {"1000 images/s": 1000.0}
    report["cores_per_gpu"] = {name: round(cores_needed(rate, report["images_per_s_per_core"]), 1)
                               for name, rate in rates.items()}
    report["step_rates"] = rates
    return report


def loader_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    out = Table(title=f"the loader alone: DeiT's training preprocessing at {report['res']} px on {report['data']} "
                      f"({report['images']} images, CPU time of one thread)", title_justify="left")
    out.add_column("part")
    out.add_column("ms per image", justify="right")
    out.add_column("share", justify="right")
    total = report["loader_ms"]
    for part, ms in report["parts_ms"].items():
        device = part.startswith("device")
        out.add_row(part, f"{ms:.3f}", "" if device else f"{100 * ms / total:.0f} %")
    out.add_row("[bold]loader, per image[/]", f"[bold]{total:.3f}[/]", "100 %")
    out.caption = (f"{report['images_per_s_per_core']:.0f} images/s per core; {report['bytes_per_image']:,} bytes per image "
                   f"to the device ({report['fp32_bytes_per_image']:,} as normalised fp32), "
                   f"{report['bytes_per_image'] * report['batch'] / 2**20:.1f} MB per batch of {report['batch']}; "
                   f"a training loader with {report['workers']} worker(s): {report['loader_img_s']:.0f} images/s. "
                   "Cores of augmentation one GPU needs: "
                   + "; ".join(f"{report['cores_per_gpu'][name]} at {rate:.0f} images/s ({name})"
                               for name, rate in report["step_rates"].items()))
    out.caption_justify = "left"
    return out


def save(rows: list[dict[str, Any]], csv_path: Path | None, json_path: Path | None,
         loader: dict[str, Any] | None = None) -> None:
    from distill.weights.checkpoint import atomic_write_bytes

    if json_path is not None:
        payload: Any = rows if loader is None else {"models": rows, "loader": loader}
        atomic_write_bytes(Path(json_path), json.dumps(payload, indent=1).encode())
    if csv_path is not None and rows:
        keys = sorted({key for row in rows for key in row})
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(Path(csv_path), text.getvalue().encode())
