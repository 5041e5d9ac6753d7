"""The fields every stage shares, and the machinery that makes flags, recipes and config.toml of them.

Each stage has a flat dataclass (config.stages). Field metadata carries the help text and the help panel, so
the CLI, recipes and the resolved `config.toml` all come from the same place. Fields whose default is None are
filled by the stage (usually from the parent checkpoint) and the resolved value is what gets recorded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.choices import CROPS, DISTILLATION_KINDS, FEATURE_LOSSES, FUSIONS, LABEL_LOSSES

# DeiT's learning-rate rule: the value given is for a global batch of 512.
LR_REFERENCE_BATCH = 512
# --profile auto: DeiT's regularisation from this many training images seen (config.auto).
LONG_RUN_IMAGES = 10_000_000


@dataclass(frozen=True)
class ReferenceRate:
    """A recipe's own learning rate at its own global batch: what `--lr auto` starts from."""

    rate: float
    batch: int
    source: str


def option(default: Any, help: str, panel: str = "Training", *, choices: tuple[str, ...] = (),
           result: bool = True, flag: str | None = None, hidden: bool = False) -> Any:
    """A config field with its help text. `result=False` marks fields that do not change what a run
    produces (paths, workers, logging), so changing them neither refuses a resume nor re-runs a stage.
    `hidden` keeps an older spelling working as a flag without showing it in --help."""
    meta = {"help": help, "panel": panel, "choices": choices, "result": result, "flag": flag, "hidden": hidden}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StageConfig:
    """Settings every stage shares: run folder, data, augmentation, optimisation, precision.

    Defaults are sized for a short run on a CPU (the embedded digits in minutes). Where they differ
    from DeiT's Table 9, the help says so; recipes/deit-*.toml hold the paper's values.
    """

    # Run
    workdir: Path = option(Path("runs"), "Work folder; each stage writes <workdir>/<name>/.", "Run", result=False)
    name: str | None = option(None, "Run folder name under --workdir [default: the stage's name].", "Run", result=False)
    seed: int = option(0, "Random seed; with it a run is reproducible, also across a resume.", "Run")
    mixed_precision: str = option("auto", "Mixed precision: auto (the launcher's bf16 or fp16 when `accelerate launch "
                                  "--mixed_precision` or `accelerate config` names one, else bf16 on a GPU that has it, "
                                  "else fp32), no (fp32), bf16 (fast on recent GPUs and on CPUs with bf16 instructions, "
                                  "AMX or AVX512-BF16) or fp16 (GPU only).",
                                  "Run", choices=("auto", "no", "bf16", "fp16"))
    dist_timeout: int = option(1800, "Seconds a process waits for the others in a collective operation before the run "
                               "stops with a sentence (the process-group timeout; data is prepared by every process at "
                               "once, so no process waits while another prepares it; a checkpoint being written, and a teacher "
                               "cache's shards, are waited for as long as their writer shows progress).", "Run",
                               result=False)
    deterministic: bool = option(False, "Deterministic kernels on a GPU (torch.use_deterministic_algorithms, no "
                                 "cudnn.benchmark; slower): with it a resumed CUDA run ends bit for bit as an "
                                 "uninterrupted one, as a CPU run always does.", "Run", result=False)
    save_every: int = option(0, "Also save the resumable state every N optimizer steps (0: once per epoch).", "Run", result=False)
    num_workers: int | None = option(None, "Data-loading worker processes per training process [default: auto: on a GPU "
                                     "every core of the machine but one per training process, shared among its "
                                     "processes (at most 32 each); on a CPU half of a process's cores, at least 2].",
                                     "Run", result=False)
    eval_every: int = option(1, "Evaluate on the test split every N epochs (and always after the last).", "Run",
                             result=False)
    compile: bool = option(False, "Hand the model being trained and the teacher to torch.compile (inductor; the first steps "
                           "compile for a while). Measured in docs/results.md.", "Run", result=False)
    channels_last: bool | None = option(None, "Channels-last memory format for convolutional models (teachers, convnet "
                                        "students) [default: on a CPU, and on a GPU with mixed precision, where "
                                        "convolutions run faster that way]. Measured in docs/results.md.", "Run",
                                        result=False)
    idle_workers: bool | None = option(None, "Run the data-loading workers at idle CPU priority, so they use the cores the "
                                       "training threads leave instead of interrupting them [default: on a CPU]. Turn "
                                       "off when a busy program shares the CPU. Measured in docs/results.md.", "Run",
                                       result=False)
    onednn_linear: bool | None = option(None, "Compute fp32 linear layers on a CPU with oneDNN instead of MKL, the same maths "
                                        "[default: on an AVX-512 CPU not made by Intel, where MKL runs its AVX2 code: "
                                        "2x the matmul rate on AMD]. Measured in docs/results.md.", "Run",
                                        result=False)
    threads: str = option("auto", "PyTorch's compute threads on a CPU: a number, or auto (one per core that other programs "
                          "leave free as the run starts, so a busy machine does not stall every step). Measured in "
                          "docs/results.md.", "Run", result=False)
    attention: str = option("auto", "The kernel of timm's attention layers: fused (PyTorch's scaled_dot_product_attention), "
                            "manual (timm's matmul-softmax-matmul, more memory) or auto (manual on a CPU in bf16, where it "
                            "is 1.3-1.9x faster, else timm's choice). Measured in docs/results.md.", "Run",
                            choices=("auto", "fused", "manual"), result=False)
    log_every: int = option(20, "Read the training loss (for the log and its NaN/inf check) every N optimizer steps: the "
                            "one host sync of the loop. A bad loss still stops the run naming the step it happened.", "Run",
                            result=False)
    log_with: str | None = option(None, "Also log to experiment trackers through accelerate: tensorboard, wandb, mlflow, "
                                  "aim, comet_ml, ... or all, comma-separated; written under <run>/logs, offline unless "
                                  "the environment says otherwise (wandb offline mode, MLflow file store).", "Run",
                                  result=False)
    overwrite: bool = option(False, "Replace a finished or interrupted run in the same folder whose config differs.", "Run", result=False)
    skip_corrupt: bool = option(False, "Leave out the images the check before training finds unreadable (their count and "
                                "first paths are printed and shown by distill info) instead of stopping with the list of "
                                "them.", "Data")
    # Data
    dataset: str | None = option(None, "Dataset: digits (embedded), cifar10, cifar100, flowers102, stanford_cars, imagenet-1k, "
                                 "any Hugging Face hub id or a local copy of one [default: the parent's, else digits].", "Data")
    data_dir: Path | None = option(None, "Local image folder: train/<class>/* and test/ (or val/)<class>/*.", "Data")
    train_subset: int | None = option(None, "Train on a fixed class-balanced subset of this many training images.", "Data")
    classes: str | None = option(None, "Keep only these classes, by name, comma-separated (e.g. cat,dog; the digits' "
                                 "names are 0 to 9) [default: all; a later stage takes its parent's].", "Data")
    img_size: int | None = option(None, "Training and test resolution in pixels [default: the parent's, else 32].", "Data")
    img_size_schedule: str | None = option(None, "Progressive resizing: RESOLUTION:EPOCH pairs, e.g. 24:0,32:10 (24 px from "
                                           "epoch 0, 32 px from epoch 10); ViT position embeddings are resampled at each "
                                           "change. It ends at --img-size [default: --img-size throughout].", "Data")
    crop_pct: float | None = option(None, "Test-time crop ratio: resize to size/crop_pct, centre-crop [default: the parent's, else 0.875].", "Data")
    interpolation: str = option("bicubic", "Resize interpolation (DeiT trains with bicubic).", "Data",
                                choices=("bicubic", "bilinear", "nearest"))
    norm: str | None = option(None, "Input normalisation: imagenet, inception (0.5/0.5), clip (OpenAI CLIP's) or dataset "
                              "(measured on the training split) [default: the parent's, else imagenet].", "Data",
                              choices=("imagenet", "inception", "clip", "dataset"))
    # Augmentation (DeiT, Table 9)
    profile: str = option("auto", "Default regularisation: deit (Table 9: RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, "
                          "CutMix 1.0, erasing 0.25, crop scale from 0.08, 5 warmup epochs), short (none of them, crop scale "
                          "from 0.5, 1 warmup epoch: better on every small run measured), or auto: deit when the run sees "
                          f"{LONG_RUN_IMAGES // 1_000_000}M training images or more (epochs x training set), short below. "
                          "Each flag given overrides its own value.", "Augmentation", choices=("auto", "deit", "short"))
    aa: str | None = option(None, "timm augmentation policy: a RandAugment string (DeiT: rand-m9-mstd0.5-inc1), 3a (DeiT "
                            "III's 3-Augment: one of grayscale, solarisation or Gaussian blur per image, chosen uniformly, "
                            "plus --color-jitter and the flip) or none [default: by --profile].", "Augmentation")
    crop: str = option("rrc", "Training crop: rrc (random-resized crop, DeiT and DeiT III on ImageNet-1k) or src (DeiT III's "
                       "simple random crop: shorter side resized to --img-size, reflect-padded 4 px, a random square crop; "
                       "--scale-min does not apply).", "Augmentation", choices=CROPS)
    reprob: float | None = option(None, "Random-erasing probability [default: by --profile; DeiT: 0.25].", "Augmentation")
    mixup: float | None = option(None, "Mixup alpha, 0 disables [default: by --profile; DeiT: 0.8].", "Augmentation")
    cutmix: float | None = option(None, "CutMix alpha, 0 disables [default: by --profile; DeiT: 1.0].", "Augmentation")
    mixup_switch_prob: float = option(0.5, "Probability of CutMix rather than Mixup when both are on.", "Augmentation")
    smoothing: float = option(0.1, "Label smoothing of the true labels (never applied to a teacher's labels).", "Augmentation")
    color_jitter: float = option(0.3, "Colour jitter strength for brightness, contrast and saturation (timm ignores it "
                                 "when RandAugment is on; 3-Augment keeps it, DeiT III: 0.3).", "Augmentation")
    scale_min: float | None = option(None, "Smallest area fraction of the random-resized crop [default: by --profile; "
                                     "DeiT: 0.08].", "Augmentation")
    hflip: float = option(0.5, "Horizontal-flip probability.", "Augmentation")
    repeated_aug: int = option(1, "Repeated augmentation: each image this many times in a row, dealt to the processes in "
                               "turn (DeiT: 3). With several processes only: on one, where the copies would share a "
                               "batch, an epoch reads every image once (DeiT's code repeats there too).", "Augmentation")
    # Optimisation (DeiT, Table 9)
    epochs: int = option(15, "Training epochs (DeiT: 300).", "Optimisation")
    batch_size: int = option(32, "Images per process in one forward pass (DeiT: 64 per GPU); with --global-batch, the most "
                             "one process takes at once, accumulation making up the rest.", "Optimisation")
    grad_accum: int = option(1, "Gradient-accumulation steps per optimizer step (with --global-batch: derived).",
                             "Optimisation")
    global_batch: int | None = option(None, "Images per optimizer step over all processes: the batch of the paper's lr "
                                      "rule (DeiT: 1024). The same run then trains alike on 8, 16 or 64 GPUs, and a "
                                      "resume on another number of processes keeps it [default: --batch-size x "
                                      "--grad-accum x processes; a run folder keeps the one it started with].",
                                      "Optimisation")
    sync_bn: bool = option(False, "Synchronise BatchNorm statistics across processes at every step (PyTorch's "
                           "SyncBatchNorm, GPUs only; for convnets trained with small batches per GPU). Without it, the "
                           "processes' statistics are averaged before every evaluation and save.", "Optimisation")
    opt: str = option("adamw", "Optimizer (any timm name: adamw, sgd, lamb, ...).", "Optimisation")
    opt_eps: float = option(1e-8, "The optimizer's epsilon, for those that take one: DeiT's --opt-eps, 1e-8 for every "
                            "optimizer (timm's LAMB alone would use 1e-6).", "Optimisation")
    lr: float | None = option(None, "BASE learning rate per global batch of 512: the rate used is lr x global batch / 512 "
                              "(global batch = batch size x processes x accumulation), DeiT's rule. Default: auto, the "
                              "stage's reference rate at the reference's own global batch (here DeiT's 1e-3 at 1024, i.e. "
                              "5e-4 per 512), scaled linearly above that batch and held below it, where the linear rule "
                              "would shrink it to nothing (3.1e-5 at batch 32). The run's first line prints the rate used.",
                              "Optimisation")
    lr_scale: bool = option(True, "Scale --lr by global batch / 512 (--no-lr-scale uses --lr as given).", "Optimisation")
    min_lr: float = option(1e-5, "Final learning rate of the cosine schedule.", "Optimisation")
    warmup_lr: float = option(1e-6, "Learning rate at the start of the warmup.", "Optimisation")
    warmup_epochs: float | None = option(None, "Linear warmup length in epochs, stepped per iteration [default: by "
                                         "--profile; DeiT: 5].", "Optimisation")
    weight_decay: float = option(0.05, "Weight decay (not applied to biases, norms and token/position embeddings).", "Optimisation")
    momentum: float = option(0.9, "Momentum for SGD-type optimizers.", "Optimisation")
    clip_grad: float | None = option(None, "Clip the gradient norm to this value (DeiT does not clip; DeiT III: 1.0).",
                                     "Optimisation")
    loss: str = option("ce", "Loss on the labels: ce (cross-entropy, DeiT) or bce (binary cross-entropy with the Mixup/CutMix "
                       "targets, DeiT III; timm's --bce-loss). Distillation terms are added to either.", "Optimisation",
                       choices=LABEL_LOSSES)
    bce_target_thresh: float | None = option(None, "With --loss bce, binarise the targets: above this value 1, else 0 "
                                             "(DeiT III: 0.0, so both classes of a mixed image are targets; needs "
                                             "--smoothing 0) [default: the soft targets as they are, as timm].",
                                             "Optimisation")
    ema: bool = option(False, "Also keep an exponential moving average of the weights, evaluated each epoch and saved as "
                       "model-ema.safetensors.", "Optimisation")
    ema_decay: float = option(0.99996, "EMA decay, used from the first step as DeiT does (DeiT's value: 0.99996).",
                              "Optimisation")
    ema_warmup: bool = option(False, "Ramp the EMA decay up as 1 - (1 + step)^(-2/3) (timm's warmup; it reaches 0.99996 only "
                              "after about 4M steps) instead of DeiT's fixed decay.", "Optimisation")
    # Model
    model: str = option("", "timm model name.", "Model")
    drop_path: float = option(0.1, "Stochastic-depth rate.", "Model")

    stage = "stage"
    reference_lr = ReferenceRate(1e-3, 1024, "DeiT's 5e-4 per 512, at its global batch of 1024")

    def run_name(self) -> str:
        return self.name or self.stage

    def class_list(self) -> list[str] | None:
        return [c.strip() for c in self.classes.split(",") if c.strip()] if self.classes else None

    def run_dir(self) -> Path:
        return Path(self.workdir) / self.run_name()

    def images_per_step(self, num_processes: int) -> int:
        """The global batch: given (or resolved at planning), else what the per-process batch makes of it."""
        return self.global_batch or self.batch_size * self.grad_accum * num_processes

    def effective_lr(self, num_processes: int) -> float:
        """The DeiT rule: lr = base lr x global batch / 512."""
        if not self.lr_scale:
            return self.lr
        return self.lr * self.images_per_step(num_processes) / LR_REFERENCE_BATCH


@dataclass
class DistillFields:
    """How a student learns from its teacher (paper, section 4; defaults from the official code)."""

    distillation: str | None = option(
        "hard", "Distillation: none, soft (KL on temperature-softened outputs), hard (teacher's argmax as a label), "
        "feature (a learned projection of the student's pre-logits regresses the teacher's, timm's feature distillation; "
        "the projection is trained and resumed with the run, never exported), or soft+feature, hard+feature.",
        "Distillation", choices=DISTILLATION_KINDS)
    alpha: float | None = option(0.5, "Weight of each teacher term; the label term gets 1 - alpha (official DeiT default "
                                 "0.5; the paper's soft runs use 0.1).", "Distillation")
    tau: float | None = option(1.0, "Soft-distillation temperature (official DeiT default 1.0; the paper's soft runs use 3.0).",
                               "Distillation")
    teacher_res: str = option("student", "Resolution the teacher reads the batch at: student (the paper: the student's "
                              "own batch as it is), teacher (resized on the device to the resolution the teacher was "
                              "trained at, e.g. an ImageNet teacher at 224 beside a 32 px student) or a number of "
                              "pixels.", "Distillation")
    teacher_model: str | None = option(None, "timm architecture of a bare weights file given as --teacher (e.g. "
                                       "regnety_160.deit_in1k); not needed for distill checkpoints or timm/, hf-hub:, "
                                       "local-dir: sources.", "Distillation", result=False)
    fusion: str | None = option(None, "How a token student's two heads make its prediction: logits (the mean of their "
                                "logits, as timm's forward and the official code compute it, so an exported timm model "
                                "scores as recorded) or softmax (the mean of their probabilities, the paper's text) "
                                "[default: the parent's, else logits]. Recorded; evaluate, predict and ONNX follow it.",
                                "Distillation", choices=FUSIONS)
    feature_loss: str | None = option("mse", "Feature distillation's loss: mse (timm's) or cosine (1 - cosine similarity, "
                                      "blind to the features' scale).", "Distillation", choices=FEATURE_LOSSES)


@dataclass
class ArchFields:
    """Sizing of a ViT (student, or a DeiT used as a teacher); convnets ignore them."""

    patch_size: int | None = option(None, "Patch size [default: 16, or img-size/4 below 128 px].", "Model")
    embed_dim: int | None = option(None, "Embedding width [default: the model's].", "Model")
    depth: int | None = option(None, "Number of transformer blocks [default: the model's].", "Model")
    num_heads: int | None = option(None, "Attention heads [default: the model's].", "Model")
    layer_scale: float | None = option(None, "LayerScale's initial value (timm's init_values; DeiT III: 1e-4) [default: "
                                       "the model's: 1e-6 for timm's deit3_*, none for deit_* and vit_*].", "Model")


def config_fields(cls: type[StageConfig]) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.init]


def field_types(cls: type[StageConfig]) -> dict[str, type]:
    """Each field's concrete type, with `X | None` unwrapped."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[name] = hint
    return out


def to_dict(config: StageConfig, result_only: bool = False) -> dict[str, Any]:
    """Plain values (paths as strings, None dropped): what goes into config.toml and checkpoint metadata."""
    out = {}
    for f in config_fields(type(config)):
        if result_only and not f.metadata.get("result", True):
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        out[f.name] = (str(value) if isinstance(value, Path) else
                       [str(v) if isinstance(v, Path) else v for v in value] if isinstance(value, list) else value)
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable 'key: old -> new' for the settings that change a run's result."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [_lr_change(old, new) if k == "lr" else f"{k}: {old.get(k)} -> {new.get(k)}"
            for k in keys if old.get(k) != new.get(k)]


def _lr_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The lr each run trains with (as its first line printed it), with the per-512 base beside it: the recorded
    value is the base, which no run prints alone."""
    def used(config: dict[str, Any]) -> tuple[float, int] | None:
        batch = config.get("global_batch")
        if not config.get("lr_scale", True):
            return config.get("lr"), batch
        if not batch or config.get("lr") is None:
            return None
        return config["lr"] * batch / LR_REFERENCE_BATCH, batch

    before, after = used(old), used(new)
    if before is None or after is None:
        return f"lr (per {LR_REFERENCE_BATCH} images): {old.get('lr')} -> {new.get('lr')}"
    where = (f" at global batch {after[1]}" if before[1] == after[1] else
             f" (at global batch {before[1]} -> {after[1]})")
    return (f"lr: {before[0]:.4g} -> {after[0]:.4g}{where}; per {LR_REFERENCE_BATCH} images {old.get('lr'):.4g} -> "
            f"{new.get('lr'):.4g}")
