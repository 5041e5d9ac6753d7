"""Pretrained weights in: timm's model sources and local weights files, imported once as distill checkpoints.

Wherever a checkpoint is accepted, `open_source` also takes

    timm/NAME.TAG          a timm pretrained tag, weights from the Hugging Face hub (e.g. timm/regnety_160.deit_in1k)
    hf-hub:ORG/REPO[@REV]  a timm model folder on the hub (config.json + weights)
    local-dir:PATH         the same folder on disk (what `distill export` writes); a plain folder path works too
    FILE + --model NAME    a safetensors, .pth or .bin weights file (pickles read only with weights_only=True)

and writes the result once, deterministically, as a distill checkpoint under the import cache
($DISTILL_CACHE, default ~/.cache/distill): the architecture and its arguments, the class names (the model's
own, else timm's ImageNetInfo), the preprocessing from its pretrained_cfg, and the source with its revision or
the weights' sha256. Every later stage, `info`, `evaluate` and `export` then read an ordinary checkpoint.
Hub downloads go through huggingface_hub, so its cache and HF_HUB_OFFLINE apply; no remote code ever runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open

from distill.weights.checkpoint import (FORMAT, MODEL_FILE, Checkpoint, atomic_path, file_sha256, read_checkpoint,
                               save_checkpoint)
from distill.errors import DistillError
from distill.console import listing

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# The weights files timm's own local-dir loader looks for, in its order.
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# The paper's distilled DeiTs were distilled (hard, with the token) from RegNetY-16GF: what `distill finetune`
# needs to keep distilling them, adapted to the new resolution by FixRes.
PAPER_TEACHER = "timm/regnety_160.deit_in1k"
PAPER_DISTILLED = re.compile(r"deit_(tiny|small|base)_distilled_patch16_(224|384)\.fb_in1k")


def cache_root() -> Path:
    """Where imported checkpoints live: $DISTILL_CACHE, else $XDG_CACHE_HOME/distill, else ~/.cache/distill."""
    if os.environ.get("DISTILL_CACHE"):
        return Path(os.environ["DISTILL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "distill"


@dataclass
class Source:
    """A pretrained model named by the user, before import."""

    kind: str  # timm | hf-hub | local-dir | file
    ident: str  # NAME.TAG | ORG/REPO[@REV] | folder | file
    model: str | None = None  # the architecture of a raw weights file

    @property
    def spec(self) -> str:
        return {"timm": f"timm/{self.ident}", "hf-hub": f"hf-hub:{self.ident}", "local-dir": f"local-dir:{self.ident}",
                "file": self.ident}[self.kind]


@dataclass
class Resolved:
    """A source made local: the files to read, and what to record about where they came from."""

    arch: str
    pretrained_cfg: dict[str, Any]
    model_args: dict[str, Any]
    weights: Path
    record: dict[str, Any]
    slug: str
    tag: str | None = None


def is_distill_checkpoint(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def readable_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def parse_source(spec: str | Path, model: str | None = None) -> Source | None:
    """The pretrained source `spec` names, or None when it is (or should be) a distill checkpoint."""
    text = str(spec)
    for prefix, kind in (("hf-hub:", "hf-hub"), ("hf_hub:", "hf-hub"), ("local-dir:", "local-dir")):
        if text.startswith(prefix):
            if not text[len(prefix):]:
                raise DistillError(f"'{text}' names no {kind} model after the prefix.")
            return Source(kind, text[len(prefix):])
    path = Path(text).expanduser()
    if text.startswith("timm/") and not path.exists():
        return Source("timm", text[len("timm/"):])
    if path.is_dir():
        own = path / MODEL_FILE
        if (path / "config.json").is_file() and not (own.is_file() and is_distill_checkpoint(own)):
            return Source("local-dir", str(path))  # a timm model folder, e.g. written by `distill export`
        return None
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES and not is_distill_checkpoint(path):
        if path.suffix == ".safetensors" and model is None and not readable_safetensors(path):
            return None  # read as a distill checkpoint, which names the damage
        return Source("file", str(path), model)
    return None


def open_source(spec: str | Path, *, model: str | None = None, role: str = "checkpoint",
                expect_kind: str | None = None) -> Checkpoint:
    """The one way every command opens a model: a distill checkpoint as it is, any other source imported
    (once) into one."""
    source = parse_source(spec, model)
    if source is None:
        return read_checkpoint(spec, expect_kind=expect_kind, role=role)
    return read_checkpoint(import_source(source, role=role), expect_kind=expect_kind, role=role)


def import_weights(spec: str | Path, model: str | None = None, to: Path | None = None) -> Checkpoint:
    """`distill import`: the checkpoint of a pretrained source, in the import cache and, with `to`, copied there."""
    source = parse_source(spec, model)
    if source is None:
        path = Path(spec)
        if not path.exists():
            raise DistillError(f"{spec} is neither a file or folder nor a source (timm/NAME.TAG, hf-hub:ORG/REPO, "
                               "local-dir:PATH).")
        raise DistillError(f"{spec} is a distill checkpoint already; there is nothing to import.")
    imported = import_source(source, role="source")
    if to is None:
        return read_checkpoint(imported)
    target = Path(to) / MODEL_FILE if Path(to).is_dir() or not Path(to).suffix else Path(to)
    with atomic_path(target) as tmp:
        shutil.copyfile(imported, tmp)
    return read_checkpoint(target)


def import_source(source: Source, role: str = "checkpoint") -> Path:
    """Write the distill checkpoint of a pretrained source (or find it already written); returns its path."""
    from filelock import FileLock

    resolved = resolve(source, role)
    target = cache_root() / "imports" / resolved.slug / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / ".import.lock"
    try:
        with FileLock(str(lock)):  # several processes planning the same run import once
            if target.is_file() and is_distill_checkpoint(target):
                existing = read_checkpoint(target)
                if existing.meta.get("source") == resolved.record:
                    return target
            model = build(resolved, role)
            save_checkpoint(target, model.state_dict(), describe(resolved, model))
    except BaseException:
        if not target.exists():  # a failed import leaves no empty folder behind
            lock.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                target.parent.rmdir()
        raise
    return target


# -- resolving each kind of source to local files -------------------------------------------------------
def resolve(source: Source, role: str) -> Resolved:
    if source.kind == "timm":
        return _resolve_timm(source, role)
    if source.kind == "hf-hub":
        return _resolve_hub(source, role)
    if source.kind == "local-dir":
        return _resolve_folder(source, role)
    return _resolve_file(source, role)


def _slug(*parts: str) -> str:
    return "--".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("_") for p in parts if p)


def _hub_download(repo: str, filenames: tuple[str, ...], revision: str | None, spec: str, role: str) -> Path:
    """The first of `filenames` the hub repository has, through huggingface_hub (its cache, HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    unreachable = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hub_cache(),
                                        local_files_only=hub_offline()))
        except LocalEntryNotFoundError as error:  # offline, or the hub unreachable, and not in the cache
            unreachable = unreachable or error
        except EntryNotFoundError:
            continue
        except GatedRepoError:
            raise DistillError(f"The {role} {spec} is gated on the Hugging Face hub; accept its terms on the hub and log "
                               "in with `hf auth login`.") from None
        except RevisionNotFoundError:
            raise DistillError(f"The {role} {spec}: the hub repository {repo} has no revision '{revision}'.") from None
        except RepositoryNotFoundError:
            raise DistillError(f"The {role} {spec}: the Hugging Face hub has no repository {repo} (or it is private; "
                               "log in with `hf auth login`).") from None
        except (OSError, ValueError) as error:  # connection errors below huggingface_hub
            unreachable = unreachable or error
    if unreachable is not None:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub cannot be reached"
        raise DistillError(f"Cannot load the {role} {spec}: {why} and {repo} is not in the Hugging Face cache "
                           f"({hub_cache()}). Offline, give it another way: the cache (download it once where there is "
                           "a connection, with HF_HOME pointing here), a timm model folder as local-dir:PATH, or a "
                           "weights file with --model NAME.")
    raise DistillError(f"The {role} {spec}: the hub repository {repo} has none of {', '.join(filenames)}.")


def hub_cache() -> str:
    """The Hugging Face hub cache, as HF_HUB_CACHE or HF_HOME say when called (huggingface_hub reads them once, at
    import), so the environment a command runs in decides."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if flag is None else flag.strip().lower() in ("1", "true", "yes", "on")


def _revision_of(downloaded: Path) -> str:
    """The commit a hub download came from: its snapshot folder in the cache."""
    return downloaded.parent.name if downloaded.parent.parent.name == "snapshots" else "unknown"


def _resolve_timm(source: Source, role: str) -> Resolved:
    arch, _ = timm.models.split_model_name_tag(source.ident)
    if not timm.is_model(arch):
        raise DistillError(f"The {role} {source.spec}: timm has no model named '{arch}'.")
    try:
        cfg = timm.models.get_pretrained_cfg(source.ident, allow_unregistered=False)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise DistillError(f"The {role} {source.spec}: timm has no pretrained weights '{source.ident}'"
                           + (f" (tags: {listing(tags)})." if tags else "; this architecture has none.")) from None
    if not cfg.hf_hub_id:
        raise DistillError(f"The {role} {source.spec}: timm keeps these weights outside the Hugging Face hub; download "
                           f"the file and pass it with --model {arch}.{cfg.tag}.")
    repo, revision = timm.models._hub.hf_split(cfg.hf_hub_id)
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS
    weights = _hub_download(repo, names, revision, source.spec, role)
    rev = _revision_of(weights)
    record = {"source": f"timm/{arch}.{cfg.tag}", "type": "timm", "repo": repo, "revision": rev, "file": weights.name,
              "sha256": file_sha256(weights)}
    return Resolved(arch, dataclasses.asdict(cfg), {}, weights, record, _slug("timm", f"{arch}.{cfg.tag}", rev[:12]),
                    tag=cfg.tag)


def _from_config(config_dir: Path, spec: str, role: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    from timm.models._hub import load_model_config_from_path

    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(config_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DistillError(f"The {role} {spec} has no readable timm config.json ({error}).") from None
    if not timm.is_model(arch):
        raise DistillError(f"The {role} {spec} is a '{arch}', which this timm ({timm.__version__}) does not know; it may "
                           "need a newer timm.")
    return pretrained_cfg, arch, dict(model_args or {})


def _resolve_hub(source: Source, role: str) -> Resolved:
    repo, revision = timm.models._hub.hf_split(source.ident)
    config = _hub_download(repo, ("config.json",), revision, source.spec, role)
    rev = _revision_of(config)
    weights = _hub_download(repo, HUB_WEIGHTS, rev if rev != "unknown" else revision, source.spec, role)
    pretrained_cfg, arch, model_args = _from_config(config.parent, source.spec, role)
    record = {"source": f"hf-hub:{repo}", "type": "hf-hub", "repo": repo, "revision": rev, "file": weights.name,
              "sha256": file_sha256(weights)}
    return Resolved(arch, pretrained_cfg, model_args, weights, record, _slug("hf-hub", repo, rev[:12]))


def _resolve_folder(source: Source, role: str) -> Resolved:
    folder = Path(source.ident).expanduser()
    if not folder.is_dir():
        raise DistillError(f"The {role} {source.spec} is not a folder.")
    pretrained_cfg, arch, model_args = _from_config(folder, source.spec, role)
    weights = next((folder / n for n in PREFERRED_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        found = sorted(p for suffix in (".safetensors", ".pth", ".bin") for p in folder.glob(f"*{suffix}"))
        if len(found) != 1:
            raise DistillError(f"The {role} {source.spec} holds {'no' if not found else 'several'} weights files; it needs "
                               f"one, named {PREFERRED_WEIGHTS[0]}.")
        weights = found[0]
    digest = file_sha256(weights)
    config_digest = file_sha256(folder / "config.json")
    record = {"source": f"local-dir:{folder.resolve()}", "type": "local-dir", "file": weights.name, "sha256": digest,
              "config_sha256": config_digest}
    key = hashlib.sha256(f"{digest}{config_digest}".encode()).hexdigest()
    return Resolved(arch, pretrained_cfg, model_args, weights, record, _slug("local-dir", folder.name, key[:16]))


def _resolve_file(source: Source, role: str) -> Resolved:
    path = Path(source.ident).expanduser()
    if not source.model:
        raise DistillError(f"The {role} {path} is a bare weights file: name its timm architecture with --model (for "
                           "--teacher: --teacher-model), e.g. --model regnety_160.deit_in1k.")
    arch, _ = timm.models.split_model_name_tag(source.model)
    if not timm.is_model(arch):
        raise DistillError(f"timm has no model named '{arch}' (given with --model for {path}).")
    try:  # the tag's (or the default tag's) preprocessing; a file's own classes are counted from its classifier
        cfg = timm.models.get_pretrained_cfg(source.model)
    except RuntimeError:
        raise DistillError(f"timm has no pretrained tag '{source.model}' (given with --model for {path}).") from None
    digest = file_sha256(path)
    record = {"source": str(path.resolve()), "type": "file", "model": source.model, "sha256": digest}
    return Resolved(arch, dataclasses.asdict(cfg) if cfg else {}, {}, path, record,
                    _slug("file", path.stem, source.model, digest[:16]), tag=cfg.tag if cfg else None)


# -- building the model and describing it -----------------------------------------------------------------
def read_weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors, or a pickle read with weights_only=True (never arbitrary objects)."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), weights_only=True)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, SafetensorError) as error:
        pickled = "weights_only" in str(error) or "Unpickl" in type(error).__name__ or "pickle" in str(error).lower()
        if pickled:
            raise DistillError(f"The {role} {path} holds Python objects beside its tensors, and distill reads pickles only "
                               "with weights_only=True; save its state_dict alone (or as safetensors) and pass that.") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(f"The {role} {path} cannot be read as weights ({first}).") from None


def _classifier_size(arch: str, model_args: dict[str, Any], weights: dict[str, torch.Tensor]) -> int | None:
    """How many classes a state dict's classifier has (None when it has none timm can name)."""
    probe = timm.create_model(arch, pretrained=False, **model_args)
    heads = probe.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    ids = {id(p) for h in heads for p in h.parameters()}
    for name, parameter in probe.named_parameters():
        if id(parameter) in ids and parameter.ndim >= 2 and name in weights:
            return int(weights[name].shape[0])
    return None


def build(resolved: Resolved, role: str) -> torch.nn.Module:
    """The timm model with the source's weights, loaded by timm (its checkpoint filter, strict)."""
    cfg = {k: v for k, v in resolved.pretrained_cfg.items() if k in {f.name for f in dataclasses.fields(
        timm.models.PretrainedCfg)}}
    args = dict(resolved.model_args)
    weights = read_weights(resolved.weights, role)
    if resolved.record["type"] == "file":
        classes = _classifier_size(resolved.arch, args, weights)
        if classes is not None:
            args["num_classes"] = classes
    cfg.update(source="", state_dict=weights, file=None, url=None, hf_hub_id=None, num_classes=args.get(
        "num_classes", cfg.get("num_classes", 1000)), architecture=resolved.arch)
    args.setdefault("num_classes", cfg["num_classes"])
    try:
        model = timm.create_model(resolved.arch, pretrained=True, pretrained_cfg=cfg, **args)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2])[:300]  # torch's heading and its first mismatch
        raise DistillError(f"The weights of the {role} {resolved.record['source']} do not fit timm's {resolved.arch} "
                           f"({detail}); check --model.") from None
    model.pretrained_cfg = {**model.pretrained_cfg, "state_dict": None}
    return model.eval()


def class_names(model: torch.nn.Module, cfg: dict[str, Any]) -> tuple[list[str], list[str] | None, str]:
    """(class names, class ids or None, where they came from): the model's own label names, else timm's
    ImageNetInfo when the classifier has an ImageNet subset's size, else the class indices.

    ImageNet classes are named by their WordNet lemmas ("tench, Tinca tinca"), the names the Hugging Face
    imagenet-1k dataset's labels carry, and identified by their synsets (n01440764), the folder names of an
    ImageNet image folder: a dataset matches the model by either.
    """
    from timm.data import ImageNetInfo, infer_imagenet_subset

    count = int(model.num_classes)
    names = list(cfg.get("label_names") or [])
    subset = infer_imagenet_subset(model)
    info = ImageNetInfo(subset) if subset else None
    if names and len(names) == count:
        if info is not None and names == list(info.label_names()):
            return list(info.label_descriptions()), names, f"timm ImageNetInfo ({subset})"
        descriptions = cfg.get("label_descriptions") or {}
        if descriptions:
            return [descriptions.get(n, n) for n in names], names, "the model's label names and descriptions"
        return names, None, "the model's label names"
    if info is not None and info.num_classes() == count:
        return list(info.label_descriptions()), list(info.label_names()), f"timm ImageNetInfo ({subset})"
    return [str(i) for i in range(count)], None, "class indices (the weights name no classes)"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_args_of(model: torch.nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments that rebuild the model; a ViT's resolution and patch size always among them,
    since later stages read them."""
    args = {**given, "num_classes": int(model.num_classes)}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(model, "pos_embed"):
        args["img_size"] = int(patch_embed.img_size[0])
        args["patch_size"] = int(patch_embed.patch_size[0])
    return _jsonable(args)


def describe(resolved: Resolved, model: torch.nn.Module) -> dict[str, Any]:
    """The imported checkpoint's header: what, from where, with which classes and preprocessing."""
    from timm.data import resolve_data_config

    from distill.data.transforms import norm_name

    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    data = resolve_data_config({}, model=model)
    classes, ids, how = class_names(model, cfg)
    size = int(data["input_size"][-1])
    mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
    subset = how.split("(")[-1].rstrip(")") if how.startswith("timm ImageNetInfo") else None
    record = {"dataset": "imagenet-1k" if subset == "imagenet-1k" else None, "data_dir": None, "classes": classes,
              "class_ids": ids, "class_source": how, "kept_classes": False, "img_size": size,
              "crop_pct": float(data["crop_pct"]), "interpolation": data["interpolation"], "norm": norm_name(mean, std),
              "mean": mean, "std": std, "input_size": list(data["input_size"])}
    pretrained = {k: cfg.get(k) for k in ("architecture", "tag", "hf_hub_id", "license", "origin_url", "paper_ids",
                                          "input_size", "crop_pct", "interpolation", "mean", "std", "num_classes")
                  if cfg.get(k) is not None}
    name = f"{resolved.arch}.{resolved.tag}" if resolved.tag else resolved.arch
    meta: dict[str, Any] = {
        "kind": "pretrained", "stage": "import", "created": "",  # deterministic: the same source imports to the same file
        "model": {"name": resolved.arch, "args": model_args_of(model, resolved.model_args)},
        "params": sum(p.numel() for p in model.parameters()), "data": record, "source": resolved.record,
        "pretrained_cfg": _jsonable(pretrained), "parent": None, "teacher": None, "metrics": {}, "config": {},
    }
    if PAPER_DISTILLED.fullmatch(name):
        meta["distillation"] = {"kind": "hard", "alpha": 0.5, "tau": 1.0, "token": True}
        meta["teacher"] = {"source": PAPER_TEACHER, "stage": "import", "model": "regnety_160",
                           "note": "the paper's teacher (RegNetY-16GF, 82.9 %); imported when a stage needs it"}
    return meta
