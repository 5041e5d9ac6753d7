"""`distill cache-teacher`: run a teacher once over K augmented views of every training image and keep its
top-k probabilities (FKD), so that a student trains without running it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from rich.progress import Progress
from safetensors import SafetensorError

from distill.config import CacheConfig, to_dict
from distill.console import console
from distill.data import Transformed
from distill.errors import DistillError
from distill.speed import channels_last, choose_kernels, choose_threads, to_channels_last
from distill.stages.common import (Expecting, StagePlan, data_record, default_parent, inherit_data, load_data, planned,
                                   planned_classes, read_teacher, resolve_for_run, resolve_norm, share_of, source_line,
                                   training_transform)
from distill.teachers.cache import (fill_shards, read_manifest, shard_count, shard_path, targets_digest, view_seeds,
                                    write_manifest)
from distill.teachers.frozen import check_classes, frozen_teachers, several_teachers
from distill.training.processes import make_accelerator
from distill.training.runfolder import FolderLock, as_recorded, normalise
from distill.training.waiting import beat, shared_outcome
from distill.weights.naming import precision_name


def plan_cache(cfg: CacheConfig, expecting: Expecting = {}) -> StagePlan:
    """A teacher run once over K augmented views of every training image."""
    if cfg.teacher:
        teachers = [read_teacher(path, expecting=expecting) for path in cfg.teacher]
    else:
        teachers = [default_parent(cfg.workdir, "teach", "teacher", "--teacher", "train one with `distill teach`",
                                   "teacher", expecting)]
    several_teachers(teachers, "soft")
    teacher = teachers[0]
    cfg = inherit_data(cfg, teacher)
    cfg = dataclasses.replace(cfg, views=cfg.views or cfg.epochs)
    cfg, notes = resolve_for_run(cfg)
    classes = planned_classes(cfg)
    for one in teachers:
        check_classes(one, classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    if len(teachers) > 1:
        notes.append(f"{len(teachers)} teachers: the cache keeps the mean of their probabilities")
    return planned(StagePlan("cache-teacher", cfg, parent=teacher, teacher=teacher, notes=notes,
                              classes=classes or teacher.classes or None, teachers=teachers if len(teachers) > 1 else []))


def execute_cache(plan: StagePlan) -> None:
    """Write the cache shard by shard (resuming a killed run), then mark it complete; one command at a time."""
    cfg = plan.config
    root = cfg.run_dir()
    identity = normalise(plan.identity())
    acc = make_accelerator(cfg.mixed_precision, dist_timeout=cfg.dist_timeout, deterministic=cfg.deterministic)
    threads = choose_threads(str(cfg.threads), acc.device.type)
    if threads and acc.is_main_process:
        console.print(threads, soft_wrap=True)
    lock = FolderLock(root)
    holder, existing = (lock.acquire(), read_manifest(root)) if acc.is_main_process else (None, None)
    if acc.num_processes > 1:  # process 0 decides, for every process
        from accelerate.utils import broadcast_object_list

        holder, existing = broadcast_object_list([(holder, existing)], from_process=0)[0]
    if holder:
        raise DistillError(f"Another distill command ({holder}) is writing to {root}; wait for it to finish, or pass "
                           "--name (or --workdir) to write elsewhere.")
    try:
        return _fill(plan, acc, existing, identity)
    finally:
        lock.release()


def _fill(plan: StagePlan, acc: Accelerator, existing: dict[str, Any] | None, identity: dict[str, Any]) -> None:
    cfg, teacher, root = plan.config, plan.teacher, plan.config.run_dir()
    if existing is not None and existing.get("identity") != as_recorded(existing.get("identity") or {}, identity):
        if not cfg.overwrite:
            raise DistillError(f"{root} already holds a teacher cache made with other settings; pass --overwrite to "
                               "replace it, or --name to write elsewhere.")
        on_first(acc, root, lambda: shutil.rmtree(root), cfg.dist_timeout, "removing the old cache")
        existing = None
    if existing is not None and existing.get("complete"):
        if acc.is_main_process:
            console.print(f"[bold]cache-teacher[/]: {root} is already complete with these settings; reusing it.")
        return None
    data = load_data(cfg, share_of(acc))
    teachers = plan.teachers or [teacher]
    for one in teachers:
        check_classes(one, data.classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    mean, std = resolve_norm(cfg, data)
    seeds = view_seeds(cfg.seed, cfg.views, len(data.train))
    manifest = {"identity": identity, "complete": False, "views": cfg.views, "images": len(data.train),
                "num_classes": len(data.classes), "classes": data.classes, "top_k": cfg.top_k, "seed": cfg.seed,
                "shard_size": cfg.shard_size, "erase_noise": acc.device.type,  # the generator random erasing's boxes drew from
                "teacher": teacher.lineage("teacher"), "config": to_dict(cfg, result_only=True),
                **({"teachers": [one.lineage("teacher") for one in teachers]} if len(teachers) > 1 else {}),
                "data": data_record(cfg, data.classes, mean, std, data.info),
                "targets_sha256": targets_digest(data.train.targets)}
    if acc.is_main_process:
        for one in teachers:
            console.print(source_line("teacher", one), soft_wrap=True)
        console.print(f"[bold]cache-teacher[/] -> {root}  ({cfg.views} views x {len(data.train):,} images, top-{cfg.top_k}, "
                      f"{acc.num_processes} process(es), precision {precision_name(cfg.mixed_precision)})"
                      + "".join(f"\n  {note}" for note in plan.notes), soft_wrap=True)

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if existing is None:
            write_manifest(root, manifest)

    on_first(acc, root, start, cfg.dist_timeout, "writing the cache's manifest")
    frozen = frozen_teachers(teachers, (mean, std), cfg.img_size, cfg.teacher_res, compile=cfg.compile).to(acc.device)
    choose_kernels(acc, [frozen], cfg.attention, cfg.onednn_linear)
    if channels_last(cfg.channels_last, acc.device.type, cfg.mixed_precision):
        to_channels_last([frozen])
    dataset = Transformed(data.train, training_transform(cfg, mean, std))
    total = shard_count(cfg.views, len(data.train), cfg.shard_size)
    written = 0

    def advanced(bar: Progress, task: Any) -> None:
        bar.advance(task)
        beat()  # each shard written is this process's progress, which the processes that finished first wait on

    def fill() -> None:  # a process whose shards a killed run already wrote waits for the others, beyond the timeout
        nonlocal written
        with Progress(console=console, transient=True, disable=not (acc.is_main_process and console.is_terminal)) as bar:
            task = bar.add_task("teacher views", total=-(-total // acc.num_processes))
            written = fill_shards(root, dataset, seeds, frozen, acc, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, top_k=cfg.top_k, shard_size=cfg.shard_size,
                                  progress=lambda shard: advanced(bar, task))

    _settled(shared_outcome(lambda: _attempt(fill, root), True, cfg.dist_timeout, "filling its shards of the cache",
                            shows_progress=True))

    def complete() -> None:  # process 0 alone looks (on a shared filesystem another may still see an old listing)
        missing = [shard for shard in range(total) if not shard_path(root, shard).exists()]
        if missing:  # complete only when every process's shards are there
            raise DistillError(f"The teacher cache {root} lacks {len(missing)} of its {total} shards (e.g. "
                               f"{shard_path(root, missing[0]).name}) after every process finished; run the same "
                               "command again to write them.")
        write_manifest(root, {**manifest, "complete": True})

    on_first(acc, root, complete, cfg.dist_timeout, "marking the cache complete")
    if acc.num_processes > 1:  # every process has settled: this collective waits for none
        from accelerate.utils import gather_object

        written = sum(gather_object([written]))
    if acc.is_main_process:
        console.print(f"teacher cache: {root}, {total} shards ({written} written now), "
                      f"{cfg.views * len(data.train):,} views", soft_wrap=True)
    return None


def on_first(acc: Accelerator, root: Path, action: Callable[[], Any], timeout: float, doing: str) -> None:
    """A write by process 0 that the others wait for outside any collective (it may outlast --dist-timeout)."""
    _settled(shared_outcome(lambda: _attempt(action, root), acc.is_main_process, timeout, doing))


def _attempt(action: Callable[[], Any], root: Path) -> str | None:
    """Run the action; the sentence for a failure of the cache's files, or None."""
    try:
        action()
    except DistillError as error:
        return error.sentence
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        return (f"The teacher cache's files could not be written or read: {reason} "
                f"({getattr(error, 'filename', None) or root}); run the same command again once that is mended.")
    return None


def _settled(problem: str | None) -> None:
    if problem:
        raise DistillError(problem)
