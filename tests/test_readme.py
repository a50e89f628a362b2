"""README's copy-paste example is PAPER.md §2's Algorithm 1: run it and watch what it does.

The example is executed as a user would paste it, in a fresh namespace. The public calls it makes
are recorded (not replaced), and the record is checked against Algorithm 1: the pull is added after
backward with lambda_0 = 0 in the first instance; after every "converged" the pull's anchor is theta*
(the weights at the instance's best validation, not the current ones) and k-center starts from P*
(the proxies at that validation, not the current ones).
"""
import re
from pathlib import Path

import torch

import losses
import projection
import selection

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, f"README.md should show one Python example, found {len(blocks)}"
    return blocks[0]


def copies(tensors) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in tensors]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def run_example(monkeypatch) -> tuple[list[tuple], dict]:
    """Execute the example; return the recorded events in order and its namespace."""
    events, namespace = [], {}

    def the(kind):  # the example's one object of that type (theta lives in the ProximalAnchor)
        found = [v for v in namespace.values() if isinstance(v, kind)]
        assert len(found) == 1, f"the example should make one {kind.__name__}"
        return found[0]

    def update(f):
        def wrapped(self, metric):
            decision = f(self, metric)
            events.append(("update", decision, copies(the(projection.ProximalAnchor).params),
                           copies([the(losses.Proxies).weight])))
            return decision
        return wrapped

    def pull(f):
        def wrapped(self, lam):
            events.append(("pull", lam, all(p.grad is not None for p in self.params), copies(self.anchors),
                           copies(self.params)))
            f(self, lam)
        return wrapped

    def select(f):
        def wrapped(pool, current_proxies, per_class):
            events.append(("select", None if current_proxies is None else copies([current_proxies])))
            return f(pool, current_proxies, per_class)
        return wrapped

    for owner, name, wrap in [(projection.AlternatingProjections, "update", update),
                              (projection.ProximalAnchor, "add_to_grad", pull), (selection, "select_proxies", select)]:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    monkeypatch.chdir(ROOT)
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    return events, namespace


def test_readme_example_is_algorithm_1(monkeypatch, capsys):
    events, namespace = run_example(monkeypatch)
    assert "MAP@R" in capsys.readouterr().out
    kinds = [event[0] for event in events]

    # start: P <- k-center from the zero vector before any step, and theta_anchor = theta at the first pull
    assert kinds[0] == "select" and events[0][1] is None, "the first proxies: k-center from the zero vector"
    assert kinds[1] == "pull" and same(events[1][3], events[1][4]), "theta_anchor must start as theta"

    converged, lam, best, expected_anchor = 0, 0.0, None, events[1][3]
    for i, event in enumerate(events[1:], start=1):
        if event[0] == "pull":  # after backward (gradients present), with lambda_t and theta_anchor of the instance
            assert event[1] == lam and event[2], f"event {i}: the pull is ({event[1]}, {event[2]}), expected lambda {lam}"
            assert same(event[3], expected_anchor), f"event {i}: theta_anchor is not the instance's anchor"
        elif event[0] == "update" and event[1] == "improved":
            best = event  # theta*, P* of this instance
        elif event[0] == "update" and event[1] == "converged":
            converged, lam = converged + 1, 2e-4
            theta_star, p_star = best[2], best[3]
            assert not same(theta_star, event[2]) and not same(p_star, event[3]), "theta* = theta: the check is vacuous"
            next_pull = next((j for j in range(i, len(kinds)) if kinds[j] == "pull"), len(kinds))
            selects = [e for e in events[i + 1:next_pull] if e[0] == "select"]
            assert len(selects) == 1, "converged: the proxies are re-selected once, before training goes on"
            assert selects[0][1] is not None and same(selects[0][1], p_star), \
                "k-center must start from P*, the proxies at the instance's best validation"
            expected_anchor = theta_star  # checked at every pull of the next instance
    assert converged >= 1, "the example should reach a converged instance"
    assert kinds.count("select") == 1 + converged, "proxies are selected at the start and after each converged only"
    assert namespace["controller"].instance == converged
