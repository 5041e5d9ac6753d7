"""The four stages: each is planned from its config and its parents, then executed by the engine.

teach -> student -> finetune -> transfer. Planning (`plan_teach`, `plan_student`, ...) is a function of
a config and of the parents' headers alone: it finds the parents, fills what the user left open from
them, resolves the `auto` values and refuses conflicts, all before any data is loaded. A dry run is
the same planning with the parents a pipeline has not written yet stood in by `Expected` headers, so it
resolves exactly what the run will. `run_stage` then executes a plan: it loads the data, builds the
models and the loss, and hands them to the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from rich.markup import escape
from torch import nn

from distill.weights.checkpoint import MODEL_FILE, Checkpoint, build_model, class_difference, find_by_sha256, stage_checkpoints
from distill.config import (CacheConfig, FinetuneConfig, FixResConfig, StageConfig, StudentConfig, TeachConfig,
                            TransferConfig, resolve_auto, to_dict, validate)
from distill.data import NORMS, DataSplits, Transformed, eval_transform, measure_norm, open_dataset, train_transform
from distill.data.sources import describe_skipped, peek_classes, peek_train_size
from distill.console import console
from distill.training.engine import Job, Run, make_accelerator
from distill.training.runfolder import FolderStatus, folder_status, normalise
from distill.errors import DistillError
from distill.losses import DistillationLoss, base_criterion
from distill.weights.naming import precision_name
from distill.weights.models import check_model_name, create
from distill.weights.pretrained import open_source
from distill.speed import channels_last, choose_kernels, to_channels_last
from distill.students import (PreLogits, attention_parameter_names, build_student, default_patch_size, fit_deit_weights,
                              has_dist_token,
                              head_parameter_names, named_outputs, records_token, resize, set_distilled_training,
                              student_args, student_model, train_only)
from distill.teachers import FrozenTeacher, build_teacher, freeze_for_fixres
from distill.teachers.cache import TeacherCache, fill_shards, read_manifest, shard_count, view_seeds, write_manifest, write_seeds

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT, DEFAULT_NORM = 32, 0.875, "imagenet"
Expecting = Mapping[Path, Checkpoint]  # pipeline outputs not written yet, by path: planning reads these instead


class Expected(Checkpoint):
    """The checkpoint an earlier stage of a pipeline will write: its header as planning predicts it."""

    teacher_source: Checkpoint | None = None

    @property
    def sha256(self) -> str:
        return "(not written yet)"


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
    ckpt = open_checkpoint(path, role, expecting, model=model)
    if ckpt.kind not in ("teacher", "pretrained"):
        raise DistillError(f"The {role} {ckpt.path} is a {ckpt.kind} checkpoint (from `distill {ckpt.stage}`), not a teacher; "
                           "train one with `distill teach` (any timm classifier can be a teacher).")
    if not isinstance(ckpt, Expected) and (int(ckpt.model_args.get("num_classes", 0)) <= 0 or not ckpt.classes):
        raise DistillError(f"The {role} {ckpt.path} is not a classifier (it has no classes).")
    return ckpt


def default_parent(workdir: Path, folder: str, role: str, flag: str, make: str, kind: str,
                   expecting: Expecting) -> Checkpoint:
    """A stage's parent when none is given: the folder its parent stage writes by default, nothing else."""
    path = Path(workdir) / folder / MODEL_FILE
    if path.resolve() in expecting or path.exists():
        return open_checkpoint(path, role, expecting, expect_kind=kind)
    others = [str(c.path.parent) for c in stage_checkpoints(workdir) if c.kind == kind]
    found = f"; {kind} checkpoints here: {', '.join(others[:4])}" if others else ""
    raise DistillError(f"No {role} at {path} (the default); {make} or pass {flag} CKPT{found}.")


def transfer_parent(workdir: Path, expecting: Expecting) -> Checkpoint:
    """Transfer starts from the fine-tuned student when there is one, else the student; when both exist and
    the fine-tune was not made from that student, which one is meant is unclear and it refuses."""
    finetuned, trained = (Path(workdir) / name / MODEL_FILE for name in ("finetune", "student"))
    have = {p: (p.resolve() in expecting or p.exists()) for p in (finetuned, trained)}
    if have[finetuned]:
        tuned = open_checkpoint(finetuned, "checkpoint", expecting, expect_kind="student")
        if have[trained] and not isinstance(tuned, Expected):
            student = open_checkpoint(trained, "checkpoint", expecting, expect_kind="student")
            if not isinstance(student, Expected) and (tuned.meta.get("parent") or {}).get("sha256") != student.sha256:
                raise DistillError(f"{finetuned.parent} was not fine-tuned from {trained.parent} (the student was trained "
                                   "again since); pass --checkpoint with the one to transfer.")
        return tuned
    return default_parent(workdir, "student", "student", "--checkpoint", "train one with `distill student`", "student",
                          expecting)


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


def planned_classes(cfg: StageConfig) -> list[str] | None:
    return peek_classes(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list())


def check_classes(teacher: Checkpoint, classes: list[str] | None, where: str) -> None:
    """Refuse a teacher that knows other classes (when both lists are known); ImageNet classes match by
    name or by synset."""
    if classes is None or not teacher.classes or teacher.knows_classes(classes):
        return
    known = teacher.classes  # compared with whichever of the teacher's names or ids the data resembles more
    if teacher.class_ids and len(set(classes) & set(teacher.class_ids)) > len(set(classes) & set(known)):
        known = teacher.class_ids
    detail = class_difference(known, classes, ("the teacher", "the data"))
    raise DistillError(f"The teacher {teacher.path} was trained on other classes than {where} ({detail}).")


def load_data(cfg: StageConfig) -> DataSplits:
    return open_dataset(None if cfg.data_dir else cfg.dataset, cfg.data_dir, skip_corrupt=cfg.skip_corrupt,
                        train_subset=cfg.train_subset, classes=cfg.class_list())


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


def teacher_resolution(teacher: Checkpoint, img_size: int, teacher_res: str = "student") -> int:
    """The resolution the teacher reads the batch at: the student's (the paper), the teacher's own, or a number."""
    if teacher_res == "student":
        return img_size
    if teacher_res == "teacher":
        return teacher.img_size
    return int(teacher_res)


def frozen_teacher(ckpt: Checkpoint, input_norm: tuple[tuple[float, ...], tuple[float, ...]], img_size: int,
                   cfg: StageConfig | None = None, teacher_res: str = "student") -> FrozenTeacher:
    """The teacher, frozen, renormalising batches of `img_size` px and reading them at the resolution --teacher-res
    asks for; compiled as the run asks (the engine puts it in channels-last format)."""
    size = teacher_resolution(ckpt, img_size, teacher_res)
    model = build_model(ckpt)
    if hasattr(model, "set_input_size") and hasattr(model, "pos_embed") and ckpt.img_size != size:
        resize(model, size)  # a ViT teacher must read its input size
    teacher = FrozenTeacher(model, (ckpt.data["mean"], ckpt.data["std"]), input_norm,
                            img_size=size if size != img_size else None)
    if cfg is not None and cfg.compile:
        teacher.model = torch.compile(teacher.model)
    return teacher


def criterion_for(cfg: StageConfig, kind: str, teacher: FrozenTeacher | None, alpha: float, tau: float,
                  use_mixup: bool = True, student: nn.Module | None = None, cached: bool = False) -> DistillationLoss:
    """The stage's loss; feature distillation reads the student's pre-logits (its projection is built here)."""
    mixup_active = use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)
    base = base_criterion(cfg.smoothing, mixup_active, cfg.loss, cfg.bce_target_thresh)
    features = PreLogits(student) if "feature" in kind else None
    return DistillationLoss(base, teacher if kind != "none" else None, kind, alpha, tau, features,
                            getattr(cfg, "feature_loss", None) or "mse", cached=cached)


def distillation_record(kind: str, alpha: float, tau: float, token: bool, feature_loss: str | None) -> dict[str, Any]:
    """What a checkpoint says about how it learned from its teacher."""
    record = {"kind": kind, "alpha": alpha, "tau": tau, "token": token}
    if "feature" in kind:
        record["feature_loss"] = feature_loss
    return record


def inherit_distillation(cfg: FinetuneConfig | TransferConfig, parent: Checkpoint, kind: str) -> StageConfig:
    """alpha, tau and the feature loss the user left open: the parent's, else the defaults."""
    inherited = parent.meta.get("distillation") or {}
    return dataclasses.replace(
        cfg, distillation=kind, alpha=cfg.alpha if cfg.alpha is not None else inherited.get("alpha", 0.5),
        tau=cfg.tau if cfg.tau is not None else inherited.get("tau", 1.0),
        feature_loss=cfg.feature_loss or inherited.get("feature_loss") or "mse")

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

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def waiting(self) -> bool:
        """A parent or teacher is still to be written by an earlier stage."""
        return any(isinstance(c, Expected) for c in (self.parent, self.teacher, self.init))

    def identity(self) -> dict[str, Any]:
        """A run is its resolved config plus the hashes of its parent and teacher."""
        identity = {"stage": self.stage, "config": to_dict(self.config, result_only=True),
                    "parent": self.parent.sha256 if self.parent else None,
                    "teacher": self.teacher.sha256 if self.teacher else None}
        if self.init is not None:
            identity["init"] = self.init.sha256
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


def _planned(plan: StagePlan) -> StagePlan:
    """Last checks every plan gets: the resolved config is valid and its augmentation readable."""
    validate(plan.config)
    training_transform(plan.config, *NORMS["imagenet"])  # a bad --aa is refused now, not after the data loads
    return plan


def plan_teach(cfg: TeachConfig, expecting: Expecting = {}) -> StagePlan:
    """Train a teacher from scratch, or from --init (a FixRes config adapts --init to a new resolution)."""
    fixres = isinstance(cfg, FixResConfig)
    init = read_teacher(cfg.init, role="--init checkpoint", expecting=expecting, model=cfg.model) if cfg.init else None
    if init is not None:
        cfg = dataclasses.replace(cfg, model=init.model_name)
    cfg = inherit_data(cfg, init, img_size=not fixres)
    if init is None:
        name = student_model(cfg.model, token=False)[0] if cfg.model.startswith(("deit", "vit")) else cfg.model
        check_model_name(name)
        cfg = dataclasses.replace(cfg, model=name)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = planned_classes(cfg)
    if init is not None:
        args = {**init.model_args, **({"num_classes": len(classes)} if classes else {})}
    elif cfg.model.startswith(("deit", "vit")):
        args = student_args(cfg, len(classes) if classes else None)
    else:
        args = {"num_classes": len(classes) if classes else None}
    stage = "teach-fixres" if fixres else "teach"
    return _planned(StagePlan(stage, cfg, parent=init, notes=notes, model={"name": cfg.model, "args": args},
                              classes=classes))


def plan_student(cfg: StudentConfig, expecting: Expecting = {}) -> StagePlan:
    """Distil a DeiT from a teacher: none, soft, hard, with or without the distillation token."""
    if cfg.teacher_cache is not None:
        return plan_cached_student(cfg, expecting)
    if cfg.teacher is not None:  # with --distillation none, a given teacher is only measured against
        teacher = read_teacher(cfg.teacher, expecting=expecting, model=cfg.teacher_model)
    elif cfg.distillation != "none":
        teacher = default_parent(cfg.workdir, "teach", "teacher", "--teacher", "train one with `distill teach`", "teacher",
                                 expecting)
    else:
        teacher = None
    init = student_init(cfg, expecting) if cfg.init else None
    if init is not None:  # the student takes the size of its starting weights
        sizing = {k: init.model_args.get(k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
        cfg = dataclasses.replace(cfg, model=init.model_name, **sizing)
    cfg = inherit_data(cfg, teacher or init)
    name, token_args = student_model(cfg.model, cfg.token)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = planned_classes(cfg)
    if teacher is not None:
        check_classes(teacher, classes, f"the dataset {cfg.data_dir or cfg.dataset}")
        classes = classes or teacher.classes or None
    args = {**student_args(cfg, len(classes) if classes else None), **token_args}
    distillation = distillation_record(cfg.distillation, cfg.alpha, cfg.tau, cfg.token, cfg.feature_loss)
    distillation["teacher_res"] = teacher_resolution(teacher, cfg.img_size, cfg.teacher_res) if teacher else None
    return _planned(StagePlan("student", cfg, parent=teacher, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": name, "args": args},
                              classes=classes, init=init))


def student_init(cfg: StudentConfig, expecting: Expecting) -> Checkpoint:
    """The DeiT a student starts from (--init), refused when it is not a ViT or when the flags resize it."""
    given = [k for k in ("patch_size", "embed_dim", "depth", "num_heads") if getattr(cfg, k) is not None]
    if given:
        raise DistillError(f"--{given[0].replace('_', '-')} cannot resize a student started from --init {cfg.init}; it "
                           "takes the size of those weights.")
    architecture = cfg.model if timm.is_model(cfg.model) else student_model(cfg.model, token=False)[0]
    init = open_checkpoint(cfg.init, "--init checkpoint", expecting, model=architecture)
    if not init.model_name.startswith("deit_") or "patch_size" not in init.model_args:
        raise DistillError(f"The --init checkpoint {init.path} is a {init.model_name}; a student starts from a DeiT "
                           "(deit_tiny/small/base, with or without the distillation token).")
    return init


# Settings a teacher cache fixes: the training data and every augmentation setting applied before the batch.
CACHED_SETTINGS = ("dataset", "data_dir", "classes", "train_subset", "img_size", "aa", "reprob", "scale_min", "hflip",
                   "color_jitter", "interpolation", "norm")


def inherit_from_cache(cfg: StageConfig, cache: TeacherCache) -> StageConfig:
    """Take the cache's data and augmentation where the student left them open; refuse where it asks for others."""
    made = cache.manifest["config"]
    updates, differences = {}, []
    for key in CACHED_SETTINGS:
        mine, theirs = getattr(cfg, key), made.get(key)
        if mine is None:
            updates[key] = Path(theirs) if key == "data_dir" and theirs else theirs
        elif key == "data_dir" and theirs and Path(mine).resolve() == Path(theirs).resolve():
            continue
        elif mine != theirs and not (key == "dataset" and made.get("data_dir")):
            differences.append(f"{key} {theirs} (asked: {mine})")
    if differences:
        raise DistillError(f"The teacher cache {cache.root} was made with other data or augmentation: "
                           f"{'; '.join(differences[:4])}. Leave these unset to use the cache's, or make a cache with them.")
    return dataclasses.replace(cfg, **updates)


def plan_cached_student(cfg: StudentConfig, expecting: Expecting) -> StagePlan:
    """A student taught by a teacher cache: the teacher's targets are read, never computed."""
    if cfg.distillation not in ("soft", "hard"):
        raise DistillError("--teacher-cache replays a teacher for soft or hard distillation; it has nothing to give "
                           f"--distillation {cfg.distillation}.")
    if cfg.repeated_aug > 1:
        raise DistillError("--teacher-cache replays one view of each image per epoch; it cannot be combined with "
                           "--repeated-aug.")
    cache = TeacherCache(cfg.teacher_cache)
    record = cache.manifest["teacher"]
    teacher = None
    if cfg.teacher is not None:
        teacher = read_teacher(cfg.teacher, expecting=expecting)
        if teacher.sha256 != record["sha256"]:
            raise DistillError(f"The teacher cache {cache.root} was made by another teacher ({record['path']}), not "
                               f"{teacher.path}.")
    elif Path(record.get("path", "")).exists():  # kept for the evaluation's agreement with the teacher only
        found = read_teacher(Path(record["path"]))
        teacher = found if found.sha256 == record["sha256"] else None
    cfg = inherit_data(inherit_from_cache(cfg, cache), teacher)
    if "feature" in cfg.distillation:
        raise DistillError(f"A teacher cache holds the teacher's probabilities, not its features: --distillation "
                           f"{cfg.distillation} needs the teacher itself (--teacher, without --teacher-cache).")
    name, token_args = student_model(cfg.model, cfg.token)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = cache.manifest["classes"]
    args = {**student_args(cfg, len(classes)), **token_args}
    distillation = distillation_record(cfg.distillation, cfg.alpha, cfg.tau, cfg.token, cfg.feature_loss)
    settings = {"distillation": distillation, "cache": {"path": str(cache.root.resolve()),
                                                         "identity": cache.manifest["identity"], "teacher": record}}
    plan = StagePlan("student", cfg, parent=teacher, teacher=teacher, notes=notes, settings=settings,
                     model={"name": name, "args": args}, classes=classes)
    plan.settings["cache_object"] = cache
    return _planned(plan)


def targets_digest(labels: list[int]) -> str:
    """What ties a cache to the exact training split it was made on: the labels in order."""
    return hashlib.sha256(",".join(map(str, labels)).encode()).hexdigest()


def plan_cache(cfg: CacheConfig, expecting: Expecting = {}) -> StagePlan:
    """A teacher run once over K augmented views of every training image."""
    if cfg.teacher is not None:
        teacher = read_teacher(cfg.teacher, expecting=expecting)
    else:
        teacher = default_parent(cfg.workdir, "teach", "teacher", "--teacher", "train one with `distill teach`", "teacher",
                                 expecting)
    cfg = inherit_data(cfg, teacher)
    cfg = dataclasses.replace(cfg, views=cfg.views or cfg.epochs)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = planned_classes(cfg)
    check_classes(teacher, classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    return _planned(StagePlan("cache-teacher", cfg, parent=teacher, teacher=teacher, notes=notes,
                              classes=classes or teacher.classes or None))


def execute_cache(plan: StagePlan) -> None:
    """Write the cache shard by shard (resuming a killed run), then mark it complete."""
    cfg, teacher = plan.config, plan.teacher
    root = cfg.run_dir()
    identity = normalise(plan.identity())
    existing = read_manifest(root)
    if existing is not None and existing.get("identity") != identity:
        if not cfg.overwrite:
            raise DistillError(f"{root} already holds a teacher cache made with other settings; pass --overwrite to "
                               "replace it, or --name to write elsewhere.")
        shutil.rmtree(root)
        existing = None
    if existing is not None and existing.get("complete"):
        console.print(f"[bold]cache-teacher[/]: {root} is already complete with these settings; reusing it.")
        return None
    acc = make_accelerator(cfg.mixed_precision)
    with acc.main_process_first():
        data = load_data(cfg)
    check_classes(teacher, data.classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    mean, std = resolve_norm(cfg, data)
    seeds = view_seeds(cfg.seed, cfg.views, len(data.train))
    manifest = {"identity": identity, "complete": False, "views": cfg.views, "images": len(data.train),
                "num_classes": len(data.classes), "classes": data.classes, "top_k": cfg.top_k, "seed": cfg.seed,
                "shard_size": cfg.shard_size,
                "teacher": teacher.lineage("teacher"), "config": to_dict(cfg, result_only=True),
                "data": data_record(cfg, data.classes, mean, std, data.info),
                "targets_sha256": targets_digest(data.train.targets)}
    if acc.is_main_process:
        console.print(source_line("teacher", teacher), soft_wrap=True)
        console.print(f"[bold]cache-teacher[/] -> {root}  ({cfg.views} views x {len(data.train):,} images, top-{cfg.top_k}, "
                      f"{acc.num_processes} process(es), precision {precision_name(cfg.mixed_precision)})"
                      + "".join(f"\n  {note}" for note in plan.notes), soft_wrap=True)
        root.mkdir(parents=True, exist_ok=True)
        if existing is None:
            write_seeds(root, seeds)
            write_manifest(root, manifest)
    acc.wait_for_everyone()
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size, cfg).to(acc.device)
    choose_kernels(acc, [frozen], cfg.attention, cfg.onednn_linear)
    if channels_last(cfg.channels_last, acc.device.type, cfg.mixed_precision):
        to_channels_last([frozen])
    dataset = Transformed(data.train, training_transform(cfg, mean, std))
    total = shard_count(cfg.views, len(data.train), cfg.shard_size)
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=not (acc.is_main_process and console.is_terminal)) as bar:
        task = bar.add_task("teacher views", total=-(-total // acc.num_processes))
        written = fill_shards(root, dataset, seeds, frozen, acc, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              top_k=cfg.top_k, shard_size=cfg.shard_size, progress=lambda shard: bar.advance(task))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(root, {**manifest, "complete": True})
        console.print(f"teacher cache: {root}, {total} shards ({written} written now), "
                      f"{cfg.views * len(data.train):,} views", soft_wrap=True)
    acc.wait_for_everyone()
    return None


def locate_teacher(parent: Checkpoint, workdir: Path) -> Checkpoint | None:
    """A checkpoint's teacher, by its recorded path, else by its sha256 anywhere in the work folder."""
    if isinstance(parent, Expected):
        return parent.teacher_source
    record = parent.meta.get("teacher")
    if not record:
        return None
    if record.get("source") and not record.get("path"):  # imported weights whose teacher is a known source
        return read_teacher(record["source"])
    path = Path(record.get("path", ""))
    if path.exists():
        try:
            ckpt = read_teacher(path)
            if ckpt.sha256 == record.get("sha256"):
                return ckpt
        except DistillError:
            pass
    return find_by_sha256(workdir, record.get("sha256", ""))


def fixres_config(teacher: Checkpoint, cfg: FinetuneConfig) -> FixResConfig:
    """FixRes: the teacher at the target resolution, by training its classifier and BatchNorm on test-time
    preprocessing (SGD, momentum 0.9, weight decay 1e-4). Saved as its own reusable run, named by the
    resolution and the teacher's sha256."""
    tag = "" if cfg.teacher_bn == "last" else f"{cfg.teacher_bn}bn-"
    sha = teacher.sha256[:8] if not isinstance(teacher, Expected) else "pending"
    return FixResConfig(
        workdir=cfg.workdir, name=f"teach-fixres-{cfg.res}-{tag}{sha}", seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, save_every=cfg.save_every, num_workers=cfg.num_workers,
        eval_every=cfg.eval_every, overwrite=cfg.overwrite, skip_corrupt=cfg.skip_corrupt,
        dataset=cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset, classes=cfg.classes, img_size=cfg.res,
        crop_pct=teacher.data.get("crop_pct"), interpolation=cfg.interpolation, norm=teacher.data.get("norm"),
        profile="short", aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, scale_min=1.0, smoothing=0.0, hflip=0.0,
        epochs=cfg.teacher_epochs,
        batch_size=cfg.batch_size, opt="sgd", lr=cfg.teacher_lr, lr_scale=cfg.lr_scale, min_lr=0.0, warmup_epochs=0.0,
        weight_decay=1e-4, momentum=0.9, drop_path=0.0, model=teacher.model_name, init=teacher.path, bn=cfg.teacher_bn,
    )


def plan_finetune(cfg: FinetuneConfig, expecting: Expecting = {}) -> StagePlan:
    """Fine-tune a student at a higher resolution while it keeps learning from a teacher at that resolution."""
    if cfg.res is None:
        raise DistillError("Give the target resolution with --res (e.g. --res 384).")
    if cfg.img_size not in (None, cfg.res):
        raise DistillError(f"finetune trains at --res ({cfg.res} px); leave --img-size unset (it is {cfg.img_size}).")
    if cfg.checkpoint:
        parent = open_checkpoint(cfg.checkpoint, "checkpoint", expecting, expect_kind="student", model=cfg.model or None)
    else:
        parent = default_parent(cfg.workdir, "student", "student", "--checkpoint", "train one with `distill student`",
                                "student", expecting)
    if parent.kind == "pretrained" and "patch_size" not in parent.model_args:
        raise DistillError(f"{parent.path} is a {parent.model_name}: finetune resamples a ViT's position embeddings; "
                           "a convnet changes resolution without it (distill evaluate --res, or distill transfer).")
    cfg = inherit_data(dataclasses.replace(cfg, img_size=cfg.res), parent)
    patch = int(parent.model_args.get("patch_size") or default_patch_size(parent.img_size))
    if cfg.res % patch:
        raise DistillError(f"Resolution {cfg.res} is not a multiple of the patch size {patch}; "
                           f"try {max(patch, cfg.res // patch * patch)} or {(cfg.res // patch + 1) * patch}.")
    inherited = parent.meta.get("distillation") or {}
    kind = "none" if cfg.no_teacher else (cfg.distillation or inherited.get("kind") or "none")
    cfg = inherit_distillation(cfg, parent, kind)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    teacher: Checkpoint | None = None
    before: list[StagePlan] = []
    if kind != "none":
        if cfg.teacher is not None:
            teacher = read_teacher(cfg.teacher, expecting=expecting, model=cfg.teacher_model)
        else:
            original = locate_teacher(parent, cfg.workdir)
            if original is None:
                raise DistillError(f"The teacher of {parent.path} is no longer where it was trained; pass --teacher CKPT "
                                   "or --no-teacher.")
            adapt = plan_teach(fixres_config(original, cfg), expecting)
            before.append(adapt)
            teacher = finished(adapt) or adapt.expected()
        check_classes(teacher, parent.classes or None, f"the student {parent.path}")
    model = {"name": parent.model_name, "args": {**parent.model_args, "img_size": cfg.res}}
    distillation = distillation_record(kind, cfg.alpha, cfg.tau, records_token(parent.model_name, parent.model_args),
                                       cfg.feature_loss)
    distillation["teacher_res"] = teacher_resolution(teacher, cfg.res, cfg.teacher_res) if teacher else None
    return _planned(StagePlan("finetune", cfg, parent=parent, teacher=teacher, notes=notes, before=before,
                              settings={"distillation": distillation}, model=model, classes=parent.classes or None))


def plan_transfer(cfg: TransferConfig, expecting: Expecting = {}) -> StagePlan:
    """Fine-tune a student on a new target: new head(s), optionally attention-only or head-only, optionally
    still distilling from a teacher trained on the target."""
    if cfg.dataset is None and cfg.data_dir is None:
        raise DistillError("Name the target with --dataset (cifar10, cifar100, flowers102, stanford_cars, a hub id) "
                           "or --data-dir.")
    if cfg.attn_only and cfg.head_only:
        raise DistillError("Choose one of --attn-only and --head-only.")
    if cfg.checkpoint:
        parent = open_checkpoint(cfg.checkpoint, "checkpoint", expecting, expect_kind="student", model=cfg.model or None)
    else:
        parent = transfer_parent(cfg.workdir, expecting)
    cfg = inherit_data(cfg, parent, dataset=False)
    teacher = read_teacher(cfg.teacher, expecting=expecting, model=cfg.teacher_model) if cfg.teacher else None
    inherited = parent.meta.get("distillation") or {}
    if teacher is None and cfg.distillation not in (None, "none"):
        raise DistillError(f"--distillation {cfg.distillation} needs a teacher trained on the target; pass --teacher CKPT "
                           "(make one with `distill teach --dataset X --init TEACHER`).")
    kind = (cfg.distillation or (inherited.get("kind") if inherited.get("kind") not in (None, "none") else "hard")) \
        if teacher else "none"
    cfg = inherit_distillation(cfg, parent, kind)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = planned_classes(cfg)
    if teacher is not None:
        check_classes(teacher, classes, f"the target {cfg.data_dir or cfg.dataset}")
    args = {**parent.model_args, "num_classes": len(classes) if classes else None}
    if args.get("img_size"):
        args["img_size"] = cfg.img_size
    distillation = distillation_record(kind, cfg.alpha, cfg.tau, records_token(parent.model_name, parent.model_args),
                                       cfg.feature_loss)
    distillation["teacher_res"] = teacher_resolution(teacher, cfg.img_size, cfg.teacher_res) if teacher else None
    return _planned(StagePlan("transfer", cfg, parent=parent, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": parent.model_name, "args": args},
                              classes=classes))


PLANNERS: dict[str, Callable[..., StagePlan]] = {
    "teach": plan_teach, "student": plan_student, "finetune": plan_finetune, "transfer": plan_transfer,
    "cache-teacher": plan_cache,
}


# -- execution -------------------------------------------------------------------------------------
def run_stage(make_plan: Callable[[], StagePlan]) -> Checkpoint:
    """Execute a plan: first the runs it needs (the FixRes teacher), then itself, planned again now that
    they exist."""
    plan = make_plan()
    if plan.before:
        for before in plan.before:
            run_stage(lambda before=before: before)
        plan = make_plan()
    if plan.waiting:
        raise DistillError(f"Stage {plan.stage} needs {(plan.parent or plan.teacher).path}, which does not exist yet; run "
                           "the earlier stages first.")
    return EXECUTORS[plan.stage](plan)


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
                    else "parent")
            console.print(source_line(role, plan.parent), soft_wrap=True)
        if plan.teacher is not None and plan.teacher is not plan.parent:
            console.print(source_line("teacher", plan.teacher), soft_wrap=True)
        if "cache" in plan.settings:
            cache = plan.settings["cache"]
            console.print(f"teacher cache: {cache['path']} (made by {cache['teacher'].get('path')}; the teacher does not run)",
                          soft_wrap=True)
    return run, None


def load_with_norm(run: Run, teacher: Checkpoint | None, where: str) -> tuple[DataSplits, tuple, tuple]:
    """The stage's data (refused when the teacher knows other classes) and its normalisation."""
    cfg = run.config
    with run.accelerator.main_process_first():  # a hub dataset is downloaded and cached once
        data = load_data(cfg)
    skipped = describe_skipped(data.info)
    if skipped and run.accelerator.is_main_process:
        console.print(f"--skip-corrupt: {escape(skipped)}", soft_wrap=True)
    if teacher is not None:
        check_classes(teacher, data.classes, where)
    mean, std = resolve_norm(cfg, data)
    return data, mean, std


def execute_teach(plan: StagePlan) -> Checkpoint:
    cfg, init = plan.config, plan.parent
    fixres = plan.stage == "teach-fixres"
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, None, "")
    if init is not None:
        model = build_model(init, drop_path_rate=cfg.drop_path)
        args = init.model_args
        if not init.knows_classes(data.classes):
            model.reset_classifier(len(data.classes))
            args["num_classes"] = len(data.classes)
        if hasattr(model, "pos_embed") and init.img_size != cfg.img_size:
            resize(model, cfg.img_size)
            args["img_size"] = cfg.img_size
    elif cfg.model.startswith(("deit", "vit")):
        model, args = build_student(cfg.model, len(data.classes), cfg.img_size, patch_size=cfg.patch_size,
                                    embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                    layer_scale=cfg.layer_scale, drop_path=cfg.drop_path)
    else:
        model, args = build_teacher(cfg.model, len(data.classes), cfg.drop_path)
    trainable = freeze_for_fixres(model, cfg.bn, cfg.img_size) if fixres else None
    train_set, test_set = datasets_for(cfg, data, mean, std, augment=not fixres)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        fixres_record = None
        if fixres:
            fixres_record = {"bn": cfg.bn, "trainable": len(trainable), "from_img_size": init.img_size,
                             "top1_at_from_img_size": (init.meta.get("metrics") or {}).get("top1"),
                             "before_top1": metrics.get("before_top1"), "after_top1": metrics.get("top1")}
        return {"kind": "teacher", "stage": plan.stage, "model": {"name": cfg.model, "args": args},
                "params": count_params(model), "data": data_record(cfg, data.classes, mean, std, data.info),
                "parent": init.lineage("weights") if init else None, "fixres": fixres_record}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, not fixres),
              criterion=criterion_for(cfg, "none", None, 0.0, 1.0, use_mixup=not fixres), num_classes=len(data.classes),
              describe=describe, use_mixup=not fixres, class_names=data.classes, notes=plan.notes,
              evaluate_first=fixres, extra_metrics=parent_accuracy(init) if fixres else {})
    return run.fit(job)


def execute_student(plan: StagePlan) -> Checkpoint:
    cfg, teacher = plan.config, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.data_dir or cfg.dataset}")
    name, token_args = student_model(cfg.model, cfg.token)
    model, args = build_student(name, len(data.classes), cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                depth=cfg.depth, num_heads=cfg.num_heads, layer_scale=cfg.layer_scale,
                                drop_path=cfg.drop_path, extra=token_args)
    if plan.init is not None:
        model.load_state_dict(fit_deit_weights(plan.init.state_dict(), model,
                                               keep_heads=plan.init.knows_classes(data.classes)))
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size, cfg, cfg.teacher_res) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    cache: TeacherCache | None = plan.settings.get("cache_object")
    view_seeds_ = None
    if cache is not None:  # the teacher's targets come from the cache: it never runs in training
        if data.classes != cache.manifest["classes"] or targets_digest(data.train.targets) != cache.manifest["targets_sha256"]:
            raise DistillError(f"The training data is not the one the teacher cache {cache.root} was made on (its images or "
                               "labels changed); make the cache again.")
        train_set.view_target = functools.partial(cache.target, kind=cfg.distillation)
        view_seeds_ = cache.seeds()
    cached_teacher = (plan.settings.get("cache") or {}).get("teacher")
    record = (teacher.lineage(taught(cfg.distillation)) if teacher else
              {**cached_teacher, "inherited": taught(cfg.distillation)} if cached_teacher else None)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "student", "model": {"name": name, "args": args},
                "params": count_params(model), "data": data_record(cfg, data.classes, mean, std, data.info),
                "parent": record, "teacher": record, "distillation": plan.settings["distillation"],
                "teacher_cache": {k: v for k, v in (plan.settings.get("cache") or {}).items() if k != "teacher"} or None,
                "init": plan.init.lineage("weights") if plan.init else None}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, True),
              criterion=criterion_for(cfg, cfg.distillation, frozen if cache is None else None, cfg.alpha, cfg.tau,
                                      student=model, cached=cache is not None),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, notes=plan.notes, view_seeds=view_seeds_)
    return run.fit(job)


def execute_finetune(plan: StagePlan) -> Checkpoint:
    cfg, parent, teacher = plan.config, plan.parent, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.dataset or cfg.data_dir}")
    if not parent.knows_classes(data.classes):
        raise DistillError(f"The student {parent.path} was trained on other classes than {cfg.dataset or cfg.data_dir}.")
    model = build_model(parent, drop_path_rate=cfg.drop_path)
    resize(model, cfg.res)
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.res, cfg, cfg.teacher_res) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    kind, alpha, tau = cfg.distillation, cfg.alpha, cfg.tau
    distillation = {**plan.settings["distillation"], "token": has_dist_token(model)}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "finetune", "model": plan.model, "params": count_params(model),
                "data": data_record(cfg, data.classes, mean, std, data.info), "parent": parent.lineage("weights"),
                "teacher": teacher.lineage(taught(kind)) if teacher else None, "distillation": distillation,
                "from_img_size": parent.img_size}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, True),
              criterion=criterion_for(cfg, kind, frozen, alpha, tau, student=model),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, evaluate_first=True, notes=plan.notes,
              extra_metrics=parent_accuracy(parent))
    return run.fit(job)


def execute_transfer(plan: StagePlan) -> Checkpoint:
    cfg, parent, teacher = plan.config, plan.parent, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the target {cfg.dataset or cfg.data_dir}")
    if cfg.from_scratch:
        model = create(parent.model_name, drop_path_rate=cfg.drop_path, **parent.model_args)
    else:
        model = build_model(parent, drop_path_rate=cfg.drop_path)
    args = dict(parent.model_args)
    if args.get("img_size") and int(args["img_size"]) != cfg.img_size:
        resize(model, cfg.img_size)
        args["img_size"] = cfg.img_size
    model.reset_classifier(len(data.classes))
    args["num_classes"] = len(data.classes)
    trainable = "full"
    if cfg.head_only:
        train_only(model, head_parameter_names(model))
        trainable = "head"
    elif cfg.attn_only:
        train_only(model, attention_parameter_names(model) + head_parameter_names(model))
        trainable = "attn"
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size, cfg, cfg.teacher_res) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    kind, alpha, tau = cfg.distillation, cfg.alpha, cfg.tau
    distillation = {**plan.settings["distillation"], "token": has_dist_token(model)}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "transfer", "model": {"name": parent.model_name, "args": args},
                "params": count_params(model),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "data": data_record(cfg, data.classes, mean, std, data.info),
                # a from-scratch baseline copies only the architecture: it has no parent, it names where it came from
                "parent": None if cfg.from_scratch else parent.lineage("weights"),
                "architecture_from": parent.lineage("recipe") if cfg.from_scratch else None,
                "teacher": teacher.lineage(taught(kind)) if teacher else None, "distillation": distillation,
                "trainable": trainable, "from_scratch": cfg.from_scratch}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, True),
              criterion=criterion_for(cfg, kind, frozen, alpha, tau, student=model),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, notes=plan.notes)
    return run.fit(job)


EXECUTORS: dict[str, Callable[[StagePlan], Checkpoint]] = {
    "teach": execute_teach, "teach-fixres": execute_teach, "student": execute_student, "finetune": execute_finetune,
    "transfer": execute_transfer, "cache-teacher": execute_cache,
}


# The commands: plan, then run.
def teach(cfg: TeachConfig) -> Checkpoint:
    return run_stage(lambda: plan_teach(cfg))


def student(cfg: StudentConfig) -> Checkpoint:
    return run_stage(lambda: plan_student(cfg))


def finetune(cfg: FinetuneConfig) -> Checkpoint:
    return run_stage(lambda: plan_finetune(cfg))


def transfer(cfg: TransferConfig) -> Checkpoint:
    return run_stage(lambda: plan_transfer(cfg))


def cache_teacher(cfg: CacheConfig) -> None:
    return run_stage(lambda: plan_cache(cfg))
