"""Stage ``graphs``: every class's concept graph (method.md section 6) from the dataset Gamma
matrices, written as one JSON document per class."""

from __future__ import annotations

from gig_dist.kernels.gig import LOGITS
from gig_dist.kernels.graphs import class_graph, mark_shared
from gig_dist.stages.attribute import Pair, gig_pairs
from gig_dist.stages.base import Progress, Stage, StageWorker, UnitReport, WorkUnit
from gig_dist.store import ArraySpec, Facts, RunStore
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


def build_graphs(store: RunStore, dictionary: str, pairs: list[Pair], top: int) -> list[dict]:
    chain = chain_to_class(pairs, list(store.taps))
    if not chain:
        return []
    gig = store.gig(dictionary)
    class_matrix = gig.read_matrix((chain[0], LOGITS))
    matrices = {(lower, upper): gig.read_matrix((lower, upper)) for upper, lower in zip(chain, chain[1:])}
    names = store.facts.class_names
    graphs = [class_graph(class_matrix, chain, matrices, c, top) for c in range(class_matrix.shape[1])]
    for graph in graphs:
        graph["class_name"] = names[graph["class"]] if graph["class"] < len(names) else str(graph["class"])
    return mark_shared(graphs)


class GraphStage(Stage):
    name = "graphs"
    reads = ("reduce",)
    result_keys = ("gig.graph_top",)
    per_dictionary = True
    unit_noun = "classes"

    def arrays(self, store: RunStore) -> list[ArraySpec]:
        return graph_specs(store.facts, self.dictionary)

    def plan(self, facts: Facts) -> list[WorkUnit]:
        return [WorkUnit(self.progress_key, 0)]

    def work(self, unit: WorkUnit, facts: Facts) -> int:
        return facts.num_outputs  # one graph per class

    def open_worker(self, device: str) -> GraphWorker:
        return GraphWorker(self)


class GraphWorker(StageWorker):
    def __init__(self, stage: GraphStage) -> None:
        self.stage = stage
        self.store = RunStore.open(stage.store_url, mode="r+")

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        pairs = gig_pairs(self.stage.config, list(self.store.taps))
        graphs = build_graphs(self.store, self.stage.dictionary, pairs, self.stage.config.gig.graph_top)
        self.store.gig(self.stage.dictionary).write_graphs(graphs)
        if progress is not None:
            progress(len(graphs))
        return UnitReport(unit.index, 0, 0)
