"""Stage ``atlas``: each concept's top members shown on their images.

Units are store units (images ``start:stop``): a unit takes every member (of every tap) whose
image is among its images, decomposes each image once by SRD (the iERFs of all taps come from
one decomposition; the gradient iERF where SRD has no rule, the kind recorded), and writes a
crop per member around its iERF's mass with the iERF overlaid, into its own shard of the crop
rows the members stage assigned. :meth:`AtlasStage.finish` makes each concept's thumbnail (the
mean of its crops) and, on the toy world, sums its members' iERF mass per ground-truth part.
Skipped images have no codes, so they are never members and never shown.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.crops import HEAT_SIDE, heat_map, member_crop
from gig_dist.kernels.ierf import ierf_kinds, ierfs
from gig_dist.kernels.taps import stored_layout
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
    model_bytes,
    tap_values,
)
from gig_dist.stages.coding import decompose_taps
from gig_dist.stages.forward import resolve_device
from gig_dist.store import ArraySpec, AtlasSection, Facts, MetaSection, RunStore
from gig_dist.store.atlas import render_specs

#: Images per batched SRD decomposition.
IMAGE_BATCH = 8
#: Bytes of thumbnail sums the atlas's final step holds at once (taps are summed in groups).
FINISH_BYTES = 512 * 2**20


def mask_values(facts: Facts) -> int:
    """Values a toy part mask takes (0: background, part i: i + 1); 0 without masks."""
    if not facts.part_masks:
        return 0
    from gig_dist.toy.world import NUM_PARTS

    return NUM_PARTS + 1


class AtlasStage(Stage):
    name = "atlas"
    config_section = "atlas"
    family = AtlasSection
    reads = ("members",)
    result_keys = ("atlas.crop", "atlas.ierf")
    version = 2  # 2: each member's iERF heat map over the whole input (crops/heat)
    per_dictionary = True
    coverage_key = "decompose.images"

    def taps(self, facts: Facts) -> list[str]:
        return decompose_taps(self.config, list(facts.taps))

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return render_specs(facts, self.dictionary, {tap: sizes.concepts(tap) for tap in self.taps(facts)},
                            self.config.atlas.crop, mask_values(facts), sizes.crop_capacity())

    def covers(self, unit: WorkUnit) -> bool:
        limit = self.config.decompose.images
        return limit is None or unit.start < limit

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """The model, and a unit's activations in float32 for the iERFs."""
        return Footprint(model_bytes(facts) + facts.images_per_unit * tap_values(facts) * 4)

    def open_worker(self, device: str) -> AtlasWorker:
        return AtlasWorker(self, resolve_device(device))

    def finish(self, store: RunStore) -> None:
        """Each concept's thumbnail (the mean of its crops) and part mass (the sum of its
        members'), from the crop shards read whole, one store unit at a time, in member order:
        reading each concept's scattered rows took longer than the atlas's units (70 s of 133 s
        on the embedded default). The taps are summed in groups whose sums take at most
        :data:`FINISH_BYTES`."""
        atlas = store.family(AtlasSection, self.dictionary)
        parts = mask_values(store.facts)
        size = self.config.atlas.crop
        cap = atlas.capacity()
        taps = self.taps(store.facts)
        rows = {tap: atlas.rows(tap) for tap in taps}
        groups: list[list[str]] = [[]]
        used = 0
        for tap in taps:
            need = rows[tap].shape[0] * size * size * 3 * 4
            if groups[-1] and used + need > FINISH_BYTES:
                groups.append([])
                used = 0
            groups[-1].append(tap)
            used += need
        for group in groups:
            # uint32 sums of uint8 crops are exact, so the mean is the float64 mean of the crops
            sums = {tap: np.zeros((len(rows[tap]), size, size, 3), dtype=np.uint32) for tap in group}
            # per member, summed over members at the end in member order (as the float32 sums always were)
            mass = {tap: np.zeros((*rows[tap].shape, parts), dtype=np.float32) for tap in group} if parts else None
            for u in range(len(store.facts.units)):
                base = u * cap
                wanted = {tap: (rows[tap] >= base) & (rows[tap] < base + cap) for tap in group}
                if not any(w.any() for w in wanted.values()):
                    continue
                crops = atlas.read_unit_crops("crop", u)
                shard_mass = atlas.read_unit_crops("part_mass", u) if parts else None
                for tap in group:
                    for j in range(rows[tap].shape[1]):  # one row per concept and member: no repeats
                        concepts = np.flatnonzero(wanted[tap][:, j])
                        if len(concepts):
                            local = rows[tap][concepts, j] - base
                            sums[tap][concepts] += crops[local]
                            if parts:
                                mass[tap][concepts, j] = shard_mass[local, :parts]
            for tap in group:
                count = (rows[tap] >= 0).sum(1)
                thumb = np.round(sums[tap] / np.maximum(count, 1)[:, None, None, None]).astype(np.uint8)
                atlas.write_concepts(tap, thumb, mass[tap].sum(1) if parts else None)


class AtlasWorker(StageWorker):
    def __init__(self, stage: AtlasStage, device: torch.device) -> None:
        self.stage = stage
        self.config = stage.config
        self.device = device
        self.store = stage.open_store()
        self.atlas = self.store.family(AtlasSection, stage.dictionary)
        self.model = build_model(self.config.model).to(device).eval()
        self.spec = resolve_transform(self.config)
        self.loader = ImageLoader(self.spec, self.config.dataset.max_image_pixels, self.config.dataset.loader_threads)
        self.taps = stage.taps(self.store.facts)
        self.tables = {tap: (self.atlas.members(tap), self.atlas.rows(tap)) for tap in self.taps}
        self.layouts = {tap: stored_layout(self.store.facts.layouts, tap) for tap in self.taps}
        groups: dict[tuple[str, str], list[str]] = {}
        for tap, (kind, why) in ierf_kinds(self.model, self.taps, self.config.atlas.ierf).items():
            groups.setdefault((kind, why), []).append(tap)
        self.methods = {"ierf": "; ".join(f"{kind} at {', '.join(taps)}" + (f" ({why})" if why and kind != "srd" else "")
                                          for (kind, why), taps in groups.items())}

    def _image(self, image: int) -> tuple[torch.Tensor, np.ndarray]:
        """The model input and the picture (H, W, 3) in [0, 1] of a member's image."""
        loaded = self.loader.load(self.store.family(MetaSection).path(image))
        if loaded.image is None:  # members come from processed images: the file changed since
            raise ValueError(f"image {image} ({self.store.family(MetaSection).path(image)}) cannot be read now: {loaded.reason}")
        mean, std = np.asarray(self.spec.mean)[:, None, None], np.asarray(self.spec.std)[:, None, None]
        return loaded.image, np.clip(loaded.image.numpy() * std + mean, 0, 1).transpose(1, 2, 0)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        a = self.config.atlas
        cap = self.atlas.capacity()
        base = unit.index * cap
        parts = mask_values(self.store.facts)
        crops = np.zeros((cap, a.crop, a.crop, 3), dtype=np.uint8)
        boxes = np.full((cap, 4), -1, dtype=np.int32)
        heats = np.zeros((cap, HEAT_SIDE, HEAT_SIDE), dtype=np.uint8)
        kinds = np.full(cap, "", dtype=object)
        mass = np.zeros((cap, max(parts, 1)), dtype=np.float32)
        # image -> tap -> [(position, local row)]
        wanted: dict[int, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
        for tap, (members, rows) in self.tables.items():
            inside = (members["image"] >= unit.start) & (members["image"] < unit.stop)
            for c, j in zip(*np.nonzero(inside)):
                wanted[int(members["image"][c, j])][tap].append((int(members["position"][c, j]), int(rows[c, j] - base)))
        images = sorted(wanted)
        min_side = max(4, self.spec.crop // 8)
        for start in range(0, len(images), IMAGE_BATCH):
            batch = images[start : start + IMAGE_BATCH]
            loaded = [self._image(i) for i in batch]
            x = torch.stack([t for t, _ in loaded]).to(self.device)
            requests = {}
            for tap in self.taps:
                width = max(len(wanted[i][tap]) for i in batch)
                if width:
                    requests[tap] = torch.tensor([[p for p, _ in wanted[i][tap]] + [0] * (width - len(wanted[i][tap]))
                                                  for i in batch], device=self.device)
            found = ierfs(self.model, x, requests, a.ierf, self.layouts, a.ierf_copies)
            masks = self.store.family(MetaSection).read_part_masks(None, batch) if parts else None
            for tap, (maps, kind) in found.items():
                maps = maps.detach().cpu().numpy()
                for b, i in enumerate(batch):
                    for p, (_, row) in enumerate(wanted[i][tap]):
                        crops[row], boxes[row] = member_crop(loaded[b][1], maps[b, p], a.crop, min_side)
                        heats[row] = heat_map(maps[b, p])
                        kinds[row] = kind
                        if parts:
                            mass[row] = np.bincount(masks[b].ravel(), weights=maps[b, p].ravel(), minlength=parts)[:parts]
        arrays = {"crop": crops, "box": boxes, "kind": kinds.astype(str), "heat": heats}
        if parts:
            arrays["part_mass"] = mass
        self.atlas.write_crops(unit.index, arrays)
        if progress is not None:
            progress(unit.size)
        return UnitReport(unit.index, len(images), 0, methods=self.methods)

    def close(self) -> None:
        self.loader.close()
