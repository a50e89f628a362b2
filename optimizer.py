"""KerasAdam: the authors' update as one torch.optim.Optimizer (PAPER.md §2, §7). Imports only torch.

step() takes the gradients in p.grad, which already hold the pull λ_t(θ − θ_anchor) (projection.py),
and applies in this order: coupled weight decay g + w·θ → clip the global norm over all tensors →
clip each value → Adam with Keras' ε, which is added before the bias correction (PAPER.md §7):
    θ ← θ − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)          epsilon="keras" (default)
    θ ← θ − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)          epsilon="torch" (torch.optim.Adam's placement)
p.grad is left as the caller wrote it (the decayed, clipped gradients are temporaries), and step()
reads no value on the host, so it does not synchronise a GPU. Each step works on lists of tensors
with torch._foreach_* (one call for all tensors instead of one per tensor).
"""
import math
import numbers
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

EPSILON_PLACEMENTS = ("keras", "torch")
GROUP_KEYS = {"params", "param_names", "lr", "betas", "eps", "weight_decay"}

# --------------------------------------------------------------------------- the four stages of the update (§2)


def coupled_weight_decay(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    # g + w·θ, as new tensors: the L2 term's gradient, added before clipping
    if weight_decay == 0:
        return [g.clone() for g in grads]
    return torch._foreach_add(grads, params, alpha=weight_decay)


def clip_global_norm_(grads: list[Tensor], max_norm: float) -> None:
    # g ← g·min(1, c/(‖g‖ + 1e-6)), ‖g‖ over all tensors together (torch.nn.utils.clip_grad_norm_'s formula)
    first = grads[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(first) for n in torch._foreach_norm(grads)]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # a tensor: no host synchronisation
    for device in dict.fromkeys(g.device for g in grads):
        torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))


def clip_values_(grads: list[Tensor], max_value: float) -> None:
    # gᵢ ← clamp(gᵢ, −c, c)
    torch._foreach_clamp_min_(grads, -max_value)
    torch._foreach_clamp_max_(grads, max_value)


def adam_moments_(m: list[Tensor], v: list[Tensor], grads: list[Tensor], betas: tuple[float, float]) -> None:
    # m ← β₁m + (1−β₁)g ;  v ← β₂v + (1−β₂)g²   (torch.optim.Adam's operations)
    beta1, beta2 = betas
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)


def adam_update_(params: list[Tensor], m: list[Tensor], v: list[Tensor], steps: list[int], lr: float,
                 betas: tuple[float, float], eps: float, epsilon: str) -> None:
    # keras: θ ← θ − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε) ;  torch: θ ← θ − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)
    beta1, beta2 = betas
    bias1 = [1 - beta1 ** t for t in steps]
    bias2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in steps]
    denominator = torch._foreach_sqrt(v)
    if epsilon == "torch":
        torch._foreach_div_(denominator, bias2_sqrt)
        step_sizes = [-(lr / b1) for b1 in bias1]
    else:
        step_sizes = [-(lr * (b2 / b1)) for b1, b2 in zip(bias1, bias2_sqrt)]
    torch._foreach_add_(denominator, eps)
    torch._foreach_addcdiv_(params, m, denominator, step_sizes)

# --------------------------------------------------------------------------- the optimiser


class KerasAdam(torch.optim.Optimizer):
    """Coupled weight decay → global-norm clip → value clip → Adam with Keras' ε (PAPER.md §2, §7).

    Param groups may override lr, betas, eps and weight_decay (weight_decay = 0 for BatchNorm's
    tensors, a larger lr for some baselines' proxies). clip_norm and clip_value act on all groups'
    gradients together and are None to skip. State per tensor: step (int), exp_avg, exp_avg_sq.
    Unlike Keras, t counts each tensor's own updates (the same while every tensor gets a gradient at
    every step), and the global norm is clipped with torch's formula, not tf.clip_by_global_norm's.
    """

    def __init__(self, params: Iterable, lr: float, betas=(0.9, 0.999), eps: float = 1e-7,
                 weight_decay: float = 0.0, clip_norm: float | None = None, clip_value: float | None = None,
                 epsilon: str = "keras"):
        for name, value in (("clip_norm", clip_norm), ("clip_value", clip_value)):
            _expect("KerasAdam", value is None or (_is_number(value) and value > 0), f"{name} > 0 or None", repr(value))
        _expect("KerasAdam", epsilon in EPSILON_PLACEMENTS, f"epsilon to be one of {EPSILON_PLACEMENTS}", repr(epsilon))
        self.clip_norm, self.clip_value, self.epsilon = clip_norm, clip_value, epsilon
        _check_hyperparameters("KerasAdam", lr, betas, eps, weight_decay)  # each group's again in add_param_group
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; copies need these too
        return super().__getstate__() | {"clip_norm": self.clip_norm, "clip_value": self.clip_value,
                                         "epsilon": self.epsilon}

    def add_param_group(self, param_group: dict) -> None:
        where = f"KerasAdam param group {len(self.param_groups)}"
        unknown = sorted(set(param_group) - GROUP_KEYS)
        _expect(where, not unknown, f"keys among {sorted(GROUP_KEYS)}", f"the unknown keys {unknown}")
        group = {**self.defaults, **param_group}  # checked before it joins: a refused group is not kept
        _check_hyperparameters(where, group["lr"], group["betas"], group["eps"], group["weight_decay"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update from the gradients in p.grad (PAPER.md §2); tensors without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.groups_with_gradients()
        if not groups:
            return loss
        grads = [coupled_weight_decay([p.grad for p in params], params, group["weight_decay"])  # 1. g + w·θ
                 for group, params in groups]
        every = [g for group_grads in grads for g in group_grads]
        if self.clip_norm is not None:
            clip_global_norm_(every, self.clip_norm)  # 2. the global norm, over all groups together
        if self.clip_value is not None:
            clip_values_(every, self.clip_value)  # 3. each value
        for (group, params), group_grads in zip(groups, grads):
            self.adam(group, params, group_grads)  # 4. Adam with Keras' ε (or torch's)
        return loss

    def groups_with_gradients(self) -> list[tuple[dict, list[Tensor]]]:
        """Each group with its tensors that have a gradient; groups without any are left out."""
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        _expect("KerasAdam", not any(p.grad.is_sparse for _, params in groups for p in params),
                "dense gradients (use dense embeddings)", "a sparse gradient")
        return [(group, params) for group, params in groups if params]

    def adam(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """Adam on one group's tensors with their clipped gradients; t counts this tensor's updates."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        adam_moments_(m, v, grads, group["betas"])
        adam_update_(params, m, v, [s["step"] for s in states], group["lr"], group["betas"], group["eps"],
                     self.epsilon)

# --------------------------------------------------------------------------- input checks (constructor, param groups)


def _expect(where: str, ok: bool, expected: str, got: str) -> None:
    """The one way a check fails: ValueError("<where>: expected <expected>, got <got>")."""
    if not ok:
        raise ValueError(f"{where}: expected {expected}, got {got}")


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_hyperparameters(where: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    # the ranges' finite upper ends also refuse inf and NaN
    _expect(where, _is_number(lr) and 0 < lr < math.inf, "lr, a finite number > 0", repr(lr))
    _expect(where, isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas), "betas, two numbers in [0, 1)", repr(betas))
    _expect(where, _is_number(eps) and 0 < eps < math.inf, "eps, a finite number > 0", repr(eps))
    _expect(where, _is_number(weight_decay) and 0 <= weight_decay < math.inf, "weight_decay, a finite number >= 0",
            repr(weight_decay))
