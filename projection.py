"""The chance-constraint projection of PAPER.md §2: the proximal pull towards θ_anchor, and when to move on.

CCP solves a sequence of proxy-based problem instances. Instance t adds (λ_t / 2)·‖θ − θ_anchor‖² over
the network's weights (ProximalAnchor), an approximate projection onto the previous instance's
constraint set. AlternatingProjections decides from the validation metric when an instance has
converged and which λ_t the next one uses; EarlyStopping ends the whole run. train.py's class CCP
puts them together with the proxy selection. Standalone: imports torch and the standard library only.
"""
import math
from collections.abc import Iterable, Sequence

import torch


class ProximalAnchor:
    """θ_anchor for a fixed list of trainable tensors (θ_anchor ← θ at construction), and the pull
    (λ/2)·‖θ − θ_anchor‖². The anchor lives beside the parameters (same device and dtype): the one extra
    copy of the weights CCP costs on the training device (PAPER.md §8); snapshots θ* belong in host memory.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = list(params)
        if not self.params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in self.params):
            raise ValueError("ProximalAnchor: params must be a non-empty list of trainable tensors; pass "
                             "[p for p in model.parameters() if p.requires_grad]")
        self.anchors = [torch.empty_like(p, requires_grad=False) for p in self.params]
        self.anchor()

    @torch.no_grad()
    def anchor(self, values: Sequence[torch.Tensor] | None = None) -> None:
        """θ_anchor ← values (e.g. θ*, one tensor per parameter, copied to its device and dtype), or ← θ."""
        source = self.params if values is None else list(values)
        if [tuple(v.shape) for v in source] != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"ProximalAnchor.anchor: expected {len(self.params)} tensors shaped like the "
                             f"parameters, got shapes {[tuple(v.shape) for v in source]}")
        for a, v in zip(self.anchors, source):
            a.copy_(v)

    def penalty(self, lam: float) -> torch.Tensor:
        """(λ/2)·Σ‖θ − θ_anchor‖², differentiable w.r.t. the parameters."""
        return (lam / 2) * sum((p - a).pow(2).sum() for p, a in zip(self.params, self.anchors))

    @torch.no_grad()
    def add_to_grad(self, lam: float) -> None:
        """grad += λ·(θ − θ_anchor): the penalty's gradient without a graph; after backward, before clipping."""
        if lam == 0:
            return
        # λ·(θ − θ_anchor), rounded exactly as autograd rounds the penalty's gradient, in three torch._foreach_*
        # calls for all tensors: a loop made three per tensor, and each call costs a GPU launch (docs/gpu.md)
        pulls, grads = torch._foreach_sub(self.params, self.anchors), []
        torch._foreach_mul_(pulls, lam)
        for p, pull in zip(self.params, pulls):
            if p.grad is None:  # the parameter took no part in the loss: the pull is its gradient
                p.grad = pull
            else:
                grads.append((p.grad, pull))
        if grads:
            torch._foreach_add_([g for g, _ in grads], [q for _, q in grads])

    def state_dict(self) -> dict:
        """The anchor tensors themselves (references, as nn.Module.state_dict returns)."""
        return {"anchors": list(self.anchors)}

    def load_state_dict(self, state: dict) -> None:
        self.anchor(state["anchors"])


def is_improvement(metric: float, best: float, min_delta: float) -> bool:
    """A new best only if it beats the old one by more than min_delta (PAPER.md §2: > 1e-5)."""
    if not math.isfinite(metric):
        raise ValueError(f"validation metric must be a finite number, got {metric!r}")
    return metric > best + min_delta


# The controller's settings, in its constructor's order (the rest of its state is progress).
SETTINGS = ("lam", "decay", "instance_patience", "min_evaluations", "min_delta")


class AlternatingProjections:
    """Which problem instance t runs, its λ_t, and when it is over (PAPER.md §2).

    update(metric) after every validation returns "improved" (a new best of the current instance: the
    caller keeps θ*, P*), "converged" (no improvement for instance_patience evaluations, after at least
    min_evaluations: the controller has moved on to t + 1; the caller anchors θ* and re-selects the
    proxies) or None. λ_0 = 0 and λ_t = lam·decay^t for t ≥ 1; lam = 0 is the no-projection ablation.
    """

    def __init__(self, lam: float, decay: float = 1.0, instance_patience: int = 3, min_evaluations: int = 1,
                 min_delta: float = 1e-5):
        if not (0 <= lam < math.inf and 0 <= decay < math.inf and 0 <= min_delta < math.inf) \
                or instance_patience < 1 or min_evaluations < 1:
            raise ValueError(f"AlternatingProjections: need lam, decay, min_delta finite and >= 0 and "
                             f"instance_patience, min_evaluations >= 1, got {lam}, {decay}, {min_delta}, "
                             f"{instance_patience}, {min_evaluations}")
        self.base_lam, self.decay, self.min_delta = float(lam), float(decay), float(min_delta)
        self.instance_patience, self.min_evaluations = int(instance_patience), int(min_evaluations)
        self.instance, self.best, self.evaluations, self.stale = 0, -math.inf, 0, 0

    @property
    def lam(self) -> float:
        """λ_t: 0 in instance 0, lam·decay^t afterwards."""
        return 0.0 if self.instance == 0 else self.base_lam * self.decay**self.instance

    def update(self, metric: float) -> str | None:
        """Record one validation metric (higher is better): "improved", "converged" or None."""
        improved = is_improvement(metric, self.best, self.min_delta)
        self.evaluations += 1
        if improved:
            self.best, self.stale = float(metric), 0
            return "improved"
        self.stale += 1
        if self.evaluations >= self.min_evaluations and self.stale >= self.instance_patience:
            self.instance += 1
            self.best, self.evaluations, self.stale = -math.inf, 0, 0
            return "converged"
        return None

    def state_dict(self) -> dict:
        """Plain Python numbers (JSON-able: best = -inf is stored as None)."""
        return {"lam": self.base_lam, "decay": self.decay, "instance_patience": self.instance_patience,
                "min_evaluations": self.min_evaluations, "min_delta": self.min_delta, "instance": self.instance,
                "best": None if self.best == -math.inf else self.best, "evaluations": self.evaluations,
                "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        """Restore settings and progress, so the controller makes the same future decisions."""
        self.__init__(*(state[key] for key in SETTINGS))  # re-validates the settings
        self.instance, self.evaluations, self.stale = state["instance"], state["evaluations"], state["stale"]
        self.best = -math.inf if state["best"] is None else state["best"]


class EarlyStopping:
    """The overall stop of PAPER.md §2: stopped after `patience` evaluations without a new best."""

    def __init__(self, patience: int = 60, min_delta: float = 1e-5):
        if patience < 1 or not 0 <= min_delta < math.inf:
            raise ValueError(f"EarlyStopping: need patience >= 1 and min_delta finite and >= 0, got {patience} and "
                             f"{min_delta}")
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best, self.stale = -math.inf, 0

    def update(self, metric: float) -> bool:
        """Record one validation metric (higher is better); True when it improved on the best."""
        if is_improvement(metric, self.best, self.min_delta):
            self.best, self.stale = float(metric), 0
            return True
        self.stale += 1
        return False

    @property
    def stopped(self) -> bool:
        return self.stale >= self.patience

    def state_dict(self) -> dict:
        """Plain Python numbers (JSON-able: best = -inf is stored as None)."""
        return {"patience": self.patience, "min_delta": self.min_delta,
                "best": None if self.best == -math.inf else self.best, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["patience"], state["min_delta"])  # re-validates the settings
        self.best, self.stale = -math.inf if state["best"] is None else state["best"], state["stale"]


def host_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host-memory copy of a module's state_dict, buffers included (θ*, P*): the training device holds only
    θ_anchor. ProximalAnchor.anchor takes its trainable entries: [copy[name] for name, p in
    module.named_parameters() if p.requires_grad]."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
