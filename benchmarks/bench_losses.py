"""Speed and memory of the CCP objective (losses.py, PAPER.md §2 and §4) on CPU or the GPU.

For each of the four losses at SOP shape (11,318 classes × 4 proxies) and CUB shape (100 × 8),
d = 128 and a batch of 32 (8 classes × 4), it prints the median forward+backward time of CCPLoss
(pair + proxy term), of the pair term alone, and the peak resident memory of a fresh process
running only that configuration (ru_maxrss; on CUDA also torch's peak allocated memory).
Run by hand: python benchmarks/bench_losses.py [--repeats 20] [--device cpu] [--threads N]
(on a shared, busy CPU prefer --threads 1 and read the minimum times)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import losses  # noqa: E402

SHAPES = {"SOP": (11318, 4), "CUB": (100, 8)}
# the supplement's per-dataset loss parameters (PAPER.md §4)
PARAMS = {
    "SOP": {"c1": {"margin": 0.5}, "c2": {"pos_margin": 0.2858, "neg_margin": 0.5130},
            "triplet": {"margin": 0.0451}, "ms": {"alpha": 2.0, "beta": 40.0, "base": 0.5}},
    "CUB": {"c1": {"margin": 0.5}, "c2": {"pos_margin": 0.0, "neg_margin": 0.3841},
            "triplet": {"margin": 0.0961}, "ms": {"alpha": 2.0, "beta": 40.0, "base": 0.5}},
}
DIM, CLASSES_PER_BATCH, PER_CLASS = 128, 8, 4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(step, device: torch.device, repeats: int) -> dict:
    """Median and minimum wall time and median process CPU time (all threads) of one step, in ms."""
    wall, cpu = [], []
    for i in range(repeats + 3):  # three warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"wall": statistics.median(wall), "min": min(wall), "cpu": statistics.median(cpu)}


def run_one(shape: str, name: str, repeats: int, device: torch.device) -> dict:
    """One configuration, in its own process so that the peak memory is its own."""
    classes, per_class = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    proxies = losses.Proxies(classes, per_class, DIM, generator=g).to(device)
    ccp = losses.CCPLoss(losses.LOSSES[name], proxies, **PARAMS[shape][name])
    batch_classes = torch.randperm(classes, generator=g)[:CLASSES_PER_BATCH]
    labels = batch_classes.repeat_interleave(PER_CLASS).to(device)
    embeddings = torch.randn(len(labels), DIM, generator=g).to(device).requires_grad_()
    rss_setup = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_setup = torch.cuda.max_memory_allocated(device)

    def ccp_step():
        embeddings.grad = proxies.weight.grad = None
        ccp(embeddings, labels).backward()

    def pair_step():
        embeddings.grad = None
        losses.LOSSES[name](losses.lipschitz_normalize(embeddings), labels, **PARAMS[shape][name]).backward()

    result = {"shape": shape, "loss": name, "ccp": timed(ccp_step, device, repeats),
              "pair": timed(pair_step, device, repeats), "rss_setup_mib": rss_setup,
              "rss_peak_mib": peak_rss_mib()}
    if device.type == "cuda":
        result["cuda_extra_mib"] = (torch.cuda.max_memory_allocated(device) - cuda_setup) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(*args.one, args.repeats, device)))
        return
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, d = {DIM}, "
          f"batch {CLASSES_PER_BATCH} classes x {PER_CLASS}, {args.repeats} repeats, load average {load()}")
    print("times in ms: median wall / min wall / median CPU (all threads); memory: peak RSS of the process")
    cuda = device.type == "cuda"
    print(f"{'shape':<12} {'loss':<8} {'CCP pair+proxy':>22} {'pair only':>20} {'ratio':>6} {'RSS setup':>10} "
          f"{'RSS peak':>9}" + (f" {'CUDA extra':>11}" if cuda else ""))
    for shape, (classes, per_class) in SHAPES.items():
        for name in losses.LOSSES:
            out = subprocess.run([sys.executable, __file__, "--one", shape, name, "--repeats", str(args.repeats),
                                  "--device", args.device, "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ccp, pair = r["ccp"], r["pair"]
            print(f"{shape + f' {classes}x{per_class}':<12} {name:<8} "
                  f"{ccp['wall']:>8.1f} /{ccp['min']:>6.1f} /{ccp['cpu']:>6.1f} "
                  f"{pair['wall']:>6.2f} /{pair['min']:>5.2f} /{pair['cpu']:>5.2f} "
                  f"{ccp['wall'] / pair['wall']:>6.0f} {r['rss_setup_mib']:>6.0f} MiB {r['rss_peak_mib']:>5.0f} MiB"
                  + (f" {r['cuda_extra_mib']:>7.1f} MiB" if cuda else ""))
    print(f"load average at the end: {load()}")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
