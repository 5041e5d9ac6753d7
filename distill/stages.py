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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from distill.checkpoint import MODEL_FILE, Checkpoint, build_model, find_by_sha256, read_checkpoint, stage_checkpoints
from distill.config import (FinetuneConfig, FixResConfig, StageConfig, StudentConfig, TeachConfig, TransferConfig,
                            resolve_auto, to_dict, validate)
from distill.data import NORMS, DataSplits, Transformed, eval_transform, measure_norm, open_dataset, train_transform
from distill.data.sources import peek_classes, peek_train_size
from distill.console import console
from distill.engine import Job, Run
from distill.runfolder import FolderStatus, folder_status
from distill.errors import DistillError
from distill.losses import DistillationLoss, base_criterion
from distill.models import check_model_name, create
from distill.students import (PreLogits, attention_parameter_names, build_student, default_patch_size, has_dist_token,
                              head_parameter_names, named_outputs, records_token, resize, set_distilled_training,
                              student_args, student_model, train_only)
from distill.teachers import FrozenTeacher, build_teacher, freeze_for_fixres

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT, DEFAULT_NORM = 32, 0.875, "imagenet"
Expecting = Mapping[Path, Checkpoint]  # pipeline outputs not written yet, by path: planning reads these instead


class Expected(Checkpoint):
    """The checkpoint an earlier stage of a pipeline will write: its header as planning predicts it."""

    teacher_source: Checkpoint | None = None

    @property
    def sha256(self) -> str:
        return "(not written yet)"


# -- parents ---------------------------------------------------------------------------------------
def open_checkpoint(path: Path, role: str, expecting: Expecting, expect_kind: str | None = None) -> Checkpoint:
    """A parent given by path: what the pipeline will write there, else the file on disk."""
    key = Path(path).resolve()
    for candidate in (key, key / MODEL_FILE):
        if candidate in expecting:
            return expecting[candidate]
    return read_checkpoint(path, expect_kind=expect_kind, role=role)


def read_teacher(path: Path, role: str = "teacher", expecting: Expecting = {}) -> Checkpoint:
    ckpt = open_checkpoint(path, role, expecting)
    if ckpt.kind != "teacher":
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
        return f"{role}: {ckpt.path} (written by the stage before)"
    data = ckpt.data
    where = data.get("dataset") or data.get("data_dir") or "?"
    top1 = (ckpt.meta.get("metrics") or {}).get("top1")
    accuracy = f", test top-1 {top1:.2f}" if isinstance(top1, (int, float)) else ""
    return (f"{role}: {ckpt.path} ({ckpt.model_name} at {ckpt.img_size} px, {where}, {len(ckpt.classes)} classes"
            f"{accuracy})")


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
    if cfg.norm is None:
        updates["norm"] = data.get("norm", DEFAULT_NORM)
    return dataclasses.replace(cfg, **updates)


def train_size(cfg: StageConfig) -> int | None:
    return peek_train_size(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list(), cfg.train_subset)


def planned_classes(cfg: StageConfig) -> list[str] | None:
    return peek_classes(None if cfg.data_dir else cfg.dataset, cfg.data_dir, cfg.class_list())


def check_classes(teacher: Checkpoint, classes: list[str] | None, where: str) -> None:
    """Refuse a teacher that knows other classes (when both lists are known)."""
    if classes is None or not teacher.classes or teacher.classes == classes:
        return
    only_teacher = [c for c in teacher.classes if c not in classes][:3]
    only_data = [c for c in classes if c not in teacher.classes][:3]
    detail = f"{len(teacher.classes)} classes vs {len(classes)}"
    if only_teacher or only_data:
        detail += f"; only the teacher has {only_teacher or 'none'}, only the data has {only_data or 'none'}"
    else:
        detail += "; same names in a different order"
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


def frozen_teacher(ckpt: Checkpoint, input_norm: tuple[tuple[float, ...], tuple[float, ...]],
                   img_size: int) -> FrozenTeacher:
    model = build_model(ckpt)
    if hasattr(model, "set_input_size") and hasattr(model, "pos_embed") and ckpt.img_size != img_size:
        resize(model, img_size)  # a ViT teacher must see the student's resolution too
    return FrozenTeacher(model, (ckpt.data["mean"], ckpt.data["std"]), input_norm)


def criterion_for(cfg: StageConfig, kind: str, teacher: FrozenTeacher | None, alpha: float, tau: float,
                  use_mixup: bool = True, student: nn.Module | None = None) -> DistillationLoss:
    """The stage's loss; feature distillation reads the student's pre-logits (its projection is built here)."""
    mixup_active = use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)
    base = base_criterion(cfg.smoothing, mixup_active, cfg.loss, cfg.bce_target_thresh)
    features = PreLogits(student) if "feature" in kind else None
    return DistillationLoss(base, teacher if kind != "none" else None, kind, alpha, tau, features,
                            getattr(cfg, "feature_loss", None) or "mse")


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

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def waiting(self) -> bool:
        """A parent or teacher is still to be written by an earlier stage."""
        return isinstance(self.parent, Expected) or isinstance(self.teacher, Expected)

    def identity(self) -> dict[str, Any]:
        """A run is its resolved config plus the hashes of its parent and teacher."""
        return {"stage": self.stage, "config": to_dict(self.config, result_only=True),
                "parent": self.parent.sha256 if self.parent else None,
                "teacher": self.teacher.sha256 if self.teacher else None}

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
    init = read_teacher(cfg.init, role="--init checkpoint", expecting=expecting) if cfg.init else None
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
    if cfg.teacher is not None:  # with --distillation none, a given teacher is only measured against
        teacher = read_teacher(cfg.teacher, expecting=expecting)
    elif cfg.distillation != "none":
        teacher = default_parent(cfg.workdir, "teach", "teacher", "--teacher", "train one with `distill teach`", "teacher",
                                 expecting)
    else:
        teacher = None
    cfg = inherit_data(cfg, teacher)
    name, token_args = student_model(cfg.model, cfg.token)
    cfg, notes = resolve_auto(cfg, train_size=train_size(cfg))
    classes = planned_classes(cfg)
    if teacher is not None:
        check_classes(teacher, classes, f"the dataset {cfg.data_dir or cfg.dataset}")
        classes = classes or teacher.classes or None
    args = {**student_args(cfg, len(classes) if classes else None), **token_args}
    distillation = distillation_record(cfg.distillation, cfg.alpha, cfg.tau, cfg.token, cfg.feature_loss)
    return _planned(StagePlan("student", cfg, parent=teacher, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": name, "args": args},
                              classes=classes))


def locate_teacher(parent: Checkpoint, workdir: Path) -> Checkpoint | None:
    """A checkpoint's teacher, by its recorded path, else by its sha256 anywhere in the work folder."""
    if isinstance(parent, Expected):
        return parent.teacher_source
    record = parent.meta.get("teacher")
    if not record:
        return None
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
        parent = open_checkpoint(cfg.checkpoint, "checkpoint", expecting, expect_kind="student")
    else:
        parent = default_parent(cfg.workdir, "student", "student", "--checkpoint", "train one with `distill student`",
                                "student", expecting)
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
            teacher = read_teacher(cfg.teacher, expecting=expecting)
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
        parent = open_checkpoint(cfg.checkpoint, "checkpoint", expecting, expect_kind="student")
    else:
        parent = transfer_parent(cfg.workdir, expecting)
    cfg = inherit_data(cfg, parent, dataset=False)
    teacher = read_teacher(cfg.teacher, expecting=expecting) if cfg.teacher else None
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
    return _planned(StagePlan("transfer", cfg, parent=parent, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": parent.model_name, "args": args},
                              classes=classes))


PLANNERS: dict[str, Callable[..., StagePlan]] = {
    "teach": plan_teach, "student": plan_student, "finetune": plan_finetune, "transfer": plan_transfer,
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
            console.print(f"[bold]{plan.stage}[/]: {ckpt.path} is already finished with these settings (top-1 "
                          f"{ckpt.meta.get('metrics', {}).get('top1', float('nan')):.2f}); reusing it.")
        return run, ckpt
    if run.accelerator.is_main_process:
        if plan.parent is not None:
            console.print(source_line("teacher" if plan.parent is plan.teacher else "parent", plan.parent), soft_wrap=True)
        if plan.teacher is not None and plan.teacher is not plan.parent:
            console.print(source_line("teacher", plan.teacher), soft_wrap=True)
    return run, None


def load_with_norm(run: Run, teacher: Checkpoint | None, where: str) -> tuple[DataSplits, tuple, tuple]:
    """The stage's data (refused when the teacher knows other classes) and its normalisation."""
    cfg = run.config
    with run.accelerator.main_process_first():  # a hub dataset is downloaded and cached once
        data = load_data(cfg)
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
        if init.classes != data.classes:
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
                "parent": init.lineage() if init else None, "fixres": fixres_record}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, "none", None, 0.0, 1.0, use_mixup=not fixres), num_classes=len(data.classes),
              describe=describe, use_mixup=not fixres, class_names=data.classes, notes=plan.notes,
              evaluate_first=fixres)
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
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "student", "model": {"name": name, "args": args},
                "params": count_params(model), "data": data_record(cfg, data.classes, mean, std, data.info),
                "parent": teacher.lineage() if teacher else None, "teacher": teacher.lineage() if teacher else None,
                "distillation": plan.settings["distillation"]}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, cfg.distillation, frozen, cfg.alpha, cfg.tau, student=model),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, notes=plan.notes)
    return run.fit(job)


def execute_finetune(plan: StagePlan) -> Checkpoint:
    cfg, parent, teacher = plan.config, plan.parent, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.dataset or cfg.data_dir}")
    if data.classes != parent.classes:
        raise DistillError(f"The student {parent.path} was trained on other classes than {cfg.dataset or cfg.data_dir}.")
    model = build_model(parent, drop_path_rate=cfg.drop_path)
    resize(model, cfg.res)
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.res) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    kind, alpha, tau = cfg.distillation, cfg.alpha, cfg.tau
    distillation = distillation_record(kind, alpha, tau, has_dist_token(model), cfg.feature_loss)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "finetune", "model": plan.model, "params": count_params(model),
                "data": data_record(cfg, data.classes, mean, std, data.info), "parent": parent.lineage(),
                "teacher": teacher.lineage() if teacher else None, "distillation": distillation,
                "from_img_size": parent.img_size}

    parent_metrics = parent.meta.get("metrics", {})
    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, kind, frozen, alpha, tau, student=model),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, evaluate_first=True, notes=plan.notes,
              extra_metrics={"parent_top1": parent_metrics.get("top1"), "parent_img_size": parent.img_size})
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
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    kind, alpha, tau = cfg.distillation, cfg.alpha, cfg.tau
    distillation = distillation_record(kind, alpha, tau, has_dist_token(model), cfg.feature_loss)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "transfer", "model": {"name": parent.model_name, "args": args},
                "params": count_params(model),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "data": data_record(cfg, data.classes, mean, std, data.info), "parent": parent.lineage(),
                "teacher": teacher.lineage() if teacher else None, "distillation": distillation,
                "trainable": trainable, "from_scratch": cfg.from_scratch}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, kind, frozen, alpha, tau, student=model),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, notes=plan.notes)
    return run.fit(job)


EXECUTORS: dict[str, Callable[[StagePlan], Checkpoint]] = {
    "teach": execute_teach, "teach-fixres": execute_teach, "student": execute_student, "finetune": execute_finetune,
    "transfer": execute_transfer,
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
