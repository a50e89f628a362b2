"""Benchmark of evaluate.retrieval_metrics at SOP scale (issue 3; PAPER.md §6-7).

Builds synthetic clustered embeddings the size of SOP's test split (60,502 x 128, 11,316 classes of
2-12 images) and times, side by side in one run, `retrieval_metrics` against one bare faiss
IndexFlatL2 search with the same k, for the default recall_ks and for SOP's (1, 10, 100, 1000).
The bare search is the floor; the target is a ratio <= 1.2. Also prints the peak resident memory.
On a shared machine search times drift by tens of per cent: compare the best of several runs.
--duplicates F overwrites a fraction F of the rows with copies of other rows (keeping their own
labels), so that exact ties within and across classes take retrieval_metrics' tie path.

    python benchmarks/bench_evaluate.py [--threads T] [--repeats R] [--duplicates F]
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import retrieval_metrics  # noqa: E402

N, D, CLASSES, MIN_SIZE, MAX_SIZE = 60_502, 128, 11_316, 2, 12


def class_sizes(rng: np.random.Generator) -> np.ndarray:
    """SOP-like class sizes in [2, 12] summing to N."""
    sizes = np.full(CLASSES, MIN_SIZE)
    remaining = N - sizes.sum()
    while remaining:
        np.add.at(sizes, rng.integers(0, CLASSES, remaining), 1)
        remaining = int(np.clip(sizes - MAX_SIZE, 0, None).sum())
        sizes = sizes.clip(max=MAX_SIZE)
    return sizes


def clustered_embeddings(rng: np.random.Generator, noise: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm class centres plus Gaussian noise: metrics well away from 0 and 1."""
    labels = np.repeat(np.arange(CLASSES), class_sizes(rng))
    centres = rng.standard_normal((CLASSES, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + noise * rng.standard_normal((N, D)).astype(np.float32)
    order = rng.permutation(N)
    return np.ascontiguousarray(x[order]), labels[order]


def with_duplicates(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """x with a random `fraction` of its rows replaced by copies of random rows."""
    x = x.copy()
    rows = np.flatnonzero(rng.random(len(x)) < fraction)
    x[rows] = x[rng.integers(0, len(x), len(rows))]
    return x


def bare_search(x: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    index.search(x, k)
    return time.perf_counter() - start


def timed_metrics(x: np.ndarray, y: np.ndarray, recall_ks: tuple[int, ...]) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = retrieval_metrics(x, y, recall_ks=recall_ks)
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=faiss.omp_get_max_threads())
    parser.add_argument("--repeats", type=int, default=4, help="best of this many runs of each")
    parser.add_argument("--duplicates", type=float, default=0.0, help="fraction of rows made copies of others")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    x, y = clustered_embeddings(np.random.default_rng(0))
    x = with_duplicates(x, args.duplicates, np.random.default_rng(1))
    max_r = int(np.bincount(y).max()) - 1
    print(f"N = {N}, d = {D}, classes = {CLASSES}, max R = {max_r}, distinct rows = {len(np.unique(x, axis=0))}, "
          f"faiss threads = {args.threads}")
    for recall_ks in [(1, 2, 4, 8), (1, 10, 100, 1000)]:
        k = max(max_r, *recall_ks) + 1  # self-retrieval searches one more and drops the query itself
        ours, bare = [], []
        for repeat in range(args.repeats):  # interleaved in alternating order: drifts in machine speed hit both
            if repeat % 2:
                bare.append(bare_search(x, k))
            seconds, metrics = timed_metrics(x, y, recall_ks)
            ours.append(seconds)
            if not repeat % 2:
                bare.append(bare_search(x, k))
        print(f"recall_ks = {recall_ks}: k searched = {k}")
        print(f"  retrieval_metrics {min(ours):6.2f} s (worst {max(ours):6.2f})   bare faiss search "
              f"{min(bare):6.2f} s (worst {max(bare):6.2f})   ratio of bests {min(ours) / min(bare):.3f}   "
              f"(best of {args.repeats})")
        print("  " + "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                               for key, value in metrics.items()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    print(f"peak RSS {peak_mib:.0f} MiB (embeddings alone: {x.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
