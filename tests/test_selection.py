"""selection.py against brute-force references written here with loops and numpy (PAPER.md §5),
the candidate stream's queue discipline (PAPER.md §7), and the rejection of bad input."""
import itertools
import json

import numpy as np
import pytest
import torch

from selection import (
    CandidateStream,
    candidate_pool,
    covering_radius,
    greedy_k_center,
    mean_interclass_distance,
    select_proxies,
)


def reference_greedy(pool, k, initial="zero"):
    """Textbook greedy farthest-point on squared distances.

    initial: "zero" (the zero vector), None (no initial set) or an (m, d) array.
    """
    pool = np.asarray(pool, dtype=np.float64)
    b, d = pool.shape
    if isinstance(initial, str):
        initial = np.zeros((1, d))
    elif initial is None:
        initial = np.zeros((0, d))
    dist = [min([float(((x - p) ** 2).sum()) for p in initial], default=float("inf")) for x in pool]
    chosen = []
    for _ in range(k):
        best, best_dist = -1, -float("inf")
        for i in range(b):
            if i not in chosen and dist[i] > best_dist:  # strict: ties keep the lowest index
                best, best_dist = i, dist[i]
        chosen.append(best)
        dist = [min(dist[i], float(((pool[i] - pool[best]) ** 2).sum())) for i in range(b)]
    return chosen


def radius_of(pool, centers):
    """max over pool points of the Euclidean distance to the nearest center (loops)."""
    return max(min(float(np.linalg.norm(x - c)) for c in centers) for x in pool)


# ---------------------------------------------------------------------------------------------
# greedy_k_center


@pytest.mark.parametrize("start", ["zero", "empty", "proxies"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_matches_bruteforce(start, k):
    g = torch.Generator().manual_seed(k)
    C, b, d, m = 5, 6, 4, 3
    pools = torch.randn(C, b, d, generator=g, dtype=torch.float64)
    proxies = torch.randn(C, m, d, generator=g, dtype=torch.float64)
    initial = {"zero": None, "empty": proxies[:, :0], "proxies": proxies}[start]
    got = greedy_k_center(pools, k, initial)
    assert got.shape == (C, k) and got.dtype == torch.int64
    for c in range(C):
        ref_init = {"zero": "zero", "empty": None, "proxies": proxies[c].numpy()}[start]
        assert got[c].tolist() == reference_greedy(pools[c].numpy(), k, ref_init)


def test_single_pool_matches_batched_row():
    g = torch.Generator().manual_seed(1)
    pools = torch.randn(3, 8, 5, generator=g)
    proxies = torch.randn(3, 2, 5, generator=g)
    batched = greedy_k_center(pools, 4, proxies)
    for c in range(3):
        single = greedy_k_center(pools[c], 4, proxies[c])
        assert single.shape == (4,)
        assert torch.equal(single, batched[c])


def test_zero_start_picks_largest_norm_first():
    g = torch.Generator().manual_seed(2)
    pools = torch.randn(50, 7, 16, generator=g) * torch.rand(50, 7, 1, generator=g)
    first = greedy_k_center(pools, 1)[:, 0]
    assert torch.equal(first, pools.norm(dim=2).argmax(dim=1))


def test_ties_go_to_lowest_index():
    pool = torch.tensor([[0.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 1.0]])
    # zero start: |p1|^2 = |p2|^2 = 4 tie -> 1; then p2 (4) > p3 (1) > p0 (0)
    assert greedy_k_center(pool, 4).tolist() == [1, 2, 3, 0]
    assert reference_greedy(pool.numpy(), 4) == [1, 2, 3, 0]
    diamond = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert greedy_k_center(diamond, 4).tolist() == [0, 1, 2, 3]  # all at distance 1 from zero


def test_coincident_candidates_are_never_picked_twice():
    pools = torch.ones(2, 5, 3)
    assert greedy_k_center(pools, 5, pools[:, :0]).tolist() == [list(range(5))] * 2
    assert greedy_k_center(pools, 5).tolist() == [list(range(5))] * 2


def test_two_approximation_against_exact_optimum():
    # Claim checked (Gonzalez's bound): with S the k picks and I the initial set (empty, the zero
    # vector, or random points), the pool's covering radius by S ∪ I is at most 2·OPT_k, where
    # OPT_k = min over k-subsets T of the pool of the pool's covering radius by T (Euclidean).
    g = torch.Generator().manual_seed(3)
    C, b, d = 30, 7, 2
    pools = torch.randn(C, b, d, generator=g, dtype=torch.float64)
    random_init = 0.5 * torch.randn(C, 2, d, generator=g, dtype=torch.float64)
    ratios_empty = []
    for k in (1, 2, 3):
        picks = {
            "empty": greedy_k_center(pools, k, pools[:, :0]),
            "zero": greedy_k_center(pools, k),
            "random": greedy_k_center(pools, k, random_init),
        }
        for c in range(C):
            pool = pools[c].numpy()
            distances = np.linalg.norm(pool[:, None] - pool[None], axis=2)  # (b, b)
            opt = min(distances[:, list(t)].min(axis=1).max() for t in itertools.combinations(range(b), k))
            extra = {"empty": np.zeros((0, d)), "zero": np.zeros((1, d))}
            extra["random"] = random_init[c].numpy()
            for start, chosen in picks.items():
                centers = np.concatenate([pool[chosen[c].numpy()], extra[start]])
                assert radius_of(pool, centers) <= 2 * opt + 1e-12, (start, k, c)
            ratios_empty.append(radius_of(pool, pool[picks["empty"][c].numpy()]) / opt)
    # the bound is not vacuous here: greedy is sometimes strictly worse than the optimum
    assert max(ratios_empty) > 1.05


# ---------------------------------------------------------------------------------------------
# covering_radius and mean_interclass_distance


def labelled_centers(g, d):
    """Classes 2, 5, 7, 9 with 1, 3, 2, 4 centers, plus class 11 (no points), in shuffled order."""
    labels = torch.tensor([2] + [5] * 3 + [7] * 2 + [9] * 4 + [11] * 2)
    order = torch.randperm(labels.numel(), generator=g)
    return torch.randn(labels.numel(), d, generator=g, dtype=torch.float64)[order], labels[order]


@pytest.mark.parametrize("max_chunk_elements", [1, 50, 2**24])
def test_covering_radius_matches_bruteforce(max_chunk_elements):
    g = torch.Generator().manual_seed(4)
    d = 3
    centers, center_labels = labelled_centers(g, d)
    labels = torch.tensor([2, 5, 7, 9])[torch.randint(4, (40,), generator=g)]
    labels[:4] = torch.tensor([9, 2, 7, 5])  # every class present
    points = torch.randn(40, d, generator=g, dtype=torch.float64)
    radius, mean = covering_radius(
        points, labels, centers, center_labels, max_chunk_elements=max_chunk_elements
    )
    expected = []
    for c in sorted(set(labels.tolist())):  # ascending label order
        own = [centers[j].numpy() for j in range(len(center_labels)) if center_labels[j] == c]
        xs = [points[i].numpy() for i in range(len(labels)) if labels[i] == c]
        expected.append(radius_of(xs, own))
    np.testing.assert_allclose(radius.numpy(), expected, rtol=1e-12)
    assert mean == pytest.approx(sum(expected) / len(expected), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_mean_interclass_distance_matches_bruteforce(chunk_size):
    g = torch.Generator().manual_seed(5)
    centers, center_labels = labelled_centers(g, 4)
    means = {}
    for c in sorted(set(center_labels.tolist())):
        rows = [centers[j].numpy() for j in range(len(center_labels)) if center_labels[j] == c]
        means[c] = np.mean(rows, axis=0)
    pairs = list(itertools.combinations(means.values(), 2))
    expected = sum(float(np.linalg.norm(a - b)) for a, b in pairs) / len(pairs)
    got = mean_interclass_distance(centers, center_labels, chunk_size=chunk_size)
    assert got == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# candidate_pool

class RecordingEmbedder:
    """Embeds dataset index i as (i, -2i), so every pool entry names the image it came from."""

    def __init__(self):
        self.batches = []

    def __call__(self, indices):
        assert isinstance(indices, list) and all(type(i) is int for i in indices)
        self.batches.append(indices)
        i = torch.tensor(indices, dtype=torch.float64)
        return torch.stack([i, -2 * i], dim=1)


def test_candidate_pool_embeds_the_drawn_indices_class_major():
    drawn = [[10, 11, 12], np.array([20, 21, 20]), (30, 31, 32)]  # a class may repeat an image
    embed = RecordingEmbedder()
    pools = candidate_pool(embed, drawn)
    assert pools.shape == (3, 3, 2)
    assert pools[..., 0].long().tolist() == [[10, 11, 12], [20, 21, 20], [30, 31, 32]]
    assert torch.equal(pools[..., 1], -2 * pools[..., 0])
    assert embed.batches == [[10, 11, 12, 20, 21, 20, 30, 31, 32]]  # one call: per-call augmentation seeds
    embed.batches.clear()
    candidate_pool(embed, [list(range(c * 200, c * 200 + 200)) for c in range(3)])
    assert [len(batch) for batch in embed.batches] == [600]  # however many


# ---------------------------------------------------------------------------------------------
# CandidateStream (PAPER.md §7: one run-long one-image-per-class stream)

SIZES = [10, 2, 7, 1, 3]  # 23 images: a cycle of refill="cycle" is ceil(23 / 5) = 5 draws of one image per class
CLASS_TO_INDICES = [list(range(100 * c, 100 * c + n)) for c, n in enumerate(SIZES)]
GOLDEN_SIZES = [3, 4, 5, 6, 7, 8, 9, 3, 5, 9]  # tests/golden's classes: 59 images, cycles of 6 draws


def stream_of_class(pools: list[list[list[int]]], c: int) -> list[int]:
    """Class c's images in the order the successive pools took them."""
    return [i for pool in pools for i in pool[c]]


def queue_chunks(taken: list[int], n: int, cycle: int | None) -> list[list[int]]:
    """taken cut into cycles of `cycle` images (None: one endless queue), each cycle into chunks of n."""
    cycles = [taken] if cycle is None else [taken[s:s + cycle] for s in range(0, len(taken), cycle)]
    return [part[k:k + n] for part in cycles for k in range(0, len(part), n)]


def is_queue_of(taken: list[int], indices: list[int], cycle: int | None) -> bool:
    """Each chunk of len(indices) from a queue's start is distinct images of the class, a full one all of them."""
    n = len(indices)
    return all(len(set(chunk)) == len(chunk) and set(chunk) <= set(indices) and (len(chunk) < n or
               sorted(chunk) == sorted(indices)) for chunk in queue_chunks(taken, n, cycle))


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_stream_draws_each_class_in_shuffled_queues_rebuilt_by_refill(refill):
    sizes = GOLDEN_SIZES
    class_to_indices = [list(range(100 * c, 100 * c + n)) for c, n in enumerate(sizes)]
    cycle = -(-sum(sizes) // len(sizes))  # R = ceil(N / C) = 6
    stream = CandidateStream(class_to_indices, seed=0, refill=refill)
    pools = [stream.draw(5) for _ in range(8)]  # 40 images per class: 6 cycles and 4 images, crossed inside draws
    assert all(len(pool) == len(sizes) and all(len(p) == 5 for p in pool) for pool in pools)
    own, other = (cycle, None) if refill == "cycle" else (None, cycle)
    taken = [stream_of_class(pools, c) for c in range(len(sizes))]
    assert all(is_queue_of(taken[c], class_to_indices[c], own) for c in range(len(sizes)))
    # the other discipline's chunks fail: "empty" continues a permutation across a cycle start, "cycle"
    # discards its leftovers there (sizes 4, 5, 7, 8 and 9 do not divide R)
    assert not all(is_queue_of(taken[c], class_to_indices[c], other) for c in range(len(sizes)))
    for c, n in enumerate(sizes):  # each refill is a fresh permutation, not the last one again
        assert len({tuple(chunk[:3]) for chunk in queue_chunks(taken[c], n, own) if len(chunk) >= 3}) > 1


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_stream_wraps_a_small_class_within_one_draw(refill):
    stream = CandidateStream([[7, 8], [5]], seed=1, refill=refill)
    pool = stream.draw(5)
    assert pool[1] == [5] * 5
    assert sorted(pool[0][:2]) == sorted(pool[0][2:4]) == [7, 8] and pool[0][4] in (7, 8)
    assert sorted(pool[0][4:] + stream.draw(1)[0]) == [7, 8]  # the third round goes on in the next draw


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_stream_depends_only_on_seed_and_images_taken(refill):
    def pools(seed, sizes):
        stream = CandidateStream(CLASS_TO_INDICES, seed=seed, refill=refill)
        return [stream.draw(b) for b in sizes]

    first = pools(3, [4, 4, 4])
    assert pools(3, [4, 4, 4]) == first  # deterministic
    assert any(pools(seed, [4, 4, 4]) != first for seed in (4, 5))
    merged = pools(3, [12])[0]  # one draw of 12 (crossing two cycle starts) takes what three draws of 4 took
    assert merged == [sum((pool[c] for pool in first), []) for c in range(len(SIZES))]
    assert pools(3, [5, 7]) == [[m[:5] for m in merged], [m[5:] for m in merged]]


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_stream_state_dict_round_trip_continues_identically(refill):
    stream = CandidateStream(CLASS_TO_INDICES, seed=11, refill=refill)
    for b in (3, 5, 4):
        stream.draw(b)
    state = json.loads(json.dumps(stream.state_dict()))  # JSON-able, as a checkpoint stores it
    resumed = CandidateStream(CLASS_TO_INDICES, seed=0, refill="empty" if refill == "cycle" else "cycle")
    resumed.load_state_dict(state)
    assert resumed.state_dict()["refill"] == refill
    assert [resumed.draw(b) for b in (4, 9, 1)] == [stream.draw(b) for b in (4, 9, 1)]
    assert resumed.state_dict() == stream.state_dict()


@pytest.mark.parametrize("refill", ["cycle", "empty"])
def test_stream_permutations_are_uniform(refill):
    # 1200 refills of a 3-image queue (a cycle is 3 draws): each of the 6 orders should come up about 200 times
    taken = stream_of_class([CandidateStream([[0, 1, 2]], seed=5, refill=refill).draw(3 * 1200)], 0)
    counts = {}
    for start in range(0, len(taken), 3):
        counts[tuple(taken[start:start + 3])] = counts.get(tuple(taken[start:start + 3]), 0) + 1
    assert len(counts) == 6 and all(140 < count < 260 for count in counts.values())  # ~4.6 sd either side


def test_stream_follows_its_documented_recipe():
    # permutation of class c: the stable argsort of PCG64(SeedSequence(seeds))'s raw outputs, seeds being
    # [seed, TAG, c, e] for the e-th of the endless queue, [seed, CYCLE_TAG, c, k, j] for the j-th of cycle k
    def permutation(c, seeds):
        raw = np.random.PCG64(np.random.SeedSequence(seeds)).random_raw(SIZES[c])
        return [CLASS_TO_INDICES[c][i] for i in np.argsort(raw, kind="stable")]

    endless, cycles = (CandidateStream(CLASS_TO_INDICES, 9, refill).draw(12) for refill in ("empty", "cycle"))
    for c, n in enumerate(SIZES):
        assert endless[c] == [i for e in range(12) for i in permutation(c, [9, 0x63616E64, c, e])][:12]
        # each cycle takes R = 5 images from its own queue, then drops the rest
        cycle_queue = [[i for j in range(5) for i in permutation(c, [9, 0x6379636C, c, k, j])][:5] for k in range(3)]
        assert cycles[c] == sum(cycle_queue, [])[:12]


# ---------------------------------------------------------------------------------------------
# select_proxies


def test_select_proxies_is_class_major_greedy_on_each_pool():
    g = torch.Generator().manual_seed(6)
    C, b, d, K = 4, 7, 3, 3
    pool = torch.randn(C, b, d, generator=g, dtype=torch.float64)
    converged = torch.randn(C * 2, d, generator=g, dtype=torch.float64)  # K' = 2, class-major
    for current in (None, converged):
        proxies = select_proxies(pool, current, K)
        assert proxies.shape == (C * K, d)
        for c in range(C):
            start = "zero" if current is None else current[2 * c : 2 * c + 2].numpy()
            picks = reference_greedy(pool[c].numpy(), K, start)
            for k in range(K):
                assert torch.equal(proxies[c * K + k], pool[c, picks[k]])


# ---------------------------------------------------------------------------------------------
# bad input: one clear ValueError at the public entry point


def with_non_finite(shape, rows, value=float("nan")):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    for row in rows:
        x[row][0] = value
    return x


def all_nan_class():  # before the check, greedy picked index 0 twice for a class of NaN candidates
    pools = torch.randn(3, 4, 2)
    pools[1] = float("nan")
    return pools


@pytest.mark.parametrize("call, message", [
    (lambda: greedy_k_center(all_nan_class(), 2),
     r"candidates of shape \(3, 4, 2\) has 4 row\(s\) with NaN or inf, the first is candidates\[1, 0\]"),
    (lambda: select_proxies(all_nan_class(), None, 2), r"candidates of shape \(3, 4, 2\) .* candidates\[1, 0\]"),
    (lambda: greedy_k_center(with_non_finite((5, 3), [(3,)], float("inf")), 2),
     r"candidates of shape \(5, 3\) has 1 row\(s\) with NaN or inf, the first is candidates\[3\]"),
    (lambda: greedy_k_center(torch.randn(2, 4, 3), 2, with_non_finite((2, 3, 3), [(1, 2), (0, 1)])),
     r"initial of shape \(2, 3, 3\) has 2 row\(s\) .* the first is initial\[0, 1\]"),
    (lambda: select_proxies(torch.randn(2, 4, 3), with_non_finite((4, 3), [(2,)], -float("inf")), 2),
     r"initial of shape \(2, 2, 3\) has 1 row\(s\) .* initial\[1, 0\]"),
    (lambda: covering_radius(with_non_finite((6, 2), [(4,), (5,)]), torch.zeros(6, dtype=torch.int64),
                             torch.randn(2, 2), torch.zeros(2, dtype=torch.int64)),
     r"covering_radius: points of shape \(6, 2\) has 2 row\(s\) .* points\[4\]"),
    (lambda: covering_radius(torch.randn(6, 2), torch.zeros(6, dtype=torch.int64),
                             with_non_finite((2, 2), [(1,)]), torch.zeros(2, dtype=torch.int64)),
     r"covering_radius: centers of shape \(2, 2\) .* centers\[1\]"),
    (lambda: mean_interclass_distance(with_non_finite((4, 2), [(0,)], float("inf")), torch.tensor([0, 0, 1, 1])),
     r"mean_interclass_distance: centers of shape \(4, 2\) .* centers\[0\]"),
])
def test_non_finite_input_is_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: greedy_k_center(torch.randn(3, 4, 2), 5), r"need 1 <= k <= pool size b = 4, got k = 5"),
    (lambda: greedy_k_center(torch.randn(3, 4, 2), 0), r"need 1 <= k <= pool size b = 4, got k = 0"),
    # P* as (C·K, d) beside (C, b, d) pools would be one set shared by every class: refused
    (lambda: greedy_k_center(torch.randn(3, 4, 2), 2, torch.randn(6, 2)),
     r"expected candidates \(C, b, d\) with initial \(C, m, d\), or \(b, d\) with \(m, d\), got \(3, 4, 2\) and \(6, 2\)"),
    (lambda: greedy_k_center(torch.randn(3, 4, 2), 2, torch.randn(2, 2, 2)), r"got \(3, 4, 2\) and \(2, 2, 2\)"),
    (lambda: greedy_k_center(torch.randn(4, 2), 2, torch.randn(1, 3)), r"got \(4, 2\) and \(1, 3\)"),
    (lambda: covering_radius(torch.randn(4, 2), torch.tensor([0, 0, 1]), torch.randn(2, 2), torch.tensor([0, 1])),
     r"expected points \(N, d\), labels \(N,\), .* got \(4, 2\), \(3,\), \(2, 2\), \(2,\)"),
    (lambda: covering_radius(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.randn(2, 2), torch.tensor([0, 1, 1])),
     r"got \(4, 2\), \(4,\), \(2, 2\), \(3,\)"),
    (lambda: covering_radius(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.randn(2, 3), torch.tensor([0, 1])),
     r"got \(4, 2\), \(4,\), \(2, 3\), \(2,\)"),
    (lambda: greedy_k_center(torch.randn(4, 2), 2, torch.randn(2)), r"got \(4, 2\) and \(2,\)"),
    (lambda: select_proxies(torch.randn(3, 5, 2), torch.randn(7, 2), 2), r"\(C·K', d\) = \(3·K', 2\), got \(7, 2\)"),
    (lambda: select_proxies(torch.randn(3, 5, 2), torch.randn(6, 4), 2), r"\(C·K', d\) = \(3·K', 2\), got \(6, 4\)"),
    (lambda: covering_radius(torch.randn(3, 2), torch.tensor([0, 3, 1]), torch.randn(4, 2), torch.tensor([0, 0, 1, 1])),
     r"classes of points without a center: \[3\]"),
    (lambda: mean_interclass_distance(torch.randn(3, 2), torch.zeros(3, dtype=torch.int64)),
     "at least 2 classes, got 1"),
    (lambda: candidate_pool(RecordingEmbedder(), [[1, 2], [3, 4], [5, 6, 7]]),
     r"same pool size, got \[2, 2, 3\]"),  # 6 images: C x b = 3 x 2 would hide the mix-up
    (lambda: CandidateStream([[1], []], seed=0), "every class needs an image"),
    (lambda: CandidateStream(CLASS_TO_INDICES, seed=0, refill="never"),
     r"need refill in \('cycle', 'empty'\), got 'never'"),
    (lambda: CandidateStream(CLASS_TO_INDICES, seed=0).load_state_dict(
        {"seed": 0, "taken": 3, "num_classes": 4, "num_images": 23}),
     "is not the state of a stream over 5 classes and 23 images"),
])
def test_bad_input_is_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
