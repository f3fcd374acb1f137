"""Would a variant of the paper's bisecting k-means make a better dictionary? Per tap of a finished
run, on the run's own samples and PFVs, at K = the run's concept count:

* ``paper``: gig-dist's bisecting k-means (the leaf of largest inertia split by 2-means);
* ``by-size``: scikit-learn's ``BisectingKMeans(bisecting_strategy="largest_cluster")``, which
  splits the leaf with the most members;
* ``refined``: the paper's tree, then 20 Lloyd iterations of full k-means over all samples from
  its leaf centroids (the tree is kept; only the leaves move).

For each: the share of concepts holding 1-2 samples, the median members, the k-means inertia
explained on the samples, and the reconstruction (R^2) of PFVs at random positions when the
Lasso's lambda is matched to a mean l0 of 5 (as ``gig-dist evaluate --match l0=5`` does).

    python benchmarks/bisecting_variants.py STORE [--l0 5] [--pfvs 4096]

Reads the samples of one tap at a time (a toy-world run's: at most 24,576 x 256 floats).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from gig_dist.store import ConceptsSection


def _stats(X: np.ndarray, centers: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    sizes = np.bincount(labels, minlength=k)
    inertia = float(((X - centers[labels]) ** 2).sum())
    total = float(((X - X.mean(0)) ** 2).sum())
    return {"tiny": float((sizes <= 2).mean()), "median": float(np.median(sizes)), "explained": 1 - inertia / total}


def main() -> None:
    import faiss
    from sklearn.cluster import BisectingKMeans as SkBisecting

    from gig_dist.config import Config
    from gig_dist.kernels.dictionaries.bisecting_kmeans import BisectingKMeansDictionary
    from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors
    from gig_dist.stages.coding import matched_lambda
    from gig_dist.store import RunStore
    from gig_dist.sweep import spread_pfvs, spread_samples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--l0", type=float, default=5.0)
    parser.add_argument("--pfvs", type=int, default=4096)
    args = parser.parse_args()
    store = RunStore.open(args.store)
    config = Config.model_validate(store.manifest.dictionary_config("bisecting_kmeans"))
    concepts = store.family(ConceptsSection, "bisecting_kmeans")
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, store {args.store}, l0 = {args.l0:g}")
    print(f"{'tap':10} {'variant':9} {'K':>5} {'1-2 members':>11} {'median':>7} {'explained':>9} "
          f"{'lambda_rel':>10} {'l0':>5} {'R^2@l0':>7} {'fit s':>6}")
    for tap in store.taps:
        if not concepts.has(tap):
            continue
        k = concepts.count(tap)
        X = spread_samples(store, tap, 10**9).astype(np.float32)
        pfvs = spread_pfvs(store, config, tap, args.pfvs)
        fits = {}
        start = time.perf_counter()
        tree = BisectingKMeans(k, seed=0).fit(X)
        fits["paper"] = (tree.cluster_centers_, tree.labels_, time.perf_counter() - start)
        start = time.perf_counter()
        sk = SkBisecting(k, bisecting_strategy="largest_cluster", random_state=0, n_init=1).fit(X)
        fits["by-size"] = (sk.cluster_centers_.astype(np.float32), sk.labels_, time.perf_counter() - start)
        start = time.perf_counter()
        kmeans = faiss.Kmeans(X.shape[1], k, niter=20, seed=0, max_points_per_centroid=-(-len(X) // k) + 1,
                              min_points_per_centroid=1, verbose=False)
        kmeans.train(X, init_centroids=np.ascontiguousarray(tree.cluster_centers_, dtype=np.float32))
        _, labels = kmeans.index.search(X, 1)
        fits["refined"] = (kmeans.centroids, labels[:, 0], fits["paper"][2] + time.perf_counter() - start)
        for name, (centers, labels, seconds) in fits.items():
            stats = _stats(X, centers, labels, k)
            vectors, _ = concept_vectors(centers)

            def coder_for(lam: float, vectors=vectors):
                return BisectingKMeansDictionary.from_arrays({"vector": vectors}, lambda_rel=lam, lam=None)

            lam, l0 = matched_lambda(coder_for, pfvs, "l0", args.l0)
            from gig_dist.stages.coding import sparsity_of

            r2 = sparsity_of(coder_for(lam), pfvs, "r2")
            print(f"{tap:10} {name:9} {k:5d} {stats['tiny']:11.1%} {stats['median']:7.0f} {stats['explained']:9.3f} "
                  f"{lam:10.4g} {l0:5.2f} {r2:7.3f} {seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()
