"""What every stage shares: its plan, its parents, its data settings, and the parts a run is built from.

Planning (each stage's `plan_*`) is a function of a config and of the parents' headers alone: it finds the
parents, fills what the user left open from them, resolves the `auto` values and refuses conflicts, all before
any data is loaded. A dry run is the same planning with the parents a pipeline has not written yet stood in by
`Expected` headers, so it resolves exactly what the run will. Each stage's `execute_*` then loads the data, builds
the models and the loss, and hands them to the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from accelerate import Accelerator
from rich.markup import escape
from torch import nn

from distill.config import FinetuneConfig, StageConfig, TransferConfig, resolve_auto, to_dict, validate
from distill.console import console
from distill.data import NORMS, DataSplits, Share, Transformed, eval_transform, measure_norm, open_dataset, train_transform
from distill.data.sources import describe_skipped, peek_classes, peek_train_size
from distill.errors import DistillError
from distill.losses import DistillationLoss, base_criterion
from distill.students import PreLogits, fusion_of, records_token
from distill.teachers import FrozenTeacher
from distill.teachers.frozen import check_classes, check_teacher
from distill.training.engine import Run
from distill.training.runfolder import FolderStatus, folder_status, recorded_settings
from distill.weights.checkpoint import MODEL_FILE, Checkpoint, stage_checkpoints
from distill.weights.naming import precision_name
from distill.weights.pretrained import open_source
from distill.console import listing

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT, DEFAULT_NORM = 32, 0.875, "imagenet"
Expecting = Mapping[Path, Checkpoint]  # pipeline outputs not written yet, by path: planning reads these instead


class Expected(Checkpoint):
    """The checkpoint an earlier stage of a pipeline will write: its header as planning predicts it."""

    teacher_source: Checkpoint | None = None

    @property
    def sha256(self) -> str:
        return "(not written yet)"

    @property
    def written(self) -> bool:
        return False


# -- parents ---------------------------------------------------------------------------------------
def open_checkpoint(path: Path, role: str, expecting: Expecting, expect_kind: str | None = None,
                    model: str | None = None) -> Checkpoint:
    """A parent given by path or source: what the pipeline will write there, else the file on disk, else
    pretrained weights imported once (timm/NAME.TAG, hf-hub:, local-dir:, a weights file with `model`)."""
    key = Path(path).resolve()
    for candidate in (key, key / MODEL_FILE):
        if candidate in expecting:
            return expecting[candidate]
    return open_source(path, model=model, role=role, expect_kind=expect_kind)


def read_teacher(path: Path | str, role: str = "teacher", expecting: Expecting = {}, model: str | None = None) -> Checkpoint:
    """A teacher given by path or source, refused when it is not a classifier."""
    return check_teacher(open_checkpoint(path, role, expecting, model=model), role)


def default_parent(workdir: Path, folder: str, role: str, flag: str, make: str, kind: str,
                   expecting: Expecting) -> Checkpoint:
    """A stage's parent when none is given: the folder its parent stage writes by default, nothing else."""
    path = Path(workdir) / folder / MODEL_FILE
    if path.resolve() in expecting or path.exists():
        return open_checkpoint(path, role, expecting, expect_kind=kind)
    others = [str(c.path.parent) for c in stage_checkpoints(workdir) if c.kind == kind]
    found = f"; {kind} checkpoints here: {listing(others, 4)}" if others else ""
    raise DistillError(f"No {role} at {path} (the default); {make} or pass {flag} CKPT{found}.")


def source_line(role: str, ckpt: Checkpoint) -> str:
    """One line saying which checkpoint a stage uses: path, model, resolution, data, accuracy."""
    if isinstance(ckpt, Expected):
        return escape(f"{role}: {ckpt.path} (written by the stage before)")
    data = ckpt.data
    where = data.get("dataset") or data.get("data_dir") or "?"
    accuracy = f", {ckpt.accuracy()}" if ckpt.accuracy() else ""
    return escape(f"{role}: {ckpt.path} ({ckpt.label()}; {where}, {len(ckpt.classes)} classes{accuracy})")


# -- data settings --------------------------------------------------------------------------------
def inherit_data(cfg: StageConfig, parent: Checkpoint | None, *, dataset: bool = True,
                 img_size: bool = True) -> StageConfig:
    """Fill the data settings the user left open from the parent checkpoint, else the defaults."""
    data = parent.data if parent else {}
    updates: dict[str, Any] = {}
    given = cfg.dataset is not None or cfg.data_dir is not None
    same_source = not given or (cfg.data_dir is None and cfg.dataset == data.get("dataset")) or (
        cfg.data_dir is not None and str(Path(cfg.data_dir).resolve()) == data.get("data_dir"))
    if dataset and data and same_source:
        if not given:
            updates["dataset"] = data.get("dataset")
            updates["data_dir"] = Path(data["data_dir"]) if data.get("data_dir") else None
        if cfg.classes is None and data.get("kept_classes") and data.get("classes"):
            updates["classes"] = ",".join(data["classes"])
    if (updates.get("dataset", cfg.dataset) is None) and (updates.get("data_dir", cfg.data_dir) is None):
        updates["dataset"] = "digits"
    if cfg.img_size is None:
        updates["img_size"] = int(data["img_size"]) if (img_size and data.get("img_size")) else DEFAULT_IMG_SIZE
    if cfg.crop_pct is None:
        updates["crop_pct"] = float(data.get("crop_pct", DEFAULT_CROP_PCT))
    if cfg.norm is None:  # a parent's unnamed normalisation (imported weights) is not inherited
        norm = data.get("norm", DEFAULT_NORM)
        updates["norm"] = norm if norm in (*NORMS, "dataset") else DEFAULT_NORM
    return dataclasses.replace(cfg, **updates)


def train_size(cfg: StageConfig) -> int | None:
    return peek_train_size(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list(), cfg.train_subset)


def resolve_for_run(cfg: StageConfig) -> tuple[StageConfig, list[str]]:
    """The `auto` values of this run: for the processes torchrun or accelerate launch started, the training set's
    size, and the global batch (and automatic precision) its run folder already records when that run batched as this
    one asks: the same command on another number of processes, or another machine, keeps them; another --batch-size
    makes another run."""
    recorded = recorded_settings(cfg.run_dir())
    same = recorded.get("batch_size") == cfg.batch_size and recorded.get("grad_accum") == cfg.grad_accum
    resolved, notes = resolve_auto(cfg, train_size=train_size(cfg), recorded_batch=recorded.get("global_batch") if same
                                   else None, recorded_precision=recorded.get("mixed_precision") if same else None)
    if cfg.train_subset:
        every = peek_train_size(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list())
        if every is not None and every <= cfg.train_subset:
            notes.append(f"--train-subset {cfg.train_subset:,} is not fewer than the {every:,} training images: every one "
                         "is used")
    return resolved, notes


def planned_classes(cfg: StageConfig) -> list[str] | None:
    return peek_classes(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list())


def load_data(cfg: StageConfig, share: Share = Share()) -> DataSplits:
    return open_dataset(None if cfg.data_dir else cfg.dataset, cfg.data_dir, skip_corrupt=cfg.skip_corrupt,
                        train_subset=cfg.train_subset, classes=cfg.class_list(), share=share)


def share_of(acc: Accelerator) -> Share:
    """How this run's processes share the preparation of the data: all at once, each checking its part of the images,
    so none waits in a collective while another works (the process group's timeout would end the run)."""
    if acc.num_processes == 1:
        return Share()
    from accelerate.utils import gather_object

    return Share(acc.process_index, acc.num_processes, gather_object)


def resolve_norm(cfg: StageConfig, data: DataSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.norm == "dataset":
        return measure_norm(data.train)
    return NORMS[cfg.norm]


def data_record(cfg: StageConfig, classes: list[str] | None, mean: Any, std: Any, info: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What a checkpoint says about its data and preprocessing."""
    return {**(info or {}), "dataset": cfg.dataset if cfg.data_dir is None else None,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "classes": classes, "kept_classes": bool(cfg.classes), "img_size": cfg.img_size, "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "norm": cfg.norm,
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None}


def training_transform(cfg: StageConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    try:
        return train_transform(cfg.img_size, mean=mean, std=std, aa=cfg.aa, reprob=cfg.reprob,
                               color_jitter=cfg.color_jitter, scale_min=cfg.scale_min, hflip=cfg.hflip,
                               interpolation=cfg.interpolation, crop=cfg.crop)
    except (AssertionError, ValueError, KeyError) as error:  # timm's parser of the augmentation string
        raise DistillError(f"timm cannot read the augmentation policy --aa {cfg.aa} ({error or 'bad format'}); "
                           "use e.g. rand-m9-mstd0.5-inc1, 3a, or none.") from None


def datasets_for(cfg: StageConfig, data: DataSplits, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool = True) -> tuple[Transformed, Transformed]:
    test_tf = eval_transform(cfg.img_size, mean=mean, std=std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    train_tf = training_transform(cfg, mean, std) if augment else test_tf  # FixRes: test-time preprocessing
    return Transformed(data.train, train_tf), Transformed(data.test, test_tf)


def resolution_setter(cfg: StageConfig, mean: tuple[float, ...], std: tuple[float, ...], train_set: Transformed,
                      test_set: Transformed, augment: bool = True) -> Callable[[int], None]:
    """What --img-size-schedule calls at each change: both datasets' preprocessing set to the new resolution."""
    def at(size: int) -> None:
        if train_set.view_target is not None and size != cfg.img_size:
            raise DistillError("A teacher cache holds views at one resolution; --img-size-schedule cannot be used with it.")
        new_train, new_test = datasets_for(dataclasses.replace(cfg, img_size=size), DataSplits(train_set.source,
                                           test_set.source, []), mean, std, augment)
        train_set.transform, test_set.transform = new_train.transform, new_test.transform

    return at


def criterion_for(cfg: StageConfig, kind: str, teacher: FrozenTeacher | None, alpha: float, tau: float,
                  use_mixup: bool = True, student: nn.Module | None = None, cached: bool = False) -> DistillationLoss:
    """The stage's loss; feature distillation reads the student's pre-logits (its projection is built here)."""
    mixup_active = use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)
    base = base_criterion(cfg.smoothing, mixup_active, cfg.loss, cfg.bce_target_thresh)
    features = PreLogits(student) if "feature" in kind else None
    return DistillationLoss(base, teacher if kind != "none" else None, kind, alpha, tau, features,
                            getattr(cfg, "feature_loss", None) or "mse", cached=cached)


def distillation_record(kind: str, alpha: float, tau: float, token: bool, feature_loss: str | None,
                        fusion: str | None = None) -> dict[str, Any]:
    """What a checkpoint says about how it learned from its teacher (and, for a token student, how its two heads make
    its prediction)."""
    record = {"kind": kind, "alpha": alpha, "tau": tau, "token": token}
    if "feature" in kind:
        record["feature_loss"] = feature_loss
    if token:
        record["fusion"] = fusion or "logits"
    return record


def inherit_distillation(cfg: FinetuneConfig | TransferConfig, parent: Checkpoint, kind: str) -> StageConfig:
    """alpha, tau, the feature loss and the heads' fusion the user left open: the parent's, else the defaults (a
    fusion only for a token student)."""
    inherited = parent.meta.get("distillation") or {}
    token = records_token(parent.model_name, parent.model_args)
    return dataclasses.replace(
        cfg, distillation=kind, alpha=cfg.alpha if cfg.alpha is not None else inherited.get("alpha", 0.5),
        tau=cfg.tau if cfg.tau is not None else inherited.get("tau", 1.0),
        feature_loss=cfg.feature_loss or inherited.get("feature_loss") or "mse",
        fusion=(cfg.fusion or fusion_of(parent.meta)) if token else None)

def taught(kind: str) -> str:
    """What a run takes from its teacher: its outputs when it distils, else only the settings it was checked with."""
    return "teacher" if kind != "none" else "recipe"


def parent_accuracy(parent: Checkpoint) -> dict[str, Any]:
    """The parent's recorded top-1 and how it was measured, kept beside a resolution change's own figures."""
    metrics = parent.meta.get("metrics") or {}
    precision = metrics.get("precision") or precision_name((parent.meta.get("config") or {}).get("mixed_precision", "no"))
    return {"parent_top1": metrics.get("top1"), "parent_img_size": metrics.get("img_size") or parent.img_size,
            "parent_precision": precision}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- plans -----------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """A stage resolved against its parents: everything a run needs except the data and the models."""

    stage: str  # teach | teach-fixres | student | finetune | transfer
    config: StageConfig
    parent: Checkpoint | None = None
    teacher: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)  # what `auto` chose, printed on the run's first line
    settings: dict[str, Any] = field(default_factory=dict)  # stage-specific resolved values (distillation, ...)
    before: list["StagePlan"] = field(default_factory=list)  # runs that must exist first (the FixRes teacher)
    model: dict[str, Any] = field(default_factory=dict)  # {"name", "args"} as far as known before the data
    classes: list[str] | None = None
    init: Checkpoint | None = None  # the weights a student starts from
    teachers: list[Checkpoint] = field(default_factory=list)  # every teacher, when there are several (teacher: the first)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def waiting(self) -> bool:
        """A parent or teacher is still to be written by an earlier stage."""
        return any(isinstance(c, Expected) for c in (self.parent, self.teacher, self.init, *self.teachers))

    def identity(self) -> dict[str, Any]:
        """A run is its resolved config plus the hashes of its parent and teacher."""
        config = to_dict(self.config, result_only=True)
        for key in {"global_batch", "sync_bn"} & set(getattr(self.config, "unused", ())):  # settings a stage does not
            config.pop(key, None)  # use name nothing of it (the older unused ones stay, as records hold them)
        identity = {"stage": self.stage, "config": config,
                    "parent": self.parent.sha256 if self.parent else None,
                    "teacher": self.teacher.sha256 if self.teacher else None}
        if self.init is not None:
            identity["init"] = self.init.sha256
        if len(self.teachers) > 1 and "cache" not in self.settings:  # one teacher's runs keep their identity
            identity["teachers"] = [teacher.sha256 for teacher in self.teachers]
        if "cache" in self.settings:  # a student taught by a cache: the cache (and its teacher) identify it
            identity["cache"] = self.settings["cache"]["identity"]
        return identity

    def status(self) -> FolderStatus | None:
        return None if self.waiting else folder_status(self.run_dir, self.identity())

    def expected(self) -> Expected:
        """What this run will write, as far as planning can tell."""
        cfg = self.config
        mean, std = NORMS.get(cfg.norm, (None, None))
        meta = {"kind": "teacher" if self.stage.startswith("teach") else "student", "stage": self.stage,
                "model": self.model, "data": data_record(cfg, self.classes, mean, std),
                "distillation": self.settings.get("distillation"), "metrics": {}}
        out = Expected(path=self.run_dir / MODEL_FILE, meta=meta)
        out.teacher_source = self.teacher
        return out


def finished(plan: StagePlan) -> Checkpoint | None:
    status = plan.status()
    return status.checkpoint if status is not None and status.state == "finished" else None


def planned(plan: StagePlan) -> StagePlan:
    """Last checks every plan gets: the resolved config is valid and its augmentation readable."""
    validate(plan.config)
    training_transform(plan.config, *NORMS["imagenet"])  # a bad --aa is refused now, not after the data loads
    return plan


def open_run(plan: StagePlan) -> tuple[Run, Checkpoint | None]:
    """The run folder: (run, checkpoint) when already finished with these settings, else (run, None)."""
    run = Run(plan.config, plan.identity())
    if run.finished is not None:
        ckpt = run.finished
        if run.accelerator.is_main_process:
            console.print(f"[bold]{plan.stage}[/]: {escape(str(ckpt.path))} is already finished with these settings: "
                          f"{escape(ckpt.accuracy() or 'no accuracy recorded')}; reusing it.", soft_wrap=True)
        return run, ckpt
    if run.accelerator.is_main_process:
        if plan.parent is not None:
            role = ("teacher" if plan.parent is plan.teacher else
                    "architecture from (its weights are not used)" if getattr(plan.config, "from_scratch", False)
                    else f"teacher adapted to {plan.config.img_size} px for the fine-tune (FixRes)"
                    if plan.stage == "teach-fixres" else "parent")
            console.print(source_line(role, plan.parent), soft_wrap=True)
        if plan.teacher is not None and plan.teacher is not plan.parent:
            console.print(source_line("teacher", plan.teacher), soft_wrap=True)
        for teacher in plan.teachers[1:]:
            console.print(source_line("teacher", teacher), soft_wrap=True)
        if "cache" in plan.settings:
            cache = plan.settings["cache"]
            made_by = [one.get("path") for one in cache.get("teachers") or [cache["teacher"]]]
            console.print(f"teacher cache: {cache['path']} (made by {' and '.join(map(str, made_by))}; "
                          f"{'the teacher does' if len(made_by) == 1 else 'the teachers do'} not run)", soft_wrap=True)
    return run, None


def load_with_norm(run: Run, teacher: Checkpoint | None, where: str) -> tuple[DataSplits, tuple, tuple]:
    """The stage's data (refused when the teacher knows other classes) and its normalisation."""
    cfg = run.config
    data = load_data(cfg, share_of(run.accelerator))
    skipped = describe_skipped(data.info)
    if skipped and run.accelerator.is_main_process:  # the planning lines above counted the files, readable or not
        console.print(f"--skip-corrupt: {escape(skipped)}; {len(data.train):,} training and {len(data.test):,} test "
                      "images remain (the lines above counted every file)", soft_wrap=True)
    if teacher is not None:
        check_classes(teacher, data.classes, where)
    mean, std = resolve_norm(cfg, data)
    return data, mean, std
