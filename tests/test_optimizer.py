"""optimizer.py: KerasAdam against Keras' formula, torch's Adam and train.py's clipping (PAPER.md §2, §7)."""
import copy
import io
import math

import pytest
import torch

from optimizer import KerasAdam

SHAPES = [(3, 4), (5,), (2, 3)]
BETAS = (0.9, 0.999)


def make_params(seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def make_grads(seed: int, steps: int, low: float, high: float, dtype=torch.float64) -> list[list[torch.Tensor]]:
    """Per step, one gradient per tensor: random signs, magnitudes 10^U(low, high)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = []
        for s in SHAPES:
            exponent = low + (high - low) * torch.rand(s, generator=g, dtype=torch.float64)
            sign = torch.randint(0, 2, s, generator=g).to(torch.float64) * 2 - 1
            grads.append((sign * 10.0 ** exponent).to(dtype))
        out.append(grads)
    return out


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def groups(params: list[torch.Tensor], lrs=(1e-3, 3e-3), decays=(1e-2, 0.0)) -> list[dict]:
    """Tensors 0 and 1 in group 0, tensor 2 in group 1 (its own lr and weight decay)."""
    return [{"params": params[:2], "lr": lrs[0], "weight_decay": decays[0]},
            {"params": params[2:], "lr": lrs[1], "weight_decay": decays[1]}]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grad_steps) -> None:
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def keras_reference(params, grad_steps, lrs=(1e-3, 3e-3), decays=(1e-2, 0.0), eps=1e-7,
                    clip_norm=None, clip_value=None):
    """Brute force in Python floats (float64), one scalar at a time, in the authors' order (PAPER.md §2):
    g + w·θ → g·min(1, c/(‖g‖ + 1e-6)) → clamp(g, −c, c) → Keras' Adam (PAPER.md §7).
    Returns the final θ per tensor and, per step, whether each clip changed anything."""
    group = [0, 0, 1]
    b1, b2 = BETAS
    theta = [p.detach().flatten().tolist() for p in params]
    m = [[0.0] * len(x) for x in theta]
    v = [[0.0] * len(x) for x in theta]
    clipped = []
    for t, grads in enumerate(grad_steps, start=1):
        g = [[gi + decays[group[k]] * th for gi, th in zip(grads[k].flatten().tolist(), theta[k])]
             for k in range(len(theta))]
        norm_active = value_active = False
        if clip_norm is not None:
            norm = math.sqrt(sum(x * x for row in g for x in row))
            coef = min(1.0, clip_norm / (norm + 1e-6))
            norm_active = coef < 1.0
            g = [[x * coef for x in row] for row in g]
        if clip_value is not None:
            value_active = any(abs(x) > clip_value for row in g for x in row)
            g = [[min(max(x, -clip_value), clip_value) for x in row] for row in g]
        clipped.append((norm_active, value_active))
        for k in range(len(theta)):
            alpha = lrs[group[k]] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            for i, gi in enumerate(g[k]):
                m[k][i] = b1 * m[k][i] + (1 - b1) * gi
                v[k][i] = b2 * v[k][i] + (1 - b2) * gi * gi
                theta[k][i] -= alpha * m[k][i] / (math.sqrt(v[k][i]) + eps)
    final = [torch.tensor(x, dtype=torch.float64).view(p.shape) for x, p in zip(theta, params)]
    return final, clipped


def displacement(after, before):
    return torch.cat([(a.detach() - b.detach()).flatten().double() for a, b in zip(after, before)])


# ---------------------------------------------------------------------------------------------
# Keras' formula


def test_keras_epsilon_matches_float64_reference_over_tiny_and_large_gradients():
    params = make_params(0)
    grad_steps = make_grads(1, steps=6, low=-8, high=0)
    expected, _ = keras_reference(params, grad_steps)
    ours, torchs = clone(params), clone(params)
    run(KerasAdam(groups(ours), lr=1.0), ours, grad_steps)
    run(KerasAdam(groups(torchs), lr=1.0, epsilon="torch"), torchs, grad_steps)
    torch.testing.assert_close(displacement(ours, params), displacement(expected, params), rtol=1e-10, atol=0)
    # the placement of ε is visible at these gradients: torch's differs from the reference
    assert not torch.allclose(displacement(torchs, params), displacement(expected, params), rtol=1e-3)


def test_keras_epsilon_in_float32_agrees_to_float32_resolution():
    params = make_params(2, dtype=torch.float32)
    grad_steps = make_grads(3, steps=4, low=-8, high=0, dtype=torch.float32)
    expected, _ = keras_reference(params, grad_steps)
    ours = clone(params)
    run(KerasAdam(groups(ours), lr=1.0), ours, grad_steps)
    # a few float32 ulps of θ; the float64 test above pins the update itself
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.detach(), b.float(), rtol=5e-7, atol=0)


def test_decay_then_norm_clip_then_value_clip_match_reference():
    params = make_params(4)
    grad_steps = make_grads(5, steps=5, low=-3, high=1)
    expected, clipped = keras_reference(params, grad_steps, clip_norm=1.0, clip_value=0.05)
    assert all(norm and value for norm, value in clipped)  # both clips act at every step
    ours = clone(params)
    run(KerasAdam(groups(ours), lr=1.0, clip_norm=1.0, clip_value=0.05), ours, grad_steps)
    torch.testing.assert_close(displacement(ours, params), displacement(expected, params), rtol=1e-10, atol=0)


def test_first_step_on_a_tiny_gradient_differs_about_fourfold():
    # t = 1, m = (1−β₁)g, v = (1−β₂)g²: Keras steps lr·√(1−β₂)·g/(√(1−β₂)·g + ε), torch lr·g/(g + ε)
    lr, g, eps = 1e-3, 1e-6, 1e-7
    keras_step = lr * math.sqrt(1 - BETAS[1]) * g / (math.sqrt(1 - BETAS[1]) * g + eps)  # 2.4025e-4
    torch_step = lr * g / (g + eps)  # 9.0909e-4
    steps = {}
    for epsilon in ("keras", "torch"):
        p = torch.zeros((), dtype=torch.float64, requires_grad=True)
        p.grad = torch.tensor(g, dtype=torch.float64)
        KerasAdam([p], lr=lr, epsilon=epsilon).step()
        steps[epsilon] = -p.item()
    assert steps["keras"] == pytest.approx(keras_step, rel=1e-9)
    assert steps["torch"] == pytest.approx(torch_step, rel=1e-9)
    assert 3.7 < steps["torch"] / steps["keras"] < 3.9


# ---------------------------------------------------------------------------------------------
# torch's placement and train.py's current path


def test_torch_epsilon_matches_torch_adam():
    params = make_params(6, dtype=torch.float32)
    grad_steps = make_grads(7, steps=6, low=-8, high=0, dtype=torch.float32)
    ours, reference = clone(params), clone(params)
    run(KerasAdam(groups(ours, decays=(0.0, 0.0)), lr=1.0, eps=1e-7, epsilon="torch"), ours, grad_steps)
    adam = torch.optim.Adam(groups(reference, decays=(0.0, 0.0)), lr=1.0, betas=BETAS, eps=1e-7)
    run(adam, reference, grad_steps)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=0)


def current_train_path(params, grad_steps, eps_for_step, clip_norm, clip_value):
    """train.py's sequence: p.grad += w·p, clip_grad_norm_, clip_grad_value_, torch.optim.Adam."""
    spec = groups(params)
    decays = [spec[0]["weight_decay"]] * 2 + [spec[1]["weight_decay"]]
    opt = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in spec], betas=BETAS)
    for t, grads in enumerate(grad_steps, start=1):
        for group in opt.param_groups:
            group["eps"] = eps_for_step(t)
        for p, g, decay in zip(params, grads, decays):
            p.grad = g.clone().add_(p.detach(), alpha=decay)
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        torch.nn.utils.clip_grad_value_(params, clip_value)
        opt.step()


def test_torch_epsilon_with_decay_and_clipping_matches_current_train_path():
    params = make_params(8, dtype=torch.float32)
    grad_steps = make_grads(9, steps=5, low=-3, high=1, dtype=torch.float32)
    ours, reference = clone(params), clone(params)
    run(KerasAdam(groups(ours), lr=1.0, clip_norm=1.0, clip_value=0.05, epsilon="torch"), ours, grad_steps)
    current_train_path(reference, grad_steps, lambda t: 1e-7, clip_norm=1.0, clip_value=0.05)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=0)


def test_keras_epsilon_is_torch_adam_with_rescaled_epsilon():
    # Keras' ε is torch's ε/√(1−β₂ᵗ) (PAPER.md §7), clipping and decay as train.py does them
    params = make_params(10)
    grad_steps = make_grads(11, steps=5, low=-8, high=1)
    ours, reference = clone(params), clone(params)
    run(KerasAdam(groups(ours), lr=1.0, clip_norm=1.0, clip_value=0.05), ours, grad_steps)
    current_train_path(reference, grad_steps, lambda t: 1e-7 / math.sqrt(1 - BETAS[1] ** t), 1.0, 0.05)
    torch.testing.assert_close(displacement(ours, params), displacement(reference, params), rtol=1e-10, atol=0)


def test_step_leaves_grad_untouched_and_skips_tensors_without_grad():
    params = make_params(12)
    frozen_before = [p.detach().clone() for p in params]
    opt = KerasAdam(groups(params, decays=(1e-2, 1e-2)), lr=1e-2, clip_norm=0.1, clip_value=0.01)
    grads = [g for g in make_grads(13, steps=1, low=-1, high=1)[0]]
    params[0].grad = grads[0].clone()  # tensor 1 (same group) and group 1 (decayed) have no gradient
    opt.step()
    assert torch.equal(params[0].grad, grads[0]) and not torch.equal(params[0].detach(), frozen_before[0])
    for p, before in zip(params[1:], frozen_before[1:]):
        assert torch.equal(p.detach(), before) and p not in opt.state
    assert opt.state[params[0]]["step"] == 1


def test_step_never_reads_a_value_on_the_host():
    # meta tensors have no values: .item() or a Python branch on a tensor would raise here
    p = torch.zeros(3, 4, device="meta", requires_grad=True)
    q = torch.zeros(5, device="meta", requires_grad=True)
    p.grad, q.grad = torch.zeros(3, 4, device="meta"), torch.zeros(5, device="meta")
    opt = KerasAdam([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=1e-3, weight_decay=1e-4,
                    clip_norm=10.0, clip_value=10.0)
    opt.step()
    assert opt.state[q]["step"] == 1 and opt.state[q]["exp_avg_sq"].device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Resume and validation


def test_state_dict_round_trip_continues_bit_identically():
    params = make_params(14, dtype=torch.float32)
    grad_steps = make_grads(15, steps=7, low=-8, high=1, dtype=torch.float32)

    def build(ps):
        return KerasAdam(groups(ps), lr=1e-2, weight_decay=1e-4, clip_norm=1.0, clip_value=0.05)

    opt = build(params)
    run(opt, params, grad_steps[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    run(opt, params, grad_steps[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = clone(saved["params"])
    opt2 = build(resumed)
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.state[resumed[0]]["step"] == 3
    run(opt2, resumed, grad_steps[3:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert opt2.state[resumed[2]]["step"] == 7


def test_deepcopy_keeps_the_clipping_and_epsilon_settings():
    params = make_params(16)
    grad_steps = make_grads(17, steps=3, low=-8, high=1)
    opt = KerasAdam(groups(params), lr=1e-2, clip_norm=1.0, clip_value=0.05, epsilon="torch")
    run(opt, params, grad_steps[:1])
    copied = copy.deepcopy({"params": params, "optimizer": opt})
    assert (copied["optimizer"].clip_norm, copied["optimizer"].clip_value) == (1.0, 0.05)
    assert copied["optimizer"].epsilon == "torch"
    run(opt, params, grad_steps[1:])
    run(copied["optimizer"], copied["params"], grad_steps[1:])
    for a, b in zip(params, copied["params"]):
        assert torch.equal(a, b)


def sparse_gradient():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.zeros(3).to_sparse()
    KerasAdam([p], lr=1e-3).step()


@pytest.mark.parametrize("make, match", [
    (lambda: KerasAdam(make_params(0), lr=0.0), "^KerasAdam: expected lr"),
    (lambda: KerasAdam(make_params(0), lr=float("nan")), "lr"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, betas=(1.0, 0.999)), "betas"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, betas=(0.9,)), "betas"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, eps=0.0), "eps"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, weight_decay=-1e-4), "weight_decay"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, clip_norm=0.0), "clip_norm"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, clip_value=-10.0), "clip_value"),
    (lambda: KerasAdam(make_params(0), lr=1e-3, epsilon="tf"), "epsilon to be one of .*got 'tf'"),
    (lambda: KerasAdam([{"params": make_params(0)[:1]}, {"params": make_params(1), "lr": -1.0}], lr=1e-3),
     "^KerasAdam param group 1: expected lr"),
    (lambda: KerasAdam([{"params": make_params(0)[:1]}, {"params": make_params(1), "clip_norm": 1.0}], lr=1e-3),
     r"^KerasAdam param group 1: .*unknown keys \['clip_norm'\]"),
    (sparse_gradient, "^KerasAdam: expected dense gradients"),
])
def test_invalid_arguments_raise_one_line_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match) as error:
        make()
    assert "\n" not in str(error.value)


def test_a_refused_param_group_is_not_kept():
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = KerasAdam([w], lr=1e-3)
    with pytest.raises(ValueError, match="param group 1: expected lr"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    (w.sum() + b.sum()).backward()
    opt.step()
    assert len(opt.param_groups) == 1 and torch.equal(b.detach(), torch.ones(2))  # b was never added
