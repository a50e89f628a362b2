"""Proxy (re-)initialisation by greedy k-center (PAPER.md §5), the candidate pools it picks from
(one run-long stream of images per class, PAPER.md §7), and the statistics it is judged by: the
covering radius and the mean inter-class distance.

Conventions: pools are (C, b, d), one pool per class; proxies are (C·K, d), class-major (row
c·K + k is proxy k of class c); labels are (N,) integers. NaN or inf in an input tensor is a
ValueError naming the argument and its first offending row. Imports torch and numpy only.
"""
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch


def _check_finite(where: str, **tensors: torch.Tensor | None) -> None:
    """ValueError naming `where`, the argument, its shape and its first row (last dimension) with NaN or inf."""
    for name, x in tensors.items():
        bad = [] if x is None else (~torch.isfinite(x).all(dim=-1)).nonzero().tolist()
        if bad:
            raise ValueError(f"{where}: {name} of shape {tuple(x.shape)} has {len(bad)} row(s) with NaN or inf, "
                             f"the first is {name}{bad[0]}")


# ---------------------------------------------------------------------------------------------
# greedy k-center (PAPER.md §5)


def _distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x - y|| for every row of x (C, b, d) and every row of y (C, m, d): (C, b, m)."""
    # from the differences, not the matmul expansion: equal distances stay exactly equal (reproducible ties)
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _distance_to_set(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """min over p in points (C, m, d) of ||x - p||, for every row x of x (C, b, d); +inf when m = 0."""
    if points.shape[1] == 0:
        return x.new_full(x.shape[:2], float("inf"))
    return _distance(x, points).amin(dim=2)


@torch.no_grad()
def greedy_k_center(
    candidates: torch.Tensor, k: int, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy farthest-point selection of k candidates per class, all classes at once.

    candidates: (C, b, d) one pool per class, or a single pool (b, d).
    initial: (C, m, d) (or (m, d)) points already covering each class, e.g. the converged proxies
        P*; None means the zero vector, as in the authors' code (the first pick is then the
        largest-norm candidate); m = 0 means no initial set (the first pick is index 0).
    Returns (C, k) (or (k,)) int64 indices into each pool, in the order picked. Euclidean distance
    ranks like the authors' squared one; ties go to the lowest index; no candidate is picked twice.
    """
    _check_finite("greedy_k_center", candidates=candidates, initial=initial)
    if candidates.dim() not in (2, 3) or initial is not None and (
            initial.dim() != candidates.dim() or initial.shape[:-2] != candidates.shape[:-2]
            or initial.shape[-1] != candidates.shape[-1]):
        raise ValueError(f"greedy_k_center: expected candidates (C, b, d) with initial (C, m, d), or (b, d) with "
                         f"(m, d), got {tuple(candidates.shape)} and "
                         f"{None if initial is None else tuple(initial.shape)}")
    single = candidates.dim() == 2
    if single:
        candidates, initial = candidates[None], None if initial is None else initial[None]
    C, b, d = candidates.shape
    if not 1 <= k <= b:
        raise ValueError(f"greedy_k_center: need 1 <= k <= pool size b = {b}, got k = {k} (PAPER.md §5)")
    if initial is None:
        initial = candidates.new_zeros(C, 1, d)  # the authors' start: the zero vector
    dist = _distance_to_set(candidates, initial)  # dist(x) = distance of x to everything chosen so far
    rows, chosen = torch.arange(C, device=candidates.device), []
    for _ in range(k):
        pick = dist.argmax(dim=1)  # x* = argmax_x dist(x), the farthest candidate
        chosen.append(pick)
        x_star = candidates[rows, pick].unsqueeze(1)  # (C, 1, d)
        dist = torch.minimum(dist, _distance(candidates, x_star).squeeze(2))  # dist(x) <- min(dist(x), ||x - x*||)
        dist[rows, pick] = -float("inf")  # never picked twice, even when candidates coincide
    indices = torch.stack(chosen, dim=1)
    return indices[0] if single else indices


# ---------------------------------------------------------------------------------------------
# coverage statistics (PAPER.md §1, §5)


@torch.no_grad()
def covering_radius(
    points: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    center_labels: torch.Tensor,
    *,
    max_chunk_elements: int = 2**24,
) -> tuple[torch.Tensor, float]:
    """radius(c) = max over points x of class c of min over centers p of class c of ||x - p||.

    Returns the radius of every class present in `labels`, in ascending label order, and their mean.
    Centers of other classes are ignored; a class of points without a center is a ValueError.
    Points go max_chunk_elements (points x centers x d) at a time: no N x M matrix is ever built.
    """
    _check_finite("covering_radius", points=points, centers=centers)
    if (labels.shape, center_labels.shape, centers.shape[1:]) != (points.shape[:1], centers.shape[:1],
                                                                  points.shape[1:]):
        raise ValueError(f"covering_radius: expected points (N, d), labels (N,), centers (M, d), center_labels (M,), "
                         f"got {tuple(points.shape)}, {tuple(labels.shape)}, {tuple(centers.shape)}, "
                         f"{tuple(center_labels.shape)}")
    classes, class_of_point = torch.unique(labels, return_inverse=True)
    missing = classes[~torch.isin(classes, center_labels)]
    if len(missing):
        raise ValueError(f"covering_radius: classes of points without a center: {missing[:5].tolist()}")
    own = _centers_by_class(centers, center_labels, classes)  # (C, K_max, d)
    nearest = _distance_to_own_centers(points, class_of_point, own, max_chunk_elements)  # min over p of ||x - p||
    radius = nearest.new_zeros(len(classes)).scatter_reduce(0, class_of_point, nearest, "amax", include_self=False)
    return radius, float(radius.mean())  # radius(c): the max over the points x of class c


def _centers_by_class(centers: torch.Tensor, center_labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(len(classes), K_max, d): each class's centers, padded by repeating its own (no min-distance changes)."""
    order = torch.argsort(center_labels, stable=True)
    start = torch.searchsorted(center_labels[order], classes)
    count = torch.searchsorted(center_labels[order], classes, right=True) - start
    slot = torch.arange(int(count.max()), device=centers.device)
    return centers[order[start[:, None] + slot[None, :] % count[:, None]]]


def _distance_to_own_centers(points: torch.Tensor, class_of_point: torch.Tensor, own: torch.Tensor,
                             max_chunk_elements: int) -> torch.Tensor:
    """min over p in own[class of x] of ||x - p||, for every point x, a chunk of points at a time."""
    chunk = max(1, max_chunk_elements // (own.shape[1] * own.shape[2]))
    nearest = []
    for start in range(0, len(points), chunk):
        x = points[start:start + chunk].unsqueeze(1)  # (n, 1, d)
        nearest.append(torch.linalg.vector_norm(x - own[class_of_point[start:start + chunk]], dim=2).amin(dim=1))
    return torch.cat(nearest)


@torch.no_grad()
def mean_interclass_distance(
    centers: torch.Tensor, center_labels: torch.Tensor, *, chunk_size: int = 1024
) -> float:
    """Mean of ||mean_a - mean_b|| over all pairs of distinct classes a, b, mean_c the mean of class c's centers.

    Exact (no sampling); chunk_size rows of the C x C distance matrix at a time, summed in float64.
    """
    _check_finite("mean_interclass_distance", centers=centers)
    classes, class_of_center = torch.unique(center_labels, return_inverse=True)
    C = len(classes)
    if C < 2:
        raise ValueError(f"mean_interclass_distance: needs at least 2 classes, got {C}")
    sums = centers.new_zeros(C, centers.shape[1]).index_add_(0, class_of_center, centers)
    means = sums / torch.bincount(class_of_center, minlength=C).to(centers.dtype)[:, None]
    total = torch.zeros((), dtype=torch.float64, device=centers.device)
    for start in range(0, C, chunk_size):
        block = torch.cdist(means[start:start + chunk_size], means)  # ||mean_a - mean_b||
        rows = torch.arange(len(block), device=centers.device)
        block[rows, start + rows] = 0  # a = b: cdist's matmul form leaves rounding noise there
        total += block.sum(dtype=torch.float64)
    return float(total / (C * (C - 1)))


# ---------------------------------------------------------------------------------------------
# candidate pools and the re-selection step (PAPER.md §2 `P <- select(pool(θ), P*, K)`, §5, §7)


class CandidateStream:
    """One run-long stream of training images per class, from which the candidate pools are drawn.

    As the authors' one-image-per-class iterator (PAPER.md §7), successive pools see other images of
    a class: each class has a queue of its images in shuffled order, a draw takes the next pool_size
    of every queue, and an emptied queue refills with a fresh permutation (a small class wraps around
    within one draw). refill="cycle" (default, the authors'): every R = ceil(N / C) images per class
    (the mean class size) the queue is rebuilt, leftovers discarded; image p of class c is image
    p mod R of cycle p // R, whose permutation j is seeded [seed, CYCLE_TAG, c, p // R, j].
    refill="empty": one endless queue, permutation e seeded [seed, TAG, c, e]. A permutation is the
    stable argsort of PCG64(SeedSequence(seeds))'s raw outputs, so a draw depends on (seed, refill,
    taken) alone, taken being the images drawn per class so far; state_dict() holds just those.
    """

    TAG = 0x63616E64  # "cand": keeps these streams apart from a run's other SeedSequence([seed, ...]) streams
    CYCLE_TAG = 0x6379636C  # "cycl": the same for the cycle queues, apart from the endless ones too
    REFILLS = ("cycle", "empty")  # a class's queue: rebuilt every cycle (the authors'), or refilled when empty

    def __init__(self, class_to_indices: Sequence[Sequence[int]], seed: int, refill: str = "cycle") -> None:
        self.classes = [np.asarray(indices, dtype=np.int64).reshape(-1) for indices in class_to_indices]
        if any(len(indices) == 0 for indices in self.classes):
            raise ValueError("CandidateStream: every class needs an image; class_to_indices has an empty class")
        self.cycle = -(-sum(len(indices) for indices in self.classes) // len(self.classes))  # R = ceil(N / C)
        self.seed, self.taken, self.refill = operator.index(seed), 0, refill
        self.load_state_dict(self.state_dict())  # checks refill

    def _seeds(self, c: int, p: int) -> tuple[tuple[int, ...], int]:
        """(seeds of the permutation, index in it) of image p of class c's queue."""
        n = len(self.classes[c])
        if self.refill == "empty":
            return (self.seed, self.TAG, c, p // n), p % n
        cycle, p = divmod(p, self.cycle)  # image p is image p mod R of cycle p // R
        return (self.seed, self.CYCLE_TAG, c, cycle, p // n), p % n

    def _queue(self, c: int, seeds: tuple[int, ...]) -> np.ndarray:
        """The dataset indices of class c in the order of the permutation seeded by `seeds`."""
        bits = np.random.PCG64(np.random.SeedSequence(seeds))
        return self.classes[c][np.argsort(bits.random_raw(len(self.classes[c])), kind="stable")]

    def draw(self, pool_size: int) -> list[list[int]]:
        """The next pool_size dataset indices of every class: a list of C lists, class c's first."""
        pools = []
        for c in range(len(self.classes)):
            where = [self._seeds(c, p) for p in range(self.taken, self.taken + pool_size)]
            queues = {seeds: self._queue(c, seeds) for seeds in dict.fromkeys(seeds for seeds, _ in where)}
            pools.append([int(queues[seeds][i]) for seeds, i in where])
        self.taken += pool_size
        return pools

    def state_dict(self) -> dict:
        return {"seed": self.seed, "taken": self.taken, "refill": self.refill, "num_classes": len(self.classes),
                "num_images": sum(len(indices) for indices in self.classes)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream of `state`, which must be of a stream over the same classes and images."""
        own = self.state_dict()
        if any(state.get(key) != own[key] for key in ("num_classes", "num_images")):
            raise ValueError(f"CandidateStream: {state} is not the state of a stream over {own['num_classes']} "
                             f"classes and {own['num_images']} images")
        if state["refill"] not in self.REFILLS:
            raise ValueError(f"CandidateStream: need refill in {self.REFILLS}, got {state['refill']!r}")
        self.seed, self.taken = operator.index(state["seed"]), operator.index(state["taken"])
        self.refill = state["refill"]


def candidate_pool(embed_fn: Callable[[list[int]], torch.Tensor], drawn: Sequence[Sequence[int]]) -> torch.Tensor:
    """The (C, b, d) pools: pool c holds the raw embeddings f(x) of the images drawn[c].

    drawn[c] lists b dataset indices of class c, the same b for every class (e.g.
    CandidateStream.draw(b)). embed_fn(list_of_n_indices) must return their embeddings as an (n, d)
    tensor (the caller applies the training augmentation with the network in eval mode, as the
    authors do, and batches as it needs); it is called once, with every index, under torch.no_grad().
    """
    b = len(drawn[0])
    if any(len(indices) != b for indices in drawn):
        raise ValueError(f"candidate_pool: every class needs the same pool size, got {[len(i) for i in drawn]}")
    with torch.no_grad():
        return embed_fn([int(i) for indices in drawn for i in indices]).view(len(drawn), b, -1)


def select_proxies(
    pool: torch.Tensor, current_proxies: torch.Tensor | None, per_class: int
) -> torch.Tensor:
    """New proxies (C·K, d), class-major: per class, greedy k-center on its pool (PAPER.md §5).

    pool: (C, b, d) raw embeddings; current_proxies: the converged proxies P* as (C·K', d)
    class-major, or None for the zero-vector start. Returns copies of the chosen pool rows; the
    caller writes them into its proxy parameter in place so the optimiser keeps its moments.
    """
    C, _, d = pool.shape
    initial = None
    if current_proxies is not None:
        if current_proxies.dim() != 2 or current_proxies.shape[1] != d or current_proxies.shape[0] % C:
            raise ValueError(f"select_proxies: current_proxies must be (C·K', d) = ({C}·K', {d}), got "
                             f"{tuple(current_proxies.shape)}")
        initial = current_proxies.detach().reshape(C, -1, d)
    indices = greedy_k_center(pool, per_class, initial)  # (C, K)
    return torch.gather(pool, 1, indices[..., None].expand(-1, -1, d)).reshape(C * per_class, d)
