"""`distill teach`: train a teacher from scratch or from --init; the same stage adapts a teacher to a new
resolution by FixRes (`teach-fixres`, planned by the fine-tune)."""

from __future__ import annotations

import dataclasses
from typing import Any

from distill.config import FixResConfig, TeachConfig
from distill.stages.common import (Expecting, StagePlan, count_params, criterion_for, data_record, datasets_for,
                                   inherit_data, load_with_norm, open_run, parent_accuracy, planned, planned_classes,
                                   read_teacher, resolution_setter, resolve_for_run)
from distill.students import build_student, resize, student_args, student_model
from distill.teachers import build_teacher, freeze_for_fixres
from distill.training.engine import Job
from distill.weights.checkpoint import Checkpoint, build_model
from distill.weights.models import check_model_name


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
    cfg, notes = resolve_for_run(cfg)
    classes = planned_classes(cfg)
    if init is not None:
        args = {**init.model_args, **({"num_classes": len(classes)} if classes else {})}
    elif cfg.model.startswith(("deit", "vit")):
        args = student_args(cfg, len(classes) if classes else None)
    else:
        args = {"num_classes": len(classes) if classes else None}
    stage = "teach-fixres" if fixres else "teach"
    return planned(StagePlan(stage, cfg, parent=init, notes=notes, model={"name": cfg.model, "args": args},
                              classes=classes))


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
