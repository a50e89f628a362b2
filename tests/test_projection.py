"""projection.py: the proximal pull (values, exact gradients) and the controllers (PAPER.md §2)."""
import json
import math

import pytest
import torch

from projection import AlternatingProjections, EarlyStopping, ProximalAnchor

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def make_params(seed, dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def move(params, seed, scale=0.1):
    """Take an 'optimiser step': perturb the parameters in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------
# ProximalAnchor


def test_penalty_value_matches_loops():
    params = make_params(0)
    pull = ProximalAnchor(params)
    before = [p.detach().clone() for p in params]
    move(params, 1)
    squared = 0.0
    for p, a in zip(params, before):
        for x, y in zip(p.detach().flatten().tolist(), a.flatten().tolist()):
            squared += (x - y) ** 2
    assert pull.penalty(0.37).item() == pytest.approx(0.37 / 2 * squared, rel=1e-12)
    assert pull.penalty(0.0).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [2e-4, 0.37, 3.0])
def test_penalty_gradient_is_exactly_lam_times_difference(dtype, lam):
    params = make_params(2, dtype)
    pull = ProximalAnchor(params)
    theta_anchor = [p.detach().clone() for p in params]
    move(params, 3)
    pull.penalty(lam).backward()
    for p, a in zip(params, theta_anchor):
        assert torch.equal(p.grad, lam * (p.detach() - a))


def test_penalty_gradcheck():
    params = make_params(4)
    pull = ProximalAnchor(params)
    move(params, 5)
    # gradcheck perturbs the given tensors in place, which are the anchored parameters themselves
    assert torch.autograd.gradcheck(lambda *ps: pull.penalty(0.7), params)


def loss_of(params):
    # each parameter used once, so its gradient is loss term + pull term: two summands, whose float
    # sum does not depend on the order autograd accumulates them in, so equality can be exact
    return sum(p.sin().sum() for p in params)


@pytest.mark.parametrize("lam", [2e-4, 0.37])
def test_add_to_grad_equals_autograd_of_penalty(lam):
    # big enough that rounding λθ − λθ_anchor instead of λ(θ − θ_anchor) would show
    shapes = [(64, 33), (100,)]
    via_autograd, via_hook = make_params(6, shapes=shapes), make_params(6, shapes=shapes)
    anchors = []
    for params in (via_autograd, via_hook):
        anchors.append(ProximalAnchor(params))
        move(params, 7)
    (loss_of(via_autograd) + anchors[0].penalty(lam)).backward()
    loss_of(via_hook).backward()
    anchors[1].add_to_grad(lam)
    for p, q in zip(via_autograd, via_hook):
        assert torch.equal(p.grad, q.grad)


def test_add_to_grad_creates_missing_grads_and_lam_zero_is_a_no_op():
    params, reference = make_params(8), make_params(8)
    pulls = [ProximalAnchor(params), ProximalAnchor(reference)]
    for ps, pull in zip((params, reference), pulls):
        move(ps, 9)
    pulls[0].add_to_grad(0.0)
    assert all(p.grad is None for p in params)
    pulls[0].add_to_grad(0.25)
    pulls[1].penalty(0.25).backward()
    for p, q in zip(params, reference):
        assert torch.equal(p.grad, q.grad)
    kept = [p.grad.clone() for p in params]
    pulls[0].add_to_grad(0)
    assert all(torch.equal(p.grad, k) for p, k in zip(params, kept))


def test_anchor_copies_values_into_preallocated_buffers():
    params = make_params(10, torch.float32)
    pull = ProximalAnchor(params)
    buffers = [a.data_ptr() for a in pull.anchors]
    assert all(not a.requires_grad and a.dtype == torch.float32 for a in pull.anchors)
    move(params, 11)  # the anchor is a copy, not a view of the parameters
    assert not torch.equal(pull.anchors[0], params[0].detach())
    snapshot = [torch.randn(s, dtype=torch.float64) for s in SHAPES]  # e.g. θ* kept in host memory
    pull.anchor(snapshot)
    assert [a.data_ptr() for a in pull.anchors] == buffers
    for a, s in zip(pull.anchors, snapshot):
        assert a.dtype == torch.float32 and torch.equal(a, s.to(torch.float32))
    snapshot[0].add_(1.0)
    assert not torch.equal(pull.anchors[0], snapshot[0].to(torch.float32))


@pytest.mark.parametrize("params", [[], [torch.zeros(3)]], ids=["empty", "not trainable"])
def test_proximal_anchor_refuses_what_it_cannot_pull(params):
    with pytest.raises(ValueError, match="non-empty list of trainable tensors"):
        ProximalAnchor(params)


@pytest.mark.parametrize("values", [lambda ps: ps[:2], lambda ps: [ps[0], torch.zeros(4), ps[2]]],
                         ids=["too few", "wrong shape"])
def test_anchor_refuses_values_unlike_the_parameters(values):
    params = make_params(0)
    with pytest.raises(ValueError, match=r"expected 3 tensors shaped like the parameters"):
        ProximalAnchor(params).anchor(values(params))


def test_proximal_anchor_state_dict_round_trip():
    source, target = make_params(12), make_params(13)
    pull = ProximalAnchor(source)
    restored = ProximalAnchor(target)
    restored.load_state_dict(pull.state_dict())
    for a, p in zip(restored.anchors, source):
        assert torch.equal(a, p.detach())
    expected = sum(((t.detach() - s.detach()) ** 2).sum() for t, s in zip(target, source))
    move(source, 14)  # the restored anchor is a copy, independent of the source's parameters
    assert restored.penalty(0.3).item() == pytest.approx(0.15 * expected.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# AlternatingProjections and EarlyStopping


def drive(controller, metrics):
    decisions = []
    for m in metrics:
        decisions.append((controller.update(m), controller.instance, controller.lam))
    return decisions


def test_controller_improve_plateau_converge_next_instance():
    ctl = AlternatingProjections(lam=2e-4)
    metrics = [0.10, 0.20, 0.20, 0.200005, 0.15, 0.05, 0.30, 0.31, 0.30, 0.30, 0.30]
    assert drive(ctl, metrics) == [
        ("improved", 0, 0.0),
        ("improved", 0, 0.0),
        (None, 0, 0.0),
        (None, 0, 0.0),  # +5e-6 is not more than min_delta = 1e-5
        ("converged", 1, 2e-4),  # 3 evaluations without improvement: instance 1 starts
        ("improved", 1, 2e-4),  # a new instance starts from best = -inf
        ("improved", 1, 2e-4),
        ("improved", 1, 2e-4),
        (None, 1, 2e-4),
        (None, 1, 2e-4),
        ("converged", 2, 2e-4),
    ]
    assert ctl.best == -math.inf and ctl.evaluations == 0 and ctl.stale == 0


def test_controller_lambda_schedule_with_decay():
    ctl = AlternatingProjections(lam=1e-3, decay=0.5, instance_patience=1)
    got = drive(ctl, [1.0, 0.0] * 3)
    assert [d[0] for d in got] == ["improved", "converged"] * 3
    assert [ctl_lam for _, _, ctl_lam in got[1::2]] == [5e-4, 2.5e-4, 1.25e-4]
    assert ctl.instance == 3


def test_controller_with_lam_zero_still_advances_instances():
    ctl = AlternatingProjections(lam=0.0, instance_patience=2)
    got = drive(ctl, [0.5, 0.4, 0.4, 0.6, 0.6, 0.6])
    assert got == [
        ("improved", 0, 0.0),
        (None, 0, 0.0),
        ("converged", 1, 0.0),
        ("improved", 1, 0.0),
        (None, 1, 0.0),
        ("converged", 2, 0.0),
    ]


def test_controller_waits_for_min_evaluations():
    ctl = AlternatingProjections(lam=1.0, instance_patience=1, min_evaluations=4)
    assert [d[0] for d in drive(ctl, [0.5, 0.4, 0.4, 0.4, 0.9, 0.8])] == [
        "improved", None, None, "converged", "improved", None
    ]
    assert ctl.evaluations == 2 and ctl.stale == 1  # the second instance has had 2 of its 4


@pytest.mark.parametrize("cut", [3, 5, 6])  # mid-plateau, right after "converged", mid-instance
def test_controller_state_dict_round_trip_gives_identical_future_decisions(cut):
    metrics = [0.1, 0.3, 0.3, 0.2, 0.25, 0.4, 0.5, 0.5, 0.45, 0.6, 0.6, 0.6, 0.6, 0.7]
    original = AlternatingProjections(lam=3e-4, decay=0.9, instance_patience=2, min_evaluations=3)
    drive(original, metrics[:cut])
    saved = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored = AlternatingProjections(lam=5.0)
    restored.load_state_dict(saved)
    assert restored.state_dict() == original.state_dict()
    assert drive(restored, metrics[cut:]) == drive(original, metrics[cut:])


def test_improvement_must_exceed_min_delta_strictly():
    ctl = AlternatingProjections(lam=1.0, instance_patience=2, min_delta=0.25)
    assert [d[0] for d in drive(ctl, [0.5, 0.75, 0.74])] == ["improved", None, "converged"]
    stop = EarlyStopping(patience=2, min_delta=0.0)
    assert [stop.update(m) for m in [1.0, 1.0, 2.0]] == [True, False, True]


def test_controllers_reject_bad_input():
    for bad in ({"lam": -1}, {"lam": 1, "instance_patience": 0}, {"lam": math.nan}, {"lam": math.inf},
                {"lam": 1, "decay": math.nan}, {"lam": 1, "min_delta": math.nan}):
        with pytest.raises(ValueError, match="AlternatingProjections: need lam, decay, min_delta finite and >= 0"):
            AlternatingProjections(**bad)
    ctl = AlternatingProjections(lam=1)
    with pytest.raises(ValueError, match="finite number, got nan"):
        ctl.update(float("nan"))
    assert ctl.evaluations == 0  # a rejected metric leaves the state alone
    for bad in ({"patience": 0}, {"min_delta": math.nan}, {"min_delta": -1e-5}):
        with pytest.raises(ValueError, match="EarlyStopping: need patience >= 1 and min_delta finite and >= 0"):
            EarlyStopping(**bad)


def test_early_stopping_and_its_state_dict():
    stop = EarlyStopping(patience=3)
    assert [(stop.update(m), stop.stopped) for m in [0.1, 0.1, 0.100001, 0.05]] == [
        (True, False), (False, False), (False, False), (False, True)]
    assert stop.best == 0.1 and stop.stale == 3
    restored = EarlyStopping(patience=99)
    restored.load_state_dict(json.loads(json.dumps(stop.state_dict(), allow_nan=False)))
    assert restored.update(0.05) == stop.update(0.05) is False and restored.stopped and stop.stopped
    assert restored.update(0.2) == stop.update(0.2) is True and not restored.stopped
    assert restored.stale == stop.stale == 0
    fresh = EarlyStopping()
    fresh.load_state_dict(json.loads(json.dumps(EarlyStopping().state_dict(), allow_nan=False)))
    assert fresh.best == -math.inf and fresh.update(-5.0) is True
