"""Evaluation: from embeddings to the metrics of PAPER.md §6.

Owns exact k-nearest-neighbour retrieval metrics with faiss (`retrieval_metrics`: P@1, R@k, P@R,
MAP@R as defined by MLRC, exact ties between identical embeddings counted in expectation), the NMI
of a k-means clustering (`nmi`), embedding extraction (`embed`), the concatenated ensemble behind
the paper's 512-D numbers (`ensemble`, PAPER.md §7) and a text table of the results (`format_table`).

Embeddings are (N, d) float arrays or tensors, used exactly as given (the caller applies the
paper's n(x), PAPER.md §3, first); labels are (N,) integers. NaN or inf in the embeddings given to
retrieval_metrics or nmi is a ValueError naming the row. Imports numpy, torch, faiss, scikit-learn.
"""
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

Embeddings = np.ndarray | torch.Tensor
METRICS = ("l2", "cosine")


# ----------------------------------------------------------------------------- retrieval (PAPER.md §6)

def retrieval_metrics(query: Embeddings, query_labels: Embeddings,
                      gallery: Embeddings | None = None, gallery_labels: Embeddings | None = None,
                      recall_ks: Sequence[int] = (1, 2, 4, 8), metric: str = "l2") -> dict[str, float]:
    """P@1, R@k, P@R and MAP@R of exact k-NN retrieval (PAPER.md §6).

    Without a gallery, each query retrieves among all other queries (itself excluded, so an exact
    duplicate is still a neighbour). A query whose class has no reference (R = 0) is left out of every
    metric and counted under "queries_without_match". metric: "l2" (Euclidean) or "cosine" (Euclidean
    between L2-normalised copies: ‖a − b‖² = 2 − 2 cos(a, b), the ranking of cosine similarity).

    Ties: references with identical embeddings are ranked in a uniformly random order, and each metric
    is its exact expectation over those orders (e.g. P@1 = 1/3 for a query whose nearest embedding is
    shared by three references, one of its class); the result never depends on the order of the data.
    All query (or all reference) embeddings identical is a ValueError: the model has collapsed.
    """
    where = "retrieval_metrics"
    if metric not in METRICS:
        raise ValueError(f"{where}: metric must be one of {METRICS}, got {metric!r}")
    if not all(isinstance(k, numbers.Integral) and k >= 1 for k in recall_ks):
        raise ValueError(f"{where}: recall_ks must be positive integers, got {recall_ks!r}")
    ks = tuple(int(k) for k in recall_ks)
    if (gallery is None) != (gallery_labels is None):
        raise ValueError(f"{where}: gallery and gallery_labels must be given together or both left None")
    query = _as_embeddings(query, "query", where)
    query_labels = _as_labels(query_labels, len(query), "query_labels", where)
    self_retrieval = gallery is None
    if self_retrieval:
        gallery, gallery_labels = query, query_labels
    else:
        gallery = _as_embeddings(gallery, "gallery", where)
        gallery_labels = _as_labels(gallery_labels, len(gallery), "gallery_labels", where)
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(f"{where}: query has d = {query.shape[1]} but gallery has d = {gallery.shape[1]}")
    if metric == "cosine":
        query = _unit_rows(query, "query", where)
        gallery = query if self_retrieval else _unit_rows(gallery, "gallery", where)
    _check_not_collapsed(query, "query", where)
    if not self_retrieval:
        _check_not_collapsed(gallery, "gallery", where)
    query_codes, gallery_codes, n_classes = _class_codes(query_labels, gallery_labels)
    r = np.bincount(gallery_codes, minlength=n_classes)[query_codes] - self_retrieval  # R: references of its class
    if not (r > 0).any():
        raise ValueError(f"{where}: none of the {len(query)} queries has a reference of its class")

    ranking = _rank(query, query_codes, gallery, gallery_codes, n_classes, r, self_retrieval, ks)
    metrics = _expected_metrics(ranking, ks)
    metrics["queries_without_match"] = len(query) - int(ranking.weight.sum())
    return metrics


def _expected_metrics(ranking: "_Ranking", ks: tuple[int, ...]) -> dict[str, float]:
    """P@1, R@k, P@R and MAP@R, each averaged over the scored queries, from the ranked groups of tied
    references: group j holds n_j copies (h_j of the query's class) at positions a_j + 1 .. a_j + n_j."""
    def mean(values: np.ndarray) -> float:
        return float(np.average(values, weights=ranking.weight))

    first_correct = _first_correct_group(ranking)
    metrics = {"P@1": mean(_recall_at(1, first_correct))}  # P@1 = R@1: the nearest reference is correct
    metrics.update({f"R@{k}": mean(_recall_at(k, first_correct)) for k in ks})
    r, rows = ranking.r, np.arange(len(ranking.r))
    g = int(min(ranking.neighbours.shape[1], r.max() + 1))  # R + 1 groups hold the first R positions
    copies, hits = _group_counts(ranking, np.arange(g)[None, :], rows)  # n_j, h_j
    before = np.cumsum(copies, axis=1) - copies  # a_j: positions ranked ahead of group j
    inside = np.clip(r[:, None] - before, 0, copies)  # s_j: copies of group j among the first R
    metrics["P@R"] = mean(_r_precision(copies, hits, inside, r))
    metrics["MAP@R"] = mean(_map_at_r(copies, hits, before, inside, r))
    return metrics


def _recall_at(k: int, first: tuple[np.ndarray, ...]) -> np.ndarray:
    # R@k = 1 - P(none of the first k is correct) = 1 - P(the first correct group's copies within k are all wrong)
    ahead, n, h = first
    return 1.0 - _no_hit_probability(n, h, np.clip(k - ahead, 0, n))


def _r_precision(copies: np.ndarray, hits: np.ndarray, inside: np.ndarray, r: np.ndarray) -> np.ndarray:
    # P@R = E[#correct among the first R] / R, group j adding s_j h_j / n_j (s_j of its copies lie within R)
    return (inside * _fraction(hits, copies)).sum(axis=1) / r


def _map_at_r(copies: np.ndarray, hits: np.ndarray, before: np.ndarray, inside: np.ndarray,
              r: np.ndarray) -> np.ndarray:
    # MAP@R = (1/R) sum_{i<=R} E[P(i) [i-th is correct]],  P(i) = (1/i) #correct among the first i.
    # Group j (n copies at positions a+1..a+n, h correct, c correct ahead of it), its first s within R:
    #   sum_{t<=s} E[[a+t correct] (c + #correct in a+1..a+t)] / (a+t) = (c+1)(h/n) S1 + h(h-1)/(n(n-1)) S2,
    #   S1 = sum_{t<=s} 1/(a+t) = H(a+s) - H(a) (harmonic numbers),  S2 = sum_{t<=s} (t-1)/(a+t) = s - (a+1) S1
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(r.max()) + 1))])
    a = np.minimum(before, len(harmonic) - 1)  # a group beyond R has s = 0 and adds nothing
    s1 = harmonic[a + inside] - harmonic[a]
    s2 = inside - (a + 1) * s1
    correct_ahead = np.cumsum(hits, axis=1, dtype=np.int32) - hits
    both_correct = _fraction(hits * (hits - 1.0), copies * (copies - 1.0))  # in float: no int32 overflow
    return ((correct_ahead + 1) * _fraction(hits, copies) * s1 + both_correct * s2).sum(axis=1) / r


def _no_hit_probability(n: np.ndarray, h: np.ndarray, s: np.ndarray) -> np.ndarray:
    # C(n - h, s) / C(n, s): the first s of n tied copies (h correct), in random order, are all wrong
    p = ((s == 0) | (h == 0)).astype(np.float64)
    partial = (s > 0) & (h > 0) & (s <= n - h)
    n, h, s = (v[partial].astype(np.float64) for v in (n, h, s))
    p[partial] = np.exp(_log_factorial(n - h) - _log_factorial(n - h - s) - _log_factorial(n) + _log_factorial(n - s))
    return p


def _log_factorial(n: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(n + 1.0)).numpy()  # log n! = log Γ(n + 1)


def _fraction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b = 0 (an empty group)."""
    return np.divide(a, b, out=np.zeros(a.shape), where=b > 0)


# ----------------------------------------------------------------------------- retrieval: the ranked groups
#
# The search runs over the distinct reference vectors, each standing for its group of identical copies,
# in byte order (so even an exact float32 tie between different vectors falls the same way whatever the
# order of the data). Why the machinery below is vectorised: at SOP scale (tens of thousands of queries,
# R@k up to k = 1000) per-(query, position) arrays dominate, so they hold integer codes, are built once,
# and are skipped where they cannot change a count (no duplicates, no groups of mixed classes).

class _Ranking(NamedTuple):
    """The scored queries' nearest groups of identical references, nearest first.

    Identical queries of one class score identically, so each (distinct query, class) pair is ranked
    once and weighted by its number of queries; rows below are such pairs.
    """
    neighbours: np.ndarray  # (pairs, k): the distinct references, one per group
    own: np.ndarray  # (pairs,): position of the query's own group in self-retrieval, else (or if not found) k
    classes: np.ndarray  # (pairs,): the query's class code
    r: np.ndarray  # (pairs,): R, the references of the query's class
    weight: np.ndarray  # (pairs,): queries per pair
    multiplicity: np.ndarray  # (distinct references,): copies of each
    shared_class: np.ndarray  # (distinct references,): the class all its copies have, or -1 if they mix
    keys: np.ndarray  # sorted reference·C + class of every (distinct reference, class) pair present ...
    counts: np.ndarray  # ... and its number of copies
    n_classes: int


def _rank(query: np.ndarray, query_codes: np.ndarray, gallery: np.ndarray, gallery_codes: np.ndarray,
          n_classes: int, r: np.ndarray, self_retrieval: bool, ks: tuple[int, ...]) -> _Ranking:
    """Search every scored query's nearest groups: as many as its R and every recall k need."""
    distinct_queries = _distinct_rows(query)
    queries, query_of_row, _ = distinct_queries
    references, reference_of_row, multiplicity = distinct_queries if self_retrieval else _distinct_rows(gallery)
    scored = np.flatnonzero(r > 0)
    pair, first, weight = np.unique(query_of_row[scored].astype(np.int64) * n_classes + query_codes[scored],
                                    return_index=True, return_counts=True)
    pair_query, pair_class = np.divmod(pair, n_classes)
    r = r[scored[first]]
    # k covers every R (so P@R and MAP@R are never truncated) and every recall k; every group holds at
    # least one reference, except the query's own group in self-retrieval, which may hold only itself
    k_searched = min(max((int(r.max()), *ks)), len(gallery) - self_retrieval)
    k_groups = min(k_searched + self_retrieval, len(references))
    searched, row_of_pair = np.unique(pair_query, return_inverse=True)
    neighbours = _nearest_neighbours(queries[searched], references, k_groups)
    if len(searched) < len(pair):
        neighbours = neighbours[row_of_pair]
    own = _own_group(neighbours, pair_query) if self_retrieval else np.full(len(pair), k_groups)
    return _Ranking(neighbours, own, pair_class.astype(np.int32), r, weight, multiplicity.astype(np.int32),
                    *_classes_of_copies(reference_of_row, gallery_codes, n_classes, len(references)), n_classes)


def _class_codes(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels as shared compact int32 codes 0..C-1 (cheap to count and to gather), and C."""
    classes, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.astype(np.int32)
    return codes[:len(query_labels)], codes[len(query_labels):], len(classes)


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of `x` in byte order, the index of every row among them, and their counts."""
    rows = x + np.float32(0)  # -0.0 becomes +0.0: equal values get equal bytes
    order = _byte_order(rows)
    ordered = rows[order]
    new = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]  # (np.unique compares rows far more slowly)
    inverse = np.empty(len(rows), np.int64)
    inverse[order] = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    return ordered[starts], inverse, np.diff(np.r_[starts, len(rows)])


def _byte_order(rows: np.ndarray) -> np.ndarray:
    """The stable order of the (contiguous) rows by their bytes: an order that does not depend on the data's."""
    return np.argsort(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1])))[:, 0], kind="stable")


def _nearest_neighbours(query: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each query's k nearest references by Euclidean distance, nearest first (exact search)."""
    index = faiss.IndexFlatL2(references.shape[1])
    index.add(references)
    neighbours = index.search(query, k)[1]
    if (neighbours < 0).any():  # faiss pads with -1 when distances overflow float32
        raise ValueError("retrieval_metrics: faiss found fewer than k neighbours; are the embeddings too large?")
    return neighbours


def _classes_of_copies(reference_of_row: np.ndarray, gallery_codes: np.ndarray, n_classes: int,
                       n_references: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_Ranking's shared_class, keys and counts: the classes of the copies of each distinct reference."""
    keys, counts = np.unique(reference_of_row.astype(np.int64) * n_classes + gallery_codes, return_counts=True)
    reference, code = np.divmod(keys, n_classes)
    single = np.bincount(reference)[reference] == 1
    shared_class = np.full(n_references, -1, np.int32)
    shared_class[reference[single]] = code[single]
    return shared_class, keys, counts.astype(np.int32)


def _own_group(neighbours: np.ndarray, pair_query: np.ndarray) -> np.ndarray:
    """Where each query's own distinct vector is among its neighbours: nearly always first (distance 0),
    but rounding may put a near-identical vector ahead; k where it was not returned at all."""
    own = np.zeros(len(neighbours), np.int64)
    rows = np.flatnonzero(neighbours[:, 0] != pair_query)
    if len(rows):
        is_own = neighbours[rows] == pair_query[rows, None]
        own[rows] = np.where(is_own.any(axis=1), is_own.argmax(axis=1), neighbours.shape[1])
    return own


def _group_counts(ranking: _Ranking, positions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n_j and h_j (copies, correct copies) of the groups at `positions` (n, m) of the given rows; the
    query itself is a copy of its class in its own group, but not a reference."""
    groups = ranking.neighbours[rows[:, None], positions]
    own = positions == ranking.own[rows, None]
    return ranking.multiplicity[groups] - own, _copies_of_class(ranking, groups, rows) - own


def _copies_of_class(ranking: _Ranking, groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For an (n, m) block of groups of the given rows: how many copies have the row's query class."""
    classes = ranking.classes[rows, None]
    shared = ranking.shared_class[groups]
    copies = np.where(shared == classes, ranking.multiplicity[groups], 0)
    mixed = shared < 0  # copies in several classes: look up the (reference, class) count
    if mixed.any():
        wanted = groups[mixed] * ranking.n_classes + np.broadcast_to(classes, groups.shape)[mixed]
        at = np.searchsorted(ranking.keys, wanted).clip(max=len(ranking.keys) - 1)
        copies[mixed] = np.where(ranking.keys[at] == wanted, ranking.counts[at], 0)
    return copies


def _first_correct_group(ranking: _Ranking) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the positions ranked ahead of its first group with a correct reference, and that
    group's n and h (none among the groups searched: every recall window ends ahead of it)."""
    neighbours, own = ranking.neighbours, ranking.own
    k = neighbours.shape[1]
    correct = ranking.shared_class[neighbours] == ranking.classes[:, None]
    rows = np.flatnonzero(own < k)  # the own group is correct only if it holds another copy of the class
    correct[rows, own[rows]] = _group_counts(ranking, own[rows, None], rows)[1][:, 0] > 0
    first = np.where(correct.any(axis=1), np.argmax(correct, axis=1), k)
    if (ranking.shared_class < 0).any():  # groups of mixed classes, ahead of the first found, are looked up
        for rows, columns in _column_blocks(first, k):
            at_row, at_column = np.nonzero((ranking.shared_class[neighbours[rows[:, None], columns]] < 0)
                                           & (columns < first[rows, None]))
            hit = _group_counts(ranking, columns[0, at_column, None], rows[at_row])[1][:, 0] > 0
            hit_rows, earliest = np.unique(at_row[hit], return_index=True)  # nonzero's order: row, then column
            first[rows[hit_rows]] = columns[0, at_column[hit][earliest]]
    found = first < k
    n, h = (v[:, 0] for v in _group_counts(ranking, np.minimum(first, k - 1)[:, None], np.arange(len(first))))
    # positions ahead: one per group before it, plus the extra copies of repeated references, less the query
    ahead = first - (own < first)
    if (ranking.multiplicity > 1).any():
        extra, stop = ranking.multiplicity - 1, np.where(found, first, 0)
        for rows, columns in _column_blocks(stop, k):
            ahead[rows] += np.where(columns < stop[rows, None], extra[neighbours[rows[:, None], columns]], 0).sum(1)
    return np.where(found, ahead, np.iinfo(np.int64).max // 2), n, h


def _column_blocks(stop: np.ndarray, width: int, block: int = 64):
    """(rows, columns) blocks that cover, for every row i, its columns before stop[i] (read as the
    blocks are visited, so lowering stop[i] on the way skips the rest of row i)."""
    for start in range(0, int(stop.max(initial=0)), block):
        yield np.flatnonzero(stop > start), np.arange(start, min(start + block, width))[None, :]


# ----------------------------------------------------------------------------- clustering (PAPER.md §6)

def nmi(embeddings: Embeddings, labels: Embeddings, seed: int = 0, niter: int = 20) -> float:
    """NMI(Y, C) = I(Y; C) / ((H(Y) + H(C)) / 2) between the labels Y and the clusters C of k-means
    with one cluster per class (faiss, random initial centroids drawn with `seed`); the same for the rows
    in any order."""
    x = _as_embeddings(embeddings, "embeddings", "nmi")
    y = _as_labels(labels, len(x), "labels", "nmi")
    # k-means draws its initial centroids by position: rows in byte order make NMI a function of the
    # (embedding, label) pairs, not of the order they come in (embed.py lists a split unlike train.py)
    order = _byte_order(x + np.float32(0))
    x, y = x[order], y[order]
    # niter 20 and every point training (faiss would subsample above 256 per centroid) follow
    # pytorch-metric-learning, MLRC's library; min_points_per_centroid=1 only silences faiss's warning
    kmeans = faiss.Kmeans(x.shape[1], len(np.unique(y)), niter=int(niter), seed=int(seed),
                          min_points_per_centroid=1, max_points_per_centroid=len(x))
    kmeans.train(x)
    return float(normalized_mutual_info_score(y, kmeans.index.search(x, 1)[1][:, 0]))


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
            for inputs, batch_labels in loader:
                batch_labels = torch.as_tensor(batch_labels).reshape(-1)
                out = model(inputs.to(device, non_blocking=True))  # asynchronous from pinned memory
                embeddings.append(out.to(device="cpu", dtype=torch.float32))
                labels.append(batch_labels.to(device="cpu", dtype=torch.int64))
    finally:
        for module, training in training_flags:
            module.training = training
    return torch.cat(embeddings), torch.cat(labels)


# ----------------------------------------------------------------------------- the ensemble (PAPER.md §7)

def ensemble(parts: Sequence[Embeddings],
             normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Embeddings:
    """The embeddings of several models as one, e.g. 4 x 128-D -> 512-D (PAPER.md §7).

    normalize=None: concat(l2(f_1), ..., l2(f_m)), each part L2-normalised (MLRC's ensemble).
    normalize=n: n(concat(n(f_1), ..., n(f_m))), the authors' ensemble with the run's normalisation n
    (a row-wise map of torch tensors, e.g. x / max(1, ||x||), PAPER.md §3); it differs from the
    default wherever n leaves a row off the unit sphere.
    Returns a numpy array when every part is one, otherwise a torch tensor.
    """
    tensors = [part if isinstance(part, torch.Tensor) else torch.as_tensor(np.asarray(part)) for part in parts]
    if normalize is None:
        joined = torch.cat([F.normalize(t, dim=1) for t in tensors], dim=1)  # x / max(||x||, 1e-12) per row
    else:
        joined = normalize(torch.cat([normalize(t) for t in tensors], dim=1))
    return joined.numpy() if not any(isinstance(part, torch.Tensor) for part in parts) else joined


# ----------------------------------------------------------------------------- reporting

def format_table(metrics: Mapping[str, float]) -> str:
    """The metrics as an aligned two-column text table: P@1, R@k by ascending k, P@R, MAP@R, NMI, then
    any other key in the given order; fractions in % with 2 decimals, integers (counts) as integers."""
    def order(key: str) -> tuple[int, int]:
        if key.startswith("R@") and key[2:].isdigit():
            return 1, int(key[2:])
        return {"P@1": 0, "P@R": 2, "MAP@R": 3, "NMI": 4}.get(key, 5), 0

    def cell(value: float) -> str:
        return str(int(value)) if isinstance(value, numbers.Integral) else f"{100 * float(value):.2f}%"

    keys = sorted(metrics, key=lambda key: order(str(key)))
    rows = [("metric", "value")] + [(str(key), cell(metrics[key])) for key in keys]
    key_width = max(len(key) for key, _ in rows)
    value_width = max(len(value) for _, value in rows)
    return "\n".join(f"{key:<{key_width}}  {value:>{value_width}}" for key, value in rows)


# ----------------------------------------------------------------------------- input conversion and checks

def _as_embeddings(x: Embeddings, name: str, where: str) -> np.ndarray:
    """`x` as a C-contiguous (N, d) float32 numpy array (faiss's format), checked to be finite."""
    if isinstance(x, torch.Tensor):
        array = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    else:
        with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, reported below
            array = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{where}: {name} must be a non-empty (N, d) array, got shape {array.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad_rows):
        raise ValueError(f"{where}: {name} of shape {array.shape} has {len(bad_rows)} row(s) with NaN or inf "
                         f"(as float32), the first at row {bad_rows[0]}")
    return array


def _as_labels(y: Embeddings, n: int, name: str, where: str) -> np.ndarray:
    """`y` as a (n,) int64 numpy array; any integer values, not necessarily 0..C-1."""
    array = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if array.dtype.kind not in "iu" or array.shape != (n,):
        raise ValueError(f"{where}: {name} must be {n} integers (one per row), got {array.dtype}, shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _unit_rows(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """L2-normalised copy of the rows of `x`: Euclidean distance between them ranks by cosine similarity."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero_rows = np.flatnonzero(norms[:, 0] == 0)
    if len(zero_rows):
        raise ValueError(f"{where}: metric 'cosine' is undefined for zero vectors; {name} has "
                         f"{len(zero_rows)} (first at row {zero_rows[0]})")
    return x / norms


def _check_not_collapsed(x: np.ndarray, name: str, where: str) -> None:
    """ValueError when the rows of `x` (two or more) are all equal up to float32 rounding."""
    high, low = x.max(axis=0), x.min(axis=0)
    if len(x) > 1 and (high - low).max() <= 1e-6 * max(high.max(), -low.min()):
        raise ValueError(f"{where}: all {len(x)} rows of {name} (shape {tuple(x.shape)}) are identical: the model "
                         f"has collapsed to a single embedding, and retrieval would only rank ties")
