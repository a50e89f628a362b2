"""Evaluation: from embeddings to the retrieval metrics of PAPER.md §6.

Owns embedding extraction (`embed`), exact k-nearest-neighbour retrieval metrics with faiss
(`retrieval_metrics`: P@1, R@k, P@R, MAP@R as defined by MLRC, PAPER.md §6-7), the NMI of a
k-means clustering (`nmi`), the concatenated ensemble behind the paper's 512-D numbers
(`ensemble`, PAPER.md §7) and a text table of the results (`format_table`).

The file stands alone (standard library, numpy, torch, faiss, scikit-learn only) so that it can be
copied into another project. Embeddings are used exactly as given: the caller applies the paper's
normalisation n(x) (PAPER.md §3) first.
"""
import numbers
from collections.abc import Iterable, Mapping, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

Embeddings = np.ndarray | torch.Tensor
METRICS = ("l2", "cosine")


# ----------------------------------------------------------------------------- input checks

def _as_embeddings(x: Embeddings, name: str, where: str) -> np.ndarray:
    """`x` as a C-contiguous (N, d) float32 numpy array (faiss's format), checked to be finite."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{where}: {name} must hold real numbers, got a {x.dtype} tensor")
        array = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    else:
        array = np.asarray(x)
        if array.dtype.kind not in "fiu":
            raise ValueError(f"{where}: {name} must hold real numbers, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{where}: {name} must be 2-D (N, d), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: {name} is empty: shape {tuple(array.shape)}")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad_rows):
        raise ValueError(f"{where}: {name} has {len(bad_rows)} rows with NaN or inf in float32 "
                         f"(first at row {bad_rows[0]})")
    return array


def _as_labels(y: Embeddings, n: int, name: str, where: str) -> np.ndarray:
    """`y` as a (n,) int64 numpy array; any integer values, not necessarily 0..C-1."""
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{where}: {name} must be integers, got a {y.dtype} tensor")
        array = y.detach().to(device="cpu", dtype=torch.int64).numpy()
    else:
        array = np.asarray(y)
        if array.dtype.kind not in "iu":
            raise ValueError(f"{where}: {name} must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64, copy=False)
    if array.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D (N,), got shape {tuple(array.shape)}")
    if len(array) != n:
        raise ValueError(f"{where}: {name} has {len(array)} entries but its embeddings have {n} rows")
    return array


def _as_recall_ks(recall_ks: Sequence[int], where: str) -> tuple[int, ...]:
    ks = tuple(recall_ks) if isinstance(recall_ks, Iterable) else (recall_ks,)
    if not isinstance(recall_ks, Iterable) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"{where}: recall_ks must be a sequence of positive integers, got {recall_ks!r}")
    return tuple(int(k) for k in ks)


def _unit_rows(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """L2-normalised copy of the rows of `x`, so that inner product = cosine similarity."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero_rows = np.flatnonzero(norms[:, 0] == 0)
    if len(zero_rows):
        raise ValueError(f"{where}: metric 'cosine' is undefined for zero vectors; {name} has "
                         f"{len(zero_rows)} (first at row {zero_rows[0]})")
    return x / norms


# ----------------------------------------------------------------------------- retrieval (§6)

def _class_codes(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels as shared compact int32 codes 0..C-1 (cheap to count and to gather), and C."""
    classes, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.astype(np.int32)
    return codes[:len(query_labels)], codes[len(query_labels):], len(classes)


def _reference_counts(query_codes: np.ndarray, gallery_codes: np.ndarray, n_classes: int,
                      self_retrieval: bool) -> np.ndarray:
    """R per query: the number of references of its class (the query itself is not a reference)."""
    return np.bincount(gallery_codes, minlength=n_classes)[query_codes] - self_retrieval


def _drop_self(neighbours: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Remove each query's own index from its k + 1 neighbours, wherever it sits.

    Usually the query is its own nearest neighbour; among exact duplicates faiss may rank it
    anywhere, or (when more than k + 1 points tie) not return it at all: then the farthest goes.
    """
    kept = neighbours[:, 1:]
    rows = np.flatnonzero(neighbours[:, 0] != query_ids)  # only these need a closer look
    if len(rows):
        k = kept.shape[1]
        is_self = neighbours[rows] == query_ids[rows, None]
        position = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        # columns before the query's own position stay, those after it move one to the left
        kept[rows] = np.where(np.arange(k) < position[:, None], neighbours[rows, :-1], neighbours[rows, 1:])
    return kept


def _nearest_neighbours(query: np.ndarray, references: np.ndarray, k: int, metric: str,
                        query_ids: np.ndarray | None) -> np.ndarray:
    """(n, k) indices of each query's k nearest references, nearest first (exact search).

    query_ids: in self-retrieval, each query's row in `references`, which is excluded.
    """
    index = faiss.IndexFlatL2(references.shape[1]) if metric == "l2" else faiss.IndexFlatIP(references.shape[1])
    index.add(references)
    if query_ids is None:
        neighbours = index.search(query, k)[1]
    else:
        neighbours = _drop_self(index.search(query, k + 1)[1], query_ids)
    if (neighbours < 0).any():  # faiss pads with -1 when distances overflow float32
        raise ValueError("retrieval_metrics: faiss found fewer than k neighbours; are the embeddings "
                         "too large for float32 distances?")
    return neighbours


def _first_hit_rank(hits: np.ndarray) -> np.ndarray:
    """0-based rank of each query's first correct neighbour (k when there is none)."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])


def _hits_within_r(hits: np.ndarray, r: np.ndarray) -> np.ndarray:
    """[i-th neighbour is correct] for i <= R, zero beyond each query's R."""
    max_r = int(r.max())
    return hits[:, :max_r] & (np.arange(max_r) < r[:, None])


def _r_precision(hits_r: np.ndarray, r: np.ndarray) -> np.ndarray:
    # P@R = (1/R) sum_{i<=R} [i-th is correct]
    return hits_r.sum(axis=1) / r


def _map_at_r(hits_r: np.ndarray, r: np.ndarray) -> np.ndarray:
    # MAP@R = (1/R) sum_{i<=R} P(i) [i-th is correct],  P(i) = (1/i) sum_{j<=i} [j-th is correct]
    precision_at_i = np.cumsum(hits_r, axis=1, dtype=np.int32) / np.arange(1, hits_r.shape[1] + 1)
    return (precision_at_i * hits_r).sum(axis=1) / r


def retrieval_metrics(query: Embeddings, query_labels: Embeddings,
                      gallery: Embeddings | None = None, gallery_labels: Embeddings | None = None,
                      recall_ks: Sequence[int] = (1, 2, 4, 8), metric: str = "l2") -> dict[str, float]:
    """P@1, R@k, P@R and MAP@R of exact k-NN retrieval (PAPER.md §6).

    Without a gallery, each query retrieves among all other queries (itself excluded by index, so
    an exact duplicate is still a neighbour). A query whose class has no reference (R = 0) is left
    out of every metric and counted under "queries_without_match". metric: "l2" (Euclidean) or
    "cosine" (inner product of L2-normalised copies).
    """
    where = "retrieval_metrics"
    ks = _as_recall_ks(recall_ks, where)
    if metric not in METRICS:
        raise ValueError(f"{where}: metric must be one of {METRICS}, got {metric!r}")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError(f"{where}: gallery and gallery_labels must be given together or both left None")
    query = _as_embeddings(query, "query", where)
    query_labels = _as_labels(query_labels, len(query), "query_labels", where)
    self_retrieval = gallery is None
    if self_retrieval:
        if len(query) < 2:
            raise ValueError(f"{where}: retrieval without a gallery needs at least 2 items, got {len(query)}")
        gallery, gallery_labels = query, query_labels
    else:
        gallery = _as_embeddings(gallery, "gallery", where)
        gallery_labels = _as_labels(gallery_labels, len(gallery), "gallery_labels", where)
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(f"{where}: query has d = {query.shape[1]} but gallery has d = {gallery.shape[1]}")
    if metric == "cosine":
        query = _unit_rows(query, "query", where)
        gallery = query if self_retrieval else _unit_rows(gallery, "gallery", where)

    query_codes, gallery_codes, n_classes = _class_codes(query_labels, gallery_labels)
    r = _reference_counts(query_codes, gallery_codes, n_classes, self_retrieval)
    scored = np.flatnonzero(r > 0)
    if len(scored) == 0:
        raise ValueError(f"{where}: none of the {len(query)} queries has a reference of its class")
    # k covers every R (so P@R and MAP@R are never truncated) and every recall k
    k_searched = min(max((int(r.max()), *ks)), len(gallery) - self_retrieval)
    neighbours = _nearest_neighbours(query[scored], gallery, k_searched, metric,
                                     scored if self_retrieval else None)
    hits = gallery_codes[neighbours] == query_codes[scored, None]  # (n, k): [i-th has the query's class]
    r = r[scored]

    first_hit = _first_hit_rank(hits)
    hits_r = _hits_within_r(hits, r)
    metrics = {"P@1": float(np.mean(first_hit == 0))}
    metrics.update({f"R@{k}": float(np.mean(first_hit < k)) for k in ks})  # any of the k nearest correct
    metrics["P@R"] = float(np.mean(_r_precision(hits_r, r)))
    metrics["MAP@R"] = float(np.mean(_map_at_r(hits_r, r)))
    metrics["queries_without_match"] = len(query) - len(scored)
    return metrics


# ----------------------------------------------------------------------------- clustering (§6)

def _kmeans_assignment(x: np.ndarray, n_clusters: int, seed: int, niter: int) -> np.ndarray:
    """Cluster id of every row after faiss k-means (random initial centroids drawn with `seed`)."""
    # niter 20 and every point training (faiss would subsample above 256 per centroid) follow
    # pytorch-metric-learning, MLRC's library; min_points_per_centroid=1 only silences faiss's warning
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed,
                          min_points_per_centroid=1, max_points_per_centroid=len(x))
    kmeans.train(x)
    return kmeans.index.search(x, 1)[1][:, 0]


def nmi(embeddings: Embeddings, labels: Embeddings, seed: int = 0, niter: int = 20) -> float:
    """Normalised mutual information between the labels and k-means with one cluster per class."""
    where = "nmi"
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"{where}: seed must be an integer in [0, 2**31), got {seed!r}")
    if not isinstance(niter, numbers.Integral) or niter < 1:
        raise ValueError(f"{where}: niter must be a positive integer, got {niter!r}")
    x = _as_embeddings(embeddings, "embeddings", where)
    y = _as_labels(labels, len(x), "labels", where)
    assignment = _kmeans_assignment(x, len(np.unique(y)), int(seed), int(niter))
    return float(normalized_mutual_info_score(y, assignment))


# ----------------------------------------------------------------------------- embeddings

def embed(model: torch.nn.Module, loader: Iterable,
          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of `loader` ((inputs, labels) pairs) in eval mode without gradients.

    Returns float32 embeddings (N, d) and int64 labels (N,) on the CPU, in loader order. Every
    module's own training flag is restored afterwards (so BatchNorm layers frozen in eval mode
    inside a training model stay frozen).
    """
    training_flags = [(module, module.training) for module in model.modules()]
    model.eval()
    embeddings, labels = [], []
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(f"embed: batch {i} of the loader must be an (inputs, labels) pair, "
                                     f"got {type(batch).__name__}")
                inputs, batch_labels = batch
                batch_labels = torch.as_tensor(batch_labels).reshape(-1)
                out = model(inputs.to(device))
                if out.ndim != 2 or len(out) != len(batch_labels):
                    raise ValueError(f"embed: batch {i}: the model must return ({len(batch_labels)}, d) "
                                     f"embeddings, got shape {tuple(out.shape)}")
                embeddings.append(out.to(device="cpu", dtype=torch.float32))
                labels.append(batch_labels.to(device="cpu", dtype=torch.int64))
    finally:
        for module, training in training_flags:
            module.training = training
    if not embeddings:
        raise ValueError("embed: the loader yielded no batches")
    return torch.cat(embeddings), torch.cat(labels)


def ensemble(parts: Sequence[Embeddings]) -> Embeddings:
    """Concatenation of each part L2-normalised (MLRC's ensemble, PAPER.md §7): 4 x 128-D -> 512-D.

    Returns a numpy array when every part is one, otherwise a torch tensor.
    """
    if len(parts) == 0:
        raise ValueError("ensemble: expected a non-empty list of (N, d) embeddings, got none")
    tensors = [part if isinstance(part, torch.Tensor) else torch.as_tensor(np.asarray(part)) for part in parts]
    for i, t in enumerate(tensors):
        if t.ndim != 2:
            raise ValueError(f"ensemble: part {i} must be 2-D (N, d), got shape {tuple(t.shape)}")
        if len(t) != len(tensors[0]):
            raise ValueError(f"ensemble: every part needs the same N; part 0 has {len(tensors[0])} rows, "
                             f"part {i} has {len(t)}")
        if t.device != tensors[0].device:
            raise ValueError(f"ensemble: part 0 is on {tensors[0].device} but part {i} is on {t.device}")
    joined = torch.cat([F.normalize(t, dim=1) for t in tensors], dim=1)
    return joined.numpy() if not any(isinstance(part, torch.Tensor) for part in parts) else joined


# ----------------------------------------------------------------------------- reporting

def _table_order(key: str) -> tuple[int, int]:
    """P@1, R@k by ascending k, P@R, MAP@R, NMI, then any other key (kept in given order)."""
    if key.startswith("R@") and key[2:].isdigit():
        return 1, int(key[2:])
    return {"P@1": 0, "P@R": 2, "MAP@R": 3, "NMI": 4}.get(key, 5), 0


def _format_value(key: str, value: float) -> str:
    """Integers (counts) as integers, fractions as percentages with 2 decimals."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"format_table: value of {key!r} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{100 * float(value):.2f}%"


def format_table(metrics: Mapping[str, float]) -> str:
    """The metrics as an aligned two-column text table (fractions in %, counts as integers)."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"format_table: expected a non-empty dict of metrics, got {metrics!r}")
    rows = [("metric", "value")] + [(str(key), _format_value(key, metrics[key]))
                                    for key in sorted(metrics, key=lambda key: _table_order(str(key)))]
    key_width = max(len(key) for key, _ in rows)
    value_width = max(len(value) for _, value in rows)
    return "\n".join(f"{key:<{key_width}}  {value:>{value_width}}" for key, value in rows)
