"""Running a stage: the runs its plan needs first (the FixRes teacher), then the plan itself; and the commands."""

from __future__ import annotations

import os
from typing import Callable

from rich.markup import escape

from distill.config import CacheConfig, FinetuneConfig, StudentConfig, TeachConfig, TransferConfig
from distill.console import console
from distill.errors import DistillError
from distill.stages.cache import execute_cache, plan_cache
from distill.stages.common import StagePlan, finished
from distill.stages.finetune import execute_finetune, plan_finetune
from distill.stages.student import execute_student, plan_student
from distill.stages.teach import execute_teach, plan_teach
from distill.stages.transfer import execute_transfer, plan_transfer
from distill.training.runfolder import FolderLock
from distill.weights.checkpoint import Checkpoint

PLANNERS: dict[str, Callable[..., StagePlan]] = {
    "teach": plan_teach, "student": plan_student, "finetune": plan_finetune, "transfer": plan_transfer,
    "cache-teacher": plan_cache,
}


def run_stage(make_plan: Callable[[], StagePlan]) -> Checkpoint:
    """Execute a plan: first the runs it needs (the FixRes teacher), then itself, planned again now that
    they exist."""
    plan = make_plan()
    if plan.before:
        pending = [before for before in plan.before if finished(before) is None]
        if pending and os.environ.get("RANK", "0") == "0":  # one line, not one per process
            first = ", then ".join(f"{before.stage} into {before.run_dir}" for before in pending)
            console.print(escape(f"{plan.stage} of {plan.parent.path}: first {first}, then the {plan.stage} itself"),
                          soft_wrap=True)
        for before in plan.before:
            run_stage(lambda before=before: before)
        plan = make_plan()
    if plan.waiting:
        raise DistillError(f"Stage {plan.stage} needs {(plan.parent or plan.teacher).path}, which does not exist yet; run "
                           "the earlier stages first.")
    try:
        return EXECUTORS[plan.stage](plan)
    finally:  # however the stage ended, another command may now write its folder
        FolderLock(plan.config.run_dir()).release()


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
