"""`distill transfer`: fine-tune a student on a new target with new heads (whole, attention-only or head-only),
still distilling from a teacher trained on the target when one is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import TransferConfig
from distill.errors import DistillError
from distill.stages.common import (Expected, Expecting, StagePlan, count_params, criterion_for, data_record,
                                   datasets_for, default_parent, distillation_record, inherit_data,
                                   inherit_distillation, load_with_norm, open_checkpoint, open_run, planned,
                                   planned_classes, read_teacher, resolution_setter, resolve_for_run, taught)
from distill.students import (attention_parameter_names, fused_outputs, has_dist_token, head_parameter_names,
                              records_token, resize, set_distilled_training, train_only)
from distill.teachers.frozen import check_classes, frozen_teacher, teacher_resolution
from distill.training.engine import Job
from distill.weights.checkpoint import MODEL_FILE, Checkpoint, build_model
from distill.weights.models import create


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
    cfg, notes = resolve_for_run(cfg)
    classes = planned_classes(cfg)
    if teacher is not None:
        check_classes(teacher, classes, f"the target {cfg.data_dir or cfg.dataset}")
    args = {**parent.model_args, "num_classes": len(classes) if classes else None}
    if args.get("img_size"):
        args["img_size"] = cfg.img_size
    distillation = distillation_record(kind, cfg.alpha, cfg.tau, records_token(parent.model_name, parent.model_args),
                                       cfg.feature_loss, cfg.fusion)
    distillation["teacher_res"] = teacher_resolution(teacher, cfg.img_size, cfg.teacher_res) if teacher else None
    return planned(StagePlan("transfer", cfg, parent=parent, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": parent.model_name, "args": args},
                              classes=classes))


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
    frozen = (frozen_teacher(teacher, (mean, std), cfg.img_size, cfg.teacher_res, compile=cfg.compile)
              if teacher is not None else None)
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
              num_classes=len(data.classes), describe=describe, predict=fused_outputs(cfg.fusion or "logits"), reference=frozen,
              class_names=data.classes, notes=plan.notes)
    return run.fit(job)
