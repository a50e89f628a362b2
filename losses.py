"""Losses of "Deep Metric Learning with Chance Constraints": n(x) (PAPER.md §3), the four pairwise losses
(§4) and the CCP data term (§2). Imports only torch and the standard library.

Top to bottom: n(x) and x/‖x‖; distances and similarities; C1, C2, triplet and multi-similarity, each
called ℓ(x, y) in pair form (the batch against itself, self-pairs excluded) or ℓ(x, y, ref, ref_y) in
proxy form (the batch against the proxies); `Proxies` and `CCPLoss`; the baselines (Proxy-Anchor,
ProxyNCA++, SoftTriple) and the cross-batch memory (XBM); the input checks; the speed-ups.
The four losses use their inputs as given (the caller applies n); the baselines normalise inside
(`normalize`: n as in the authors' framework, PAPER.md §7, or x/‖x‖). Proxy tables start as N(0, 1/d)
draws from the `generator` passed in. Inputs are checked once, where a user passes them in (public
functions, constructors, forward); bad input raises a one-line ValueError "<where>: expected …, got …".
"""
import functools
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- normalisation (§3)


def lipschitz_normalize(x: Tensor) -> Tensor:
    """n(x) = x / max(1, ‖x‖) per row (PAPER.md §3): rows outside the unit ball go onto the sphere, the
    others stay. On the sphere itself the gradient is the identity (the authors' mask is ‖x‖ > 1)."""
    return _LipschitzNormalizeFast.apply(x)  # the formula with a hand-written backward (speed-ups, below)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖, eps) per row: the usual projection onto the sphere (the `l2` ablation)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


NORMALIZATIONS = {"lipschitz": lipschitz_normalize, "l2": l2_normalize}

# --------------------------------------------------------------------------- similarities and distances (§4)


def pairwise_similarity(a: Tensor, b: Tensor) -> Tensor:
    """s_ij = ⟨a_i, b_j⟩ for the rows of a (..., n, d) and b (..., m, d), shape (..., n, m)."""
    return a @ b.transpose(-1, -2)


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² for the rows of a (..., n, d) and b (..., m, d), shape (..., n, m)."""
    a2 = (a * a).sum(-1, keepdim=True)
    b2 = (b * b).sum(-1).unsqueeze(-2)
    # ‖a‖² + ‖b‖² − 2⟨a, b⟩: O(n·m) memory where explicit differences would need O(n·m·d)
    sq = a2 + b2 - 2 * pairwise_similarity(a, b)
    # values below the expansion's rounding noise √d·eps·(‖a‖² + ‖b‖²) are 0: duplicates are at distance 0
    resolution = math.sqrt(a.shape[-1]) * torch.finfo(sq.dtype).eps * (a2 + b2)
    return torch.where(sq > resolution, sq, 0.0)


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances d_ij = ‖a_i − b_j‖ (not squared, PAPER.md §4), shape (..., n, m)."""
    return _sqrt_or_zero(squared_distance(a, b))


def _sqrt_or_zero(sq: Tensor) -> Tensor:
    # √sq where sq > 0, else 0 with the subgradient 0 (sqrt's slope is infinite at 0; the inner where keeps NaN out)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)

# --------------------------------------------------------------------------- the four losses (§4)


def _pairs(x: Tensor, y: Tensor, ref: Optional[Tensor], ref_y: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The reference set (the batch in pair form, ref in proxy form), the mask `same` (n, m) of pairs with
    equal labels (the negative pairs are the others) and each anchor's positive pairs as slots (index, valid)."""
    if ref is None:
        same = y[:, None] == y[None, :]
        not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)  # pair form: no pair of an anchor with itself
        return x, same, *_positive_slots(same & not_self)
    same = y[:, None] == ref_y[None, :]
    return ref, same, *_positive_slots(same)


def _mean_nonzero(terms: Tensor) -> Tensor:
    # Σ terms / #(terms > 0), and 0 when no term is positive; summed in at least float32 (for float16)
    count = (terms > 0).sum(dtype=torch.int32)  # int32: a faster count than the default int64
    total = terms.sum(dtype=torch.promote_types(terms.dtype, torch.float32))
    return (total / count.clamp_min(1)).to(terms.dtype)


def _log1p_sum_exp(logits: Tensor, exclude: Tensor) -> Tensor:
    # log(1 + Σ_j exp(logits_j)) per row over the j not excluded, as log(e⁰ + e^{logsumexp}): no overflow.
    # An all-excluded row gives log 1 = 0 (masked_fill's backward zeroes the NaN logsumexp leaves there)
    lse = torch.logsumexp(logits.masked_fill(exclude, -math.inf), dim=1)
    return torch.logaddexp(lse, lse.new_zeros(()))


def _checked(formula: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A loss as users call it: its inputs checked (_check_pair_inputs), then `formula`. CCPLoss and
    CrossBatchMemory check their inputs once where they enter and call `loss.formula` itself."""
    @functools.wraps(formula)
    def loss(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None, *params,
             **named) -> Tensor:
        _check_pair_inputs(formula.__name__, x, y, ref, ref_y)
        return formula(x, y, ref, ref_y, *params, **named)
    loss.formula = formula
    return loss


def _formula(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # a loss of LOSSES without its input checks (the caller checked); any other callable as it is
    return getattr(loss_fn, "formula", loss_fn)


@_checked
def c1_contrastive(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                   margin: float = 0.5) -> Tensor:
    """C1 contrastive (Hadsell et al., XBM variant) on similarities s, PAPER.md §4."""
    # (1/|A|) Σ_anchors [Σ_pos (1 − s) + Σ_neg [s − margin]₊]
    ref, same, index, valid = _pairs(x, y, ref, ref_y)
    s = pairwise_similarity(x, ref)
    pull = torch.where(valid, 1 - s.gather(1, index), 0.0)  # 1 − s over the positive pairs (slots)
    push = torch.where(same, 0.0, F.relu(s - margin))  # [s − margin]₊ over the negative pairs
    return (pull.sum(dim=1) + push.sum(dim=1)).mean()


@_checked
def c2_contrastive(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                   pos_margin: float = 0.0, neg_margin: float = 0.5) -> Tensor:
    """C2 contrastive with a positive margin (Wu et al.) on distances d, PAPER.md §4."""
    # mean_nonzero over positive pairs of [d − m⁺]₊ + mean_nonzero over negative pairs of [m⁻ − d]₊
    ref, same, index, valid = _pairs(x, y, ref, ref_y)
    d = pairwise_distance(x, ref)
    pull = torch.where(valid, F.relu(d.gather(1, index) - pos_margin), 0.0)  # [d − m⁺]₊, positive pairs (slots)
    push = torch.where(same, 0.0, F.relu(neg_margin - d))  # [m⁻ − d]₊ over the negative pairs
    return _mean_nonzero(pull) + _mean_nonzero(push)


@_checked
def triplet(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
            margin: float = 0.1) -> Tensor:
    """Triplet loss (Schroff et al.) over every valid (anchor, positive, negative), PAPER.md §4."""
    # mean_nonzero over triplets (a, p, n) of [d(a, p) − d(a, n) + m]₊
    ref, same, index, valid = _pairs(x, y, ref, ref_y)
    d = pairwise_distance(x, ref)
    # masks on the (n, P) and (n, m) factors, not the (n, P, m) product: an empty slot or a reference
    # that is no negative enters as −∞, which makes the hinge 0, so only valid triplets count
    d_ap = torch.where(valid, d.gather(1, index), -math.inf)
    slack = torch.where(same, -math.inf, margin - d)
    hinge = F.relu(d_ap[:, :, None] + slack[:, None, :])  # (n, P, m)
    return _mean_nonzero(hinge)


@_checked
def multi_similarity(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                     alpha: float = 2.0, beta: float = 40.0, base: float = 0.5) -> Tensor:
    """Multi-similarity loss (Wang et al.) on similarities s, without pair mining, PAPER.md §4."""
    # mean over anchors of (1/α)·log(1 + Σ_pos e^{−α(s − λ)}) + (1/β)·log(1 + Σ_neg e^{β(s − λ)}), λ = base
    _check_positive("multi_similarity", alpha=alpha, beta=beta)
    ref, same, index, valid = _pairs(x, y, ref, ref_y)
    s = pairwise_similarity(x, ref)
    pull = _log1p_sum_exp(-alpha * (s.gather(1, index) - base), ~valid) / alpha  # positive pairs (slots)
    push = _log1p_sum_exp(beta * (s - base), same) / beta  # negative pairs
    return (pull + push).mean()


LOSSES = {"c1": c1_contrastive, "c2": c2_contrastive, "triplet": triplet, "ms": multi_similarity}

# --------------------------------------------------------------------------- proxies and the CCP objective (§2)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", repr(fn))


def _random_proxies(rows: int, dim: int, generator: Optional[torch.Generator]) -> Tensor:
    # N(0, 1/d) entries: norms near 1, so n(P) starts near the sphere where trained embeddings lie
    device = generator.device if generator is not None else None
    return torch.randn(rows, dim, generator=generator, device=device) / math.sqrt(dim)


class Proxies(nn.Module):
    """C classes × K proxies of dimension d, stored class-major (docs/DESIGN.md): row c·K + k is proxy k of class c.

    `weight` starts as N(0, 1/d) draws from `generator` (the `proxy_init: random` ablation); proxy
    selection (PAPER.md §5) overwrites it through `reset`, keeping the same Parameter.
    """

    def __init__(self, num_classes: int, per_class: int, dim: int,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        _check_positive("Proxies", num_classes=num_classes, per_class=per_class, dim=dim)
        self.num_classes, self.proxies_per_class, self.dim = num_classes, per_class, dim
        self.weight = nn.Parameter(_random_proxies(num_classes * per_class, dim, generator))
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(per_class))

    @torch.no_grad()
    def reset(self, new_weight: Tensor) -> None:
        """Copy new proxies, (C·K, d) or (C, K, d), into the existing Parameter: the optimiser keeps
        tracking it and keeps its Adam moments, as in the authors' code (PAPER.md §5)."""
        shapes = [tuple(self.weight.shape), (self.num_classes, self.proxies_per_class, self.dim)]
        _expect("Proxies.reset", isinstance(new_weight, Tensor) and tuple(new_weight.shape) in shapes,
                f"a tensor of shape {shapes[0]} or {shapes[1]}", new_weight)
        _expect("Proxies.reset", bool(torch.isfinite(new_weight).all()), "finite new proxies", "NaN or inf")
        self.weight.copy_(new_weight.reshape(self.weight.shape))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, per_class={self.proxies_per_class}, dim={self.dim}"


class CCPLoss(nn.Module):
    """The data term of the CCP objective (PAPER.md §2):
    pair_weight · ℓ(n(x), y) + proxy_weight · ℓ(n(x), y; n(P), proxy labels).

    `loss_fn` is one of LOSSES; `loss_params` go to both of its calls. The proxies are a submodule,
    so they follow `.to()` and appear in `state_dict()` as `proxies.weight`.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], proxies: Proxies, pair_weight: float = 0.1,
                 proxy_weight: float = 1.0, normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,
                 **loss_params: float) -> None:
        super().__init__()
        _expect("CCPLoss", isinstance(proxies, Proxies), "proxies as a Proxies module", proxies)
        _check_loss_params("CCPLoss", loss_fn, loss_params)
        self.loss_fn, self.proxies, self.normalize = loss_fn, proxies, normalize
        self.pair_weight, self.proxy_weight, self.loss_params = pair_weight, proxy_weight, loss_params

    def terms(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The unweighted pair term and proxy term, for logging."""
        _check_batch("CCPLoss", embeddings, labels, self.proxies.weight, "the proxies", self.proxies.num_classes)
        loss, z = _formula(self.loss_fn), self.normalize(embeddings)  # checked once, above
        pair = loss(z, labels, **self.loss_params)
        proxy = loss(z, labels, self.normalize(self.proxies.weight), self.proxies.labels, **self.loss_params)
        return pair, proxy

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        pair, proxy = self.terms(embeddings, labels)
        return self.pair_weight * pair + self.proxy_weight * proxy

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.loss_params.items())
        return (f"loss_fn={_name(self.loss_fn)}, pair_weight={self.pair_weight}, "
                f"proxy_weight={self.proxy_weight}, normalize={_name(self.normalize)}{params}")

# --------------------------------------------------------------------------- baselines (§4, §7)


class ProxyAnchor(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020), one proxy per class as the anchor, z = `normalize`.

    The defaults follow the authors' framework, where the paper's baseline rows were trained (PAPER.md §7);
    `normalize=l2_normalize, push_over_all_proxies=True` is Kim et al.'s version. Proxies start as N(0, 1/d)
    draws from `generator`."""

    def __init__(self, num_classes: int, dim: int, margin: float = 0.1, alpha: float = 32.0,
                 generator: Optional[torch.Generator] = None, *,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,  # n(x), the authors' (PAPER.md §7)
                 push_over_all_proxies: bool = False) -> None:  # False: ÷|P⁻| as the authors' code (PAPER.md §7)
        super().__init__()
        _check_positive("ProxyAnchor", num_classes=num_classes, dim=dim, alpha=alpha)
        self.num_classes, self.margin, self.alpha = num_classes, margin, alpha
        self.normalize, self.push_over_all_proxies = normalize, push_over_all_proxies
        self.proxies = nn.Parameter(_random_proxies(num_classes, dim, generator))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # (1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{x∈X⁺_p} e^{−α(s − δ)}) + (1/|P⁻|) Σ_{p∈P} log(1 + Σ_{x∈X⁻_p} e^{α(s + δ)}),
        # s = ⟨z(x), z(p)⟩, P⁺ (P⁻) the proxies with a positive (a negative) in the batch, δ = margin
        _check_batch("ProxyAnchor", embeddings, labels, self.proxies, "the proxies", self.num_classes)
        x, p = self.normalize(embeddings), self.normalize(self.proxies)
        s = pairwise_similarity(p, x)  # (C, n): each proxy is an anchor, the batch its references
        pos = torch.arange(self.num_classes, device=labels.device)[:, None] == labels[None, :]
        with_positive = pos.any(dim=1)
        pull = _log1p_sum_exp(-self.alpha * (s - self.margin), ~pos)[with_positive].sum() / with_positive.sum()
        # a proxy without a negative in the batch adds log 1 = 0 to the push sum either way; only the count differs
        push_count = self.num_classes if self.push_over_all_proxies else (~pos).any(dim=1).sum().clamp_min(1)
        push = _log1p_sum_exp(self.alpha * (s + self.margin), pos).sum() / push_count
        return pull + push

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.proxies.shape[1]}, margin={self.margin}, "
                f"alpha={self.alpha}, normalize={_name(self.normalize)}, "
                f"push_over_all_proxies={self.push_over_all_proxies}")


class ProxyNCAPlusPlus(nn.Module):
    """ProxyNCA++ (Teh et al., ECCV 2020): a softmax over the proxies with the positive one in the
    denominator, z = `normalize`, logits ℓ_c = ⟨z(x), z(p_c)⟩/T ("similarity", the authors' code) or
    −‖z(x) − z(p_c)‖²/T ("squared_distance", Teh et al.). On the sphere, similarity at T equals
    squared_distance at 2T. The default T = 0.11 is the authors' shipped scale 1/0.11, which produced the
    paper's baseline rows; the supplement rounds it to 0.1 (PAPER.md §7)."""

    LOGITS = ("similarity", "squared_distance")

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.11,
                 generator: Optional[torch.Generator] = None, *,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,  # n(x), the authors' (PAPER.md §7)
                 logits: str = "similarity") -> None:  # ⟨z(x), z(p)⟩/T as the authors' code (PAPER.md §7)
        super().__init__()
        _check_positive("ProxyNCAPlusPlus", num_classes=num_classes, dim=dim, temperature=temperature)
        _expect("ProxyNCAPlusPlus", logits in self.LOGITS, f"logits to be one of {self.LOGITS}", repr(logits))
        self.num_classes, self.temperature, self.normalize, self.logits = num_classes, temperature, normalize, logits
        self.proxies = nn.Parameter(_random_proxies(num_classes, dim, generator))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # mean over the batch of −log(e^{ℓ_y} / Σ_c e^{ℓ_c})
        _check_batch("ProxyNCAPlusPlus", embeddings, labels, self.proxies, "the proxies", self.num_classes)
        x, p = self.normalize(embeddings), self.normalize(self.proxies)
        closeness = pairwise_similarity(x, p) if self.logits == "similarity" else -squared_distance(x, p)
        return F.cross_entropy(closeness / self.temperature, labels.long())

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.proxies.shape[1]}, temperature={self.temperature}, "
                f"normalize={_name(self.normalize)}, logits={self.logits}")


class SoftTriple(nn.Module):
    """SoftTriple loss (Qian et al., ICCV 2019) with K centers per class (class-major rows), z = `normalize`,
    plus the regulariser that merges close centers. Its distance D is ‖z(w) − z(w')‖ ("normalized", Qian
    et al.) or √[2 − 2⟨w, w'⟩]₊ on the raw centers ("raw", the authors' code: equal to the first for unit
    centers; where ⟨w, w'⟩ ≥ 1 their gradient is NaN and this one takes the subgradient 0, PAPER.md §7)."""

    CENTER_REGULARIZERS = ("normalized", "raw")

    def __init__(self, num_classes: int, dim: int, centers_per_class: int = 10, la: float = 20.0,
                 gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01,
                 generator: Optional[torch.Generator] = None, *,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,  # n(x), the authors' (PAPER.md §7)
                 center_regularizer: str = "normalized") -> None:  # theirs ("raw") has NaN gradients (PAPER.md §7)
        super().__init__()
        _check_positive("SoftTriple", num_classes=num_classes, dim=dim, centers_per_class=centers_per_class,
                        la=la, gamma=gamma)
        _expect("SoftTriple", center_regularizer in self.CENTER_REGULARIZERS,
                f"center_regularizer to be one of {self.CENTER_REGULARIZERS}", repr(center_regularizer))
        self.num_classes, self.centers_per_class = num_classes, centers_per_class
        self.la, self.gamma, self.tau, self.margin = la, gamma, tau, margin
        self.normalize, self.center_regularizer = normalize, center_regularizer
        self.proxies = nn.Parameter(_random_proxies(num_classes * centers_per_class, dim, generator))

    def regularizer(self, w: Tensor, raw: Tensor) -> Tensor:
        """From the normalised centers w and the raw ones (both (C·K, d)); 0 when K = 1."""
        # Σ_c Σ_{t<t'} D(w_ct, w_ct') / (C·K·(K − 1))
        C, K = self.num_classes, self.centers_per_class
        if K == 1:
            return w.sum() * 0.0
        if self.center_regularizer == "normalized":
            d = pairwise_distance(w.view(C, K, -1), w.view(C, K, -1))  # (C, K, K)
        else:
            r = raw.view(C, K, -1)
            d = _sqrt_or_zero(2 - pairwise_similarity(2 * r, r))  # √[2 − 2⟨w, w'⟩]₊, (C, K, K)
        return d.triu(diagonal=1).sum() / (C * K * (K - 1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # cross-entropy of λ·(S_c(x) − δ·[c = y]), S_c(x) = Σ_k softmax_k(s_ck/γ)·s_ck, s_ck = ⟨z(x), z(w_ck)⟩;
        # plus τ · regularizer
        _check_batch("SoftTriple", embeddings, labels, self.proxies, "the proxies", self.num_classes)
        x, w = self.normalize(embeddings), self.normalize(self.proxies)
        s = pairwise_similarity(x, w).view(len(x), self.num_classes, self.centers_per_class)
        class_similarity = (F.softmax(s / self.gamma, dim=2) * s).sum(dim=2)  # S_c(x), (n, C)
        margins = self.margin * F.one_hot(labels.long(), self.num_classes).to(s.dtype)
        loss = F.cross_entropy(self.la * (class_similarity - margins), labels.long())
        return loss + self.tau * self.regularizer(w, self.proxies)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.proxies.shape[1]}, centers_per_class="
                f"{self.centers_per_class}, la={self.la}, gamma={self.gamma}, tau={self.tau}, margin={self.margin}, "
                f"normalize={_name(self.normalize)}, center_regularizer={self.center_regularizer}")


class CrossBatchMemory(nn.Module):
    """Cross-batch memory (XBM, Wang et al., CVPR 2020): a FIFO ring buffer of the last `memory_size`
    detached n(x) and labels, used as extra references: loss_fn(n(x), y, memory, memory labels).

    `forward` stores the batch and then compares it with the memory, so that a batch meets its own
    copy (the order of XBM's and the authors' code, PAPER.md §7); include_batch=False compares with
    the memory as it was before the batch, then stores it. `enqueue` only stores. `scheduled_loss` is
    one training step under the schedule of PAPER.md §4: nothing for the first `start` batches, then
    the memory fills without a loss, and its loss is on from the batch that meets it full. The queue,
    its pointer, its fill count and the batches seen are buffers, so `state_dict()` carries them.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], dim: int, memory_size: int,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize, start: int = 0,
                 include_batch: bool = True, **loss_params: float) -> None:
        super().__init__()
        _check_positive("CrossBatchMemory", dim=dim, memory_size=memory_size)
        _expect("CrossBatchMemory", start >= 0, "start >= 0 batches", repr(start))
        _check_loss_params("CrossBatchMemory", loss_fn, loss_params)
        self.loss_fn, self.normalize, self.start, self.loss_params = loss_fn, normalize, start, loss_params
        self.include_batch = include_batch
        self.register_buffer("memory", torch.zeros(memory_size, dim))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next row to overwrite
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows filled so far
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))  # by scheduled_loss

    def __len__(self) -> int:
        return int(self.count)

    def __bool__(self) -> bool:
        # a module stays truthy when its memory is empty (`if xbm:` must not depend on the fill)
        return True

    @property
    def is_full(self) -> bool:
        return len(self) == self.memory.shape[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        _check_batch("CrossBatchMemory", embeddings, labels, self.memory, "the memory")
        z = self.normalize(embeddings)
        if self.include_batch:
            self._push(z.detach(), labels)
        filled = len(self)
        if filled == 0:
            loss = z.new_zeros(()) + 0.0 * z.sum()  # a zero tied to the graph: backward() works on an empty memory
        else:
            memory, memory_labels = self.memory[:filled], self.memory_labels[:filled]
            if not self.include_batch:  # copies: the enqueue below overwrites rows that backward still needs
                memory, memory_labels = memory.clone(), memory_labels.clone()
            loss = _formula(self.loss_fn)(z, labels, memory, memory_labels, **self.loss_params)  # checked above
        if not self.include_batch:
            self._push(z.detach(), labels)
        return loss

    def scheduled_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The memory's term for one training batch: 0 before `start` batches have passed and while
        the memory fills, then forward() (PAPER.md §4: the term is on once the batch meets a full memory)."""
        seen = int(self.batches_seen)
        self.batches_seen.add_(1)
        meets = len(self) + (len(labels) if self.include_batch else 0)  # rows the batch would meet
        if seen >= self.start and meets >= len(self.memory):
            return self(embeddings, labels)
        if seen >= self.start:
            self.enqueue(embeddings.detach(), labels)
        return embeddings.new_zeros(())

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store n(embeddings) and labels without computing a loss."""
        _check_batch("CrossBatchMemory.enqueue", embeddings, labels, self.memory, "the memory")
        self._push(self.normalize(embeddings), labels)

    def _push(self, z: Tensor, labels: Tensor) -> None:
        size = len(self.memory)
        z, labels = z[-size:], labels[-size:]  # a batch larger than the memory leaves its last rows
        rows = (self.pointer + torch.arange(len(z), device=z.device)) % size
        self.memory[rows] = z
        self.memory_labels[rows] = labels.to(self.memory_labels.dtype)
        self.pointer.copy_((self.pointer + len(z)) % size)
        self.count.copy_((self.count + len(z)).clamp(max=size))

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.loss_params.items())
        return (f"loss_fn={_name(self.loss_fn)}, dim={self.memory.shape[1]}, memory_size={len(self.memory)}, "
                f"normalize={_name(self.normalize)}, start={self.start}, include_batch={self.include_batch}{params}")

# --------------------------------------------------------------------------- input checks (public entry points only)


def _expect(where: str, ok: bool, expected: str, got: object) -> None:
    """The one way a check fails: ValueError("<where>: expected <expected>, got <got>")."""
    if not ok:
        raise ValueError(f"{where}: expected {expected}, got {_describe(got)}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype} on {value.device}"
    return value if isinstance(value, str) else f"a {type(value).__name__}"


def _check_batch(where: str, x: Tensor, y: Tensor, like: Optional[Tensor] = None, like_name: str = "",
                 num_classes: Optional[int] = None, name: str = "embeddings") -> None:
    """x: a non-empty, finite (n, d) floating tensor in the dimension, dtype and device of `like` (proxies,
    references, the memory); y: its (n,) integer labels, in [0, num_classes) when that is given."""
    _expect(where, isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point() and len(x) > 0,
            f"{name} as a non-empty 2-D floating tensor (n, d)", x)
    integer = isinstance(y, Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    _expect(where, integer and y.shape == (len(x),) and y.device == x.device,
            f"the labels of {name} as a 1-D integer tensor of length {len(x)} on {x.device}", y)
    if like is not None:
        _expect(where, x.shape[1:] == like.shape[1:] and x.dtype == like.dtype and x.device == like.device,
                f"{name} in the dimension, dtype and device of {like_name} ({_describe(like)})", x)
    # one read on the host: the sum of x (not finite where a row is not) and, when checked, the label range
    scalars = (x.sum(), *(torch.aminmax(y) if num_classes is not None else ()))
    total, *label_range = torch.stack([v.double() for v in scalars]).tolist()
    if not math.isfinite(total):
        finite = torch.isfinite(x).all(dim=1)  # (a sum of finite rows may merely overflow)
        _expect(where, bool(finite.all()), f"finite {name}", f"{int((~finite).sum())} row(s) of {len(x)} "
                f"with NaN or inf (first: row {int(finite.int().argmin())})")
    if num_classes is not None:
        low, high = map(int, label_range)
        _expect(where, 0 <= low and high < num_classes, f"labels in [0, {num_classes})", f"values from {low} to {high}")


def _check_pair_inputs(where: str, x: Tensor, y: Tensor, ref: Optional[Tensor], ref_y: Optional[Tensor]) -> None:
    """The four losses: x, y as _check_batch; ref and ref_y together (proxy form) or neither (pair form)."""
    _check_batch(where, x, y)
    _expect(where, (ref is None) == (ref_y is None), "ref and ref_y together or neither",
            "only ref" if ref_y is None else "only ref_y")
    if ref is not None:
        _check_batch(where, ref, ref_y, x, "the embeddings", name="references")


def _check_positive(where: str, **values: float) -> None:
    for name, value in values.items():
        _expect(where, value > 0, f"{name} > 0", repr(value))


def _check_loss_params(where: str, loss_fn: Callable, params: dict) -> None:
    # misspelled loss parameters fail when the module is built, not at the first step
    accepted = list(inspect.signature(loss_fn).parameters)[4:]  # after x, y, ref, ref_y
    _expect(where, set(params) <= set(accepted), f"parameters of {_name(loss_fn)} among {accepted}",
            str(sorted(params)))

# --------------------------------------------------------------------------- speed-ups (the same values, less time)


class _LipschitzNormalizeFast(torch.autograd.Function):
    """n(x) = x / max(1, ‖x‖) with a hand-written backward: three passes over the proxy table where
    autograd's chain through norm, where and the product makes about seven."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        outside = norm > 1  # the authors' mask: on the sphere itself the gradient is the identity
        scale = 1 / torch.where(outside, norm, 1.0)
        ctx.save_for_backward(x, scale, outside)
        return x * scale

    @staticmethod
    @torch.autograd.function.once_differentiable  # a 2nd derivative would take scale as constant: refused
    def backward(ctx, grad: Tensor) -> Tensor:
        x, scale, outside = ctx.saved_tensors
        # outside the ball the Jacobian is (I − x̂x̂ᵀ)/‖x‖: g/‖x‖ − x·⟨x, g⟩/‖x‖³; inside it is g
        dot = torch.einsum("...i,...i->...", x, grad).unsqueeze(-1)
        coefficient = torch.where(outside, dot * scale ** 3, 0.0)
        return (grad * scale).addcmul_(x, coefficient, value=-1)


def _positive_slots(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's positive references as indices (n, P), P = the most positives of any anchor, with a
    validity mask (n, P). P is small (K in proxy form): positive terms gather (n, P) values instead of
    masking all m references, and triplets need (n, P, m), not (n, m, m)."""
    counts = pos.sum(dim=1)
    rank = torch.arange(1, int(counts.max()) + 1, dtype=torch.int32, device=pos.device)  # 1st, 2nd, ... positive
    valid = rank <= counts[:, None]
    # the k-th positive is where the row's running count first reaches k: a binary search, which reads
    # nothing more on the host (boolean indexing would); int32 counts, faster than int64
    running = pos.cumsum(dim=1, dtype=torch.int32)
    index = torch.searchsorted(running, rank.expand(len(pos), -1).contiguous())
    return index.clamp_max(pos.shape[1] - 1), valid  # an empty slot points at the last reference, masked
