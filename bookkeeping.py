"""Run bookkeeping for train.py: atomic files, the JSON-lines log, provenance, RNG state, checkpoints,
the console progress line and the mean ± sd tables of a run's results.

Nothing here knows the algorithm. A checkpoint is one dict: every stateful object of a run under its
name (its `state_dict()`), plus the step, fold, seed, RNG state, the resolved config and the git
commit. `save_checkpoint` and `restore_checkpoint` take the same mapping of objects, so the list of
what a run must carry to continue exactly is written once, in train.py. Files are written through a
temporary file and a rename, so a crash never leaves a half-written checkpoint, log or result.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import evaluate
from config import ConfigError, flatten

# Keys a checkpoint must agree on with the config that resumes it: they shape the saved state.
STATE_SHAPING_KEYS = ("method", "dataset.name", "folds", "model.backbone", "model.embedding_dim",
                      "model.pooling", "model.freeze_bn", "model.backbone_kwargs", "ccp.proxies_per_class")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def append_jsonl(record: dict, path: Path) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def git_commit() -> str | None:
    """The commit this code came from (with '-dirty' for uncommitted changes), saved in checkpoints."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def make_deterministic(seed: int) -> None:
    """One seed for every global generator, and deterministic kernels (CUDA included)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, stateful: dict[str, Any], **progress: Any) -> None:
    """Every object's state_dict under its name (None stays None), the progress, RNG and provenance."""
    state = {name: None if obj is None else obj.state_dict() for name, obj in stateful.items()}
    state.update(progress, rng=rng_state(), git_commit=git_commit())
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def restore_checkpoint(state: dict, stateful: dict[str, Any]) -> None:
    """The inverse of save_checkpoint for the same mapping of objects; also restores the RNG state."""
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    set_rng_state(state["rng"])


def load_checkpoint(path: str | Path, cfg: dict | None = None) -> dict:
    """A checkpoint written by train.py; with cfg, also check that cfg can continue from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (resume: takes a last.pt or best.pt, or auto)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign files fail in many ways inside torch/pickle
        raise ConfigError(f"resume: cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or not {"model", "config", "step", "fold"} <= state.keys():
        raise ConfigError(f"resume: {path} is not a checkpoint written by train.py "
                          f"(expected a dict with model, config, step and fold)")
    if cfg is not None:
        saved, wanted = flatten(state["config"]), flatten(cfg)
        differ = [k for k in STATE_SHAPING_KEYS if saved.get(k) != wanted[k]]
        if differ:
            raise ConfigError(f"resume: {path} was trained with " + ", ".join(
                f"{k}={saved.get(k)!r}" for k in differ) + " but the config says " + ", ".join(
                f"{k}={wanted[k]!r}" for k in differ))
    return state


def holds_results(run_dir: Path) -> bool:
    """Whether run_dir (or a fold/seed folder in it) already holds a checkpoint or results to keep."""
    return run_dir.is_dir() and any(any(run_dir.rglob(name)) for name in ("last.pt", "results.json"))


class Progress:
    """A console line a few times a minute: step/total, loss, images/s, ETA, last MAP@R."""

    def __init__(self, total: int, every: float, batch: int, prefix: str):
        self.total, self.every, self.batch, self.prefix = total, every, batch, prefix
        self.start = self.last = time.time()
        self.first_step = None

    def update(self, step: int, loss: float, status: str, force: bool = False) -> None:
        now = time.time()
        if self.first_step is None:
            self.first_step, self.start = step, now
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        print(f"{self.prefix}step {step:>6}/{self.total} | loss {loss:.4f} | {rate * self.batch:7.1f} img/s "
              f"| ETA {eta_text} (at most) | {status}", flush=True)


def summarize(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation of each metric over models; a count that every model shares
    (queries_without_match: a property of the test split) stays an integer."""
    mean, sd = {}, {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(isinstance(v, int) and v == values[0] for v in values):
            mean[key], sd[key] = values[0], 0
        else:
            mean[key] = float(np.mean(values))
            sd[key] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, sd


def table_with_sd(mean: dict[str, float], sd: dict[str, float] | None) -> str:
    """evaluate.format_table of the means, with "± sd" (in points) beside each fraction."""
    lines = evaluate.format_table(mean).splitlines()
    if sd is None:
        return "\n".join(lines)
    return "\n".join(lines[:1] + [line + (f" ± {100 * sd[key]:.2f}" if not isinstance(mean[key], int) else "")
                                   for line, key in zip(lines[1:], (line.split()[0] for line in lines[1:]))])
