"""Time per training step: the fast path next to the old one, and CCP next to the plain pair loss.

    python benchmarks/bench_step.py [--steps 10] [--device cpu] [--threads 2] [--paths old,fast]
                                    [--methods ccp] [--image-size 227] [--classes 11318]
                                    [--config configs/sop_ms.yaml]
    python benchmarks/bench_step.py --paths fast --methods plain,ccp      # CCP's cost over the plain loss

Every variant runs train.train_step with the settings of `--config` (BN-Inception, batch 32 = 8
classes x 4, frozen BatchNorm, the authors' update: coupled decay, both clippings, Keras' Adam) on
random weights and images, so no data loading is timed, under torch.use_deterministic_algorithms as
in a training run. "plain" is the multi-similarity pair loss alone; "ccp" adds the proxy term over
`--classes` x K proxies, the pull lambda (theta - theta_anchor) and the proxies' weight decay.

Paths (the layout, kernel and process choices, printed with the figures):
- old:      the step before issue 15: NCHW tensors, BatchNorm run as its own op after each conv, every
            new tensor filled with NaN first (what use_deterministic_algorithms does unless told
            otherwise), glibc's default malloc;
- model:    old with the network changed: channels_last network and input, each frozen BatchNorm folded
            into its conv, a block's 1x1 convs that read its input run as one, average-pool branches
            project before they pool (model.py);
- fast:     model with the process settings of a training run: no filling of new tensors
            (bookkeeping.make_deterministic; still deterministic, as no op here reads memory it did not
            write) and freed memory kept for the next step (bookkeeping.keep_freed_memory). What
            train.py runs (model.channels_last: true);
- compiled: fast, with the network under torch.compile (opt-in here only; the first step's time,
            compilation included, is printed apart).
All run the stem's max pools before their ReLU (the same bits, 1-2 % faster than the order before
issue 15), so "old" is that much faster than the code it stands for and the ratios are conservative.

Each variant lives in its own process (the allocator and fill settings are process-wide), built one
after the other; the steps then rotate through all variants, round after round, so that machine
noise hits each alike. The median and the fastest step of each are reported with their ratios, and
on CPU the median process CPU time (the steadier figure on a busy machine). Memory is the training
state each variant keeps between steps (weights, buffers, gradients, Adam's moments, theta_anchor,
proxies), counted tensor by tensor: exact and the same on any device.

Compare two or three variants at a time (the default is two). Every process holds its memory, and
the paths on glibc's default malloc fault their pages in anew at every step; on a virtual machine
those faults get dearer the more memory the other processes hold (on the 2-core sandbox of README,
"old" took 2.9-3.2 s a step beside one other variant and 3.3-3.7 s beside three).
"""
import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bookkeeping  # noqa: E402
import build  # noqa: E402
import losses  # noqa: E402
import model as models  # noqa: E402
import projection  # noqa: E402
import train  # noqa: E402

PATHS = {"old": {"channels_last": False, "fold_bn": False, "fill": True, "keep_memory": False, "compile": False},
         "model": {"channels_last": True, "fold_bn": True, "fill": True, "keep_memory": False, "compile": False},
         "fast": {"channels_last": True, "fold_bn": True, "fill": False, "keep_memory": True, "compile": False},
         "compiled": {"channels_last": True, "fold_bn": True, "fill": False, "keep_memory": True, "compile": True}}


def build_variant(method: str, path: str, cfg: dict, args) -> dict:
    """Network, objective, optimiser and batch of one (method, path) pair, from the config's settings."""
    choice = PATHS[path]
    device, mc = torch.device(args.device), cfg["model"]
    network = models.build_model(mc["backbone"], mc["embedding_dim"], None, mc["pooling"], mc["freeze_bn"], seed=0,
                                 channels_last=choice["channels_last"], fold_bn=choice["fold_bn"]).to(device)
    cfg = {**cfg, "method": "ccp" if method == "ccp" else "baseline"}
    objective = build.build_objective(cfg, args.classes, mc["embedding_dim"], seed=0) if method == "ccp" else None
    if objective is not None:
        objective.to(device)
        anchor = projection.ProximalAnchor(p for p in network.parameters() if p.requires_grad)
        anchor.anchor()
        lam = cfg["projection"]["lam"]

        def pull() -> None:
            anchor.add_to_grad(lam)

        compute_loss = objective
    else:
        anchor, pull = None, None
        normalize, loss, params = build.normalizer(cfg), losses.LOSSES[cfg["loss"]["name"]], cfg["loss"]["params"]

        def compute_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss(normalize(x), y, **params)

    generator = torch.Generator().manual_seed(1)
    size, dc = args.image_size, cfg["data"]
    inputs = (torch.randn(dc["classes_per_batch"] * dc["samples_per_class"], 3, size, size, generator=generator)
              * 50).to(device)
    labels = torch.arange(dc["classes_per_batch"]).repeat_interleave(dc["samples_per_class"]).to(device)
    network.train()
    optimizer = build.build_optimizer(cfg, network, objective)  # before compiling: the same parameters
    return {"network": torch.compile(network) if choice["compile"] else network, "objective": objective,
            "loss": compute_loss, "anchor": anchor, "pull": pull, "optimizer": optimizer, "inputs": inputs,
            "labels": labels}


def step(v: dict, device: str) -> tuple[float, float]:
    """Wall and process CPU seconds of one train.train_step."""
    start, start_cpu = time.perf_counter(), time.process_time()
    train.train_step(v["network"], v["loss"], v["optimizer"], v["inputs"], v["labels"], v["pull"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def serve(connection, method: str, path: str, args) -> None:
    """One variant in its own process: set the path's process settings, build, warm up (allocator,
    first-call overheads, Adam's state, compilation), then one step per request; at the end, sizes."""
    choice = PATHS[path]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # as a training run (bookkeeping.make_deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = choice["fill"]
    if choice["keep_memory"]:
        bookkeeping.keep_freed_memory()
    v = build_variant(method, path, train.load_config(args.config), args)
    connection.send(step(v, args.device)[0])
    while connection.recv() == "step":
        connection.send(step(v, args.device))
    network, objective = v["network"], v["objective"]
    weights = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad) / 2**20
    proxies = 0.0 if objective is None else objective.proxies.weight.numel() * 4 / 2**20
    connection.send({"state_mib": state_mib(v), "weights_mib": weights, "proxies_mib": proxies,
                     "batch": len(v["labels"])})


def state_mib(v: dict) -> float:
    """MiB of the tensors a variant keeps between steps, each storage counted once."""
    modules = [v["network"]] + ([v["objective"]] if v["objective"] is not None else [])
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [t.grad for t in list(tensors) if t.grad is not None]
    tensors += [t for state in v["optimizer"].state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += v["anchor"].anchors if v["anchor"] is not None else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def ratio(values: list[float], base: list[float], how) -> float:
    return how(values) / how(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every variant each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default="old,fast", help=f"comma-separated, of {tuple(PATHS)}")
    parser.add_argument("--methods", default="ccp", help="comma-separated, of ('plain', 'ccp')")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--classes", type=int, default=11318, help="proxy classes (SOP: 11,318)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "sop_ms.yaml"))
    args = parser.parse_args()
    paths, methods = args.paths.split(","), args.methods.split(",")
    if not set(paths) <= set(PATHS) or not set(methods) <= {"plain", "ccp"}:
        parser.error(f"--paths takes some of {tuple(PATHS)}, --methods some of ('plain', 'ccp')")
    cfg = train.load_config(args.config)

    context, variants = multiprocessing.get_context("spawn"), {}
    for key in ((m, p) for m in methods for p in paths):
        connection, child = context.Pipe()
        process = context.Process(target=serve, args=(child, *key, args), daemon=True)
        process.start()
        variants[key] = {"connection": connection, "process": process, "first_step": connection.recv(),
                         "wall": [], "cpu": []}  # built and warmed up before the next variant starts
    for _ in range(args.steps):
        for v in variants.values():
            v["connection"].send("step")
            wall, cpu = v["connection"].recv()
            v["wall"].append(wall)
            v["cpu"].append(cpu)
    for v in variants.values():
        v["connection"].send("stop")
        v.update(v["connection"].recv())
        v["process"].join()

    batch = next(iter(variants.values()))["batch"]
    where = args.device if args.device != "cpu" else \
        f"cpu ({cpu_name()}, {args.threads} thread{'s' * (args.threads != 1)} per variant)"
    print(f"torch {torch.__version__}, {where}; {cfg['model']['backbone']}, batch {batch}, {args.image_size}x"
          f"{args.image_size}; {args.steps} rounds of {len(variants)} interleaved steps, one process per variant")
    for p in paths:
        choice = PATHS[p]
        print(f"  path {p}: {'channels_last' if choice['channels_last'] else 'NCHW'}, BatchNorm "
              f"{'folded into its conv, 1x1 heads as one conv' if choice['fold_bn'] else 'as its own op'}, "
              f"new tensors {'filled with NaN' if choice['fill'] else 'not filled'}, freed memory "
              f"{'kept' if choice['keep_memory'] else 'unmapped (glibc default)'}, "
              f"{'torch.compile' if choice['compile'] else 'eager'}")
        if choice["compile"]:
            print("    first step, compilation included: " + ", ".join(
                f"{m} {variants[(m, p)]['first_step']:.1f} s" for m in methods))
    header = f"{'method':<7}{'path':<7}{'median s':>10}{'min s':>9}{'cpu s':>9}{'state MiB':>11}"
    print(header + "".join(f"{k + ' /' + paths[0]:>15}" for k in ("median", "min", "cpu")))
    for (m, p), v in variants.items():
        base = variants[(m, paths[0])]
        print(f"{m:<7}{p:<7}{statistics.median(v['wall']):>10.3f}{min(v['wall']):>9.3f}"
              f"{statistics.median(v['cpu']):>9.3f}{v['state_mib']:>11.1f}"
              + "".join(f"{ratio(v[key], base[key], how):>15.3f}"
                        for key, how in (("wall", statistics.median), ("wall", min), ("cpu", statistics.median))))
    if set(methods) == {"plain", "ccp"}:
        for p in paths:
            plain, ccp = variants[("plain", p)], variants[("ccp", p)]
            print(f"CCP / plain, path {p}: {ratio(ccp['wall'], plain['wall'], statistics.median):.3f} (median), "
                  f"{ratio(ccp['wall'], plain['wall'], min):.3f} (min)")
        ccp, plain = variants[("ccp", paths[-1])], variants[("plain", paths[-1])]
        print(f"CCP's extra state: {ccp['state_mib'] - plain['state_mib']:.1f} MiB = theta_anchor "
              f"{ccp['weights_mib']:.1f} MiB (one copy of the trainable weights) + proxies {ccp['proxies_mib']:.1f} "
              f"MiB x 4 (values, gradient, Adam's two moments) = {ccp['weights_mib'] + 4 * ccp['proxies_mib']:.1f} "
              f"MiB expected")


if __name__ == "__main__":
    main()
