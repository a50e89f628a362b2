"""Speed and memory of proxy re-selection (selection.py) and the proximal pull (projection.py).

Run by hand: `python benchmarks/bench_selection.py [--device cuda] [--threads 2]`. Prints
  - greedy_k_center at SOP scale (11,318 classes, pool 7, K = 4, d = 128; target < 0.1 s on two
    CPU cores) and CUB scale (100 classes, pool 12, K = 8), from the zero vector and from P*;
  - covering_radius and mean_interclass_distance at SOP scale (logged once per instance);
  - CandidateStream.draw at SOP scale (11,318 classes of 2-12 images, pool 7; once per instance);
  - ProximalAnchor.anchor() and add_to_grad() for 10.3 M parameters (BN-Inception's count, in
    synthetic shapes), beside penalty().backward() (the same gradient by autograd), with the
    memory the anchor adds.
Times are the median of several runs after one warm-up run.
"""
import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projection import ProximalAnchor  # noqa: E402
from selection import (  # noqa: E402
    CandidateStream,
    covering_radius,
    greedy_k_center,
    mean_interclass_distance,
)


def timed(fn, device, repeats=5):
    """Median and best wall time of fn() in seconds, after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def ms(times):
    median, best = times
    return f"{median * 1e3:7.1f} ms (best {best * 1e3:.1f})"


def rss_bytes():
    """Resident set size of this process (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def bench_greedy(device, g):
    print("greedy_k_center (median of 5, best in brackets)")
    for name, C, b, K in [("SOP", 11318, 7, 4), ("CUB", 100, 12, 8)]:
        pools = torch.randn(C, b, 128, generator=g).to(device)
        converged = torch.randn(C, K, 128, generator=g).to(device)
        zero = timed(lambda: greedy_k_center(pools, K), device)
        proxies = timed(lambda: greedy_k_center(pools, K, converged), device)
        print(
            f"  {name}: C={C} pool={b} K={K} d=128  zero start {ms(zero)}   from P* {ms(proxies)}"
        )


def bench_coverage(device, g):
    C, K, N = 11318, 4, 59551
    centers = torch.randn(C * K, 128, generator=g).to(device)
    center_labels = torch.arange(C, device=device).repeat_interleave(K)
    points = torch.randn(N, 128, generator=g).to(device)
    labels = torch.randint(C, (N,), generator=g).to(device)
    labels[:C] = torch.arange(C, device=device)
    cover = timed(lambda: covering_radius(points, labels, centers, center_labels), device, 3)
    inter = timed(lambda: mean_interclass_distance(centers, center_labels), device, 3)
    print(f"covering_radius SOP ({N} points, {C}x{K} centers): {ms(cover)}")
    print(f"mean_interclass_distance SOP ({C} classes): {ms(inter)}")


def bench_stream(g):
    sizes = torch.randint(2, 13, (11318,), generator=g).tolist()
    starts = [0, *itertools.accumulate(sizes)][:-1]
    stream = CandidateStream([range(s, s + n) for s, n in zip(starts, sizes)], seed=0)
    draw = timed(lambda: stream.draw(7), torch.device("cpu"), 3)
    print(f"CandidateStream.draw(7) SOP ({len(sizes)} classes, {sum(sizes)} images): {ms(draw)}")


def bench_anchor(device, g):
    # 10.3 M parameters: 69 conv-like tensors of 384x384 and the 1024->128 embedding layer
    shapes = [(384, 384)] * 69 + [(128, 1024)]
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    n = sum(p.numel() for p in params)
    pull = ProximalAnchor(params)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    start = time.perf_counter()
    pull.anchor()
    first = time.perf_counter() - start
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    buffers = sum(a.numel() * a.element_size() for a in pull.anchors)
    snapshot = [p.detach().to("cpu", copy=True) for p in params]  # θ* in host memory
    again = timed(lambda: pull.anchor(), device)
    from_host = timed(lambda: pull.anchor(snapshot), device)
    add = timed(lambda: pull.add_to_grad(2e-4), device)
    autograd = timed(lambda: pull.penalty(2e-4).backward(), device)
    print(f"ProximalAnchor, {n / 1e6:.2f} M parameters in {len(params)} tensors (median of 5)")
    print(f"  first anchor() (allocates): {first * 1e3:.1f} ms (one run)")
    print(f"  anchor() again: {ms(again)}")
    print(f"  anchor(host snapshot of θ*): {ms(from_host)}")
    print(f"  add_to_grad(2e-4): {ms(add)}")
    print(
        f"  penalty(2e-4).backward(), the same gradient by autograd: {ms(autograd)} "
        f"= {autograd[0] / add[0]:.1f}x add_to_grad"
    )
    what = "allocated on device" if device.type == "cuda" else "RSS"
    print(
        f"  extra memory: anchor buffers {buffers / 2**20:.1f} MiB; "
        f"{what} grew by {(after - before) / 2**20:.1f} MiB at the first anchor()"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    g = torch.Generator().manual_seed(0)
    bench_greedy(device, g)
    bench_coverage(device, g)
    bench_stream(g)
    bench_anchor(device, g)


if __name__ == "__main__":
    main()
