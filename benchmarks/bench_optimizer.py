"""Time of one optimiser step: optimizer.KerasAdam against the path train.py runs today.

    python benchmarks/bench_optimizer.py [--steps 20] [--device cpu] [--threads N] [--classes 11318] [--train-bn]

Both run the update of PAPER.md §2 on BN-Inception's trainable tensors (BatchNorm frozen, as in the
paper; --train-bn adds BatchNorm's γ, β as an undecayed group) plus a (classes·4, 128) proxy tensor:
- "current": p.grad += 1e-4·p per tensor, torch.nn.utils.clip_grad_norm_(10),
  clip_grad_value_(10), torch.optim.Adam (its default implementation for the device);
- "keras": KerasAdam(weight_decay=1e-4, clip_norm=10, clip_value=10), the same work in one step().
Gradients are random and restored before every step (not timed); the variants alternate so that
machine noise hits both alike. Reported per variant: the fastest and the median wall-clock
milliseconds per step and, on CPU, the median process CPU time per step (the honest number on a
busy machine; run with --threads 1 so that it counts one core's work), and the ratios keras/current.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as models  # noqa: E402
import optimizer  # noqa: E402

WEIGHT_DECAY, CLIP = 1e-4, 10.0


def build_groups(args) -> list[dict]:
    """Decayed tensors (network weights and proxies) and, with --train-bn, BatchNorm's γ, β undecayed."""
    network = models.build_model("bninception", 128, None, "avg", not args.train_bn, seed=0)
    batchnorm = models.batchnorm_parameter_names(network)
    named = [(n, p.detach().to(args.device)) for n, p in network.named_parameters() if p.requires_grad]
    proxies = torch.randn(args.classes * 4, 128, generator=torch.Generator().manual_seed(0)).to(args.device)
    groups = [{"params": [p for n, p in named if n not in batchnorm] + [proxies], "weight_decay": WEIGHT_DECAY}]
    if args.train_bn:
        groups.append({"params": [p for n, p in named if n in batchnorm], "weight_decay": 0.0})
    return groups


def current_step(groups: list[dict], adam: torch.optim.Adam) -> None:
    for group in groups:
        for p in group["params"]:
            p.grad.add_(p, alpha=group["weight_decay"])
    params = [p for group in groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    torch.nn.utils.clip_grad_value_(params, CLIP)
    adam.step()


def make_variant(name: str, args) -> dict:
    groups = build_groups(args)
    params = [p for group in groups for p in group["params"]]
    generator = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=generator) * 0.01).to(args.device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if name == "current":
        adam = torch.optim.Adam([{"params": g["params"]} for g in groups], lr=1e-5, eps=1e-7)
        run = lambda: current_step(groups, adam)  # noqa: E731
    else:
        keras = optimizer.KerasAdam(groups, lr=1e-5, clip_norm=CLIP, clip_value=CLIP)
        run = keras.step
    return {"params": params, "grads": grads, "run": run, "times": [], "cpu": []}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=11318)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--train-bn", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {name: make_variant(name, args) for name in ("current", "keras")}
    count = sum(p.numel() for p in variants["keras"]["params"])
    print(f"{len(variants['keras']['params'])} tensors, {count / 1e6:.2f} M values, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    for i in range(args.steps + 3):
        for v in variants.values():
            for p, g in zip(v["params"], v["grads"]):
                p.grad.copy_(g)
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            v["run"]()
            sync(args.device)
            if i >= 3:  # the first steps allocate Adam's state
                v["times"].append(time.perf_counter() - start)
                v["cpu"].append(time.process_time() - start_cpu)
    stats = {name: {"fastest": min(v["times"]) * 1e3, "median": statistics.median(v["times"]) * 1e3,
                    "cpu": statistics.median(v["cpu"]) * 1e3} for name, v in variants.items()}
    for name, s in stats.items():
        print(f"{name:8s} wall fastest {s['fastest']:8.2f} ms   median {s['median']:8.2f} ms   "
              f"cpu median {s['cpu']:8.2f} ms")
    print("ratio keras/current: " + "   ".join(
        f"{key} {stats['keras'][key] / stats['current'][key]:.2f}" for key in ("fastest", "median", "cpu")))


if __name__ == "__main__":
    main()
