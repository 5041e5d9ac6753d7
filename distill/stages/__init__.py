"""The four stages (and the teacher cache), one module each: planned from a config and its parents, then run by the
engine. `runner` runs a plan and holds the commands; `pipeline` chains them from a recipe."""

from distill.stages.runner import cache_teacher, finetune, run_stage, student, teach, transfer  # noqa: F401
