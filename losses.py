"""Losses for "Deep Metric Learning with Chance Constraints" (PAPER.md §2–§4); imports only torch (and stdlib).

What lives here, top to bottom:
- the embedding normalisation n(x) = x / max(1, ‖x‖) of PAPER.md §3, and x/‖x‖ for the ablation;
- Euclidean distances, computed so that duplicate points get distance 0 and finite gradients;
- the four pairwise losses of §4 (C1, C2, triplet, multi-similarity). Each one takes anchors x (n, d)
  with labels y and either nothing (pair form: the batch against itself, self-pairs excluded) or
  references ref (m, d) with labels ref_y (proxy form: the batch against the proxies);
- `Proxies`, the C·K class-major proxy table, and `CCPLoss`, the pair + proxy objective of §2
  (the projection term λ/2·‖θ − θ_anchor‖² belongs to projection.py);
- the baselines of §4: Proxy-Anchor, ProxyNCA++, SoftTriple and cross-batch memory (XBM).

Conventions (docs/DESIGN.md): embeddings are (n, d) floating tensors and labels (n,) integer tensors.
The four losses use their inputs as given (the caller applies n); the baselines take raw embeddings
and normalise inside with their `normalize` argument: n by default, as the authors' framework that
trained the paper's baseline rows (PAPER.md §7), or x/‖x‖ as the baselines' own papers. Every proxy
table starts as N(0, 1/d) draws from the `generator` passed in. Everything runs on the inputs'
device and dtype. Bad input raises ValueError naming what was expected, what was given and where.
"""
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- normalisation (§3)


class _LipschitzNormalize(torch.autograd.Function):
    """n(x) with a hand-written backward: autograd's chain through norm, where and the product makes
    about seven passes over the 45k-row SOP proxy table, this one three (a row dot, a product, an addcmul)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        # the mask is ‖x‖ > 1, as in the authors' code: on the sphere itself the gradient is the identity
        outside = norm > 1
        scale = 1 / torch.where(outside, norm, 1.0)
        ctx.save_for_backward(x, scale, outside)
        return x * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, scale, outside = ctx.saved_tensors
        # outside the ball n(x) = x/‖x‖ has the Jacobian (I − x̂x̂ᵀ)/‖x‖, so the gradient is
        # g/‖x‖ − x·⟨x, g⟩/‖x‖³; inside it is g (scale 1, no second term)
        dot = torch.einsum("...i,...i->...", x, grad).unsqueeze(-1)
        coefficient = torch.where(outside, dot * scale ** 3, 0.0)
        return (grad * scale).addcmul_(x, coefficient, value=-1)


def lipschitz_normalize(x: Tensor) -> Tensor:
    """n(x) = x / max(1, ‖x‖) per row (PAPER.md §3): rows outside the unit ball go onto the sphere."""
    return _LipschitzNormalize.apply(x)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖, eps) per row: the usual projection onto the sphere (the `l2` ablation)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


NORMALIZATIONS = {"lipschitz": lipschitz_normalize, "l2": l2_normalize}

# --------------------------------------------------------------------------- input checks


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", repr(fn))


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype} on {value.device}"
    return f"a {type(value).__name__}"


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_embeddings(x: Tensor, y: Tensor, where: str, name: str = "embeddings") -> None:
    """Embeddings must be a non-empty finite (n, d) float tensor with (n,) integer labels beside it."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{where}: expected {name} as a 2-D floating tensor (n, d), got {_describe(x)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: expected at least one row in {name}, got shape {tuple(x.shape)}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or not _is_integer(y):
        raise ValueError(f"{where}: expected the labels of {name} as a 1-D integer tensor of length "
                         f"{x.shape[0]}, got {_describe(y)}")
    if y.device != x.device:
        raise ValueError(f"{where}: {name} are on {x.device} but their labels on {y.device}")
    # one cheap reduction first (NaN or inf anywhere makes the sum non-finite); rows only on failure
    if torch.isfinite(x.sum()):
        return
    bad_rows = ~torch.isfinite(x).all(dim=1)
    if bad_rows.any():  # else the sum merely overflowed
        first = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"{where}: {name} have {int(bad_rows.sum())} row(s) with NaN or inf "
                         f"(first: row {first}) out of {x.shape[0]}")


def _check_same_space(x: Tensor, ref: Tensor, where: str, name: str) -> None:
    """References must share the embeddings' dimension, dtype and device."""
    if ref.shape[1] != x.shape[1] or ref.dtype != x.dtype or ref.device != x.device:
        raise ValueError(f"{where}: expected the embeddings and {name} to share dimension, dtype and device, "
                         f"got embeddings as {_describe(x)} and {name} as {_describe(ref)}")


def _check_labels_in_range(labels: Tensor, num_classes: int, where: str) -> None:
    if not isinstance(labels, Tensor) or not _is_integer(labels):
        raise ValueError(f"{where}: expected integer labels, got {_describe(labels)}")
    if not labels.numel():
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one read on the host
    if low < 0 or high >= num_classes:
        raise ValueError(f"{where}: expected labels in [0, {num_classes}), got values from {low} to {high}")


def _check_positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{where}: expected {name} > 0, got {value!r}")


def _check_loss_params(loss_fn: Callable, params: dict, where: str) -> None:
    """Misspelled loss parameters fail when the module is built, not at the first step."""
    signature = inspect.signature(loss_fn)
    try:
        signature.bind(None, None, None, None, **params)
    except TypeError:
        accepted = list(signature.parameters)[4:]
        raise ValueError(f"{where}: {_name(loss_fn)} accepts the parameters "
                         f"{accepted}, got {sorted(params)}") from None


def _pairs(x: Tensor, y: Tensor, ref: Optional[Tensor], ref_y: Optional[Tensor],
           where: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check the inputs; return the reference set, the mask `same` (n, m) of pairs with equal labels
    (the negative pairs are the others) and each anchor's positive pairs as slots (index, valid)."""
    _check_embeddings(x, y, where)
    if (ref is None) != (ref_y is None):
        raise ValueError(f"{where}: ref and ref_y come together, got ref {_describe(ref)} "
                         f"and ref_y {_describe(ref_y)}")
    if ref is None:
        same = y[:, None] == y[None, :]
        # pair form: the batch is its own reference set, without each anchor's pair with itself
        not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
        return x, same, *_positive_slots(same & not_self)
    _check_embeddings(ref, ref_y, where, name="references")
    _check_same_space(x, ref, where, "references")
    same = y[:, None] == ref_y[None, :]
    return ref, same, *_positive_slots(same)

# --------------------------------------------------------------------------- distances


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² for the rows of a (..., n, d) and b (..., m, d), shape (..., n, m)."""
    a2 = (a * a).sum(-1, keepdim=True)
    b2 = (b * b).sum(-1).unsqueeze(-2)
    # ‖a‖² + ‖b‖² − 2⟨a, b⟩ needs O(n·m) memory where explicit differences would need O(n·m·d)
    sq = a2 + b2 - 2 * (a @ b.transpose(-1, -2))
    # the expansion leaves rounding noise of about √d·eps·(‖a‖² + ‖b‖²) where a = b; values below
    # that resolution are noise, so they are 0, and duplicate points are exactly at distance 0
    resolution = math.sqrt(a.shape[-1]) * torch.finfo(sq.dtype).eps * (a2 + b2)
    return torch.where(sq > resolution, sq, 0.0)


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ‖a_i − b_j‖ (not squared, PAPER.md §4), shape (..., n, m)."""
    sq = squared_distance(a, b)
    # sqrt has an infinite slope at 0: take the subgradient 0 there (the inner where keeps NaN out)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


def _mean_nonzero(terms: Tensor) -> Tensor:
    # Σ terms / #(terms > 0), and 0 when no term is positive; summed in at least float32 for fp16
    # counted in int32: several times faster than the default int64 sum of a bool (n, P, m) tensor,
    # and 2³¹ terms would take 8 GiB
    count = (terms > 0).sum(dtype=torch.int32)
    total = terms.sum(dtype=torch.promote_types(terms.dtype, torch.float32))
    return (total / count.clamp_min(1)).to(terms.dtype)


def _log1p_sum_exp(logits: Tensor, exclude: Tensor) -> Tensor:
    # log(1 + Σ exp(logits)) per row over the entries not in `exclude`, as log(e⁰ + e^{logsumexp}):
    # no overflow for large α, β. A row with every entry excluded has logsumexp −∞ and gives log 1 = 0
    # (the NaN that logsumexp's backward leaves in such a row is zeroed by masked_fill's backward)
    lse = torch.logsumexp(logits.masked_fill(exclude, -math.inf), dim=1)
    return torch.logaddexp(lse, lse.new_zeros(()))


def _positive_slots(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's positive references as indices (n, P) padded to P = the most positives of any
    anchor, with a validity mask (n, P). P is small (K in proxy form): the positive terms work on
    (n, P) gathers instead of masks over all m references, and triplets need (n, P, m), not (n, m, m)."""
    counts = pos.sum(dim=1)
    rank = torch.arange(1, int(counts.max()) + 1, dtype=torch.int32, device=pos.device)  # 1st, 2nd, ... positive
    valid = rank <= counts[:, None]
    # a row's running count of positives never decreases, so its k-th positive is where the count first
    # reaches k: found by binary search, with no further read on the host (unlike boolean indexing)
    running = pos.cumsum(dim=1, dtype=torch.int32)
    index = torch.searchsorted(running, rank.expand(len(pos), -1).contiguous())
    return index.clamp_max(pos.shape[1] - 1), valid  # an empty slot points at the last reference, masked

# --------------------------------------------------------------------------- the four losses (§4)


def c1_contrastive(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                   margin: float = 0.5) -> Tensor:
    """C1 contrastive (Hadsell et al., XBM variant) on similarities s = ⟨x, ref⟩, PAPER.md §4."""
    ref, same, index, valid = _pairs(x, y, ref, ref_y, "c1_contrastive")
    s = x @ ref.T
    pull = torch.where(valid, 1 - s.gather(1, index), 0.0)  # 1 − s over positive pairs
    push = torch.where(same, 0.0, F.relu(s - margin))  # [s − margin]₊ over negative pairs
    # summed per anchor, then divided by the number of anchors |A|
    return (pull.sum(dim=1) + push.sum(dim=1)).mean()


def c2_contrastive(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                   pos_margin: float = 0.0, neg_margin: float = 0.5) -> Tensor:
    """C2 contrastive with a positive margin (Wu et al.) on distances d, PAPER.md §4."""
    ref, same, index, valid = _pairs(x, y, ref, ref_y, "c2_contrastive")
    d = pairwise_distance(x, ref)
    pull = torch.where(valid, F.relu(d.gather(1, index) - pos_margin), 0.0)  # [d − m⁺]₊ over positive pairs
    push = torch.where(same, 0.0, F.relu(neg_margin - d))  # [m⁻ − d]₊ over negative pairs
    # each side averaged over its non-zero terms
    return _mean_nonzero(pull) + _mean_nonzero(push)


def triplet(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
            margin: float = 0.1) -> Tensor:
    """Triplet loss (Schroff et al.) over every valid (anchor, positive, negative), PAPER.md §4."""
    ref, same, index, valid = _pairs(x, y, ref, ref_y, "triplet")
    d = pairwise_distance(x, ref)
    # the masks go on the (n, P) and (n, m) factors, not on the (n, P, m) product: an empty slot or a
    # reference that is no negative enters as −∞, which makes the hinge 0, so only valid triplets count
    d_ap = torch.where(valid, d.gather(1, index), -math.inf)
    slack = torch.where(same, -math.inf, margin - d)
    hinge = F.relu(d_ap[:, :, None] + slack[:, None, :])  # [d(a,p) + (m − d(a,n))]₊, (n, P, m)
    return _mean_nonzero(hinge)


def multi_similarity(x: Tensor, y: Tensor, ref: Optional[Tensor] = None, ref_y: Optional[Tensor] = None,
                     alpha: float = 2.0, beta: float = 40.0, base: float = 0.5) -> Tensor:
    """Multi-similarity loss (Wang et al.) on similarities, without pair mining, PAPER.md §4."""
    _check_positive("multi_similarity", alpha=alpha, beta=beta)
    ref, same, index, valid = _pairs(x, y, ref, ref_y, "multi_similarity")
    s = x @ ref.T
    s_pos = s.gather(1, index)  # the positives' similarities (n, P): the pull need not scan all m references
    pull = _log1p_sum_exp(-alpha * (s_pos - base), ~valid) / alpha  # (1/α)·log(1 + Σ_pos e^{−α(s − λ)})
    push = _log1p_sum_exp(beta * (s - base), same) / beta  # (1/β)·log(1 + Σ_neg e^{β(s − λ)})
    return (pull + push).mean()


LOSSES = {"c1": c1_contrastive, "c2": c2_contrastive, "triplet": triplet, "ms": multi_similarity}

# --------------------------------------------------------------------------- proxies and the CCP objective (§2)


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

    def per_class(self) -> Tensor:
        """The (C, K, d) view of `weight` that proxy selection works with."""
        return self.weight.view(self.num_classes, self.proxies_per_class, self.dim)

    @torch.no_grad()
    def reset(self, new_weight: Tensor) -> None:
        """Copy new proxies, (C·K, d) or (C, K, d), into the existing Parameter: the optimiser keeps
        tracking it and keeps its Adam moments, as in the authors' code (PAPER.md §5)."""
        shapes = [tuple(self.weight.shape), (self.num_classes, self.proxies_per_class, self.dim)]
        if not isinstance(new_weight, Tensor) or tuple(new_weight.shape) not in shapes:
            raise ValueError(f"Proxies.reset: expected a tensor of shape {shapes[0]} or {shapes[1]}, "
                             f"got {_describe(new_weight)}")
        if not torch.isfinite(new_weight).all():
            raise ValueError(f"Proxies.reset: new proxies contain NaN or inf ({_describe(new_weight)})")
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
        if not isinstance(proxies, Proxies):
            raise ValueError(f"CCPLoss: expected proxies as a Proxies module, got {_describe(proxies)}")
        _check_loss_params(loss_fn, loss_params, "CCPLoss")
        self.loss_fn, self.proxies, self.normalize = loss_fn, proxies, normalize
        self.pair_weight, self.proxy_weight, self.loss_params = pair_weight, proxy_weight, loss_params

    def terms(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The unweighted pair term and proxy term, for logging."""
        _check_labels_in_range(labels, self.proxies.num_classes, "CCPLoss")
        z = self.normalize(embeddings)
        pair = self.loss_fn(z, labels, **self.loss_params)
        proxy = self.loss_fn(z, labels, self.normalize(self.proxies.weight), self.proxies.labels,
                             **self.loss_params)
        return pair, proxy

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        pair, proxy = self.terms(embeddings, labels)
        return self.pair_weight * pair + self.proxy_weight * proxy

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.loss_params.items())
        return (f"loss_fn={_name(self.loss_fn)}, pair_weight={self.pair_weight}, "
                f"proxy_weight={self.proxy_weight}, normalize={_name(self.normalize)}{params}")

# --------------------------------------------------------------------------- baselines (§4)


def _normalized_inputs(embeddings: Tensor, labels: Tensor, proxies: Tensor, num_classes: int,
                       normalize: Callable[[Tensor], Tensor], where: str) -> tuple[Tensor, Tensor]:
    """Check a baseline's inputs; return the normalised embeddings and proxies."""
    _check_embeddings(embeddings, labels, where)
    _check_same_space(embeddings, proxies, where, "the proxies")
    _check_labels_in_range(labels, num_classes, where)
    return normalize(embeddings), normalize(proxies)


def _check_choice(where: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: expected {name} to be one of {choices}, got {value!r}")


class ProxyAnchor(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020) with one proxy per class as the anchor, s = ⟨z(x), z(p)⟩:
    (1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{x∈X⁺_p} e^{−α(s(x,p) − δ)})
      + (1/|P⁻|) Σ_{p∈P} log(1 + Σ_{x∈X⁻_p} e^{α(s(x,p) + δ)}),
    P⁺ (P⁻) the proxies with a positive (a negative) in the batch and z = `normalize`. The
    defaults follow the authors' framework, where the paper's baseline rows were trained; the
    switches give Kim et al.'s version (`normalize=l2_normalize, push_over_all_proxies=True`).
    Proxies start as N(0, 1/d) draws from `generator`."""

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
        x, p = _normalized_inputs(embeddings, labels, self.proxies, self.num_classes, self.normalize, "ProxyAnchor")
        s = p @ x.T  # (C, n): each proxy is an anchor, the batch its references
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
    denominator, −log(e^{ℓ_y} / Σ_c e^{ℓ_c}), averaged over the batch, with z = `normalize` and logits
    ℓ_c = ⟨z(x), z(p_c)⟩/T ("similarity", the authors' code) or −‖z(x) − z(p_c)‖²/T ("squared_distance",
    Teh et al.). On the sphere the second is 2·⟨z(x), z(p_c)⟩/T up to a constant: similarity at T
    equals squared_distance at 2T. The default T = 0.11 is the authors' shipped scale 1/0.11, which
    produced the paper's baseline rows; the supplement rounds it to 0.1 (PAPER.md §7)."""

    LOGITS = ("similarity", "squared_distance")

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.11,
                 generator: Optional[torch.Generator] = None, *,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,  # n(x), the authors' (PAPER.md §7)
                 logits: str = "similarity") -> None:  # ⟨z(x), z(p)⟩/T as the authors' code (PAPER.md §7)
        super().__init__()
        _check_positive("ProxyNCAPlusPlus", num_classes=num_classes, dim=dim, temperature=temperature)
        _check_choice("ProxyNCAPlusPlus", "logits", logits, self.LOGITS)
        self.num_classes, self.temperature, self.normalize, self.logits = num_classes, temperature, normalize, logits
        self.proxies = nn.Parameter(_random_proxies(num_classes, dim, generator))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, p = _normalized_inputs(embeddings, labels, self.proxies, self.num_classes, self.normalize,
                                  "ProxyNCAPlusPlus")
        closeness = x @ p.T if self.logits == "similarity" else -squared_distance(x, p)
        return F.cross_entropy(closeness / self.temperature, labels.long())

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.proxies.shape[1]}, temperature={self.temperature}, "
                f"normalize={_name(self.normalize)}, logits={self.logits}")


class SoftTriple(nn.Module):
    """SoftTriple loss (Qian et al., ICCV 2019) with K centers per class (class-major rows):
    S_c(x) = Σ_k softmax_k(s_ck/γ)·s_ck, s_ck = ⟨z(x), z(w_ck)⟩, z = `normalize`;
    ℓ = cross-entropy of λ·(S_c − δ·[c = y]);
    plus τ · Σ_c Σ_{t<t'} D(w_ct, w_ct') / (C·K·(K − 1)), the regulariser that merges close centers,
    with D = ‖z(w) − z(w')‖ ("normalized", Qian et al.) or √[2 − 2⟨w, w'⟩]₊ on the raw centers ("raw",
    the authors' code: equal to the first for unit centers; where ⟨w, w'⟩ ≥ 1 their gradient is NaN
    and this one takes the subgradient 0, PAPER.md §7)."""

    CENTER_REGULARIZERS = ("normalized", "raw")

    def __init__(self, num_classes: int, dim: int, centers_per_class: int = 10, la: float = 20.0,
                 gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01,
                 generator: Optional[torch.Generator] = None, *,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize,  # n(x), the authors' (PAPER.md §7)
                 center_regularizer: str = "normalized") -> None:  # theirs ("raw") has NaN gradients (PAPER.md §7)
        super().__init__()
        _check_positive("SoftTriple", num_classes=num_classes, dim=dim, centers_per_class=centers_per_class,
                        la=la, gamma=gamma)
        _check_choice("SoftTriple", "center_regularizer", center_regularizer, self.CENTER_REGULARIZERS)
        self.num_classes, self.centers_per_class = num_classes, centers_per_class
        self.la, self.gamma, self.tau, self.margin = la, gamma, tau, margin
        self.normalize, self.center_regularizer = normalize, center_regularizer
        self.proxies = nn.Parameter(_random_proxies(num_classes * centers_per_class, dim, generator))

    def regularizer(self, w: Tensor, raw: Tensor) -> Tensor:
        """Σ_c Σ_{t<t'} D(w_ct, w_ct') / (C·K·(K − 1)) from the normalised centers w and the raw ones
        (both (C·K, d)); 0 when K = 1."""
        C, K = self.num_classes, self.centers_per_class
        if K == 1:
            return w.sum() * 0.0
        if self.center_regularizer == "normalized":
            d = pairwise_distance(w.view(C, K, -1), w.view(C, K, -1))  # (C, K, K)
        else:
            sq = 2 - 2 * raw.view(C, K, -1) @ raw.view(C, K, -1).transpose(1, 2)  # 2 − 2⟨w, w'⟩, (C, K, K)
            d = torch.where(sq > 0, torch.where(sq > 0, sq, 1.0).sqrt(), 0.0)  # subgradient 0 where the root is 0
        return d.triu(diagonal=1).sum() / (C * K * (K - 1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, w = _normalized_inputs(embeddings, labels, self.proxies, self.num_classes, self.normalize, "SoftTriple")
        s = (x @ w.T).view(len(x), self.num_classes, self.centers_per_class)
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

    `forward` compares the batch with the memory as it was before the batch (so no embedding meets
    its own copy) and then enqueues the batch; `enqueue` only stores. `scheduled_loss` is one
    training step under the schedule of PAPER.md §4: nothing for the first `start` batches, then the
    memory fills without a loss, and once it is full its loss is on. The queue, its pointer, its fill
    count and the batches seen are buffers, so `state_dict()` carries them.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], dim: int, memory_size: int,
                 normalize: Callable[[Tensor], Tensor] = lipschitz_normalize, start: int = 0,
                 **loss_params: float) -> None:
        super().__init__()
        _check_positive("CrossBatchMemory", dim=dim, memory_size=memory_size)
        if start < 0:
            raise ValueError(f"CrossBatchMemory: start must be >= 0 batches, got {start}")
        _check_loss_params(loss_fn, loss_params, "CrossBatchMemory")
        self.loss_fn, self.normalize, self.start, self.loss_params = loss_fn, normalize, start, loss_params
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
        z = self.normalize(embeddings)
        filled = len(self)
        if filled == 0:
            _check_embeddings(z, labels, "CrossBatchMemory")
            loss = z.new_zeros(()) + 0.0 * z.sum()  # a zero tied to the graph: backward() works on an empty memory
        else:
            # a copy: the enqueue below overwrites rows that backward still needs
            memory = self.memory[:filled].clone()
            loss = self.loss_fn(z, labels, memory, self.memory_labels[:filled].clone(), **self.loss_params)
        self._push(z.detach(), labels)
        return loss

    def scheduled_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The memory's term for one training batch: 0 before `start` batches have passed and while
        the memory fills, then forward() (PAPER.md §4: the term is switched on once the memory is full)."""
        seen = int(self.batches_seen)
        self.batches_seen.add_(1)
        if seen >= self.start and self.is_full:
            return self(embeddings, labels)
        if seen >= self.start:
            self.enqueue(embeddings.detach(), labels)
        return embeddings.new_zeros(())

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store n(embeddings) and labels without computing a loss."""
        self._push(self.normalize(embeddings), labels)

    def _push(self, z: Tensor, labels: Tensor) -> None:
        _check_embeddings(z, labels, "CrossBatchMemory.enqueue")
        _check_same_space(z, self.memory, "CrossBatchMemory.enqueue", "the memory")
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
                f"normalize={_name(self.normalize)}, start={self.start}{params}")
