"""An ImageNet-shaped rehearsal: ResNet50 at 224 px (random weights with randomised BatchNorm
statistics, loaded from a state-dict file as a user's would be) on toy-world images rendered at
224 px, the four stage outputs, every stage, on Ray with 2 workers. `gig-dist plan` is
calibrated on the first units here, projected to the whole run, and printed beside the
measured figures; then the same calibration projects the ImageNet config to 50,000 images.

    python benchmarks/rehearsal.py [--images 64 --unit 16 --calibrate 2 --targets 4 --steps 8]
"""

from __future__ import annotations

import argparse
import time

from _common import rehearsal_setup

from gig_dist.config import load_config


def bench_rehearsal(args: argparse.Namespace) -> None:
    """An ImageNet-shaped rehearsal: ResNet50 at 224 px (random weights with randomised BatchNorm
    statistics, loaded from a state-dict file as a user's would be) on toy-world images rendered at
    224 px, the four stage outputs, every stage, on Ray with 2 workers. `gig-dist plan` is
    calibrated on the first units here, projected to the whole run, and printed beside the
    measured figures; then the same calibration projects the ImageNet config to 50,000 images."""
    import numpy as np

    from gig_dist.pipeline import make_runtime, prepare
    from gig_dist.plan import (
        PeakRSS,
        calibrate_run,
        fmt_bytes,
        fmt_seconds,
        make_plan,
        plan_facts,
        render,
    )
    from gig_dist.stages.registry import stages_until
    from gig_dist.store import RunStore

    root, config_file, overrides = rehearsal_setup(args)
    config = load_config(config_file, overrides)
    print(f"rehearsal: ResNet50 (random weights, random BatchNorm statistics) at 224 px, taps {', '.join(config.taps)}, "
          f"{args.images} toy-world images in units of {args.unit}; GIG {args.targets} targets x {args.steps} steps on "
          f"2 pairs; plan calibrated on the first {args.calibrate} unit(s) in-process, the run on Ray with 2 workers")
    started = time.perf_counter()
    calibration = calibrate_run(config, args.calibrate, "cpu", stand_in=False, facts=plan_facts(config, None)[0])
    print(f"calibration: {calibration['images']} images in {time.perf_counter() - started:.0f} s")
    plan = make_plan(config, workers=2, calibration=calibration)
    planned = {s.key: s for s in plan.stages}

    ray_config = load_config(config_file, [*overrides, "runtime.kind=ray", "runtime.num_workers=2",
                                           "runtime.cpus_per_worker=1"])
    prepared = prepare(ray_config, root / "rehearsal.zarr")
    measured = {}
    try:
        with make_runtime(ray_config) as runtime:
            for stage_type in stages_until(None):
                stage = stage_type(ray_config, prepared.store.url, fence=prepared.lease.fence)
                with PeakRSS() as driver:
                    report = runtime.run(stage)
                measured[stage.progress_key] = (report, driver.peak)
    finally:
        prepared.lease.release()
    store = RunStore.open(prepared.store.url)
    arrays = store.describe_arrays()
    n = store.num_images

    print(f"\nper stage, measured on Ray (2 workers, {n} images) against the plan's projection from "
          f"{calibration['images']} images (time error = projected / measured - 1):")
    print(f"{'stage':<26} {'units':>5} {'img/s':>7} {'measured':>9} {'projected':>9} {'error':>7} "
          f"{'B/img stored':>12} {'projected':>10} {'error':>7} {'worker peak':>11} {'formula':>10} {'driver peak':>11}")
    for key, (report, driver_peak) in measured.items():
        p = planned[key]
        owned = [path for path in store.owned_arrays(key) if path in arrays]
        stored = sum(arrays[path]["stored_bytes"] for path in owned) / n
        projected = p.compressed / n
        error = f"{p.seconds / report.seconds - 1:+.0%}" if p.seconds and report.seconds else "-"
        b_error = f"{projected / stored - 1:+.0%}" if stored else "-"
        print(f"{key:<26} {report.units_run:>5} {report.images_per_second:>7.2f} {fmt_seconds(report.seconds):>9} "
              f"{fmt_seconds(p.seconds):>9} {error:>7} {fmt_bytes(stored):>12} {fmt_bytes(projected):>10} {b_error:>7} "
              f"{fmt_bytes(report.worker_peak_rss):>11} {fmt_bytes(p.footprint.worker):>10} {fmt_bytes(driver_peak):>11}")
    print("\nbytes per image of every array (stored, compressed; raw in brackets):")
    for path, a in arrays.items():
        if "str" in a["dtype"].lower() or path.startswith("progress/"):
            continue
        raw = int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
        print(f"  {path:<56} {a['dtype']:<8} {fmt_bytes(a['stored_bytes'] / n):>10}  ({fmt_bytes(raw / n)})")

    full = load_config(config_file, [])
    imagenet = make_plan(full, images=50_000, workers=8, device="cuda", calibration=calibration)
    print("\nthe ImageNet config projected to 50,000 images on 8 workers from this calibration (its compression "
          "ratios and widths; its times are this CPU's at the rehearsal's K and GIG settings, not a GPU's):")
    print(render(imagenet, arrays=False))
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--unit", type=int, default=16, help="images per store unit")
    parser.add_argument("--calibrate", type=int, default=2, help="units the plan is calibrated on")
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    bench_rehearsal(parser.parse_args(argv))


if __name__ == "__main__":
    main()
