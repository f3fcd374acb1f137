"""Build the classifier a config names: the toy model, or any torchvision classifier with weights
by torchvision name, from a local state-dict file, or none.

Nothing here downloads unless the user names torchvision weights; a local state dict is loaded
with ``torch.load(..., weights_only=True)``, so a file cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from gig_dist.data.files import regular_file_problem
from gig_dist.settings import ConfigError

if TYPE_CHECKING:
    from gig_dist.config import Config, ModelConfig

if TYPE_CHECKING:
    from gig_dist.data.sources import TransformSpec

TOY = "toy"
#: Random weights (``model.weights: none``) are drawn from this seed, so that every stage and
#: worker builds the same model.
RANDOM_WEIGHTS_SEED = 0


def classifier_names() -> list[str]:
    """torchvision's image classifiers (not its detection/segmentation/video models)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    if name == TOY or name in classifier_names():
        return
    import difflib

    close = difflib.get_close_matches(name, classifier_names(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.name = {name!r} is neither 'toy' nor a torchvision classifier.{hint} "
        "(torchvision.models.list_models(module=torchvision.models) lists them all)"
    )


def is_weights_path(weights: str) -> bool:
    return any(sep in weights for sep in ("/", "\\")) or weights.endswith((".pt", ".pth", ".bin", ".ckpt"))


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
        hint = " (set model.num_classes to the head size of the file)" if any("fc" in k or "classifier" in k for k in mismatched) else ""
        raise ConfigError(f"model.weights: {path} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)


def build_model(config: ModelConfig) -> nn.Module:
    """The model in eval mode on the CPU, weights loaded as configured."""
    check_model_name(config.name)
    weights = config.weights
    if config.name == TOY:
        from gig_dist.toy.model import ToyResNet, shipped_weights_path

        with torch.random.fork_rng(devices=[]):  # random weights: the same in every process (below)
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = ToyResNet(**({"num_classes": config.num_classes} if config.num_classes else {}))
        if weights == "shipped":
            load_state_dict_file(model, shipped_weights_path())
        elif weights is not None:
            load_state_dict_file(model, Path(weights))
        return model.eval()

    kwargs = {"num_classes": config.num_classes} if config.num_classes else {}
    if weights is None:
        # Every stage and every worker builds the model itself: random weights must be the same
        # in each, whatever the process's RNG did before, or PFVs, codes and GIG would each come
        # from another model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return torchvision.models.get_model(config.name, weights=None, **kwargs).eval()
    if is_weights_path(weights):
        model = torchvision.models.get_model(config.name, weights=None, **kwargs)
        load_state_dict_file(model, Path(weights))
        return model.eval()
    # A torchvision weights name: downloads into the torch hub cache on first use.
    return torchvision.models.get_model(config.name, weights=resolve_torchvision_weights(config.name, weights)).eval()


def output_names(config: ModelConfig, num_outputs: int) -> list[str] | None:
    """Names of the model's outputs where the model says them: the toy world's classes, or a
    torchvision weights' categories. ``None`` where unknown (random or local weights)."""
    if config.name == TOY:
        from gig_dist.toy.world import CLASS_NAMES

        names = list(CLASS_NAMES)
    elif config.weights is not None and not is_weights_path(config.weights):
        names = list(resolve_torchvision_weights(config.name, config.weights).meta.get("categories") or [])
    else:
        return None
    return names if len(names) == num_outputs else None


def resolve_transform(config: Config) -> TransformSpec:
    """The input transform: the config's values where set, else the model's own defaults
    (torchvision weights' preprocessing; the toy world's size and statistics; else ImageNet's)."""
    from gig_dist.data.sources import TransformSpec

    if config.model.name == TOY:
        from gig_dist.toy.world import TOY_MEAN, TOY_STD

        size = config.dataset.toy.image_size
        resize, crop, mean, std = size, size, TOY_MEAN, TOY_STD
    else:
        resize, crop = 256, 224
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        weights = config.model.weights
        if weights is not None and not is_weights_path(weights):
            preset = resolve_torchvision_weights(config.model.name, weights).transforms()
            resize, crop = preset.resize_size[0], preset.crop_size[0]
            mean, std = tuple(preset.mean), tuple(preset.std)
    t = config.transform
    return TransformSpec(
        resize=t.resize or resize,
        crop=t.crop or crop,
        mean=tuple(t.mean or mean),
        std=tuple(t.std or std),
    )
