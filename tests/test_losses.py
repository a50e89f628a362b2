"""Tests for losses.py: every loss against a loop-based reference written here (plain Python floats),
edge cases, float64 gradchecks, the CCP objective against its definition, XBM's queue, the baselines."""
import math

import pytest
import torch

import losses

# --------------------------------------------------------------------------- loop references (plain floats)


def ref_dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def ref_dist(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def ref_unit(u):
    norm = math.sqrt(ref_dot(u, u))
    return [a / norm for a in u]


def ref_lipschitz(u):
    """n(u) = u / max(1, ‖u‖) (PAPER.md §3)."""
    return [a / max(1.0, math.sqrt(ref_dot(u, u))) for a in u]


def ref_mean_nonzero(terms):
    positive = [t for t in terms if t > 0]
    return sum(positive) / len(positive) if positive else 0.0


def ref_neighbours(x, y, ref, ref_y):
    """Per anchor i: the lists of positive and negative reference vectors (self excluded in pair form)."""
    X, Y = x.tolist(), y.tolist()
    pair_form = ref is None
    R, RY = (X, Y) if pair_form else (ref.tolist(), ref_y.tolist())
    out = []
    for i in range(len(X)):
        pos = [R[j] for j in range(len(R)) if RY[j] == Y[i] and not (pair_form and j == i)]
        neg = [R[j] for j in range(len(R)) if RY[j] != Y[i]]
        out.append((X[i], pos, neg))
    return out


def ref_c1(x, y, ref=None, ref_y=None, margin=0.5):
    total = 0.0
    for a, pos, neg in ref_neighbours(x, y, ref, ref_y):
        total += sum(1 - ref_dot(a, p) for p in pos) + sum(max(0.0, ref_dot(a, q) - margin) for q in neg)
    return total / len(x)


def ref_c2(x, y, ref=None, ref_y=None, pos_margin=0.0, neg_margin=0.5):
    pulls, pushes = [], []
    for a, pos, neg in ref_neighbours(x, y, ref, ref_y):
        pulls += [max(0.0, ref_dist(a, p) - pos_margin) for p in pos]
        pushes += [max(0.0, neg_margin - ref_dist(a, q)) for q in neg]
    return ref_mean_nonzero(pulls) + ref_mean_nonzero(pushes)


def ref_triplet(x, y, ref=None, ref_y=None, margin=0.1):
    terms = []
    for a, pos, neg in ref_neighbours(x, y, ref, ref_y):
        for p in pos:
            for q in neg:
                terms.append(max(0.0, ref_dist(a, p) - ref_dist(a, q) + margin))
    return ref_mean_nonzero(terms)


def ref_ms(x, y, ref=None, ref_y=None, alpha=2.0, beta=40.0, base=0.5):
    total = 0.0
    for a, pos, neg in ref_neighbours(x, y, ref, ref_y):
        pull = math.log(1 + sum(math.exp(-alpha * (ref_dot(a, p) - base)) for p in pos)) / alpha
        push = math.log(1 + sum(math.exp(beta * (ref_dot(a, q) - base)) for q in neg)) / beta
        total += pull + push
    return total / len(x)


REFERENCES = {"c1": ref_c1, "c2": ref_c2, "triplet": ref_triplet, "ms": ref_ms}
PARAMS = {"c1": [{}, {"margin": 0.1}], "c2": [{}, {"pos_margin": 0.2652, "neg_margin": 0.5409}],
          "triplet": [{}, {"margin": 0.3}], "ms": [{}, {"alpha": 14.35, "beta": 75.83, "base": 0.66}]}

# --------------------------------------------------------------------------- data


def unit_ball(n, d, seed, dtype=torch.float64):
    """Rows with norms spread inside the unit ball and on the sphere, like n(x)."""
    g = torch.Generator().manual_seed(seed)
    x = losses.l2_normalize(torch.randn(n, d, generator=g, dtype=dtype))
    radius = torch.rand(n, 1, generator=g, dtype=dtype) * 0.8 + 0.2
    return torch.where(torch.rand(n, 1, generator=g, dtype=dtype) < 0.5, x, x * radius)


# variable numbers of positives per anchor, including a class with a single sample
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 1])
REF_LABELS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 0, 4, 4, 1, 3])


def close(value, expected, tol=1e-10):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else value
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=tol, abs=tol)

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name, reference", [("lipschitz", ref_lipschitz), ("l2", ref_unit)])
def test_normalizations_match_reference(name, reference):
    # rows inside the ball, outside it and on the sphere
    norms = torch.tensor([0.2, 0.7, 1.0, 1.5, 3.0, 10.0], dtype=torch.float64)[:, None]
    x = losses.l2_normalize(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))) * norms
    for row, orig in zip(losses.NORMALIZATIONS[name](x).tolist(), x.tolist()):
        assert row == pytest.approx(reference(orig), rel=1e-12)


def test_lipschitz_normalize_at_zero_and_on_the_sphere_has_the_identity_gradient():
    # the authors' mask is ‖x‖ > 1 (PAPER.md §3): at 0 and on the sphere itself the Jacobian is I
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(losses.lipschitz_normalize, x)
    assert torch.equal(jacobian, torch.eye(9, dtype=torch.float64).view(3, 3, 3, 3))


def test_normalizations_gradcheck_inside_and_outside_the_ball():
    # norms 0.3–0.8 and 1.3–1.8: away from the sphere, where n is not differentiable
    scale = torch.tensor([0.3, 1.3, 0.8, 1.8], dtype=torch.float64)[:, None]
    x = (losses.l2_normalize(torch.randn(4, 3, dtype=torch.float64)) * scale).requires_grad_()
    for fn in losses.NORMALIZATIONS.values():
        assert torch.autograd.gradcheck(fn, (x,))


def test_lipschitz_normalize_backward_matches_autograd_of_the_formula():
    # the hand-written backward against autograd through x / max(1, ‖x‖), on norms 0.1–3
    x = torch.randn(50, 7, dtype=torch.float64) * torch.linspace(0.1, 3, 50, dtype=torch.float64)[:, None]
    g = torch.randn(50, 7, dtype=torch.float64)
    norm = x.requires_grad_().norm(dim=1, keepdim=True)
    expected = torch.autograd.grad(x / torch.where(norm > 1, norm, 1.0), x, g)[0]
    actual = torch.autograd.grad(losses.lipschitz_normalize(x), x, g)[0]
    assert torch.allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_lipschitz_normalize_refuses_a_second_derivative_it_would_get_wrong():
    # the hand-written backward is first order only: a Hessian-vector product must fail, not be wrong
    x = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_()
    (grad,) = torch.autograd.grad(losses.lipschitz_normalize(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_pairwise_distance_exact_zero_for_duplicates():
    a = unit_ball(6, 128, 0, torch.float32)
    d = losses.pairwise_distance(a, a[[3, 0, 5]])
    for i in range(6):
        for j, k in enumerate([3, 0, 5]):
            expected = ref_dist(a[i].double().tolist(), a[k].double().tolist())
            assert float(d[i, j]) == (0.0 if i == k else pytest.approx(expected, rel=1e-5))

# --------------------------------------------------------------------------- the four losses vs references


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("form", ["pair", "proxy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_loop_reference(name, form, seed):
    x = unit_ball(len(LABELS), 5, seed)
    ref, ref_y = (None, None) if form == "pair" else (unit_ball(len(REF_LABELS), 5, seed + 100), REF_LABELS)
    for params in PARAMS[name]:
        value = losses.LOSSES[name](x, LABELS, ref, ref_y, **params)
        assert value.dtype == torch.float64 and value.shape == ()
        close(value, REFERENCES[name](x, LABELS, ref, ref_y, **params))


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_proxy_form_with_class_major_proxies(name):
    proxies = losses.Proxies(6, 3, 5, generator=torch.Generator().manual_seed(3)).double()
    x = unit_ball(len(LABELS), 5, 4)
    p = losses.lipschitz_normalize(proxies.weight.detach())
    close(losses.LOSSES[name](x, LABELS, p, proxies.labels), REFERENCES[name](x, LABELS, p, proxies.labels))


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("labels", [torch.zeros(7, dtype=torch.long), torch.arange(7)],
                         ids=["single_class", "all_distinct"])
def test_batches_without_positives_or_negatives(name, labels):
    x = unit_ball(7, 4, 5).requires_grad_()
    value = losses.LOSSES[name](x, labels)
    close(value, REFERENCES[name](x.detach(), labels))
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_satisfied_pairs_give_zero():
    # two classes on orthogonal axes, each class a tight cluster: every constraint is met
    x = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(losses.c2_contrastive(x, y, pos_margin=0.1, neg_margin=0.5)) == 0.0
    assert float(losses.triplet(x, y, margin=0.5)) == 0.0
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(losses.c1_contrastive(same, y, margin=0.5)) == 0.0
    assert float(losses.c1_contrastive(same, y, same, y)) == 0.0


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_points(name, dtype):
    x = unit_ball(8, 16, 6, dtype)[[0, 1, 2, 0, 3, 4, 5, 5]].requires_grad_()
    y = torch.tensor([0, 0, 1, 0, 1, 2, 2, 2])
    params = {"c2": {"pos_margin": 0.0}}.get(name, {})
    value = losses.LOSSES[name](x, y, **params)
    # duplicates are at distance exactly 0: with m⁺ = 0 their C2 term is zero and not counted
    close(value, REFERENCES[name](x.detach().double(), y, **params), tol=1e-5)
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("form", ["pair", "proxy"])
def test_gradcheck_losses_through_n(name, form):
    n = losses.lipschitz_normalize
    g = torch.Generator().manual_seed(7)
    # raw rows with norms 0.3–0.8 and 1.3–1.8: away from the sphere where n is not differentiable
    scale = torch.tensor([0.3, 1.3, 0.6, 1.6, 0.8, 1.8, 0.5, 1.5]).double()[:, None]
    x = losses.l2_normalize(torch.randn(8, 4, generator=g, dtype=torch.float64)) * scale
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    params = {"ms": {"alpha": 2.0, "beta": 10.0}}.get(name, {})
    fn = losses.LOSSES[name]
    if form == "pair":
        assert torch.autograd.gradcheck(lambda a: fn(n(a), y, **params), (x.requires_grad_(),))
    else:
        p = losses.l2_normalize(torch.randn(8, 4, generator=g, dtype=torch.float64)) * scale.flip(0)
        py = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        assert torch.autograd.gradcheck(lambda a, b: fn(n(a), y, n(b), py, **params),
                                        (x.requires_grad_(), p.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_alpha_beta_stay_finite(dtype):
    x = unit_ball(10, 8, 8)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    expected = ref_ms(x, y, alpha=100.0, beta=1000.0, base=0.5)
    value = losses.multi_similarity(x.to(dtype).requires_grad_(), y, alpha=100.0, beta=1000.0)
    assert value.dtype == dtype
    close(value, expected, tol=1e-2 if dtype == torch.float16 else 1e-5)
    pa = losses.ProxyAnchor(5, 8, alpha=1000.0).to(dtype)
    assert torch.isfinite(pa(x.to(dtype), y))


def test_triplet_proxy_form_does_not_build_n_m_m():
    n, classes, per_class, d = 4, 250, 4, 8
    g = torch.Generator().manual_seed(9)
    x = losses.l2_normalize(torch.randn(n, d, generator=g)).requires_grad_()
    p = losses.l2_normalize(torch.randn(classes * per_class, d, generator=g))
    p_y = torch.arange(classes).repeat_interleave(per_class)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses.triplet(x, torch.tensor([0, 1, 2, 2]), p, p_y).backward()
    m = classes * per_class
    assert max(largest) <= n * per_class * m < n * m * m // 100


def test_positive_slots_list_each_rows_positives_in_order():
    pos = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = losses._positive_slots(pos)
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert index[valid].tolist() == [1, 3, 4, 0]
    assert 0 <= index.min() and index.max() < pos.shape[1]  # empty slots too: every slot can be gathered

# --------------------------------------------------------------------------- proxies and CCPLoss


def test_proxies_layout_init_and_reset():
    proxies = losses.Proxies(5, 3, 64, generator=torch.Generator().manual_seed(0))
    assert proxies.weight.shape == (15, 64)
    assert proxies.labels.tolist() == [c for c in range(5) for _ in range(3)]
    again = losses.Proxies(5, 3, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(proxies.weight, again.weight)
    assert 0.8 < float(proxies.weight.detach().std() * math.sqrt(64)) < 1.2  # N(0, 1/d)

    parameter = proxies.weight  # the optimiser's state is keyed by this object: reset must keep it
    new = torch.randn(5, 3, 64)
    proxies.reset(new)
    assert proxies.weight is parameter and torch.equal(proxies.weight.detach(), new.view(15, 64))
    proxies.reset(new.view(15, 64) * 2)
    assert proxies.weight is parameter and torch.equal(proxies.weight.detach(), new.view(15, 64) * 2)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_ccp_loss_matches_its_definition(name):
    proxies = losses.Proxies(5, 2, 6, generator=torch.Generator().manual_seed(1)).double()
    params = PARAMS[name][1]
    ccp = losses.CCPLoss(losses.LOSSES[name], proxies, pair_weight=0.3, proxy_weight=0.7, **params)
    raw = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    y = torch.tensor([0, 0, 1, 1, 3, 3, 4, 4])
    z, p = losses.lipschitz_normalize(raw), losses.lipschitz_normalize(proxies.weight.detach())
    pair, proxy = REFERENCES[name](z, y, **params), REFERENCES[name](z, y, p, proxies.labels, **params)
    close(ccp(raw, y), 0.3 * pair + 0.7 * proxy)
    terms = ccp.terms(raw, y)
    close(terms[0], pair)
    close(terms[1], proxy)
    ccp(raw, y).backward()
    assert proxies.weight.grad is not None and proxies.weight.grad.abs().sum() > 0
    assert "proxies.weight" in ccp.state_dict()

    l2 = losses.CCPLoss(losses.LOSSES[name], proxies, normalize=losses.l2_normalize, **params)
    z, p = losses.l2_normalize(raw), losses.l2_normalize(proxies.weight.detach())
    close(l2(raw, y), 0.1 * REFERENCES[name](z, y, **params) + REFERENCES[name](z, y, p, proxies.labels, **params))

# --------------------------------------------------------------------------- cross-batch memory


@pytest.mark.parametrize("include_batch", [True, False])
def test_xbm_meets_its_own_batch_or_only_earlier_ones(include_batch):
    # include_batch (default, the authors'): the batch is stored first and meets its own copy;
    # False: the batch meets the memory as it was, and is stored after its loss
    xbm = losses.CrossBatchMemory(losses.c2_contrastive, 4, 10, include_batch=include_batch, neg_margin=0.9).double()
    g = torch.Generator().manual_seed(12)
    x1, x2 = (torch.randn(4, 4, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    y1, y2 = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 2, 0])
    n1, n2 = losses.lipschitz_normalize(x1), losses.lipschitz_normalize(x2)
    first = xbm(x1.clone().requires_grad_(), y1)
    close(first, ref_c2(n1, y1, n1, y1, neg_margin=0.9) if include_batch else 0.0)
    first.backward()
    assert len(xbm) == 4 and not xbm.is_full and bool(xbm)
    assert torch.equal(xbm.memory[:4], n1) and not xbm.memory.requires_grad

    second = xbm(x2.requires_grad_(), y2)
    memory, memory_y = (torch.cat([n1, n2.detach()]), torch.cat([y1, y2])) if include_batch else (n1, y1)
    close(second, ref_c2(n2, y2, memory, memory_y, neg_margin=0.9))
    second.backward()  # the enqueue (before or after the loss) must not break backward
    assert x2.grad.abs().sum() > 0 and len(xbm) == 8


@pytest.mark.parametrize("include_batch", [True, False])
def test_xbm_schedule_waits_fills_then_switches_its_loss_on(include_batch):
    """scheduled_loss (PAPER.md §4): zero for `start` batches (nothing stored), zero while the memory
    fills, then the loss against the full memory the batch meets (with its own copy, or without)."""
    xbm = losses.CrossBatchMemory(losses.c2_contrastive, 3, 4, start=2, include_batch=include_batch,
                                  neg_margin=0.9).double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1])) for _ in range(5)]
    on = 3 if include_batch else 4  # batches 0-1 wait, 2-3 fill the 4 rows
    values = [float(xbm.scheduled_loss(x, y)) for x, y in batches[:on]]
    assert values == [0.0] * on
    stored = torch.cat([losses.lipschitz_normalize(x) for x, _ in batches[2:4]])  # what batch `on` meets
    x, y = batches[on]
    expected = ref_c2(losses.lipschitz_normalize(x), y, stored, torch.tensor([0, 1, 0, 1]), neg_margin=0.9)
    close(xbm.scheduled_loss(x, y), expected)
    assert int(xbm.batches_seen) == on + 1


def ring_reference(batches, size):
    """The memory contents (row order ignored) after pushing batches through a FIFO of `size` rows."""
    rows = [(tuple(r), int(l)) for z, y in batches for r, l in zip(z.tolist(), y.tolist())]
    return sorted(rows[-size:])


def test_xbm_wrap_around_and_state_dict_round_trip():
    xbm = losses.CrossBatchMemory(losses.multi_similarity, 3, 5, include_batch=False)
    g = torch.Generator().manual_seed(13)
    batches = []
    for step, batch in enumerate([3, 3, 4, 7, 2]):
        x = torch.randn(batch, 3, generator=g)
        y = torch.randint(0, 3, (batch,), generator=g)
        xbm.enqueue(x, y)
        batches.append((losses.lipschitz_normalize(x), y))
        stored = sorted((tuple(r), int(l)) for r, l in zip(xbm.memory[:len(xbm)].tolist(),
                                                           xbm.memory_labels[:len(xbm)].tolist()))
        assert stored == ring_reference(batches, 5)
        assert len(xbm) == min(5, sum(len(b[1]) for b in batches))
    assert xbm.is_full and int(xbm.pointer) == (3 + 3 + 4 + 5 + 2) % 5

    x, y = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0])
    restored = losses.CrossBatchMemory(losses.multi_similarity, 3, 5, include_batch=False)
    restored.load_state_dict(xbm.state_dict())
    assert set(xbm.state_dict()) == {"memory", "memory_labels", "pointer", "count", "batches_seen"}
    memory = [(torch.tensor([r for r, _ in ring_reference(batches, 5)]),
               torch.tensor([l for _, l in ring_reference(batches, 5)]))]
    expected = ref_ms(losses.lipschitz_normalize(x).double(), y, memory[0][0].double(), memory[0][1])
    close(xbm(x, y), expected, tol=1e-5)
    close(restored(x, y), expected, tol=1e-5)
    assert torch.equal(xbm.memory, restored.memory) and int(xbm.pointer) == int(restored.pointer)

# --------------------------------------------------------------------------- baselines


# the baselines' normalisations: the default n(x) (the authors' framework, PAPER.md §7) and x/‖x‖
BASELINE_NORMALIZE = {"lipschitz": (losses.lipschitz_normalize, ref_lipschitz), "l2": (losses.l2_normalize, ref_unit)}


def ref_proxy_anchor(x, y, proxies, margin, alpha, unit, push_over_all_proxies):
    X, P, Y = [unit(r) for r in x.tolist()], [unit(r) for r in proxies.tolist()], y.tolist()
    pull, with_positive, push, with_negative = 0.0, 0, 0.0, 0
    for c, p in enumerate(P):
        pos = [ref_dot(a, p) for a, label in zip(X, Y) if label == c]
        neg = [ref_dot(a, p) for a, label in zip(X, Y) if label != c]
        if pos:
            with_positive += 1
            pull += math.log(1 + sum(math.exp(-alpha * (s - margin)) for s in pos))
        with_negative += bool(neg)
        push += math.log(1 + sum(math.exp(alpha * (s + margin)) for s in neg))
    return pull / with_positive + push / (len(P) if push_over_all_proxies else with_negative)


def ref_proxy_nca(x, y, proxies, temperature, unit, logits):
    X, P = [unit(r) for r in x.tolist()], [unit(r) for r in proxies.tolist()]
    total = 0.0
    for a, label in zip(X, y.tolist()):
        if logits == "similarity":
            scores = [ref_dot(a, p) / temperature for p in P]
        else:
            scores = [-ref_dist(a, p) ** 2 / temperature for p in P]
        total += -scores[label] + math.log(sum(math.exp(v) for v in scores))
    return total / len(X)


def ref_soft_triple(x, y, centers, C, K, la, gamma, tau, margin, unit, center_regularizer):
    X, W, raw = [unit(r) for r in x.tolist()], [unit(r) for r in centers.tolist()], centers.tolist()
    total = 0.0
    for a, label in zip(X, y.tolist()):
        logits = []
        for c in range(C):
            s = [ref_dot(a, W[c * K + k]) for k in range(K)]
            weights = [math.exp(v / gamma) for v in s]
            S = sum(w * v for w, v in zip(weights, s)) / sum(weights)
            logits.append(la * (S - (margin if c == label else 0.0)))
        total += -logits[label] + math.log(sum(math.exp(v) for v in logits))

    def D(i, j):
        if center_regularizer == "normalized":
            return ref_dist(W[i], W[j])
        return math.sqrt(max(0.0, 2 - 2 * ref_dot(raw[i], raw[j])))
    reg = sum(D(c * K + t, c * K + u) for c in range(C) for t in range(K) for u in range(t + 1, K))
    return total / len(X) + (tau * reg / (C * K * (K - 1)) if K > 1 else 0.0)


def baseline_data(seed):
    # rows inside the unit ball and outside it, so that n(x) and x/‖x‖ differ
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0, 0.2, 3.0, 0.3, 2.0, 0.1, 3.0], dtype=torch.float64)[:, None]
    return torch.randn(7, 5, generator=g, dtype=torch.float64) * scale, torch.tensor([0, 0, 2, 2, 3, 1, 1])


def check_baseline(loss, x, y, expected, gradcheck):
    close(loss(x, y), expected)
    if gradcheck:  # fast mode: random directional derivatives (test_golden.py compares full gradients)
        assert torch.autograd.gradcheck(lambda a, p: torch.func.functional_call(loss, {"proxies": p}, (a, y)),
                                        (x.requires_grad_(), loss.proxies.detach().clone().requires_grad_()),
                                        fast_mode=True)


# each baseline in its default settings (the authors' framework, PAPER.md §7: no switch passed) and in its
# own paper's; the gradient is checked once per setting
@pytest.mark.parametrize("normalize, push_over_all_proxies", [("lipschitz", False), ("l2", True)])
@pytest.mark.parametrize("margin, alpha, one_class", [(0.1, 32.0, False), (0.0, 4.0, False), (0.1, 32.0, True)])
def test_proxy_anchor_matches_reference(margin, alpha, one_class, normalize, push_over_all_proxies):
    x, y = baseline_data(14)
    if one_class:  # the batch's class has no negative: the push counts differ (5 proxies or 6)
        y = torch.full_like(y, 2)
    fn, unit = BASELINE_NORMALIZE[normalize]
    switches = {} if normalize == "lipschitz" else {"normalize": fn, "push_over_all_proxies": True}
    loss = losses.ProxyAnchor(6, 5, margin=margin, alpha=alpha, generator=torch.Generator().manual_seed(0),
                              **switches).double()
    assert [name for name, _ in loss.named_parameters()] == ["proxies"] and loss.proxies.shape == (6, 5)
    expected = ref_proxy_anchor(x, y, loss.proxies.detach(), margin, alpha, unit, push_over_all_proxies)
    check_baseline(loss, x, y, expected, gradcheck=alpha == 4.0)


@pytest.mark.parametrize("normalize, logits", [("lipschitz", "similarity"), ("l2", "squared_distance")])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_proxy_nca_plus_plus_matches_reference(temperature, normalize, logits):
    x, y = baseline_data(15)
    fn, unit = BASELINE_NORMALIZE[normalize]
    switches = {} if normalize == "lipschitz" else {"normalize": fn, "logits": logits}
    loss = losses.ProxyNCAPlusPlus(4, 5, **({} if temperature is None else {"temperature": temperature}),
                                   **switches).double()
    assert [name for name, _ in loss.named_parameters()] == ["proxies"] and loss.proxies.shape == (4, 5)
    expected = ref_proxy_nca(x, y, loss.proxies.detach(), temperature or 0.11, unit, logits)
    check_baseline(loss, x, y, expected, gradcheck=temperature is None)


@pytest.mark.parametrize("normalize, center_regularizer", [("lipschitz", "normalized"), ("l2", "raw")])
@pytest.mark.parametrize("K, la, gamma, tau, margin", [(3, 20.0, 0.1, 0.2, 0.01), (1, 17.69, 19.18, 0.0669, 0.3588),
                                                       (2, 100.0, 47.9, 0.2, 0.3145)])
def test_soft_triple_matches_reference(K, la, gamma, tau, margin, normalize, center_regularizer):
    x, y = baseline_data(16)
    fn, unit = BASELINE_NORMALIZE[normalize]
    switches = {} if normalize == "lipschitz" else {"normalize": fn, "center_regularizer": center_regularizer}
    loss = losses.SoftTriple(4, 5, centers_per_class=K, la=la, gamma=gamma, tau=tau, margin=margin, **switches).double()
    assert [name for name, _ in loss.named_parameters()] == ["proxies"] and loss.proxies.shape == (4 * K, 5)
    expected = ref_soft_triple(x, y, loss.proxies.detach(), 4, K, la, gamma, tau, margin, unit, center_regularizer)
    check_baseline(loss, x, y, expected, gradcheck=K == 3)


def test_soft_triple_raw_regularizer_stays_finite_where_the_authors_is_nan():
    # two centers of a class with ⟨w, w'⟩ > 1: the root's argument 2 − 2⟨w, w'⟩ is clamped at 0
    loss = losses.SoftTriple(2, 3, centers_per_class=2, center_regularizer="raw").double()
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[1.2, 0, 0], [1.1, 0.1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    loss(x, y).backward()
    assert torch.isfinite(loss.proxies.grad).all()
    with torch.no_grad():
        assert float(loss.regularizer(loss.normalize(loss.proxies), loss.proxies)) == pytest.approx(2 ** 0.5 / 4)

# --------------------------------------------------------------------------- bad input: one test per kind of error


def raises_one_line(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


X4, Y4 = unit_ball(4, 3, 10), torch.tensor([0, 0, 1, 1])
MALFORMED = {  # a call of a loss ℓ(x, y, ref, ref_y) -> the message it must raise
    "short labels": (lambda fn: fn(X4, Y4[:3]), r"the labels of embeddings as a 1-D integer tensor of length 4"),
    "float labels": (lambda fn: fn(X4, Y4.double()), "1-D integer tensor"),
    "1-D embeddings": (lambda fn: fn(X4[0], Y4), "2-D floating tensor"),
    "no rows": (lambda fn: fn(X4[:0], Y4[:0]), "non-empty"),
    "references of another dimension": (lambda fn: fn(X4, Y4, unit_ball(4, 5, 11), Y4),
                                        r"references in the dimension.*\(4, 3\).*got a tensor of shape \(4, 5\)"),
    "references of another dtype": (lambda fn: fn(X4, Y4, X4.float(), Y4), r"float64.*got.*float32"),
    "ref without ref_y": (lambda fn: fn(X4, Y4, X4), "ref and ref_y together or neither, got only ref"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_malformed_tensors_raise(name, case):
    call, match = MALFORMED[case]
    raises_one_line(lambda: call(losses.LOSSES[name]), rf"^{losses.LOSSES[name].__name__}: expected .*{match}")


def test_malformed_tensors_raise_in_the_modules():
    for loss in (losses.ProxyAnchor(3, 4), losses.ProxyNCAPlusPlus(3, 4), losses.SoftTriple(3, 4),
                 losses.CCPLoss(losses.triplet, losses.Proxies(3, 2, 4))):
        raises_one_line(lambda: loss(torch.randn(2, 5), torch.tensor([0, 1])),
                        r"^\w+: expected embeddings in the dimension, dtype and device of the proxies")
    xbm = losses.CrossBatchMemory(losses.c1_contrastive, 4, 8)
    raises_one_line(lambda: xbm(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])),
                    r"^CrossBatchMemory: expected embeddings in the dimension, dtype and device of the memory")
    raises_one_line(lambda: xbm.enqueue(torch.randn(2, 4), torch.tensor([0, 1, 2])),
                    r"^CrossBatchMemory.enqueue: .*length 2")
    xbm.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))
    raises_one_line(lambda: xbm(torch.randn(3, 5), torch.tensor([0, 1, 1])), r"got a tensor of shape \(3, 5\)")
    assert len(xbm) == 2  # nothing stored by the refused calls
    proxies = losses.Proxies(5, 3, 64)
    raises_one_line(lambda: proxies.reset(torch.zeros(15, 63)), r"^Proxies.reset: .*shape \(15, 64\) or \(5, 3, 64\)")


def with_bad_rows(x):
    bad = x.clone()
    bad[1, 0], bad[3, 2] = float("nan"), float("inf")
    return bad


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_non_finite_rows_raise(name):
    fn = losses.LOSSES[name]
    raises_one_line(lambda: fn(with_bad_rows(X4), Y4),
                    r"finite embeddings, got 2 row\(s\) of 4 with NaN or inf \(first: row 1\)")
    raises_one_line(lambda: fn(X4, Y4, with_bad_rows(X4), Y4), r"finite references, got 2 row\(s\)")
    huge = torch.full((4, 3), 6e4, dtype=torch.float16)  # finite rows whose float16 sum overflows: no error
    assert fn(huge, Y4).dtype == torch.float16


def test_non_finite_rows_raise_in_the_modules():
    nan = torch.full((2, 4), float("nan"))
    for loss in (losses.ProxyAnchor(3, 4), losses.ProxyNCAPlusPlus(3, 4), losses.SoftTriple(3, 4),
                 losses.CrossBatchMemory(losses.c1_contrastive, 4, 8),
                 losses.CCPLoss(losses.c1_contrastive, losses.Proxies(3, 2, 4))):
        raises_one_line(lambda: loss(nan, torch.tensor([0, 1])), r"finite embeddings, got 2 row\(s\) of 2")
    raises_one_line(lambda: losses.Proxies(5, 3, 64).reset(torch.full((15, 64), float("nan"))),
                    "Proxies.reset: expected finite new proxies")


@pytest.mark.parametrize("make", [lambda: losses.ProxyAnchor(3, 4), lambda: losses.ProxyNCAPlusPlus(3, 4),
                                  lambda: losses.SoftTriple(3, 4, centers_per_class=2),
                                  lambda: losses.CCPLoss(losses.triplet, losses.Proxies(3, 2, 4))])
def test_labels_out_of_range_raise(make):
    raises_one_line(lambda: make()(torch.randn(4, 4), torch.tensor([0, 1, 2, 3])),
                    r"expected labels in \[0, 3\), got values from 0 to 3")


@pytest.mark.parametrize("make, match", [
    (lambda: losses.Proxies(5, 0, 64), r"^Proxies: expected per_class > 0, got 0"),
    (lambda: losses.CCPLoss(losses.triplet, losses.Proxies(3, 2, 4), marg=0.1),
     r"^CCPLoss: expected parameters of triplet among \['margin'\], got \['marg'\]"),
    (lambda: losses.CCPLoss(losses.triplet, torch.randn(6, 4)), "^CCPLoss: expected proxies as a Proxies module"),
    (lambda: losses.CrossBatchMemory(losses.c1_contrastive, 4, 0), "memory_size > 0"),
    (lambda: losses.CrossBatchMemory(losses.c1_contrastive, 4, 8, alpha=2.0), "parameters of c1_contrastive"),
    (lambda: losses.CrossBatchMemory(losses.c2_contrastive, 3, 4, start=-1), "start >= 0"),
    (lambda: losses.ProxyAnchor(3, 4, alpha=0.0), "^ProxyAnchor: expected alpha > 0"),
    (lambda: losses.ProxyNCAPlusPlus(3, 4, logits="cosine"), "logits to be one of .*got 'cosine'"),
    (lambda: losses.SoftTriple(3, 4, center_regularizer="unit"), "center_regularizer to be one of"),
    (lambda: losses.multi_similarity(X4, Y4, beta=-1.0), r"^multi_similarity: expected beta > 0, got -1.0"),
])
def test_bad_settings_raise(make, match):
    raises_one_line(make, match)
