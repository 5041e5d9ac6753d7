"""`distill finetune`: fine-tune a student at a higher resolution while it keeps learning from its teacher, adapted to
that resolution by FixRes first. A ViT trains every layer, its position embeddings resampled; a convnet follows FixRes
(its classifier and BatchNorm adapted on test-time preprocessing), or trains every layer with --bn full."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from timm.models import get_pretrained_cfg

from distill.config import FinetuneConfig, FixResConfig
from distill.errors import DistillError
from distill.stages.common import (Expected, Expecting, StagePlan, count_params, criterion_for, data_record,
                                   datasets_for, default_parent, distillation_record, finished, inherit_data,
                                   inherit_distillation, load_with_norm, open_checkpoint, open_run, parent_accuracy,
                                   planned, read_teacher, resolution_setter, resolve_for_run, taught)
from distill.stages.teach import plan_teach
from distill.students import (default_patch_size, off_grid, fused_outputs, has_dist_token, records_token, resize,
                              set_distilled_training)
from distill.teachers import freeze_for_fixres
from distill.teachers.frozen import check_classes, frozen_teacher, teacher_resolution
from distill.training.engine import Job
from distill.weights.checkpoint import Checkpoint, build_model, find_by_sha256


def is_vit(ckpt: Checkpoint) -> bool:
    """A ViT student (position embeddings to resample), not a convnet or a hybrid without a patch grid."""
    return "patch_size" in ckpt.model_args


def fixed_input_size(name: str) -> bool:
    """A timm model built for one input size (CaiT, Swin, LeViT, hybrid ViTs): no resolution change is possible."""
    cfg = get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


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


# FixRes's adaptation of a convnet (a teacher, or a student with --bn last|all): test-time preprocessing, nothing
# random, no drop path, and no SyncBatchNorm, which would unlock the BatchNorm layers kept frozen (the processes'
# statistics are averaged instead)
FIXRES_ADAPTATION = dict(profile="short", aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, scale_min=1.0, hflip=0.0,
                         drop_path=0.0, sync_bn=False)


def fixres_config(teacher: Checkpoint, cfg: FinetuneConfig, global_batch: int | None = None) -> FixResConfig:
    """FixRes: the teacher at the target resolution, by training its classifier and BatchNorm on test-time
    preprocessing (SGD, momentum 0.9, weight decay 1e-4). Saved as its own reusable run, named by the resolution, the
    teacher's sha256 and a digest of its settings. `global_batch` is the one the user gave the fine-tune (not the one
    resolved for this number of processes), so a later fine-tune on another number of GPUs reuses the adapted teacher."""
    tag = {"last": "", "all": "allbn-", "full": "full-"}[cfg.teacher_bn]
    sha = teacher.sha256[:8] if not isinstance(teacher, Expected) else "pending"
    adaptation = FixResConfig(
        workdir=cfg.workdir, name="", seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, save_every=cfg.save_every, num_workers=cfg.num_workers, threads=cfg.threads,
        eval_every=cfg.eval_every, overwrite=cfg.overwrite, skip_corrupt=cfg.skip_corrupt,
        dataset=cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset, classes=cfg.classes, img_size=cfg.res,
        crop_pct=teacher.data.get("crop_pct"), interpolation=cfg.interpolation, norm=teacher.data.get("norm"),
        **FIXRES_ADAPTATION, smoothing=0.0, epochs=cfg.teacher_epochs,
        batch_size=cfg.batch_size, global_batch=global_batch, dist_timeout=cfg.dist_timeout,
        deterministic=cfg.deterministic, opt="sgd", lr=cfg.teacher_lr, lr_scale=cfg.lr_scale, min_lr=0.0, warmup_epochs=0.0,
        weight_decay=1e-4, momentum=0.9, model=teacher.model_name, init=teacher.path, bn=cfg.teacher_bn,
    )
    return dataclasses.replace(adaptation, name=f"teach-fixres-{cfg.res}-{tag}{sha}-{settings_digest(adaptation)}")


# What an adapted teacher's weights depend on besides the teacher, the resolution and the BatchNorm choice (all three in
# its folder's name): fine-tunes that differ in any of these (a second seed, more teacher epochs) adapt their own
# teacher instead of meeting another one's folder; fine-tunes that agree on all share it.
ADAPTATION_SETTINGS = ("seed", "epochs", "lr", "lr_scale", "batch_size", "global_batch", "train_subset", "classes",
                       "dataset", "data_dir", "mixed_precision", "interpolation", "deterministic")


def settings_digest(adaptation: FixResConfig) -> str:
    """The settings as given (paths not resolved: every process, on whichever node, names the same folder)."""
    values = {key: getattr(adaptation, key) for key in ADAPTATION_SETTINGS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]


def plan_finetune(cfg: FinetuneConfig, expecting: Expecting = {}) -> StagePlan:
    """Fine-tune a student at a higher resolution while it keeps learning from a teacher at that resolution."""
    if cfg.res is not None and cfg.img_size not in (None, cfg.res):
        raise DistillError(f"--res is the older spelling of --img-size, the target resolution; give one of them (here "
                           f"--img-size {cfg.img_size} and --res {cfg.res}).")
    res = cfg.img_size if cfg.img_size is not None else cfg.res
    if res is None:
        raise DistillError("Give the target resolution with --img-size (e.g. --img-size 384).")
    cfg = dataclasses.replace(cfg, res=res, img_size=res)  # both recorded, as runs made with --res recorded them
    if cfg.checkpoint:
        parent = open_checkpoint(cfg.checkpoint, "checkpoint", expecting, expect_kind="student", model=cfg.model or None)
    else:
        parent = default_parent(cfg.workdir, "student", "student", "--checkpoint", "train one with `distill student`",
                                "student", expecting)
    cfg = inherit_data(dataclasses.replace(cfg, img_size=cfg.res), parent)
    if is_vit(parent):
        if cfg.bn is not None:
            raise DistillError(f"--bn adapts a convnet's BatchNorm layers; the student {parent.path} is a "
                               f"{parent.model_name}, a ViT, which has none and fine-tunes every layer.")
        patch = int(parent.model_args.get("patch_size") or default_patch_size(parent.img_size))
        if cfg.res % patch:
            raise DistillError(off_grid(cfg.res, patch))
    elif fixed_input_size(parent.model_name):
        raise DistillError(f"{parent.path} is a {parent.model_name}, which timm builds for one input size: finetune "
                           "changes a convnet's resolution or resamples a ViT's position embeddings, and this model is "
                           "neither (distill evaluate --img-size, or distill transfer, keep its size).")
    else:
        cfg = dataclasses.replace(cfg, bn=cfg.bn or "last")
        if cfg.bn != "full":
            cfg = dataclasses.replace(cfg, **FIXRES_ADAPTATION, repeated_aug=1)
    inherited = parent.meta.get("distillation") or {}
    kind = "none" if cfg.no_teacher else (cfg.distillation or inherited.get("kind") or "none")
    cfg = inherit_distillation(cfg, parent, kind)
    given_batch = cfg.global_batch
    cfg, notes = resolve_for_run(cfg)
    if cfg.res <= parent.img_size:
        notes.append(f"--img-size {cfg.res} is {'the' if cfg.res == parent.img_size else 'below the'} parent's "
                     f"{parent.img_size} px: FixRes fine-tunes at a higher resolution than training's, so this run only "
                     "trains further" + (" (and at fewer pixels)" if cfg.res < parent.img_size else ""))
    if not is_vit(parent):
        notes.append(f"a convnet: FixRes trains every layer at {cfg.res} px with the training augmentation (--bn full)"
                     if cfg.bn == "full" else
                     f"a convnet: FixRes trains its classifier and {cfg.bn} BatchNorm at {cfg.res} px on test-time "
                     "preprocessing, without augmentation, Mixup, drop path, repeated augmentation or SyncBatchNorm "
                     "(--bn full trains every layer)")
    teacher: Checkpoint | None = None
    before: list[StagePlan] = []
    if kind != "none":
        if cfg.teacher is not None:
            teacher = read_teacher(cfg.teacher, expecting=expecting, model=cfg.teacher_model)
        elif len(parent.meta.get("teachers") or []) > 1:
            raise DistillError(f"{parent.path} was distilled from {len(parent.meta['teachers'])} teachers; the fine-tune "
                               "adapts one teacher to the new resolution: pass --teacher CKPT (a teacher at "
                               f"{cfg.res} px) or --no-teacher.")
        else:
            original = locate_teacher(parent, cfg.workdir)
            if original is None:
                raise DistillError(f"The teacher of {parent.path} is no longer where it was trained; pass --teacher CKPT "
                                   "or --no-teacher.")
            adapt = plan_teach(fixres_config(original, cfg, given_batch), expecting)
            before.append(adapt)
            teacher = finished(adapt) or adapt.expected()
        check_classes(teacher, parent.classes or None, f"the student {parent.path}")
    model = {"name": parent.model_name, "args": {**parent.model_args, **({"img_size": cfg.res} if is_vit(parent) else {})}}
    distillation = distillation_record(kind, cfg.alpha, cfg.tau, records_token(parent.model_name, parent.model_args),
                                       cfg.feature_loss, cfg.fusion)
    distillation["teacher_res"] = teacher_resolution(teacher, cfg.res, cfg.teacher_res) if teacher else None
    return planned(StagePlan("finetune", cfg, parent=parent, teacher=teacher, notes=notes, before=before,
                              settings={"distillation": distillation}, model=model, classes=parent.classes or None))


def execute_finetune(plan: StagePlan) -> Checkpoint:
    cfg, parent, teacher = plan.config, plan.parent, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.dataset or cfg.data_dir}")
    if not parent.knows_classes(data.classes):
        raise DistillError(f"The student {parent.path} was trained on other classes than {cfg.dataset or cfg.data_dir}.")
    adapt = not is_vit(parent) and cfg.bn != "full"  # FixRes: the classifier and BatchNorm, on test-time preprocessing
    model = build_model(parent, drop_path_rate=0.0 if adapt else cfg.drop_path)
    if is_vit(parent):
        resize(model, cfg.res)
    trainable = freeze_for_fixres(model, cfg.bn, cfg.res) if adapt else None
    set_distilled_training(model, True)
    frozen = (frozen_teacher(teacher, (mean, std), cfg.res, cfg.teacher_res, compile=cfg.compile)
              if teacher is not None else None)
    train_set, test_set = datasets_for(cfg, data, mean, std, augment=not adapt)
    kind, alpha, tau = cfg.distillation, cfg.alpha, cfg.tau
    distillation = {**plan.settings["distillation"], "token": has_dist_token(model)}

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "finetune", "model": plan.model, "params": count_params(model),
                "data": data_record(cfg, data.classes, mean, std, data.info), "parent": parent.lineage("weights"),
                "teacher": teacher.lineage(taught(kind)) if teacher else None, "distillation": distillation,
                "from_img_size": parent.img_size,
                "fixres": {"bn": cfg.bn, "trainable": len(trainable)} if trainable is not None else
                ({"bn": "full"} if cfg.bn == "full" else None)}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, not adapt),
              criterion=criterion_for(cfg, kind, frozen, alpha, tau, student=model, use_mixup=not adapt),
              use_mixup=not adapt,
              num_classes=len(data.classes), describe=describe, predict=fused_outputs(cfg.fusion or "logits"), reference=frozen,
              class_names=data.classes, evaluate_first=True, notes=plan.notes,
              extra_metrics=parent_accuracy(parent))
    return run.fit(job)
