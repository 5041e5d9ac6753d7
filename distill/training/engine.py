"""The one training loop every stage uses (accelerate): train, evaluate each epoch, EMA, resume, checkpoints.

The engine knows nothing of which stage it runs: a stage hands it a `Job` (a model, two datasets, a
criterion `(inputs, outputs, targets) -> loss`, a way to read predictions, and a function that
describes the final checkpoint). The run folder is `runfolder.RunFolder`, evaluation `evaluation.evaluate`, one
training step `step.train_step`, the accelerator and what the processes share `processes`.

A criterion may train parameters of its own (`criterion.learned`, a feature-distillation projection): they
are optimised with the model's, prepared by accelerate like it (synchronised across processes, saved in and
restored from the resumable state) and never exported.

The step never waits for the device: losses stay there and are read, with their NaN/inf check, every
--log-every steps and before every save, so a GPU is never stalled by the host in between.

Several processes share one global batch (`config.auto.split_batch`: images per process and accumulated
micro-batches), so a run trains alike on any number of them and resumes on another number at the same image.
BatchNorm statistics, which each process gathers from its own batches, are averaged across processes before every
evaluation and save (timm's distribute_bn), unless --sync-bn synchronises them at every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.layers import convert_sync_batchnorm
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset

from distill.weights.checkpoint import EMA_FILE, MODEL_FILE, Checkpoint, read_checkpoint, save_checkpoint
from distill.config import StageConfig, parse_schedule, processes, split_batch, to_dict, tracker_names
from distill.console import console
from distill.data.loaders import eval_loader, train_loader
from distill.errors import DistillError
from distill.training.processes import average_batchnorm, make_accelerator, resume_skip
from distill.training.step import LossWatch, Prepared, TargetMixup, train_step
from distill.training.evaluation import Predict, bare, evaluate, flatten, plain_logits
from distill.weights.naming import precision_name
from distill.training.runfolder import RunFolder, saved_progress
from distill.training.schedule import check_grid, resolution_at, set_resolution, vits
from distill.speed import channels_last, choose_kernels, choose_threads, idle_workers, to_channels_last
from distill.training.tracking import LOG_DIR, hyperparameters, numeric, offline_environment


@dataclass
class Job:
    """What a stage hands the engine."""

    model: nn.Module
    train_set: Dataset
    eval_set: Dataset
    criterion: nn.Module
    num_classes: int
    describe: Callable[[dict[str, Any]], dict[str, Any]]
    predict: Predict = plain_logits
    reference: nn.Module | None = None  # a teacher whose agreement with the model is measured at the end
    use_mixup: bool = True
    evaluate_first: bool = False  # record the accuracy before any training (epoch 0), e.g. after a resolution change
    class_names: list[str] = field(default_factory=list)
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # e.g. accuracy before fine-tuning
    notes: list[str] = field(default_factory=list)  # the values `auto` chose, printed on the run's first line
    view_seeds: Any = None  # a teacher cache's seeds, view_seeds[v][i]: epoch e trains on view e % views of each image
    retransform: Callable[[int], None] | None = None  # sets both datasets' preprocessing to a resolution (--img-size-schedule)


def make_ema(model: nn.Module, cfg: StageConfig) -> ModelEmaV3:
    """timm's EMA of the weights: DeiT's fixed decay by default, timm's decay warmup with --ema-warmup."""
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)


def ema_step(cfg: StageConfig, step: int) -> int | None:
    """The step handed to the EMA: none with a fixed decay (timm then uses the decay as given from the first
    update on, as DeiT's ModelEma does), the optimizer step with the warmup."""
    return step if cfg.ema_warmup else None


class Run:
    """One stage's run: its folder (reused when finished, resumed when interrupted) and its training."""

    def __init__(self, config: StageConfig, identity: dict[str, Any]):
        self.config = config
        self.trackers = tracker_names(config.log_with)
        world = processes()  # known before the accelerator: its accumulation depends on how the processes share a step
        self.global_batch = config.images_per_step(world)
        mixing = (config.mixup or 0) > 0 or (config.cutmix or 0) > 0
        self.per_process, self.accumulation = split_batch(self.global_batch, world, config.batch_size, even=mixing)
        self.accelerator = make_accelerator(config.mixed_precision, self.accumulation, config.compile,
                                            log_with=self.trackers, project_dir=config.run_dir(),
                                            dist_timeout=config.dist_timeout, deterministic=config.deterministic,
                                            tf32=not config.deterministic)
        self.folder = RunFolder(config, identity, self.accelerator)
        self.dir = self.folder.dir
        self.finished: Checkpoint | None = self.folder.open()
        # before any data loads; a resumed run keeps the threads its state was saved with (their sums, bit for bit)
        saved = None if self.finished is not None or self.folder.replacing else saved_progress(self.dir)
        same_processes = saved is not None and saved[1].get("processes", 1) == self.accelerator.num_processes
        self.threads = choose_threads(str(config.threads), self.accelerator.device.type,
                                      kept=saved[1].get("threads") if same_processes else None)
        self.size: int | None = None  # the training resolution now, with --img-size-schedule
        set_seed(config.seed)  # the same initial weights on every process

    def _optimisation(self, model: nn.Module, learned: nn.Module | None, steps_per_epoch: int, lr: float
                      ) -> tuple[Any, Any]:
        """timm's optimizer (no weight decay on biases, norms, tokens) and per-step cosine with warmup; the
        criterion's own parameters (`learned`) join it as further groups, decayed the same way."""
        cfg = self.config
        try:
            optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                            eps=cfg.opt_eps)  # as DeiT's create_optimizer(args): timm drops it for SGD
        except (ValueError, AssertionError, KeyError) as error:
            raise DistillError(f"timm cannot make the optimizer '{cfg.opt}': {error}.") from None
        if learned is not None:  # before the scheduler, which reads every group's base rate
            for group in param_groups_weight_decay(learned, cfg.weight_decay):
                optimizer.add_param_group(group)
        # --warmup-lr and --min-lr are absolute (as in DeiT's code) while the peak follows the lr rule; at a
        # small batch the paper's fine-tune lr (5e-6 per 512) falls below them, and the schedule would then
        # rise instead of fall. Capping them at the peak keeps every rate at or below it.
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=min(cfg.min_lr, lr),
                                           warmup_lr=min(cfg.warmup_lr, lr), warmup_epochs=cfg.warmup_epochs,
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        return optimizer, scheduler

    def _mixup(self, job: Job) -> TargetMixup | None:
        cfg = self.config
        if not (job.use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)):
            return None  # an odd --batch-size with Mixup/CutMix is refused by config.validate
        return TargetMixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                           label_smoothing=cfg.smoothing, num_classes=job.num_classes)

    def fit(self, job: Job) -> Checkpoint:
        """Train, evaluate each epoch, save resumable state, and write the final checkpoint. A run that fails
        or is interrupted before it saved a state takes back the folder it made."""
        try:
            return self._fit(job)
        except BaseException:
            self.folder.abandon()
            raise

    def _fit(self, job: Job) -> Checkpoint:
        cfg, acc = self.config, self.accelerator
        main, world = acc.is_main_process, acc.num_processes
        pin, idle = acc.device.type == "cuda", idle_workers(cfg.idle_workers, acc.device.type)
        if cfg.sync_bn and world > 1:
            if acc.device.type != "cuda":  # planning refuses it already, where it knows the device
                raise DistillError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only).")
            job.model = convert_sync_batchnorm(job.model)  # timm's: keeps the activation of its BatchNormAct layers
        train_dl = train_loader(job.train_set, batch_size=self.per_process, seed=cfg.seed, rank=acc.process_index,
                                world=world, num_workers=cfg.num_workers, repeated_aug=cfg.repeated_aug, pin_memory=pin,
                                view_seeds=job.view_seeds, idle_workers=idle)
        steps_per_epoch = len(train_dl) // self.accumulation
        if steps_per_epoch == 0:
            raise DistillError(f"An epoch has {len(train_dl)} batches on each process, fewer than the "
                               f"{self.accumulation} accumulated in one optimizer step; lower the global batch.")
        schedule = parse_schedule(cfg.img_size_schedule)
        resized = vits([job.model, job.criterion, job.reference]) if schedule else []
        if resized:
            check_grid(resized, schedule)
            if world > 1:
                raise DistillError("--img-size-schedule resamples position embeddings during training, which runs on one "
                                   "process only; drop the schedule or run on one process.")
        if schedule:  # at the resolution of the state a resume starts from (the epoch it was saved in)
            saved = None if self.folder.replacing else saved_progress(self.dir)
            at = 0 if saved is None else saved[1]["epoch"] - (1 if saved[1]["batch"] == 0 and saved[1]["epoch"] > 0 else 0)
            self._resolution(job, resized, resolution_at(schedule, at))
        lr = cfg.effective_lr(world)
        learned = getattr(job.criterion, "learned", None)
        optimizer, scheduler = self._optimisation(job.model, learned, steps_per_epoch, lr)
        mixup = self._mixup(job)
        self.folder.start()  # only once the inputs have proved usable
        if self.trackers:
            offline_environment(self.trackers, self.dir)
            acc.init_trackers(LOG_DIR, config=hyperparameters(to_dict(cfg)))
        criterion = job.criterion.to(acc.device)
        choose_kernels(acc, [job.model, criterion, job.reference], cfg.attention, cfg.onednn_linear)
        nhwc = (to_channels_last([job.model, *criterion.children(), job.reference])  # before DDP wraps the model
                if channels_last(cfg.channels_last, acc.device.type, cfg.mixed_precision) else [])
        if learned is None:
            model, optimizer = acc.prepare(job.model, optimizer)
        else:  # prepared after the model, so the resumable state holds it as model_1
            model, criterion.learned, optimizer = acc.prepare(job.model, learned, optimizer)
        test_dl = acc.prepare(eval_loader(job.eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                          pin_memory=pin, idle_workers=idle, persistent=not schedule))
        reference = job.reference.to(acc.device) if job.reference is not None else None

        def measure(net: nn.Module, **kwargs: Any) -> dict[str, Any]:
            average_batchnorm(acc, net)  # every process evaluates the same model
            return evaluate(net, test_dl, acc, job.predict, attention=cfg.attention, onednn_linear=cfg.onednn_linear,
                            **kwargs)

        ema = make_ema(bare(acc, model), cfg) if cfg.ema else None
        resized += vits([ema.module]) if ema is not None and schedule else []
        if main:
            shared = f" = {world} x {self.per_process} x {self.accumulation}" if world > 1 or self.accumulation > 1 else ""
            kernels = (", deterministic" if cfg.deterministic else ", TF32 matrix products in fp32, cudnn.benchmark"
                       ) if acc.device.type == "cuda" else ""
            console.print(f"[bold]{cfg.stage}[/] -> {self.dir}  ({world} process{'es' if world > 1 else ''}, "
                          f"{acc.device.type}, precision {precision_name(cfg.mixed_precision)}{kernels}, global batch "
                          f"{self.global_batch}{shared}, lr {lr:.3g})"
                          + "".join(f"\n  {note}" for note in [*job.notes, self.threads] if note), soft_wrap=True)

        set_seed(cfg.seed, device_specific=True)  # drop path and Mixup differ across processes (a resume restores them)
        saved = None if self.folder.replacing else saved_progress(self.dir)
        saved_by = saved[1].get("processes", world) if saved else world
        if saved and saved[1].get("batch") and cfg.repeated_aug > 1 and (saved_by > 1) != (world > 1):
            if not cfg.overwrite:  # repeated augmentation is on with several processes only: the epoch differs
                raise DistillError(f"{self.dir} was saved inside an epoch with repeated augmentation on {saved_by} "
                                   f"process(es), which deals that epoch's images otherwise than {world} do; resume it on "
                                   f"{'several processes' if saved_by > 1 else 'one process'}, or pass --overwrite to "
                                   "start it again.")
            self.folder.discard_state()
        progress = self.folder.resume(ema.module if ema is not None else None, self.global_batch)
        if progress is not None:
            scheduler.step_update(num_updates=progress["step"])
            saved_by = progress.get("processes", world)
            skip = resume_skip(progress, world, self.per_process, self.accumulation)
            if main:
                moved = (f" on {world} process{'es' if world > 1 else ''} (saved on {saved_by}): global batch "
                         f"{self.global_batch} kept, {self.per_process} per process x {self.accumulation}"
                         if saved_by != world else "")
                console.print(f"[bold]Resuming[/] {self.dir} at epoch {progress['epoch'] + 1}, batch {skip} "
                              f"(step {progress['step']}){moved}.", soft_wrap=True)
            progress = {**progress, "batch": skip, "processes": world, "global_batch": self.global_batch,
                        "threads": torch.get_num_threads()}
        else:
            progress = {"epoch": 0, "batch": 0, "step": 0, "processes": world, "global_batch": self.global_batch,
                        "threads": torch.get_num_threads()}
            if job.evaluate_first:
                before = measure(model)
                self.folder.append_metrics({"epoch": 0, "step": 0, **flatten(before)}, keep_epochs_below=0)
                if main:
                    console.print(f"before training, at {cfg.img_size} px: test top-1 [bold]{before['top1']:.2f}[/]"
                                  + (f"  top-5 {before['top5']:.2f}" if "top5" in before else ""))

        parts = Prepared(model, optimizer, scheduler, criterion, mixup, ema, train_dl, steps_per_epoch * self.accumulation,
                         [model] + ([criterion.learned] if learned is not None else []), job.model in nhwc)
        final: dict[str, Any] | None = None
        first_epoch = progress["epoch"]
        for epoch in range(first_epoch, cfg.epochs):
            skip = progress["batch"] if epoch == first_epoch else 0
            if schedule and self._resolution(job, resized, resolution_at(schedule, epoch), optimizer):
                parts.loader = train_loader(job.train_set, batch_size=self.per_process, seed=cfg.seed, rank=acc.process_index,
                                            world=world, num_workers=cfg.num_workers, repeated_aug=cfg.repeated_aug,
                                            pin_memory=pin, view_seeds=job.view_seeds,
                                            idle_workers=idle)  # fresh workers, new transform
                if main:
                    console.print(f"resolution {resolution_at(schedule, epoch)} px from epoch {epoch + 1} on")
            record = self._train_epoch(parts, epoch, skip, progress)
            started = time.perf_counter()
            if epoch + 1 == cfg.epochs:  # the last epoch's evaluation is the final one, with the teacher
                final = measure(model, reference=reference, per_class=True)
                record.update(flatten(final))
            elif (epoch + 1) % cfg.eval_every == 0:
                record.update(flatten(measure(model)))
            if ema is not None and "top1" in record:
                record.update({f"ema_{k}": v for k, v in flatten(measure(ema.module)).items()})
            record["eval_time_s"] = round(time.perf_counter() - started, 2)
            self.folder.append_metrics(record, keep_epochs_below=epoch + 1 if epoch == first_epoch else None)
            if self.trackers:
                acc.log({"epoch": record["epoch"], **numeric(record, "epoch/")}, step=progress["step"])
            if main:
                console.print(epoch_line(record, cfg.epochs), soft_wrap=True)
            progress = {**progress, "epoch": epoch + 1, "batch": 0, "images": 0}
            if "top1" not in record:  # an evaluated epoch averaged them already (the model's and the EMA's)
                average_batchnorm(acc, bare(acc, model), ema.module if ema is not None else None)
            self.folder.save_state(ema.module if ema is not None else None, progress)

        if final is None:  # resumed after the last epoch had been saved
            final = measure(model, reference=reference, per_class=True)  # (measuring averages BatchNorm statistics)
        ema_final = ema_record = None
        if ema is not None:  # with the decay the last update used, as timm computes it
            ema_final = measure(ema.module, per_class=True)
            ema_record = {"decay": cfg.ema_decay, "warmup": cfg.ema_warmup, "step": progress["step"],
                          "last_decay": ema.get_decay(ema_step(cfg, progress["step"]))}
        path = self._write_checkpoints(job, bare(acc, model), ema, final, ema_final, lr, ema_record)
        acc.wait_for_everyone()
        for tracker in acc.trackers:  # not acc.end_training(): it also ends the process group, which the command's
            tracker.finish()          # next run (a fine-tune's after its teacher's, a pipeline's next stage) needs
        acc.free_memory()
        return read_checkpoint(path)

    def _resolution(self, job: Job, models: list[nn.Module], size: int, optimizer: Any = None) -> bool:
        """Put the run at a resolution of its schedule: every ViT resampled, the datasets' preprocessing changed."""
        if size == self.size:
            return False
        set_resolution(models, size, optimizer)
        if job.retransform is None:
            raise DistillError("This stage cannot change its resolution during training (--img-size-schedule).")
        job.retransform(size)
        self.size = size
        return True

    def _train_epoch(self, parts: Prepared, epoch: int, skip: int, progress: dict[str, int]) -> dict[str, Any]:
        """One pass over the training loader (from batch `skip` when resuming); updates progress['step']."""
        cfg, acc = self.config, self.accelerator
        world = acc.num_processes
        parts.loader.sampler.set_epoch(epoch)
        loader = acc.skip_first_batches(parts.loader, skip) if skip else parts.loader
        parts.model.train()
        watch = LossWatch(acc)
        seen, started, first_step = 0, time.perf_counter(), progress["step"]
        rates: dict[int, float] = {}  # the lr of each optimizer step, logged with its loss
        total_steps = parts.batches // self.accumulation * cfg.epochs
        lines = acc.is_main_process and not console.is_terminal  # a log file or a scheduler's: no bar, so a line

        def check(report: bool = False) -> None:
            bad = watch.read()
            if bad is None and report and lines and watch.last:
                elapsed = time.perf_counter() - started
                left = (total_steps - progress["step"]) * elapsed / max(progress["step"] - first_step, 1)
                console.print(f"  step {progress['step']}/{total_steps} (epoch {epoch + 1}/{cfg.epochs})  "
                              f"{seen * world / max(elapsed, 1e-9):.0f} img/s  loss {watch.recent:.4f}  "
                              f"lr {parts.optimizer.param_groups[0]['lr']:.3g}  ETA {timedelta(seconds=int(left))} (training only)",
                              soft_wrap=True, highlight=False)
            if bad is None and self.trackers:  # the losses just read: no further sync
                for step, value in watch.last:
                    acc.log({"train/loss": value, "train/lr": rates.get(step, float("nan"))}, step=step)
                rates.clear()
            if bad is not None:
                kept = (f"the last good state in {self.dir} is kept" if self.folder.has_state()
                        else "nothing had been saved yet")
                raise DistillError(f"The loss became {bad[1]} at step {bad[0]} (epoch {epoch + 1}); stopped, and {kept}. "
                                   "Try a lower --lr or --mixed-precision no.")

        bar = _progress_bar(disable=not (acc.is_main_process and console.is_terminal))
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=parts.batches, completed=skip, loss=float("nan"),
                            lr=parts.optimizer.param_groups[0]["lr"], ips=0.0)
        with bar:
            for batch_index, batch in enumerate(loader, start=skip):
                if batch_index >= parts.batches:
                    break
                loss = train_step(acc, parts, batch, cfg.clip_grad, parts.channels_last)
                watch.add(loss, progress["step"] + 1)
                seen += len(batch[1])  # the labels: batch[0] is a dict of pixels and erasing boxes with erasing on
                if not acc.sync_gradients:
                    bar.update(task, advance=1)
                    continue
                progress["step"] += 1
                rates[progress["step"]] = parts.optimizer.param_groups[0]["lr"]
                parts.scheduler.step_update(num_updates=progress["step"])
                if parts.ema is not None:
                    parts.ema.update(bare(acc, parts.model), step=ema_step(cfg, progress["step"]))
                saving = cfg.save_every and progress["step"] % cfg.save_every == 0 and batch_index + 1 < parts.batches
                if saving or progress["step"] % cfg.log_every == 0:
                    check(report=progress["step"] % cfg.log_every == 0)  # never save a state past a bad step
                if saving:
                    ema = parts.ema.module if parts.ema is not None else None
                    average_batchnorm(acc, bare(acc, parts.model), ema)
                    self.folder.save_state(ema, {**progress, "epoch": epoch, "batch": batch_index + 1,
                                                 "images": (batch_index + 1) * self.per_process * world})
                bar.update(task, advance=1, loss=watch.recent, lr=parts.optimizer.param_groups[0]["lr"],
                           ips=seen * world / max(time.perf_counter() - started, 1e-9))
        check()
        seconds = time.perf_counter() - started
        return {"epoch": epoch + 1, "step": progress["step"], "train_loss": round(watch.mean, 5),
                "lr": parts.optimizer.param_groups[0]["lr"], "epoch_time_s": round(seconds, 2),
                "img_per_s": round(seen * world / max(seconds, 1e-9), 1)}

    def _write_checkpoints(self, job: Job, model: nn.Module, ema: ModelEmaV3 | None, final: dict[str, Any],
                           ema_final: dict[str, Any] | None, lr: float, ema_record: dict[str, Any] | None) -> Path:
        path = self.dir / MODEL_FILE

        def write() -> None:
            final.update(job.extra_metrics)
            history = self.folder.metrics()
            final["train_seconds"] = round(sum(r.get("epoch_time_s", 0) for r in history), 1)
            before = next((r for r in history if r.get("epoch") == 0), None)
            if before is not None:
                final.update({f"before_{key}": before[key] for key in ("top1", "top5", "precision", "img_size")
                              if key in before})
            meta = {**job.describe(final), "identity": self.folder.identity, "config": to_dict(self.config),
                    "metrics": final, "lr_effective": lr, "processes": self.accelerator.num_processes}
            if self.accelerator.device.type == "cpu":  # on a CPU the thread count decides how sums are split
                meta["threads"] = torch.get_num_threads()
            if self.config.img_size_schedule:
                meta["img_size_schedule"] = [{"epoch": e, "img_size": size}
                                             for e, size in parse_schedule(self.config.img_size_schedule)]
            if ema is not None:
                save_checkpoint(self.dir / EMA_FILE, ema.module.state_dict(),
                                {**meta, "metrics": ema_final, "ema": ema_record,
                                 "identity": {**self.folder.identity, "ema": True}})
            save_checkpoint(path, model.state_dict(), meta)

        self.folder.on_main(write, doing="writing the checkpoint")
        return path


def _progress_bar(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=disable,
    )


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    timing = f"({record['epoch_time_s']:.1f} s, {record['img_per_s']:.0f} img/s)"
    if "top1" not in record:
        return f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f}  {timing}"
    heads = [h for h in ("cls", "dist") if f"{h}_top1" in record]
    extra = "  ".join(f"{h} {record[f'{h}_top1']:.2f}" for h in heads)
    ema = f"  ema {record['ema_top1']:.2f}" if "ema_top1" in record else ""
    top5 = f"  top-5 {record['top5']:.2f}" if "top5" in record else ""
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test top-1 [bold]{record['top1']:.2f}[/]{top5}  loss {record['test_loss']:.4f}"
            f"{('  ' + extra) if extra else ''}{ema}  {timing}")
