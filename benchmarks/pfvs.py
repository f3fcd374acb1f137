"""extract.pfvs: stored PFVs against PFVs recomputed by the stages that read them, on the
rehearsal's ResNet50 at 224 px, in-process, side by side: each stage's seconds and the store's
bytes, from extraction to the attribution.

    python benchmarks/pfvs.py [--images 32 --unit 16 --targets 4 --steps 8]
"""

from __future__ import annotations

import argparse

import torch
from _common import rehearsal_setup

from gig_dist.config import load_config


def bench_pfvs(args: argparse.Namespace) -> None:
    """extract.pfvs: stored PFVs against PFVs recomputed by the stages that read them, on the
    rehearsal's ResNet50 at 224 px, in-process, side by side: each stage's seconds and the store's
    bytes, from extraction to the attribution."""
    import shutil

    import numpy as np

    from gig_dist.formatting import fmt_bytes
    from gig_dist.pipeline import make_runtime, prepare
    from gig_dist.stages.registry import stages_until
    from gig_dist.store import RunStore

    root, config_file, overrides = rehearsal_setup(args)
    print(f"extract.pfvs on ResNet50 (random weights, random BatchNorm statistics) at 224 px, four stage outputs, "
          f"{args.images} toy-world images in units of {args.unit}, in-process on {torch.get_num_threads()} thread(s); "
          f"GIG {args.targets} targets x {args.steps} steps on 2 pairs")
    seconds: dict[str, dict[str, float]] = {}
    stored: dict[str, int] = {}
    for mode in ("store", "recompute"):
        config = load_config(config_file, [*overrides, f"extract.pfvs={mode}"])
        prepared = prepare(config, root / f"{mode}.zarr")
        seconds[mode] = {}
        try:
            with make_runtime(config) as runtime:
                for stage_type in stages_until("attribute"):
                    stage = stage_type(config, prepared.store.url, fence=prepared.lease.fence)
                    seconds[mode][stage.progress_key] = runtime.run(stage).seconds
        finally:
            prepared.lease.release()
        arrays = RunStore.open(prepared.store.url).describe_arrays()
        stored[mode] = sum(a["stored_bytes"] for a in arrays.values())
        stored[f"{mode}/pfv"] = sum(a["stored_bytes"] for path, a in arrays.items() if path.startswith("pfv/"))
    print(f"\n{'stage':<26} {'store':>9} {'recompute':>10} {'ratio':>7}")
    for key in seconds["store"]:
        a, b = seconds["store"][key], seconds["recompute"][key]
        print(f"{key:<26} {a:>8.1f}s {b:>9.1f}s {b / a:>7.2f}")
    total = {mode: float(np.sum(list(seconds[mode].values()))) for mode in seconds}
    print(f"{'total':<26} {total['store']:>8.1f}s {total['recompute']:>9.1f}s {total['recompute'] / total['store']:>7.2f}")
    n = args.images
    print(f"\nstore per image: {fmt_bytes(stored['store'] / n)} with PFVs ({fmt_bytes(stored['store/pfv'] / n)} of them), "
          f"{fmt_bytes(stored['recompute'] / n)} recomputing them ({fmt_bytes(stored['recompute/pfv'] / n)} of PFVs)")
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--unit", type=int, default=16, help="images per store unit")
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    bench_pfvs(parser.parse_args(argv))


if __name__ == "__main__":
    main()
