"""Typed stage configs: defaults <- TOML recipe <- command-line flags, one source of truth.

Each stage has a flat dataclass. Field metadata carries the help text and the
help panel, so the CLI, recipes and the resolved `config.toml` all come from the
same place. Fields whose default is None are filled by the stage (usually from
the parent checkpoint) and the resolved value is what gets recorded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from distill.choices import CROPS, DISTILLATION_KINDS, FEATURE_LOSSES, LABEL_LOSSES
from distill.errors import DistillError

# DeiT's learning-rate rule: the value given is for a global batch of 512.
LR_REFERENCE_BATCH = 512
STAGES = ("teach", "student", "finetune", "transfer")

# --profile: the regularisation a run gets by default. DeiT's Table 9 is what the paper measured, on ImageNet
# for 300 epochs (384M images seen); on every small run measured here it costs accuracy (flowers12: 7 points at 15
# epochs, 12 at 100; docs/results.md). `auto` gives DeiT's from 10M images seen (ImageNet-1k for 8 epochs,
# CIFAR for 200), light augmentation below: a boundary chosen between the two, not measured at it.
LONG_RUN_IMAGES = 10_000_000
PROFILES: dict[str, dict[str, Any]] = {
    "deit": {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "scale_min": 0.08,
             "warmup_epochs": 5.0},
    "short": {"aa": "none", "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "scale_min": 0.5, "warmup_epochs": 1.0},
}


@dataclass(frozen=True)
class ReferenceRate:
    """A recipe's own learning rate at its own global batch: what `--lr auto` starts from."""

    rate: float
    batch: int
    source: str


def option(default: Any, help: str, panel: str = "Training", *, choices: tuple[str, ...] = (),
           result: bool = True, flag: str | None = None) -> Any:
    """A config field with its help text. `result=False` marks fields that do not change what a run
    produces (paths, workers, logging), so changing them neither refuses a resume nor re-runs a stage."""
    meta = {"help": help, "panel": panel, "choices": choices, "result": result, "flag": flag}
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
    mixed_precision: str = option("no", "Mixed precision: no, bf16 (fast on recent GPUs and on CPUs with bf16 instructions, AMX "
                                  "or AVX512-BF16) or fp16 (GPU only).",
                                  "Run", choices=("no", "bf16", "fp16"))
    save_every: int = option(0, "Also save the resumable state every N optimizer steps (0: once per epoch).", "Run", result=False)
    num_workers: int = option(2, "Data-loading worker processes per training process.", "Run", result=False)
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
    classes: str | None = option(None, "Keep only these classes, comma-separated (e.g. 0,1,2,3,4) [default: all; "
                                 "a later stage takes its parent's].", "Data")
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
    repeated_aug: int = option(1, "Repeated augmentation: each image this many times per epoch, spread over processes "
                               "(DeiT uses 3 on 8+ GPUs).", "Augmentation")
    # Optimisation (DeiT, Table 9)
    epochs: int = option(15, "Training epochs (DeiT: 300).", "Optimisation")
    batch_size: int = option(32, "Batch size per process (DeiT: 64 per GPU).", "Optimisation")
    grad_accum: int = option(1, "Gradient-accumulation steps per optimizer step.", "Optimisation")
    opt: str = option("adamw", "Optimizer (any timm name: adamw, sgd, lamb, ...).", "Optimisation")
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

    def global_batch(self, num_processes: int) -> int:
        return self.batch_size * self.grad_accum * num_processes

    def effective_lr(self, num_processes: int) -> float:
        """The DeiT rule: lr = base lr x global batch / 512."""
        if not self.lr_scale:
            return self.lr
        return self.lr * self.global_batch(num_processes) / LR_REFERENCE_BATCH


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


@dataclass
class TeachConfig(ArchFields, StageConfig):
    """`distill teach`: a RegNetY teacher trained with the DeiT recipe."""

    model: str = option("regnety_002", "timm model name: a RegNetY (the paper's teacher is regnety_160), any convnet, "
                        "or a DeiT (deit_tiny, ...) sized by the flags below.", "Model")
    init: Path | None = option(None, "Start from this teacher: a checkpoint, timm/NAME.TAG (e.g. timm/regnety_160.deit_in1k), "
                               "hf-hub:ORG/REPO, local-dir:PATH or a weights file with --model; its classifier is replaced "
                               "when the classes differ.", "Model", result=False)  # the file's sha256, not its path, identifies the run

    stage = "teach"


@dataclass
class StudentConfig(ArchFields, DistillFields, StageConfig):
    """`distill student`: a DeiT distilled from a teacher."""

    model: str = option("deit_tiny", "Student: a size (deit_tiny, deit_small, deit_base; deit3_small, deit3_base: DeiT III, "
                        "LayerScale; vit_small, ...) or any timm ViT name.", "Model")
    teacher: Path | None = option(None, "Teacher checkpoint [default: runs/teach in --workdir].", "Distillation",
                                  result=False)
    teacher_cache: Path | None = option(None, "Train from a teacher cache (`distill cache-teacher`) instead of running the "
                                        "teacher: no teacher forward at all; the augmentation is the cache's.", "Distillation",
                                        result=False)  # the cache's own identity, not its path, identifies the run
    token: bool = option(True, "Add the distillation token and its head (--no-token: the plain model). timm has it for its "
                         "DeiT models (deit_*, and deit3_* with their own position-embedding layout kept); other ViTs "
                         "(vit_*) have none and are refused with --token.", "Distillation", flag="--token/--no-token")
    init: Path | None = option(None, "Start from a pretrained DeiT: a checkpoint, timm/NAME.TAG, hf-hub:, local-dir: or a "
                               "weights file (its architecture in --model). The student takes its size; a missing "
                               "distillation token and head start as copies of the class token and head; the heads are "
                               "kept when the classes are the same.", "Model", result=False)  # its sha256 identifies the run

    stage = "student"


@dataclass
class FinetuneConfig(DistillFields, StageConfig):
    """`distill finetune`: FixRes fine-tune at a higher resolution, still distilling (DeiT fine-tune recipe)."""

    checkpoint: Path | None = option(None, "Student to fine-tune [default: the newest student in --workdir]; also "
                                     "timm/NAME.TAG, hf-hub:ORG/REPO, local-dir:PATH or a weights file with --model.",
                                     "Stage", result=False)
    model: str = option("", "timm architecture of a bare weights file given as --checkpoint.", "Stage", result=False)
    res: int | None = option(None, "Target resolution in pixels (a multiple of the patch size).", "Stage")
    teacher: Path | None = option(None, "Teacher at the target resolution [default: the student's teacher, adapted by FixRes].",
                                  "Distillation", result=False)
    no_teacher: bool = option(False, "Fine-tune on the labels alone.", "Distillation")
    teacher_epochs: int = option(3, "Epochs of the FixRes adaptation of the teacher (classifier and BatchNorm only).",
                                 "Distillation")
    teacher_lr: float | None = option(None, "Base learning rate (per 512) of the teacher's FixRes adaptation (SGD, momentum "
                                      "0.9, wd 1e-4) [default: auto, FixRes's 4e-3 at its global batch of 256, held below "
                                      "it].", "Distillation")
    teacher_bn: str = option("last", "BatchNorm layers the FixRes adaptation re-estimates and trains beside the classifier: "
                             "last (the one before the global pooling, as FixRes does) or all.", "Distillation",
                             choices=("last", "all"))
    distillation: str | None = option(None, "Distillation: none, soft, hard, feature, soft+feature or hard+feature [default: the student's; "
                                      "feature distillation learns a new projection].", "Distillation", choices=DISTILLATION_KINDS)
    alpha: float | None = option(None, "Weight of each teacher term [default: the student's].", "Distillation")
    tau: float | None = option(None, "Soft-distillation temperature [default: the student's].", "Distillation")
    feature_loss: str | None = option(None, "Feature distillation's loss, mse or cosine [default: the student's].",
                                      "Distillation", choices=FEATURE_LOSSES)
    # DeiT's 384 fine-tune (paper, section 6): 30 epochs, lr 5e-6 per 512, weight decay 1e-8, min lr 5e-6,
    # otherwise the training recipe.
    epochs: int = option(30, "Training epochs (DeiT's fine-tune: 30).", "Optimisation")
    lr: float | None = option(None, "BASE learning rate per global batch of 512 [default: auto, DeiT's fine-tune rate 1e-5 "
                              "at its global batch of 1024 (5e-6 per 512), scaled linearly above it and held below it].",
                              "Optimisation")
    min_lr: float = option(5e-6, "Final learning rate of the cosine schedule, at most the peak (DeiT's fine-tune: 5e-6).",
                           "Optimisation")
    weight_decay: float = option(1e-8, "Weight decay (DeiT's fine-tune: 1e-8).", "Optimisation")

    stage = "finetune"
    reference_lr = ReferenceRate(1e-5, 1024, "DeiT's fine-tune, 5e-6 per 512, at its global batch of 1024")

    def run_name(self) -> str:
        return self.name or "finetune"


@dataclass
class TransferConfig(DistillFields, StageConfig):
    """`distill transfer`: fine-tune a student on a new target (the authors' transfer settings)."""

    checkpoint: Path | None = option(None, "Model to transfer [default: the newest fine-tuned student, else the newest "
                                     "student]; also timm/NAME.TAG, hf-hub:ORG/REPO, local-dir:PATH or a weights file with "
                                     "--model.", "Stage", result=False)
    model: str = option("", "timm architecture of a bare weights file given as --checkpoint.", "Stage", result=False)
    teacher: Path | None = option(None, "A teacher trained on the target (make one with distill teach --dataset X --init CKPT).",
                                  "Distillation", result=False)
    attn_only: bool = option(False, "Train only the attention layers and the head(s).", "Stage")
    head_only: bool = option(False, "Train only the head(s): a linear probe.", "Stage")
    from_scratch: bool = option(False, "Re-initialise the model's weights (a baseline with the same architecture and budget).",
                                "Stage")
    distillation: str | None = option(None, "Distillation: none, soft, hard, feature, soft+feature or hard+feature [default: the parent's "
                                      "when it distilled and --teacher is given, else hard with --teacher, else none].",
                                      "Distillation", choices=DISTILLATION_KINDS)
    alpha: float | None = option(None, "Weight of each teacher term [default: the parent's, else 0.5].", "Distillation")
    tau: float | None = option(None, "Soft-distillation temperature [default: the parent's, else 1.0].", "Distillation")
    feature_loss: str | None = option(None, "Feature distillation's loss, mse or cosine [default: the parent's, else mse].",
                                      "Distillation", choices=FEATURE_LOSSES)
    # The authors' transfer settings (CIFAR-10, Cars): SGD lr 0.01 at batch 768, wd 1e-4,
    # no random erasing, no stochastic depth; 0.01 x 512 / 768 is the base value here.
    opt: str = option("sgd", "Optimizer (the authors' transfer runs: SGD).", "Optimisation")
    lr: float | None = option(None, "BASE learning rate per global batch of 512 [default: auto, the authors' SGD rate 0.01 at "
                              "their global batch of 768, scaled linearly above it and held below it].", "Optimisation")
    weight_decay: float = option(1e-4, "Weight decay (authors' transfer: 1e-4).", "Optimisation")
    reprob: float = option(0.0, "Random-erasing probability (authors' transfer: none).", "Augmentation")
    drop_path: float = option(0.0, "Stochastic-depth rate (authors' transfer: none).", "Model")

    stage = "transfer"
    reference_lr = ReferenceRate(0.01, 768, "the authors' transfer, SGD 0.01 at their global batch of 768")

    def run_name(self) -> str:
        if self.name:
            return self.name
        target = Path(self.data_dir).name if self.data_dir else (self.dataset or "target")
        return "transfer-" + target.replace("/", "_")


@dataclass
class FixResConfig(TeachConfig):
    """The FixRes adaptation of a teacher to a new resolution (made by `distill finetune`, no command of its own)."""

    bn: str = option("last", "BatchNorm layers re-estimated and trained beside the classifier: last or all.", "Model",
                     choices=("last", "all"))

    stage = "teach-fixres"
    reference_lr = ReferenceRate(4e-3, 256, "FixRes's SGD 8e-3 per 512, at its global batch of 256")


@dataclass
class CacheConfig(StageConfig):
    """`distill cache-teacher`: a teacher's top-k predictions on K augmented views of every training image."""

    teacher: Path | None = option(None, "Teacher checkpoint [default: runs/teach in --workdir].", "Stage", result=False)
    views: int | None = option(None, "Augmented views of each training image [default: --epochs, a fresh view for every "
                               "epoch of a student of that length].", "Stage")
    top_k: int = option(10, "Probabilities kept per view (the rest of the mass is spread evenly over the other classes).",
                        "Stage")
    epochs: int = option(15, "Epochs of the students the cache is for: the number of views by default, and with --profile "
                         "auto what chooses the augmentation, as it would for such a student.", "Stage")
    batch_size: int = option(128, "Batch size of the teacher's forward passes.", "Stage")
    shard_size: int = option(4096, "Views per shard file; a killed run resumes at the first shard not written.", "Stage")

    stage = "cache-teacher"
    # Settings of training that a cache does not use: not offered as flags.
    unused = ("opt", "lr", "lr_scale", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "momentum", "clip_grad",
              "ema", "ema_decay", "ema_warmup", "drop_path", "mixup", "cutmix", "mixup_switch_prob", "smoothing",
              "grad_accum", "save_every", "eval_every", "log_every", "repeated_aug", "model", "log_with",
              "img_size_schedule")

    def run_name(self) -> str:
        return self.name or "teacher-cache"


CONFIGS: dict[str, type[StageConfig]] = {
    "teach": TeachConfig, "student": StudentConfig, "finetune": FinetuneConfig, "transfer": TransferConfig,
    "cache-teacher": CacheConfig,
}


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


def _coerce(f: dataclasses.Field, kind: type, value: Any, where: str) -> Any:
    """Check one recipe value against its field's type, converting only what is unambiguous."""
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif kind is str:
        if isinstance(value, str):
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise DistillError(f"{where}: '{f.name}' must be one of {', '.join(choices)}, not '{value}'.")
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", Path: "a path (string)", str: "a string"}
    raise DistillError(f"{where}: '{f.name}' should be {names.get(kind, kind.__name__)}, not {value!r}.")


def check_keys(cls: type[StageConfig], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse unknown keys with the nearest valid one, and values of the wrong type."""
    known = {f.name: f for f in config_fields(cls)}
    kinds = field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(known))}."
            raise DistillError(f"{where}: unknown key '{key}' for stage '{cls.stage}'{hint}")
        checked[key] = _coerce(known[key], kinds[key], value, where)
    return checked


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DistillError(f"Recipe {path} does not exist.") from None
    except IsADirectoryError:
        raise DistillError(f"Recipe {path} is a folder, not a TOML file.") from None
    except tomllib.TOMLDecodeError as error:
        raise DistillError(f"Recipe {path} is not valid TOML: {error}.") from None


def check_recipe(recipe: dict[str, Any], where: str) -> None:
    """Refuse unknown sections and top-level keys that no stage takes, naming the nearest valid one."""
    every_key = {f.name for cls in CONFIGS.values() for f in config_fields(cls)}
    for key, value in recipe.items():
        if isinstance(value, dict):
            if key not in STAGES:
                near = difflib.get_close_matches(key, list(STAGES), n=1)
                hint = f"; did you mean [{near[0]}]?" if near else f"; sections are {', '.join(STAGES)}."
                raise DistillError(f"{where}: unknown section [{key}]{hint}")
        elif key not in every_key:
            near = difflib.get_close_matches(key, sorted(every_key), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "."
            raise DistillError(f"{where}: unknown key '{key}'{hint}")


def transfer_targets(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """[transfer] is one target; [transfer.NAME] tables are several, named."""
    section = recipe.get("transfer")
    if not section:
        return {}
    if all(isinstance(v, dict) for v in section.values()):
        return dict(section)
    return {"": dict(section)}


# Top-level keys a stage does not take from the shared part of a pipeline recipe: a fine-tune trains at its
# --res and a transfer keeps its parent's resolution, unless their own section says otherwise.
NOT_SHARED = {"finetune": {"img_size"}, "transfer": {"img_size"}}


def layer(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """`higher` over `lower`; a data source given above replaces the other kind of source given below."""
    merged = {**lower, **{k: v for k, v in higher.items() if v is not None}}
    for given, other in (("data_dir", "dataset"), ("dataset", "data_dir")):
        if higher.get(given) is not None and higher.get(other) is None:
            merged.pop(other, None)
    return merged


def stage_section(recipe: dict[str, Any], stage: str, target: str | None = None) -> dict[str, Any]:
    """The keys a stage takes from a recipe: the top-level keys it knows (shared by all stages) plus its
    own section. A flat file is a one-stage recipe; a file with [teach], [student], ... sections is a
    pipeline recipe, and any stage command can read its own part of it."""
    known = {f.name for f in config_fields(CONFIGS[stage])} - NOT_SHARED.get(stage, set())
    shared = {k: v for k, v in recipe.items() if not isinstance(v, dict) and k in known}
    if stage != "transfer":
        return layer(shared, recipe.get(stage, {}))
    targets = transfer_targets(recipe)
    if target in targets:
        own = targets[target]
    elif len(targets) > 1:
        raise DistillError(f"This recipe has several transfer targets ({', '.join(targets)}); pick one with "
                           "--dataset NAME, or run them all with `distill pipeline`.")
    else:
        own = next(iter(targets.values()), {})
    return layer(shared, own)


def resolve(cls: type[StageConfig], recipe_path: Path | None = None, overrides: dict[str, Any] | None = None,
            recipe_values: dict[str, Any] | None = None) -> StageConfig:
    """defaults <- recipe <- flags given on the command line (None means 'not given')."""
    values: dict[str, Any] = {}
    if recipe_path is not None:
        recipe = read_toml(Path(recipe_path))
        check_recipe(recipe, str(recipe_path))
        # A transfer recipe with several [transfer.NAME] targets: --dataset NAME picks one.
        target = (overrides or {}).get("dataset") if cls.stage == "transfer" else None
        values.update(check_keys(cls, stage_section(recipe, cls.stage, target), str(recipe_path)))
    if recipe_values:
        values = layer(values, check_keys(cls, recipe_values, "recipe"))
    values = layer(values, overrides or {})
    values = check_keys(cls, values, "command line") if overrides else values
    if values.get("img_size_schedule") and values.get("img_size") is None:  # the run ends at the schedule's last size
        from distill.training.schedule import parse_schedule

        values["img_size"] = parse_schedule(values["img_size_schedule"])[-1][1]
    config = cls(**values)
    validate(config)
    return config


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
        (config.num_workers >= 0, "--num-workers must not be negative."),
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
        (config.bce_target_thresh is None or config.loss == "bce", "--bce-target-thresh applies to --loss bce only."),
        (config.bce_target_thresh is None or 0 <= config.bce_target_thresh < 1, "--bce-target-thresh must be in [0, 1)."),
        (config.bce_target_thresh is None or config.smoothing == 0,
         f"--bce-target-thresh binarises the targets, which undoes --smoothing {config.smoothing} (or, below smoothing / "
         "classes, marks every class present); pass --smoothing 0 with it, as DeiT III does."),
        (not (((config.mixup or 0) > 0 or (config.cutmix or 0) > 0) and config.batch_size % 2),
         f"Mixup/CutMix need an even --batch-size, not {config.batch_size} (or pass --mixup 0 --cutmix 0)."),
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
        from distill.training.schedule import check_schedule
        from distill.training.tracking import tracker_names

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


def processes() -> int:
    """How many training processes this run has: torchrun and accelerate launch say so before any is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_rate(reference: ReferenceRate, global_batch: int) -> float:
    """The reference rate at the reference's own batch, scaled linearly above that batch and held below it.

    The linear rule (Goyal et al.; DeiT) is how the paper's recipes grow with the batch. Below the reference
    batch it would shrink an Adam rate toward nothing (DeiT's 5e-4 per 512 is 3.1e-5 at batch 32), and short
    runs at such rates barely learn (measured in docs/results.md); so it never scales down.
    """
    return reference.rate * max(1.0, global_batch / reference.batch)


def resolve_auto(config: StageConfig, world: int | None = None, train_size: int | None = None
                 ) -> tuple[StageConfig, list[str]]:
    """Fill the values left to `auto` (learning rate, regularisation profile) for this run, and say what was chosen.

    A function of the config, the number of processes and the training-set size (counted without decoding),
    so a dry run resolves exactly what the run will.
    """
    world = world or processes()
    updates: dict[str, Any] = {}
    notes: list[str] = []
    batch = config.global_batch(world)
    unused = getattr(config, "unused", ())
    if config.lr is None and "lr" not in unused:
        reference = config.reference_lr
        rate = auto_rate(reference, batch)
        updates["lr"] = rate * LR_REFERENCE_BATCH / batch if config.lr_scale else rate
        how = "scaled linearly above" if batch > reference.batch else "held at and below"
        notes.append(f"lr {rate:.3g} at global batch {batch} (auto: {reference.source}; {how} that batch)")
    profile, why = config.profile, "--profile"
    if profile == "auto":
        seen = config.epochs * train_size if train_size else None
        profile = "deit" if seen is not None and seen >= LONG_RUN_IMAGES else "short"
        why = (f"{config.epochs} epoch(s) x {train_size:,} images {'>=' if profile == 'deit' else '<'} "
               f"{LONG_RUN_IMAGES // 1_000_000}M" if seen is not None else "training-set size unknown before loading")
    chosen = {key: value for key, value in PROFILES[profile].items()
              if getattr(config, key, 0) is None and key not in unused}
    updates.update(chosen)
    if chosen:
        notes.append(f"{profile} profile ({why}): " + ", ".join(f"{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                                                                  else f"{key} {value}" for key, value in chosen.items()))
    resolved = dataclasses.replace(config, **updates)
    validate(resolved)
    return resolved, notes


def to_dict(config: StageConfig, result_only: bool = False) -> dict[str, Any]:
    """Plain values (paths as strings, None dropped): what goes into config.toml and checkpoint metadata."""
    out = {}
    for f in config_fields(type(config)):
        if result_only and not f.metadata.get("result", True):
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable 'key: old -> new' for the settings that change a run's result."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


def write_toml(path: Path, values: dict[str, Any]) -> None:
    from distill.weights.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, tomli_w.dumps(values).encode())
