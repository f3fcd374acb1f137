"""Dictionary levels beside a run's own, in the same store, sharing its PFVs and samples:

* ``evaluate --match l0=N`` (or ``r2=X``): each dictionary refit to one sparsity, so that their
  scores compare dictionaries and not the sparsity each happened to reach. A Lasso-coded
  dictionary keeps its concept vectors and takes the ``lambda_rel`` (per tap) whose codes of the
  tap's samples reach the target; the sparse autoencoder is retrained as a top-k SAE.
* ``gig-dist sweep``: a grid of concept counts (``concepts.k_multiplier``) and sparsities
  (``decompose.lambda_rel``) per dictionary, each point a level of its own
  (``<method>@k=8,lambda=0.05``), run through evaluate on a subset of images, and the table of
  what each point measured (:func:`sweep_table`), read back from the store.

Every level is an ordinary pipeline run: a killed sweep resumes where it stopped, and a finished
point is kept.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gig_dist.config import Config, config_from_tree
from gig_dist.settings import ConfigError
from gig_dist.store import (
    LOGITS,
    CodesSection,
    ConceptsSection,
    GIGSection,
    MetaSection,
    RunStore,
    SamplesSection,
)

#: PFVs per tap the matching measures its sparsity on (spread over the decomposed images).
MATCH_SAMPLES = 2048
#: Default grid of ``gig-dist sweep`` (the paper's K = 8 C among them).
SWEEP_K_MULTIPLIERS = (1.0, 2.0, 4.0, 8.0, 16.0)
SWEEP_LAMBDAS = (0.025, 0.05, 0.1)
#: Images each sweep point decomposes, attributes and evaluates, rounded up to whole store units
#: (a run made with ``store.images_per_unit=16`` keeps a point at 16 images; docs/evaluation.md
#: gives the toy sweep's times).
SWEEP_IMAGES = 16
#: The prefix of a sweep point's level: ``<method>@k=<K multiplier>,lambda=<lambda_rel>``.
_POINT = re.compile(r"^(?P<method>[a-z_]+)@k=(?P<k>[0-9.]+),lambda=(?P<lam>[0-9.]+|none)$")


def parse_target(text: str) -> tuple[str, float]:
    """``l0=5`` or ``r2=0.9`` as (metric, target)."""
    metric, sep, raw = text.partition("=")
    metric = metric.strip().lower().replace("^", "")
    try:
        target = float(raw)
    except ValueError:
        target = math.nan
    if not sep or metric not in ("l0", "r2") or not math.isfinite(target) or target <= 0 or \
            (metric == "r2" and target >= 1):
        raise ConfigError(f"--match {text!r}: give l0=N (the mean number of concepts per PFV, N > 0) or r2=X "
                          "(the fraction of the PFVs' variance the codes reconstruct, 0 < X < 1)")
    return metric, target


def level_config(store: RunStore, dictionary: str) -> dict[str, Any]:
    """The config tree a dictionary level was made with (refusing a name the store lacks)."""
    known = set(store.manifest.dictionaries) | set(store.dictionaries())
    if dictionary not in known:
        raise ConfigError(f"{store.url} has no dictionary level {dictionary!r}; it has {', '.join(sorted(known)) or 'none'}")
    return store.manifest.dictionary_config(dictionary)


def spread_samples(store: RunStore, tap: str, n: int) -> np.ndarray:
    """About ``n`` of the run's sampled PFVs of ``tap`` (float32), every m-th one over all units,
    so they come from the whole dataset; never the whole sample at once."""
    total = sum(int(valid.sum()) for _, valid in store.family(SamplesSection).valid_mask_blocks(tap))
    stride = max(1, total // n)
    taken, seen = [], 0
    for block in store.family(SamplesSection).iter_valid(tap):
        first = (-seen) % stride
        taken.append(block[first::stride])
        seen += len(block)
    return np.concatenate(taken)[:n] if taken else np.zeros((0, store.taps[tap][0]), np.float32)


def spread_pfvs(store: RunStore, config: Config, tap: str, n: int, units: int = 8, seed: int = 0) -> np.ndarray:
    """About ``n`` PFVs of ``tap`` (float32) at random positions of the processed images of up to
    ``units`` store units spread over the decomposed images: the population the level's mean l0
    and R^2 are measured on (the sample stage's draws are weighted by relevance, so they are
    denser than a typical position). One unit in memory at a time."""
    import torch

    from gig_dist.stages.forward import PFVSource
    from gig_dist.store import PROCESSED

    decomposed = config.decompose.images or store.num_images
    ranges = [r for r in store.units() if r.start < decomposed]
    picks = sorted({int(i) for i in np.linspace(0, len(ranges) - 1, min(units, len(ranges))).round()})
    rng = np.random.default_rng(seed)
    source = PFVSource(config, store, torch.device("cpu"), [tap])
    taken = []
    try:
        for i in picks:
            r = ranges[i]
            block = np.asarray(source.read(tap, r))
            rows = block[store.family(MetaSection).read_status(r)[0] == PROCESSED].reshape(-1, block.shape[-1])
            keep = rng.choice(len(rows), min(len(rows), -(-n // len(picks))), replace=False) if len(rows) else []
            taken.append(rows[np.sort(keep)].astype(np.float32))
    finally:
        source.close()
    return np.concatenate(taken) if taken else np.zeros((0, store.taps[tap][0]), np.float32)


@dataclass
class Matched:
    """A dictionary refit to a target sparsity: its level, the overrides that make it, and per
    tap the parameter chosen and the value it reached on the samples."""

    source: str
    level: str
    method: str
    overrides: list[str]
    per_tap: dict[str, dict[str, float]] = field(default_factory=dict)


def match_level(store: RunStore, dictionary: str, metric: str, target: float, taps: list[str] | None = None,
                samples: int = MATCH_SAMPLES, log: Callable[[str], None] | None = None) -> Matched:
    """The level ``<dictionary>@<metric>=<target>``: ``dictionary``'s settings with, per tap, the
    lambda_rel (Lasso-coded dictionaries) or top-k (the SAE) whose codes of the tap's samples reach
    ``target``. Reads the fitted concepts and samples; writes nothing."""
    from gig_dist.kernels.dictionaries import DICTIONARIES, make_dictionary
    from gig_dist.stages.coding import (
        concept_count,
        decompose_taps,
        encode_params,
        fit_params,
        matched_lambda,
        matched_top_k,
    )

    tree = level_config(store, dictionary)
    config = config_from_tree(tree, source=f"the config of {dictionary} recorded in {store.url}")
    method = config.concepts.method
    level = f"{dictionary}@{metric}={target:g}"
    chosen = taps or decompose_taps(config, list(store.taps))
    found = Matched(dictionary, level, method, [f"concepts.level={level}"])
    concepts = store.family(ConceptsSection, dictionary)
    if method == "sae":
        if metric == "l0":
            k = max(1, round(target))
            found.overrides.append(f"concepts.params.sae.top_k={k}")
            found.per_tap = {tap: {"sae_top_k": k} for tap in chosen}
            return found
        ks = {}
        for tap in chosen:
            pfvs = spread_pfvs(store, config, tap, samples)
            largest = min(config.decompose.max_nonzero, concept_count(config, tap, store.taps[tap][0]))

            def fit_for(k: int, tap=tap, pfvs=pfvs):
                params = {**fit_params(config), "top_k": k}
                return make_dictionary("sae", n_concepts=concept_count(config, tap, store.taps[tap][0]),
                                       **params).fit(spread_samples(store, tap, 4 * samples))

            k, reached = matched_top_k(fit_for, pfvs, target, largest)
            ks[tap] = k
            found.per_tap[tap] = {"sae_top_k": k, "on_samples": reached}
            if log:
                log(f"  {level} {tap}: top-k {k}, R^2 {reached:.3f} on {len(pfvs)} samples")
        # One top-k for the SAE (its setting is not per tap): the largest any tap needs.
        found.overrides.append(f"concepts.params.sae.top_k={max(ks.values())}")
        return found
    lambdas = {}
    for tap in chosen:
        if not concepts.has(tap):
            raise ConfigError(f"{dictionary} has no concepts for tap {tap}: run it to its decompose stage first")
        arrays = concepts.arrays(tap)
        pfvs = spread_pfvs(store, config, tap, samples)
        params = encode_params(config, tap, "cpu")

        def coder_for(lam: float, arrays=arrays, params=params):
            return DICTIONARIES[method].from_arrays(arrays, **{**params, "lambda_rel": lam, "lam": None})

        lam, reached = matched_lambda(coder_for, pfvs, metric, target)
        if abs(reached - target) > 0.1 * target and log:
            log(f"  {level} {tap}: {metric} = {target:g} is out of reach of its {concepts.count(tap)} concepts: "
                f"{reached:.3g} is the closest (lambda_rel {lam:.3g})")
        lambdas[tap] = float(f"{lam:.4g}")
        found.per_tap[tap] = {"lambda_rel": lambdas[tap], "on_samples": reached}
        if log:
            log(f"  {level} {tap}: lambda_rel {lambdas[tap]:.4g}, {metric} {reached:.3g} on {len(pfvs)} samples")
    found.overrides.append("decompose.lambda_rel={" + ",".join(f"{tap}: {lam}" for tap, lam in lambdas.items()) + "}")
    return found


def achieved(store: RunStore, level: str, taps: list[str]) -> dict[str, dict[str, float | None]]:
    """The R^2 and mean l0 a level's codes reached, per tap (over all its decomposed images)."""
    codes, concepts = store.family(CodesSection, level), store.family(ConceptsSection, level)
    out = {}
    for tap in taps:
        summary = codes.summary(tap, concepts.count(tap)) if concepts.has(tap) else {}
        out[tap] = {"r2": summary.get("r2"), "mean_l0": summary.get("mean_l0")}
    return out


# -- the sweep ----------------------------------------------------------------------------------------


def point_level(method: str, k_multiplier: float, lambda_rel: float | None) -> str:
    lam = "none" if lambda_rel is None else f"{lambda_rel:g}"
    return f"{method}@k={k_multiplier:g},lambda={lam}"


def sweep_points(methods: list[str], k_multipliers: list[float], lambdas: list[float]) -> list[tuple[str, float, float | None]]:
    """(method, K multiplier, lambda_rel) per point; the SAE's codes are its encoder's, not the
    Lasso's, so it has one point per K (lambda None)."""
    points = []
    for method in methods:
        for k in k_multipliers:
            for lam in ([None] if method == "sae" else lambdas):
                points.append((method, k, lam))
    return points


def point_config(store: RunStore, method: str, k_multiplier: float, lambda_rel: float | None, images: int) -> Config:
    """A sweep point's config: the run's own inputs, the point's dictionary, K and lambda, and
    ``images`` images decomposed, attributed and evaluated."""
    tree = store.manifest.config
    overrides = [f"concepts.method={method}", f"concepts.level={point_level(method, k_multiplier, lambda_rel)}",
                 f"concepts.k_multiplier={k_multiplier}", "concepts.k={}", f"decompose.images={images}",
                 f"gig.images={images}", f"evaluate.images={images}", "report.enabled=false",
                 "evaluate.orderings=[gig]"]  # the table reads GIG's curves only: a quarter of the evaluation
    if lambda_rel is not None:
        overrides.append(f"decompose.lambda_rel={lambda_rel}")
    return config_from_tree(tree, overrides)


def run_sweep(url: str, methods: list[str], k_multipliers: list[float], lambdas: list[float], images: int,
              out=sys.stdout) -> list[str]:
    """Every point of the grid into the store at ``url``, one level at a time; a point finished
    before is kept. Returns the levels."""
    from gig_dist import pipeline

    store = RunStore.open(url)
    points = sweep_points(methods, k_multipliers, lambdas)
    configs = [point_config(store, *point, images) for point in points]  # every point validated before any work
    unit = store.facts.images_per_unit
    covered = min(store.num_images, -(-images // unit) * unit)
    if covered > images:
        print(f"each point decomposes and attributes whole store units: {covered} images, not {images} "
              f"(store.images_per_unit = {unit}; a run made with a smaller unit makes smaller points)", file=out,
              flush=True)
    levels = []
    for number, (point, config) in enumerate(zip(points, configs), 1):
        level = point_level(*point)
        levels.append(level)
        print(f"[{number}/{len(points)}] {level}", file=out, flush=True)
        pipeline.run(config, url, until="evaluate", on_plan=lambda decisions: print(
            "  " + ", ".join(f"{d.key.split('/')[-1]} {d.action}" for d in decisions if "/" in d.key), file=out,
            flush=True))
    return levels


def evaluate_levels(url: str, dicts: list[str] | None = None, images: int | None = None, taps: list[str] | None = None,
                    match: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                    log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """``gig-dist evaluate``: insertion/deletion of concepts on the first ``images`` attributed
    images of a run, for each of its dictionary levels (``dicts``, default the run's own), each
    refit first to a matched sparsity where ``match`` says (``l0=N``, ``r2=X``). Returns the
    images, the results and ground truth per level, the match table, the last config and the
    evaluation's seconds."""
    from gig_dist import pipeline
    from gig_dist.stages.evaluate import EvaluateStage, summarize, summarize_ground
    from gig_dist.stages.registry import stages_until

    others = [kv for kv in overrides if not kv.split("=", 1)[0].strip().startswith("evaluate.")]
    if others:
        raise ConfigError(f"gig-dist evaluate takes only evaluate.* settings, got {', '.join(others)}: the model, the "
                          "data and the other stages are the run's own (change them with gig-dist run)")
    store = RunStore.open(url)
    base = store.manifest.config
    attributed = [key.split("/")[0] for key, record in store.manifest.stages.items()
                  if key.endswith("/attribute") and record.finished]
    # A matched level needs only its dictionary's fit: it decomposes and attributes its own images
    # (a dictionary whose codes of every image would take hours, NMF's, need not be made first).
    fitted = [key.split("/")[0] for key, record in store.manifest.stages.items()
              if key.endswith("/concepts") and record.finished and "@" not in key]
    ready, needs = (fitted, "fitted concepts") if match else (attributed, "finished GIG")
    # By default the run's own levels; matched and sweep levels (``<name>@...``) when named.
    dictionaries = dicts or [d for d in attributed if "@" not in d] or attributed
    missing = [d for d in dictionaries if d not in ready]
    if missing or not dictionaries:
        until = " --until concepts" if match else ""
        raise ConfigError(f"no {needs} for dictionar{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} in "
                          f"{url}; it has {', '.join(ready) or 'none'} (run gig-dist run -o concepts.method=NAME{until})"
                          if missing else f"{url} has no finished GIG yet: run the pipeline first")
    images = images or min(64, base.get("gig", {}).get("images") or store.num_images)
    taps = [f"evaluate.taps=[{','.join(taps)}]"] if taps else []
    matched = []
    if match:
        metric, target = parse_target(match)
        plans = []
        for dictionary in dictionaries:  # every level matched (and validated) before any work
            log(f"{dictionary}: matching {metric} = {target:g} on each tap's samples")
            found = match_level(store, dictionary, metric, target, log=log)
            plans.append((found, config_from_tree(store.manifest.dictionary_config(dictionary), [
                *found.overrides, f"evaluate.images={images}", "report.enabled=false", *taps, *overrides,
                # a matched level exists to be evaluated: it decomposes and attributes only those images
                f"decompose.images={images}", f"gig.images={images}"])))
        for found, config in plans:
            pipeline.run(config, store.url, until="evaluate", on_plan=lambda decisions, level=found.level: log(
                f"{level}: " + ", ".join(f"{d.key.split('/')[-1]} {d.action}" for d in decisions if "/" in d.key)))
            matched.append(found)
        dictionaries = [found.level for found in matched]
        store = RunStore.open(url)
    results, ground, seconds = {}, {}, 0.0
    for dictionary in dictionaries:
        # Each dictionary with the settings its level was made with: evaluating one never redoes another.
        recorded = store.manifest.dictionary_config(dictionary)
        level = [] if dictionary in store.manifest.dictionaries else [f"concepts.method={dictionary}"]
        config = config_from_tree(recorded, [*level, f"evaluate.images={images}", "report.enabled=false",
                                   *taps, *overrides])
        stages = stages_until("evaluate")
        redo = [d for d in pipeline.decide(RunStore.open(store.url), config, stages)
                if d.action == "redo" and not d.key.endswith("/evaluate")]
        if redo:
            raise ConfigError(f"evaluating {dictionary} would redo {redo[0].key} ({redo[0].reason}); gig-dist evaluate "
                              "runs only the evaluation: redo the level with gig-dist run -o concepts.method="
                              f"{dictionary} first")
        report = pipeline.run(config, store.url, until="evaluate",
                              on_plan=lambda decisions, dictionary=dictionary: log(f"{dictionary}: " + ", ".join(
                                  f"{d.key.split('/')[-1]} {d.action}" for d in decisions)))
        seconds += report.stages[-1].seconds
        done = RunStore.open(store.url)
        results[dictionary] = summarize(done, dictionary, EvaluateStage(config, store.url).pairs(done.facts), images)
        ground[dictionary] = summarize_ground(done, dictionary, images, config.evaluate.top_concepts)
    ground = {d: found for d, found in ground.items() if found is not None}
    out = {"images": images, "results": results, "ground_truth": ground, "config": config, "seconds": seconds}
    if matched:
        out["match"] = match_table(RunStore.open(url), matched, match)
    return out


def match_table(store, matched, text: str) -> dict[str, Any]:
    """Per matched level and tap: the parameter chosen, and the l0 and R^2 its codes reached over
    every decomposed image, against the target."""
    metric, target = parse_target(text)
    table = {"metric": metric, "target": target, "levels": {}}
    for found in matched:
        reached = achieved(store, found.level, list(found.per_tap))
        rows = {}
        for tap, chosen in found.per_tap.items():
            value = reached[tap]["mean_l0" if metric == "l0" else "r2"]
            rows[tap] = {**chosen, **reached[tap],
                         "within_10pct": bool(value is not None and abs(value - target) <= 0.1 * target)}
        table["levels"][found.level] = {"from": found.source, "method": found.method, "taps": rows}
    return table



def sweep_levels(store: RunStore) -> list[str]:
    """The store's sweep points that finished their evaluation, in grid order."""
    found = []
    for key, record in store.manifest.stages.items():
        level, _, stage = key.rpartition("/")
        if stage == "evaluate" and record.finished and _POINT.match(level):
            found.append(level)
    return sorted(found, key=lambda level: (_POINT.match(level)["method"], float(_POINT.match(level)["k"]),
                                            _POINT.match(level)["lam"]))


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def point_row(store: RunStore, level: str) -> dict[str, Any]:
    """What one finished level measured: per source tap its R^2, mean l0, K and concepts with
    1-2 members, its C-Ins - C-Del (GIG ordering; by fraction and by count) and inter-layer
    score, purity; overall part recall, the GIG gap and kept fraction, and the seconds of fit,
    decompose and attribute."""
    from gig_dist.stages.evaluate import EvaluateStage, summarize, summarize_ground

    config = config_from_tree(store.manifest.dictionary_config(level), source=f"the config of {level} recorded in {store.url}")
    match = _POINT.match(level)
    images = config.evaluate.images
    scores = summarize(store, level, EvaluateStage(config, store.url).pairs(store.facts), images)
    ground = summarize_ground(store, level, images, config.evaluate.top_concepts) or {}
    concepts = store.family(ConceptsSection, level)
    taps: dict[str, dict[str, Any]] = {}
    for key, entry in scores.items():
        source, target = key.split(" -> ")
        tap = taps.setdefault(source, {})
        gig = entry["gig"]
        if target == LOGITS:
            tap["score"], tap["count_score"] = gig["score"][0], gig["count_score"][0] if "count_score" in gig else None
        else:
            tap.setdefault("inter_layer", []).append(gig["score"][0])
        tap.update(entry["sparsity"])
    for tap, entry in taps.items():
        entry["inter_layer"] = _mean(entry.get("inter_layer", []))
        fit = concepts.fit(tap)
        entry["k"] = fit.get("k")
        sizes = store.family(ConceptsSection, level).sizes(tap)
        entry["tiny_concepts"] = float(((sizes >= 1) & (sizes <= 2)).mean()) if sizes is not None else None
        entry["median_members"] = float(np.median(sizes)) if sizes is not None else None
        entry["purity"] = ground.get("taps", {}).get(tap, {}).get("purity", {}).get("all")
    gig = store.family(GIGSection, level).summary()
    seconds = {stage: store.manifest.stages[f"{level}/{stage}"].seconds for stage in ("concepts", "decompose", "attribute")
               if f"{level}/{stage}" in store.manifest.stages}
    return {"level": level, "method": match["method"] if match else config.concepts.method,
            "k_multiplier": config.concepts.k_multiplier,
            "lambda_rel": None if config.concepts.method == "sae" else config.decompose.lambda_rel,
            "images": images, "taps": taps,
            "part_recall": ground.get("part_recall", {}).get("all"),
            "gap": _mean([g.get("mean_gap") for g in gig.values()]),
            "kept": _mean([g.get("mean_kept") for g in gig.values()]),
            "seconds": seconds}


def sweep_table(store: RunStore) -> list[dict[str, Any]]:
    """Every finished sweep point's row (:func:`point_row`)."""
    return [point_row(store, level) for level in sweep_levels(store)]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both (lower x, higher y), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_sweep(rows: list[dict[str, Any]], path) -> None:
    """The sweep's three Pareto plots side by side: C-Ins - C-Del against mean l0 (per source tap,
    averaged; the front over all points as a line), purity against K and seconds against K."""
    import matplotlib
    from matplotlib.figure import (
        Figure,  # not pyplot: a notebook's backend stays as it is
    )

    methods = sorted({row["method"] for row in rows})
    colours = dict(zip(methods, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]))
    figure = Figure(figsize=(15, 4.4))
    axes = figure.subplots(1, 3)

    def per_point(row, name):
        return _mean([entry.get(name) for entry in row["taps"].values()])

    xy = [(per_point(row, "mean_l0"), per_point(row, "score")) for row in rows]
    ks = sorted({row["k_multiplier"] for row in rows})
    for method in methods:
        mine = [(row, point) for row, point in zip(rows, xy) if row["method"] == method and None not in point]
        axes[0].scatter([p[0] for _, p in mine], [p[1] for _, p in mine], s=[18 + 10 * ks.index(r["k_multiplier"]) for r, _ in mine],
                        color=colours[method], label=method, alpha=0.8)
        for row, (x, y) in mine:
            axes[0].annotate(f"{row['k_multiplier']:g}C", (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        for axis, name in ((axes[1], "purity"), (axes[2], None)):
            by_k = {}
            for row, _ in mine:
                value = per_point(row, name) if name else sum(row["seconds"].values())
                if value is not None:
                    by_k.setdefault(row["k_multiplier"], []).append(value)
            if by_k:
                keys = sorted(by_k)
                axis.plot(keys, [np.mean(by_k[k]) for k in keys], "-o", color=colours[method], label=method)
                for k in keys:
                    axis.scatter([k] * len(by_k[k]), by_k[k], color=colours[method], s=10, alpha=0.5)
    valid = [i for i, point in enumerate(xy) if None not in point]
    front = [valid[i] for i in pareto([xy[i] for i in valid])]
    if front:
        axes[0].plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto front")
    axes[0].set(xlabel="mean l0 (concepts per PFV)", ylabel="C-Insertion - C-Deletion (GIG order)",
                title="score against sparsity")
    axes[1].set(xlabel="K / C (concepts per channel)", ylabel="median purity", title="purity against K (mean over lambdas)")
    axes[2].set(xlabel="K / C", ylabel="seconds (fit + decompose + attribute)", title="cost against K")
    from matplotlib.ticker import NullFormatter

    for axis in axes[1:]:  # K on a log2 axis, labelled at the grid's values only
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [f"{k:g}" for k in ks])
        axis.xaxis.set_minor_formatter(NullFormatter())
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    images = rows[0]["images"] if rows else 0
    figure.suptitle(f"gig-dist sweep: {len(rows)} points, {images} images each; marker size grows with K", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
