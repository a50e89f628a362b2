"""The chance-constraint projection: the proximal pull towards θ_anchor and its controller.

PAPER.md §2: CCP solves a sequence of proxy-based problem instances. Instance t adds the
proximal term (λ_t / 2)·‖θ − θ_anchor‖² over the network's weights (ProximalAnchor), which
approximately projects onto the constraint set of the previous instance.
AlternatingProjections decides, from the validation metric, when an instance has converged (the
caller then anchors θ* and re-selects proxies, selection.py) and what λ_t the next instance
uses; EarlyStopping ends the whole run. ProblemInstances holds all of it for a training loop
(θ_anchor, instance t and λ_t, the host copies θ*, P*) behind one question asked after each
validation. Standalone: imports torch and the standard library only.
"""
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


def check_keys(state: dict, expected: dict, owner: str) -> None:
    """A state dict must have exactly the keys its owner writes."""
    if set(state) != set(expected):
        raise ValueError(
            f"{owner}.load_state_dict: expected keys {sorted(expected)}, got {sorted(state)} "
            f"(missing {sorted(set(expected) - set(state))}, "
            f"unknown {sorted(set(state) - set(expected))})"
        )


class ProximalAnchor:
    """θ_anchor for a fixed list of trainable tensors, and the pull (λ/2)·‖θ − θ_anchor‖².

    The anchor lives in buffers allocated once, beside the parameters (same device and dtype): the
    one extra copy of the weights CCP costs on the training device (PAPER.md §8). Snapshots θ*
    that the caller keeps between evaluations belong in host memory and are passed to anchor().
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = list(params)
        if not self.params:
            raise ValueError("ProximalAnchor: params is empty; pass the trainable tensors")
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(
                    f"ProximalAnchor: params[{i}] must be a trainable tensor (requires_grad=True), "
                    f"got {type(p).__name__} {tuple(getattr(p, 'shape', ()))}; pass "
                    "[p for p in model.parameters() if p.requires_grad]"
                )
        self.anchors: list[torch.Tensor] | None = None

    @torch.no_grad()
    def anchor(self, values: Sequence[torch.Tensor] | None = None) -> None:
        """θ_anchor ← values (e.g. θ*; copied to each parameter's device and dtype), or ← θ."""
        source = self.params if values is None else list(values)
        self._check_like_params(source, "anchor(values)")
        if self.anchors is None:
            self.anchors = [torch.empty_like(p, requires_grad=False) for p in self.params]
        for a, v in zip(self.anchors, source):
            a.copy_(v)

    def _check_like_params(self, values: Sequence[torch.Tensor], where: str) -> None:
        if len(values) != len(self.params):
            raise ValueError(
                f"ProximalAnchor.{where}: expected {len(self.params)} tensors (one per parameter), "
                f"got {len(values)}"
            )
        for i, (p, v) in enumerate(zip(self.params, values)):
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                raise ValueError(
                    f"ProximalAnchor.{where}: tensor {i} must have shape {tuple(p.shape)}, "
                    f"got {type(v).__name__} {tuple(getattr(v, 'shape', ()))}"
                )

    def _anchors(self) -> list[torch.Tensor]:
        if self.anchors is None:
            raise RuntimeError("ProximalAnchor: anchor() must be called before the pull is used")
        return self.anchors

    def penalty(self, lam: float) -> torch.Tensor:
        """(λ/2)·Σ‖θ − θ_anchor‖², differentiable w.r.t. the parameters (PAPER.md §2)."""
        squared = sum((p - a).pow(2).sum() for p, a in zip(self.params, self._anchors()))
        return (lam / 2) * squared

    @torch.no_grad()
    def add_to_grad(self, lam: float) -> None:
        """p.grad += λ·(θ − θ_anchor): the penalty's gradient, without building a graph.

        Call it after backward and before clipping, as the authors order the update (PAPER.md §2).
        """
        anchors = self._anchors()
        if lam == 0:
            return
        for p, a in zip(self.params, anchors):
            # λ·(θ − θ_anchor), rounded exactly as autograd rounds the penalty's gradient
            pull = lam * (p - a)
            if p.grad is None:
                p.grad = pull
            else:
                p.grad.add_(pull)

    def state_dict(self) -> dict:
        """The anchor tensors themselves (references, as nn.Module.state_dict returns)."""
        return {"anchors": None if self.anchors is None else list(self.anchors)}

    def load_state_dict(self, state: dict) -> None:
        check_keys(state, self.state_dict(), "ProximalAnchor")
        if state["anchors"] is None:
            self.anchors = None
        else:
            self.anchor(state["anchors"])


def is_improvement(metric: float, best: float, min_delta: float) -> bool:
    """A new best only if it beats the old one by more than min_delta (PAPER.md §2: > 1e-5)."""
    if not math.isfinite(metric):
        raise ValueError(f"validation metric must be a finite number, got {metric!r}")
    return metric > best + min_delta


# The controller's settings, in its constructor's order (the rest of its state is progress).
SETTINGS = ("lam", "decay", "instance_patience", "min_evaluations", "min_delta")


class AlternatingProjections:
    """The controller of PAPER.md §2: which problem instance t runs, its λ_t, and when it is over.

    update(metric) after every validation returns
      "improved"  — a new best of the current instance (the caller snapshots θ*, P*);
      "converged" — no improvement for instance_patience evaluations (after at least
                    min_evaluations of this instance): the controller has already advanced to
                    instance t + 1 (the caller anchors θ* and re-selects proxies);
      None        — otherwise.
    λ_0 = 0 (no pull in the first instance) and λ_t = lam·decay^t for t ≥ 1. lam = 0 switches
    the projection off while instances, and hence proxy re-selection, still advance (the λ = 0
    ablation). Each instance starts with best = -inf, so its first evaluation is "improved".
    """

    def __init__(
        self,
        lam: float,
        decay: float = 1.0,
        instance_patience: int = 3,
        min_evaluations: int = 1,
        min_delta: float = 1e-5,
    ):
        if lam < 0 or decay < 0 or min_delta < 0 or instance_patience < 1 or min_evaluations < 1:
            raise ValueError(
                "AlternatingProjections: need lam >= 0, decay >= 0, min_delta >= 0, "
                f"instance_patience >= 1 and min_evaluations >= 1, got lam={lam}, decay={decay}, "
                f"min_delta={min_delta}, instance_patience={instance_patience}, "
                f"min_evaluations={min_evaluations}"
            )
        self.base_lam = float(lam)
        self.decay = float(decay)
        self.instance_patience = int(instance_patience)
        self.min_evaluations = int(min_evaluations)
        self.min_delta = float(min_delta)
        self.instance = 0
        self.best = -math.inf
        self.evaluations = 0
        self.stale = 0

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
        return {
            "lam": self.base_lam,
            "decay": self.decay,
            "instance_patience": self.instance_patience,
            "min_evaluations": self.min_evaluations,
            "min_delta": self.min_delta,
            "instance": self.instance,
            "best": None if self.best == -math.inf else self.best,
            "evaluations": self.evaluations,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore settings and progress, so the controller makes the same future decisions."""
        check_keys(state, self.state_dict(), "AlternatingProjections")
        self.__init__(*(state[key] for key in SETTINGS))  # re-validates the settings
        self.instance = state["instance"]
        self.evaluations = state["evaluations"]
        self.stale = state["stale"]
        self.best = -math.inf if state["best"] is None else state["best"]


class EarlyStopping:
    """The overall stop of PAPER.md §2: "stop" after `patience` evaluations without a new best."""

    def __init__(self, patience: int = 60, min_delta: float = 1e-5):
        if patience < 1 or min_delta < 0:
            raise ValueError(
                "EarlyStopping: need patience >= 1 and min_delta >= 0, "
                f"got {patience} and {min_delta}"
            )
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best = -math.inf
        self.stale = 0

    def update(self, metric: float) -> str | None:
        """Record one validation metric (higher is better): "improved", "stop" or None."""
        if is_improvement(metric, self.best, self.min_delta):
            self.best, self.stale = float(metric), 0
            return "improved"
        self.stale += 1
        return "stop" if self.stale >= self.patience else None

    def state_dict(self) -> dict:
        """Plain Python numbers (JSON-able: best = -inf is stored as None)."""
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": None if self.best == -math.inf else self.best,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict) -> None:
        check_keys(state, self.state_dict(), "EarlyStopping")
        self.__init__(state["patience"], state["min_delta"])  # re-validates the settings
        self.stale = state["stale"]
        self.best = -math.inf if state["best"] is None else state["best"]


def host_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host-memory copy of a module's state (θ*, P*): the training device holds only θ_anchor."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Outcome:
    """What one validation did to the problem instances (ProblemInstances.after_validation).

    event: "snapshot" (a new best of the running instance: θ*, P* kept), "converged" (the instance
    ended: θ_anchor ← θ*, the next instance and its λ_t are in force, `converged_proxies` holds P*
    for the caller's re-selection), or "none". `instance` and `lam` are those in force afterwards.
    """

    event: str
    instance: int
    lam: float
    converged_proxies: torch.Tensor | None = None

    @property
    def converged(self) -> bool:
        return self.event == "converged"


class ProblemInstances:
    """The state Algorithm 1 (PAPER.md §2) keeps between steps, and its decision after a validation.

    It holds θ_anchor (ProximalAnchor over the network's trainable tensors, set to θ at the start),
    the controller of instance t and λ_t (AlternatingProjections), and the host copies θ*, P* of the
    running instance's best validation. `pull()` adds λ_t(θ − θ_anchor) to the gradients;
    `after_validation(metric)` is the one question the training loop asks after each validation.
    """

    def __init__(self, network: torch.nn.Module, proxies: torch.nn.Module, lam: float, decay: float = 1.0,
                 instance_patience: int = 3, min_evaluations: int = 1, min_delta: float = 1e-5):
        self.network, self.proxies = network, proxies
        self.trainable = [name for name, p in network.named_parameters() if p.requires_grad]
        self.anchor = ProximalAnchor(p for p in network.parameters() if p.requires_grad)
        self.anchor.anchor()  # θ_anchor ← θ (unused while λ_0 = 0)
        self.controller = AlternatingProjections(lam, decay, instance_patience, min_evaluations, min_delta)
        self.best: dict[str, dict[str, torch.Tensor]] | None = None  # θ*, P* of the running instance

    @property
    def instance(self) -> int:
        return self.controller.instance

    @property
    def lam(self) -> float:
        return self.controller.lam

    def pull(self) -> None:
        """grad += λ_t(θ − θ_anchor): the gradient of (λ_t / 2)‖θ − θ_anchor‖² (no-op while λ_t = 0)."""
        if self.lam > 0:
            self.anchor.add_to_grad(self.lam)

    def after_validation(self, metric: float) -> Outcome:
        """Keep θ*, P* at the running instance's best; at convergence, θ_anchor ← θ* and move on to t + 1."""
        decision = self.controller.update(metric)
        if decision == "improved":
            self.best = {"network": host_copy(self.network), "proxies": host_copy(self.proxies)}
            return Outcome("snapshot", self.instance, self.lam)
        if decision == "converged":
            weights = self.best["network"]
            self.anchor.anchor([weights[name] for name in self.trainable])
            converged_proxies, self.best = self.best["proxies"]["weight"], None
            return Outcome("converged", self.instance, self.lam, converged_proxies)
        return Outcome("none", self.instance, self.lam)

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.state_dict(), "controller": self.controller.state_dict(), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        """Progress from `state`; λ, decay and the patiences stay as constructed, so a resumed run
        may be given other settings than the run it continues."""
        check_keys(state, self.state_dict(), "ProblemInstances")
        self.anchor.load_state_dict(state["anchor"])
        settings = {k: v for k, v in self.controller.state_dict().items() if k in SETTINGS}
        self.controller.load_state_dict({**state["controller"], **settings})
        self.best = state["best"]
