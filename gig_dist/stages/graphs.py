"""Stage ``graphs``: every class's concept graph (docs/method.md section 6), written as one JSON
document per class. Below the top level the sources come from the class-conditional Gamma_c
(``gig.graph_gamma = class``, the default) or the dataset-wide Gamma (``dataset``); see
:mod:`gig_dist.kernels.graphs`."""

from __future__ import annotations

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
from gig_dist.stages.pairs import Pair, gig_pairs
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
                 classes: list[int] | None = None) -> list[dict]:
    """The graphs of ``classes`` (all: ``None``), shared concepts marked among them."""
    chain = chain_to_class(pairs, list(store.taps))
    if not chain:
        return []
    gig = store.family(GIGSection, dictionary)
    class_pair = (chain[0], LOGITS)
    class_matrix = gig.read_matrix(class_pair)
    class_count = gig.read_count(class_pair)
    links = [(lower, upper) for upper, lower in zip(chain, chain[1:])]
    if gamma == "dataset":
        shared = dense_sources({link: gig.read_matrix(link, sparse=True).tocsc() for link in links})
    names = store.facts.class_names
    graphs = []
    for c in range(class_matrix.shape[1]) if classes is None else classes:
        sources = shared if gamma == "dataset" else top_table_sources({link: gig.read_class_top(link, c) for link in links})
        graph = class_graph(class_matrix, chain, sources, c, top)
        graph["class_name"] = names[c] if c < len(names) else str(c)
        graph["gamma"] = gamma
        graph["images"] = int(class_count[c])
        graph["empty"] = None
        if not graph["edges"]:
            graph["empty"] = (f"no attributed image of class {graph['class_name']} (gig.images covers "
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
    result_keys = ("gig.graph_top", "gig.graph_gamma", "gig.images")  # the matrices are means over gig.images
    per_dictionary = True
    unit_noun = "classes"

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return graph_specs(facts, self.dictionary)

    def plan(self, facts: Facts) -> list[WorkUnit]:
        return [WorkUnit(self.progress_key, 0)]

    def work(self, unit: WorkUnit, facts: Facts) -> int:
        return facts.num_outputs  # one graph per class

    def open_worker(self, device: str) -> GraphWorker:
        return GraphWorker(self)


class GraphWorker(StageWorker):
    def __init__(self, stage: GraphStage) -> None:
        self.stage = stage
        self.store = stage.open_store()

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        pairs = gig_pairs(self.stage.config, list(self.store.taps))
        gig = self.stage.config.gig
        graphs = build_graphs(self.store, self.stage.dictionary, pairs, gig.graph_top, gig.graph_gamma)
        self.store.family(GIGSection, self.stage.dictionary).write_graphs(graphs)
        if progress is not None:
            progress(len(graphs))
        return UnitReport(unit.index, 0, 0)
