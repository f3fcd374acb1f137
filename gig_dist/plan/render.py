"""The plan as text: ``gig-dist plan``'s output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gig_dist.formatting import fmt_bytes, fmt_seconds

if TYPE_CHECKING:
    from gig_dist.plan.core import Plan


def render(plan: Plan, arrays: bool = True) -> str:
    lines = [f"plan: {plan.images:,} images (from {plan.images_from}), {plan.workers} worker(s) on {plan.device}"]
    for note in plan.notes:
        lines.append(f"  note: {note}")
    if plan.problems:
        lines.append(f"checks: {len(plan.problems)} problem(s); `gig-dist run` would refuse:")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("checks: every stage's checks pass")
    gpu = plan.modelled_seconds is not None
    header = f"{'stage':<26} {'units':>7} {'raw':>11} {'compressed':>11} {'worker peak':>12} {'driver':>10} {'time':>9}"
    if gpu:
        header += f" {'GPU time':>10}"
        lines.append(f"GPU model: {plan.workers} x {plan.gpu}, {plan.gpu_basis} (gig_dist/cost.py)")
    lines += ["", header, "-" * len(header)]
    for s in plan.stages:
        measured = s.measured.get("peak_rss")
        bound = "<=" if not plan.widths_measured and any(a.data_dependent for a in s.arrays) else ""
        lines.append(f"{s.key:<26} {s.units:>7} {bound + fmt_bytes(s.raw):>11} {bound + fmt_bytes(s.compressed):>11} "
                     f"{fmt_bytes(s.footprint.worker):>12} {fmt_bytes(s.footprint.driver):>10} {fmt_seconds(s.seconds):>9}"
                     + (f" {fmt_seconds(s.modelled_seconds):>10} ({s.bound_by})" if gpu else "")
                     + (f"   (calibration: {s.measured['units']} units in {s.measured['seconds']:.1f} s, "
                        f"peak RSS {fmt_bytes(measured)})" if measured else ""))
        for name, shape, dtype in s.footprint.dense:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            lines.append(f"    dense  {name} {tuple(shape)} {dtype}: {fmt_bytes(nbytes)}")
        if arrays:
            for a in s.arrays:
                flag = (" (data-dependent width)" if a.data_dependent else "") + \
                    (" (deleted once reduced)" if a.transient else "")
                lines.append(f"    {a.path:<48} {str(a.shape):<26} {a.dtype:<8} {fmt_bytes(a.raw):>10} "
                             f"-> {fmt_bytes(a.compressed):>10}{flag}")
    lines.append("-" * len(header))
    total = sum(s.seconds for s in plan.stages if s.seconds is not None) if plan.calibration else None
    lines.append(f"{'total':<26} {'':>7} {fmt_bytes(plan.raw):>11} {fmt_bytes(plan.compressed):>11} "
                 f"{'':>12} {'':>10} {fmt_seconds(total):>9}")
    if gpu:
        cost = (f", {plan.gpu_hours * plan.price_per_gpu_hour:,.2f} at {plan.price_per_gpu_hour:g} per GPU-hour"
                if plan.price_per_gpu_hour is not None else " (--price-per-gpu-hour prices it)")
        lines.append(f"{'GPU total':<26} wall {fmt_seconds(plan.modelled_seconds)} on {plan.workers} GPU(s), "
                     f"{plan.gpu_hours:,.1f} GPU-hours{cost}; {plan.gpu_basis}")
    if plan.peak > plan.compressed:
        lines.append(f"{'at its fullest':<26} {'':>7} {'':>11} {fmt_bytes(plan.peak):>11}   (with the per-source GIG, "
                     "deleted once reduced unless gig.keep_image_attributions)")
    if not plan.calibration:
        lines.append("without --calibrate M (M units of each stage run here first): compressed = raw, no times, and "
                     "<= marks stages whose array widths depend on the data (an image's active concepts, the "
                     "atlas's crops per unit), planned at their bounds")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
