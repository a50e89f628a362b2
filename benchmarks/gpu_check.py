"""One prepared command that checks the promise of exact reproducibility on one CUDA GPU (issue 12).

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--out FILE.json]
                                   [--workdir DIR] [--threads N] [--workers N]
    python benchmarks/gpu_check.py --costs FILE.json [--write-configs]

Everything it trains on is generated on the fly in a temporary folder (no dataset, no download):
a Stanford-Online-Products-like layout (Ebay_train.txt / Ebay_test.txt as data.py reads them,
small JPEGs) and a BN-Inception weight file (model.BNInception().state_dict(), `model.pretrained`).

1. Determinism: for MS-CCP and every baseline (configs/sop_*.yaml), two identical short runs of
   train.run, with validations and problem instances that converge on a schedule (min_delta 1:
   every instance lasts 1 + instance_patience validations, PAPER.md §2), so proxies are re-selected
   inside; their checkpoints, logs and results must agree bit for bit. A kernel that refuses
   torch.use_deterministic_algorithms(True) is named with the project line that called it: the fix
   is a deterministic formulation in the code, never switching determinism off.
2. Resume: MS-CCP interrupted (at a validation, and between two) and continued with resume=auto
   equals the uninterrupted run bit for bit.
3. Speed and memory, side by side in one process, on the objects build.training_run makes for an
   SOP-sized fold (a listing of SOP's exact counts whose rows cycle over a few hundred photo-sized
   JPEGs, so decoding costs what a photo costs): ms per train.train_step for plain MS and MS-CCP
   (BN-Inception, batch 32 = 8 x 4, 227 x 227, random images, no loading timed; the proxies of
   fold 0's 8,489 training classes x 4, the table a fold model trains: 16.6 MiB as in PAPER.md §8),
   MS-CCP again with the other choice of each per-device default (model.channels_last, model.fold_bn),
   the network's forward and backward alone; the ops and host reads of a step (StepCounter: each op
   about a kernel launch, each read makes the host wait for the GPU), peak CUDA memory of
   each (on a CPU: the bytes of the tensors kept between steps); greedy
   k-center at SOP scale (selection.select_proxies on 11,318 x 7 candidates, on the host as in
   training); one validation pass over the fold's 14,885 validation images; images/s the training
   loader delivers with the config's workers against images/s the step consumes (and again with
   more workers when it falls short).
4. Projection: the wall-clock of `python train.py configs/sop_ms.yaml` (4 folds x 3 repeats) and
   of configs/cub_ms.yaml from those figures and the supplement's Table 3 step counts (PAPER.md §7).
   --costs prints it for every paper config from a saved report (benchmarks/h200_9d103c4.json holds
   the H200 figures of docs/gpu.md); --write-configs sets each config's `# cost:` line from it.

--quick runs the same sections reduced (a tiny layout and the tiny CNN for the runs, BN-Inception at
64 x 64 for the speed section, a small listing); its figures are no prediction of anything, and its
loader comparison is reported but never counted as a problem (a timing on a busy CPU). The report
ends with the line `gpu_check: N problems`; the same report is written as JSON (--out), after
every section, so that a run stopped at a time limit leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bookkeeping  # noqa: E402
import build  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import model  # noqa: E402
import selection  # noqa: E402
import train  # noqa: E402
from bench_data import photo_like_jpegs  # noqa: E402  (benchmarks/ is this script's folder)

# method -> its shipped SOP config: MS-CCP and every baseline of PAPER.md §4
METHOD_CONFIGS = {"ccp": "sop_ms.yaml", "baseline": "sop_ms_baseline.yaml", "proxy_anchor": "sop_proxy_anchor.yaml",
                  "proxynca++": "sop_proxynca.yaml", "softtriple": "sop_softtriple.yaml", "xbm": "sop_xbm.yaml"}
NO_DETERMINISTIC_KERNEL = re.compile(r"(\S+) does not have a deterministic implementation")


@dataclass(frozen=True)
class Scale:
    """How big each section is: the full check (for a GPU) or --quick (for a CPU, in CI)."""
    name: str
    train_classes: int  # the determinism layout: generated classes with 2-5 JPEGs each
    test_classes: int
    jpeg_size: tuple[int, int]  # (height, width) of its JPEGs
    crop: int  # data.crop_size and data.resize of the determinism runs
    resize: int
    backbone: str  # of the determinism runs
    eval_every: int  # runs last 4 validations: re-selections after the 2nd and the 4th
    listing: dict[str, tuple[int, int]] | None  # the speed section's listing: split -> (images, classes); None: SOP's
    photos: int  # distinct photo-sized JPEGs its rows cycle over
    speed_crop: int
    speed_resize: int
    warmup_steps: int
    timed_steps: int
    loader_batches: int
    reselection_classes: int  # greedy k-center on this many classes x pool_size candidates


SOP_TRAIN_CLASSES = data.EXPECTED_COUNTS["sop"]["train"][1]  # 11,318
# sized for the full check to end within 6 minutes on an H200 (issue 20; the estimate is in docs/gpu.md)
FULL = Scale(name="full", train_classes=400, test_classes=100, jpeg_size=(64, 80), crop=227, resize=256,
             backbone="bninception", eval_every=25, listing=None, photos=256, speed_crop=227, speed_resize=256,
             warmup_steps=3, timed_steps=20, loader_batches=40, reselection_classes=SOP_TRAIN_CLASSES)
QUICK = Scale(name="quick", train_classes=24, test_classes=8, jpeg_size=(20, 24), crop=16, resize=20,
              backbone="tiny_cnn", eval_every=3, listing={"train": (240, 48), "test": (96, 24)}, photos=8,
              speed_crop=64, speed_resize=72, warmup_steps=1, timed_steps=2, loader_batches=6,
              reselection_classes=2000)


# ----------------------------------------------------------------------------------------------
# Generated inputs: an SOP layout as data.py reads it (docs/DATASETS.md) and a BN-Inception weight file

def class_sizes(images: int, classes: int) -> list[int]:
    """`images` spread over `classes` as evenly as possible, the larger classes spread out too (so
    that a fold's block of classes holds its share of the images)."""
    return [(c + 1) * images // classes - c * images // classes for c in range(classes)]


def tinted_jpeg(path: Path, class_id: int, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """A noisy JPEG in a colour of its class: retrieval has something to find, and no two are equal."""
    tint = np.random.default_rng(class_id).integers(40, 216, 3)
    pixels = np.clip(tint + rng.integers(-40, 41, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def write_sop_layout(root: Path, sizes: dict[str, list[int]], jpeg_size: tuple[int, int] = (20, 24),
                     photos: list[str] | None = None) -> Path:
    """Stanford_Online_Products/Ebay_{train,test}.txt under root, sizes[split][c] images of class c
    (train classes first, then test classes, ids from 1). Each row gets its own tinted JPEG, or,
    with `photos`, the rows cycle over those files (paths relative to the layout)."""
    base = root / "Stanford_Online_Products"
    (base / "images").mkdir(parents=True, exist_ok=True)
    rng, row, class_id = np.random.default_rng(0), 0, 0
    for split in ("train", "test"):
        lines = ["image_id class_id super_class_id path"]
        for size in sizes[split]:
            class_id += 1
            for _ in range(size):
                if photos is None:
                    relative = f"images/{row:06d}.jpg"
                    tinted_jpeg(base / relative, class_id, rng, jpeg_size)
                else:
                    relative = os.path.relpath(photos[row % len(photos)], base)
                row += 1
                lines.append(f"{row} {class_id} 1 {relative}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_bninception_weights(path: Path) -> Path:
    """A BN-Inception weight file with the port's key names (model.py), from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = model.BNInception().state_dict()
    torch.save({k: v.clone() for k, v in weights.items()}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Running train.py quietly, and comparing two runs bit for bit

@contextlib.contextmanager
def quiet(log: Path):
    """train.py's console story goes to `log`; data.py's warnings about a layout's counts are expected."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f, contextlib.redirect_stdout(f), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*docs/DATASETS.md says")
        yield


def train_quietly(config: str, overrides: list[str], log: Path) -> None:
    with quiet(log):
        train.run(train.load_config(ROOT / "configs" / config, overrides))
    gc.collect()  # free the last run's loaders and device memory before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(a: Any, b: Any, where: str, differences: list[str]) -> int:
    """Append to `differences` every leaf where a and b differ bit for bit; return the leaves compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() ^ b.keys(), key=str):
            differences.append(f"{where}.{key}: only in one run")
        return sum(compare(a[k], b[k], f"{where}.{k}", differences) for k in a.keys() & b.keys())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return sum(compare(x, y, f"{where}[{i}]", differences) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if not same_bits(a, b):
            gap = f" (max |diff| {(a.double() - b.double()).abs().max().item():.3g})" \
                if a.shape == b.shape and a.is_floating_point() and b.is_floating_point() else ""
            differences.append(f"{where}{gap}")
        return 1
    if type(a) is not type(b) or isinstance(a, (list, tuple)):  # other kinds, or sequences of other lengths
        differences.append(f"{where}: {kind(a)} vs {kind(b)}")
        return 1
    if a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
        differences.append(f"{where}: {a!r} vs {b!r}")
    return 1


def kind(x: Any) -> str:
    return f"{type(x).__name__} of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the bytes, not ==: -0.0 == 0.0 and NaN != NaN would hide or invent differences
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def run_record(run_dir: Path) -> dict:
    """What must agree between two runs: both checkpoints, the log and the results, without the
    fields that name the run's folder, the commit or the wall-clock."""
    record = {}
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            state = bookkeeping.load_checkpoint(run_dir / name)
            record[name] = {k: v for k, v in state.items() if k not in ("config", "git_commit")}
    record["metrics.jsonl"] = [{k: v for k, v in r.items() if k != "seconds"}
                               for r in bookkeeping.read_jsonl(run_dir / "metrics.jsonl")]
    results = json.loads((run_dir / "results.json").read_text())
    record["results.json"] = {k: v for k, v in results.items() if k not in ("config", "git_commit")}
    return record


def compare_runs(a: Path, b: Path) -> tuple[int, list[str]]:
    differences: list[str] = []
    return compare(run_record(a), run_record(b), "", differences), differences


def describe_failure(err: Exception) -> str:
    """The error in one line: a kernel that refuses determinism by name, and the project line that called it."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if Path(f.filename).resolve().is_relative_to(ROOT) and "site-packages" not in f.filename]
    at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    kernel = NO_DETERMINISTIC_KERNEL.search(str(err))
    if kernel:
        return f"kernel {kernel.group(1)} has no deterministic implementation{at}"
    if "deterministic" in str(err).lower():
        return f"refused under deterministic algorithms: {str(err).splitlines()[0][:300]}{at}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}{at}"


# ----------------------------------------------------------------------------------------------
# 1. Determinism and 2. resume

def run_overrides(method: str, scale: Scale, layout: Path, weights: Path, device: str, workers: int) -> list[str]:
    """Overrides of a method's shipped config for a short run with validations and re-selections inside."""
    E = scale.eval_every
    fit_classes = scale.train_classes - scale.train_classes // 4  # fold 0 validates on the first block
    cfg = train.load_config(ROOT / "configs" / METHOD_CONFIGS[method])
    overrides = [f"dataset.root={layout}", f"device={device}", "fold=0", "repeats=1", f"train.max_steps={4 * E}",
                 f"train.eval_every={E}", "train.patience=1000", "train.log_every_seconds=1e9",
                 "projection.instance_patience=1", "projection.min_delta=1.0", f"data.num_workers={workers}",
                 f"data.crop_size={scale.crop}", f"data.resize={scale.resize}",
                 f"data.classes_per_batch={min(cfg['data']['classes_per_batch'], fit_classes)}"]
    if scale.backbone == "bninception":
        overrides.append(f"model.pretrained={weights}")
    else:
        overrides += [f"model.backbone={scale.backbone}", "model.pretrained=null",
                      "model.backbone_kwargs={in_channels: 3}"]
    if method in ("proxy_anchor", "proxynca++", "softtriple"):
        overrides.append(f"baseline.warmup_steps={E // 2}")  # warm-up and full training both inside the run
    if method == "xbm":
        overrides += [f"baseline.xbm_start_step={E // 2}", "baseline.xbm_memory_batches=2"]  # memory full, loss on
    return overrides


def check_determinism(method: str, overrides: list[str], workdir: Path) -> tuple[dict, list[str]]:
    """Two runs of one method with identical settings: they must agree bit for bit."""
    start = time.perf_counter()
    entry = {"method": method, "config": f"configs/{METHOD_CONFIGS[method]}", "identical": False, "compared": 0,
             "differences": [], "error": None}
    try:
        for name in ("a", "b"):
            train_quietly(METHOD_CONFIGS[method], overrides + [f"run_dir={workdir / method / name}"],
                          workdir / f"{method}.log")
        entry["compared"], entry["differences"] = compare_runs(workdir / method / "a", workdir / method / "b")
        entry["identical"] = not entry["differences"]
    except Exception as err:  # a kernel without a deterministic implementation, or any other failure
        entry["error"] = describe_failure(err)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if entry["error"]:
        return entry, [f"determinism, {method}: {entry['error']}"]
    if not entry["identical"]:
        return entry, [f"determinism, {method}: two identical runs differ in {len(entry['differences'])} of "
                       f"{entry['compared']} values, first {entry['differences'][0]}"]
    return entry, []


def check_resume(overrides: list[str], interrupt: int, straight: Path, workdir: Path) -> tuple[dict, list[str]]:
    """MS-CCP stopped after `interrupt` steps, then continued with resume=auto, against the straight run."""
    start, run_dir = time.perf_counter(), workdir / f"resumed_{interrupt}"
    entry = {"interrupt": interrupt, "identical": False, "compared": 0, "differences": [], "error": None}
    total = next(o for o in overrides if o.startswith("train.max_steps="))
    try:
        if not (straight / "results.json").exists():
            raise RuntimeError("the uninterrupted MS-CCP run of the determinism section did not finish")
        first = [o for o in overrides if o != total] + [f"train.max_steps={interrupt}", f"run_dir={run_dir}"]
        train_quietly(METHOD_CONFIGS["ccp"], first, workdir / "resume.log")
        train_quietly(METHOD_CONFIGS["ccp"], overrides + [f"run_dir={run_dir}", "resume=auto"], workdir / "resume.log")
        entry["compared"], entry["differences"] = compare_runs(straight, run_dir)
        entry["identical"] = not entry["differences"]
    except Exception as err:
        entry["error"] = describe_failure(err)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if entry["error"] or not entry["identical"]:
        detail = entry["error"] or f"{len(entry['differences'])} values differ, first {entry['differences'][0]}"
        return entry, [f"resume at step {interrupt}: {detail}"]
    return entry, []


# ----------------------------------------------------------------------------------------------
# Settings every run gets (bookkeeping.make_deterministic), checked where they matter

def tf32_allowed(kind: str) -> bool:
    """Whether cuDNN convolutions ("conv") or CUDA matmuls ("matmul") may round float32 to TF32."""
    legacy = torch.backends.cudnn if kind == "conv" else torch.backends.cuda.matmul
    try:
        allowed = bool(legacy.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy read once the fp32_precision API was used
        current = torch.backends.cudnn.conv if kind == "conv" else torch.backends.cuda.matmul
        return current.fp32_precision == "tf32"
    return allowed or (kind == "matmul" and torch.get_float32_matmul_precision() != "highest")


def check_settings(device: torch.device) -> tuple[dict, list[str]]:
    settings = {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32_conv": tf32_allowed("conv"),
                "tf32_matmul": tf32_allowed("matmul"),
                "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory}
    problems = [] if settings["deterministic_algorithms"] else [
        "settings: bookkeeping.make_deterministic left torch.use_deterministic_algorithms off"]
    if device.type == "cuda":  # TF32 and cuBLAS's workspace matter only there
        for kind, switch in (("conv", "torch.backends.cudnn.allow_tf32"),
                             ("matmul", "torch.backends.cuda.matmul.allow_tf32")):
            if settings[f"tf32_{kind}"]:
                problems.append(f"settings: TF32 is allowed for {kind} after bookkeeping.make_deterministic: "
                                f"results are not float32's; set {switch} = False there")
        if settings["cudnn_benchmark"]:
            problems.append("settings: torch.backends.cudnn.benchmark is on: cuDNN may pick other algorithms per run")
        if not settings["CUBLAS_WORKSPACE_CONFIG"]:
            problems.append("settings: CUBLAS_WORKSPACE_CONFIG is unset: cuBLAS is not deterministic")
    return settings, problems


# ----------------------------------------------------------------------------------------------
# 3. Speed and memory on an SOP-sized fold

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def state_bytes(r: build.Run) -> int:
    """Bytes of the tensors a run keeps between steps (weights, buffers, gradients, the optimiser's
    moments, theta_anchor, proxies, XBM's memory), each storage counted once: exact on any device."""
    modules = [m for m in (r.network, r.objective, r.memory) if m is not None]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [t.grad for t in list(tensors) if t.grad is not None]
    tensors += [t for state in r.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += r.ccp.anchor.anchors if isinstance(r.ccp, train.CCP) else []
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def step_variant(config: str, overrides: list[str], run_dir: Path, log: Path, warmup_steps: int) -> dict:
    """The run train.py would build (build.training_run), a random batch of 8 x 4 images on its
    device, and its pull lambda (theta - theta_anchor) switched on as in every instance after the
    first; warmed up (allocator, Adam's moments), with the memory it took: built and warmed up before
    the next variant is built, so that the peak is its own."""
    cfg = train.load_config(ROOT / "configs" / config, overrides + [f"run_dir={run_dir}"])
    device = build.resolve_device(cfg["device"])
    before = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with quiet(log):
        r = build.training_run(cfg, 0, cfg["seed"], run_dir, "", train.CCP if cfg["method"] == "ccp" else train.NoCCP)
    dc, lam = cfg["data"], cfg["projection"]["lam"]
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(dc["classes_per_batch"] * dc["samples_per_class"], 3, dc["crop_size"], dc["crop_size"],
                         generator=g) * 50  # about the spread of Caffe-BGR pixels (data.CaffeBGR)
    labels = torch.arange(dc["classes_per_batch"]).repeat_interleave(dc["samples_per_class"])
    pull = (lambda: r.ccp.anchor.add_to_grad(lam)) if isinstance(r.ccp, train.CCP) else None
    v = {"run": r, "cfg": cfg, "inputs": inputs.to(device), "labels": labels.to(device), "pull": pull, "times": []}
    for _ in range(warmup_steps):
        timed_step(v)
    v["state_bytes"] = state_bytes(r)
    v["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return v


class StepCounter(TorchDispatchMode):
    """Counts, in what runs inside it, the operations that do work (`ops`: every dispatched operation but
    views, about one GPU kernel launch each, which costs the host microseconds) and the host reads
    (`host_reads`: what makes the host wait for a GPU's queue to drain: a value read on the host, .item(),
    float(), bool(), .tolist(), .numpy(), or a result whose shape depends on values, nonzero,
    masked_select, unique, indexing with a boolean mask). On a CPU nothing waits, but the same places
    are counted."""

    WAITING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique")

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func.__name__.split(".")[0] in ("index", "index_put", "index_put_") and any(
            index is not None and index.dtype == torch.bool for index in args[1])
        self.host_reads += masked or any(op in func.__name__ for op in self.WAITING_OPS)
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> StepCounter:
        # .tolist() and .numpy() read a tensor on the host: a CPU tensor's memory without dispatching an operation,
        # a device tensor's through a copy (_to_copy, which no name in WAITING_OPS matches): counted here, once
        self.patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self.patched.items():
            def counted(tensor, *args, _method=method, **kwargs):
                self.host_reads += 1
                return _method(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, method)
        super().__exit__(*exc)


def step_counts(v: dict) -> dict:
    """Operations and host reads in one training step of a variant (StepCounter)."""
    r = v["run"]
    with StepCounter() as counter:
        train.train_step(r.network, r.compute_loss, r.optimizer, v["inputs"], v["labels"], v["pull"])
    return {"ops": counter.ops, "host_reads": counter.host_reads}


def timed_step(v: dict) -> float:
    r = v["run"]
    synchronize(r.device)
    start = time.perf_counter()
    train.train_step(r.network, r.compute_loss, r.optimizer, v["inputs"], v["labels"], v["pull"])
    synchronize(r.device)
    return time.perf_counter() - start


def timed_network(v: dict) -> float:
    """The network's forward and backward alone on the step's batch: the floor under a step."""
    network = v["run"].network
    network.zero_grad(set_to_none=True)  # as a step starts: no accumulation into the last step's gradients
    synchronize(v["run"].device)
    start = time.perf_counter()
    network(v["inputs"]).sum().backward()
    synchronize(v["run"].device)
    network.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_steps(variants: dict[str, dict], scale: Scale) -> dict:
    """Timed steps alternating between the variants (and plain's network alone), so that machine noise
    hits them alike."""
    network_times = []
    for _ in range(scale.timed_steps):
        for v in variants.values():
            v["times"].append(timed_step(v))
        network_times.append(timed_network(variants["plain"]))
    figures = {name: {"median_ms": 1000 * statistics.median(v["times"]), "min_ms": 1000 * min(v["times"]),
                      "state_bytes": v["state_bytes"], "peak_bytes": v["peak_bytes"], **step_counts(v)}
               for name, v in variants.items()}
    figures["network_ms"] = 1000 * statistics.median(network_times)
    r = variants["ccp"]["run"]
    proxies = r.objective.proxies.weight
    figures["ccp_over_plain"] = figures["ccp"]["median_ms"] / figures["plain"]["median_ms"]
    # the defaults (model.channels_last, model.fold_bn: auto) are "ccp"; the other choice of each was measured beside
    cl, nchw = (figures.get(name, figures["ccp"])["median_ms"] for name in ("ccp_channels_last", "ccp_nchw"))
    folded, unfolded = (figures.get(name, figures["ccp"])["median_ms"] for name in ("ccp_folded", "ccp_unfolded"))
    figures.update(channels_last_over_nchw=cl / nchw, unfolded_over_folded=unfolded / folded,
                   ccp_layout="channels_last" if r.network.channels_last else "NCHW",
                   ccp_fold_bn=r.network.backbone.fold_bn)
    figures["proxies"] = list(proxies.shape)
    figures["anchor_bytes"] = sum(a.numel() * a.element_size() for a in r.ccp.anchor.anchors)
    figures["proxy_bytes"] = proxies.numel() * proxies.element_size()
    figures["batch"] = len(variants["ccp"]["labels"])
    figures["image_size"] = variants["ccp"]["cfg"]["data"]["crop_size"]
    return figures


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def measure_reselection(cfg: dict, classes: int) -> dict:
    """Greedy k-center from P* on `classes` x pool_size candidates (PAPER.md §5), on the host where
    train.CCP.select runs it, and the two statistics that function logs (each twice: for P*
    and for the new proxies). The candidates' embedding is not in it: the projection adds it."""
    C, b, K, d = classes, cfg["ccp"]["pool_size"], cfg["ccp"]["proxies_per_class"], cfg["model"]["embedding_dim"]
    g = torch.Generator().manual_seed(0)
    pool, converged = torch.randn(C, b, d, generator=g), torch.randn(C * K, d, generator=g)
    new, kcenter_s = timed(lambda: selection.select_proxies(pool, converged, K))
    n, center_labels = build.normalizer(cfg), torch.arange(C).repeat_interleave(K)
    points, point_labels = n(pool.reshape(-1, d)), torch.arange(C).repeat_interleave(b)
    _, covering_s = timed(lambda: selection.covering_radius(points, point_labels, n(new), center_labels))
    _, interclass_s = timed(lambda: selection.mean_interclass_distance(n(new), center_labels))
    return {"classes": C, "pool_size": b, "per_class": K, "kcenter_ms": 1000 * kcenter_s,
            "covering_radius_s": covering_s, "interclass_distance_s": interclass_s}


def measure_validation(v: dict) -> dict:
    """One validation pass as train.validate runs it: embed the fold's validation classes, MAP@R; decoding
    the images (as a test pass or a candidate pool does), and from data.decoded's copy (decoded once
    per model, timed too, then read at every validation: data.cache_validation)."""
    r, cfg = v["run"], v["cfg"]
    workers, decoding = build.loader_workers(cfg), r.splits["val"]  # decoded at every pass (speed_overrides)
    (embeddings, labels), embed_s = timed(lambda: train.embed_normalized(r.network, decoding, cfg, r.device))
    _, metrics_s = timed(lambda: evaluate.retrieval_metrics(embeddings, labels, recall_ks=(1,)))
    cached, build_s = timed(lambda: data.decoded(decoding, workers, cfg["data"]["eval_batch_size"]))
    (again, _), cached_s = timed(lambda: train.embed_normalized(r.network, cached, cfg, r.device))
    return {"images": len(labels), "classes": decoding.num_classes, "embed_s": embed_s, "metrics_s": metrics_s,
            "images_per_s": len(labels) / embed_s, "workers": workers,
            "decoded_once": {"build_s": build_s, "embed_s": cached_s, "images_per_s": len(labels) / cached_s,
                             "bytes": cached.images.nbytes, "identical": torch.equal(again, embeddings)}}


def loader_rate(loader, sampler, device: torch.device, batches: int) -> float:
    """Images/s a training loader delivers to the device, after its first batch (worker start-up)."""
    sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        inputs, labels = next(iterator)
        inputs.to(device, non_blocking=True)  # as train.py's loop: pinned memory, asynchronous copy
        images += len(labels)
    synchronize(device)
    return images / (time.perf_counter() - start)


LOADER_MARGIN = 1.2  # the loader keeps up when it delivers this many times what a step consumes (issue 20)


def measure_loader(v: dict, step_ms: float, scale: Scale) -> dict:
    """The config's training loader against the step's appetite (with LOADER_MARGIN); if it falls short,
    more workers."""
    r = v["run"]
    workers = r.loader.num_workers
    delivered = loader_rate(r.loader, r.sampler, r.device, scale.loader_batches)
    consumed = v["labels"].numel() * 1000 / step_ms
    figures = {"workers": workers, "images_per_s": delivered, "step_consumes_images_per_s": consumed,
               "keeps_up": delivered >= LOADER_MARGIN * consumed, "cpu_count": os.cpu_count(), "retry": None,
               "pin_memory": r.loader.pin_memory}
    more = min(os.cpu_count() or 1, math.ceil(max(workers, 1) * 1.05 * LOADER_MARGIN * consumed / delivered))
    if not figures["keeps_up"] and more > workers:
        loader = torch.utils.data.DataLoader(r.loader.dataset, batch_sampler=r.sampler, num_workers=more,
                                             persistent_workers=True, pin_memory=r.loader.pin_memory,
                                             generator=torch.Generator().manual_seed(0))
        figures["retry"] = {"workers": more, "images_per_s": loader_rate(loader, r.sampler, r.device,
                                                                         scale.loader_batches)}
    return figures


def speed_overrides(scale: Scale, listing: Path, weights: Path, device: str) -> list[str]:
    # no decoded copy of the validation split at build time: measure_validation times both ways itself
    return [f"dataset.root={listing}", f"device={device}", "fold=0", f"model.pretrained={weights}",
            f"data.crop_size={scale.speed_crop}", f"data.resize={scale.speed_resize}", "train.log_every_seconds=1e9",
            "data.cache_validation=false"]


def measure_speed(scale: Scale, listing: Path, weights: Path, device: str, workdir: Path) -> dict:
    overrides, log = speed_overrides(scale, listing, weights, device), workdir / "speed.log"
    on_cpu = build.on_cpu("auto", build.resolve_device(device))  # what auto chooses for both keys here
    layout = ("ccp_nchw", "model.channels_last=false") if on_cpu else ("ccp_channels_last", "model.channels_last=true")
    fold = ("ccp_unfolded", "model.fold_bn=false") if on_cpu else ("ccp_folded", "model.fold_bn=true")
    with warnings.catch_warnings():  # the config's workers, whatever the cores, is what is measured: no warning
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        # each default (model.channels_last and model.fold_bn: auto) against the other choice: the faster one here?
        variants = {name: step_variant(METHOD_CONFIGS[method], overrides + extra, workdir / f"speed_{name}", log,
                                       scale.warmup_steps)
                    for name, method, extra in (("plain", "baseline", []), ("ccp", "ccp", []),
                                                (layout[0], "ccp", [layout[1]]), (fold[0], "ccp", [fold[1]]))}
        steps = measure_steps(variants, scale)
        figures = {"step": steps, "reselection": measure_reselection(variants["ccp"]["cfg"], scale.reselection_classes),
                   "validation": measure_validation(variants["ccp"]),
                   "loader": measure_loader(variants["ccp"], steps["ccp"]["median_ms"], scale)}
    fit = variants["ccp"]["run"].splits["fit"]
    figures["validation"]["data"] = (f"the fold's validation classes of a generated SOP listing of "
                                     f"{len(fit) + figures['validation']['images']} training rows over "
                                     f"{scale.photos} distinct 500 x 375 JPEGs")
    return figures


# ----------------------------------------------------------------------------------------------
# 4. Projection: the wall-clock of a reproduction

# The supplement's Table 3 (PAPER.md §7): the average total steps of a fold model on SOP and In-Shop
TABLE3_STEPS = {
    "sop": {"c2": 62_000, "c2-xbm": 81_000, "c2-ccp": 69_000, "ms": 67_000, "ms-ccp": 91_000, "triplet": 93_000,
            "triplet-ccp": 124_000, "proxy_anchor": 54_000, "proxynca++": 88_000, "softtriple": 48_000},
    "inshop": {"c2": 114_000, "c2-xbm": 93_000, "c2-ccp": 127_000, "ms": 98_000, "ms-ccp": 131_000,
               "triplet": 73_000, "triplet-ccp": 115_000, "proxy_anchor": 87_000, "proxynca++": 103_000,
               "softtriple": 82_000},
}
HEADLINE = ("configs/sop_ms.yaml", "configs/cub_ms.yaml")  # the projections the check prints


def table3_steps(cfg: dict) -> tuple[int, str]:
    """Steps per fold model for a paper config, and the assumption: its Table 3 row (C1 has none: C2's;
    XBM's is C2-XBM); CUB and Cars have no rows: as many validations as the SOP row, at their interval."""
    method, loss = cfg["method"], cfg["loss"]["name"]
    if method in ("proxy_anchor", "proxynca++", "softtriple"):
        row = method
    else:
        row = "c2-xbm" if method == "xbm" else ("c2" if loss == "c1" else loss) + ("-ccp" if method == "ccp" else "")
    dataset, E = cfg["dataset"]["name"], cfg["train"]["eval_every"]
    note = " (Table 3 has no C1 rows)" if loss == "c1" and row != method else ""
    if dataset in TABLE3_STEPS:
        return TABLE3_STEPS[dataset][row], f"Table 3's {row} row for {dataset}{note}"
    validations = TABLE3_STEPS["sop"][row] // 250
    return validations * E, (f"no {dataset} rows in Table 3: as many validations as its sop {row} row "
                             f"({validations}){note}")


def project(cfg: dict, speed: dict) -> dict:
    """Hours of `python train.py <cfg>` (every fold and repeat) from the measured figures, with the steps
    of table3_steps: every step at the pace of the slower of step (MS-CCP's for CCP, plain MS's for the
    rest) and loader; validations at the images/s of data.decoded's copy where that was measured (plus
    decoding it once per model), else of the decoding pass; re-selections' candidates and the test pass
    at the decoding pass's images/s; retrieval metrics scaled from the validation pass by (images /
    measured images)^2 (exact k-NN). NMI and the ensembles are not counted."""
    steps, assumption = table3_steps(cfg)
    val, loader, step = speed["validation"], speed["loader"], speed["step"]
    dataset = cfg["dataset"]["name"]
    train_images, train_classes = data.EXPECTED_COUNTS[dataset]["train"]
    test_images = sum(images for images, _ in data.EXPECTED_COUNTS[dataset].values()) - train_images
    fit_classes, val_classes = (len(c) for c in data.mlrc_folds(range(train_classes), cfg["folds"])[0])
    val_images = train_images * val_classes / train_classes
    E, per_class = cfg["train"]["eval_every"], cfg["ccp"]["proxies_per_class"]
    pool = cfg["ccp"]["pool_size"] * (per_class if cfg["ccp"]["pool_size"] < per_class else 1)

    def pass_s(images: float, images_per_s: float = val["images_per_s"]) -> float:
        return images / images_per_s + val["metrics_s"] * (images / val["images"]) ** 2

    ccp = cfg["method"] == "ccp"
    step_s = max(step["ccp" if ccp else "plain"]["median_ms"] / 1000, step["batch"] / loader["images_per_s"])
    evaluations = steps // E
    # an instance lasts at least 1 + instance_patience validations (PAPER.md §2), plus the first selection
    reselections = [1, 1 + evaluations // (1 + cfg["projection"]["instance_patience"])] if ccp else [0, 0]
    sel, ratio = speed["reselection"], fit_classes / speed["reselection"]["classes"]
    # k-center and the covering radius grow with the classes, the mean inter-class distance with their square
    select_s = sel["kcenter_ms"] / 1000 * ratio + 2 * (sel["covering_radius_s"] * ratio +
                                                       sel["interclass_distance_s"] * ratio ** 2)
    embed_s = fit_classes * pool / val["images_per_s"]
    # validations: from the images decoded once per model (data.cache_validation), where that was measured
    once = val.get("decoded_once") if cfg["data"]["cache_validation"] else None
    validation_s = pass_s(val_images) if once is None else pass_s(val_images, once["images_per_s"])
    decode_once_s = 0.0 if once is None else once["build_s"] * val_images / val["images"]
    fixed = steps * step_s + decode_once_s + evaluations * validation_s + pass_s(test_images)
    models = cfg["folds"] * cfg["repeats"]
    hours = [models * (fixed + n * (embed_s + select_s)) / 3600 for n in reselections]
    return {"steps_per_model": steps, "assumption": assumption, "folds": cfg["folds"], "repeats": cfg["repeats"],
            "eval_every": E, "validations_per_model": evaluations, "reselections_per_model": reselections,
            "step_s": step_s, "validation_s": validation_s, "candidates": fit_classes * pool,
            "reselection_embed_s": embed_s, "reselection_select_s": select_s, "test_s": pass_s(test_images),
            "hours": hours}


def paper_configs() -> dict[Path, dict]:
    """The shipped configs of the paper's four datasets (not their base files), loaded."""
    configs = {path: train.load_config(path) for path in sorted((ROOT / "configs").glob("*.yaml"))
               if not path.name.startswith("base_")}
    return {path: cfg for path, cfg in configs.items() if cfg["dataset"]["name"] in ("cub", "cars", "sop", "inshop")}


def projections(speed: dict, configs: list[str] = HEADLINE) -> dict:
    return {config: project(train.load_config(ROOT / config), speed) for config in configs}


def cost(cfg: dict, report: dict) -> tuple[str, dict]:
    """What a paper config costs by a saved report's figures ("12 models (4 folds x 3 repeats), about
    43-68 h on <device>"), and its projection."""
    p = project(cfg, report["speed"])
    low, high = (round(h) for h in p["hours"])
    hours = f"{low} h" if low == high else f"{low}-{high} h"
    return f"{p['folds'] * p['repeats']} models ({p['folds']} folds x {p['repeats']} repeats), about {hours} on " \
           f"{report['device']}", p


def cost_comment(summary: str, report_path: Path) -> str:
    """The `# cost:` line that heads a paper config."""
    return f"# cost: {summary} (benchmarks/gpu_check.py --costs benchmarks/{report_path.name})"


def costs(report_path: Path, write: bool) -> str:
    """Every paper config's projection from a saved report, one line each; with `write`, each config's
    `# cost:` comment line is set from it (after the header comment)."""
    report = json.loads(report_path.read_text())
    lines = [f"projected wall-clock of every paper config from {report_path}:"]
    for path, cfg in paper_configs().items():
        summary, p = cost(cfg, report)
        lines.append(f"  {path.name:<28} {summary}; {p['steps_per_model']} steps each: {p['assumption']}")
        if write:
            comment = cost_comment(summary, report_path)
            text = [line for line in path.read_text().splitlines(keepends=True) if not line.startswith("# cost:")]
            header = next(i for i, line in enumerate(text) if not line.startswith("#"))
            text = "".join(text[:header] + [comment + "\n"] + text[header:])
            bookkeeping.atomic_write(path, lambda tmp: tmp.write_text(text))  # noqa: B023 (called at once)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The report

def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "cpu"
    return f"cpu ({cpu}, {threads} threads)"


def format_report(report: dict) -> str:
    lines = [f"gpu_check ({report['mode']} mode) on {report['device']}, torch {report['torch']}, "
             f"faiss {report['faiss']}, python {report['python']}",
             "settings after bookkeeping.make_deterministic: " + ", ".join(
                 f"{k}={v}" for k, v in report["settings"].items())]
    if report["determinism"]:
        lines.append(f"1. determinism: two runs of each method ({report['runs']})")
        for e in report["determinism"]:
            verdict = e["error"] or ("identical" if e["identical"] else
                                     f"DIFFERENT in {len(e['differences'])} values, first {e['differences'][0]}")
            lines.append(f"   {e['method']:<13} {verdict} ({e['compared']} values compared, {e['seconds']:.0f} s)")
    if report["resume"]:
        lines.append("2. resume: MS-CCP interrupted, then resume=auto, against the uninterrupted run")
        for e in report["resume"]:
            verdict = e["error"] or ("identical" if e["identical"] else
                                     f"DIFFERENT in {len(e['differences'])} values, first {e['differences'][0]}")
            lines.append(f"   interrupted at step {e['interrupt']}: {verdict} ({e['compared']} values compared)")
    speed = report["speed"]
    if speed:
        s, sel, val, ld = speed["step"], speed["reselection"], speed["validation"], speed["loader"]
        lines.append(f"3. speed and memory: BN-Inception, batch {s['batch']}, {s['image_size']} x {s['image_size']}, "
                     f"{s['proxies'][0]} proxies of dimension {s['proxies'][1]}")
        for name, label in (("plain", "plain MS"), ("ccp", "MS-CCP"), ("ccp_nchw", "MS-CCP, NCHW"),
                            ("ccp_channels_last", "MS-CCP, NHWC"), ("ccp_unfolded", "MS-CCP, BN unfolded"),
                            ("ccp_folded", "MS-CCP, BN folded")):
            if name not in s:
                continue
            f = s[name]
            lines.append(f"   {label:<19} {f['median_ms']:9.1f} ms/step median ({f['min_ms']:.1f} min), peak "
                         f"{mib(f['peak_bytes'])}, state kept between steps {mib(f['state_bytes'])}, "
                         f"{f['ops']} ops and {f['host_reads']} host reads a step")
        lines.append(f"   the network's forward and backward alone (plain's, same batch): {s['network_ms']:.1f} ms")
        lines.append(f"   layout: channels_last / NCHW: {s['channels_last_over_nchw']:.3f} (the default here, "
                     f"model.channels_last: auto, is {s['ccp_layout']}); BatchNorm unfolded / folded: "
                     f"{s['unfolded_over_folded']:.3f} (the default here, model.fold_bn: auto, is "
                     f"{'folded' if s['ccp_fold_bn'] else 'unfolded'})")
        extra = s["ccp"]["state_bytes"] - s["plain"]["state_bytes"]
        lines.append(f"   MS-CCP / plain: {s['ccp_over_plain']:.3f}; extra state {mib(extra)} = theta_anchor "
                     f"{mib(s['anchor_bytes'])} + 4 x proxies {mib(s['proxy_bytes'])} (values, gradient, Adam's two "
                     f"moments)" + (f"; extra peak {mib(s['ccp']['peak_bytes'] - s['plain']['peak_bytes'])}"
                                     if s["ccp"]["peak_bytes"] is not None else ""))
        lines.append(f"   proxy re-selection, {sel['classes']} classes x pool {sel['pool_size']}, K "
                     f"{sel['per_class']}, on the host: greedy k-center {sel['kcenter_ms']:.1f} ms; the statistics it "
                     f"logs twice: "
                     f"covering radius {sel['covering_radius_s']:.2f} s, inter-class distance "
                     f"{sel['interclass_distance_s']:.2f} s (embedding the candidates: see 4.)")
        lines.append(f"   validation pass: {val['images']} images of {val['classes']} classes ({val['data']}), "
                     f"{val['workers']} workers: embed {val['embed_s']:.1f} s ({val['images_per_s']:.0f} images/s), "
                     f"MAP@R {val['metrics_s']:.2f} s")
        once = val["decoded_once"]
        lines.append(f"   the same from data.decoded's copy ({mib(once['bytes'])}, built in {once['build_s']:.1f} s): "
                     f"embed {once['embed_s']:.1f} s ({once['images_per_s']:.0f} images/s), "
                     f"{'identical embeddings' if once['identical'] else 'DIFFERENT embeddings'}")
        retry = f"; with {ld['retry']['workers']} workers {ld['retry']['images_per_s']:.0f} images/s" \
            if ld["retry"] else ""
        lines.append(f"   training loader: {ld['workers']} workers deliver {ld['images_per_s']:.0f} images/s, an "
                     f"MS-CCP step consumes {ld['step_consumes_images_per_s']:.0f}: "
                     f"{'keeps up' if ld['keeps_up'] else 'FALLS SHORT'} of {LOADER_MARGIN} x{retry} "
                     f"({ld['cpu_count']} CPUs)")
    if report["projection"]:
        lines.append("4. projection" + (" (from reduced figures: no prediction)" if report["mode"] == "quick" else ""))
        for config, p in report["projection"].items():
            low, high = p["hours"]
            lines.append(f"   python train.py {config}: {low:.1f} to {high:.1f} h ({p['folds']} folds x "
                         f"{p['repeats']} repeats x {p['steps_per_model']} steps; {p['assumption']})")
            if p["repeats"] > 1:  # repeats=1: each fold model once
                lines.append(f"      one repeat ({p['folds']} fold models, repeats=1): {low / p['repeats']:.1f} to "
                             f"{high / p['repeats']:.1f} h")
            lines.append(f"      per fold model: step {1000 * p['step_s']:.0f} ms, {p['validations_per_model']} "
                         f"validations of {p['validation_s']:.1f} s, {p['reselections_per_model'][0]} to "
                         f"{p['reselections_per_model'][1]} re-selections of {p['reselection_embed_s']:.1f} s "
                         f"(embedding {p['candidates']} candidates) + {p['reselection_select_s']:.1f} s (selection), "
                         f"test {p['test_s']:.0f} s")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()) +
                 f"; CPU time of the process and its workers {report['cpu_seconds']:.0f} s")
    lines += ["problems:"] + [f"  - {p}" for p in report["problems"]] if report["problems"] else []
    lines.append(f"gpu_check: {len(report['problems'])} problems")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def generate_inputs(scale: Scale, workdir: Path) -> tuple[Path, Path, Path]:
    """The weight file, the determinism runs' layout (2-5 JPEGs a class, like SOP's smaller classes)
    and the speed section's listing."""
    weights = write_bninception_weights(workdir / "bn_inception.pth")
    sizes = {split: [2 + c % 4 for c in range(n)] for split, n in (("train", scale.train_classes),
                                                                    ("test", scale.test_classes))}
    layout = write_sop_layout(workdir / "sop", sizes, scale.jpeg_size)
    counts = scale.listing or {split: data.EXPECTED_COUNTS["sop"][split] for split in ("train", "test")}
    photo_folder = workdir / "listing" / "Stanford_Online_Products"
    photo_folder.mkdir(parents=True, exist_ok=True)
    listing = write_sop_layout(workdir / "listing", {split: class_sizes(*counts[split]) for split in counts},
                               photos=photo_like_jpegs(photo_folder, scale.photos))
    return weights, layout, listing


def speed_section(scale: Scale, listing: Path, weights: Path, device: str, workdir: Path) -> tuple[dict, dict, list]:
    """Speed, memory and the projection; a slow loader is a problem of the full check only."""
    try:
        speed = measure_speed(scale, listing, weights, device, workdir)
    except Exception as err:
        return {}, {}, [f"speed: {describe_failure(err)}"]
    ld, problems = speed["loader"], []
    if not speed["validation"]["decoded_once"]["identical"]:
        problems.append("validation: the embeddings of data.decoded's copy differ from those of the decoding pass")
    if not ld["keeps_up"] and scale.name == "full":
        problems.append(f"loader: {ld['workers']} workers deliver {ld['images_per_s']:.0f} images/s, an MS-CCP "
                        f"step consumes {ld['step_consumes_images_per_s']:.0f}" + (
                            f"; {ld['retry']['workers']} workers deliver {ld['retry']['images_per_s']:.0f}"
                            if ld["retry"] else ""))
    return speed, projections(speed), problems


def check(device: str, scale: Scale, workdir: Path, workers: int, save: Callable[[dict], None]) -> dict:
    """Every section in order; returns the report, its problems listed under "problems". `save` gets
    the report after each section, so that a run stopped at a time limit still leaves its figures."""
    E = scale.eval_every
    bookkeeping.make_deterministic(0)  # what every run does first; it also sets cuBLAS's workspace before CUDA starts
    settings, problems = check_settings(build.resolve_device(device))
    report = {"mode": scale.name, "device": device_name(build.resolve_device(device), torch.get_num_threads()),
              "torch": torch.__version__, "faiss": evaluate.faiss.__version__, "python": platform.python_version(),
              "scale": asdict(scale), "settings": settings,
              "runs": f"{4 * E} steps, validation every {E}, re-selections at steps {2 * E} and {4 * E}, "
                      f"{scale.backbone}, {scale.crop} x {scale.crop}, {scale.train_classes} + {scale.test_classes} "
                      f"generated classes, {workers} loader workers",
              "determinism": [], "resume": [], "speed": {}, "projection": {}, "seconds": {}, "problems": problems}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        result, report["seconds"][name] = timed(fn)
        print(f"gpu_check: {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
        return result

    def entries(key: str, checked: tuple[dict, list[str]]) -> None:
        entry, found = checked
        report[key].append(entry)
        problems.extend(found)
        print(f"gpu_check: {key} {entry.get('method', entry.get('interrupt'))}: "
              f"{'identical' if entry['identical'] else found[0]}", file=sys.stderr, flush=True)
        save(report)

    save(report)  # the machine and its settings, before the first section
    weights, layout, listing = section("inputs", lambda: generate_inputs(scale, workdir))
    runs = workdir / "runs"
    overrides = {method: run_overrides(method, scale, layout, weights, device, workers) for method in METHOD_CONFIGS}
    section("determinism", lambda: [entries("determinism", check_determinism(m, overrides[m], runs))
                                    for m in METHOD_CONFIGS])
    section("resume", lambda: [entries("resume", check_resume(overrides["ccp"], interrupt, runs / "ccp" / "a", runs))
                               for interrupt in (2 * E, 2 * E + E // 2 + 1)])  # at a validation; between two
    report["speed"], report["projection"], found = section(
        "speed", lambda: speed_section(scale, listing, weights, device, workdir))
    problems.extend(found)
    save(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (CUDA when available)")
    parser.add_argument("--quick", action="store_true", help="the reduced check (a CPU in CI)")
    parser.add_argument("--out", default="runs/gpu_check.json", help="where the report is written as JSON")
    parser.add_argument("--workdir", default=None, help="keep the generated data and runs here (default: a "
                                                        "temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick, "
                                                                   "else torch's)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of the determinism runs "
                                                                  "(default: 0 with --quick, else up to 12: "
                                                                  "results do not depend on it)")
    parser.add_argument("--costs", type=Path, default=None, help="print every paper config's projected hours from "
                                                                    "this saved report's figures, and check nothing")
    parser.add_argument("--write-configs", action="store_true", help="with --costs: set each config's # cost: line")
    args = parser.parse_args(argv)
    if args.costs:
        print(costs(args.costs, args.write_configs))
        return 0
    scale = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    workers = args.workers
    if workers is None:  # the full check's runs on a GPU machine's cores: results do not depend on it
        workers = 0 if args.quick else min(12, max(4, (os.cpu_count() or 1) - 2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        report["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in usage)
        out.write_text(json.dumps(report, indent=2) + "\n")

    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        report = check(args.device, scale, workdir, workers, save)
    print(format_report(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
