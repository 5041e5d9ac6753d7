"""A teacher read from a checkpoint: checked to be a classifier of the right classes, and frozen to read a
student's batch at the resolution asked. Shared by the stages and by `distill evaluate`."""

from __future__ import annotations

import torch

from distill.errors import DistillError
from distill.students import resize
from distill.teachers import FrozenTeacher, TeacherEnsemble
from distill.weights.checkpoint import Checkpoint, build_model, class_difference


def check_teacher(ckpt: Checkpoint, role: str = "teacher") -> Checkpoint:
    """Refuse a checkpoint that is not a teacher (a student, or weights with no classes)."""
    if ckpt.kind not in ("teacher", "pretrained"):
        raise DistillError(f"The {role} {ckpt.path} is a {ckpt.kind} checkpoint (from `distill {ckpt.stage}`), not a teacher; "
                           "train one with `distill teach` (any timm classifier can be a teacher).")
    if ckpt.written and (int(ckpt.model_args.get("num_classes", 0)) <= 0 or not ckpt.classes):
        raise DistillError(f"The {role} {ckpt.path} is not a classifier (it has no classes).")
    return ckpt


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


def teacher_resolution(teacher: Checkpoint, img_size: int, teacher_res: str = "student") -> int:
    """The resolution the teacher reads the batch at: the student's (the paper), the teacher's own, or a number."""
    if teacher_res == "student":
        return img_size
    if teacher_res == "teacher":
        return teacher.img_size
    return int(teacher_res)


def frozen_teacher(ckpt: Checkpoint, input_norm: tuple[tuple[float, ...], tuple[float, ...]], img_size: int,
                   teacher_res: str = "student", compile: bool = False) -> FrozenTeacher:
    """The teacher, frozen, renormalising batches of `img_size` px and reading them at the resolution --teacher-res
    asks for; compiled when asked (the engine puts it in channels-last format)."""
    size = teacher_resolution(ckpt, img_size, teacher_res)
    model = build_model(ckpt)
    if hasattr(model, "set_input_size") and hasattr(model, "pos_embed") and ckpt.img_size != size:
        resize(model, size)  # a ViT teacher must read its input size
    teacher = FrozenTeacher(model, (ckpt.data["mean"], ckpt.data["std"]), input_norm,
                            img_size=size if size != img_size else None)
    if compile:  # the body: its head runs apart, in fp32
        teacher.body = torch.compile(teacher.model.forward_features)
    return teacher


def frozen_teachers(ckpts: list[Checkpoint], input_norm: tuple[tuple[float, ...], tuple[float, ...]], img_size: int,
                    teacher_res: str = "student", compile: bool = False, tau: float = 1.0
                    ) -> FrozenTeacher | TeacherEnsemble | None:
    """One teacher frozen as `frozen_teacher` makes it, several as the ensemble of the mean of their probabilities at
    temperature `tau` (each at its own resolution under --teacher-res teacher, and its own normalisation); None for
    none."""
    members = [frozen_teacher(ckpt, input_norm, img_size, teacher_res, compile) for ckpt in ckpts]
    if len(members) <= 1:
        return members[0] if members else None
    return TeacherEnsemble(members, tau)


def several_teachers(ckpts: list[Checkpoint], distillation: str) -> None:
    """Refuse what several teachers cannot do: give the same teacher twice, or regress features (whose widths and
    meanings differ from teacher to teacher)."""
    seen: dict[str, Checkpoint] = {}
    for ckpt in ckpts:
        if ckpt.written and ckpt.sha256 in seen:
            raise DistillError(f"The teacher {ckpt.path} is given twice (the same weights as {seen[ckpt.sha256].path}); "
                               "give each teacher once.")
        seen[ckpt.sha256 if ckpt.written else str(ckpt.path)] = ckpt
    if len(ckpts) > 1 and "feature" in distillation:
        raise DistillError(f"--distillation {distillation} regresses one teacher's features; with several teachers "
                           "distil from their mean probabilities with --distillation soft or hard.")
