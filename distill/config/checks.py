"""Checks of a config that its types cannot express, each refusal a sentence; and the parsing of the values that
are small languages of their own (--img-size-schedule, --log-with)."""

from __future__ import annotations

import difflib

from distill.config.fields import StageConfig, config_fields
from distill.errors import DistillError


def validate(config: StageConfig) -> None:
    """Range checks that a type cannot express, each a sentence."""
    checks = [
        (config.epochs >= 1, "--epochs must be at least 1."),
        (config.batch_size >= 1, "--batch-size must be at least 1."),
        (config.grad_accum >= 1, "--grad-accum must be at least 1."),
        (config.lr is None or config.lr > 0, "--lr must be positive."),
        (config.repeated_aug >= 1, "--repeated-aug must be at least 1."),
        (config.img_size is None or config.img_size >= 8, "--img-size must be at least 8 pixels."),
        (config.crop_pct is None or 0 < config.crop_pct <= 1, "--crop-pct must be in (0, 1]."),
        (config.reprob is None or 0 <= config.reprob <= 1, "--reprob must be between 0 and 1."),
        (0 <= config.smoothing < 1, "--smoothing must be in [0, 1)."),
        ((config.mixup or 0) >= 0 and (config.cutmix or 0) >= 0, "--mixup and --cutmix must not be negative."),
        (config.train_subset is None or config.train_subset > 0, "--train-subset must be positive."),
        (config.save_every >= 0, "--save-every must not be negative."),
        (config.eval_every >= 1, "--eval-every must be at least 1."),
        (config.log_every >= 1, "--log-every must be at least 1."),
        (config.num_workers is None or config.num_workers >= 0, "--num-workers must not be negative."),
        (str(config.threads) == "auto" or (str(config.threads).isdigit() and int(config.threads) >= 1),
         f"--threads takes auto or a number of threads (1 or more), not '{config.threads}'."),
        (not (config.data_dir and config.dataset not in (None, "folder")),
         "Give either --dataset or --data-dir, not both."),
        (config.min_lr >= 0 and config.warmup_lr >= 0, "--min-lr and --warmup-lr must not be negative."),
        (config.warmup_epochs is None or config.warmup_epochs >= 0, "--warmup-epochs must not be negative."),
        (0 <= config.hflip <= 1 and 0 <= config.mixup_switch_prob <= 1,
         "--hflip and --mixup-switch-prob are probabilities, between 0 and 1."),
        (config.scale_min is None or 0 < config.scale_min <= 1, "--scale-min must be in (0, 1]."),
        (config.clip_grad is None or config.clip_grad > 0, "--clip-grad must be positive."),
        (0 < config.ema_decay < 1, "--ema-decay must be between 0 and 1."),
        (config.weight_decay >= 0, "--weight-decay must not be negative."),
        (config.opt_eps > 0, "--opt-eps must be positive."),
        (config.bce_target_thresh is None or config.loss == "bce", "--bce-target-thresh applies to --loss bce only."),
        (config.bce_target_thresh is None or 0 <= config.bce_target_thresh < 1, "--bce-target-thresh must be in [0, 1)."),
        (config.bce_target_thresh is None or config.smoothing == 0,
         f"--bce-target-thresh binarises the targets, which undoes --smoothing {config.smoothing} (or, below smoothing / "
         "classes, marks every class present); pass --smoothing 0 with it, as DeiT III does."),
        (not (((config.mixup or 0) > 0 or (config.cutmix or 0) > 0) and config.batch_size % 2
              and config.global_batch is None),  # with a global batch, config.auto.split_batch finds an even share
         f"Mixup/CutMix need an even --batch-size, not {config.batch_size} (or pass --mixup 0 --cutmix 0)."),
        (config.global_batch is None or config.global_batch >= 1, "--global-batch must be at least 1."),
        (config.dist_timeout >= 1, "--dist-timeout must be at least 1 second."),
    ]
    for name in ("res", "teacher_epochs", "views", "top_k", "shard_size"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            checks.append((False, f"--{name.replace('_', '-')} must be at least 1."))
    teacher_res = getattr(config, "teacher_res", "student")
    if teacher_res not in ("student", "teacher") and not (str(teacher_res).isdigit() and int(teacher_res) >= 8):
        checks.append((False, f"--teacher-res must be student, teacher or a resolution of at least 8 pixels, not "
                              f"'{teacher_res}'."))
    if getattr(config, "teacher_lr", None) is not None and config.teacher_lr <= 0:
        checks.append((False, "--teacher-lr must be positive."))
    if config.onednn_linear:  # refused here, before a run folder or a cache is touched
        from distill.speed import ONEDNN_MISSING, onednn_linear_available

        checks.append((onednn_linear_available(), ONEDNN_MISSING))
    for ok, sentence in checks:
        if not ok:
            raise DistillError(sentence)
    if config.img_size_schedule or config.log_with:
        check_schedule(config.img_size_schedule, config.epochs, config.img_size)
        tracker_names(config.log_with)
    for f in config_fields(type(config)):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise DistillError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, not '{value}'.")
    from timm.optim import list_optimizers

    if config.opt.lower() not in list_optimizers():
        near = difflib.get_close_matches(config.opt.lower(), list_optimizers(), n=3)
        raise DistillError(f"timm has no optimizer '{config.opt}'" + (f"; did you mean {', '.join(near)}?" if near else "."))
    alpha = getattr(config, "alpha", None)
    if alpha is not None and not 0 <= alpha <= 1:
        raise DistillError("--alpha must be between 0 and 1.")
    tau = getattr(config, "tau", None)
    if tau is not None and tau <= 0:
        raise DistillError("--tau must be positive.")


def parse_schedule(text: str | None) -> list[tuple[int, int]]:
    """`24:0,32:10` -> [(0, 24), (10, 32)] as (first epoch, resolution), refused with a sentence when malformed."""
    if not text:
        return []
    steps = []
    for part in text.split(","):
        size, _, epoch = part.strip().partition(":")
        try:
            steps.append((int(epoch), int(size)))
        except ValueError:
            raise DistillError(f"--img-size-schedule takes RESOLUTION:EPOCH pairs separated by commas (e.g. 24:0,32:10), "
                               f"not '{text}'.") from None
    epochs = [epoch for epoch, _ in steps]
    if epochs[0] != 0:
        raise DistillError(f"--img-size-schedule must start at epoch 0 (e.g. {steps[0][1]}:0,...), not at epoch {epochs[0]}.")
    if epochs != sorted(set(epochs)):
        raise DistillError(f"--img-size-schedule's epochs must increase, each once: {text}.")
    small = [size for _, size in steps if size < 8]
    if small:
        raise DistillError(f"--img-size-schedule's resolutions must be at least 8 pixels, not {small[0]}.")
    return steps


def check_schedule(text: str | None, epochs: int, img_size: int | None) -> None:
    """A schedule that fits the run: its changes fall inside it, and it ends at --img-size (the resolution the
    checkpoint is written and measured at)."""
    steps = parse_schedule(text)
    if not steps:
        return
    late = [epoch for epoch, _ in steps if epoch >= epochs]
    if late:
        raise DistillError(f"--img-size-schedule changes the resolution at epoch {late[0]}, but the run has {epochs} "
                           f"epoch(s) (0 to {epochs - 1}).")
    if img_size is not None and steps[-1][1] != img_size:
        raise DistillError(f"--img-size-schedule ends at {steps[-1][1]} px but --img-size is {img_size}: the checkpoint is "
                           "written at the last resolution, so give the same (or leave --img-size out).")


def tracker_names(log_with: str | None) -> list[str]:
    """`tensorboard,wandb` -> ['tensorboard', 'wandb'], each checked against accelerate's trackers and installed."""
    if not log_with:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in log_with.split(",") if name.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise DistillError(f"--log-with takes accelerate's trackers ({', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or all), "
                               f"not '{name}'.")
        if name not in available:
            raise DistillError(f"--log-with {name} needs the {name} package, which is not installed (pip install {name}).")
    return names
