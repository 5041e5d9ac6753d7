"""Students: timm ViTs (DeiT, DeiT III with LayerScale, ViT), with or without the distillation token, sized by the
flags; and any other timm classifier (convnets, hybrids) as timm builds it, without a token. Resolution changes, head
outputs, and the pre-logits features that feature distillation regresses."""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace
from typing import Any, Callable

import timm
import torch
from torch import nn

from distill.errors import DistillError
from distill.weights.models import builds_token, create, expand_short_name


SIZED = ("deit", "vision_transformer")  # timm modules whose models take the ViT sizing flags (patch, width, depth, heads)
SIZING_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads", "layer_scale")


def sized_vit(name: str) -> bool:
    """Whether a timm model is a plain ViT that the sizing flags build (timm's deit and vision_transformer modules)."""
    from timm.models import is_model_in_modules

    return is_model_in_modules(name, list(SIZED))


def default_token(model: str) -> bool:
    """--token left unset: the token for the models timm builds one for (deit_*, deit3_*), none for any other."""
    base = re.sub(r"_distilled", "", model)
    name = expand_short_name(base if timm.is_model(base) else model)
    return timm.is_model(name) and builds_token(name)


def student_model(model: str, token: bool) -> tuple[str, dict[str, Any]]:
    """timm's name for a student and the constructor arguments the token needs.

    Accepts a size (deit_tiny, deit3_small, vit_base) or any timm ViT name; the token choice wins over the
    name. A DeiT (deit_*) with the token is timm's own `deit_*_distilled_*` model; any other model of timm's
    DeiT module (deit3_*, LayerScale) gets it with `distilled=True`, timm's VisionTransformerDistilled with
    the model's own keys plus the token's. timm has no token for other ViTs (vit_*): asked for one, they are
    refused.
    """
    base = re.sub(r"_distilled", "", model)
    name = expand_short_name(base if timm.is_model(base) else model)
    if not token:
        return name, {}
    registered = re.sub(r"^(deit_(?:tiny|small|base))(_patch\d+_\d+)$", r"\1_distilled\2", name)
    if registered != name and timm.is_model(registered):
        return registered, {}
    if not builds_token(name):
        raise DistillError(f"timm's {name} has no distillation token (only its DeiT models, deit_* and deit3_*, have one); "
                           "pass --no-token (or leave --token unset), or choose a deit_* or deit3_* model.")
    return name, {"distilled": True}


def records_token(name: str, args: dict[str, Any]) -> bool:
    """Whether a recorded model (name and constructor arguments) has the distillation token."""
    return "distilled" in name or bool(args.get("distilled"))


def default_patch_size(img_size: int) -> int:
    """16 as in DeiT; below 128 px, img_size / 4 (a 4 x 4 grid of patches keeps small CPU runs fast), or where 4 does
    not divide the size, the largest patch that tiles it in a grid of 4 x 4 to 8 x 8 (30 px: patches of 6)."""
    if img_size >= 128:
        return 16
    fitting = [patch for patch in range(max(1, img_size // 4), 0, -1) if img_size % patch == 0 and img_size // patch <= 8]
    return fitting[0] if fitting else max(1, img_size // 4)


def off_grid(img_size: int, patch: int, chosen: bool = False) -> str:
    """Why a resolution does not fit a patch size, and the sizes around it that do."""
    why = " (chosen for this resolution; pass --patch-size to pick another)" if chosen else ""
    return (f"Resolution {img_size} is not a multiple of the patch size {patch}{why}; try --img-size "
            f"{max(patch, img_size // patch * patch)} or {(img_size // patch + 1) * patch}.")


def student_args(cfg: Any, num_classes: int | None, name: str | None = None) -> dict[str, Any]:
    """The timm constructor arguments of a ViT sized by a config (img_size, patch_size, embed_dim, depth,
    num_heads, layer_scale), checked before anything is built; for any other timm classifier (`name` not a sized
    ViT), its classes alone, the sizing flags refused."""
    if name is not None and timm.is_model(name) and not sized_vit(name):
        given = [key for key in SIZING_FLAGS if getattr(cfg, key, None) is not None]
        if given:
            raise DistillError(f"--{given[0].replace('_', '-')} sizes a ViT; {name} is built as timm defines it (choose "
                               "another timm model for another size).")
        return {"num_classes": num_classes}
    patch_size = cfg.patch_size or default_patch_size(cfg.img_size)
    if cfg.img_size % patch_size:
        raise DistillError(off_grid(cfg.img_size, patch_size, chosen=not cfg.patch_size))
    args: dict[str, Any] = {"num_classes": num_classes, "img_size": cfg.img_size, "patch_size": patch_size}
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, key, None) is not None:
            args[key] = getattr(cfg, key)
    if getattr(cfg, "layer_scale", None) is not None:
        args["init_values"] = cfg.layer_scale  # timm's name for LayerScale's initial value
    heads = args.get("num_heads")
    if args.get("embed_dim") and heads and args["embed_dim"] % heads:
        raise DistillError(f"Cannot build a DeiT with embed_dim {args['embed_dim']} and {heads} heads: the embedding width "
                           "must be divisible by the number of heads.")
    return args


def build_student(name: str, num_classes: int, img_size: int, *, patch_size: int | None = None,
                  embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
                  layer_scale: float | None = None, drop_path: float = 0.0, extra: dict[str, Any] | None = None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised ViT and the constructor arguments that rebuild it (`extra`: the token's)."""
    sizing = SimpleNamespace(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             layer_scale=layer_scale)
    args = {**student_args(sizing, num_classes, name), **(extra or {})}
    try:
        model = create(name, drop_path_rate=drop_path, **args)
    except AssertionError as error:  # timm asserts, e.g., that the width divides into the heads
        detail = str(error) or "the embedding width must be divisible by the number of heads"
        raise DistillError(f"Cannot build {name} with {args}: {detail}.") from None
    except TypeError as error:  # a model that takes none of these arguments
        raise DistillError(f"Cannot build {name} as a student with {args}: {error}.") from None
    return model, args


def has_dist_token(model: nn.Module) -> bool:
    return getattr(model, "dist_token", None) is not None


def set_distilled_training(model: nn.Module, enabled: bool) -> None:
    """Token models return (class logits, distillation logits) while training."""
    if has_dist_token(model):
        model.set_distilled_training(enabled)


def patch_size_of(model: nn.Module) -> int:
    return int(model.patch_embed.patch_size[0])


def resize(model: nn.Module, img_size: int) -> None:
    """Change a ViT's input resolution in place; the patch part of the position embeddings is
    resampled on its 2-D grid with bicubic interpolation (timm), the class/distillation token
    embeddings are kept as they are."""
    patch = patch_size_of(model)
    if img_size % patch:
        raise DistillError(off_grid(img_size, patch))
    model.set_input_size(img_size=(img_size, img_size))


def fit_deit_weights(weights: dict[str, torch.Tensor], model: nn.Module, keep_heads: bool) -> dict[str, torch.Tensor]:
    """A DeiT's weights, with or without the distillation token, made to fit the student `model`.

    A token the weights lack starts as a copy of the class token, with the class token's position
    embedding, and its head as a copy of the class head; a token the student lacks is dropped. The patch
    part of the position embeddings is resampled to the student's grid (timm's bicubic resampling). The
    heads are the student's own fresh ones unless `keep_heads` (same classes).
    """
    from timm.layers import resample_abs_pos_embed

    fitted = dict(weights)
    source_token, student_token = "dist_token" in weights, has_dist_token(model)
    prefix = 2 if source_token else 1
    position = weights["pos_embed"]
    cls_position, patch_position = position[:, :1], position[:, prefix:]
    dist_position = position[:, 1:2] if source_token else cls_position.clone()
    if student_token and not source_token:
        fitted["dist_token"] = weights["cls_token"].clone()
        for key in ("weight", "bias"):
            if f"head.{key}" in weights:
                fitted[f"head_dist.{key}"] = weights[f"head.{key}"].clone()
    if source_token and not student_token:
        fitted = {k: v for k, v in fitted.items() if k != "dist_token" and not k.startswith("head_dist.")}
    grid = tuple(model.patch_embed.grid_size)
    if patch_position.shape[1] != grid[0] * grid[1]:
        patch_position = resample_abs_pos_embed(patch_position, new_size=list(grid), num_prefix_tokens=0)
    fitted["pos_embed"] = torch.cat([cls_position] + ([dist_position] if student_token else []) + [patch_position], dim=1)
    own = model.state_dict()
    for name in [n for n in own if n.startswith(("head.", "head_dist."))]:
        if not keep_heads or name not in fitted or fitted[name].shape != own[name].shape:
            fitted[name] = own[name]
    return fitted


def named_outputs(model: nn.Module, images: torch.Tensor, fusion: str = "logits") -> dict[str, torch.Tensor]:
    """Scores per head for evaluation; the first entry is the headline prediction.

    A token model reports its class head, its distillation head and their fusion: by default the mean of their
    logits, which is what timm's forward (and the official code) computes, so an exported timm model predicts what
    was measured; `softmax` is the paper's text, the mean of the two probabilities (returned as log-probabilities).
    The two can rank classes differently.
    """
    if not has_dist_token(model):
        return {"top": model(images)}
    tokens = model.forward_features(images)
    cls_logits = model.head(tokens[:, 0])
    dist_logits = model.head_dist(tokens[:, 1])
    if fusion == "softmax":
        fused = ((cls_logits.float().softmax(-1) + dist_logits.float().softmax(-1)) / 2).clamp_min(1e-12).log()
    else:
        fused = (cls_logits + dist_logits) / 2
    return {"fused": fused, "cls": cls_logits, "dist": dist_logits}


def fused_outputs(fusion: str) -> Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]:
    """`named_outputs` with a token student's heads fused by `fusion` (a picklable function of model and images)."""
    return functools.partial(named_outputs, fusion=fusion)


def fusion_of(meta: dict[str, Any]) -> str:
    """How a checkpoint's token student fuses its heads: as recorded; imported timm weights as timm does (logits);
    distill students recorded before the choice existed as they were measured then (softmax)."""
    recorded = (meta.get("distillation") or {}).get("fusion")
    if recorded:
        return recorded
    return "logits" if meta.get("kind") == "pretrained" else "softmax"


def head_parameter_names(model: nn.Module) -> list[str]:
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    ids = {id(p) for head in heads for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def attention_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if re.search(r"^blocks\.\d+\.attn\.", n)]


def train_only(model: nn.Module, names: list[str]) -> None:
    """Freeze every parameter not named."""
    keep = set(names)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in keep)


class PreLogits:
    """The student's pre-logits features of the last training forward, for feature distillation.

    A forward pre-hook on the classifier catches its input, so the model, its outputs and timm's forward stay
    as they are (and a DDP-wrapped model works unchanged). A token model gives its distillation token's
    features (the token that learns from the teacher; the class token learns from the labels), any other
    model the input of its head. Caught in training mode only: evaluation keeps no tensor alive.
    """

    def __init__(self, model: nn.Module):
        head = model.head_dist if has_dist_token(model) else model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise DistillError(f"Feature distillation needs a linear classifier to read the features from; "
                               f"{type(model).__name__} has {type(head).__name__}.")
        self.dim = head.in_features
        self._features: torch.Tensor | None = None
        head.register_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            self._features = args[0]

    def take(self) -> torch.Tensor:
        """The features of the last training forward (each forward's are taken once)."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("no training forward of the student since the last features were taken")
        return features

    def __deepcopy__(self, memo: dict) -> "PreLogits":
        """A deep copy of the model (timm's EMA) keeps its own, empty catcher: never a copy of caught tensors."""
        copy = PreLogits.__new__(PreLogits)
        copy.dim, copy._features = self.dim, None
        return copy
