"""Sharing Ratio Decomposition (SRD, arXiv 2402.03348) for ResNet-style models: relevance maps
of a tap's PFVs for a class, and instance-level effective receptive fields (iERFs).

Every pre-activation PFV ``z_j`` is an exact sum of vector contributions ``c_(i->j)`` from the
PFVs ``a_i`` below it (conv + folded BatchNorm per kernel tap, an identity skip, a downsampling
skip) plus an effective bias. The bias is split among the contributions in proportion to their
norms, and the share of source ``i`` in ``j`` is ``mu_(i->j) = <c'_(i->j), z_j> / ||z_j||^2``, so
the shares into every target sum to 1. Relevance passes unchanged through ReLU and flows down as
``R_i = sum_j mu_(i->j) R_j`` (docs/method.md section 2).

Ratios are computed once per image (:meth:`SRD.decompose`, about the cost of a forward pass);
propagating relevance is then a cheap linear map, so many relevance maps of one image go down in
one batched pass. Shapes: ``N`` images, ``P`` maps per image, ``L`` positions of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

#: Below this squared norm a pre-activation counts as zero: its relevance is split equally
#: among its valid inputs instead of by (undefined) projection.
_ZERO = 1e-12


def refuse_training_mode(model: nn.Module, method: str) -> None:
    """In training mode BatchNorm normalises by the batch's statistics and updates its running
    ones: the decomposition would describe another function and change the model."""
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"{method} needs the model in eval mode, but {', '.join(training[:3])}"
                         f"{' and others' if len(training) > 3 else ''} {'is' if len(training) == 1 else 'are'} in "
                         "training mode (BatchNorm would use batch statistics and update its running ones); "
                         "call model.eval() first")


class SRDUnsupported(ValueError):
    """The model has a layer type or structure that SRD has no rule for."""


@dataclass(frozen=True)
class ConvSource:
    """One contributor to a pre-activation: ``bn_scale * conv(a)``, or ``a`` itself (identity)."""

    weight: torch.Tensor | None  # (C_out, C_in, k, k), BatchNorm scale folded in; None = identity
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    @property
    def kernel(self) -> int:
        return 1 if self.weight is None else self.weight.shape[-1]


@dataclass
class Ratios:
    """Sharing ratios of one contribution node for N images: per source, ``mu`` (N, k*k, L_out),
    with the geometry needed to fold relevance back onto the source's positions."""

    sources: list[ConvSource]
    mu: list[torch.Tensor]
    input_sizes: list[tuple[int, int]]
    output_size: tuple[int, int]


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (C_out, C_in, k, k) weight with the BN scale folded in, and the effective bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight
    if conv.groups > 1:  # expand grouped weights to a dense block-diagonal matrix
        c_out, c_in_group, kh, kw = weight.shape
        dense = weight.new_zeros(c_out, c_in_group * conv.groups, kh, kw)
        per_group = c_out // conv.groups
        for g in range(conv.groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            dense[rows, g * c_in_group : (g + 1) * c_in_group] = weight[rows]
        weight = dense
    if conv.kernel_size[0] != conv.kernel_size[1] or len({conv.stride[0], conv.stride[1]}) > 1 or \
            len({conv.padding[0], conv.padding[1]}) > 1 or len({conv.dilation[0], conv.dilation[1]}) > 1:
        raise SRDUnsupported(f"SRD supports square kernels, strides, paddings and dilations; got {conv}")
    return weight * scale[:, None, None, None], bias


def conv_source(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[ConvSource, torch.Tensor]:
    weight, bias = _fold_bn(conv, bn)
    if not isinstance(conv.padding[0], int):
        raise SRDUnsupported(f"SRD needs numeric padding, got {conv.padding!r}")
    return ConvSource(weight, conv.stride[0], conv.padding[0], conv.dilation[0]), bias


def _unfold(a: torch.Tensor, source: ConvSource) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, k*k, L_out) windows of the source's conv (zeros where padded)."""
    n, c = a.shape[:2]
    k = source.kernel
    cols = F.unfold(a, k, dilation=source.dilation, padding=source.padding, stride=source.stride)
    return cols.view(n, c, k * k, -1)


def _valid(a: torch.Tensor, source: ConvSource) -> torch.Tensor:
    """(1, 1, k*k, L_out): 1 where a kernel tap reads a real position, 0 where it reads padding."""
    ones = torch.ones(1, 1, *a.shape[-2:], dtype=a.dtype, device=a.device)
    return _unfold(ones, source)


def sharing_ratios(
    z: torch.Tensor,
    inputs: list[torch.Tensor],
    sources: list[ConvSource],
    bias: torch.Tensor | None,
    tap_chunk: int = 9,
) -> Ratios:
    """Ratios of the node ``z = sum_s source_s(inputs_s) + bias``; ``z`` is (N, C_out, H, W).

    ``mu[s][n, t, j]`` is the share of the input position read by kernel tap ``t`` of source
    ``s`` at output ``j`` (the padding-free positions only). Taps are processed ``tap_chunk`` at
    a time, so a 7x7 stem never holds all 49 contribution vectors at once.
    """
    n, c_out = z.shape[:2]
    z_flat = z.reshape(n, c_out, -1)  # (N, C_out, L)
    z_sq = (z_flat * z_flat).sum(1)  # (N, L)
    dots, norms, valids = [], [], []
    for a, source in zip(inputs, sources):
        cols = _unfold(a, source)  # (N, C_in, T, L)
        valids.append(_valid(a, source)[:, 0])  # (1, T, L)
        if source.weight is None:
            dots.append((cols * z_flat[:, :, None]).sum(1))  # <a_j, z_j>, T = 1
            norms.append(cols.norm(dim=1))
            continue
        w = source.weight.reshape(c_out, source.weight.shape[1], -1)  # (C_out, C_in, T)
        dot_parts, norm_parts = [], []
        for t0 in range(0, w.shape[-1], tap_chunk):
            w_t = w[:, :, t0 : t0 + tap_chunk]
            c_t = cols[:, :, t0 : t0 + tap_chunk]
            contrib = torch.einsum("oct,nctl->ntol", w_t, c_t)  # (N, t, C_out, L)
            dot_parts.append((contrib * z_flat[:, None]).sum(2))
            norm_parts.append(contrib.norm(dim=2))
        dots.append(torch.cat(dot_parts, 1))
        norms.append(torch.cat(norm_parts, 1))

    norm_total = sum(nm.sum(1) for nm in norms)  # (N, L)
    bias_dot = (bias[None, :, None] * z_flat).sum(1) if bias is not None else torch.zeros_like(z_sq)
    zero_target = z_sq <= _ZERO
    no_norm = norm_total <= _ZERO
    valid_count = sum(v.sum(1) for v in valids)  # (1, L)
    mu = []
    for dot, norm, valid in zip(dots, norms, valids):
        # The bias goes with the contributions in proportion to their norms; when they are all
        # zero (the target is its bias alone) it goes to the valid inputs equally.
        share = torch.where(no_norm[:, None], valid / valid_count[:, None], norm / norm_total.clamp_min(_ZERO)[:, None])
        ratio = (dot + share * bias_dot[:, None]) / z_sq.clamp_min(_ZERO)[:, None]
        mu.append(torch.where(zero_target[:, None], (valid / valid_count[:, None]).expand_as(ratio), ratio))
    return Ratios(sources, mu, [tuple(a.shape[-2:]) for a in inputs], tuple(z.shape[-2:]))


def propagate(ratios: Ratios, relevance: torch.Tensor) -> list[torch.Tensor]:
    """Relevance (N, P, H_out, W_out) on the node's outputs -> relevance on each source's input."""
    n, p = relevance.shape[:2]
    flat = relevance.reshape(n, p, 1, -1)
    down = []
    for source, mu, size in zip(ratios.sources, ratios.mu, ratios.input_sizes):
        shares = (mu[:, None] * flat).reshape(n * p, mu.shape[1], -1)  # (N*P, T, L)
        folded = F.fold(shares, size, source.kernel, dilation=source.dilation, padding=source.padding,
                        stride=source.stride)
        down.append(folded.view(n, p, *size))
    return down


@dataclass
class MaxPoolRatios:
    """Max-pool: each output channel comes from the input position that won its window."""

    winner: torch.Tensor  # (N, C, L_out) flat input index per output channel
    share: torch.Tensor  # (N, C, L_out) y_j[c]^2 / ||y_j||^2 (equal split when y_j = 0)
    input_size: tuple[int, int]


def maxpool_ratios(pool: nn.MaxPool2d, a: torch.Tensor) -> MaxPoolRatios:
    if pool.ceil_mode or (pool.dilation not in (1, (1, 1))):
        raise SRDUnsupported(f"SRD supports plain max-pooling, got {pool}")
    y, winner = F.max_pool2d(a, pool.kernel_size, pool.stride, pool.padding, return_indices=True)
    n, c = y.shape[:2]
    y_flat = y.reshape(n, c, -1)
    y_sq = (y_flat * y_flat).sum(1, keepdim=True)
    share = torch.where(y_sq > _ZERO, y_flat * y_flat / y_sq.clamp_min(_ZERO), torch.full_like(y_flat, 1.0 / c))
    return MaxPoolRatios(winner.reshape(n, c, -1), share, tuple(a.shape[-2:]))


def propagate_maxpool(ratios: MaxPoolRatios, relevance: torch.Tensor) -> torch.Tensor:
    n, p = relevance.shape[:2]
    h, w = ratios.input_size
    values = (ratios.share[:, None] * relevance.reshape(n, p, 1, -1)).reshape(n, p, -1)  # (N, P, C * L_out)
    index = ratios.winner.reshape(n, 1, -1).expand_as(values)
    # Every channel's share lands on its winning input position: one scatter over channels and
    # positions together (no (N, P, C, H*W) intermediate to sum over channels afterwards).
    return relevance.new_zeros(n, p, h * w).scatter_add_(2, index, values).view(n, p, h, w)


@dataclass
class BlockRatios:
    """A residual block: the final node (main path + skip) and the chain of inner conv nodes."""

    final: Ratios  # sources: [last conv of the main path, skip]
    inner: list[Ratios]  # from the block's input upwards, excluding the last conv


def _conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The main path of a BasicBlock/Bottleneck; raises where SRD has no rule for a part."""
    if isinstance(block, Bottleneck):
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    elif isinstance(block, BasicBlock):
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    else:
        raise SRDUnsupported(f"no SRD rule for block type {type(block).__name__}")
    if not isinstance(block.relu, nn.ReLU):
        raise SRDUnsupported(f"no SRD rule for activation {type(block.relu).__name__} (SRD needs ReLU)")
    for conv, bn in pairs:
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise SRDUnsupported(f"no SRD rule for {type(conv).__name__} + {type(bn).__name__}")
    ds = block.downsample
    if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                               and isinstance(ds[1], nn.BatchNorm2d)):
        raise SRDUnsupported(f"no SRD rule for downsample {ds}")
    return pairs


def block_ratios(block: nn.Module, x: torch.Tensor) -> tuple[BlockRatios, torch.Tensor]:
    """Ratios of one BasicBlock/Bottleneck for input ``x``; returns them and the block output."""
    pairs = _conv_bn_pairs(block)
    inner, h = [], x
    for conv, bn in pairs[:-1]:
        source, bias = conv_source(conv, bn)
        z = bn(conv(h))
        inner.append(sharing_ratios(z, [h], [source], bias))
        h = torch.relu(z)
    last_source, last_bias = conv_source(*pairs[-1])
    main = pairs[-1][1](pairs[-1][0](h))
    if block.downsample is None:
        skip_source, skip_bias, skip = ConvSource(None), None, x
    else:
        skip_source, skip_bias = conv_source(block.downsample[0], block.downsample[1])
        skip = x
    z = main + (skip if block.downsample is None else block.downsample(x))
    bias = last_bias if skip_bias is None else last_bias + skip_bias
    final = sharing_ratios(z, [h, skip], [last_source, skip_source], bias)
    return BlockRatios(final, inner), torch.relu(z)


def propagate_block(ratios: BlockRatios, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance on the block output -> relevance on the block input (main path + skip)."""
    main, skip = propagate(ratios.final, relevance)
    for node in reversed(ratios.inner):
        (main,) = propagate(node, main)
    return main + skip


class SRD:
    """SRD for a torchvision ResNet (BasicBlock or Bottleneck, downsampling skips, the max-pooled
    stem, average pool and fc) or any model with the same structure, such as the toy model.

    >>> srd = SRD(model)                       # raises SRDUnsupported for other architectures
    >>> d = srd.decompose(images)              # ratios of every layer, once per batch
    >>> maps = d.relevance(classes)            # {tap: (N, H, W)} relevance of each block output
    >>> ierf = d.ierf("layer3.1", positions)   # (N, P, H_img, W_img) iERFs of P PFVs per image
    """

    def __init__(self, model: nn.Module) -> None:
        for name in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc"):
            if not hasattr(model, name):
                raise SRDUnsupported(f"{type(model).__name__} has no {name!r}: not a ResNet-style model")
        if not isinstance(model.relu, nn.ReLU):
            raise SRDUnsupported(f"no SRD rule for activation {type(model.relu).__name__} (SRD needs ReLU)")
        if not isinstance(model.maxpool, (nn.MaxPool2d, nn.Identity)):
            raise SRDUnsupported(f"no SRD rule for stem pooling {type(model.maxpool).__name__}")
        if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or not isinstance(model.fc, nn.Linear):
            raise SRDUnsupported("SRD needs global average pooling followed by a linear head")
        self.model = model
        self.blocks: list[tuple[str, nn.Module]] = []
        stage = 1
        while hasattr(model, f"layer{stage}"):
            for index, block in enumerate(getattr(model, f"layer{stage}")):
                try:
                    _conv_bn_pairs(block)
                except SRDUnsupported as exc:
                    raise SRDUnsupported(f"layer{stage}.{index}: {exc}") from None
                self.blocks.append((f"layer{stage}.{index}", block))
            stage += 1
        if not self.blocks:
            raise SRDUnsupported(f"{type(model).__name__} has no residual stages (layer1, layer2, ...)")

    @property
    def taps(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def check_tap(self, tap: str) -> None:
        if tap not in self.taps:
            raise SRDUnsupported(
                f"SRD relevance and iERFs exist for residual block outputs only; {tap!r} is not one. "
                f"Block outputs: {', '.join(self.taps)}"
            )

    @torch.no_grad()
    def decompose(self, images: torch.Tensor) -> Decomposition:
        model = self.model
        refuse_training_mode(model, "SRD")
        stem = model.bn1(model.conv1(images))
        stem_source, stem_bias = conv_source(model.conv1, model.bn1)
        stem_ratios = sharing_ratios(stem, [images], [stem_source], stem_bias, tap_chunk=7)
        a = torch.relu(stem)
        pool = maxpool_ratios(model.maxpool, a) if isinstance(model.maxpool, nn.MaxPool2d) else None
        x = model.maxpool(a)
        blocks, outputs = [], {}
        for name, block in self.blocks:
            ratios, x = block_ratios(block, x)
            blocks.append(ratios)
            outputs[name] = x
        logits = model.fc(torch.flatten(model.avgpool(x), 1))
        return Decomposition(self, stem_ratios, pool, blocks, outputs, logits, tuple(images.shape[-2:]))


@dataclass
class Decomposition:
    """The ratios of every layer for a batch of images, and the block outputs and logits."""

    srd: SRD
    stem: Ratios
    pool: MaxPoolRatios | None
    blocks: list[BlockRatios]
    outputs: dict[str, torch.Tensor]  # tap -> (N, C, H, W) post-ReLU block output
    logits: torch.Tensor
    image_size: tuple[int, int]

    @torch.no_grad()
    def top_relevance(self, classes: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) relevance of the last block's PFVs for ``classes``:
        ``R_j = (w_c . a_j + b_c) / N_positions``, which sums to the logit ``y_c``."""
        last = self.outputs[self.srd.taps[-1]]
        fc = self.srd.model.fc
        w = fc.weight[classes]  # (N, C)
        positions = last.shape[-2] * last.shape[-1]
        r = torch.einsum("nc,nchw->nhw", w, last) + fc.bias[classes][:, None, None]
        return (r / positions)[:, None]

    def _down(self, relevance: torch.Tensor, from_block: int, stop_at: int | None = None,
              record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Relevance on the output of block ``from_block`` down to the output of block
        ``stop_at`` (exclusive), or to the pixels when ``stop_at`` is None."""
        for index in range(from_block, -1, -1):
            if stop_at is not None and index == stop_at:
                return relevance
            if record is not None:
                record[self.srd.taps[index]] = relevance
            relevance = propagate_block(self.blocks[index], relevance)
        if stop_at is not None:
            return relevance
        if self.pool is not None:
            relevance = propagate_maxpool(self.pool, relevance)
        (pixels,) = propagate(self.stem, relevance)
        return pixels

    @torch.no_grad()
    def relevance(self, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """SRD relevance of every block output's PFVs for ``classes`` (N,): {tap: (N, H, W)}."""
        record: dict[str, torch.Tensor] = {}
        self._down(self.top_relevance(classes), len(self.blocks) - 1, stop_at=-1, record=record)
        return {tap: r[:, 0] for tap, r in record.items()}

    @torch.no_grad()
    def pixel_relevance(self, classes: torch.Tensor) -> torch.Tensor:
        """Relevance of the input pixels for ``classes``: (N, H_img, W_img)."""
        return self._down(self.top_relevance(classes), len(self.blocks) - 1)[:, 0]

    @torch.no_grad()
    def ierf(self, tap: str, positions: torch.Tensor) -> torch.Tensor:
        """iERFs (N, P, H_img, W_img) of the PFVs at flat ``positions`` (N, P) of ``tap``: the
        relevance of each pixel in building that PFV. Each map sums to 1."""
        self.srd.check_tap(tap)
        out = self.outputs[tap]
        n, p = positions.shape
        positions_per_image = out.shape[-2] * out.shape[-1]
        if positions.numel() and (positions.min() < 0 or positions.max() >= positions_per_image):
            raise ValueError(f"positions must lie in [0, {positions_per_image}) for {tap} ({out.shape[-2]}x{out.shape[-1]})")
        one_hot = out.new_zeros(n, p, out.shape[-2] * out.shape[-1])
        one_hot.scatter_(2, positions[..., None].to(torch.int64), 1.0)
        return self.ierf_of(tap, one_hot.view(n, p, *out.shape[-2:]))

    @torch.no_grad()
    def ierf_of(self, tap: str, weights: torch.Tensor) -> torch.Tensor:
        """iERFs (N, P, H_img, W_img) of weighted sets of PFVs of ``tap``: ``weights`` (N, P, H, W)
        over its positions (a concept's code map, say). SRD is linear in the relevance it starts
        from, so this is the weighted sum of the positions' iERFs; each map sums to its weights'
        sum (normalise them to 1 for a map that sums to 1)."""
        self.srd.check_tap(tap)
        out = self.outputs[tap]
        if weights.ndim != 4 or weights.shape[0] != out.shape[0] or weights.shape[-2:] != out.shape[-2:]:
            raise ValueError(f"weights must be (N, P, {out.shape[-2]}, {out.shape[-1]}) for {tap} with N = "
                             f"{out.shape[0]} images, got {tuple(weights.shape)}")
        return self._down(weights.to(out.dtype), self.srd.taps.index(tap))


def srd_problem(model: nn.Module, taps: list[str]) -> str | None:
    """Why SRD cannot decompose ``model`` at ``taps`` (None: it can)."""
    try:
        srd = SRD(model)
        for tap in taps:
            srd.check_tap(tap)
    except SRDUnsupported as exc:
        return str(exc)
    return None
