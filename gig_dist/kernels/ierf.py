"""Instance-level effective receptive fields (iERFs) of PFVs, for any model.

SRD (:mod:`gig_dist.kernels.srd`) where it has rules for every layer and the tap is a residual
block output; elsewhere the gradient iERF of docs/method.md section 2: the absolute gradient of
``<a_p, a_p / ||a_p||>`` (= ``||a_p||``) with respect to the input, summed over colour channels
and normalised to sum 1. Every result says which kind it is.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from gig_dist.kernels.srd import SRD, SRDUnsupported
from gig_dist.kernels.taps import TapLayout, as_feature_map, capture

log = logging.getLogger(__name__)

Method = Literal["auto", "srd", "gradient"]


def gradient_ierf(model: nn.Module, images: torch.Tensor, tap: str, positions: torch.Tensor,
                  chunk: int = 64, layout: TapLayout | None = None) -> torch.Tensor:
    """(N, P, H_img, W_img) gradient iERFs of the PFVs at flat ``positions`` (N, P) of ``tap``
    (output ``layout``), ``chunk`` image copies per backward pass (memory grows with it)."""
    n, p = positions.shape
    image_index = torch.arange(n, device=images.device).repeat_interleave(p)
    flat_positions = positions.reshape(-1).to(torch.int64)
    maps = []
    for start in range(0, n * p, chunk):
        rows = slice(start, start + chunk)
        x = images[image_index[rows]].detach().requires_grad_(True)
        with torch.enable_grad(), capture(model, [tap]) as outputs:
            model(x)
            a = as_feature_map(tap, outputs[tap], layout).flatten(2)  # (B, C, L)
            if flat_positions[rows].max() >= a.shape[-1]:
                raise ValueError(f"positions must lie in [0, {a.shape[-1]}) for {tap}")
            vectors = a[torch.arange(len(x)), :, flat_positions[rows]]  # (B, C)
            (grad,) = torch.autograd.grad(vectors.norm(dim=1).sum(), x)
        magnitude = grad.abs().sum(1)  # (B, H, W)
        maps.append(magnitude / magnitude.sum((1, 2), keepdim=True).clamp_min(1e-30))
    return torch.cat(maps).view(n, p, *images.shape[-2:])


def ierf(model: nn.Module, images: torch.Tensor, tap: str, positions: torch.Tensor,
         method: Method = "auto") -> tuple[torch.Tensor, str]:
    """iERFs (N, P, H_img, W_img) of the PFVs at ``positions`` (N, P) of ``tap`` and their kind,
    ``"srd"`` or ``"gradient"``. ``auto`` takes SRD where it applies and says when it cannot."""
    if method == "gradient":
        return gradient_ierf(model, images, tap, positions), "gradient"
    try:
        srd = SRD(model)
        srd.check_tap(tap)
    except SRDUnsupported as exc:
        if method == "srd":
            raise
        log.warning("gradient iERFs for %s: %s", tap, exc)
        return gradient_ierf(model, images, tap, positions), "gradient"
    return srd.decompose(images).ierf(tap, positions), "srd"


def ierf_kinds(model: nn.Module, taps: list[str], method: Method = "auto") -> dict[str, tuple[str, str]]:
    """Which iERF each tap gets, and why not SRD where it does not: ``{tap: (kind, reason)}``
    (``method="srd"`` raises where SRD cannot run)."""
    if method == "gradient":
        return {tap: ("gradient", "atlas.ierf = gradient") for tap in taps}
    try:
        srd = SRD(model)
    except SRDUnsupported as exc:
        if method == "srd":
            raise
        return {tap: ("gradient", str(exc)) for tap in taps}
    found = {}
    for tap in taps:
        try:
            srd.check_tap(tap)
            found[tap] = ("srd", "")
        except SRDUnsupported as exc:
            if method == "srd":
                raise
            found[tap] = ("gradient", str(exc))
    return found


def ierfs(model: nn.Module, images: torch.Tensor, requests: dict[str, torch.Tensor],
          method: Method = "auto", layouts: dict[str, TapLayout | None] | None = None,
          copies: int = 64) -> dict[str, tuple[torch.Tensor, str]]:
    """iERFs of PFVs at several taps of the same images, ``{tap: positions (N, P)}`` ->
    ``{tap: (maps (N, P, H_img, W_img), kind)}``: one SRD decomposition serves every tap it has
    rules for; the others take the gradient iERF (or raise, with ``method="srd"``), ``copies``
    image copies per backward pass."""
    kinds = ierf_kinds(model, list(requests), method)
    found: dict[str, tuple[torch.Tensor, str]] = {}
    srd_taps = [tap for tap, (kind, _) in kinds.items() if kind == "srd"]
    if srd_taps:
        decomposition = SRD(model).decompose(images)
        for tap in srd_taps:
            found[tap] = decomposition.ierf(tap, requests[tap]), "srd"
    for tap, positions in requests.items():
        if tap not in found:
            layout = (layouts or {}).get(tap)
            found[tap] = gradient_ierf(model, images, tap, positions, chunk=copies, layout=layout), "gradient"
    return found
