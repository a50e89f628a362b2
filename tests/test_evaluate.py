"""Tests of evaluate.py (PAPER.md §6): every retrieval metric against a brute-force numpy reference
written here (full distance matrix, explicit loops), hand-computed cases, NMI against its formula,
embedding extraction, the ensemble, the table, and the input errors of the public functions."""
import itertools
import math

import numpy as np
import pytest
import torch

import evaluate
from evaluate import embed, ensemble, format_table, nmi, retrieval_metrics


# ----------------------------------------------------------------------------- brute-force reference

def distance_matrix(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return -(q @ g.T)
    return np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=2))


def references(q, ql, g, gl, metric):
    """The reference set (the queries themselves when no gallery is given) and the query-reference distances."""
    self_mode = g is None
    if self_mode:
        g, gl = q, ql
    return self_mode, g, gl, distance_matrix(q, g, metric)


def summary(p1, recall, pr, map_r, unmatched) -> dict:
    """Per-query values averaged into the metric dict, in evaluate.retrieval_metrics' key order."""
    out = {"P@1": float(np.mean(p1))}
    out.update({f"R@{k}": float(np.mean(values)) for k, values in recall.items()})
    out.update({"P@R": float(np.mean(pr)), "MAP@R": float(np.mean(map_r)), "queries_without_match": unmatched})
    return out


def reference_metrics(q, ql, g=None, gl=None, recall_ks=(1, 2, 4, 8), metric="l2") -> dict:
    """MLRC's definitions, one query at a time; ties broken by reference index."""
    self_mode, g, gl, dist = references(q, ql, g, gl, metric)
    p1, pr, map_r, unmatched = [], [], [], 0
    recall = {k: [] for k in recall_ks}
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if not (self_mode and j == i)]
        order = sorted(candidates, key=lambda j: (dist[i, j], j))
        correct = [gl[j] == ql[i] for j in order]
        r = sum(correct)
        if r == 0:
            unmatched += 1
            continue
        p1.append(float(correct[0]))
        for k in recall_ks:
            recall[k].append(float(any(correct[:k])))
        pr.append(sum(correct[:r]) / r)
        hits, average_precision = 0, 0.0
        for rank in range(r):
            if correct[rank]:
                hits += 1
                average_precision += hits / (rank + 1)
        map_r.append(average_precision / r)
    return summary(p1, recall, pr, map_r, unmatched)


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def assert_no_near_ties(q, ql, g, gl, metric, self_mode, depth) -> None:
    """The float32 search can match the float64 reference exactly only where no two of a query's
    first `depth` + 1 neighbours of different correctness are (nearly) tied; check the data has none.
    With integer coordinates (see `clustered`) faiss's squared L2 distances are exact integers."""
    dist = distance_matrix(q, g, metric) ** (2 if metric == "l2" else 1)
    if self_mode:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :depth + 1]
    nearest = np.take_along_axis(dist, order, axis=1)
    correct = gl[order] == ql[:, None]
    differ = correct[:, 1:] != correct[:, :-1]
    assert np.diff(nearest, axis=1)[differ].min() > (0.5 if metric == "l2" else 1e-5)


def clustered(seed: int, n_classes: int = 30, d: int = 8, max_size: int = 15):
    """Random class sizes 1..max_size (singletons included), overlapping clusters, non-contiguous labels.

    Coordinates are integers below 700 in magnitude, so every squared norm, inner product and squared
    distance is an integer below 2**24: exact in float32, whatever order BLAS sums in.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, n_classes)
    labels = np.repeat(np.arange(n_classes), sizes)
    centres = rng.standard_normal((n_classes, d))
    x = np.round(100 * (centres[labels] + 0.7 * rng.standard_normal((len(labels), d))))
    assert np.abs(x).max() < 700
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), (labels[order] * 13 - 50)


# ----------------------------------------------------------------------------- against brute force

@pytest.mark.parametrize("seed", [2, 5, 6])  # seeds whose data have no near ties (asserted below)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_self_retrieval_matches_brute_force(seed, metric):
    x, y = clustered(seed)
    ks = (1, 2, 4, 8)
    max_r = np.unique(y, return_counts=True)[1].max() - 1
    assert max_r > max(ks)  # some query's R exceeds max(recall_ks): k must not be capped at 8
    assert_no_near_ties(x, y, x, y, metric, True, max(max_r, *ks))
    expected = reference_metrics(x, y, recall_ks=ks, metric=metric)
    assert expected["queries_without_match"] > 0  # singletons present
    assert 0.2 < expected["MAP@R"] < 0.9  # informative data, not a trivial 0 or 1
    assert_metrics_equal(retrieval_metrics(x, y, recall_ks=ks, metric=metric), expected)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_query_gallery_matches_brute_force_with_one_sided_classes(metric):
    x, y = clustered(3, n_classes=40)
    classes = np.unique(y)
    query_only, gallery_only = classes[:5], classes[5:10]
    rng = np.random.default_rng(3)
    to_query = np.isin(y, query_only) | (~np.isin(y, gallery_only) & (rng.random(len(y)) < 0.4))
    q, ql, g, gl = x[to_query], y[to_query], x[~to_query], y[~to_query]
    ks = (1, 3, 10, 1000)  # 1000 > number of references: R@1000 counts every reference
    assert_no_near_ties(q, ql, g, gl, metric, False, max(np.unique(gl, return_counts=True)[1].max(), 10))
    expected = reference_metrics(q, ql, g, gl, recall_ks=ks, metric=metric)
    assert expected["queries_without_match"] >= np.isin(ql, query_only).sum() > 0
    assert_metrics_equal(retrieval_metrics(q, ql, g, gl, recall_ks=ks, metric=metric), expected)


def test_cosine_equals_l2_on_unit_vectors_and_leaves_input_alone():
    x, y = clustered(4)
    before = x.copy()
    cosine = retrieval_metrics(x, y, metric="cosine")
    np.testing.assert_array_equal(x, before)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert_metrics_equal(cosine, retrieval_metrics(unit, y, metric="l2"))


def test_cosine_separates_directions_that_inner_products_near_1_do_not():
    # the nearer reference (1e-4 rad away, the query's class) against a farther one (3e-4 rad): in float32
    # their inner products with the query, 1 - 5e-9 and 1 - 4.5e-8, lie within one step (6e-8) of 1 and
    # often tie (inner-product search failed 3 of these 10 planes)
    for seed in range(10):  # random planes in 64 dimensions
        base, perp = np.linalg.qr(np.random.default_rng(seed).standard_normal((64, 2)))[0].T
        query = base[None].astype(np.float32)
        gallery = np.stack([np.cos(t) * base + np.sin(t) * perp for t in (3e-4, -1e-4)]).astype(np.float32)
        distances = np.linalg.norm(gallery.astype(np.float64) - query, axis=1)
        assert distances[1] < distances[0] / 2  # the brute-force truth in float64
        assert retrieval_metrics(query, [0], gallery, [1, 0], recall_ks=(1,), metric="cosine")["P@1"] == 1.0


def test_minus_zero_and_zero_are_one_embedding():
    # [-0, 0] (the query's class) and [0, 0] (another) are the same point: P@1 = 1/2 as for any tie of two,
    # whatever lies between their bytes (2**-125: 0x01 in the top byte of the first float) and however ordered
    gallery = np.array([[-0.0, 0.0], [0.0, 0.0], [2.0 ** -125, 5.0]], np.float32)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        metrics = retrieval_metrics([[1.0, 0.0]], [0], gallery[order], np.array([0, 1, 1])[order], recall_ks=(1,))
        assert metrics["P@1"] == 0.5


# ----------------------------------------------------------------------------- hand-built cases

def test_hand_computed_map_at_r_with_r_above_max_recall_k():
    # references at distances 1..5 with classes A B A A B: R = 3 > max(recall_ks) = 1,
    # P@R = 2/3, MAP@R = (1/1 + 0 + 2/3) / 3 = 5/9
    query, gallery = np.zeros((1, 1)), np.arange(1.0, 6.0)[:, None]
    got = retrieval_metrics(query, [0], gallery, [0, 1, 0, 0, 1], recall_ks=(1,))
    assert got == pytest.approx({"P@1": 1.0, "R@1": 1.0, "P@R": 2 / 3, "MAP@R": 5 / 9, "queries_without_match": 0})


def test_single_item_class_is_unscored_but_still_a_distractor():
    # points 0 and 3 share class 0; the singleton (class 9) at 1 sits nearer to both than they are to each other
    got = retrieval_metrics(np.array([[0.0], [3.0], [1.0]]), np.array([0, 0, 9]), recall_ks=(1, 2))
    assert got == pytest.approx({"P@1": 0.0, "R@1": 0.0, "R@2": 1.0, "P@R": 0.0, "MAP@R": 0.0,
                                 "queries_without_match": 1})


def test_classes_on_one_side_only_hand_built():
    # query class 7 has no gallery item (unscored); gallery class 8 is a distractor nearer than the match
    got = retrieval_metrics(np.array([[0.0], [10.0]]), np.array([5, 7]), np.array([[1.0], [2.0]]),
                            np.array([8, 5]), recall_ks=(1, 2))
    assert got == pytest.approx({"P@1": 0.0, "R@1": 0.0, "R@2": 1.0, "P@R": 0.0, "MAP@R": 0.0,
                                 "queries_without_match": 1})


def test_exact_duplicates_with_the_same_label_are_neighbours():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.5]])
    got = retrieval_metrics(x, np.array([0, 0, 1, 1]), recall_ks=(1,))
    assert got == pytest.approx({"P@1": 1.0, "R@1": 1.0, "P@R": 1.0, "MAP@R": 1.0, "queries_without_match": 0})


def test_exact_duplicates_with_different_labels_count_in_expectation():
    # points 0 and 1 coincide but differ in class. Query 0's only other copy there is of class 1 (a sure miss
    # before its match at distance 2); for queries 2 and 3 the coincident pair is a tie of one hit and one miss
    # at distance 2 and 5, worth 1/2 at rank 1. Every R is 1, so P@R = MAP@R = P@1.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, -5.0]])
    y = np.array([0, 1, 0, 1])
    got = retrieval_metrics(x, y, recall_ks=(1, 2, 4))
    assert got == pytest.approx({"P@1": 0.25, "R@1": 0.25, "R@2": 0.75, "R@4": 1.0, "P@R": 0.25, "MAP@R": 0.25,
                                 "queries_without_match": 0})


def test_own_group_is_found_wherever_the_search_put_it():
    # rounding may rank a near-identical vector ahead of the query's own; past k it is not returned at all
    neighbours = np.array([[5, 2, 7], [2, 5, 7], [2, 7, 5], [1, 3, 4]])
    np.testing.assert_array_equal(evaluate._own_group(neighbours, np.array([5, 5, 5, 9])), [0, 1, 2, 3])


def test_labels_need_not_be_contiguous():
    x, y = clustered(5)
    contiguous = np.unique(y, return_inverse=True)[1]
    new_values = np.random.default_rng(5).permutation(contiguous.max() + 1) * 10**12 - 7  # huge, negative, shuffled
    scattered = new_values[contiguous]
    assert_metrics_equal(retrieval_metrics(x, scattered), retrieval_metrics(x, contiguous))


def test_torch_and_numpy_inputs_give_identical_results():
    x, y = clustered(6)
    q, ql, g, gl = x[:150], y[:150], x[150:], y[150:]
    from_numpy = retrieval_metrics(q, ql, g, gl)
    from_torch = retrieval_metrics(torch.tensor(q, dtype=torch.float64, requires_grad=True),
                                   torch.tensor(ql, dtype=torch.int32), torch.from_numpy(g), torch.from_numpy(gl))
    assert from_torch == from_numpy
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y)) == retrieval_metrics(x, y)


def test_returned_types_and_key_order():
    x, y = clustered(7)
    got = retrieval_metrics(x, y, recall_ks=(8, 1))
    assert list(got) == ["P@1", "R@8", "R@1", "P@R", "MAP@R", "queries_without_match"]
    assert all(type(got[key]) is float for key in list(got)[:-1])
    assert type(got["queries_without_match"]) is int


# ----------------------------------------------------------------------------- exact ties (expectation)

def expected_reference_metrics(q, ql, g=None, gl=None, recall_ks=(1, 2, 4, 8), metric="l2") -> dict:
    """Each metric's expectation over a uniformly random order of identical references, one query at a
    time, from the probability that one position, or two positions, hold a correct reference: a position
    in a tie of n copies with h correct is correct with probability h/n, two positions of one tie with
    h(h-1)/(n(n-1)), positions of different ties independently. Distinct vectors must not tie."""
    self_mode, g, gl, dist = references(q, ql, g, gl, metric)
    p1, pr, map_r, unmatched = [], [], [], 0
    recall = {k: [] for k in recall_ks}
    for i in range(len(q)):
        ties = {}  # distinct reference vector -> [distance, copies, correct copies]
        for j in range(len(g)):
            if not (self_mode and j == i):
                tie = ties.setdefault(tuple(g[j]), [dist[i, j], 0, 0])
                tie[1] += 1
                tie[2] += int(gl[j] == ql[i])
        ranked = sorted(ties.values())
        tie_of = [t for t, (_, n, _) in enumerate(ranked) for _ in range(n)]  # position -> its tie
        r = sum(h for _, _, h in ranked)
        if r == 0:
            unmatched += 1
            continue

        def correct(a):
            _, n, h = ranked[tie_of[a]]
            return h / n

        def both_correct(a, b):
            if tie_of[a] != tie_of[b]:
                return correct(a) * correct(b)
            _, n, h = ranked[tie_of[a]]
            return h * (h - 1) / (n * (n - 1))

        def none_correct_within(k):
            probability, start = 1.0, 0
            for _, n, h in ranked:  # tie t fills positions start .. start + n - 1; s of them lie within k
                if start >= k:
                    break
                s = min(k - start, n)
                probability *= math.comb(n - h, s) / math.comb(n, s)
                start += n
            return probability

        p1.append(correct(0))
        for k in recall_ks:
            recall[k].append(1 - none_correct_within(k))
        pr.append(sum(correct(a) for a in range(r)) / r)
        # E[P(i) [i-th correct]] = (1/i) sum_{j <= i} P[i-th and j-th correct]
        map_r.append(sum((correct(a) + sum(both_correct(a, b) for b in range(a))) / (a + 1) for a in range(r)) / r)
    return summary(p1, recall, pr, map_r, unmatched)


def label_orders(x, y):
    """y with the labels of identical rows of x permuted among them in every possible way: the data under
    every way of breaking its exact ties (the reference breaks them by index)."""
    ties = {}
    for i, row in enumerate(map(tuple, x)):
        ties.setdefault(row, []).append(i)
    for choice in itertools.product(*(itertools.permutations(members) for members in ties.values())):
        permuted = y.copy()
        for members, order in zip(ties.values(), choice):
            permuted[list(members)] = y[list(order)]
        yield permuted


def mean_over(results: list[dict]) -> dict:
    return {key: float(np.mean([res[key] for res in results])) if key != "queries_without_match" else results[0][key]
            for key in results[0]}


def with_duplicates(seed: int, n_classes: int = 8, copy_fraction: float = 0.4, data=None):
    """`clustered` data (or the given (x, y)) in which a random `copy_fraction` of the points get 1-3 extra
    copies, each keeping its point's label or (half the time) taking a random class: ties within and
    across classes."""
    x, y = clustered(seed, n_classes=n_classes, d=6, max_size=8) if data is None else data
    rng = np.random.default_rng(seed)
    extra = np.where(rng.random(len(x)) < copy_fraction, rng.integers(1, 4, len(x)), 0)
    source = np.repeat(np.arange(len(x)), extra)
    copy_labels = np.where(rng.random(len(source)) < 0.5, y[source], rng.choice(np.unique(y), len(source)))
    x, y = np.concatenate([x, x[source]]), np.concatenate([y, copy_labels])
    order = rng.permutation(len(x))
    return x[order], y[order]


def assert_distinct_vectors_never_tie(q, g, metric) -> None:
    """The search can follow the float64 reference only where different vectors are at clearly different
    distances from every query (squared L2 distances of `clustered` data are exact integers)."""
    distinct = np.unique(g, axis=0)
    dist = np.sort(distance_matrix(q, distinct, metric) ** (2 if metric == "l2" else 1), axis=1)
    assert np.diff(dist, axis=1).min() > (0.5 if metric == "l2" else 1e-5)


def test_expectation_reference_equals_the_mean_over_every_tie_order():
    # the test's own two references agree: its probability formulas are the mean over all tie orders
    # on a line at the marks of a Golomb ruler (all differences distinct): only identical points tie
    x = np.array([0, 0, 0, 1, 1, 4, 10, 10, 12, 17], np.float32)[:, None]
    y = np.array([0, 1, 1, 0, 2, 1, 1, 0, 2, 2])
    assert_distinct_vectors_never_tie(x, x, "l2")
    ks = (1, 2, 3, 5)
    orders = [reference_metrics(x, permuted, recall_ks=ks) for permuted in label_orders(x, y)]
    assert len(orders) == 6 * 2 * 2  # 3! x 2! x 2! orders of the three ties
    expected = mean_over(orders)
    assert_metrics_equal(expected_reference_metrics(x, y, recall_ks=ks), expected)
    assert_metrics_equal(retrieval_metrics(x, y, recall_ks=ks), expected)
    assert len({res["MAP@R"] for res in orders}) > 1  # the tie order matters to a single order's score


def has_mixed_ties(x, y) -> bool:
    return len(np.unique(np.column_stack([x, y]), axis=0)) > len(np.unique(x, axis=0))


@pytest.mark.parametrize("seed", [5, 6])  # seeds whose distinct vectors never tie (asserted below)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_match_expectation_reference_in_self_retrieval(seed, metric):
    x, y = with_duplicates(seed)
    assert_distinct_vectors_never_tie(x, x, metric)
    assert has_mixed_ties(x, y)
    ks = (1, 2, 3, 5, 1000)
    expected = expected_reference_metrics(x, y, recall_ks=ks, metric=metric)
    assert 0.2 < expected["MAP@R"] < 0.9
    assert_metrics_equal(retrieval_metrics(x, y, recall_ks=ks, metric=metric), expected)


def test_ties_match_expectation_reference_far_down_the_ranking():
    # R@1000 searches every distinct gallery vector: several blocks of columns (64) of the search's result
    x, y = with_duplicates(22, copy_fraction=0.3, data=clustered(22, n_classes=40, d=8, max_size=12))
    to_query = np.random.default_rng(22).random(len(x)) < 0.08
    q, ql, g, gl = x[to_query], y[to_query], x[~to_query], y[~to_query]
    assert len(np.unique(g, axis=0)) > 3 * 64 and has_mixed_ties(g, gl)
    assert_distinct_vectors_never_tie(q, g, "l2")  # seed 22 is one of the few (of 1-30) without such ties
    ks = (*range(1, 300, 2), 1000)  # R@k at every other rank: any miscount of the positions ahead shows
    expected = expected_reference_metrics(q, ql, g, gl, recall_ks=ks)
    assert expected["R@151"] < 1  # some query's first match lies several blocks down
    assert_metrics_equal(retrieval_metrics(q, ql, g, gl, recall_ks=ks), expected)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_match_expectation_reference_with_a_gallery(metric):
    x, y = with_duplicates(3, n_classes=10)
    to_query = np.random.default_rng(3).random(len(x)) < 0.4  # copies of one point land on both sides
    q, ql, g, gl = x[to_query], y[to_query], x[~to_query], y[~to_query]
    assert len(np.unique(q, axis=0)) < len(q) and has_mixed_ties(g, gl)
    assert_distinct_vectors_never_tie(q, g, metric)
    ks = (1, 2, 4, 7)
    expected = expected_reference_metrics(q, ql, g, gl, recall_ks=ks, metric=metric)
    assert_metrics_equal(retrieval_metrics(q, ql, g, gl, recall_ks=ks, metric=metric), expected)


def test_hand_computed_tie_of_three():
    # from the query: three references at distance 1 (classes A, B, B), then two at distance 2 (A, A); R = 3.
    # P@1 = 1/3; R@2 = 1 - C(2,2)/C(3,2) = 2/3; the one hit among the first 3 sits at rank t = 1, 2 or 3
    # alike: P@R = 1/3, MAP@R = (1/3) E[1/t] = (1/3)(1 + 1/2 + 1/3)/3 = 11/54
    gallery = np.array([[1.0], [1.0], [1.0], [2.0], [2.0]])
    got = retrieval_metrics(np.zeros((1, 1)), [0], gallery, [0, 1, 1, 0, 0], recall_ks=(1, 2, 3))
    assert got == pytest.approx({"P@1": 1 / 3, "R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0, "P@R": 1 / 3,
                                 "MAP@R": 11 / 54, "queries_without_match": 0})


def test_sorted_labels_do_not_inflate_ties():
    # two embeddings, each shared by four images of two classes: in index order each query's nearest
    # references would start with its own class when the data are sorted by label. Every query's tie
    # holds 3 others, 1 of its class: P@1 = 1/3 in expectation however the data are ordered.
    v, w = [1.0, 0.0], [0.0, 1.0]
    x = np.array([v] * 4 + [w] * 4)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    got = retrieval_metrics(x, y, recall_ks=(1, 3))
    assert got["P@1"] == pytest.approx(1 / 3) and got["R@3"] == 1.0
    shuffled = np.random.default_rng(0).permutation(len(x))
    assert retrieval_metrics(x[shuffled], y[shuffled], recall_ks=(1, 3)) == got


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_result_does_not_depend_on_the_order_of_the_data(metric):
    # duplicates across classes, and distinct vectors at exactly equal distances (a ring around a point)
    x, y = with_duplicates(4)
    ring = np.array([[0, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0], [-5, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0],
                     [0, -5, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0]], np.float32) + 900
    x, y = np.concatenate([x, ring]), np.concatenate([y, y[:6]])
    by_label = np.argsort(y, kind="stable")
    shuffled = np.random.default_rng(4).permutation(len(x))
    got = retrieval_metrics(x[by_label], y[by_label], metric=metric)
    assert retrieval_metrics(x[shuffled], y[shuffled], metric=metric) == got
    q, g = np.array_split(shuffled, 2)
    qg = retrieval_metrics(x[q], y[q], x[g], y[g], metric=metric)
    q, g = q[np.argsort(y[q], kind="stable")], g[np.argsort(y[g], kind="stable")]
    assert retrieval_metrics(x[q], y[q], x[g], y[g], metric=metric) == qg


# ----------------------------------------------------------------------------- input errors

X, Y = np.random.default_rng(0).standard_normal((6, 3)), np.array([0, 0, 1, 1, 2, 2])


def with_bad_rows(rows: list[int], value: float) -> np.ndarray:
    x = X.copy()
    x[rows, 1] = value
    return x


@pytest.mark.parametrize("call, kwargs, message", [
    (retrieval_metrics, dict(query=with_bad_rows([3, 5], np.nan), query_labels=Y),
     r"query of shape \(6, 3\) has 2 row\(s\) with NaN or inf \(as float32\), the first at row 3"),
    (retrieval_metrics, dict(query=X * 1e39, query_labels=Y),
     r"query of shape \(6, 3\) has 6 row\(s\) with NaN or inf \(as float32\)"),
    (retrieval_metrics, dict(query=X, query_labels=Y, gallery=with_bad_rows([4], np.inf), gallery_labels=Y),
     r"gallery of shape \(6, 3\) has 1 row\(s\) with NaN or inf .*the first at row 4"),
    (nmi, dict(embeddings=torch.from_numpy(with_bad_rows([2, 4], -np.inf)), labels=Y),
     r"nmi: embeddings of shape \(6, 3\) has 2 row\(s\) with NaN or inf .*the first at row 2"),
])
def test_non_finite_embeddings_are_rejected(call, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(query=X, query_labels=Y[:5]), r"query_labels must be 6 integers \(one per row\), got int64, shape \(5,\)"),
    (dict(query=X, query_labels=Y.astype(float)), "query_labels must be 6 integers .*got float64"),
    (dict(query=X, query_labels=torch.tensor(Y, dtype=torch.float32)), "query_labels must be 6 integers .*got float32"),
    (dict(query=X, query_labels=Y, gallery=X, gallery_labels=Y[:, None]), r"gallery_labels must be 6 integers"),
    (dict(query=np.zeros((0, 3)), query_labels=np.zeros(0, int)), r"query must be a non-empty \(N, d\) array"),
    (dict(query=X[:, 0], query_labels=Y), r"query must be a non-empty \(N, d\) array, got shape \(6,\)"),
    (dict(query=X, query_labels=Y, gallery=X[:, :2], gallery_labels=Y), "query has d = 3 but gallery has d = 2"),
    (dict(query=X, query_labels=Y, gallery=X), "gallery and gallery_labels must be given together"),
    (dict(query=X, query_labels=Y, metric="euclidean"), "metric must be one of"),
    (dict(query=X, query_labels=Y, recall_ks=(1, 0)), "recall_ks must be positive integers"),
    (dict(query=X[:1], query_labels=Y[:1]), "none of the 1 queries has a reference of its class"),
    (dict(query=X, query_labels=np.arange(6)), "none of the 6 queries has a reference of its class"),
    (dict(query=X * (np.arange(6) != 2)[:, None], query_labels=Y, metric="cosine"),
     r"zero vectors; query has 1 \(first at row 2\)"),
])
def test_retrieval_metrics_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(query=np.ones((6, 3)), query_labels=Y), r"all 6 rows of query \(shape \(6, 3\)\) are identical"),
    (dict(query=X, query_labels=Y, gallery=np.tile(X[:1], (4, 1)), gallery_labels=Y[:4]),
     "all 4 rows of gallery .* are identical: the model has collapsed"),
    (dict(query=np.tile(X[:1], (3, 1)), query_labels=Y[:3], gallery=X, gallery_labels=Y), "rows of query"),
    (dict(query=np.outer(np.arange(1, 7), X[0]), query_labels=Y, metric="cosine"), "has collapsed"),
    (dict(query=X[0] + 1e-9 * X, query_labels=Y), "has collapsed"),  # identical up to float32 rounding
])
def test_collapsed_embeddings_are_an_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**kwargs)


# ----------------------------------------------------------------------------- NMI

def reference_nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """I(Y; C) / ((H(Y) + H(C)) / 2) from the joint counts."""
    n = len(labels)
    joint = np.array([[np.sum((labels == a) & (clusters == b)) for b in np.unique(clusters)]
                      for a in np.unique(labels)]) / n
    py, pc = joint.sum(axis=1), joint.sum(axis=0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (py[i] * pc[j]))
             for i in range(len(py)) for j in range(len(pc)) if joint[i, j] > 0)
    entropy = lambda p: -sum(v * math.log(v) for v in p if v > 0)  # noqa: E731
    return mi / ((entropy(py) + entropy(pc)) / 2)


def three_far_clusters() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    x = np.repeat(centres, 10, axis=0) + rng.standard_normal((30, 2))
    return x.astype(np.float32), np.repeat(np.arange(3), 10)


def test_nmi_matches_formula_on_obvious_clusters():
    x, clusters = three_far_clusters()
    labels = np.array([0] * 8 + [1] * 2 + [1] * 7 + [2] * 3 + [2] * 10) + 40  # labels disagree in part
    expected = reference_nmi(labels, clusters)
    assert 0.3 < expected < 0.9
    assert nmi(x, labels) == pytest.approx(expected, abs=1e-12)
    assert nmi(x, clusters * 5 - 3) == pytest.approx(1.0)


def test_nmi_is_reproducible_and_accepts_torch():
    x, y = clustered(8, n_classes=10)
    assert 0.0 < nmi(x, y, seed=3) == nmi(torch.from_numpy(x), torch.from_numpy(y), seed=3) < 1.0


def test_nmi_does_not_depend_on_the_order_of_the_rows():
    # overlapping classes, where k-means ends where its initial centroids (drawn by position) lead it
    x, y = clustered(8, n_classes=10)
    values = {nmi(x[p], y[p]) for p in [np.arange(len(x))] + [np.random.default_rng(s).permutation(len(x))
                                                                 for s in range(5)]}
    assert len(values) == 1


# ----------------------------------------------------------------------------- embed

def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 3)).double()
    model[2].running_mean.uniform_(-1, 1)
    model.train()
    model[2].eval()  # a frozen BatchNorm inside a training model, as in MLRC
    return model


def test_embed_concatenates_eval_outputs_in_loader_order_and_restores_modes():
    model = small_model()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 9, (n,), generator=gen))
               for n in (3, 5, 2)]
    embeddings, labels = embed(model, batches, "cpu")
    assert model.training and model[1].training and not model[2].training
    model.eval()
    with torch.no_grad():
        expected = model(torch.cat([b[0] for b in batches]))
    assert embeddings.dtype == torch.float32 and labels.dtype == torch.int64
    assert embeddings.device.type == "cpu" and not embeddings.requires_grad
    np.testing.assert_allclose(embeddings.numpy(), expected.float().numpy(), rtol=1.3e-6, atol=1e-5)
    assert torch.equal(labels, torch.cat([b[1] for b in batches]))


def test_embed_restores_modes_when_the_model_fails():
    model = small_model()
    loader = [(torch.zeros(2, n, dtype=torch.float64), torch.zeros(2)) for n in (4, 5)]
    with pytest.raises(RuntimeError):  # the second batch has 5 features, the model takes 4
        embed(model, loader, torch.device("cpu"))
    assert model.training and model[1].training and not model[2].training


# ----------------------------------------------------------------------------- ensemble

def test_ensemble_normalises_each_part_then_concatenates():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 2)) * 7
    expected = np.concatenate([a / np.sqrt((a ** 2).sum(1, keepdims=True)),
                               b / np.sqrt((b ** 2).sum(1, keepdims=True))], axis=1)
    from_torch = ensemble([torch.from_numpy(a), torch.from_numpy(b)])
    assert isinstance(from_torch, torch.Tensor) and from_torch.shape == (5, 5)
    np.testing.assert_allclose(from_torch.numpy(), expected, rtol=1e-12)
    from_numpy = ensemble([a, b])
    assert isinstance(from_numpy, np.ndarray)
    np.testing.assert_allclose(from_numpy, expected, rtol=1e-12)


def lipschitz(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1.0)  # n(x) = x / max(1, ||x||), PAPER.md §3


def test_ensemble_with_the_runs_normalisation_is_n_of_the_concatenation_of_n():
    def n_rows(m):  # the reference n, one row at a time
        return np.array([row / max(1.0, math.sqrt(sum(v * v for v in row))) for row in m])

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 2)) * 5
    a[0] *= 0.1 / np.linalg.norm(a[0])  # norm 0.1: n leaves the row alone where L2 would scale it to 1
    a[1] *= 0.5 / np.linalg.norm(a[1])
    b[1] *= 0.3 / np.linalg.norm(b[1])  # row 1: both parts inside the unit ball, and their concatenation too
    expected = n_rows(np.concatenate([n_rows(a), n_rows(b)], axis=1))
    from_numpy = ensemble([a, b], normalize=lipschitz)
    assert isinstance(from_numpy, np.ndarray)
    np.testing.assert_allclose(from_numpy, expected, rtol=1e-12)
    from_torch = ensemble([torch.from_numpy(a), b], normalize=lipschitz)
    assert isinstance(from_torch, torch.Tensor)
    np.testing.assert_allclose(from_torch.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(expected[1]), math.hypot(0.5, 0.3))  # left inside the ball
    mlrc = ensemble([a, b])
    assert np.abs(mlrc[:2, :3] - expected[:2, :3]).min() > 0.1  # the two ensembles differ there


def test_ensemble_default_is_unchanged_by_an_explicit_none():
    parts = [np.random.default_rng(2).standard_normal((3, 4)), np.ones((3, 1))]
    np.testing.assert_array_equal(ensemble(parts, normalize=None), ensemble(parts))


# ----------------------------------------------------------------------------- format_table

def test_format_table_orders_aligns_and_formats():
    metrics = {"MAP@R": 0.1234, "epoch_seconds": 0.5, "R@10": 0.9, "queries_without_match": 3,
               "R@2": 0.8, "NMI": 0.5, "P@R": 0.2, "P@1": 0.6367}
    lines = format_table(metrics).splitlines()
    assert [line.split()[0] for line in lines] == ["metric", "P@1", "R@2", "R@10", "P@R", "MAP@R", "NMI",
                                                   "epoch_seconds", "queries_without_match"]
    assert lines[1].split()[1] == "63.67%" and lines[5].split()[1] == "12.34%"
    assert lines[-1].split()[1] == "3"
    assert len({len(line) for line in lines}) == 1  # one width: values right-aligned in one column
