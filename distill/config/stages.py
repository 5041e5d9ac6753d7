"""Each stage's own fields: one dataclass per command (and the FixRes teacher, which has none)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.choices import DISTILLATION_KINDS, FEATURE_LOSSES
from distill.config.fields import ArchFields, DistillFields, ReferenceRate, StageConfig, option

STAGES = ("teach", "student", "finetune", "transfer")


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
                        "LayerScale; vit_small, ...), any timm ViT name, or any other timm classifier (resnet50, "
                        "mobilenetv3_large_100, convnext_atto, ...: built as timm defines it, no token).", "Model")
    teacher: list[Path] | None = option(None, "Teacher checkpoint [default: runs/teach in --workdir]; repeat it for "
                                        "several teachers, each reading the batch at its own resolution and "
                                        "normalisation: the student learns from the mean of their probabilities (soft) "
                                        "or its top class (hard).", "Distillation", result=False)
    teacher_cache: Path | None = option(None, "Train from a teacher cache (`distill cache-teacher`) instead of running the "
                                        "teacher: no teacher forward at all; the augmentation is the cache's.", "Distillation",
                                        result=False)  # the cache's own identity, not its path, identifies the run
    token: bool | None = option(None, "Add the distillation token and its head (--no-token: the plain model) [default: "
                                "on for the models timm has it for, its DeiT models deit_* and deit3_*; off for any "
                                "other, which --token refuses].", "Distillation", flag="--token/--no-token")
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
    img_size: int | None = option(None, "Target resolution in pixels (a multiple of the patch size).", "Stage")
    res: int | None = option(None, "The target resolution: the older spelling of --img-size.", "Stage", hidden=True)
    teacher: Path | None = option(None, "Teacher at the target resolution [default: the student's teacher, adapted by FixRes].",
                                  "Distillation", result=False)
    no_teacher: bool = option(False, "Fine-tune on the labels alone.", "Distillation")
    teacher_epochs: int = option(3, "Epochs of the FixRes adaptation of the teacher (classifier and BatchNorm only).",
                                 "Distillation")
    teacher_lr: float | None = option(None, "Base learning rate (per 512) of the teacher's FixRes adaptation (SGD, momentum "
                                      "0.9, wd 1e-4) [default: auto, FixRes's 4e-3 at its global batch of 256, held below "
                                      "it].", "Distillation")
    teacher_bn: str = option("last", "BatchNorm layers the FixRes adaptation re-estimates and trains beside the classifier: "
                             "last (the one before the global pooling, as FixRes does), all, or full (every layer "
                             "trains: FixRes's full fine-tuning).", "Distillation", choices=("last", "all", "full"))
    bn: str | None = option(None, "A convnet student: FixRes's adaptation at the new resolution on test-time preprocessing, "
                            "the classifier and these BatchNorm layers trained: last (the one before the global "
                            "pooling), all, or full (every layer trains, with the training augmentation: FixRes's full "
                            "fine-tuning) [default: last; a ViT student always trains every layer].", "Stage",
                            choices=("last", "all", "full"))
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

    bn: str = option("last", "BatchNorm layers re-estimated and trained beside the classifier: last, all, or full (every "
                     "layer trains).", "Model", choices=("last", "all", "full"))

    stage = "teach-fixres"
    reference_lr = ReferenceRate(4e-3, 256, "FixRes's SGD 8e-3 per 512, at its global batch of 256")


@dataclass
class CacheConfig(StageConfig):
    """`distill cache-teacher`: a teacher's top-k predictions on K augmented views of every training image."""

    teacher: list[Path] | None = option(None, "Teacher checkpoint [default: runs/teach in --workdir]; repeat it for "
                                        "several teachers: the cache keeps the mean of their probabilities.", "Stage",
                                        result=False)
    teacher_res: str = option("student", "Resolution each teacher reads the views at: student (the views' own "
                              "--img-size), teacher (resized on the device to each teacher's training resolution) or "
                              "a number of pixels.", "Stage")
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
              "img_size_schedule", "global_batch", "sync_bn")

    def run_name(self) -> str:
        return self.name or "teacher-cache"


CONFIGS: dict[str, type[StageConfig]] = {
    "teach": TeachConfig, "student": StudentConfig, "finetune": FinetuneConfig, "transfer": TransferConfig,
    "cache-teacher": CacheConfig,
}
