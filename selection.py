"""Proxy (re-)initialisation by greedy k-center, the candidate pools it picks from, and the coverage
statistics it is judged by.

PAPER.md §5: between problem instances every class gets K new proxies, chosen greedily among b
raw embeddings f(x) of its own training images (the candidate pool) so that each new proxy is as
far as possible from the converged proxies P* and from the proxies already chosen. The covering
radius (largest distance from a sample to the nearest proxy of its class) is the quantity the
paper's bound depends on; its figures report it beside the mean inter-class distance. The pools
come from one run-long stream of images per class (PAPER.md §7), so successive re-selections see
different images of a class.

Conventions: pools are (C, b, d), one pool per class; proxies are (C·K, d), class-major (row
c·K + k is proxy k of class c, so proxies.view(C, K, d) is the per-class view); labels are (N,)
integers. NaN or inf in any input is a ValueError naming the argument, its shape and the first
offending row. Standalone: imports torch, numpy and the standard library only.
"""
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# input checks


def _non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices (n_bad, x.dim() - 1) of the rows (vectors along the last dimension) with NaN or inf."""
    return (~torch.isfinite(x).all(dim=-1)).nonzero()


def _check_finite(x: torch.Tensor, name: str, where: str) -> None:
    """ValueError naming `where`, the argument `name`, its shape and its first row with NaN or inf."""
    bad = _non_finite_rows(x)
    if len(bad):
        first = ", ".join(str(i) for i in bad[0].tolist())
        raise ValueError(f"{where}: {name} of shape {tuple(x.shape)} has {len(bad)} row(s) with NaN or inf, "
                         f"the first is {name}[{first}]")


# ---------------------------------------------------------------------------------------------
# greedy k-center (PAPER.md §5)


def _distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every row of x (C, b, d) to every row of y (C, m, d): (C, b, m)."""
    # ||x - y|| from the differences, not the ||x||^2 - 2<x,y> + ||y||^2 matmul expansion: faster
    # for tiny per-class matrices, and equal distances stay exactly equal (reproducible ties)
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _distance_to_set(candidates: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """min_j ||x - p_j|| over the initial set p (C, m, d), for every candidate x (C, b, d)."""
    if initial.shape[1] == 0:  # no initial set: every candidate is infinitely far from it
        return candidates.new_full(candidates.shape[:2], float("inf"))
    return _distance(candidates, initial).amin(dim=2)


@torch.no_grad()
def greedy_k_center(
    candidates: torch.Tensor, k: int, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy farthest-point selection of k candidates per class, all classes at once.

    candidates: (C, b, d) one pool per class, or a single pool (b, d).
    initial: (C, m, d) (or (m, d) for a single pool) points already covering the classes, e.g.
        the converged proxies P*; None means the zero vector, as in the authors' code (so the
        first pick is the largest-norm candidate); m = 0 means no initial set (first pick: index 0).
    Returns (C, k) (or (k,)) int64 indices into each class's pool, in the order picked.

    The authors rank candidates by squared Euclidean distance; the Euclidean distance used here
    ranks them in the same order (sqrt is monotone) and is cheaper to compute exactly. Ties go to
    the lowest index (torch.argmax returns the first maximum). A candidate is never picked twice,
    so the k indices of a class are distinct even when candidates coincide; NaN or inf in
    candidates or initial is a ValueError.
    """
    if candidates.dim() not in (2, 3):
        raise ValueError(
            "greedy_k_center: candidates must be (C, b, d) or (b, d), "
            f"got shape {tuple(candidates.shape)}"
        )
    _check_finite(candidates, "candidates", "greedy_k_center")
    single = candidates.dim() == 2
    if single:
        candidates = candidates.unsqueeze(0)
        initial = None if initial is None else initial.unsqueeze(0)
    C, b, d = candidates.shape
    if not 1 <= k <= b:
        raise ValueError(
            f"greedy_k_center: need 1 <= k <= pool size b = {b}, got k = {k} "
            "(enlarge the pool: PAPER.md §5 uses b·K candidates when b < K)"
        )
    if initial is None:
        initial = candidates.new_zeros(C, 1, d)
    if initial.dim() != 3 or initial.shape[0] != C or initial.shape[2] != d:
        raise ValueError(
            f"greedy_k_center: initial must be (C={C}, m, d={d}) to match candidates "
            f"{tuple(candidates.shape)}, got {tuple(initial.shape)}"
        )
    if initial.dtype != candidates.dtype or initial.device != candidates.device:
        raise ValueError(
            f"greedy_k_center: initial ({initial.dtype}, {initial.device}) must have the dtype and "
            f"device of candidates ({candidates.dtype}, {candidates.device})"
        )
    _check_finite(initial, "initial", "greedy_k_center")
    rows = torch.arange(C, device=candidates.device)
    dist = _distance_to_set(candidates, initial)
    chosen = []
    for _ in range(k):
        pick = dist.argmax(dim=1)  # the candidate farthest from everything chosen so far
        chosen.append(pick)
        newest = candidates[rows, pick].unsqueeze(1)  # (C, 1, d)
        dist = torch.minimum(dist, _distance(candidates, newest).squeeze(2))
        dist[rows, pick] = -float("inf")  # never pick it again
    indices = torch.stack(chosen, dim=1)
    return indices[0] if single else indices


# ---------------------------------------------------------------------------------------------
# coverage statistics (PAPER.md §1, §5)


def _centers_by_class(
    centers: torch.Tensor, center_labels: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """(len(classes), K_max, d): the centers of each class, padded by repeating the class's own.

    Repeating a class's own centers leaves every min-distance unchanged, so classes with
    different numbers of centers share one dense tensor (K_max: the largest count).
    """
    order = torch.argsort(center_labels, stable=True)
    sorted_labels = center_labels[order]
    start = torch.searchsorted(sorted_labels, classes)
    count = torch.searchsorted(sorted_labels, classes, right=True) - start
    missing = classes[count == 0]
    if missing.numel() > 0:
        raise ValueError(
            f"covering_radius: {missing.numel()} class(es) of points have no center, "
            f"e.g. classes {missing[:5].tolist()}"
        )
    slot = torch.arange(int(count.max()), device=centers.device)
    take = start.unsqueeze(1) + (slot.unsqueeze(0) % count.unsqueeze(1))
    return centers[order[take]]


@torch.no_grad()
def covering_radius(
    points: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    center_labels: torch.Tensor,
    *,
    max_chunk_elements: int = 2**24,
) -> tuple[torch.Tensor, float]:
    """Per-class covering radius and its mean over classes.

    radius(c) = max over points x of class c of min over centers p of class c of ||x - p||
    (Euclidean, not squared). Classes are those present in `labels`, reported in ascending label
    order (the order of torch.unique(labels)); centers of other classes are ignored. A class of
    points without any center is a ValueError. Points are processed in chunks of at most
    max_chunk_elements (points x K_max x d) so SOP-sized inputs never build an N x M matrix.
    """
    if points.dim() != 2 or labels.shape != points.shape[:1]:
        raise ValueError(
            f"covering_radius: points must be (N, d) with labels (N,), got points "
            f"{tuple(points.shape)} and labels {tuple(labels.shape)}"
        )
    d = points.shape[1]
    if centers.dim() != 2 or centers.shape[1] != d or center_labels.shape != centers.shape[:1]:
        raise ValueError(
            f"covering_radius: centers must be (M, d={d}) with center_labels (M,), got "
            f"centers {tuple(centers.shape)} and center_labels {tuple(center_labels.shape)}"
        )
    if points.shape[0] == 0:
        raise ValueError("covering_radius: points is empty (0 rows)")
    _check_finite(points, "points", "covering_radius")
    _check_finite(centers, "centers", "covering_radius")
    classes, class_of_point = torch.unique(labels, return_inverse=True)
    grouped = _centers_by_class(centers, center_labels, classes)  # (C, K_max, d)
    chunk = max(1, max_chunk_elements // (grouped.shape[1] * grouped.shape[2]))
    nearest = []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk].unsqueeze(1)  # (n, 1, d)
        own = grouped[class_of_point[start : start + chunk]]  # (n, K_max, d)
        nearest.append(torch.linalg.vector_norm(x - own, dim=2).amin(dim=1))  # min_p ||x - p||
    nearest = torch.cat(nearest)
    radius = nearest.new_zeros(classes.shape[0]).scatter_reduce(
        0, class_of_point, nearest, reduce="amax", include_self=False
    )
    return radius, float(radius.mean())


@torch.no_grad()
def mean_interclass_distance(
    centers: torch.Tensor, center_labels: torch.Tensor, *, chunk_size: int = 1024
) -> float:
    """Mean Euclidean distance between the class means of the centers, over all pairs of classes.

    Each class is summarised by the mean of its centers (its proxies); the result averages
    ||mean_a - mean_b|| over the C(C-1)/2 unordered pairs of distinct classes, exactly (no
    sampling), chunk_size rows at a time so C = 11,318 needs only a chunk_size x C block, with
    the sum accumulated in float64.
    """
    if centers.dim() != 2 or center_labels.shape != centers.shape[:1]:
        raise ValueError(
            f"mean_interclass_distance: centers must be (M, d) with center_labels (M,), got "
            f"centers {tuple(centers.shape)} and center_labels {tuple(center_labels.shape)}"
        )
    _check_finite(centers, "centers", "mean_interclass_distance")
    classes, class_of_center = torch.unique(center_labels, return_inverse=True)
    C = classes.shape[0]
    if C < 2:
        raise ValueError(f"mean_interclass_distance: needs at least 2 classes, got {C}")
    sums = centers.new_zeros(C, centers.shape[1]).index_add_(0, class_of_center, centers)
    counts = torch.bincount(class_of_center, minlength=C).to(centers.dtype)
    means = sums / counts.unsqueeze(1)
    total = torch.zeros((), dtype=torch.float64, device=centers.device)
    for start in range(0, C, chunk_size):
        block = torch.cdist(means[start : start + chunk_size], means)  # ||mean_a - mean_b||
        # cdist's matmul form leaves rounding noise on the diagonal (a = b): zero it exactly
        rows = torch.arange(block.shape[0], device=centers.device)
        block[rows, start + rows] = 0
        total += block.sum(dtype=torch.float64)
    return float(total / (C * (C - 1)))


# ---------------------------------------------------------------------------------------------
# candidate pools and the re-selection step (PAPER.md §2 `P <- select(pool(θ), P*, K)`, §5)


class CandidateStream:
    """One run-long stream of training images per class, from which the candidate pools are drawn.

    The authors take successive pools from one iterator that yields one image per class, so each
    re-selection sees other images of a class than the last (PAPER.md §7). Here every class has a
    queue of its images in shuffled order; a draw takes the next pool_size images of every queue,
    and an emptied queue refills with a fresh permutation. No image of a class repeats before all
    of them have been drawn; a class with fewer images than pool_size wraps around into its next
    permutation within one draw.

    Permutation e of class c (its e-th queue) is the order of the raw outputs of
    PCG64(SeedSequence([seed, TAG, c, e])), stable across numpy versions (TAG keeps these apart from
    a run's other SeedSequence([seed, ...]) streams, e.g. its batch sampler's). A draw is thus a pure
    function of (seed, taken), taken being the images drawn per class so far (the sum of the earlier
    pool sizes); state_dict() holds just those, so a resumed run draws the same next pools.
    """

    TAG = 0x63616E64  # "cand"

    def __init__(self, class_to_indices: Sequence[Sequence[int]], seed: int) -> None:
        if len(class_to_indices) == 0:
            raise ValueError("CandidateStream: class_to_indices is empty (no classes)")
        self.classes = [np.asarray(indices, dtype=np.int64).reshape(-1) for indices in class_to_indices]
        empty = [c for c, indices in enumerate(self.classes) if len(indices) == 0]
        if empty:
            raise ValueError(
                f"CandidateStream: every class needs an image; class_to_indices[{empty[0]}] is empty "
                f"({len(empty)} empty class(es))"
            )
        self.seed, self.taken = 0, 0
        self.load_state_dict({**self.state_dict(), "seed": seed})

    def _queue(self, c: int, epoch: int) -> np.ndarray:
        """The dataset indices of class c in the order of its epoch-th queue."""
        bits = np.random.PCG64(np.random.SeedSequence([self.seed, self.TAG, c, epoch]))
        # argsort of 64-bit random keys: a uniform permutation (up to key collisions, p < n²/2^65)
        return self.classes[c][np.argsort(bits.random_raw(len(self.classes[c])), kind="stable")]

    def draw(self, pool_size: int) -> list[list[int]]:
        """The next pool_size dataset indices of every class: a list of C lists, class c's first."""
        if pool_size < 1:
            raise ValueError(f"CandidateStream.draw: pool_size must be >= 1, got {pool_size}")
        pools = []
        for c, indices in enumerate(self.classes):
            positions = range(self.taken, self.taken + pool_size)  # in class c's endless queue
            queues = {e: self._queue(c, e) for e in {p // len(indices) for p in positions}}
            pools.append([int(queues[p // len(indices)][p % len(indices)]) for p in positions])
        self.taken += pool_size
        return pools

    def state_dict(self) -> dict:
        return {"seed": self.seed, "taken": self.taken, "num_classes": len(self.classes),
                "num_images": sum(len(indices) for indices in self.classes)}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        missing = set(expected) - set(state)
        if missing:
            raise ValueError(f"CandidateStream.load_state_dict: missing keys {sorted(missing)} in {sorted(state)}")
        for key in expected:
            if not isinstance(state[key], numbers.Integral) or isinstance(state[key], bool) or state[key] < 0:
                raise ValueError(f"CandidateStream: {key} must be an integer >= 0, got {state[key]!r}")
        for key in ("num_classes", "num_images"):
            if state[key] != expected[key]:
                raise ValueError(
                    f"CandidateStream.load_state_dict: the state is of a stream over {state['num_classes']} "
                    f"classes and {state['num_images']} images, this one has {expected['num_classes']} "
                    f"and {expected['num_images']}"
                )
        self.seed, self.taken = int(state["seed"]), int(state["taken"])


def candidate_pool(
    embed_fn: Callable[[list[int]], torch.Tensor],
    drawn: Sequence[Sequence[int]],
    batch_size: int = 256,
) -> torch.Tensor:
    """Embed the drawn candidates: returns the (C, b, d) pools, pool c holding the images drawn[c].

    drawn[c] lists b dataset indices of class c, the same b for every class (e.g.
    CandidateStream.draw(b)). embed_fn(list_of_indices) must return their raw embeddings f(x) as
    an (n, d) tensor (the caller applies the training augmentation with the network in eval mode,
    as the authors do); it is called under torch.no_grad() with at most batch_size indices at a
    time, class-major.
    """
    if batch_size < 1:
        raise ValueError(f"candidate_pool: batch_size must be >= 1, got {batch_size}")
    if len(drawn) == 0 or len(drawn[0]) == 0:
        raise ValueError("candidate_pool: drawn must list b >= 1 dataset indices for each of C >= 1 classes")
    b = len(drawn[0])
    uneven = [c for c, indices in enumerate(drawn) if len(indices) != b]
    if uneven:
        c = uneven[0]
        raise ValueError(f"candidate_pool: every class needs the same pool size; drawn[0] has {b} indices, "
                         f"drawn[{c}] has {len(drawn[c])}")
    flat = [int(i) for indices in drawn for i in indices]
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            out = embed_fn(batch)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(batch):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"candidate_pool: embed_fn must return an ({len(batch)}, d) tensor for "
                    f"{len(batch)} indices, got {shape}"
                )
            bad = _non_finite_rows(out)
            if len(bad):
                raise ValueError(
                    f"candidate_pool: embed_fn's output of shape {tuple(out.shape)} has {len(bad)} row(s) "
                    f"with NaN or inf, the first for dataset index {batch[int(bad[0, 0])]}"
                )
            embeddings.append(out)
    return torch.cat(embeddings).view(len(drawn), b, -1)


def select_proxies(
    pool: torch.Tensor, current_proxies: torch.Tensor | None, per_class: int
) -> torch.Tensor:
    """New proxies (C·K, d), class-major: per class, greedy k-center on its pool (PAPER.md §5).

    pool: (C, b, d) raw embeddings; current_proxies: the converged proxies P* as (C·K', d)
    class-major, or None for the zero-vector start. Returns copies of the chosen pool rows; the
    caller writes them into its proxy parameter in place so the optimiser keeps its moments.
    """
    if pool.dim() != 3:
        raise ValueError(f"select_proxies: pool must be (C, b, d), got {tuple(pool.shape)}")
    _check_finite(pool, "pool", "select_proxies")
    C, _, d = pool.shape
    initial = None
    if current_proxies is not None:
        shape = current_proxies.shape
        if current_proxies.dim() != 2 or shape[1] != d or shape[0] % C != 0:
            raise ValueError(
                f"select_proxies: current_proxies must be (C·K', d) = ({C}·K', {d}) class-major "
                f"to match pool {tuple(pool.shape)}, got {tuple(shape)}"
            )
        _check_finite(current_proxies, "current_proxies", "select_proxies")
        initial = current_proxies.detach().reshape(C, shape[0] // C, d)
    indices = greedy_k_center(pool, per_class, initial)  # (C, K)
    chosen = torch.gather(pool, 1, indices.unsqueeze(-1).expand(-1, -1, d))
    return chosen.reshape(C * per_class, d)
