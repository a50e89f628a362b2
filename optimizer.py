"""The authors' update in one torch.optim.Optimizer: coupled weight decay, clipping, Keras' Adam.

PAPER.md §2: each step's update is built as gradient of the loss → + λ_t(θ − θ_anchor) (added to
.grad by projection.ProximalAnchor before step(), not here) → + coupled weight decay w·θ → clip the
global norm over all gradients → clip each value → Adam. KerasAdam.step() runs the last four.
PAPER.md §7: the authors' Adam is Keras' (OptimizerV2), which adds ε before the bias correction,

    θ ← θ − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)                      epsilon="keras" (default)

where torch.optim.Adam adds it after,

    θ ← θ − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)                      epsilon="torch"

so torch's Adam is Keras' with ε/√(1−β₂ᵗ), ≈ 32·ε at t = 1 for β₂ = 0.999. The two differ where √v is
near ε: for one gradient of 1e-6 at lr 1e-3 the first step is 2.4e-4 (Keras) against 9.1e-4 (torch).

Where this still differs from Keras (all invisible in the authors' setting):
- the step count t is kept per tensor, as torch.optim.Adam does; Keras counts the optimiser's
  iterations, the same thing while every tensor gets a gradient at every step;
- the global norm is clipped with torch.nn.utils.clip_grad_norm_'s g·min(1, c/(‖g‖ + 1e-6)), where
  TensorFlow's tf.clip_by_global_norm has g·c/max(‖g‖, c): a relative difference of at most 1e-6/c;
- float rounding: agreement is to float32 resolution, not bit for bit.
With clip_norm ≤ clip_value value clipping never acts after norm clipping (|gᵢ| ≤ ‖g‖ ≤ clip_norm);
the authors' 10 and 10 are such a pair, kept so that the update reads as theirs.

p.grad is left as the caller wrote it: the decayed and clipped gradient lives in temporaries, as in
torch.optim.Adam(weight_decay=...), so logging or inspecting .grad after step() sees the raw gradient.
step() never reads a tensor's value on the host (no .item()), so it does not synchronise a GPU.
Standalone: imports torch and the standard library only.
"""
import math
import numbers
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

EPSILON_PLACEMENTS = ("keras", "torch")
GROUP_KEYS = {"params", "param_names", "lr", "betas", "eps", "weight_decay"}


def check_hyperparameters(lr, betas, eps, weight_decay, where: str) -> None:
    """lr > 0, 0 ≤ β₁, β₂ < 1, eps > 0, weight_decay ≥ 0; a ValueError names the argument and where."""
    def real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if not (real(lr) and lr > 0):
        raise ValueError(f"{where}: lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    if not (real(eps) and eps > 0):
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")
    if not (real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")


def check_clip(value, name: str) -> None:
    if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"KerasAdam: {name} must be a number > 0 or None, got {value!r}")


def coupled_weight_decay(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    # g + w·θ, new tensors: the L2 term's gradient, added before clipping (PAPER.md §2)
    if weight_decay == 0:
        return [g.clone() for g in grads]
    return torch._foreach_add(grads, params, alpha=weight_decay)


def clip_global_norm_(grads: list[Tensor], max_norm: float) -> Tensor:
    # g ← g·min(1, c/(‖g‖ + 1e-6)), ‖g‖ over all tensors together (torch.nn.utils.clip_grad_norm_'s formula)
    first = grads[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(first) for n in torch._foreach_norm(grads)]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # a tensor: no host synchronisation
    for device in dict.fromkeys(g.device for g in grads):
        torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
    return norm


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


class KerasAdam(torch.optim.Optimizer):
    """Coupled weight decay → global-norm clip → value clip → Adam with Keras' ε (PAPER.md §2, §7).

    Param groups may override lr, betas, eps and weight_decay (weight_decay = 0 for BatchNorm's
    tensors, a larger lr for some baselines' proxies). clip_norm and clip_value act on all groups'
    gradients together and are None to skip. State per tensor: step (int), exp_avg, exp_avg_sq.
    """

    def __init__(self, params: Iterable, lr: float, betas=(0.9, 0.999), eps: float = 1e-7,
                 weight_decay: float = 0.0, clip_norm: float | None = None, clip_value: float | None = None,
                 epsilon: str = "keras"):
        check_hyperparameters(lr, betas, eps, weight_decay, "KerasAdam")
        check_clip(clip_norm, "clip_norm")
        check_clip(clip_value, "clip_value")
        if epsilon not in EPSILON_PLACEMENTS:
            raise ValueError(f"KerasAdam: epsilon must be one of {EPSILON_PLACEMENTS}, got {epsilon!r}")
        self.clip_norm, self.clip_value, self.epsilon = clip_norm, clip_value, epsilon
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; copies need these too
        return super().__getstate__() | {"clip_norm": self.clip_norm, "clip_value": self.clip_value,
                                         "epsilon": self.epsilon}

    def add_param_group(self, param_group: dict) -> None:
        unknown = sorted(set(param_group) - GROUP_KEYS)
        if unknown:
            raise ValueError(f"KerasAdam param group {len(self.param_groups)}: unknown keys {unknown}, "
                             f"expected some of {sorted(GROUP_KEYS)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                              f"KerasAdam param group {len(self.param_groups) - 1}")

    def gradients(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """The group's tensors that have a gradient, and their decayed gradients (new tensors)."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise ValueError("KerasAdam: sparse gradients are not supported; use dense embeddings")
        return params, coupled_weight_decay([p.grad for p in params], params, group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update from the gradients in p.grad (PAPER.md §2); tensors without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [self.gradients(group) for group in self.param_groups]
        grads = [g for _, group_grads in gathered for g in group_grads]
        if not grads:
            return loss
        if self.clip_norm is not None:
            clip_global_norm_(grads, self.clip_norm)
        if self.clip_value is not None:
            clip_values_(grads, self.clip_value)
        for group, (params, group_grads) in zip(self.param_groups, gathered):
            if params:
                self.adam(group, params, group_grads)
        return loss

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
