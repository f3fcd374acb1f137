"""Stage ``graphs``: every class's concept graph (docs/method.md section 6), written as one JSON
document per class. Below the top level the sources come from the class-conditional Gamma_c
(``gig.graph_gamma = class``, the default) or the dataset-wide Gamma (``dataset``); see
:mod:`gig_dist.kernels.graphs`. The classes are the model's outputs, or with
``gig.graph_classes = dataset`` the dataset's own classes: a dataset class's top level is then the
mean over its images of each one's GIG toward its own class (its label where labels are outputs,
else its prediction), from the reduce stage's per-class sums."""

from __future__ import annotations

import numpy as np

from gig_dist.kernels.gig import LOGITS
from gig_dist.kernels.graphs import (
    class_graph,
    dense_sources,
    mark_shared,
    top_table_sources,
)
from gig_dist.stages.base import (
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.pairs import (
    Pair,
    check_graph_classes,
    gig_pairs,
    graph_class_names,
)
from gig_dist.store import ArraySpec, Facts, GIGSection, RunStore
from gig_dist.store.gig import graph_specs


def chain_to_class(pairs: list[Pair], order: list[str]) -> list[str]:
    """Taps from the last one (in forward order) with a class pair down through concept pairs."""
    class_taps = sorted((source for source, target in pairs if target == LOGITS), key=order.index)
    if not class_taps:
        return []
    concept = {target: source for source, target in pairs if target != LOGITS}
    chain = [class_taps[-1]]
    while chain[-1] in concept:
        chain.append(concept[chain[-1]])
    return chain


def build_graphs(store: RunStore, dictionary: str, pairs: list[Pair], top: int, gamma: str = "class",
                 classes: list[int] | None = None, names: list[str] | None = None, by: str = "model") -> list[dict]:
    """The graphs of ``classes`` (all: ``None``), shared concepts marked among them: of the
    model's outputs (``by = model``) or of the dataset's classes (``dataset``), named ``names``."""
    chain = chain_to_class(pairs, list(store.taps))
    if not chain:
        return []
    gig = store.family(GIGSection, dictionary)
    class_pair = (chain[0], LOGITS)
    if by == "dataset":  # each dataset class's strongest sources toward its images' own classes
        class_count = gig.read_class_count(class_pair)
        k_a = gig.matrix_shape(class_pair)[0]

        def top_level(c: int) -> np.ndarray:
            index, value = gig.read_class_top(class_pair, c)
            column = np.zeros((k_a, 1))
            column[index[0][index[0] >= 0], 0] = value[0][index[0] >= 0]
            return column
    else:
        class_matrix = gig.read_matrix(class_pair)
        class_count = gig.read_count(class_pair)
    links = [(lower, upper) for upper, lower in zip(chain, chain[1:])]
    if gamma == "dataset":
        shared = dense_sources({link: gig.read_matrix(link, sparse=True).tocsc() for link in links})
    names = list(store.facts.class_names) if names is None else names
    graphs = []
    for c in range(len(class_count)) if classes is None else classes:
        sources = shared if gamma == "dataset" else top_table_sources({link: gig.read_class_top(link, c) for link in links})
        if by == "dataset":
            graph = class_graph(top_level(c), chain, sources, 0, top)
            graph["class"] = c
            for edge in graph["edges"]:
                if edge["target"][0] == "class":
                    edge["target"] = ["class", c]
        else:
            graph = class_graph(class_matrix, chain, sources, c, top)
        graph["class_name"] = names[c] if c < len(names) else str(c)
        graph["classes"] = by
        graph["gamma"] = gamma
        graph["images"] = int(class_count[c])
        graph["empty"] = None
        if not graph["edges"]:
            graph["empty"] = (f"no attributed image of {'dataset ' if by == 'dataset' else ''}class "
                              f"{graph['class_name']} (gig.images covers "
                              f"{int(class_count.sum())} images; raise it, or none of them is of this class)"
                              if class_count[c] == 0 else
                              f"no concept of {chain[0]} contributes positively to class {graph['class_name']} "
                              f"over its {int(class_count[c])} attributed images")
        graphs.append(graph)
    return mark_shared(graphs, names)


class GraphStage(Stage):
    name = "graphs"
    config_section = "gig"
    family = GIGSection
    reads = ("reduce",)
    # the matrices are means over gig.images
    result_keys = ("gig.graph_top", "gig.graph_gamma", "gig.images", "gig.graph_classes")
    later_keys = {"gig.graph_classes": "model"}
    per_dictionary = True
    unit_noun = "classes"

    @classmethod
    def check(cls, config, facts: Facts) -> list[str]:
        return check_graph_classes(config, facts)

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return graph_specs(facts, self.dictionary, len(graph_class_names(self.config, facts)))

    def plan(self, facts: Facts) -> list[WorkUnit]:
        return [WorkUnit(self.progress_key, 0)]

    def work(self, unit: WorkUnit, facts: Facts) -> int:
        return len(graph_class_names(self.config, facts))  # one graph per class

    def open_worker(self, device: str) -> GraphWorker:
        return GraphWorker(self)


class GraphWorker(StageWorker):
    def __init__(self, stage: GraphStage) -> None:
        self.stage = stage
        self.store = stage.open_store()

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        pairs = gig_pairs(self.stage.config, list(self.store.taps))
        gig = self.stage.config.gig
        graphs = build_graphs(self.store, self.stage.dictionary, pairs, gig.graph_top, gig.graph_gamma,
                              names=graph_class_names(self.stage.config, self.store.facts), by=gig.graph_classes)
        self.store.family(GIGSection, self.stage.dictionary).write_graphs(graphs)
        if progress is not None:
            progress(len(graphs))
        return UnitReport(unit.index, 0, 0)
