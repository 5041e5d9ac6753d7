"""The four stages: each finds its parent, builds data, models and loss, and hands them to the engine.

teach -> student -> finetune -> transfer. A stage is a config plus a parent checkpoint; everything
it resolves (dataset, resolution, normalisation, distillation variant) is written back into the
config it records, so its checkpoint says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from distill.checkpoint import Checkpoint, build_model, find_by_sha256, find_latest, read_checkpoint
from distill.config import FinetuneConfig, StageConfig, StudentConfig, TeachConfig, TransferConfig, to_dict, validate
from distill.data import NORMS, DataSplits, Transformed, eval_transform, measure_norm, open_dataset, train_transform
from distill.engine import Job, Run, console, folder_status
from distill.errors import DistillError
from distill.losses import DistillationLoss, base_criterion
from distill.students import (attention_parameter_names, build_student, has_dist_token, head_parameter_names,
                              named_outputs, resize, set_distilled_training, student_model_name, train_only)
from distill.teachers import FrozenTeacher, build_teacher, freeze_for_fixres

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT, DEFAULT_NORM = 32, 0.875, "imagenet"


# -- shared pieces ----------------------------------------------------------------------------------
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
        if cfg.classes is None and data.get("kept_classes"):
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


def load_data(cfg: StageConfig) -> DataSplits:
    return open_dataset(None if cfg.data_dir else cfg.dataset, cfg.data_dir, skip_corrupt=cfg.skip_corrupt,
                        train_subset=cfg.train_subset, classes=cfg.class_list())


def resolve_norm(cfg: StageConfig, data: DataSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.norm == "dataset":
        return measure_norm(data.train)
    return NORMS[cfg.norm]


def data_record(cfg: StageConfig, data: DataSplits, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """What a checkpoint says about its data and preprocessing."""
    return {**data.info, "dataset": cfg.dataset if cfg.data_dir is None else None,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "classes": data.classes, "img_size": cfg.img_size, "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
            "norm": cfg.norm, "mean": list(mean), "std": list(std)}


def datasets_for(cfg: StageConfig, data: DataSplits, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool = True) -> tuple[Transformed, Transformed]:
    test_tf = eval_transform(cfg.img_size, mean=mean, std=std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    if augment:
        try:
            train_tf = train_transform(cfg.img_size, mean=mean, std=std, aa=cfg.aa, reprob=cfg.reprob,
                                       color_jitter=cfg.color_jitter, scale_min=cfg.scale_min, hflip=cfg.hflip,
                                       interpolation=cfg.interpolation)
        except (AssertionError, ValueError, KeyError) as error:  # timm's parser of the RandAugment string
            raise DistillError(f"timm cannot read the augmentation policy --aa {cfg.aa} ({error or 'bad format'}); "
                               "use e.g. rand-m9-mstd0.5-inc1, or none.") from None
    else:  # FixRes: train with the test-time preprocessing
        train_tf = test_tf
    return Transformed(data.train, train_tf), Transformed(data.test, test_tf)


def check_classes(teacher: Checkpoint, classes: list[str], where: str) -> None:
    if teacher.classes != classes:
        only_teacher = [c for c in teacher.classes if c not in classes][:3]
        only_data = [c for c in classes if c not in teacher.classes][:3]
        detail = f"{len(teacher.classes)} classes vs {len(classes)}"
        if only_teacher or only_data:
            detail += f"; only the teacher has {only_teacher or 'none'}, only the data has {only_data or 'none'}"
        else:
            detail += "; same names in a different order"
        raise DistillError(f"The teacher {teacher.path} was trained on other classes than {where} ({detail}).")


def read_teacher(path: Path, role: str = "teacher") -> Checkpoint:
    ckpt = read_checkpoint(path, role=role)
    if ckpt.kind != "teacher":
        raise DistillError(f"The {role} {ckpt.path} is a {ckpt.kind} checkpoint (from `distill {ckpt.stage}`), not a teacher; "
                           "train one with `distill teach` (any timm classifier can be a teacher).")
    if int(ckpt.model_args.get("num_classes", 0)) <= 0 or not ckpt.classes:
        raise DistillError(f"The {role} {ckpt.path} is not a classifier (it has no classes).")
    return ckpt


def frozen_teacher(ckpt: Checkpoint, input_norm: tuple[tuple[float, ...], tuple[float, ...]],
                   img_size: int) -> FrozenTeacher:
    model = build_model(ckpt)
    if hasattr(model, "set_input_size") and hasattr(model, "pos_embed") and ckpt.img_size != img_size:
        resize(model, img_size)  # a ViT teacher must see the student's resolution too
    return FrozenTeacher(model, (ckpt.data["mean"], ckpt.data["std"]), input_norm)


def criterion_for(cfg: StageConfig, kind: str, teacher: FrozenTeacher | None, alpha: float, tau: float,
                  use_mixup: bool = True) -> DistillationLoss:
    mixup_active = use_mixup and (cfg.mixup > 0 or cfg.cutmix > 0)
    return DistillationLoss(base_criterion(cfg.smoothing, mixup_active), teacher if kind != "none" else None,
                            kind, alpha, tau)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class PlanItem:
    """What a stage would do, for `distill pipeline --dry-run`."""

    stage: str
    run_dir: Path
    action: str  # run | reuse | resume | re-run
    why: str


Plan = list[PlanItem]


def start(cfg: StageConfig, identity: dict[str, Any], plan: Plan | None, stage: str) -> tuple[Run | None, Checkpoint | None]:
    """Open the run folder: (run, None) to train, (run, checkpoint) when already finished, or, when only
    planning, (None, checkpoint-if-finished) after noting what would happen."""
    if plan is not None:
        status = folder_status(cfg.run_dir(), identity)
        action, why = {
            "finished": ("reuse", "finished with the same settings and parent"),
            "interrupted": ("resume", f"interrupted at epoch {(status.progress or {}).get('epoch', 0) + 1}"
                            if status.progress else "started, nothing saved yet"),
            "empty": ("run", "no run yet"),
            "changed-finished": ("re-run", f"changed: {status.detail}"),
            "changed-interrupted": ("re-run", f"changed: {status.detail}"),
        }[status.state]
        plan.append(PlanItem(stage, cfg.run_dir(), action, why))
        return None, status.checkpoint
    run = Run(cfg, identity)
    if run.finished is not None:
        ckpt = run.finished
        if run.accelerator.is_main_process:
            console.print(f"[bold]{stage}[/]: {ckpt.path} is already finished with these settings (top-1 "
                          f"{ckpt.meta.get('metrics', {}).get('top1', float('nan')):.2f}); reusing it.")
        return run, ckpt
    return run, None


def open_run(cfg: StageConfig, stage: str, plan: Plan | None, parent: Checkpoint | None,
             teacher: Checkpoint | None = None) -> tuple[Run | None, Checkpoint | None]:
    """A stage's identity is its resolved config plus the hashes of its parent and teacher."""
    identity = {"stage": stage, "config": to_dict(cfg, result_only=True), "parent": parent.sha256 if parent else None,
                "teacher": teacher.sha256 if teacher else None}
    return start(cfg, identity, plan, stage)


def load_with_norm(run: Run, teacher: Checkpoint | None, where: str) -> tuple[DataSplits, tuple, tuple]:
    """The stage's data (refused when the teacher knows other classes) and its normalisation."""
    cfg = run.config
    with run.accelerator.main_process_first():  # a hub dataset is downloaded and cached once
        data = load_data(cfg)
    if teacher is not None:
        check_classes(teacher, data.classes, where)
    mean, std = resolve_norm(cfg, data)
    return data, mean, std


def _latest(workdir: Path, stages: tuple[str, ...], what: str, hint: str) -> Checkpoint:
    found = find_latest(workdir, stages)
    if found is None:
        raise DistillError(f"No {what} found in {workdir}; {hint}")
    return found


# -- stage 1: teacher -------------------------------------------------------------------------------
def teach(cfg: TeachConfig, fixres: bool = False, plan: Plan | None = None) -> Checkpoint | None:
    """Train a teacher (from scratch, or from --init); with fixres=True, adapt one to a new resolution."""
    init = read_teacher(cfg.init, role="--init checkpoint") if cfg.init else None
    if init is not None:
        cfg = dataclasses.replace(cfg, model=init.model_name)
    cfg = inherit_data(cfg, init, img_size=not fixres)
    stage = "teach-fixres" if fixres else "teach"
    run, done = open_run(cfg, stage, plan, init)
    if run is None or done is not None:
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
    else:
        name = student_model_name(cfg.model, token=False) if cfg.model.startswith("deit") else cfg.model
        if name.startswith(("deit", "vit")):
            model, args = build_student(name, len(data.classes), cfg.img_size, patch_size=cfg.patch_size,
                                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                        drop_path=cfg.drop_path)
        else:
            model, args = build_teacher(name, len(data.classes), cfg.drop_path)
        cfg = dataclasses.replace(cfg, model=name)
    trainable = freeze_for_fixres(model) if fixres else None
    train_set, test_set = datasets_for(cfg, data, mean, std, augment=not fixres)
    use_mixup = not fixres

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "teacher", "stage": stage, "model": {"name": cfg.model, "args": args},
                "params": count_params(model), "data": data_record(cfg, data, mean, std),
                "parent": init.lineage() if init else None,
                "fixres": {"trainable": len(trainable), "from_img_size": init.img_size} if fixres else None}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, "none", None, 0.0, 1.0, use_mixup), num_classes=len(data.classes),
              describe=describe, use_mixup=use_mixup, class_names=data.classes)
    return run.fit(job)


# -- stage 2: student -------------------------------------------------------------------------------
def student(cfg: StudentConfig, plan: Plan | None = None) -> Checkpoint | None:
    """Distil a DeiT from a teacher: none, soft, hard, with or without the distillation token."""
    if cfg.teacher is not None:  # with --distillation none, a given teacher is only measured against
        teacher = read_teacher(cfg.teacher)
    elif cfg.distillation != "none":
        teacher = read_teacher(_latest(cfg.workdir, ("teach",), "teacher",
                                       "train one with `distill teach` or pass --teacher CKPT.").path)
    else:
        teacher = None
    cfg = inherit_data(cfg, teacher)
    run, done = open_run(cfg, "student", plan, teacher, teacher)
    if run is None or done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.dataset or cfg.data_dir}")
    name = student_model_name(cfg.model, cfg.token)
    model, args = build_student(name, len(data.classes), cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                depth=cfg.depth, num_heads=cfg.num_heads, drop_path=cfg.drop_path)
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.img_size) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    distillation = {"kind": cfg.distillation, "alpha": cfg.alpha, "tau": cfg.tau, "token": cfg.token}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "student", "model": {"name": name, "args": args},
                "params": count_params(model), "data": data_record(cfg, data, mean, std),
                "parent": teacher.lineage() if teacher else None, "teacher": teacher.lineage() if teacher else None,
                "distillation": distillation}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              criterion=criterion_for(cfg, cfg.distillation, frozen, cfg.alpha, cfg.tau),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes)
    return run.fit(job)


# -- stage 3: FixRes fine-tune ----------------------------------------------------------------------
def locate_teacher(record: dict[str, Any] | None, workdir: Path) -> Checkpoint | None:
    """A checkpoint's teacher, by its recorded path, else by its sha256 anywhere in the work folder."""
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


def adapt_teacher(teacher: Checkpoint, cfg: FinetuneConfig, plan: Plan | None = None) -> Checkpoint | None:
    """FixRes: the teacher at the target resolution, by fine-tuning its classifier and BatchNorm layers on
    test-time preprocessing (SGD, momentum 0.9, weight decay 1e-4). Saved as its own reusable run."""
    fixres_cfg = TeachConfig(
        workdir=cfg.workdir, name=f"teach-fixres-{cfg.res}-{teacher.sha256[:8]}", seed=cfg.seed,
        mixed_precision=cfg.mixed_precision,
        save_every=cfg.save_every, num_workers=cfg.num_workers, eval_every=cfg.eval_every, overwrite=cfg.overwrite,
        skip_corrupt=cfg.skip_corrupt,
        dataset=cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset, classes=cfg.classes, img_size=cfg.res,
        crop_pct=teacher.data.get("crop_pct"), interpolation=cfg.interpolation, norm=teacher.data.get("norm"),
        aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, hflip=0.0, epochs=cfg.teacher_epochs,
        batch_size=cfg.batch_size, opt="sgd", lr=cfg.teacher_lr, min_lr=0.0, warmup_epochs=0,
        weight_decay=1e-4, momentum=0.9, drop_path=0.0, model=teacher.model_name, init=teacher.path,
    )
    validate(fixres_cfg)
    return teach(fixres_cfg, fixres=True, plan=plan)


def finetune(cfg: FinetuneConfig, plan: Plan | None = None) -> Checkpoint | None:
    """Fine-tune a student at a higher resolution while it keeps learning from a teacher at that resolution."""
    parent = read_checkpoint(cfg.checkpoint, expect_kind="student", role="checkpoint") if cfg.checkpoint else \
        _latest(cfg.workdir, ("student",), "student", "train one with `distill student` or pass --checkpoint CKPT.")
    if cfg.res is None:
        raise DistillError("Give the target resolution with --res (e.g. --res 384).")
    if cfg.img_size not in (None, cfg.res):
        raise DistillError(f"finetune trains at --res ({cfg.res} px); leave --img-size unset (it is {cfg.img_size}).")
    cfg = inherit_data(dataclasses.replace(cfg, img_size=cfg.res), parent)
    patch = int(parent.model_args.get("patch_size", 16))
    if cfg.res % patch:
        raise DistillError(f"Resolution {cfg.res} is not a multiple of the patch size {patch}; "
                           f"try {max(patch, cfg.res // patch * patch)} or {(cfg.res // patch + 1) * patch}.")
    inherited = parent.meta.get("distillation") or {}
    kind = "none" if cfg.no_teacher else (cfg.distillation or inherited.get("kind") or "none")
    alpha = cfg.alpha if cfg.alpha is not None else inherited.get("alpha", 0.5)
    tau = cfg.tau if cfg.tau is not None else inherited.get("tau", 1.0)
    teacher: Checkpoint | None = None
    if kind != "none":
        if cfg.teacher is not None:
            teacher = read_teacher(cfg.teacher)
        else:
            original = locate_teacher(parent.meta.get("teacher"), cfg.workdir)
            if original is None:
                raise DistillError(f"The teacher of {parent.path} is no longer where it was trained; pass --teacher CKPT "
                                   "or --no-teacher.")
            teacher = adapt_teacher(original, cfg, plan)
            if teacher is None:  # planning, and the adapted teacher does not exist yet
                plan.append(PlanItem("finetune", cfg.run_dir(), "run", "after its FixRes teacher"))
                return None
        check_classes(teacher, parent.classes, f"the student {parent.path}")
    cfg = dataclasses.replace(cfg, distillation=kind, alpha=alpha, tau=tau)
    run, done = open_run(cfg, "finetune", plan, parent, teacher)
    if run is None or done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.dataset or cfg.data_dir}")
    if data.classes != parent.classes:
        raise DistillError(f"The student {parent.path} was trained on other classes than {cfg.dataset or cfg.data_dir}.")
    model = build_model(parent, drop_path_rate=cfg.drop_path)
    resize(model, cfg.res)
    args = {**parent.model_args, "img_size": cfg.res}
    set_distilled_training(model, True)
    frozen = frozen_teacher(teacher, (mean, std), cfg.res) if teacher is not None else None
    train_set, test_set = datasets_for(cfg, data, mean, std)
    distillation = {"kind": kind, "alpha": alpha, "tau": tau, "token": has_dist_token(model)}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "finetune", "model": {"name": parent.model_name, "args": args},
                "params": count_params(model), "data": data_record(cfg, data, mean, std), "parent": parent.lineage(),
                "teacher": teacher.lineage() if teacher else None, "distillation": distillation,
                "from_img_size": parent.img_size}

    parent_metrics = parent.meta.get("metrics", {})
    job = Job(model=model, train_set=train_set, eval_set=test_set, criterion=criterion_for(cfg, kind, frozen, alpha, tau),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes, evaluate_first=True,
              extra_metrics={"parent_top1": parent_metrics.get("top1"), "parent_img_size": parent.img_size})
    return run.fit(job)


# -- stage 4: transfer ------------------------------------------------------------------------------
def transfer(cfg: TransferConfig, plan: Plan | None = None) -> Checkpoint | None:
    """Fine-tune a student on a new target: new head(s), optionally attention-only or head-only, optionally
    still distilling from a teacher trained on the target."""
    if cfg.dataset is None and cfg.data_dir is None:
        raise DistillError("Name the target with --dataset (cifar10, cifar100, flowers102, stanford_cars, a hub id) "
                           "or --data-dir.")
    if cfg.attn_only and cfg.head_only:
        raise DistillError("Choose one of --attn-only and --head-only.")
    if cfg.checkpoint:
        parent = read_checkpoint(cfg.checkpoint, expect_kind="student", role="checkpoint")
    else:
        parent = find_latest(cfg.workdir, ("finetune",)) or _latest(
            cfg.workdir, ("student",), "student", "train one with `distill student` or pass --checkpoint CKPT.")
    cfg = inherit_data(cfg, parent, dataset=False)
    teacher = read_teacher(cfg.teacher) if cfg.teacher else None
    inherited = parent.meta.get("distillation") or {}
    if teacher is None and cfg.distillation not in (None, "none"):
        raise DistillError(f"--distillation {cfg.distillation} needs a teacher trained on the target; pass --teacher CKPT "
                           "(make one with `distill teach --dataset X --init TEACHER`).")
    kind = (cfg.distillation or (inherited.get("kind") if inherited.get("kind") not in (None, "none") else "hard")) \
        if teacher else "none"
    alpha = cfg.alpha if cfg.alpha is not None else inherited.get("alpha", 0.5)
    tau = cfg.tau if cfg.tau is not None else inherited.get("tau", 1.0)
    cfg = dataclasses.replace(cfg, distillation=kind, alpha=alpha, tau=tau)
    run, done = open_run(cfg, "transfer", plan, parent, teacher)
    if run is None or done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the target {cfg.dataset or cfg.data_dir}")
    if cfg.from_scratch:
        model = timm.create_model(parent.model_name, pretrained=False, drop_path_rate=cfg.drop_path, **parent.model_args)
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
    distillation = {"kind": kind, "alpha": alpha, "tau": tau, "token": has_dist_token(model)}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "transfer", "model": {"name": parent.model_name, "args": args},
                "params": count_params(model),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "data": data_record(cfg, data, mean, std), "parent": parent.lineage(),
                "teacher": teacher.lineage() if teacher else None, "distillation": distillation,
                "trainable": trainable, "from_scratch": cfg.from_scratch}

    job = Job(model=model, train_set=train_set, eval_set=test_set, criterion=criterion_for(cfg, kind, frozen, alpha, tau),
              num_classes=len(data.classes), describe=describe, predict=named_outputs, reference=frozen,
              class_names=data.classes)
    return run.fit(job)
