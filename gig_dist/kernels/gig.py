"""Generalized Integrated Gradients (docs/method.md section 6): attributions of the concepts of a source
tap ``a`` to the concepts of a later tap ``b``, or to the logits.

For one image with codes ``U`` (positions x K_a) at tap ``a`` and its reconstruction
``X~ = U V_a``, the inputs ``alpha * X~`` run through ``F_ab``, the sub-network between the taps,
for ``alpha`` at the ``M`` quadrature points of [0, 1]. For each target ``m``::

    GIG(k -> m) = sum_p u_pk * (1/M) sum_s <dS_m/dX~_p (alpha_s X~), v_k>

with ``S_m = sum_q <a^b_q, v^b_m>`` (a target concept) or the logit ``y_m`` (a class). One
backward pass per step gives every source concept; all targets share each forward pass, their
gradients batched as cotangents on GPUs (``torch.autograd.grad(is_grads_batched=True)``), one
backward pass per target on CPUs (faster there). For concept
targets the cotangents are the target concept vectors applied to ``s = sum_q a^b_q``; when the
targets outnumber the channels of ``b``, the Jacobian of ``s`` (C_b rows) is taken once instead
and projected onto the targets.

Completeness: ``sum_k GIG(k -> m) = S_m(F(X~)) - S_m(F(0))`` up to quadrature error; the kernel
returns both sides when asked (``endpoints=True``).

The sum over steps is additive: ``step_range`` selects any subset of the ``M`` steps, and the
partial results of disjoint ranges add up to the full one. Images are processed one at a time
(the steps form the batch), so an image's result never depends on which other images share its
work unit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gig_dist.kernels.taps import TapLayout

LOGITS = "logits"
RULES = ("midpoint", "left", "right", "power")
#: The ``power`` rule's exponent: midpoints ``t`` of [0, 1], ``alpha = t ** POWER``.
POWER = 4


class GIGError(ValueError):
    """A pair of taps, targets or steps that GIG cannot attribute."""


def step_alphas(steps: int, rule: str = "midpoint") -> torch.Tensor:
    """The ``M`` quadrature points of [0, 1] (float64). ``midpoint``, ``left`` and ``right``
    space them evenly, each of weight ``1 / M``; ``power`` puts them at ``t ** 4`` for the even
    midpoints ``t``, dense near the baseline (:func:`step_weights`)."""
    if steps < 1:
        raise GIGError(f"steps = {steps}: GIG needs at least 1 integration step")
    if rule not in RULES:
        raise GIGError(f"rule = {rule!r}: use one of {', '.join(RULES)}")
    if rule == "power":
        return ((torch.arange(steps, dtype=torch.float64) + 0.5) / steps) ** POWER
    offset = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[rule]
    return (torch.arange(steps, dtype=torch.float64) + offset) / steps


def step_weights(steps: int, rule: str = "midpoint") -> torch.Tensor | None:
    """Each step's weight times ``M`` (float64), or None where every step weighs ``1 / M``.

    ``power`` is the midpoint rule after the substitution ``alpha = t^4`` (``d alpha = 4 t^3
    dt``). Layer norms make a model jump near ``alpha = 0`` along the zero-baseline path: they
    are scale-invariant, so ``F(alpha X)`` is ``F(X)``'s for any ``alpha`` well above
    ``sqrt(eps) / |X|`` and drops to ``F(0)`` only in a sliver of ``alpha`` near 0 (about 1e-5
    to 1e-3 on a ViT-S block's activations) that evenly spaced steps never sample. Measured on a
    random ViT-S/16 (``blocks.9 -> logits``, ``blocks.5 -> blocks.9``, one image, 3 targets each):
    completeness gaps of 34 % to 1630 % at 32 midpoint steps (55 % to 1610 % at 64), under 0.7 %
    at 32 ``power`` steps."""
    if rule != "power":
        return None
    t = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    return POWER * t ** (POWER - 1)


def _resnet_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The residual blocks of a torchvision-style ResNet in forward order, or None for other models."""
    if not all(hasattr(model, name) for name in ("conv1", "layer1", "avgpool", "fc")):
        return None
    blocks = []
    for stage in range(1, 10):
        layer = getattr(model, f"layer{stage}", None)
        if layer is None:
            break
        if not isinstance(layer, nn.Sequential):
            return None
        blocks += [(f"layer{stage}.{i}", block) for i, block in enumerate(layer)]
    return blocks


class _Stop(Exception):
    pass


def _trunk_cut(model: nn.Module, source: str, target: str) -> tuple[nn.Module, list[nn.Module], bool] | None:
    """A cut along a sequential trunk (timm's ``blocks``, torchvision ViT's ``encoder.layers``,
    ``features``): the trunk, its children after ``source`` up to ``target`` (or to its end), and
    whether the model's tail after the trunk must run (the logits). None: no such cut."""
    parent, _, child = source.rpartition(".")
    trunk = dict(model.named_modules()).get(parent) if parent else None
    if not isinstance(trunk, nn.Sequential):
        return None
    names = [name for name, _ in trunk.named_children()]
    if child not in names:
        return None
    first = names.index(child) + 1
    if target == LOGITS:
        return trunk, list(trunk)[first:], True
    target_parent, _, target_child = target.rpartition(".")
    if target_parent != parent or target_child not in names:
        return None
    last = names.index(target_child) + 1
    if last < first:
        raise GIGError(f"target tap {target} comes before source tap {source}")
    return trunk, list(trunk)[first:last], False


class SubNetwork(nn.Module):
    """``F_ab``: from the output of tap ``source`` to the output of tap ``target`` (or the logits),
    taking and giving (N, C, H, W) maps whatever the taps' own layouts (tokens, channels-last).

    It runs only the blocks between the taps where the model allows a cut: ResNet-style models
    (torchvision's and the toy one), and models built around a sequential trunk, where both taps
    are its children (timm's ``blocks.N``, torchvision ViT's encoder layers, ``features.N``); the
    logits then take the model's tail after the trunk (its stem runs too, cheaply, for the
    image's shapes). Elsewhere it runs the whole model with the source module's output replaced,
    stopping at the target (``needs_images``). A token tap's prefix tokens (class, registers) stay
    the image's own at every step: only its patch tokens are the attributed PFVs.
    """

    def __init__(self, model: nn.Module, source: str, target: str, source_layout: TapLayout | None = None,
                 target_layout: TapLayout | None = None, cut: bool = True) -> None:
        super().__init__()
        self.model, self.source, self.target = model, source, target
        self.source_layout = source_layout or TapLayout()
        self.target_layout = target_layout or TapLayout()
        self._tail_lock = threading.Lock()
        self._context: tuple[tuple, torch.Tensor] | None = None
        modules = dict(model.named_modules())
        for name in (source, target):
            if name != LOGITS and name not in modules:
                raise GIGError(f"unknown tap {name!r}")
        blocks = _resnet_blocks(model)
        names = [name for name, _ in blocks] if blocks else []
        trunk = None if (blocks and source in names) or not cut else _trunk_cut(model, source, target)
        self.trunk, self.tail = None, False
        if cut and blocks and source in names and (target == LOGITS or target in names):
            first = names.index(source) + 1
            last = len(names) if target == LOGITS else names.index(target) + 1
            if last < first:
                raise GIGError(f"target tap {target} comes before source tap {source}")
            self.blocks = nn.ModuleList(block for _, block in blocks[first:last])
            self.head = target == LOGITS
            self.mode = "resnet"
        elif trunk is not None:
            self.trunk, children, self.tail = trunk
            self.blocks = nn.ModuleList(children)
            self.head = False
            self.mode = "trunk"
        else:
            self.blocks = None
            self.mode = "hook"
        # The whole model runs (hook), its stem and tail run (a trunk's logits), or a token
        # source's prefix tokens come from the image's own forward pass.
        self.needs_images = self.mode == "hook" or self.tail or self.source_layout.prefix > 0

    def _source_output(self, images: torch.Tensor) -> torch.Tensor:
        """The source tap's real output for one image (its prefix tokens), computed once per image."""
        key = (images.data_ptr(), tuple(images.shape), images.device)
        if self._context is not None and self._context[0] == key:
            return self._context[1]
        modules = dict(self.model.named_modules())
        captured: list[torch.Tensor] = []

        def catch(_module, _inputs, output):
            captured.append(output.detach())
            raise _Stop

        handle = modules[self.source].register_forward_hook(catch)
        try:
            with torch.no_grad():
                self.model(images[:1])
        except _Stop:
            pass
        finally:
            handle.remove()
        self._context = (key, captured[0])
        return captured[0]

    def _run_tail(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The model's own forward with its trunk giving ``out``: the stem runs and is dropped,
        the tail (norm, pooling, head) runs on ``out``."""
        trunk, called = self.trunk, []

        def given(*_args, **_kwargs):
            called.append(True)
            return out

        with self._tail_lock:
            trunk.forward = given  # an instance attribute shadows the class's forward
            try:
                result = self.model(images.expand(len(out), *images.shape[1:]))
            finally:
                del trunk.forward
        if not called:  # the model runs its trunk's children itself: the tail would ignore `out`
            raise GIGError(f"{type(self.model).__name__} does not call its trunk as a whole; rerun with the whole "
                           "model (GIG(..., cut=False))")
        return result

    def forward(self, x: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_images and images is None:
            raise GIGError(f"F({self.source} -> {self.target}) of {type(self.model).__name__} runs the model's own "
                           "forward pass (or a token tap's prefix): it needs the image")
        if self.mode == "resnet":
            for block in self.blocks:
                x = block(x)
            if self.head:
                x = self.model.fc(torch.flatten(self.model.avgpool(x), 1))
            return x
        if self.mode == "trunk":
            like = self._source_output(images) if self.source_layout.prefix else None
            out = self.source_layout.from_map(x, like)
            for block in self.blocks:
                out = block(out)
            if self.tail:
                return self._run_tail(out, images)
            return self.target_layout.to_map(out)
        modules = dict(self.model.named_modules())
        captured: list[torch.Tensor] = []
        layout = self.source_layout

        def replace(_module, _inputs, output):
            return layout.from_map(x, output)

        def catch(_module, _inputs, output):
            captured.append(output)
            raise _Stop

        handles = [modules[self.source].register_forward_hook(replace)]
        if self.target != LOGITS:
            handles.append(modules[self.target].register_forward_hook(catch))
        try:
            out = self.model(images.expand(len(x), *images.shape[1:]))
        except _Stop:
            out = self.target_layout.to_map(captured[0])
        finally:
            for handle in handles:
                handle.remove()
        return out


@dataclass(frozen=True)
class GIGResult:
    """``attribution`` (T, K_a) float64: the steps' share of GIG(k -> target) (all steps: the GIG);
    ``delta`` (T,) ``S(F(X~)) - S(F(0))`` and ``total`` (T,) ``sum_k GIG``, when endpoints were
    asked for (the completeness check compares them)."""

    attribution: torch.Tensor
    delta: torch.Tensor | None = None
    #: (T,) the readout's scale in the image: the largest magnitude any target of the pair takes at
    #: the path's ends. A gap small against it is negligible, however much of the target's own
    #: change it is (:func:`refine`): float32 noise in a network whose outputs reach it does not
    #: shrink with the steps.
    scale: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """``sum_k GIG(k -> t)`` per target."""
        return self.attribution.sum(dim=1)

    @property
    def gap(self) -> torch.Tensor:
        """The relative completeness gap per target (``kernels.metrics.completeness_gap``: NaN
        where delta is 0); needs the endpoints."""
        from gig_dist.kernels.metrics import completeness_gap

        if self.delta is None:
            raise GIGError("the completeness gap needs attribute(..., endpoints=True)")
        return torch.from_numpy(completeness_gap(self.total.detach().cpu().numpy(),
                                                 self.delta.detach().cpu().numpy()))


def reconstruct(index: torch.Tensor, value: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """``X~ = U V``: (P, C) from sparse codes ``index``/``value`` (P, L) (index -1: empty slot)."""
    return torch.einsum("pl,plc->pc", value * (index >= 0), dictionary[index.clamp_min(0)])


class GIG:
    """GIG attributions from the concepts of one tap to the targets of a later one (or classes).

    ``model``; ``source``, ``target`` tap names (``target`` may be ``"logits"``);
    ``source_dictionary`` (K_a, C_a); ``target_dictionary`` (K_b, C_b), not for logits;
    ``shape`` (C_a, H_a, W_a) of the source tap; ``steps`` M and ``rule`` (``midpoint``, ``left``,
    ``right``); ``step_batch`` steps per forward pass; ``layouts`` of the source and target taps'
    outputs (default: (N, C, H, W) maps); ``cut`` False runs the whole model with the source's
    output replaced even where the sub-network could be cut out (to compare the two).
    """

    def __init__(self, model: nn.Module, source: str, target: str, source_dictionary: torch.Tensor,
                 shape: tuple[int, int, int], target_dictionary: torch.Tensor | None = None, *, steps: int = 32,
                 rule: str = "midpoint", step_batch: int = 8,
                 layouts: tuple[TapLayout | None, TapLayout | None] = (None, None), cut: bool = True) -> None:
        self.alphas = step_alphas(steps, rule)
        self.weights = step_weights(steps, rule)
        self.steps = steps
        if target != LOGITS and target_dictionary is None:
            raise GIGError(f"concept targets at tap {target} need its concept vectors")
        if source_dictionary.shape[1] != shape[0]:
            raise GIGError(f"source concepts have width {source_dictionary.shape[1]}, tap {source} has {shape[0]} channels")
        self.subnet = SubNetwork(model, source, target, *layouts, cut=cut)
        self.V = source_dictionary
        self.W = target_dictionary
        self.shape = shape
        self.step_batch = step_batch
        self.logits = target == LOGITS

    def num_targets(self) -> int:
        """Target concepts at ``b``, or the number of classes (-1 when the model does not say)."""
        if self.W is not None:
            return len(self.W)
        fc = getattr(self.subnet.model, "fc", None)
        return int(fc.out_features) if isinstance(fc, nn.Linear) else -1

    def _readout(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``S_t`` for each target: (batch, T)."""
        if self.logits:
            return out[:, targets]
        return out.sum(dim=(2, 3)) @ self.W[targets].T.to(out.dtype)

    def attribute_images(self, codes: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor],
                         step_range: tuple[int, int] | None = None, endpoints: bool = False,
                         images: Sequence[torch.Tensor] | None = None) -> list[GIGResult]:
        """:meth:`attribute` for many images: ``codes`` and ``targets`` per image."""
        if len(codes) != len(targets) or (images is not None and len(images) != len(codes)):
            raise GIGError(f"{len(codes)} images of codes, {len(targets)} target lists"
                           + (f", {len(images)} images" if images is not None else ""))
        return [self.attribute(index, value, goal, step_range, endpoints, None if images is None else images[i])
                for i, ((index, value), goal) in enumerate(zip(codes, targets))]

    def attribute(self, index: torch.Tensor, value: torch.Tensor, targets: torch.Tensor,
                  step_range: tuple[int, int] | None = None, endpoints: bool = False,
                  image: torch.Tensor | None = None) -> GIGResult:
        """GIG for one image: codes ``index``/``value`` (P, L) at the source tap, ``targets`` (T,)
        target concept or class indices; the steps ``step_range`` (default all)."""
        from gig_dist.kernels.srd import refuse_training_mode

        refuse_training_mode(self.subnet.model, "GIG")
        start, stop = step_range if step_range is not None else (0, self.steps)
        limit = self.num_targets()
        if len(targets) == 0 or int(targets.min()) < 0 or (limit > 0 and int(targets.max()) >= limit):
            raise GIGError(f"targets {targets.tolist()} out of range: there are {limit} "
                           f"{'classes' if self.logits else 'target concepts'}")
        if index.shape != value.shape or index.ndim != 2:
            raise GIGError(f"codes must be (positions, slots) index and value arrays, got {tuple(index.shape)} "
                           f"and {tuple(value.shape)}")
        if len(index) != self.shape[1] * self.shape[2]:
            raise GIGError(f"codes cover {len(index)} positions; tap {self.subnet.source} has "
                           f"{self.shape[1]} x {self.shape[2]}")
        if not 0 <= start < stop <= self.steps:
            raise GIGError(f"step range {start}:{stop} is not within the {self.steps} steps")
        channels, height, width = self.shape
        x_full = reconstruct(index, value, self.V).T.reshape(channels, height, width)
        dtype = self.V.dtype
        grad_sum = torch.zeros(len(targets), channels, height, width, dtype=torch.float64, device=x_full.device)
        image = image[None] if image is not None else None
        for first in range(start, stop, self.step_batch):
            alphas = self.alphas[first : min(first + self.step_batch, stop)].to(x_full.device, dtype)
            x = (alphas[:, None, None, None] * x_full[None]).requires_grad_(True)
            with torch.enable_grad():
                out = self.subnet(x, image)
                if self.weights is not None:  # an uneven rule: each step's gradient at its weight
                    w = self.weights[first : first + len(x)].to(out.device, out.dtype)
                    out = out * w.view(-1, *[1] * (out.dim() - 1))
                if not self.logits and len(targets) > out.shape[1]:
                    # More targets than channels: the Jacobian of s = sum_q a_q once, then project.
                    s = out.sum(dim=(2, 3))
                    basis = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)[:, None, :].expand(-1, len(s), -1)
                    (jacobian,) = torch.autograd.grad(s, x, grad_outputs=basis, is_grads_batched=True)
                    grads = torch.einsum("tc,cn...->tn...", self.W[targets].to(dtype), jacobian)
                elif x.device.type == "cuda":
                    readout = self._readout(out, targets)
                    basis = torch.eye(len(targets), dtype=readout.dtype, device=readout.device)[:, None, :]
                    (grads,) = torch.autograd.grad(readout, x, grad_outputs=basis.expand(-1, len(x), -1),
                                                   is_grads_batched=True)
                else:
                    # On CPUs one backward pass per target, sharing the forward pass, is about 2x
                    # faster than vmap-batched cotangents (measured on the toy model).
                    readout = self._readout(out, targets)
                    for t in range(len(targets)):
                        (grad,) = torch.autograd.grad(readout[:, t].sum(), x, retain_graph=t + 1 < len(targets))
                        grad_sum[t] += grad.sum(dim=0)  # steps of a batch in float32, batches in float64
                    continue
            grad_sum += grads.sum(dim=1).to(torch.float64)
        # sum_p u_pk <G_p, v_k> over the code slots, scattered to the concepts.
        g = grad_sum.flatten(2).transpose(1, 2)  # (T, P, C)
        used = index >= 0
        projected = torch.einsum("tpc,plc->tpl", g, self.V[index.clamp_min(0)].to(torch.float64))
        contrib = projected * (value * used).to(torch.float64)
        attribution = torch.zeros(len(targets), len(self.V), dtype=torch.float64, device=g.device)
        attribution.scatter_add_(1, index.clamp_min(0).flatten()[None].expand(len(targets), -1),
                                 contrib.flatten(1))
        attribution /= self.steps
        if not endpoints:
            return GIGResult(attribution)
        ends, scale = self.ends(x_full, targets, None if image is None else image[0], scale=True)
        return GIGResult(attribution, ends[0] - ends[1], scale.expand(len(targets)))

    def change(self, activation: torch.Tensor, targets: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``S_t(F(a)) - S_t(F(0))`` (T,) float64 for a source activation ``a`` (C, H, W): with the
        reconstruction ``X~`` the side completeness compares GIG to; with the real activation
        ``X`` the change the reconstruction should keep (``kernels.metrics.kept_fraction``)."""
        ends = self.ends(activation, targets, image)
        return ends[0] - ends[1]

    def ends(self, activation: torch.Tensor, targets: torch.Tensor, image: torch.Tensor | None = None,
             scale: bool = False):
        """``[S_t(F(a)), S_t(F(0))]`` (2, T) float64: the readouts at the path's two ends; with
        ``scale``, also the readout's scale in this image: the largest magnitude any target of
        the pair (every class, or every target concept) takes at either end."""
        from gig_dist.kernels.srd import refuse_training_mode

        refuse_training_mode(self.subnet.model, "GIG")
        with torch.no_grad():
            activation = activation.to(self.V.device, self.V.dtype)
            ends = torch.stack([activation, torch.zeros_like(activation)])
            out = self.subnet(ends, None if image is None else image[None])
            read = self._readout(out, targets).to(torch.float64)
            if not scale:
                return read
            every = out if self.logits else out.sum(dim=(2, 3)) @ self.W.T.to(out.dtype)
        return read, every.abs().max().to(torch.float64).reshape(1)



def refine(kernel: Callable[[int], GIG], result: GIGResult, index: torch.Tensor, value: torch.Tensor,
           targets: torch.Tensor, image: torch.Tensor | None, steps: int, max_gap: float,
           max_steps: int, atol: float = 0.0) -> tuple[GIGResult, np.ndarray, np.ndarray]:
    """Integrate again every target whose completeness gap is coarse, with twice the steps each
    time, up to ``max_steps``: while ``|sum_k GIG - delta| > max(max_gap |delta|, atol scale)``,
    ``scale`` the readout's scale in the image (``GIGResult.scale``: the largest magnitude any
    class, or target concept, takes at the path's ends). The relative test alone asks the
    impossible of a target that barely changes while the network's outputs are large: its
    integrand is a small difference of large float32 values, whose noise does not shrink with
    the steps (a logit that moves by 0.003 had a relative gap of 1.8 % at an absolute one of 5e-5,
    and doubling the steps to the maximum spent the most where the target mattered least); the
    absolute test stops there. ``result`` is the
    image's GIG with endpoints at ``steps``; ``kernel(m)`` is the same pair's kernel with ``m``
    steps. Returns the refined result, the steps each target used and its relative gap at ``steps``."""
    from gig_dist.kernels.metrics import GAP_EPSILON

    first = result.gap.numpy()
    delta = result.delta.detach().cpu().numpy()
    scale = result.scale.detach().cpu().numpy() if result.scale is not None else np.zeros_like(delta)
    attribution = result.attribution.clone()
    error = np.abs(result.total.detach().cpu().numpy() - delta)
    allowed = np.maximum(max_gap * np.abs(delta), atol * scale)
    used = np.full(len(targets), steps, dtype=np.int32)
    while steps * 2 <= max_steps:
        coarse = np.flatnonzero(np.isfinite(error) & (error > allowed) & (np.abs(delta) > GAP_EPSILON))
        if not len(coarse):
            break
        steps *= 2
        finer = kernel(steps).attribute(index, value, targets[coarse], image=image)
        attribution[coarse] = finer.attribution
        error[coarse] = np.abs(finer.total.detach().cpu().numpy() - delta[coarse])
        used[coarse] = steps
    return GIGResult(attribution, result.delta, result.scale), used, first
