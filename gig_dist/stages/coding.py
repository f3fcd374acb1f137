"""What a dictionary level is made of, below the stages (no stage imports another): the taps it
codes, K per tap, its fit and encode parameters, the sample-count checks, and the matching of a
sparsity target (the lambda or top-k whose codes reach a mean l0 or R^2)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from gig_dist.store import Facts

if TYPE_CHECKING:
    from gig_dist.config import Config


def decompose_taps(config: Config, taps: list[str]) -> list[str]:
    return list(config.decompose.taps) if config.decompose.taps is not None else list(taps)


def encode_params(config: Config, tap: str, device: str) -> dict:
    """How a fitted dictionary encodes: the Lasso's lambda and tolerance; a top-k SAE's k."""
    options = config.decompose
    params = {"lambda_rel": options.lambda_for(tap), "lam": options.lam, "tol": options.tol,
              "batch_size": options.batch_size, "device": device}
    if "top_k" in own_params(config):  # a top-k SAE codes with its k
        params["top_k"] = own_params(config)["top_k"]
    return params


def sparsity_of(coder, X: np.ndarray, metric: str) -> float:
    """The mean l0 (``metric`` ``l0``) or R^2 (``r2``) of ``coder``'s codes of ``X`` (n, C)."""
    index, value = coder.encode(X)
    if metric == "l0":
        return float(((index >= 0) & (value != 0)).sum(1).mean())
    X64 = X.astype(np.float64)
    variance = float(((X64 - X64.mean(0)) ** 2).sum())
    error = float(((X64 - coder.decode(index, value)) ** 2).sum())
    return 1 - error / variance if variance > 0 else 1.0


def matched_lambda(coder_for, pfvs: np.ndarray, metric: str, target: float, low: float = 1e-4,
                   high: float = 0.95, iterations: int = 16, tolerance: float = 0.02) -> tuple[float, float]:
    """The ``lambda_rel`` whose codes of ``pfvs`` (n, C) reach ``target`` mean l0 (``metric``
    ``l0``) or R^2 (``r2``). Both fall as lambda grows, so a bisection on log lambda finds it;
    it stops within ``tolerance`` (relative) of the target. ``coder_for(lambda_rel)`` is a fitted
    dictionary that encodes at that lambda. Returns the lambda and the value it reached."""
    X = np.ascontiguousarray(pfvs, dtype=np.float32)
    lo, hi = np.log(low), np.log(high)
    best: tuple[float, float] | None = None
    for _ in range(iterations):
        lam = float(np.exp((lo + hi) / 2))
        value = sparsity_of(coder_for(lam), X, metric)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (lam, value)
        if abs(value - target) <= tolerance * abs(target):
            break
        if value > target:  # too dense (or too faithful): raise lambda
            lo = np.log(lam)
        else:
            hi = np.log(lam)
    return best


def matched_top_k(fit_for, pfvs: np.ndarray, target: float, largest: int) -> tuple[int, float]:
    """The smallest top-k in 1..``largest`` whose top-k SAE (``fit_for(k)``, fitted) reconstructs
    ``pfvs`` to R^2 >= ``target`` (else ``largest``): R^2 grows with k, so a bisection over k, a
    fit per step. Returns k and the R^2 it reached."""
    X = np.ascontiguousarray(pfvs, dtype=np.float32)
    lo, hi, reached = 1, largest, {}
    while lo < hi:
        k = (lo + hi) // 2
        reached[k] = sparsity_of(fit_for(k), X, "r2")
        if reached[k] >= target:
            hi = k
        else:
            lo = k + 1
    if lo not in reached:
        reached[lo] = sparsity_of(fit_for(lo), X, "r2")
    return lo, reached[lo]


def concept_count(config: Config, tap: str, channels: int) -> int:
    """K for a tap: the absolute ``concepts.k[tap]``, else ``round(k_multiplier * C)``."""
    return int(config.concepts.k.get(tap, max(1, round(config.concepts.k_multiplier * channels))))


def fit_params(config: Config) -> dict:
    """The dictionary's fit hyper-parameters from ``concepts.*`` (K is per tap)."""
    options = config.concepts
    return {"seed": options.seed, "n_init": options.n_init, "backend": options.backend,
            "refine_iter": options.refine_iter, **own_params(config)}


def own_params(config: Config) -> dict[str, Any]:
    """The chosen dictionary's own parameters (``concepts.params.<method>``)."""
    return dict(config.concepts.params.get(config.concepts.method, {}))


def own_param_errors(config: Config) -> list[str]:
    """A ``concepts.params.<method>.<name>`` the method does not take, before any work."""
    from gig_dist.kernels.dictionaries import DICTIONARIES

    method = config.concepts.method
    allowed = DICTIONARIES[method].own_params
    unknown = sorted(set(own_params(config)) - set(allowed))
    if not unknown:
        return []
    return [f"concepts.params.{method}: {method} takes no parameter {', '.join(map(repr, unknown))}; its own "
            f"parameters are {', '.join(allowed) or 'none'}"]


def sample_count_errors(config: Config, facts: Facts, samples: dict[str, int], bound: str, warn: bool) -> list[str]:
    """Every tap whose K exceeds its samples, each with values that work."""
    errors = []
    for tap, count in samples.items():
        channels, height, width = facts.taps[tap]
        k = concept_count(config, tap, channels)
        if k > count:
            fixes = [f"concepts.k_multiplier <= {math.floor(count / channels * 1000) / 1000}",
                     f"concepts.k={{{tap}: {count}}}"]
            per_image = math.ceil(k / max(facts.num_images, 1))
            if per_image <= height * width and per_image > config.sample.per_image:
                fixes.insert(0, f"sample.per_image >= {per_image}")
            errors.append(f"tap {tap}: K = {k} concepts but the run has {bound}{count} samples ({facts.num_images} "
                          f"images x min(sample.per_image = {config.sample.per_image}, {height * width} positions)); "
                          f"use {' or '.join(fixes)}")
        elif warn and count / k < 10:
            warnings.warn(
                f"tap {tap}: K = {k} concepts from {bound}{count} samples leaves {count / k:.1f} "
                "members per concept on average; below about 10, concepts are single PFVs rather than "
                "clusters (raise sample.per_image or lower concepts.k_multiplier)",
                stacklevel=3,
            )
    if errors and len(samples) > 1:
        errors[-1] += "\n  " + combined_fix(config, facts)
    return errors


def combined_fix(config: Config, facts: Facts, members: int = 10) -> str:
    """One setting that passes every tap's check at once, with ``members`` samples per concept
    where a tap has the positions for it: ``sample.per_image`` raised as far as the taps that
    need it allow, and ``concepts.k`` for the taps that still have too few samples."""
    n = max(facts.num_images, 1)
    wanted = {tap: concept_count(config, tap, c) for tap, (c, _, _) in facts.taps.items()}
    positions = {tap: h * w for tap, (_, h, w) in facts.taps.items()}
    need = {tap: math.ceil(members * k / n) for tap, k in wanted.items()}
    per_image = max(config.sample.per_image, min(max(need.values()), max(positions.values())))
    k = {}
    for tap, want in wanted.items():
        samples = n * min(per_image, positions[tap])
        if want * members > samples:
            k[tap] = max(2, samples // members)
    parts = [f"-o sample.per_image={per_image}"] if per_image != config.sample.per_image else []
    if k:
        parts.append("-o 'concepts.k={" + ", ".join(f"{tap}: {value}" for tap, value in {**config.concepts.k, **k}.items())
                     + "}'")
    return (f"all taps at once: {' '.join(parts)} passes every tap's check with at least {members} samples per concept "
            f"({n} images x min(sample.per_image, positions) samples per tap)")
