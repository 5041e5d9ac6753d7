"""`distill student`: distil a DeiT from a teacher (none, soft, hard, feature; with or without the distillation
token), from the teacher itself or from a teacher cache."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import timm

from distill.config import StageConfig, StudentConfig
from distill.errors import DistillError
from distill.stages.common import (Expecting, StagePlan, count_params, criterion_for, data_record, datasets_for,
                                   default_parent, distillation_record, inherit_data, load_with_norm, open_checkpoint,
                                   open_run, planned, planned_classes, read_teacher, resolution_setter, resolve_for_run,
                                   taught)
from distill.students import (build_student, default_token, fit_deit_weights, fused_outputs, set_distilled_training, student_args,
                              student_model)
from distill.teachers import TeacherEnsemble
from distill.teachers.cache import TeacherCache, targets_digest
from distill.teachers.frozen import check_classes, frozen_teachers, several_teachers, teacher_resolution
from distill.training.engine import Job
from distill.weights.checkpoint import Checkpoint


def plan_student(cfg: StudentConfig, expecting: Expecting = {}) -> StagePlan:
    """Distil a DeiT from a teacher: none, soft, hard, with or without the distillation token."""
    if cfg.teacher_cache is not None:
        return plan_cached_student(cfg, expecting)
    if cfg.teacher:  # with --distillation none, the given teachers are only measured against
        teachers = [read_teacher(path, expecting=expecting, model=cfg.teacher_model) for path in cfg.teacher]
    elif cfg.distillation != "none":
        teachers = [default_parent(cfg.workdir, "teach", "teacher", "--teacher", "train one with `distill teach`",
                                   "teacher", expecting)]
    else:
        teachers = []
    several_teachers(teachers, cfg.distillation)
    teacher = teachers[0] if teachers else None
    init = student_init(cfg, expecting) if cfg.init else None
    if init is not None:  # the student takes the size of its starting weights
        sizing = {k: init.model_args.get(k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
        cfg = dataclasses.replace(cfg, model=init.model_name, **sizing)
    cfg = inherit_data(cfg, teacher or init)
    cfg = dataclasses.replace(cfg, token=default_token(cfg.model) if cfg.token is None else cfg.token)
    name, token_args = student_model(cfg.model, cfg.token)
    cfg = dataclasses.replace(cfg, fusion=(cfg.fusion or "logits") if cfg.token else None)
    cfg, notes = resolve_for_run(cfg)
    classes = planned_classes(cfg)
    for one in teachers:
        check_classes(one, classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    if teacher is not None:
        classes = classes or teacher.classes or None
    args = {**student_args(cfg, len(classes) if classes else None, name), **token_args}
    distillation = distillation_record(cfg.distillation, cfg.alpha, cfg.tau, cfg.token, cfg.feature_loss, cfg.fusion)
    resolutions = [teacher_resolution(one, cfg.img_size, cfg.teacher_res) for one in teachers]
    distillation["teacher_res"] = (resolutions or [None])[0] if len(resolutions) < 2 else resolutions
    if len(teachers) > 1:
        notes.append(f"{len(teachers)} teachers: the student learns from the mean of their probabilities"
                     + (f" at temperature {cfg.tau:g}" if "soft" in cfg.distillation else
                        ", its top class" if "hard" in cfg.distillation else ""))
    return planned(StagePlan("student", cfg, parent=teacher, teacher=teacher, notes=notes,
                              settings={"distillation": distillation}, model={"name": name, "args": args},
                              classes=classes, init=init, teachers=teachers if len(teachers) > 1 else []))


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
                           f"{'; '.join(differences[:4])}{f'; and {len(differences) - 4} more' if len(differences) > 4 else ''}. Leave these unset to use the cache's, or make a cache with them.")
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
    made_by = cache.manifest.get("teachers") or [record]
    if len(made_by) > 1 and cfg.distillation == "soft" and cfg.tau != 1.0:
        raise DistillError(f"The teacher cache {cache.root} keeps the mean of {len(made_by)} teachers' probabilities at "
                           f"temperature 1; --tau {cfg.tau:g} would apply its temperature to that mean, not to each "
                           "teacher's logits as their live ensemble does. Distil from the teachers themselves (--teacher, without "
                           "--teacher-cache), or with --tau 1.")
    teachers: list[Checkpoint] = []
    if cfg.teacher:
        teachers = [read_teacher(path, expecting=expecting) for path in cfg.teacher]
        if sorted(t.sha256 for t in teachers) != sorted(r["sha256"] for r in made_by):
            which = "another teacher" if len(made_by) == 1 else "other teachers"
            raise DistillError(f"The teacher cache {cache.root} was made by {which} "
                               f"({', '.join(r['path'] for r in made_by)}), not {', '.join(str(t.path) for t in teachers)}.")
    else:  # kept for the evaluation's agreement with the teachers only
        for made in made_by:
            found = read_teacher(Path(made["path"])) if Path(made.get("path", "")).exists() else None
            if found is None or found.sha256 != made["sha256"]:
                teachers = []
                break
            teachers.append(found)
    teachers = sorted(teachers, key=lambda t: [r["sha256"] for r in made_by].index(t.sha256))
    teacher = teachers[0] if teachers else None
    cfg = inherit_data(inherit_from_cache(cfg, cache), teacher)
    if "feature" in cfg.distillation:
        raise DistillError(f"A teacher cache holds the teacher's probabilities, not its features: --distillation "
                           f"{cfg.distillation} needs the teacher itself (--teacher, without --teacher-cache).")
    cfg = dataclasses.replace(cfg, token=default_token(cfg.model) if cfg.token is None else cfg.token)
    name, token_args = student_model(cfg.model, cfg.token)
    cfg = dataclasses.replace(cfg, fusion=(cfg.fusion or "logits") if cfg.token else None)
    cfg, notes = resolve_for_run(cfg)
    classes = cache.manifest["classes"]
    args = {**student_args(cfg, len(classes), name), **token_args}
    distillation = distillation_record(cfg.distillation, cfg.alpha, cfg.tau, cfg.token, cfg.feature_loss, cfg.fusion)
    settings = {"distillation": distillation, "cache": {"path": str(cache.root.resolve()),
                                                         "identity": cache.manifest["identity"], "teacher": record,
                                                         **({"teachers": made_by} if len(made_by) > 1 else {})}}
    plan = StagePlan("student", cfg, parent=teacher, teacher=teacher, notes=notes, settings=settings,
                     model={"name": name, "args": args}, classes=classes, teachers=teachers if len(teachers) > 1 else [])
    plan.settings["cache_object"] = cache
    return planned(plan)


def execute_student(plan: StagePlan) -> Checkpoint:
    cfg, teacher = plan.config, plan.teacher
    run, done = open_run(plan)
    if done is not None:
        return done
    data, mean, std = load_with_norm(run, teacher, f"the dataset {cfg.data_dir or cfg.dataset}")
    for other in plan.teachers[1:]:
        check_classes(other, data.classes, f"the dataset {cfg.data_dir or cfg.dataset}")
    name, token_args = student_model(cfg.model, cfg.token)
    model, args = build_student(name, len(data.classes), cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                depth=cfg.depth, num_heads=cfg.num_heads, layer_scale=cfg.layer_scale,
                                drop_path=cfg.drop_path, extra=token_args)
    if plan.init is not None:
        model.load_state_dict(fit_deit_weights(plan.init.state_dict(), model,
                                               keep_heads=plan.init.knows_classes(data.classes)))
    set_distilled_training(model, True)
    frozen = frozen_teachers(plan.teachers or ([teacher] if teacher is not None else []), (mean, std), cfg.img_size,
                             cfg.teacher_res, compile=cfg.compile, tau=cfg.tau if "soft" in cfg.distillation else 1.0)
    train_set, test_set = datasets_for(cfg, data, mean, std)
    cache: TeacherCache | None = plan.settings.get("cache_object")
    view_seeds_ = None
    if cache is not None:  # the teacher's targets come from the cache: it never runs in training
        if data.classes != cache.manifest["classes"] or targets_digest(data.train.targets) != cache.manifest["targets_sha256"]:
            raise DistillError(f"The training data is not the one the teacher cache {cache.root} was made on (its images or "
                               "labels changed); make the cache again.")
        train_set.view_target = functools.partial(cache.target, kind=cfg.distillation)
        if run.accelerator.num_processes > 1:  # each process looked for the cache's teachers on its own disk: measure the
            from accelerate.utils import gather_object  # agreement with them only where every process found them

            if not all(gather_object([frozen is not None])):
                frozen = None
        view_seeds_ = cache.seeds()
        filled_on, here = cache.manifest.get("erase_noise"), run.accelerator.device.type
        if cfg.reprob and filled_on != here:
            plan.notes.append(f"random erasing's boxes are filled with noise drawn on this {here}, the cache's were "
                              + (f"drawn on a {filled_on}" if filled_on else "drawn in the loader workers (a cache made "
                                 "before the noise moved to the device)")
                              + ": inside those boxes the student sees other noise than its teacher saw, the rest of "
                              "every view is the same")
    cached_teacher = (plan.settings.get("cache") or {}).get("teacher")
    record = (teacher.lineage(taught(cfg.distillation)) if teacher else
              {**cached_teacher, "inherited": taught(cfg.distillation)} if cached_teacher else None)
    records = ([one.lineage(taught(cfg.distillation)) for one in plan.teachers]  # when several
               or [{**one, "inherited": taught(cfg.distillation)} for one in (plan.settings.get("cache") or {}).get("teachers", [])]
               or None)

    def describe(metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "student", "stage": "student", "model": {"name": name, "args": args},
                "params": count_params(model), "data": data_record(cfg, data.classes, mean, std, data.info),
                "parent": record, "teacher": record, "teachers": records, "distillation": plan.settings["distillation"],
                "teacher_cache": {k: v for k, v in (plan.settings.get("cache") or {}).items() if k != "teacher"} or None,
                "init": plan.init.lineage("weights") if plan.init else None}

    job = Job(model=model, train_set=train_set, eval_set=test_set,
              retransform=resolution_setter(cfg, mean, std, train_set, test_set, True),
              criterion=criterion_for(cfg, cfg.distillation, frozen if cache is None else None, cfg.alpha, cfg.tau,
                                      student=model, cached=cache is not None),
              num_classes=len(data.classes), describe=describe, predict=fused_outputs(cfg.fusion or "logits"),
              reference=TeacherEnsemble(frozen.members, 1.0) if isinstance(frozen, TeacherEnsemble) and frozen.tau != 1
              else frozen,
              class_names=data.classes, notes=plan.notes, view_seeds=view_seeds_)
    return run.fit(job)
