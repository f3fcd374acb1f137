"""The ``gig-dist`` command line.

    gig-dist run [--config FILE] [--out DIR] [-o key=value ...] [--overwrite] [--until STAGE]
    gig-dist inspect DIR [--json]
    gig-dist graph DIR --class C [--top N] [--json]
    gig-dist report DIR [--out SITE]
    gig-dist show DIR --tap T --concept K | --class C | --image I  [--out FILE.png]
    gig-dist taps [--config FILE] [-o key=value ...] [--all]
    gig-dist config [--config FILE] [-o key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gig_dist._version import __version__
from gig_dist.config import Config, ConfigError, load_config
from gig_dist.formatting import fmt_bytes
from gig_dist.stages.registry import stage_names, stages_until
from gig_dist.store import MetaSection


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config file (default: the embedded toy world)")
    parser.add_argument(
        "-o", "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override one config value, e.g. -o dataset.limit=100 (repeatable)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from gig_dist import pipeline

    if args.ray_address:
        args.overrides = ["runtime.kind=ray", f"runtime.address={args.ray_address}", *args.overrides]
    config = _config(args)
    if config.dataset.kind == "toy":
        from gig_dist.config import (
            TOY_GIG_IMAGES,
            TOY_LAMBDA_REL,
            TOY_SAMPLES_PER_IMAGE,
        )

        toy = {"sample.per_image": (config.sample.per_image, TOY_SAMPLES_PER_IMAGE),
               "decompose.lambda_rel": (config.decompose.lambda_rel, TOY_LAMBDA_REL),
               "gig.images": (config.gig.images, TOY_GIG_IMAGES)}
        used = [f"{key}={value}" for key, (value, default) in toy.items() if value == default]
        if used:
            print(f"toy world defaults: {', '.join(used)} (the ImageNet defaults do not suit 1,024 toy images; "
                  "see docs/getting-started.md)")
    def show_plan(decisions) -> None:
        print("plan (stage, keep or redo, why):")
        for decision in decisions:
            print(f"  {decision.describe()}")

    report = pipeline.run(config, args.out, overwrite=args.overwrite, until=args.until, on_plan=show_plan)
    from gig_dist.stages.registry import by_name

    for stage in report.stages:
        done_before = stage.units_total - stage.units_run
        resumed = f", {done_before} already done" if done_before else ""
        noun = by_name(stage.stage).unit_noun
        if stage.units_run == 0:
            print(f"{stage.stage}: kept ({stage.units_total} units done)")
            continue
        line = f"{stage.stage}: {stage.units_run}/{stage.units_total} units run{resumed} in {stage.seconds:.1f}s"
        if noun == "images":
            line += (f"; {stage.images} images ({stage.skipped} skipped, "
                     f"{stage.images_per_second:.1f} images/s)")
        print(line)
        for what, method in stage.methods.items():
            print(f"  {what}: {method}")
        if len(stage.placement) > 1 or stage.retries:
            print(f"  units per node: {dict(stage.placement)}; units rerun after a worker died: {stage.retries}")
    from gig_dist.store import RunStore

    counts = RunStore.open(report.url).family(MetaSection).image_counts()
    print(
        f"store: {report.url}\nimages: {counts['processed']} processed, {counts['skipped']} skipped, "
        f"{counts['pending']} pending of {counts['total']}"
    )
    if counts["skipped"]:
        print(f"skipped images and reasons: gig-dist inspect {report.url}")
    if config.report.enabled and args.until in (None, stages_until(None)[-1].name):
        site = report_folder(report.url, config.report.out)
        if site is None:
            print("report: the store is not on local disk; set report.out to build one (or gig-dist report)")
        else:
            _print_report(build_report(report.url, site))
    return 0


def report_folder(url: str, out: str | None) -> str | None:
    if out is not None:
        return out
    return None if "://" in url else url.removesuffix("/").removesuffix(".zarr") + ".report"


def _print_report(summary) -> None:
    missing = f"; missing: {'; '.join(sorted(set(summary.missing)))}" if summary.missing else ""
    print(f"report: {summary.site / 'index.html'} ({summary.pages} pages, {summary.images} images, "
          f"{summary.bytes / 2**20:.1f} MiB, {summary.seconds:.1f}s; graphs: {summary.graph_layout or 'none'}){missing}")


def build_report(url: str, site: str):
    from gig_dist.report import build_report as build

    return build(url, site)


def cmd_report(args: argparse.Namespace) -> int:
    from gig_dist.store import RunStore

    url = RunStore.open(args.dir).url
    site = args.out or report_folder(url, None)
    if site is None:
        raise ConfigError("the store is not on local disk: give --out SITE for the report")
    _print_report(build_report(url, site))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Insertion/deletion of concepts on the first N attributed images of a run, for each of its
    dictionaries; tables with the dictionary and the ordering as rows."""
    from gig_dist.kernels.evaluation import ORDERINGS
    from gig_dist.sweep import evaluate_levels

    stream = sys.stderr if args.json else sys.stdout
    found = evaluate_levels(args.dir, args.dicts, args.images, args.taps, args.match, args.overrides,
                            log=lambda line: print(line, file=stream, flush=True))
    images, results, ground, match = found["images"], found["results"], found["ground_truth"], found.get("match")
    config, dictionaries, seconds = found["config"], list(found["results"]), found["seconds"]
    site = report_folder(args.dir, config.report.out)
    if site is not None and (Path(site) / ".gig-dist-report").exists():
        print(f"the report at {site} was built before this evaluation: gig-dist report {args.dir} adds it there",
              file=stream)
    else:
        print(f"gig-dist report {args.dir} builds a report that shows this evaluation", file=stream)
    if args.json:
        print(json.dumps({"images": images, "steps": config.evaluate.steps, "results": results, "ground_truth": ground,
                          **({"match": match} if match else {})}, indent=2))
        return 0
    print(f"evaluate: {len(dictionaries)} dictionaries, {images} images, {config.evaluate.steps} steps, {seconds:.1f}s")
    if match:
        _print_match(match)
    keys = list(next(iter(results.values())))
    print("\nsparsity of each dictionary at the source taps (scores compare dictionaries fairly only at "
          "matched sparsity: gig-dist evaluate --match l0=N)")
    taps = list(dict.fromkeys(key.split(" -> ")[0] for key in keys))
    print(f"  {'dictionary':<32}" + "".join(f"{tap + ': R^2, l0, active/img':>34}" for tap in taps))
    for dictionary, found in results.items():
        cells = []
        for tap in taps:
            sparsity = next((found[k]["sparsity"] for k in found if k.startswith(tap + " -> ")), {})
            r2, l0, active = sparsity.get("r2"), sparsity.get("mean_l0"), sparsity.get("active_per_image")
            cells.append(f"{_fmt(r2, '.3f')}, {_fmt(l0, '.1f')}, {_fmt(active, '.0f')}")
        print(f"  {dictionary:<32}" + "".join(f"{cell:>34}" for cell in cells))
    forms = (("score", "by fraction of the image's active concepts (AUC over 0, 1/S, ..., 1)"),
             ("count_score", "by count: the first k = 1, 2, 4, ..., 32 concepts (mean of ins(k) - del(k))"))
    for title, keep in (("C-Insertion - C-Deletion (the class probability; higher: the first concepts carry the "
                         "class)", lambda key: key.endswith("-> logits")),
                        (f"inter-layer insertion - deletion (max_q <a_q, v_m> / full, first {config.evaluate.targets} "
                         "targets per image, averaged per image)", lambda key: not key.endswith("-> logits"))):
        columns = [key for key in keys if keep(key)]
        if not columns:
            continue
        for form, told in forms:
            print(f"\n{title}, {told}; mean +- 95% interval over images")
            print(f"  {'dictionary / ordering':<32}" + "".join(f"{key:>28}" for key in columns))
            for dictionary, found in results.items():
                for ordering in ORDERINGS:
                    cells = []
                    for key in columns:
                        mean, half, n = found.get(key, {}).get(ordering, {}).get(form, (float("nan"),) * 2 + (0,))
                        cells.append(f"{mean:+.3f} +- {half:.3f} ({n})")
                    print(f"  {dictionary + ' / ' + ordering:<32}" + "".join(f"{cell:>28}" for cell in cells))
    if ground:
        _print_ground(ground, config.evaluate.top_concepts)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """The concept-size and sparsity sweep: each (dictionary, K, lambda) a level of the run's
    store, run through evaluate on a subset of images; then the table of what each measured."""
    from gig_dist.store import RunStore
    from gig_dist.sweep import plot_sweep, run_sweep, sweep_levels, sweep_table

    store = RunStore.open(args.dir)
    if "sample" not in store.manifest.stages or not store.manifest.stages["sample"].finished:
        raise ConfigError(f"{args.dir} has no finished sample stage: gig-dist run it first (the sweep reuses its PFVs "
                          "and samples)")
    from gig_dist.kernels.dictionaries import DICTIONARIES
    from gig_dist.sweep import SWEEP_IMAGES

    methods = args.dicts or ["bisecting_kmeans", "kmeans"]
    unknown = [m for m in methods if m not in DICTIONARIES]
    if unknown:
        raise ConfigError(f"--dict {', '.join(unknown)}: the dictionaries are {', '.join(DICTIONARIES)}")
    images = args.images or SWEEP_IMAGES
    if images < 1:
        raise ConfigError(f"--images {images}: at least 1")
    if not args.table_only:
        run_sweep(args.dir, methods, _floats(args.k, "--k"), _floats(args.lambdas, "--lambda"), images,
                  out=sys.stderr if args.json else sys.stdout)
    store = RunStore.open(args.dir)
    if not sweep_levels(store):
        raise ConfigError(f"{args.dir} has no finished sweep point yet: run gig-dist sweep {args.dir}")
    rows = sweep_table(store)
    if args.plot:
        plot_sweep(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_sweep(rows)
    if args.plot:
        print(f"\nPareto plots: {args.plot}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"{flag} {text!r}: give positive numbers separated by commas, e.g. 1,2,4")
    return values


def _print_sweep(rows: list[dict[str, Any]]) -> None:
    from gig_dist.sweep import _mean

    def avg(row, name):
        return _mean([entry.get(name) for entry in row["taps"].values()])

    print(f"\nsweep: {len(rows)} points, {rows[0]['images']} images each; per point the mean over its source taps "
          "(C-Ins - C-Del and inter-layer: GIG order; tiny: concepts with 1-2 members)")
    header = ("level", "R^2", "l0", "score", "by count", "inter", "purity", "tiny", "recall", "gap", "kept", "fit s",
              "dec s", "GIG s")
    print(f"  {header[0]:<34}" + "".join(f"{h:>9}" for h in header[1:]))
    for row in rows:
        seconds = row["seconds"]
        cells = [(avg(row, "r2"), ".3f"), (avg(row, "mean_l0"), ".2f"), (avg(row, "score"), "+.3f"),
                 (avg(row, "count_score"), "+.3f"), (avg(row, "inter_layer"), "+.3f"), (avg(row, "purity"), ".3f"),
                 (avg(row, "tiny_concepts"), ".2f"), (row["part_recall"], ".2f"), (row["gap"], ".1e"),
                 (row["kept"], ".3f"), (seconds.get("concepts"), ".1f"), (seconds.get("decompose"), ".1f"),
                 (seconds.get("attribute"), ".1f")]
        print(f"  {row['level']:<34}" + "".join(f"{_fmt(value, spec):>9}" for value, spec in cells))


def _print_match(match: dict[str, Any]) -> None:
    metric, target = match["metric"], match["target"]
    print(f"\nmatched sparsity: each dictionary refit to {metric} = {target:g} (Lasso-coded: lambda_rel per tap; the "
          "SAE: retrained top-k); achieved over all decomposed images")
    print(f"  {'level':<32}{'tap':<14}{'setting':>20}{'R^2':>8}{'mean l0':>9}  within 10%")
    for level, entry in match["levels"].items():
        for tap, row in entry["taps"].items():
            setting = f"lambda_rel {row['lambda_rel']:.4g}" if "lambda_rel" in row else f"top-k {row['sae_top_k']}"
            print(f"  {level:<32}{tap:<14}{setting:>20}{_fmt(row['r2'], '.3f'):>8}{_fmt(row['mean_l0'], '.2f'):>9}  "
                  f"{'yes' if row['within_10pct'] else 'NO'}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_ground(ground: dict[str, dict], top: int) -> None:
    """The toy world's ground-truth tables of ``gig-dist evaluate``."""
    from gig_dist.store.evaluation import (
        GROUND_ORDERINGS,
        GROUND_REGIONS,
        GROUND_VARIANTS,
    )

    def cell(found) -> str:
        mean, half, n = found
        return f"{mean:.3f} +- {half:.3f}" if n else "-"

    first = next(iter(ground.values()))
    accuracy = first["accuracy"]
    print(f"\nground truth (toy world, {first['images']} images): model accuracy {accuracy['image']:.3f} on the "
          f"images, {accuracy['with distractor']:.3f} with a distractor object of another class (which it predicts "
          f"on {first['predicts_distractor']:.3f})")
    if any("part_recall" in found for found in ground.values()):
        print("\npurity (median over concepts of the share of their members' iERF mass on one part type) and "
              "part recall (part types some concept covers with purity >= 0.8); all concepts | the classes' "
              f"top {top} by GIG")
        taps = list(first["taps"])
        print(f"  {'dictionary':<22}" + "".join(f"{tap:>18}" for tap in taps) + f"{'part recall':>18}")
        for dictionary, found in ground.items():
            cells = []
            for tap in taps:
                purity = found["taps"][tap].get("purity")
                cells.append(f"{purity['all']:.2f} | {purity['class_top']:.2f}" if purity and purity["class_top"]
                             is not None else "-")
            recall = found.get("part_recall")
            cells.append(f"{recall['all']:.2f} | {recall['class_top']:.2f}" if recall else "(no atlas)")
            print(f"  {dictionary:<22}" + "".join(f"{c:>18}" for c in cells))
    print(f"\nwhere the iERF mass of the class's top {top} concepts by GIG falls, against random active concepts "
          "and the pixels; mean +- 95% interval over images")
    header = "".join(f"{region:>20}" for region in GROUND_REGIONS)
    for v, variant in enumerate(GROUND_VARIANTS):
        print(f"  {variant + ': dictionary / tap / concepts':<55}{header}{'active':>9}")
        pixels = first["pixels"][variant]
        print(f"    {'pixels':<53}" + "".join(f"{cell(pixels[region]):>20}" for region in GROUND_REGIONS))
        for dictionary, found in ground.items():
            for tap, entry in found["taps"].items():
                for ordering in GROUND_ORDERINGS:
                    e = entry[variant][ordering]
                    active = f"{e['active']:.2f}" if e["active"] is not None else "-"
                    print(f"    {dictionary + ' / ' + tap + ' / ' + ordering:<53}"
                          + "".join(f"{cell(e[region]):>20}" for region in GROUND_REGIONS) + f"{active:>9}")


def cmd_show(args: argparse.Namespace) -> int:
    from gig_dist.read import open_run

    run = open_run(args.dir)
    if sum(x is not None for x in (args.cls, args.tap, args.image)) != 1:
        raise ConfigError("show needs --tap T --concept K, --class C or --image I")
    try:
        if args.image is not None:
            figure = run.show_image(args.image)
            default = f"image-{args.image}.png"
        elif args.cls is not None:
            figure = run.show_class(args.cls)
            default = f"class-{args.cls}.png"
        else:
            if args.concept is None:
                raise ConfigError("show --tap needs --concept K")
            figure = run.show_concept(args.tap, args.concept)
            default = f"{args.tap}-{args.concept}.png"
    except (KeyError, IndexError) as exc:  # the notebook API's lookups: one line here
        raise ConfigError(str(exc.args[0])) from None
    out = args.out or default
    figure.savefig(out, dpi=150, bbox_inches="tight")
    print(f"wrote {out}")
    return 0



def cmd_inspect(args: argparse.Namespace) -> int:
    from gig_dist.read import inspect_summary

    summary = inspect_summary(args.dir)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"store   {summary['store']}")
    print("stages")
    for name, stage in summary["stages"].items():
        state = "complete" if stage["complete"] else "incomplete"
        stale = f"  stale: {', '.join(stage['stale'])} was redone since" if stage["stale"] else ""
        asked = (f" ({stage['coverage_key']} = {stage['coverage']} asks for {stage['units_covered']})"
                 if "units_covered" in stage else "")
        print(f"  {name:<28} {state:<10} {stage['units_done']} of {stage['units']} units done{asked}{stale}")
        for what, method in summary["methods"].get(name, {}).items():
            print(f"  {'':<28} {what}: {method}")
        for what, value in summary["summaries"].get(name, {}).items():
            print(f"  {'':<28} {what}: {value}")
    images = summary["images"]
    print(
        f"images  {images['total']} total: {images['processed']} processed, {images['skipped']} skipped, "
        f"{images['pending']} pending"
    )
    labels = summary["labels"]
    print(f"labels  {labels['description']} ({labels['dataset_classes']} dataset classes, "
          f"{labels['outputs']} model outputs)")
    for name, c in summary["coverage"].items():
        print(f"  {name:<10} {c['images']} images over {c['classes']} of {c['of_classes']} classes, "
              f"{c['per_class_min']}-{c['per_class_max']} per class (median {c['per_class_median']:g})")
    for row in summary["skipped"][:20]:
        print(f"  skipped #{row['index']} {row['path']}: {row['reason']}")
    if len(summary["skipped"]) > 20:
        print(f"  ... and {len(summary['skipped']) - 20} more (--json lists all)")
    for name, found in summary["dictionaries"].items():
        print(f"dictionary {name}")
        if found["concepts"]:
            print("  concepts (fit on the samples)")
            for tap, fit in found["concepts"].items():
                explained = f"{fit['explained']:.3f}" if fit.get("explained") is not None else "-"
                loss = (f"  training loss {fit['loss_first']:.4g} -> {fit['loss_last']:.4g}"
                        if fit.get("loss_first") is not None else "")
                print(f"    {tap:<16} K {fit['k']:<6} from {fit['samples']} samples ({fit['mean_members']:.1f} per "
                      f"concept, {fit['singletons']} singletons, {fit['zero_concepts']} zero)  variance explained "
                      f"{explained}{loss}")
        if found["codes"]:
            print("  codes (sparse codes of every PFV)")
            for tap, c in found["codes"].items():
                if not c["pfvs"]:
                    print(f"    {tap:<16} not decomposed yet")
                    continue
                r2 = f"{c['r2']:.4f}" if c.get("r2") is not None else "-"
                ratio = f"{c['l0_ratio']:.4f}" if c.get("l0_ratio") is not None else "-"
                cut = f"  ({c['truncated']} PFVs cut to the stored slots)" if c["truncated"] else ""
                print(f"    {tap:<16} {c['pfvs']} PFVs  mean l0 {c['mean_l0']:.2f}  l0 ratio {ratio}  R^2 {r2}  "
                      f"max l0 {c['max_l0']}{cut}")
        if found["gig"]:
            print("  GIG (dataset matrices; completeness gap |sum_k GIG - (S(F(X~)) - S(F(0)))| / |S(F(X~)) - S(F(0))|;\n"
                  "       kept: the share of the real change the reconstruction keeps, "
                  "[S(F(X~)) - S(F(0))] / [S(F(X)) - S(F(0))])")
            for key, g in found["gig"].items():
                source, target = g["pair"]
                gaps = (f"mean gap {g['mean_gap']:.2e}  median {g['median_gap']:.2e}  max {g['max_gap']:.2e}"
                        if g.get("mean_gap") is not None else "no targets")
                if g.get("mean_kept") is not None:
                    gaps += f"  kept {g['mean_kept']:.3f} (median {g['median_kept']:.3f})"
                per = f" ({g['targets'] / g['images']:.0f} per image)" if g["images"] else ""
                print(f"    {source} -> {target:<10} matrix {tuple(g['matrix'])}  {g['images']} images, "
                      f"{g['targets']} image-target pairs{per}, {g['steps']} steps ({g['rule']})  {gaps}")
                if g.get("steps_used"):
                    before = g["gap_before"]
                    used = ", ".join(f"{count} at {steps}" for steps, count in g["steps_used"].items())
                    told = (f"mean {before['mean']:.2e}  median {before['median']:.2e}  max {before['max']:.2e}"
                            if before.get("mean") is not None else "none")
                    print(f"      refined by gig.max_gap: targets by steps used: {used}; gap at {g['steps']} steps: "
                          f"{told}")
    print("arrays")
    for path, a in summary["arrays"].items():
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        print(
            f"  {path:<40} {str(tuple(a['shape'])):<20} {a['dtype']:<14} chunks {tuple(a['chunks'])}{shards}"
            f"  {fmt_bytes(a['stored_bytes'])}"
        )
    print("versions " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    print("config")
    print("  " + yaml.safe_dump(summary["config"], sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from gig_dist.read import open_run

    run = open_run(args.dir, args.dict)
    if run.dictionary not in run.store.dictionaries():
        raise ConfigError(f"no dictionary {run.dictionary!r} in {args.dir}; it has "
                          f"{', '.join(run.store.dictionaries()) or 'none'}")
    graph = run.graph(args.cls, top=args.top, gamma=args.gamma)
    if args.json:
        print(json.dumps(graph, indent=2))
        return 0
    gamma = graph.get("gamma", "dataset")
    kind = "dataset class" if graph.get("classes") == "dataset" else "class"
    print(f"{kind} {graph['class']} ({graph['class_name']}): top concepts by GIG, tap by tap "
          f"({' <- '.join(graph['taps'])}); lower levels from the {gamma} Gamma"
          + (f" over {graph['images']} images of the class" if gamma == "class" and "images" in graph else ""))
    if graph.get("empty"):
        print(f"  empty graph: {graph['empty']}")
        return 0
    print("  (GIG value, and in brackets relative to the strongest edge of its level)")
    into: dict[tuple, list[dict[str, Any]]] = {}
    for edge in graph["edges"]:
        into.setdefault(tuple(edge["target"]), []).append(edge)
    shared = {(n["tap"], n["concept"]): n.get("shared_with_names", n["shared_with"]) for n in graph["nodes"]}

    def show(node: tuple, depth: int) -> None:
        for edge in into.get(node, []):
            source = tuple(edge["source"])
            names = shared.get(source) or []
            mark = f"  shared with {', '.join(map(str, names[:6]))}{' ...' if len(names) > 6 else ''}" if names else ""
            relative = f" [{edge['relative']:.2f}]" if "relative" in edge else ""
            print(f"{'  ' * depth}{source[0]}:{source[1]}  GIG {edge['weight']:+.4g}{relative}{mark}")
            show(source, depth + 1)

    show(("class", graph["class"]), 1)
    return 0


def cmd_taps(args: argparse.Namespace) -> int:
    from gig_dist.kernels.taps import TRUNKS, block_names, no_blocks_message, survey
    from gig_dist.models.loading import build_model, resolve_transform

    config = _config(args)
    model = build_model(config.model)
    crop = resolve_transform(config).crop
    blocks = block_names(model)
    names = [n for n, _ in model.named_modules() if n] if args.all else blocks
    if not names:
        # Nothing recognised: say why, and show where taps could be.
        print(f"gig-dist: {no_blocks_message(model)}", file=sys.stderr)
        candidates = [n for n, _ in model.named_children()] + [n for n in TRUNKS if n in dict(model.named_modules())]
        found = survey(model, list(dict.fromkeys(candidates)), (crop, crop), config.model.prefix_tokens)
        print(f"{config.model.name} at {crop}x{crop}: its top-level modules", file=sys.stderr)
        _print_survey(found, sys.stderr)
        return 1
    found = survey(model, names, (crop, crop), config.model.prefix_tokens)
    kind = "every module" if args.all else "its block outputs (the default taps)"
    print(f"{config.model.name} at {crop}x{crop}: {kind}; tap  C x H x W  (PFVs per image)  layout")
    _print_survey(found, sys.stdout)
    return 0


def _print_survey(found: dict, stream) -> None:
    width = max([24, *(len(name) for name in found)])
    for name, what in found.items():
        if isinstance(what, str):
            print(f"  {name:<{width}} -  ({what})", file=stream)
        else:
            shape, layout = what
            extra = f"tokens, {layout.prefix} prefix" if layout.kind == "tokens" else layout.kind
            print(f"  {name:<{width}} {shape.channels} x {shape.height} x {shape.width}  ({shape.positions})  {extra}",
                  file=stream)


def cmd_plan(args: argparse.Namespace) -> int:
    from gig_dist.plan import GiB, make_plan, render

    config = _config(args)
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images must be at least 1, got {args.images}")
    if args.workers < 1 or args.calibrate < 0:
        raise ConfigError("--workers must be at least 1 and --calibrate at least 0")
    memory = int(args.worker_memory * GiB) if args.worker_memory else None
    plan = make_plan(config, images=args.images, workers=args.workers, device=args.device, calibrate=args.calibrate,
                     out=args.out or config.store.path, worker_memory=memory, gpu=args.gpu,
                     efficiency=args.calibration, price_per_gpu_hour=args.price_per_gpu_hour, cluster=args.cluster)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(render(plan, arrays=not args.brief))
    return 2 if plan.problems else 0


def cmd_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gig-dist",
        description="Dataset-scale mechanistic interpretability of image models (GIG).",
    )
    parser.add_argument("--version", action="version", version=f"gig-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every skipped image and more")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (default: the embedded toy world)")
    _add_config_args(run)
    run.add_argument("--out", help="run store: a directory or fsspec URL (default: store.path, gig-dist-run.zarr)")
    run.add_argument("--overwrite", action="store_true", help="discard an existing run store at --out")

    run.add_argument("--until", metavar="STAGE", choices=stage_names(),
                     help=f"stop after this stage ({', '.join(stage_names())}); rerun without it to go on")
    run.add_argument(
        "--ray-address", metavar="ADDR",
        help="run on the Ray cluster at ADDR (e.g. 127.0.0.1:6379 or auto); same as -o runtime.kind=ray -o runtime.address=ADDR",
    )
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="show a run store: stages, arrays, images, config")
    inspect.add_argument("dir", metavar="DIR")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

    graph = sub.add_parser("graph", help="the concept graph of a class, from the GIG matrices of a finished run")
    graph.add_argument("dir", metavar="DIR")
    graph.add_argument("--class", dest="cls", required=True, metavar="C", help="class index or name")
    graph.add_argument("--top", type=int, help="concepts per level (default: gig.graph_top of the run)")
    graph.add_argument("--json", action="store_true", help="the graph as JSON (nodes, edges, shared concepts)")
    graph.add_argument("--dict", help="the dictionary (default: the run's concepts.method)")
    graph.add_argument("--gamma", choices=("class", "dataset"),
                       help="lower levels from the class's own GIG means or the dataset's (default: gig.graph_gamma)")
    graph.set_defaults(func=cmd_graph)

    report = sub.add_parser("report", help="a static site of a run: concepts with their members, class graphs, summary")
    report.add_argument("dir", metavar="DIR")
    report.add_argument("--out", metavar="SITE", help="folder for the site (default: DIR without .zarr, plus .report)")
    report.set_defaults(func=cmd_report)

    evaluate = sub.add_parser("evaluate", help="concept insertion/deletion: does GIG's order beat random, code "
                                                "mass and gradient x code?")
    evaluate.add_argument("dir", metavar="DIR")
    evaluate.add_argument("--images", type=int, help="evaluate the first N attributed images (default 64)")
    evaluate.add_argument("-o", "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                          help="override an evaluate.* setting, e.g. -o evaluate.steps=20")
    evaluate.add_argument("--dict", dest="dicts", action="append", metavar="NAME",
                          help="a dictionary of the run (repeatable; default: every one with finished GIG)")
    evaluate.add_argument("--taps", nargs="+", metavar="TAP",
                          help="evaluate only the pairs from these taps (default: every GIG pair)")
    evaluate.add_argument("--match", metavar="l0=N|r2=X",
                          help="refit each dictionary to one sparsity first (a level <dict>@l0=N beside it: lambda_rel "
                               "per tap for the Lasso-coded ones, a top-k SAE), then compare those")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = sub.add_parser("sweep", help="the concept-size and sparsity sweep: K x lambda per dictionary, each a "
                                          "level of the run, evaluated on a subset; a table and Pareto plots")
    sweep.add_argument("dir", metavar="DIR")
    sweep.add_argument("--dict", dest="dicts", action="append", metavar="NAME",
                       help="a dictionary method (repeatable; default: bisecting_kmeans and kmeans)")
    sweep.add_argument("--k", default="1,2,4,8,16", metavar="M1,M2,...",
                       help="concepts.k_multiplier values (K = M x channels; default 1,2,4,8,16)")
    sweep.add_argument("--lambda", dest="lambdas", default="0.025,0.05,0.1", metavar="L1,L2,...",
                       help="decompose.lambda_rel values (default 0.025,0.05,0.1; the SAE takes none)")
    sweep.add_argument("--images", type=int, default=None, metavar="N",
                       help="images each point decomposes, attributes and evaluates (default 16), rounded up to whole store "
                       "units (store.images_per_unit)")
    sweep.add_argument("--plot", metavar="FILE", help="write the Pareto plots (.png) there")
    sweep.add_argument("--table-only", action="store_true", help="only the table of the points already finished")
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    show = sub.add_parser("show", help="a figure of a concept (its members on their images), a class graph or an image")
    show.add_argument("dir", metavar="DIR")
    show.add_argument("--tap", help="the concept's tap")
    show.add_argument("--concept", type=int, metavar="K", help="the concept's index")
    show.add_argument("--class", dest="cls", metavar="C", help="class index or name: its concept graph")
    show.add_argument("--image", type=int, metavar="I", help="an image: its prediction, and per tap its concepts "
                      "where they are, with their GIG toward its class")
    show.add_argument("--out", metavar="FILE", help="image file (.png, .svg, .pdf; default: named after it)")
    show.set_defaults(func=cmd_show)

    taps = sub.add_parser("taps", help="list a model's taps and their shapes (no dataset needed)")
    _add_config_args(taps)
    taps.add_argument("--all", action="store_true", help="every module, not only residual block outputs")
    taps.set_defaults(func=cmd_taps)

    plan = sub.add_parser("plan", help="what a run will take, without running it: units, bytes, memory, time")
    _add_config_args(plan)
    plan.add_argument("--images", type=int, metavar="N",
                      help="plan N images (the dataset need not be on this machine); default: the dataset's")
    plan.add_argument("--workers", type=int, default=1, metavar="W", help="workers to project the time over")
    plan.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the workers' device")
    plan.add_argument("--calibrate", type=int, default=0, metavar="M",
                      help="run M units of every stage here first: measured times, compression, sizes")
    plan.add_argument("--out", help="where the store would go (its free disk is checked)")
    plan.add_argument("--worker-memory", type=float, metavar="GIB", help="a worker's memory, to warn against")
    plan.add_argument("--gpu", default="a10g", help="with --device cuda: the GPU the time model assumes: a10g, l4, "
                      "a100, h100 or h200 (default a10g)")
    plan.add_argument("--calibration", metavar="FILE", help="efficiency factors jobs/gpu_check.py measured on a GPU "
                      "(--efficiency-out): the GPU times are then calibrated, not modelled")
    plan.add_argument("--price-per-gpu-hour", type=float, metavar="PRICE", help="price the GPU-hours")
    plan.add_argument("--cluster", metavar="FILE", help="cluster.yaml or a RayJob manifest: flag every stage whose "
                      "peak exceeds a node type's memory")
    plan.add_argument("--brief", action="store_true", help="stages only, not every array")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    config = sub.add_parser("config", help="print the validated config with every default filled in")
    _add_config_args(config)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gig_dist.kernels.taps import TapError
    from gig_dist.stages.base import UnitFailed
    from gig_dist.store import StoreError

    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"gig-dist: warning: {message}\n"
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, TapError, StoreError, UnitFailed) as exc:
        print(f"gig-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gig-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gig-dist inspect DIR | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
