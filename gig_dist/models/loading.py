"""One model resolver for every process (the driver, local and Ray workers): the classifier a
config names, with its weights and its preprocessing.

``model.name`` takes

* ``toy``: the embedded toy-world ResNet (weights ``shipped`` in the package);
* a torchvision classifier name (``resnet50``), weights by torchvision name (``DEFAULT``,
  ``IMAGENET1K_V2``: downloaded once into the torch hub cache);
* ``timm:<name>`` (``pip install -e ".[timm]"``), weights ``pretrained`` (timm's own, from its
  hub cache);
* ``package.module:callable``: a factory of the user's, called with ``model.kwargs``, returning an
  ``nn.Module``.

``model.weights`` may also be a local state-dict file for any of them (loaded with
``torch.load(..., weights_only=True)``, so a file cannot run code; checkpoint wrappers and DDP
``module.`` prefixes are unwrapped; mismatches are named), or ``none``: random weights from a
fixed seed, the same in every process (for a factory: what it returns, built under that seed).

Preprocessing comes from the source where it knows it (torchvision weights' transforms, timm's
pretrained config, the toy world's); a factory's comes from the config's ``transform`` section,
and a factory without one is refused before any work: it is never guessed.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from gig_dist.data.files import regular_file_problem
from gig_dist.settings import ConfigError

if TYPE_CHECKING:
    from gig_dist.config import Config, ModelConfig
    from gig_dist.data.sources import TransformSpec

TOY = "toy"
TIMM = "timm:"
#: Random weights (``model.weights: none``) are drawn from this seed, so that every stage and
#: worker builds the same model.
RANDOM_WEIGHTS_SEED = 0
#: A factory: ``package.module:callable``.
_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")
#: Weight names that ask a source for its own pretrained weights.
TIMM_PRETRAINED = ("pretrained", "DEFAULT")


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``kind`` (toy, torchvision, timm or factory) and its ``name``
    there (a torchvision or timm model name, or ``package.module:callable``)."""

    kind: str
    name: str

    @property
    def factory_module(self) -> str | None:
        return self.name.split(":", 1)[0] if self.kind == "factory" else None


def classifier_names() -> list[str]:
    """torchvision's image classifiers (not its detection/segmentation/video models)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model.name = 'timm:...' needs timm: pip install -e \".[timm]\" (or pip install timm)") from None
    return timm


def source_of(name: str) -> Source:
    """Which source ``model.name`` names, checked (a name that exists nowhere is refused)."""
    if name == TOY:
        return Source("toy", name)
    if name.startswith(TIMM):
        timm_name = name[len(TIMM):]
        timm = _timm()
        if not timm.is_model(timm_name.split(".", 1)[0]):
            import difflib

            close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
            hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
            raise ConfigError(f"model.name = {name!r}: timm has no model {timm_name!r}.{hint} "
                              "(timm.list_models() lists them all)")
        return Source("timm", timm_name)
    if ":" in name:
        if not _FACTORY.fullmatch(name):
            raise ConfigError(f"model.name = {name!r} is not of the form package.module:callable (a factory), "
                              "timm:<name>, a torchvision classifier or 'toy'")
        return Source("factory", name)
    if name in classifier_names():
        return Source("torchvision", name)
    import difflib

    close = difflib.get_close_matches(name, classifier_names(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.name = {name!r} is neither 'toy', a torchvision classifier, timm:<name> nor package.module:callable."
        f"{hint} (torchvision.models.list_models(module=torchvision.models) lists torchvision's)"
    )


def check_model_name(name: str) -> None:
    source_of(name)


def is_weights_path(weights: str) -> bool:
    return any(sep in weights for sep in ("/", "\\")) or weights.endswith((".pt", ".pth", ".bin", ".ckpt",
                                                                             ".safetensors"))


def resolve_torchvision_weights(name: str, weights: str) -> torchvision.models.WeightsEnum:
    """``DEFAULT``/``IMAGENET1K_V2``/``ResNet50_Weights.IMAGENET1K_V2`` -> the weights enum (no download)."""
    enum = torchvision.models.get_model_weights(name)
    member = weights.split(".")[-1]
    if member == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[member]
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(
            f"model.weights = {weights!r} is not a weights name of {name}; valid: {valid}, "
            "a path to a local state-dict file, or none"
        ) from None


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept plain state dicts and the usual checkpoint wrappers ({'state_dict': ...}, DDP 'module.')."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"model.weights: {path} does not hold a state dict (a mapping of names to tensors)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    problem = regular_file_problem(path)
    if problem == "not found":
        raise ConfigError(f"model.weights: state-dict file not found: {path}")
    if problem:
        raise ConfigError(f"model.weights: {path} {problem}; give a state-dict file")
    if path.stat().st_size == 0:
        raise ConfigError(f"model.weights: {path} is empty (0 bytes); was its download or copy interrupted?")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe pickles
        reason = str(exc).strip() or type(exc).__name__
        raise ConfigError(f"model.weights: cannot load {path} as a state dict (weights_only=True): {reason}") from exc
    state = _unwrap_state_dict(loaded, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        heads = ("fc", "classifier", "head")
        hint = " (set model.num_classes to the head size of the file)" if any(
            h in k for k in mismatched for h in heads) else ""
        raise ConfigError(f"model.weights: {path} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(weights: str | None) -> str | None:
    """The SHA-256 of a local weights file (None for named, shipped or no weights, or a file
    that is not there: the model's own checks say so). Cached by path, size and mtime."""
    if weights is None or weights == "shipped" or not is_weights_path(weights):
        return None
    try:
        found = os.stat(weights)
    except OSError:
        return None
    if regular_file_problem(weights):
        return None
    return _file_digest(os.path.abspath(weights), found.st_size, found.st_mtime_ns)


def _factory(source: Source):
    module_name, _, attribute = source.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.name = {source.name!r}: cannot import {module_name}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model.name = {source.name!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model.name = {source.name!r}: {attribute} is a {type(target).__name__}, not a callable")
    return target


def _architecture(source: Source, config: ModelConfig, pretrained: bool) -> Any:
    kwargs = dict(config.kwargs)
    if config.num_classes:
        kwargs["num_classes"] = config.num_classes
    if source.kind == "toy":
        from gig_dist.toy.model import ToyResNet

        return ToyResNet(**kwargs)
    if source.kind == "torchvision":
        if pretrained:
            return torchvision.models.get_model(source.name, weights=resolve_torchvision_weights(
                source.name, config.weights), **{k: v for k, v in kwargs.items() if k != "num_classes"})
        return torchvision.models.get_model(source.name, weights=None, **kwargs)
    if source.kind == "timm":
        timm = _timm()
        try:
            return timm.create_model(source.name, pretrained=pretrained, **kwargs)
        except Exception as exc:  # noqa: BLE001 - timm raises many kinds; one line says which
            raise ConfigError(f"model.name = timm:{source.name}: timm could not build it "
                              f"({'with its pretrained weights, ' if pretrained else ''}kwargs {kwargs}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    factory = _factory(source)
    try:
        return factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is one line naming it
        raise ConfigError(f"model.name = {source.name!r}: the factory raised {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """The model in eval mode on the CPU, weights loaded as configured."""
    source = source_of(config.name)
    weights = config.weights
    named = weights is not None and weights != "shipped" and not is_weights_path(weights)
    if named and source.kind == "factory":
        raise ConfigError(f"model.weights = {weights!r}: a factory has no named weights; give a state-dict file, or "
                          "none (what the factory returns)")
    if named and source.kind == "timm" and weights not in TIMM_PRETRAINED:
        raise ConfigError(f"model.weights = {weights!r}: timm models take 'pretrained' (timm's own weights, from "
                          "its hub cache), a state-dict file, or none")
    with torch.random.fork_rng(devices=[]):  # random weights: the same in every process
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = _architecture(source, config, pretrained=named)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {config.name!r} returned a {type(model).__name__}, not a torch nn.Module")
    if source.kind == "toy" and weights == "shipped":
        from gig_dist.toy.model import shipped_weights_path

        load_state_dict_file(model, shipped_weights_path())
    elif weights is not None and is_weights_path(weights):
        load_state_dict_file(model, Path(weights))
    model.eval()
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:  # a module that overrides train()/eval(): BatchNorm and dropout would follow the batch
        raise ConfigError(f"model.name = {config.name!r}: {training[0]} stays in training mode after model.eval(); "
                          "gig-dist reads models in eval mode only")
    return model


def output_names(config: ModelConfig, num_outputs: int, model: nn.Module | None = None) -> list[str] | None:
    """Names of the model's outputs where the model says them: the toy world's classes, a
    torchvision weights' categories, ImageNet's for timm's pretrained 1000-class models, or a
    model's own ``class_names`` attribute (a factory may set it). ``None`` where unknown."""
    source = source_of(config.name)
    names: list[str] | None = None
    if model is not None and isinstance(getattr(model, "class_names", None), (list, tuple)):
        names = [str(n) for n in model.class_names]
    elif source.kind == "toy":
        from gig_dist.toy.world import CLASS_NAMES

        names = list(CLASS_NAMES)
    elif source.kind == "torchvision" and config.weights is not None and not is_weights_path(config.weights):
        names = list(resolve_torchvision_weights(source.name, config.weights).meta.get("categories") or [])
    elif source.kind == "timm" and config.weights in TIMM_PRETRAINED and num_outputs == 1000:
        from gig_dist.data.labels import imagenet_names

        names = imagenet_names()
    return names if names is not None and len(names) == num_outputs else None


@dataclass(frozen=True)
class Preprocessing:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


def source_preprocessing(config: Config) -> Preprocessing | None:
    """The preprocessing the model's source knows (None: it knows none, a factory)."""
    source = source_of(config.model.name)
    weights = config.model.weights
    if source.kind == "toy":
        from gig_dist.toy.world import TOY_MEAN, TOY_STD

        size = config.dataset.toy.image_size
        return Preprocessing(size, size, TOY_MEAN, TOY_STD)
    if source.kind == "torchvision":
        if weights is not None and not is_weights_path(weights):
            preset = resolve_torchvision_weights(source.name, weights).transforms()
            return Preprocessing(preset.resize_size[0], preset.crop_size[0], tuple(preset.mean), tuple(preset.std),
                                 str(preset.interpolation.value))
        return Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's classic
    if source.kind == "timm":
        timm = _timm()
        cfg = timm.get_pretrained_cfg(source.name) or {}
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        crop = int((cfg.get("input_size") or (3, 224, 224))[-1])
        return Preprocessing(math.floor(crop / float(cfg.get("crop_pct") or 0.875)), crop,
                             tuple(cfg.get("mean") or (0.485, 0.456, 0.406)), tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
                             str(cfg.get("interpolation") or "bilinear"))
    return None


def resolve_transform(config: Config) -> TransformSpec:
    """The input transform: the config's values where set, else the model source's own (see
    :func:`source_preprocessing`); a model whose source knows none needs all four in the config."""
    from gig_dist.data.sources import TransformSpec

    t = config.transform
    known = source_preprocessing(config)
    if known is None:
        missing = [key for key in ("resize", "crop", "mean", "std") if getattr(t, key) is None]
        if missing:
            raise ConfigError(f"model.name = {config.model.name!r}: its preprocessing is not known to gig-dist; set "
                              f"{', '.join('transform.' + key for key in missing)} (and transform.interpolation) as "
                              "the model was trained with")
        known = Preprocessing(t.resize, t.crop, t.mean, t.std)
    return TransformSpec(
        resize=t.resize or known.resize,
        crop=t.crop or known.crop,
        mean=tuple(t.mean or known.mean),
        std=tuple(t.std or known.std),
        interpolation=t.interpolation or known.interpolation,
    )
