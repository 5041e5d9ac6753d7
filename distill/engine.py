"""The one training loop every stage uses (Accelerate): train, evaluate, EMA, resume, logs, checkpoints.

The engine knows nothing of which stage it runs: a stage hands it a model, two datasets, a
criterion `(inputs, outputs, targets) -> loss`, a way to read predictions, and a function that
describes the final checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset

from distill.checkpoint import EMA_FILE, MODEL_FILE, Checkpoint, atomic_write_bytes, read_checkpoint, save_checkpoint
from distill.config import StageConfig, config_differences, to_dict, write_toml
from distill.data.loaders import eval_loader, train_loader
from distill.errors import DistillError

console = Console(highlight=False)
Predict = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]

STATE_DIR, STATE_TMP, STATE_OLD = "state", "state.tmp", "state.old"
IDENTITY_FILE, CONFIG_FILE, METRICS_FILE = "identity.json", "config.toml", "metrics.jsonl"


def plain_logits(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"top": model(images)}


def make_accelerator(mixed_precision: str, grad_accum: int = 1) -> Accelerator:
    """A fresh Accelerator for one run (a pipeline may change precision between stages)."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DistillError("fp16 mixed precision needs a GPU; on a CPU use --mixed-precision bf16.")
    AcceleratorState._reset_state(reset_partial_state=False)  # keeps the process group, forgets the precision
    # Several processes without CUDA (torchrun on a CPU): accelerate joins them over gloo only when told
    # it runs on the CPU; a single process keeps accelerate's own device choice (CUDA, MPS, XPU, CPU).
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=several_cpu_processes, gradient_accumulation_steps=grad_accum)


def normalise(value: Any) -> Any:
    """JSON round trip, so identities compare equal however they were built."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


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


@dataclass
class FolderStatus:
    """What a run folder holds, compared with the run about to start."""

    state: str  # empty | finished | interrupted | changed-finished | changed-interrupted
    detail: str = ""
    checkpoint: Checkpoint | None = None
    progress: dict[str, int] | None = None


def describe_change(stored: dict[str, Any], identity: dict[str, Any]) -> str:
    changes = config_differences(stored.get("config", {}), identity.get("config", {}))
    for key in sorted(set(stored) | set(identity)):
        if key != "config" and stored.get(key) != identity.get(key):
            changes.append(f"{key} checkpoint changed" if key in ("parent", "teacher") else f"{key} changed")
    return "; ".join(changes[:4]) or "settings changed"


def folder_status(run_dir: Path, identity: dict[str, Any]) -> FolderStatus:
    """Is this run already done, half done, or done differently? (read-only)"""
    identity = normalise(identity)
    model_path, identity_path = run_dir / MODEL_FILE, run_dir / IDENTITY_FILE
    if model_path.exists():
        try:
            ckpt = read_checkpoint(model_path)
            stored = ckpt.meta.get("identity") or {}
        except DistillError:
            ckpt, stored = None, {}
        if ckpt is not None and stored == identity:
            return FolderStatus("finished", checkpoint=ckpt)
        return FolderStatus("changed-finished", describe_change(stored, identity))
    if identity_path.exists():
        try:
            stored = json.loads(identity_path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored != identity:
            return FolderStatus("changed-interrupted", describe_change(stored, identity))
        progress = None
        for name in (STATE_DIR, STATE_OLD):
            if (run_dir / name / "progress.json").exists():
                progress = json.loads((run_dir / name / "progress.json").read_text())
                break
        return FolderStatus("interrupted", checkpoint=None, progress=progress)
    return FolderStatus("empty")


class Run:
    """One stage's run folder: finished runs are reused, interrupted ones resumed, conflicting ones refused."""

    def __init__(self, config: StageConfig, identity: dict[str, Any]):
        self.config = config
        self.dir = config.run_dir()
        self.identity = normalise(identity)
        self.accelerator = make_accelerator(config.mixed_precision, config.grad_accum)
        self.finished: Checkpoint | None = None
        self._check_folder()
        if self.finished is None:
            try:  # fail before any data is loaded, and on every process alike (none is left waiting)
                self.dir.mkdir(parents=True, exist_ok=True)
            except PermissionError:
                raise DistillError(f"The work folder {config.workdir} is not writable.") from None
            except OSError as error:
                raise DistillError(f"Cannot write to {self.dir}: {error.strerror or error}.") from None
        set_seed(config.seed)  # the same initial weights on every process

    # -- run folder -------------------------------------------------------------------------------
    def _check_folder(self) -> None:
        status = folder_status(self.dir, self.identity)
        self.accelerator.wait_for_everyone()  # every process has looked before any file is removed
        if status.state == "finished":
            self.finished = status.checkpoint
            return
        if status.state == "changed-interrupted" and status.progress is None:
            status.state = "stale"  # started with other settings but nothing saved: nothing to lose
        if status.state in ("changed-finished", "changed-interrupted") and not self.config.overwrite:
            what = "a finished run" if status.state == "changed-finished" else "an interrupted run"
            hint = "run the same command as before to resume it, " if status.state == "changed-interrupted" else ""
            raise DistillError(f"{self.dir} already holds {what} with different settings ({status.detail}); {hint}"
                               "pass --overwrite to replace it, or --name to write elsewhere.")
        if status.state in ("changed-finished", "changed-interrupted", "stale"):
            self._on_main(self._clear_folder)
        self.accelerator.wait_for_everyone()

    def _clear_folder(self) -> None:
        for name in (MODEL_FILE, EMA_FILE, IDENTITY_FILE, METRICS_FILE, CONFIG_FILE):
            (self.dir / name).unlink(missing_ok=True)
        for name in (STATE_DIR, STATE_TMP, STATE_OLD):
            shutil.rmtree(self.dir / name, ignore_errors=True)

    def _on_main(self, action: Callable[[], Any], everywhere: bool = False) -> None:
        """Run a file write on the main process (or on every process); if it fails anywhere, every
        process stops with the same sentence, rather than the others waiting for one that has gone."""
        acc = self.accelerator
        problem = None
        if everywhere or acc.is_main_process:
            try:
                action()
            except PermissionError:
                problem = f"The work folder {self.config.workdir} is not writable."
            except DistillError as error:
                problem = error.sentence
            except OSError as error:
                problem = f"Cannot write to {self.dir}: {error.strerror or error}."
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            problem = next((p for p in gather_object([problem]) if p), None)
        if problem:
            raise DistillError(problem)

    def _prepare_folder(self, fresh: bool) -> None:
        def write() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if fresh:  # a new run starts from an empty history
                (self.dir / METRICS_FILE).unlink(missing_ok=True)
            atomic_write_bytes(self.dir / IDENTITY_FILE, json.dumps(self.identity, indent=1).encode())
            write_toml(self.dir / CONFIG_FILE, to_dict(self.config))

        self._on_main(write)
        self.accelerator.wait_for_everyone()

    def _state_dir(self) -> Path | None:
        """The last complete saved state (a swap interrupted between its two renames leaves state.old)."""
        for name in (STATE_DIR, STATE_OLD):
            candidate = self.dir / name
            if (candidate / "progress.json").exists():
                return candidate
        return None

    def _save_state(self, model: nn.Module, ema: ModelEmaV3 | None, progress: dict[str, int]) -> None:
        """Write the state beside the last one, then swap: a kill at any moment leaves a complete state."""
        acc = self.accelerator
        tmp, final, old = self.dir / STATE_TMP, self.dir / STATE_DIR, self.dir / STATE_OLD

        def clear() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def finish() -> None:
            if ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                          str(tmp / "ema.safetensors"))
            (tmp / "progress.json").write_text(json.dumps(progress))  # written last: marks the state complete
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)

        self._on_main(clear)
        self._on_main(lambda: acc.save_state(str(tmp), safe_serialization=True), everywhere=True)
        self._on_main(finish)

    def _append_metrics(self, record: dict[str, Any], keep_epochs_below: int | None = None) -> None:
        def write() -> None:
            path = self.dir / METRICS_FILE
            records = _read_metrics(path)
            if keep_epochs_below is not None:  # after a resume, drop epochs the resumed run will redo
                records = [r for r in records if r.get("epoch", 0) < keep_epochs_below]
            lines = [json.dumps(r, sort_keys=True) for r in records + [record]]
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

        self._on_main(write)

    # -- training ---------------------------------------------------------------------------------
    def _optimisation(self, model: nn.Module, steps_per_epoch: int, lr: float) -> tuple[Any, Any]:
        """timm's AdamW/SGD (no weight decay on biases, norms, tokens) and per-step cosine with warmup."""
        cfg = self.config
        try:
            optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        except (ValueError, AssertionError, KeyError) as error:
            raise DistillError(f"timm cannot make the optimizer '{cfg.opt}': {error}.") from None
        # --warmup-lr and --min-lr are absolute (as in DeiT's code) while the peak follows the lr rule; at a
        # small batch the paper's fine-tune lr (5e-6 per 512) falls below them, and the schedule would then
        # rise instead of fall. Capping them at the peak keeps every rate at or below it.
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=min(cfg.min_lr, lr),
                                           warmup_lr=min(cfg.warmup_lr, lr), warmup_epochs=cfg.warmup_epochs,
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        return optimizer, scheduler

    def _mixup(self, job: Job) -> Mixup | None:
        cfg = self.config
        if not (job.use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)):
            return None  # an odd --batch-size with Mixup/CutMix is refused by config.validate
        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                     label_smoothing=cfg.smoothing, num_classes=job.num_classes)

    def _resume(self, optimizer_scheduler: tuple[Any, Any], ema: ModelEmaV3 | None) -> dict[str, int] | None:
        state = self._state_dir()
        if state is None:
            return None
        progress = json.loads((state / "progress.json").read_text())
        saved_by, now = progress.get("processes", 1), self.accelerator.num_processes
        if saved_by != now:  # batches, the lr rule and per-process random states all depend on it
            raise DistillError(f"{self.dir} was saved by a run on {saved_by} process(es); resume it on {saved_by}, not {now} "
                               "(or pass --overwrite to start over).")
        self.accelerator.load_state(str(state))  # model, optimizer, and every process's RNG states
        optimizer_scheduler[1].step_update(num_updates=progress["step"])
        if ema is not None and (state / "ema.safetensors").exists():
            ema.module.load_state_dict(load_file(str(state / "ema.safetensors"), device=str(self.accelerator.device)))
        if self.accelerator.is_main_process:
            console.print(f"[bold]Resuming[/] {self.dir} at epoch {progress['epoch'] + 1}, batch {progress['batch']} "
                          f"(step {progress['step']}).")
        return progress

    def fit(self, job: Job) -> Checkpoint:
        """Train, evaluate each epoch, save resumable state, and write the final checkpoint."""
        cfg, acc = self.config, self.accelerator
        main = acc.is_main_process
        world = acc.num_processes
        pin = acc.device.type == "cuda"
        train_dl = train_loader(job.train_set, batch_size=cfg.batch_size, seed=cfg.seed, rank=acc.process_index,
                                world=world, num_workers=cfg.num_workers, repeated_aug=cfg.repeated_aug, pin_memory=pin)
        steps_per_epoch = len(train_dl) // cfg.grad_accum
        if steps_per_epoch == 0:
            raise DistillError(f"An epoch has {len(train_dl)} batches, fewer than --grad-accum {cfg.grad_accum}.")
        lr = cfg.effective_lr(world)
        optimizer, scheduler = self._optimisation(job.model, steps_per_epoch, lr)
        mixup = self._mixup(job)
        self._prepare_folder(fresh=self._state_dir() is None)  # only once the inputs have proved usable
        model, optimizer = acc.prepare(job.model, optimizer)
        test_dl = acc.prepare(eval_loader(job.eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                          pin_memory=pin))
        criterion = job.criterion.to(acc.device)
        reference = job.reference.to(acc.device) if job.reference is not None else None
        ema = make_ema(acc.unwrap_model(model), cfg) if cfg.ema else None

        if main:
            console.print(f"[bold]{cfg.stage}[/] -> {self.dir}  ({world} process{'es' if world > 1 else ''}, "
                          f"{acc.device.type}, precision {cfg.mixed_precision}, global batch "
                          f"{cfg.global_batch(world)}, lr {lr:.3g})" + "".join(f"\n  {note}" for note in job.notes),
                          soft_wrap=True)
        progress = self._resume((optimizer, scheduler), ema)
        if progress is None:
            progress = {"epoch": 0, "batch": 0, "step": 0, "processes": world}
            set_seed(cfg.seed, device_specific=True)  # drop path and Mixup differ across processes
            if job.evaluate_first:
                before = evaluate(model, test_dl, acc, job.predict)
                self._append_metrics({"epoch": 0, "step": 0, **flatten(before)}, keep_epochs_below=0)
                if main:
                    console.print(f"before training, at {cfg.img_size} px: test top-1 [bold]{before['top1']:.2f}[/]  "
                                  f"top-5 {before['top5']:.2f}")

        steps = _Steps(model, optimizer, scheduler, criterion, mixup, ema, train_dl, steps_per_epoch * cfg.grad_accum)
        final: dict[str, Any] | None = None
        first_epoch = progress["epoch"]
        for epoch in range(first_epoch, cfg.epochs):
            skip = progress["batch"] if epoch == first_epoch else 0
            record = self._train_epoch(steps, epoch, skip, progress)
            started = time.perf_counter()
            if epoch + 1 == cfg.epochs:  # the last epoch's evaluation is the final one, with the teacher
                final = evaluate(model, test_dl, acc, job.predict, reference=reference, per_class=True)
                record.update(flatten(final))
            elif (epoch + 1) % cfg.eval_every == 0:
                record.update(flatten(evaluate(model, test_dl, acc, job.predict)))
            if ema is not None and "top1" in record:
                record.update({f"ema_{k}": v for k, v in flatten(evaluate(ema.module, test_dl, acc, job.predict)).items()})
            record["eval_time_s"] = round(time.perf_counter() - started, 2)
            self._append_metrics(record, keep_epochs_below=epoch + 1 if epoch == first_epoch else None)
            if main:
                console.print(epoch_line(record, cfg.epochs), soft_wrap=True)
            progress = {**progress, "epoch": epoch + 1, "batch": 0}
            self._save_state(model, ema, progress)

        if final is None:  # resumed after the last epoch had been saved
            final = evaluate(model, test_dl, acc, job.predict, reference=reference, per_class=True)
        ema_final = evaluate(ema.module, test_dl, acc, job.predict, per_class=True) if ema is not None else None
        ema_record = None
        if ema is not None:  # the decay the last update used, as timm computes it
            ema_record = {"decay": cfg.ema_decay, "warmup": cfg.ema_warmup, "step": progress["step"],
                          "last_decay": ema.get_decay(ema_step(cfg, progress["step"]))}
        path = self._write_checkpoints(job, acc.unwrap_model(model), ema, final, ema_final, lr, ema_record)
        acc.wait_for_everyone()
        acc.end_training()
        acc.free_memory()
        return read_checkpoint(path)

    def _train_epoch(self, steps: "_Steps", epoch: int, skip: int, progress: dict[str, int]) -> dict[str, Any]:
        """One pass over the training loader (from batch `skip` when resuming); updates progress['step']."""
        cfg, acc = self.config, self.accelerator
        world = acc.num_processes
        steps.loader.sampler.set_epoch(epoch)
        loader = acc.skip_first_batches(steps.loader, skip) if skip else steps.loader
        steps.model.train()
        loss_sum, seen, started = torch.zeros((), device=acc.device), 0, time.perf_counter()
        bar = _progress_bar(disable=not (acc.is_main_process and console.is_terminal))
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps.batches, completed=skip, loss=float("nan"),
                            lr=steps.optimizer.param_groups[0]["lr"], ips=0.0)
        with bar:
            for batch_index, (images, targets) in enumerate(loader, start=skip):
                if batch_index >= steps.batches:
                    break
                images = images.to(acc.device, non_blocking=True)
                targets = targets.to(acc.device, non_blocking=True)
                if steps.mixup is not None:
                    images, targets = steps.mixup(images, targets)
                with acc.accumulate(steps.model):  # accelerate skips the gradient sync and step between updates
                    with acc.autocast():
                        loss = steps.criterion(images, steps.model(images), targets)
                    if not _all_finite(acc, loss):
                        raise DistillError(
                            f"The loss became {loss.item()} at step {progress['step'] + 1} (epoch {epoch + 1}); stopped, "
                            f"and the last good state in {self.dir} is kept. Try a lower --lr or --mixed-precision no.")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.clip_grad:
                        acc.clip_grad_norm_(steps.model.parameters(), cfg.clip_grad)
                    steps.optimizer.step()
                    steps.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                seen += images.shape[0]
                if acc.sync_gradients:
                    progress["step"] += 1
                    steps.scheduler.step_update(num_updates=progress["step"])
                    if steps.ema is not None:
                        steps.ema.update(acc.unwrap_model(steps.model), step=ema_step(cfg, progress["step"]))
                    if cfg.save_every and progress["step"] % cfg.save_every == 0 and batch_index + 1 < steps.batches:
                        self._save_state(steps.model, steps.ema, {**progress, "epoch": epoch, "batch": batch_index + 1})
                bar.update(task, advance=1, loss=loss.item(), lr=steps.optimizer.param_groups[0]["lr"],
                           ips=seen * world / max(time.perf_counter() - started, 1e-9))
        seconds = time.perf_counter() - started
        train_loss = acc.reduce(loss_sum, reduction="mean").item() / max(1, steps.batches - skip)
        return {"epoch": epoch + 1, "step": progress["step"], "train_loss": round(train_loss, 5),
                "lr": steps.optimizer.param_groups[0]["lr"], "epoch_time_s": round(seconds, 2),
                "img_per_s": round(seen * world / max(seconds, 1e-9), 1)}

    def _write_checkpoints(self, job: Job, model: nn.Module, ema: ModelEmaV3 | None, final: dict[str, Any],
                           ema_final: dict[str, Any] | None, lr: float, ema_record: dict[str, Any] | None) -> Path:
        path = self.dir / MODEL_FILE

        def write() -> None:
            final.update(job.extra_metrics)
            history = _read_metrics(self.dir / METRICS_FILE)
            final["train_seconds"] = round(sum(r.get("epoch_time_s", 0) for r in history), 1)
            before = next((r for r in history if r.get("epoch") == 0), None)
            if before is not None:
                final["before_top1"], final["before_top5"] = before["top1"], before["top5"]
            meta = {**job.describe(final), "identity": self.identity, "config": to_dict(self.config),
                    "metrics": final, "lr_effective": lr, "processes": self.accelerator.num_processes}
            if ema is not None:
                save_checkpoint(self.dir / EMA_FILE, ema.module.state_dict(),
                                {**meta, "metrics": ema_final, "ema": ema_record, "identity": {**self.identity, "ema": True}})
            save_checkpoint(path, model.state_dict(), meta)

        self._on_main(write)
        return path


@dataclass
class _Steps:
    """The prepared pieces one training epoch needs."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    loader: Any
    batches: int  # micro-batches per epoch: a whole number of optimizer steps


def make_ema(model: nn.Module, cfg: StageConfig) -> ModelEmaV3:
    """timm's EMA of the weights: DeiT's fixed decay by default, timm's decay warmup with --ema-warmup."""
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)


def ema_step(cfg: StageConfig, step: int) -> int | None:
    """The step handed to the EMA: none with a fixed decay (timm then uses the decay as given from the first
    update on, as DeiT's ModelEma does), the optimizer step with the warmup."""
    return step if cfg.ema_warmup else None


def _all_finite(acc: Accelerator, loss: torch.Tensor) -> bool:
    """Finite on every process (one process stopping alone would leave the others waiting)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum") / acc.num_processes
    return bool(flag.item() == 1.0)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress_bar(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=disable,
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, acc: Accelerator, predict: Predict = plain_logits,
             reference: nn.Module | None = None, per_class: bool = False) -> dict[str, Any]:
    """Top-1/top-5 and loss per head, each test image counted exactly once across processes.

    With a `reference` (a teacher), also its accuracy and how often each head disagrees with it.
    """
    net = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    headline = None
    for images, labels in loader:
        images, labels = images.to(acc.device), labels.to(acc.device)
        with acc.autocast():
            scores = predict(net, images)
            if reference is not None:
                scores["teacher"] = reference(images)
        headline = headline or next(iter(scores))
        num_classes = scores[headline].shape[1]
        record = {"label": labels, "loss": F.cross_entropy(scores[headline].float(), labels, reduction="none")}
        for name, value in scores.items():
            top = value.float().topk(min(5, value.shape[1]), dim=1).indices
            record[f"{name}/pred"] = top[:, 0]
            record[f"{name}/top5"] = (top == labels[:, None]).any(dim=1).float()  # gloo gathers no bools
        record = acc.gather_for_metrics(record)
        for key, value in record.items():
            parts.setdefault(key, []).append(value.cpu())
    net.train(was_training)
    merged = {k: torch.cat(v) for k, v in parts.items()}
    labels = merged["label"]
    heads = [k.split("/")[0] for k in merged if k.endswith("/pred")]
    result: dict[str, Any] = {"samples": int(labels.numel()), "loss": round(merged["loss"].mean().item(), 5)}
    per_head = {}
    for name in heads:
        correct = merged[f"{name}/pred"] == labels
        per_head[name] = {"top1": round(correct.float().mean().item() * 100, 3),
                          "top5": round(merged[f"{name}/top5"].float().mean().item() * 100, 3)}
    result.update(top1=per_head[headline]["top1"], top5=per_head[headline]["top5"], head=headline)
    if len(heads) > 1:
        result["heads"] = per_head
    if reference is not None:
        teacher_pred = merged["teacher/pred"]
        result["disagreement"] = {name: round((merged[f"{name}/pred"] != teacher_pred).float().mean().item(), 4)
                                  for name in heads if name != "teacher"}
    if per_class:
        correct = (merged[f"{headline}/pred"] == labels).float()
        result["per_class_top1"] = [round(correct[labels == c].mean().item() * 100, 2) if (labels == c).any() else None
                                    for c in range(num_classes)]
    return result


def flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """One level of keys for metrics.jsonl: top1, top5, loss, cls_top1, dist_top1, ..."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for name, values in metrics.get("heads", {}).items():
        for key, value in values.items():
            out[f"{name}_{key}"] = value
    for name, value in metrics.get("disagreement", {}).items():
        out[f"{name}_disagreement"] = value
    out["test_loss"] = out.pop("loss", None)
    return out


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    timing = f"({record['epoch_time_s']:.1f} s, {record['img_per_s']:.0f} img/s)"
    if "top1" not in record:
        return f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f}  {timing}"
    heads = [h for h in ("cls", "dist") if f"{h}_top1" in record]
    extra = "  ".join(f"{h} {record[f'{h}_top1']:.2f}" for h in heads)
    ema = f"  ema {record['ema_top1']:.2f}" if "ema_top1" in record else ""
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test top-1 [bold]{record['top1']:.2f}[/]  top-5 {record['top5']:.2f}  loss {record['test_loss']:.4f}"
            f"{('  ' + extra) if extra else ''}{ema}  {timing}")
