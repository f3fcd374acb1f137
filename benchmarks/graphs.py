"""Class graphs from the class-conditional Gamma_c against the dataset-wide Gamma, on a
finished run: how much the node sets agree (Jaccard per tap), the share of nodes marked
shared, and, on a held-out split, how much of a class's own attribution the chosen edges
keep. Each class's attributed images are split in two by their order; both kinds of graph
are built from half A (Gamma_c from A's images of class c, Gamma from all of A), and each
chosen lower-level edge k -> m is scored on half B: the sum of Gamma_c^B over the chosen
edges, over the positive Gamma_c^B into the same upper nodes. Per-class dense matrices are
held in memory: a measurement for runs of the toy world's size.

    python benchmarks/graphs.py STORE [--top 3]
"""

from __future__ import annotations

import argparse

from gig_dist.config import Config
from gig_dist.store import GIGSection, MetaSection


def bench_graphs(args: argparse.Namespace) -> None:
    """Class graphs from the class-conditional Gamma_c against the dataset-wide Gamma, on a
    finished run: how much the node sets agree (Jaccard per tap), the share of nodes marked
    shared, and, on a held-out split, how much of a class's own attribution the chosen edges
    keep. Each class's attributed images are split in two by their order; both kinds of graph
    are built from half A (Gamma_c from A's images of class c, Gamma from all of A), and each
    chosen lower-level edge k -> m is scored on half B: the sum of Gamma_c^B over the chosen
    edges, over the positive Gamma_c^B into the same upper nodes. Per-class dense matrices are
    held in memory: a measurement for runs of the toy world's size."""
    import numpy as np

    from gig_dist.kernels.gig import LOGITS
    from gig_dist.kernels.graphs import class_graph, dense_sources
    from gig_dist.stages.graphs import build_graphs, chain_to_class
    from gig_dist.stages.pairs import gig_pairs
    from gig_dist.stages.reduce import image_class
    from gig_dist.store import PROCESSED, RunStore

    store = RunStore.open(args.store)
    config = Config.model_validate(store.manifest.config)
    dictionary = config.concepts.method
    gig = store.family(GIGSection, dictionary)
    pairs = gig_pairs(config, list(store.taps))
    chain = chain_to_class(pairs, list(store.taps))
    links = [(lower, upper) for upper, lower in zip(chain, chain[1:])]
    classes = store.facts.num_outputs
    by_mode = {mode: build_graphs(store, dictionary, pairs, args.top, mode) for mode in ("class", "dataset")}

    print(f"\nclass graphs of {store.url}: top {args.top} per level, chain {' <- '.join(chain)}, "
          f"{int(gig.read_count((chain[0], LOGITS)).sum())} attributed images")
    print(f"  {'tap':<12} {'Jaccard(class, dataset)':>24} {'shared, class':>14} {'shared, dataset':>16}")
    for tap in chain:
        scores, shared = [], {"class": [], "dataset": []}
        for c in range(classes):
            sets = {m: {n["concept"] for n in by_mode[m][c]["nodes"] if n["tap"] == tap} for m in by_mode}
            union = sets["class"] | sets["dataset"]
            if union:
                scores.append(len(sets["class"] & sets["dataset"]) / len(union))
            for m in by_mode:
                shared[m] += [n["shared"] for n in by_mode[m][c]["nodes"] if n["tap"] == tap]
        print(f"  {tap:<12} {np.mean(scores):>24.2f} {np.mean(shared['class']):>14.2f} {np.mean(shared['dataset']):>16.2f}")

    # Held-out: per-image sums into dense per-class matrices for halves A and B.
    halves = {link: np.zeros((2, classes, *gig.matrix_shape(link))) for link in links}
    count = np.zeros((2, classes))
    seen = np.zeros(classes, dtype=int)
    limit = config.gig.images
    for r in store.units():
        if limit is not None and r.start >= limit:
            break
        status, prediction = store.family(MetaSection).read_status(r)
        _, labels = store.family(MetaSection).read_index(r)
        cls = image_class(labels, prediction)
        parts = {link: {**gig.read_unit(link, r), "vectors": gig.read_vectors(link, r)[0]} for link in links}
        for row in np.flatnonzero((status == PROCESSED) & (cls >= 0)):
            c = cls[row]
            half = seen[c] % 2
            seen[c] += 1
            count[half, c] += 1
            for link, part in parts.items():
                summed = part["vectors"][row]
                for slot, m in enumerate(part["target"][row]):
                    used = part["source"][row] >= 0
                    if m >= 0:
                        np.add.at(halves[link][half, c, :, m], part["source"][row][used], summed[slot][used])
    class_matrix = gig.read_matrix((chain[0], LOGITS))
    kept = {"class": [[] for _ in links], "dataset": [[] for _ in links]}
    for c in range(classes):
        if count[0, c] == 0 or count[1, c] == 0:
            continue
        A = {link: halves[link][0, c] / count[0, c] for link in links}
        B = {link: halves[link][1, c] / count[1, c] for link in links}
        everyone = {link: halves[link][0].sum(0) / count[0].sum() for link in links}
        for mode, matrices in (("class", A), ("dataset", everyone)):
            graph = class_graph(class_matrix, chain, dense_sources(matrices), c, args.top)
            for number, link in enumerate(links, start=1):
                edges = [e for e in graph["edges"] if e["level"] == number]
                uppers = sorted({e["source"][1] for e in graph["edges"] if e["level"] == number - 1})
                possible = np.clip(B[link][:, uppers], 0, None).sum()
                if possible > 0:
                    kept[mode][number - 1].append(sum(B[link][e["source"][1], e["target"][1]] for e in edges) / possible)
    print(f"  held-out share of a class's positive GIG into a graph's nodes that its chosen edges keep "
          f"(mean over classes, {int(count[0].sum())}/{int(count[1].sum())} images in halves A/B):")
    for number, link in enumerate(links):
        c_share, d_share = np.mean(kept["class"][number]), np.mean(kept["dataset"][number])
        print(f"    {link[0]} -> {link[1]:<10} class Gamma_c {c_share:.3f}   dataset Gamma {d_share:.3f}   "
              f"ratio {c_share / d_share:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a finished run store that kept its per-image GIG " "(gig-dist run -o gig.images=256 -o gig.keep_image_attributions=true)")
    parser.add_argument("--top", type=int, default=3)
    bench_graphs(parser.parse_args(argv))


if __name__ == "__main__":
    main()
