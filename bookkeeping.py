"""Run bookkeeping for train.py: atomic files, the JSON-lines log, provenance, RNG state, checkpoints,
the console progress line and the mean ± sd tables of a run's results.

Nothing here knows the algorithm. A checkpoint is one dict: every stateful object of a run under its
name (its `state_dict()`), plus the step, fold, seed, RNG state, the resolved config and the git
commit. `save_checkpoint` and `restore_checkpoint` take the same mapping of objects, so the list of
what a run must carry to continue exactly is written once, in train.py. Files are written through a
temporary file and a rename, so a crash never leaves a half-written checkpoint, log or result.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import io
import json
import math
import os
import pickle
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
import yaml

import evaluate
from config import ConfigError, flatten

# Keys a checkpoint must agree on with the config that resumes it: they shape the saved state.
STATE_SHAPING_KEYS = ("method", "dataset.name", "folds", "model.backbone", "model.embedding_dim",
                      "model.pooling", "model.freeze_bn", "model.backbone_kwargs", "ccp.proxies_per_class",
                      "baseline.xbm_memory_batches", "data.sampler", "data.refill")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only folder: one message that names the file
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}; any previous version is kept") from None
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves no .tmp behind


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez through atomic_write, into a file that is closed before the rename (given a name, numpy
    would append .npz to the temporary one)."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def save_json(obj: Any, path: Path) -> None:
    """Strict JSON (allow_nan=False): NaN or Infinity is an error here, never a token other readers reject."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def append_jsonl(record: dict, path: Path) -> None:
    line = json.dumps(record, allow_nan=False) + "\n"
    try:
        with path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a full disk: one message that names the file (read_jsonl drops a torn last line)
        raise OSError(err.errno, f"cannot append to {path}: {err.strerror}") from None


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
    # no NaN fill of every new tensor: it costs time, and no op here reads memory it did not write (tests/test_model.py)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions and matrix products on CUDA:
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would change results between GPU generations


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next step instead of handing it back to the kernel,
    which every step would then fault in again (README, Benchmarks). Changes nothing computed.
    False, and nothing set, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load, or one without glibc's mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h parameter numbers
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def rng_state() -> dict:
    """The global generators' states as tensors and plain numbers (a checkpoint loads with weights_only)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, stateful: dict[str, Any], **progress: Any) -> None:
    """Every object's state_dict under its name (None stays None), the progress, RNG and provenance."""
    state = {name: None if obj is None else obj.state_dict() for name, obj in stateful.items()}
    state.update(progress, rng=rng_state(), git_commit=git_commit(), threads=torch.get_num_threads(),
                 versions=versions())
    buffer = io.BytesIO()  # serialised in memory: a full disk then fails the plain write with OSError (ENOSPC),
    torch.save(state, buffer)  # not torch's zip writer with "unexpected pos"
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def restore_checkpoint(state: dict, stateful: dict[str, Any]) -> None:
    """The inverse of save_checkpoint for the same mapping of objects; also restores the RNG state."""
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    set_rng_state(state["rng"])


# What every checkpoint of train.py holds besides the stateful objects (Run.save in build.py).
CHECKPOINT_KEYS = ("model", "config", "step", "fold", "seed", "best")


def load_checkpoint(path: str | Path, cfg: dict | None = None) -> dict:
    """A checkpoint written by train.py; with cfg, also check that cfg can continue from it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (resume: takes a last.pt or best.pt, or auto)")
    try:  # weights_only: tensors and plain Python values only, so a crafted file cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsupported is None:
            raise ConfigError(f"resume: cannot read checkpoint {path}: not a torch file, or a damaged one") from None
        raise ConfigError(f"resume: refused to load {path}: it holds a {unsupported.group(1)} object; a checkpoint of "
                          f"train.py holds only tensors and plain Python values, and loading anything else could "
                          f"run code") from None
    except Exception as err:  # truncated or foreign files fail in many ways inside torch/pickle
        raise ConfigError(f"resume: cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= state.keys():
        raise ConfigError(f"resume: {path} is not a checkpoint written by train.py "
                          f"(expected a dict with {', '.join(CHECKPOINT_KEYS)})")
    differ = None if cfg is None else _disagreement(flatten(state["config"]), flatten(cfg), STATE_SHAPING_KEYS)
    if differ:
        raise ConfigError(f"resume: {path} was trained with {differ}")
    return state


def _disagreement(saved: dict, wanted: dict, keys: tuple[str, ...]) -> str:
    """The keys whose values differ, as "k=saved, ... but the config says k=wanted, ..."; empty if none."""
    differ = [k for k in keys if saved.get(k) != wanted[k]]
    if not differ:
        return ""
    return (", ".join(f"{k}={saved[k]!r}" if k in saved else f"no {k} (older code)" for k in differ)
            + " but the config says " + ", ".join(f"{k}={wanted[k]!r}" for k in differ))


RUN_FILES = ("last.pt", "results.json", "metrics.jsonl", "config.yaml")


def holds_results(run_dir: Path) -> bool:
    """Whether run_dir (or a fold/seed folder in it) already holds a run's files, which are never overwritten."""
    return run_dir.is_dir() and any(any(run_dir.rglob(name)) for name in RUN_FILES)


class RunLock:
    """An exclusive lock on run_dir for one process (flock on run_dir/.lock, which the kernel releases
    when the process ends, killed or not); a second process is refused with the holder's name. Folders it
    made that hold nothing but the lock when an error leaves it are removed: a refused start leaves no trace."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.file = None
        self.made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ConfigError(f"run_dir {self.path.parent} is in use by {holder}; wait for it to end or choose "
                              f"another run_dir") from None
        try:
            file.truncate(0)
            file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            file.flush()
        except OSError as err:  # a full disk
            file.close()
            raise OSError(err.errno, f"cannot write the lock file {self.path}: {err.strerror}") from None
        self.file = file
        return self

    def __exit__(self, error_type, *exc) -> None:
        if error_type is not None and self.made and [p.name for p in self.made[0].iterdir()] == [".lock"]:
            self.path.unlink()
            with contextlib.suppress(OSError):  # stops at the first folder that is not empty (e.g. another's)
                for folder in self.made:
                    folder.rmdir()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def write_config_once(run_dir: Path, cfg: dict) -> None:
    """run_dir/config.yaml: the settings a run started with, never overwritten by a resume."""
    if not (run_dir / "config.yaml").exists():
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))


def record_segment(run_dir: Path, cfg: dict, from_step: int, resolved: dict) -> None:
    """segments.jsonl gains one line per start or resume of a model's training: the settings, commit
    and thread count that segment ran with (config.yaml keeps those the run started with), and what
    its auto keys resolved to."""
    write_config_once(run_dir, cfg)
    append_jsonl({"from_step": from_step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git_commit(),
                  "threads": torch.get_num_threads(), "versions": versions(), "config": cfg,
                  "resolved": resolved}, run_dir / "segments.jsonl")


def versions() -> dict[str, str]:
    """The library versions a result depends on (another version may change the last bits)."""
    return {"python": platform.python_version(), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "faiss": evaluate.faiss.__version__}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a torn last line (a crash mid-append) is dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({err}); the log is damaged") from None
    return records


def keep_log_until(path: Path, step: int) -> None:
    """Drop the records written after `step` (a resumed run continues from the checkpoint at `step`)."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record["step"] <= step]
    text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in kept)
    atomic_write(path, lambda tmp: tmp.write_text(text))


class Progress:
    """A console line a few times a minute: step/total, loss, images/s, and when the run will end: no
    sooner than early stopping allows (`steps_to_stop(step)`: if no evaluation improves from now on),
    no later than max_steps."""

    def __init__(self, total: int, every: float, batch: int, prefix: str, steps_to_stop: Callable[[int], int]):
        self.total, self.every, self.batch, self.prefix, self.steps_to_stop = total, every, batch, prefix, steps_to_stop
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
        latest = self.total - step
        earliest = min(latest, max(0, self.steps_to_stop(step)))
        shown = f"{loss:.4f}" if math.isfinite(loss) else "  --  "  # nan: no step taken yet (a guard stops on nan)
        print(f"{self.prefix}step {step:>6}/{self.total} | loss {shown} | {rate * self.batch:7.1f} img/s "
              f"| ends in {duration(earliest / rate if rate else math.nan)} (if no new best) to "
              f"{duration(latest / rate if rate else math.nan)} (max_steps) | {status}", flush=True)


def duration(seconds: float) -> str:
    """'3d 04:05:06', or '04:05:06' under a day; '--:--:--' before anything was measured."""
    if not math.isfinite(seconds):
        return "--:--:--"
    days, rest = divmod(round(seconds), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


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


# Keys that say which models a run directory holds: a resume may not change them.
RUN_SHAPING_KEYS = ("seed", "fold", "folds", "repeats")


def check_run_dir(cfg: dict, run_dir: Path) -> None:
    """A new run never overwrites one; a resumed run holds the same models as the run it continues."""
    if cfg["resume"] is None and holds_results(run_dir):
        raise ConfigError(f"run_dir {run_dir} already holds a run; continue it with resume=auto, or choose "
                          f"another run_dir (nothing was overwritten)")
    saved_path = run_dir / "config.yaml"
    if cfg["resume"] is not None and saved_path.exists():
        differ = _disagreement(yaml.safe_load(saved_path.read_text()), cfg, RUN_SHAPING_KEYS)
        if differ:
            raise ConfigError(f"resume: {run_dir} holds a run with {differ}; start a new run_dir for other models")


def print_results(cfg: dict, results: dict, n_seeds: int, n_folds: int, run_dir: Path) -> None:
    dim = cfg["model"]["embedding_dim"]
    over_seeds = f", mean ± sd over {n_seeds} seeds" if n_seeds > 1 else ""
    print(f"\ntest metrics, {dim}-D" + (f", mean of {n_folds} fold models" if n_folds > 1 else "") + over_seeds)
    print(table_with_sd(results["mean"], results["sd"] if over_seeds else None))
    if "ensemble_mean" in results:
        combos = (f", mean ± sd over the {results['ensemble_combinations']} combinations of one seed's model per fold"
                  if n_seeds > 1 else "")
        print(f"\ntest metrics, {dim * n_folds}-D ensemble of the {n_folds} fold models" + combos)
        print(table_with_sd(results["ensemble_mean"], results["ensemble_sd"] if n_seeds > 1 else None))
    print(f"\nresults: {run_dir / 'results.json'}\nfigures and tables (beside the paper's numbers where the paper has a row): "
          f"{shlex.join([interpreter(), 'report.py', str(run_dir)])}")


def interpreter() -> str:
    """The Python that runs this process, relative to the current folder when inside it (.venv/bin/python)."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
