"""Time per training step and memory of CCP next to the plain pair loss, side by side.

PAPER.md §8 reports +8 % time per step and one extra copy of the weights plus the proxies.

    python benchmarks/bench_step.py [--steps 15] [--device cpu] [--image-size 227] [--classes 11318]

Both variants run the same train.train_step (BN-Inception, batch 32 = 8 classes x 4, random weights
and images, so no data loading is timed): "plain" is the multi-similarity pair loss; "ccp" adds the
proxy term over `--classes` x K proxies, the pull lambda (theta - theta_anchor) and the proxies'
weight decay. Steps alternate between the two so that machine noise hits both alike. Memory is the
training state each variant keeps between steps (weights, buffers, gradients, Adam's moments,
theta_anchor, proxies), counted tensor by tensor: exact and the same on any device, where a CPU's
peak resident memory moves by hundreds of MiB with the allocator's whims.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
import model as models  # noqa: E402
import projection  # noqa: E402
import train  # noqa: E402

TC = {"weight_decay": 1e-4, "clip_norm": 10.0, "clip_value": 10.0}


def build(variant: str, args) -> dict:
    """Network, optimiser and loss of one variant, with the paper's settings (PAPER.md §2, §7)."""
    device = torch.device(args.device)
    network = models.build_model("bninception", 128, None, "avg", True, seed=0).to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    ms = {"alpha": 2.0, "beta": 40.0, "base": 0.5}
    if variant == "ccp":
        proxies = losses.Proxies(args.classes, args.per_class, 128, generator=torch.Generator().manual_seed(0))
        objective = losses.CCPLoss(losses.multi_similarity, proxies, 0.1, 1.0, **ms).to(device)
        anchor = projection.ProximalAnchor(params)
        anchor.anchor()
        extra = list(objective.parameters())
        compute_loss = objective
    else:
        anchor, extra = None, []

        def compute_loss(x, y):
            return losses.multi_similarity(losses.lipschitz_normalize(x), y, **ms)

    optimizer = torch.optim.Adam([{"params": params}, {"params": extra}] if extra else params,
                                 lr=1e-5, betas=(0.9, 0.999), eps=1e-7)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 3, args.image_size, args.image_size, generator=generator).to(device) * 50
    labels = torch.arange(8).repeat_interleave(4).to(device)
    network.train()
    return {"network": network, "loss": compute_loss, "optimizer": optimizer, "anchor": anchor,
            "decayed": params + extra, "inputs": inputs, "labels": labels}


def step(v: dict, device: str) -> float:
    start = time.perf_counter()
    train.train_step(v["network"], v["loss"], v["optimizer"], v["inputs"], v["labels"], v["decayed"], TC,
                     v["anchor"], lam=2e-4 if v["anchor"] is not None else 0.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def state_mib(v: dict) -> float:
    """MiB of the tensors a variant keeps between steps, each storage counted once."""
    modules = [v["network"]] + ([v["loss"]] if isinstance(v["loss"], torch.nn.Module) else [])
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [t.grad for t in list(tensors) if t.grad is not None]
    tensors += [t for state in v["optimizer"].state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += v["anchor"].anchors if v["anchor"] is not None else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--classes", type=int, default=11318, help="proxy classes (SOP: 11,318)")
    parser.add_argument("--per-class", type=int, default=4, help="proxies per class K (SOP: 4)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {name: build(name, args) for name in ("plain", "ccp")}
    for v in variants.values():  # warm-up: allocator, first-call overheads
        step(v, args.device)
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, v in variants.items():
            times[name].append(step(v, args.device))
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    memory = {name: state_mib(v) for name, v in variants.items()}

    network = variants["ccp"]["network"]
    weights_mib = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad) / 2**20
    proxies_mib = args.classes * args.per_class * 128 * 4 / 2**20
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, BN-Inception, batch 32 "
          f"(8 x 4), {args.image_size}x{args.image_size}, {args.steps} alternating steps each")
    print(f"{'variant':<8}{'median s/step':>15}{'min s/step':>12}{'state MiB':>11}")
    for name in variants:
        print(f"{name:<8}{median[name]:>15.3f}{min(times[name]):>12.3f}{memory[name]:>11.1f}")
    print(f"CCP / plain time per step: {median['ccp'] / median['plain']:.3f} (median), "
          f"{min(times['ccp']) / min(times['plain']):.3f} (min)")
    print(f"CCP's extra state: {memory['ccp'] - memory['plain']:.1f} MiB = theta_anchor {weights_mib:.1f} MiB "
          f"(one copy of the trainable weights) + proxies {proxies_mib:.1f} MiB x 4 (values, gradient, "
          f"Adam's two moments) = {weights_mib + 4 * proxies_mib:.1f} MiB expected")


if __name__ == "__main__":
    main()
