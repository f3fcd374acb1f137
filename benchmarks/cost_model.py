"""The GPU time model validated where it can be measured: this CPU as the device (its own
measured float32 and float64 matmul FLOP/s and memory bandwidth), the model's predicted time of
every stage against the stage's measured time on the rehearsal's world, side by side.

    python benchmarks/cost_model.py [--images 64 --unit 16 --targets 4 --steps 8]

The world is the rehearsal's (``python benchmarks/rehearsal.py``): ResNet50 with random
weights and random BatchNorm statistics at 224 px, its four stage outputs, GIG on 2 pairs. The
stages run in-process on every core; the prediction is :mod:`gig_dist.cost`'s, with its modelled
efficiency factors (the same ones a GPU plan uses) and the work it counts. Compared: each stage's
units' own seconds (the start-up is left out of both).
"""

from __future__ import annotations

import argparse
import platform
import time


def main(argv: list[str] | None = None) -> None:
    import torch
    from _common import rehearsal_setup as _rehearsal_setup

    from gig_dist.config import load_config
    from gig_dist.cost import EFFICIENCY, Work, measure_cpu, stage_work
    from gig_dist.plan import calibrate_run, plan_facts
    from gig_dist.stages.registry import stages_until
    from gig_dist.stages.sizes import PlanSizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--unit", type=int, default=16)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("-o", "--set", action="append", default=[])
    args = parser.parse_args(argv)
    _, config_file, overrides = _rehearsal_setup(args)
    config = load_config(config_file, overrides)
    cpu = measure_cpu()
    print(f"cost model against measured stage times: ResNet50 at 224 px, {args.images} images, in-process on "
          f"{torch.get_num_threads()} threads; {platform.node()}, {time.strftime('%Y-%m-%d')}")
    print(f"device: {cpu.name}: {cpu.fp32 / 1e9:.1f} GFLOP/s float32, {cpu.fp64 / 1e9:.1f} GFLOP/s float64, "
          f"{cpu.bandwidth / 1e9:.1f} GB/s; efficiency {EFFICIENCY}")
    calibration = calibrate_run(config, args.images // args.unit, "cpu", stand_in=False)
    facts, _ = plan_facts(config, None)
    sizes = PlanSizes(config, facts, calibration)
    print(f"{'stage':<28} {'images':>6} {'measured':>9} {'modelled':>9} {'ratio':>6}  bound by")
    for stage_type in stages_until(None):
        stage = stage_type(config, "memory://cost")
        measured = calibration["stages"].get(stage.progress_key)
        if measured is None:
            continue
        work = stage_work(stage, config, facts, sizes)
        images = measured["images"]
        per = {kind: Work(**{kind: getattr(work, kind)}).seconds(cpu, EFFICIENCY, torch.get_num_threads())
               for kind in ("network", "fp32", "fp64", "memory", "storage", "decode", "fixed")}
        modelled = max(per.values()) * (1 if work.per_stage else images)
        seconds = measured["unit_seconds"]
        print(f"{stage.progress_key:<28} {images:>6} {seconds:>8.1f}s {modelled:>8.1f}s {modelled / seconds:>6.2f}  "
              f"{max(per, key=per.get) if modelled else '-'}")


if __name__ == "__main__":
    main()
