"""Typed stage configs: defaults <- TOML recipe <- command-line flags, one source of truth.

fields (the machinery and the shared fields) <- stages (each stage's fields) <- checks <- auto, recipes.
"""

from distill.config.auto import PROFILES, auto_precision, auto_rate, processes, resolve_auto, split_batch
from distill.config.checks import check_schedule, parse_schedule, tracker_names, validate
from distill.config.fields import (LONG_RUN_IMAGES, LR_REFERENCE_BATCH, ArchFields, DistillFields, ReferenceRate,
                                   StageConfig, config_differences, config_fields, field_types, option, to_dict)
from distill.config.recipes import (NOT_SHARED, check_keys, check_recipe, layer, read_toml, resolve, stage_section,
                                    transfer_targets, write_toml)
from distill.config.stages import (CONFIGS, STAGES, CacheConfig, FinetuneConfig, FixResConfig, StudentConfig,
                                   TeachConfig, TransferConfig)

__all__ = ["PROFILES", "auto_precision", "auto_rate", "processes", "resolve_auto", "split_batch", "check_schedule", "parse_schedule", "tracker_names",
           "validate", "LONG_RUN_IMAGES", "LR_REFERENCE_BATCH", "ArchFields", "DistillFields", "ReferenceRate",
           "StageConfig", "config_differences", "config_fields", "field_types", "option", "to_dict", "NOT_SHARED",
           "check_keys", "check_recipe", "layer", "read_toml", "resolve", "stage_section", "transfer_targets",
           "write_toml", "CONFIGS", "STAGES", "CacheConfig", "FinetuneConfig", "FixResConfig", "StudentConfig",
           "TeachConfig", "TransferConfig"]
