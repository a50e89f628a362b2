"""Is loading the bottleneck? Training-pipeline throughput next to one BN-Inception training step.

Prints images/s of decode + augment (BN-Inception train transform, 227×227) + collate, through
DataLoader with MPerClassSampler batches of 32 (8 classes × 4) and 0, 1, 2 workers, on generated
JPEGs of ~500×375 (the size of CUB/Cars photos), then the time of one forward+backward of
BN-Inception (frozen BatchNorm, 128-D embedding) at batch 32 on the same machine. First, the
sampler alone: milliseconds per batch of each order on SOP's training labels (the most classes).
Then an evaluation pass (eval transform) decoding every time against `data.decoded` (decoded once).

    python benchmarks/bench_data.py [--images 256] [--batches 12] [--steps 3]
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def photo_like_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Smooth random colour fields plus mild noise: JPEGs of a photo's size and file size."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def pipeline_throughput(dataset: data.RetrievalDataset, workers: int, batches: int) -> float:
    sampler = data.MPerClassSampler(dataset.labels, m=4, classes_per_batch=8, length=batches + 1, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # start-up (worker processes) and first decode are not steady-state throughput
    start = time.perf_counter()
    images = sum(len(labels) for _, labels in iterator)
    return images / (time.perf_counter() - start)


def eval_pass_rate(dataset: data.RetrievalDataset, workers: int) -> float:
    """Images/s of one evaluation pass (batches of 128, as train.eval_loader), worker start-up included."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=workers)
    start = time.perf_counter()
    images = sum(len(labels) for _, labels in loader)
    return images / (time.perf_counter() - start)


def sampler_milliseconds(order: str, batches: int = 200) -> float:
    """Time per batch of MPerClassSampler on SOP-sized labels: 11,318 classes, 59,551 images."""
    labels = np.random.default_rng(0).integers(0, 11318, 59551)
    labels[:11318] = np.arange(11318)  # every class present
    sampler = data.MPerClassSampler(labels, 4, 8, batches, seed=0, order=order)
    start = time.perf_counter()
    for _ in sampler:
        pass
    return (time.perf_counter() - start) / batches * 1000


def bninception_step_seconds(steps: int) -> float | None:
    try:
        import model
        network = model.build_model("bninception", embedding_dim=128, channels_last=True)  # as in training
    except (ImportError, AttributeError, ValueError) as err:
        print(f"BN-Inception step: skipped ({err})")
        return None
    optimiser = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(32, 3, 227, 227) * 50
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimiser.zero_grad()
        network(x).square().sum().backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    for order in data.SAMPLER_ORDERS:
        print(f"sampler, order={order}, SOP labels, batches of 8 classes x 4: "
              f"{sampler_milliseconds(order):.2f} ms per batch")
    with tempfile.TemporaryDirectory() as tmp:
        paths = photo_like_jpegs(Path(tmp), args.images)
        size_kb = np.mean([Path(p).stat().st_size for p in paths]) / 1024
        dataset = data.RetrievalDataset(paths, [i % 32 for i in range(len(paths))], 32, name="bench",
                                        transform=data.build_transform("bninception", train=True))
        print(f"{len(paths)} JPEGs of 500x375 (~{size_kb:.0f} KB), batches of 32 = 8 classes x 4, train transform 227")
        rates = {}
        threads = torch.get_num_threads()
        # workers run torch single-threaded; in-process, intra-op threads also cost on tiny per-image ops
        for workers, torch_threads in ((0, threads), (0, 1), (1, threads), (2, threads)):
            torch.set_num_threads(torch_threads)
            rate = rates[workers, torch_threads] = pipeline_throughput(dataset, workers, args.batches)
            print(f"pipeline, {workers} workers ({torch_threads} torch threads in the main process): "
                  f"{rate:7.1f} images/s = {32 / rate * 1000:6.1f} ms per batch of 32")
        torch.set_num_threads(threads)
        # an evaluation pass (validation): decoding every time against data.decoded (decoded once)
        evaluation = dataset.with_transform(data.build_transform("bninception", train=False))
        start = time.perf_counter()
        cached = data.decoded(evaluation, workers=2)
        print(f"evaluation pass, eval transform 227: data.decoded built in {time.perf_counter() - start:.2f} s "
              f"with 2 workers ({cached.images.nbytes / 2**20:.0f} MiB), then per pass:")
        for workers in (0, 2):
            decoding, from_memory = eval_pass_rate(evaluation, workers), eval_pass_rate(cached, workers)
            print(f"  {workers} workers: decoding {decoding:7.1f} images/s, decoded once {from_memory:7.1f} images/s "
                  f"({from_memory / decoding:.1f}x)")
    step = bninception_step_seconds(args.steps)
    if step is not None:
        print(f"BN-Inception train step (forward+backward+Adam, batch 32, 227x227): {step * 1000:.0f} ms "
              f"= {32 / step:.1f} images/s")
        best = max(rates.values())
        verdict = "loading is NOT the bottleneck" if best > 32 / step else "loading IS the bottleneck"
        print(f"ratio pipeline (best) / training step: {best / (32 / step):.1f}x -> {verdict} on this machine")


if __name__ == "__main__":
    main()
