"""Helpers the benchmarks share (not a benchmark): configs for a model at a size, the machine's busy
cores, the bare forward pass and an extraction run, the rehearsal's ResNet50 world."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from gig_dist import pipeline
from gig_dist.config import Config, load_config
from gig_dist.data.sources import ImageLoader, build_index
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages.extract import ExtractStage


def config_for(args: argparse.Namespace, images: int, *extra: str) -> Config:
    overrides = [
        f"model.name={args.model}",
        f"extract.batch_size={args.batch_size}",
        "runtime.progress=false",
        "runtime.device=cpu",
        *args.set,
        *extra,
    ]
    if args.model != "toy":
        overrides += ["model.weights=none"]
        # the photos given, else toy-world images rendered at the model's 224 px
        overrides += (["dataset.kind=imagefolder", f"dataset.path={args.data}"] if args.data else
                      ["dataset.toy.image_size=224"])
    overrides += [f"dataset.toy.num_images={images}", f"dataset.limit={images}"]
    return load_config(None, overrides)


class BusyCores:
    """Average number of busy cores of the whole machine between enter and exit (Linux)."""

    @staticmethod
    def _ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def __enter__(self) -> BusyCores:
        self.start = self._ticks()
        return self

    def __exit__(self, *exc) -> None:
        busy, total = (b - a for a, b in zip(self.start, self._ticks()))
        self.cores = (os.cpu_count() or 1) * busy / max(total, 1)


@torch.no_grad()
def bare_forward(config: Config, repeats: int = 2) -> tuple[float, float]:
    """Images/s of model(x) alone, on inputs decoded beforehand, with every core; busy cores."""
    model = build_model(config.model).to(memory_format=torch.channels_last)
    loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels, config.dataset.loader_threads)
    index = build_index(config.dataset)
    inputs = [f.result().image for f in loader.submit_all(index.paths)]
    inputs = torch.stack([x for x in inputs if x is not None]).contiguous(memory_format=torch.channels_last)
    loader.close()
    batch = config.extract.batch_size
    model(inputs[:batch])  # warm-up
    best, cores = float("inf"), 0.0
    for _ in range(repeats):
        with BusyCores() as busy:
            started = time.perf_counter()
            for first in range(0, len(inputs), batch):
                model(inputs[first : first + batch])
            elapsed = time.perf_counter() - started
        if elapsed < best:
            best, cores = elapsed, busy.cores
    return len(inputs) / best, cores


def extraction(config: Config, out: Path, trace_driver: bool = False) -> tuple[float, float, float]:
    """Images/s of the extraction stage (store prepared beforehand), busy cores, and (Ray only,
    where no work runs in this process) the driver's peak Python allocation in MiB."""
    # extraction's own checks only: a small photo folder need not satisfy the concept settings
    prepared = pipeline.prepare(config, out, overwrite=True, until="extract")
    prepared.lease.release()
    store = prepared.store
    if trace_driver:
        tracemalloc.start()
    with pipeline.make_runtime(config) as runtime, BusyCores() as busy:
        report = runtime.run(ExtractStage(config, store.url))
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace_driver else float("nan")
    tracemalloc.stop()
    return report.images / report.seconds, busy.cores, peak


def rehearsal_setup(args: argparse.Namespace) -> tuple[Path, str, list[str]]:
    """The rehearsal's world: ResNet50 with random weights and random BatchNorm statistics, saved
    as a state-dict file (as a user's weights would be), on toy-world images at 224 px."""
    from jobs.gpu_check import _random_bn

    root = Path(tempfile.mkdtemp(prefix="gig-dist-rehearsal-"))
    weights = root / "resnet50-random-bn.pt"
    model = _random_bn(build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model))
    torch.save(model.state_dict(), weights)
    return root, "jobs/configs/imagenet-resnet50.yaml", [
        f"model.weights={weights}", "dataset.kind=toy", "dataset.path=none", f"dataset.toy.num_images={args.images}",
        "dataset.toy.image_size=224", f"store.images_per_unit={args.unit}", "store.images_per_chunk=8",
        "extract.batch_size=16", "sample.per_image=16", "concepts.k_multiplier=0.0625", f"gig.images={args.images}",
        f"gig.targets={args.targets}", f"gig.steps={args.steps}", "gig.pairs=[[layer3.5,layer4.2],[layer4.2,logits]]",
        "atlas.members=4", "report.enabled=false", "runtime.progress=false", "runtime.device=cpu", *args.set,
    ]
