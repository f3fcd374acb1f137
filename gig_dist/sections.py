"""The stages' config sections: a leaf module below every stage, so that reading and validating a
config imports no torch, FAISS or Zarr. Each stage imports its section from here; ``Config``
(:mod:`gig_dist.config`) gathers them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gig_dist.settings import Section

#: Config sections of stages added to the registry (``registry.register``): name -> section.
#: ``gig_dist.config.config_model`` adds them to the schema beside the built-in stages' sections.
_ADDED: dict[str, type[Section]] = {}


def add_section(name: str, section: type[Section]) -> None:
    """Add a registered stage's config section (``<name>.<key>`` in a config file)."""
    if not (isinstance(section, type) and issubclass(section, Section)):
        raise TypeError(f"config section {name!r} must be a gig_dist.settings.Section subclass, got {section!r}")
    _ADDED[name] = section


def remove_section(name: str) -> None:
    _ADDED.pop(name, None)


def added_sections() -> dict[str, type[Section]]:
    return dict(_ADDED)


class ExtractConfig(Section):
    batch_size: int = Field(default=32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    #: ``store``: write every tap's PFVs (ResNet50's four stage outputs: about 1.9 MiB per image
    #: compressed). ``recompute``: write none (extraction keeps the logits, predictions and skip
    #: records); the stages that read PFVs (sample, decompose, attribute) run this extraction's
    #: forward pass again for each unit they read, in the same batches and dtype, and refuse if
    #: the logits it gives differ from the stored ones. Saves the PFV store and its writes; costs
    #: three more forward passes (``gig-dist plan`` shows both).
    pfvs: Literal["store", "recompute"] = "store"


class SampleConfig(Section):
    """PFV sampling for concept discovery (docs/method.md section 3)."""

    #: ``srd``: probability proportional to max(R_p, 0), the SRD relevance of the predicted class,
    #: where SRD has rules for the model and every tap (ResNet-style models), else grad x act (the
    #: run says which ran); ``grad_x_act``: to max(<dy_c/da_p, a_p>, 0), any model; ``uniform``.
    #: Where every score is <= 0, an image's PFVs are drawn uniformly.
    method: Literal["srd", "grad_x_act", "uniform"] = "srd"
    #: PFVs drawn per image and tap, without replacement. The paper draws 1; the toy world's
    #: default is 24 (``TOY_SAMPLES_PER_IMAGE``): its 1,024 images would otherwise give the
    #: ``8 x C`` concepts of a 256-channel tap one or two members each, and 24 gives 12 on average.
    per_image: int = Field(default=1, ge=1)
    seed: int = 0
    #: Images per SRD or gradient pass.
    batch_size: int = Field(default=16, ge=1)


class ConceptsConfig(Section):
    """Concept dictionaries: bisecting k-means on each tap's samples (docs/method.md section 4)."""

    #: The dictionary: a name of ``gig_dist.kernels.dictionaries.DICTIONARIES`` (bisecting_kmeans,
    #: kmeans, dictionary_learning, nmf, sae, or one registered); also its level in the store
    #: (``concepts/<method>/<tap>``), so several dictionaries of one run share its PFVs and samples.
    method: str = "bisecting_kmeans"
    #: The dictionary level's name in the store (``concepts/<level>``, and every later stage's
    #: results under it). ``None``: the method's name. Several levels of one method (another K or
    #: lambda: ``gig-dist sweep``, ``evaluate --match``) live side by side, sharing the PFVs.
    level: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.=,+@-]+$")
    #: ``K = round(k_multiplier * C)`` concepts for a tap of C channels (the paper: 8).
    k_multiplier: float = Field(default=8.0, gt=0)
    #: Absolute K per tap (``{layer4.2: 4096}``), overriding the multiplier for those taps.
    k: dict[str, int] = Field(default_factory=dict)
    seed: int = 0
    #: 2-means runs per split; the lowest inertia is kept.
    n_init: int = Field(default=1, ge=1)
    #: ``numpy`` (fastest on CPUs), ``faiss`` (``faiss.Kmeans`` per split, on the GPU with
    #: faiss-gpu), ``torch`` (the numpy algorithm on the worker's device) or ``auto`` (FAISS
    #: where it sees a GPU, else torch on a CUDA worker, else numpy).
    backend: Literal["auto", "numpy", "faiss", "torch"] = "auto"
    #: Bisecting k-means: Lloyd iterations over all members of a cluster larger than the 4,096
    #: it initialises on (None: until the centres settle, up to 300). 8 fitted overlapping,
    #: blob-like data 2.3x faster at +0.3 % inertia (``python benchmarks/concepts.py``).
    refine_iter: int | None = Field(default=None, ge=1)
    #: Each dictionary's own parameters, by method: ``{sae: {top_k: 5, steps: 2000}}``
    #: (``-o concepts.params.sae.top_k=5``). Only the chosen method's count; a name the method
    #: does not take is refused before any work. The SAE: ``l1`` (0.03, its L1 weight), ``top_k``
    #: (None: the L1 penalty; N: only the N largest latents, as ``evaluate --match l0=N`` sets),
    #: ``steps`` (3000), ``max_slots`` (32); k-means, dictionary learning and NMF: ``max_iter`` (100).
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from gig_dist.kernels.dictionaries import (
            DICTIONARIES,  # names only: imports no dictionary
        )

        if value not in DICTIONARIES:
            raise ValueError(f"unknown dictionary {value!r}; the dictionaries are {', '.join(DICTIONARIES)}")
        return value

    @model_validator(mode="after")
    def _positive_k(self) -> ConceptsConfig:
        bad = {tap: k for tap, k in self.k.items() if k < 1}
        if bad:
            raise ValueError(f"concepts.k must be at least 1 per tap, got {bad}")
        return self


class DecomposeConfig(Section):
    """Every PFV as a sparse non-negative combination of its tap's concepts (docs/method.md section 5)."""

    #: Taps to decompose. ``None``: every tap.
    taps: tuple[str, ...] | None = None
    #: Decompose only the first N images (rounded up to whole store units). ``None``: all.
    images: int | None = Field(default=None, ge=1)
    #: ``lambda = lambda_rel * max_k <v_k, a>`` per PFV; one value, or one per tap
    #: (``{layer1.0: 0.05, layer4.2: 0.1}``; taps not listed take 0.1). 0.1 is gig-dist's choice
    #: (the paper states none); the toy world's default is 0.05 (``TOY_LAMBDA_REL``).
    lambda_rel: float | dict[str, float] = 0.1
    #: An absolute lambda for every PFV instead (``None``: use lambda_rel).
    lam: float | None = Field(default=None, ge=0)
    #: Code slots stored per PFV. A PFV whose support is larger keeps its largest coefficients;
    #: how many PFVs were cut is counted per tap and shown by ``gig-dist inspect``.
    max_nonzero: int = Field(default=32, ge=1)
    #: How code values are stored: float32, or float16 (half the bytes; relative rounding 5e-4,
    #: and every reader, GIG included, then works from the rounded codes).
    value_dtype: Literal["float32", "float16"] = "float32"
    #: KKT tolerance of the solver, relative to the PFV's norm.
    tol: float = Field(default=1e-6, gt=0)
    #: PFVs per batched solve.
    batch_size: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _lambda_non_negative(self) -> DecomposeConfig:
        values = self.lambda_rel.values() if isinstance(self.lambda_rel, dict) else [self.lambda_rel]
        if any(v < 0 for v in values):
            raise ValueError(f"decompose.lambda_rel must be non-negative, got {self.lambda_rel}")
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("decompose.taps is empty; leave it unset to decompose every tap")
        return self

    def lambda_for(self, tap: str) -> float:
        if isinstance(self.lambda_rel, dict):
            return self.lambda_rel.get(tap, 0.1)
        return self.lambda_rel


class GIGConfig(Section):
    """Generalized Integrated Gradients between taps and to the classes (docs/method.md section 6)."""

    #: ``[source, target]`` tap pairs; ``logits`` as target for concept -> class. ``None``:
    #: consecutive stage outputs, plus every stage output to the logits (a stage output is the
    #: last tap of each ``layerN``; taps without that naming are each their own stage).
    pairs: tuple[tuple[str, str], ...] | None = None
    #: Integration steps M and the quadrature rule: ``midpoint``, ``left`` or ``right``, each step
    #: of weight 1/M; ``power``, midpoints ``t`` at ``alpha = t^4``, dense near the baseline, for
    #: models with layer norms (ViTs), which jump where evenly spaced steps never look.
    steps: int = Field(default=32, ge=1)
    rule: Literal["midpoint", "left", "right", "power"] = "midpoint"
    #: Target concepts per image: the T with the largest code mass at the target tap. Class
    #: targets are always the predicted and the true class.
    targets: int = Field(default=32, ge=1)
    #: Attribute only the first N images (rounded up to whole store units). ``None``: all. The
    #: toy world's default is 64 (``TOY_GIG_IMAGES``): GIG costs about 1.3 s per toy image on 2 cores.
    images: int | None = Field(default=None, ge=1)
    #: Work-unit splits: the M steps into ``step_chunks`` ranges, and the targets into chunks of
    #: ``targets_per_unit`` (``None``: all in one unit). Results do not depend on either.
    step_chunks: int = Field(default=1, ge=1)
    targets_per_unit: int | None = Field(default=None, ge=1)
    #: Steps per forward pass.
    step_batch: int = Field(default=8, ge=1)
    #: Strongest source concepts kept per (image, target) as the image's edges.
    top_edges: int = Field(default=16, ge=1)
    #: Store units per reduce block (the first level of the reduction tree): a reduce worker
    #: holds one block's sums, so fewer units per block lower its peak (``gig-dist plan``).
    reduce_block_units: int = Field(default=16, ge=1)
    #: Concepts per level of a class graph (the top sources of each node, and of the class).
    graph_top: int = Field(default=3, ge=1)
    #: Where a class graph's lower levels come from: ``class``, the GIG means over the class's
    #: own images (Gamma_c); ``dataset``, the means over all attributed images. See docs/guides/pipeline.md, "Class graphs".
    graph_gamma: Literal["class", "dataset"] = "class"
    #: Which classes the class graphs are of: ``model``, the model's outputs (an image counts for
    #: its label where labels are outputs, else its prediction); ``dataset``, the dataset's own
    #: classes (an image folder's class folders), for data whose labels are not the model's
    #: outputs. A dataset class's graph starts from its images' GIG toward each one's own
    #: prediction. See docs/guides/pipeline.md, "Class graphs".
    graph_classes: Literal["model", "dataset"] = "model"
    #: Refine the integral where it is coarse: a target whose relative completeness gap exceeds
    #: ``max_gap`` after ``steps`` is integrated again with twice the steps, and again, up to
    #: ``max_steps``. The steps each target used and its gap at ``steps`` are stored. ``None``: off.
    max_gap: float | None = Field(default=None, gt=0)
    max_steps: int = Field(default=256, ge=1)
    #: With ``max_gap``: a gap under ``atol`` times the readout's scale in the image (the largest
    #: magnitude a class, or target concept, takes at the path's ends) is fine whatever its share
    #: of the target's own change (``kernels.gig.refine``; docs/evaluation.md, "Completeness gaps").
    atol: float = Field(default=1e-3, ge=0)
    #: Keep each image's GIG per source concept (float32, images x targets x active sources)
    #: after the reduction. Off: once reduced, an image keeps its targets, totals, gaps and top
    #: ``top_edges`` sources per target, and ``gig-dist evaluate`` recomputes the GIG of the
    #: images it evaluates. The vectors take targets x active sources x 4 B per image and pair
    #: (``gig-dist plan`` shows them); without them, reducing again after a change
    #: (``gig.top_edges``, ``gig.images``) redoes the attribution.
    keep_image_attributions: bool = False
    #: A pair's dataset Gamma is stored dense while K_a x columns x 8 bytes is at most this many
    #: MiB, else sparse (its non-zero entries, CSR). ResNet50's layer3 -> layer4 at 8C concepts
    #: each is 1 GiB dense. ``gig-dist read`` and the graphs read either layout.
    dense_matrix_mib: float = Field(default=256, ge=0)

    @model_validator(mode="after")
    def _steps_split(self) -> GIGConfig:
        if self.step_chunks > self.steps:
            raise ValueError(f"gig.step_chunks ({self.step_chunks}) cannot exceed gig.steps ({self.steps})")
        if self.max_gap is not None:
            if self.step_chunks > 1:
                raise ValueError(f"gig.max_gap refines each image's whole integral, so it needs gig.step_chunks = 1 "
                                 f"(got {self.step_chunks}); split the work with gig.targets_per_unit instead")
            if self.max_steps < self.steps:
                raise ValueError(f"gig.max_steps ({self.max_steps}) is below gig.steps ({self.steps})")
        if self.graph_top > self.top_edges:
            raise ValueError(f"gig.graph_top ({self.graph_top}) cannot exceed gig.top_edges ({self.top_edges}), the "
                             "sources kept per class and target concept")
        return self


class AtlasConfig(Section):
    """The concept atlas: each concept shown by its top members (docs/guides/reading-a-run.md)."""

    #: Members shown per concept: the PFVs with the largest code value for it.
    members: int = Field(default=8, ge=1, le=64)
    #: Each of a concept's members from another image (its strongest position there): eight members
    #: then show eight images, not one image's neighbouring positions. ``false``: the strongest
    #: PFVs wherever they are.
    distinct_images: bool = True
    #: Random examples kept per concept: a deterministic uniform sample of the PFVs that use it
    #: (any strength), with the histogram of its code values (always kept). The report shows
    #: them, and among them those nearest the quantiles of its code values. 0: none.
    examples: int = Field(default=16, ge=0, le=64)
    #: Side in pixels of each member's crop (and of the concept's thumbnail).
    crop: int = Field(default=48, ge=8, le=512)
    #: iERF kind: ``auto`` (SRD where it applies, else gradient), ``srd`` or ``gradient``.
    ierf: Literal["auto", "srd", "gradient"] = "auto"
    #: Image copies per backward pass of a gradient iERF: the peak memory grows with it, and
    #: time barely shrinks (docs/benchmarks.md).
    ierf_copies: int = Field(default=8, ge=1, le=256)


class EvaluateConfig(Section):
    """Concept insertion/deletion (``gig-dist evaluate``)."""

    #: Evaluate the first N images (whole store units; at most ``gig.images``). 0: none.
    images: int = Field(default=0, ge=0)
    #: Fractions 0, 1/steps, ..., 1 of the concepts inserted or deleted.
    steps: int = Field(default=10, ge=1)
    #: Target concepts per image for the inter-layer test (the image's first GIG targets).
    targets: int = Field(default=5, ge=1)
    #: Seed of the random ordering (per image: (seed, image index)).
    seed: int = 0
    #: The orderings whose curves are computed (``kernels.evaluation.ORDERINGS``): GIG, and the
    #: baselines it is compared with. ``gig-dist sweep`` computes GIG's only (each ordering costs
    #: as much as GIG's: 4 of a point's evaluation time); the others are then NaN.
    orderings: tuple[Literal["gig", "random", "code_mass", "grad_x_code"], ...] = (
        "gig", "random", "code_mass", "grad_x_code")
    #: Evaluate only the pairs from these taps (and their ground truth). ``None``: every GIG pair.
    taps: tuple[str, ...] | None = None
    #: Toy world: where the iERF mass of each class's top concepts (by GIG) falls, on the image and
    #: on the same image with a distractor object of another class, against random active concepts
    #: and the pixels' shares.
    ground_truth: bool = True
    #: The class's top concepts per tap in that test.
    top_concepts: int = Field(default=3, ge=1)
