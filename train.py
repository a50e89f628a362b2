"""Train and evaluate deep metric learning with chance constraints (CCP) from one YAML file.

usage: python train.py CONFIG.yaml [key=value ...]
  e.g. python train.py configs/digits_ccp.yaml
       python train.py configs/sop_ms.yaml fold=0 run_dir=runs/sop_ms_fold0
       python train.py configs/sop_ms.yaml resume=auto          (continue an interrupted run)
       python train.py configs/sop_ms.yaml eval_only=true resume=runs/sop_ms/fold0/best.pt run_dir=runs/eval

The composition root of the project (DESIGN.md): it reads and validates the config, builds the data
(data.py), the network (model.py), the objective (losses.py), the projection machinery
(projection.py) and proxy selection (selection.py), and runs the algorithm of PAPER.md §2 as one
straight loop. Around that loop it owns the MLRC protocol of PAPER.md §7 (class-disjoint folds,
the 128-D mean and the 512-D ensemble, repeats), checkpoints and exact resumption, logging, and the
final test evaluation of PAPER.md §6. `eval_only: true` evaluates a saved checkpoint.

Everything a run depends on is a config key; DEFAULTS below lists every key with the paper's value.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

import data
import evaluate
import losses
import model as models
import projection
import selection

# ----------------------------------------------------------------------------------------------
# Configuration. Every key a run can use, with the defaults of the paper and the authors' code
# (PAPER.md §2, §7). A config file names only what differs; `base:` points at a file to inherit.

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "run_dir": "runs/default",
    "resume": None,  # a checkpoint path, or "auto" for run_dir/last.pt if it exists
    "eval_only": False,  # with resume: evaluate that checkpoint on the test split
    "device": "auto",  # auto (CUDA when available) | cpu | cuda | cuda:N
    "method": "ccp",  # ccp | baseline | proxy_anchor | proxynca++ | softtriple | xbm
    "normalization": "lipschitz",  # n(x) of PAPER.md §3: lipschitz | l2 (ablation)
    "folds": 4,  # class-disjoint blocks of the training classes (PAPER.md §7)
    "fold": None,  # train only this fold (0-based); None trains all `folds` models
    "repeats": 1,  # run everything with seeds seed .. seed + repeats - 1
    "dataset": {
        "name": "sop",  # cub | cars | sop | inshop | digits
        "root": "data",  # the folder the archive was extracted into
    },
    "data": {
        "transform": "bninception",  # bninception | resnet | digits (data.build_transform)
        "crop_size": 227,
        "resize": 256,
        "classes_per_batch": 8,  # batch 32 = 8 classes x 4 images (PAPER.md §7)
        "samples_per_class": 4,
        "eval_batch_size": 128,
        "num_workers": 4,
    },
    "model": {
        "backbone": "bninception",  # bninception | resnet50 | tiny_cnn | mlp
        "pretrained": "imagenet",  # a path, a known name (model.py), or null for random weights
        "embedding_dim": 128,
        "pooling": "avg",  # avg | max
        "freeze_bn": True,  # BatchNorm gamma, beta and running statistics frozen (MLRC)
        "backbone_kwargs": {},  # keyword arguments of the backbone, e.g. {in_channels: 3} for tiny_cnn
    },
    "loss": {
        "name": "ms",  # c1 | c2 | triplet | ms (losses.LOSSES)
        "params": {},  # keyword arguments of that loss, e.g. {alpha: 2, beta: 40, base: 0.5}
    },
    "ccp": {
        "pair_weight": 0.1,  # w_pair (PAPER.md §2)
        "proxy_weight": 1.0,  # w_proxy
        "proxies_per_class": 4,  # K
        "pool_size": 7,  # b: candidate images per class for k-center (PAPER.md §5)
        "proxy_init": "kcenter",  # kcenter (PAPER.md §5) | random: drawn once, never re-selected (ablation)
    },
    "projection": {
        "lam": 2.0e-4,  # lambda; 0 switches the projection off (ablation)
        "decay": 1.0,  # lambda_t = lam * decay^t for instance t >= 1
        "instance_patience": 3,
        "min_evaluations": 1,
        "min_delta": 1.0e-5,
    },
    "baseline": {
        "params": {},  # keyword arguments of the baseline loss module (losses.py)
        "proxy_lr_multiplier": 100.0,  # proxy baselines (PAPER.md §4)
        "warmup_steps": 0,  # steps that train only the embedding layer and the loss's parameters
        "xbm_memory_batches": 25,  # XBM memory size, in batches
        "xbm_start_step": 1000,  # the memory starts filling here; its loss is on once it is full
    },
    "train": {
        "max_steps": 100_000,
        "eval_every": 250,  # validation interval E (25 for CUB and Cars)
        "patience": 60,  # overall early stopping, in evaluations
        "lr": 1.0e-5,
        "betas": [0.9, 0.999],  # Keras defaults, which the authors' code runs
        "eps": 1.0e-7,
        "weight_decay": 1.0e-4,  # coupled L2, added to the gradient before clipping
        "clip_norm": 10.0,
        "clip_value": 10.0,
        "log_every_seconds": 20.0,
    },
    "evaluation": {
        "recall_ks": [1, 10, 100, 1000],
        "nmi": True,
    },
}
# Keys whose default is null, with the type they take otherwise.
NULLABLE = {"resume": str, "fold": int, "model.pretrained": str}
# Keys that hold keyword arguments of a function chosen by another key: checked against its signature.
KWARGS_KEYS = ("loss.params", "baseline.params", "model.backbone_kwargs")
KWARGS_LEAVES = {key.rsplit(".", 1)[1] for key in KWARGS_KEYS}
CHOICES = {
    "method": ("ccp", "baseline", "proxy_anchor", "proxynca++", "softtriple", "xbm"),
    "normalization": tuple(losses.NORMALIZATIONS),
    "dataset.name": ("cub", "cars", "sop", "inshop", "digits"),
    "loss.name": tuple(losses.LOSSES),
    "ccp.proxy_init": ("kcenter", "random"),
    "model.pooling": ("avg", "max"),
    "model.backbone": tuple(models.BACKBONES),
}
PROXY_BASELINES = {
    "proxy_anchor": losses.ProxyAnchor,
    "proxynca++": losses.ProxyNCAPlusPlus,
    "softtriple": losses.SoftTriple,
}


class ConfigError(ValueError):
    """A config file or override that cannot be run; the message names the key and the file."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in KWARGS_KEYS:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        # a keyword-argument mapping is replaced as a whole: a loss's parameters never mix with another's
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in KWARGS_LEAVES:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its `base:` files merged under it (paths relative to the file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `base:` files form a cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(_read_yaml(path.parent / base, chain + (path,)), tree)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    tree[leaf] = value


def _check_type(key: str, value: Any, default: Any) -> None:
    if value is None and key in NULLABLE:
        return
    expected = NULLABLE.get(key, type(default))
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is list and ok:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"config key {key}: expected {expected.__name__}, got {value!r} ({type(value).__name__})")


def _check_kwargs(key: str, params: Any, fn: Callable) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"config key {key}: expected a mapping of keyword arguments, got {params!r}")
    valid = [
        name for name, p in inspect.signature(fn).parameters.items()
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
    ]
    valid = [v for v in valid if v not in ("generator", "normalize")]
    for name in params:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {key}.{close[0]}?" if close else ""
            raise ConfigError(f"config key {key}.{name} is not a parameter of {fn.__name__} "
                              f"(valid: {', '.join(valid)}){hint}")


def validate_config(cfg: dict) -> dict:
    """Every key known, every value of the right type and among the choices; returns cfg."""
    defaults, flat = _flatten(DEFAULTS), _flatten(cfg)
    for key, value in flat.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key}{hint}")
        _check_type(key, value, defaults[key])
        choices = CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")
    _check_kwargs("loss.params", cfg["loss"]["params"], losses.LOSSES[cfg["loss"]["name"]])
    _check_kwargs("model.backbone_kwargs", cfg["model"]["backbone_kwargs"], models.BACKBONES[cfg["model"]["backbone"]])
    if cfg["method"] in PROXY_BASELINES:
        _check_kwargs("baseline.params", cfg["baseline"]["params"], PROXY_BASELINES[cfg["method"]])
    if cfg["fold"] is not None and not 0 <= cfg["fold"] < cfg["folds"]:
        raise ConfigError(f"config key fold: {cfg['fold']} is outside 0..{cfg['folds'] - 1} (folds: {cfg['folds']})")
    for key in ("train.max_steps", "train.eval_every", "folds", "repeats", "data.classes_per_batch",
                "data.samples_per_class", "ccp.proxies_per_class", "ccp.pool_size"):
        if flat[key] < 1:
            raise ConfigError(f"config key {key}: must be at least 1, got {flat[key]}")
    if cfg["method"] not in PROXY_BASELINES:
        for key in ("baseline.params", "baseline.warmup_steps"):
            if flat[key]:
                raise ConfigError(f"config key {key} applies to the proxy baselines "
                                  f"({', '.join(PROXY_BASELINES)}), not to method {cfg['method']}")
    if cfg["eval_only"] and not cfg["resume"]:
        raise ConfigError("eval_only: true needs resume: PATH, the checkpoint to evaluate")
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- the file (with its bases) <- `key=value` overrides, validated."""
    cfg = _merge(DEFAULTS, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        _set_dotted(cfg, key, value)
    try:
        return validate_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Small utilities: atomic files, seeding, provenance.

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


# Keys a checkpoint must agree on with the config that resumes it: they shape the saved state.
STATE_SHAPING_KEYS = ("method", "dataset.name", "folds", "model.backbone", "model.embedding_dim",
                      "model.pooling", "model.freeze_bn", "model.backbone_kwargs", "ccp.proxies_per_class")


def load_checkpoint(path: str | Path, cfg: dict | None = None) -> dict:
    """A checkpoint written by this script; with cfg, also check that cfg can continue from it."""
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
        saved, wanted = _flatten(state["config"]), _flatten(cfg)
        differ = [k for k in STATE_SHAPING_KEYS if saved.get(k) != wanted[k]]
        if differ:
            raise ConfigError(f"resume: {path} was trained with " + ", ".join(
                f"{k}={saved.get(k)!r}" for k in differ) + " but the config says " + ", ".join(
                f"{k}={wanted[k]!r}" for k in differ))
    return state


def holds_results(run_dir: Path) -> bool:
    """Whether run_dir (or a fold/seed folder in it) already holds a checkpoint or results to keep."""
    return run_dir.is_dir() and any(any(run_dir.rglob(name)) for name in ("last.pt", "results.json"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} asked for, but CUDA is not available here")
    return device


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


# ----------------------------------------------------------------------------------------------
# Building the pieces from the config.

def build_splits(cfg: dict, fold: int) -> dict:
    """The fit and validation classes of one MLRC fold, and the test split(s) (PAPER.md §7)."""
    name, root, dc = cfg["dataset"]["name"], cfg["dataset"]["root"], cfg["data"]
    train_tf = data.build_transform(dc["transform"], True, dc["crop_size"], dc["resize"])
    eval_tf = data.build_transform(dc["transform"], False, dc["crop_size"], dc["resize"])
    train = data.build_dataset(name, root, "train")
    fit_classes, val_classes = data.mlrc_folds(sorted(set(train.labels)), cfg["folds"])[fold]
    splits = {
        "fit": data.class_subset(train.with_transform(train_tf), fit_classes),
        "val": data.class_subset(train.with_transform(eval_tf), val_classes),
    }
    test_names = ("query", "gallery") if name == "inshop" else ("test",)
    for split in test_names:
        splits[split] = data.build_dataset(name, root, split, eval_tf)
    return splits


def normalizer(cfg: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return losses.NORMALIZATIONS[cfg["normalization"]]


def build_objective(cfg: dict, num_classes: int, dim: int, seed: int) -> torch.nn.Module | None:
    """The loss module that owns learnable proxies, if the method has one (PAPER.md §2, §4)."""
    generator = torch.Generator().manual_seed(seed + 1)
    if cfg["method"] == "ccp":
        proxies = losses.Proxies(num_classes, cfg["ccp"]["proxies_per_class"], dim, generator=generator)
        return losses.CCPLoss(losses.LOSSES[cfg["loss"]["name"]], proxies, cfg["ccp"]["pair_weight"],
                              cfg["ccp"]["proxy_weight"], normalize=normalizer(cfg), **cfg["loss"]["params"])
    if cfg["method"] in PROXY_BASELINES:
        return PROXY_BASELINES[cfg["method"]](num_classes, dim, generator=generator, **cfg["baseline"]["params"])
    return None


def build_optimizer(cfg: dict, network: torch.nn.Module, objective: torch.nn.Module | None) -> torch.optim.Adam:
    """Adam at a constant learning rate; proxies of the baselines get a multiplier (PAPER.md §4, §7)."""
    tc = cfg["train"]
    groups = [{"params": [p for p in network.parameters() if p.requires_grad], "lr": tc["lr"]}]
    if objective is not None and any(True for _ in objective.parameters()):
        multiplier = cfg["baseline"]["proxy_lr_multiplier"] if cfg["method"] in PROXY_BASELINES else 1.0
        groups.append({"params": list(objective.parameters()), "lr": tc["lr"] * multiplier})
    return torch.optim.Adam(groups, lr=tc["lr"], betas=tuple(tc["betas"]), eps=tc["eps"], weight_decay=0.0)


def decayed_parameters(network: torch.nn.Module, objective: torch.nn.Module | None) -> list[torch.Tensor]:
    """Every trainable tensor but BatchNorm's, proxies included: what the authors' L2 decays (PAPER.md §2)."""
    batchnorm = models.batchnorm_parameter_names(network)
    params = [p for name, p in network.named_parameters() if p.requires_grad and name not in batchnorm]
    return params + ([] if objective is None else list(objective.parameters()))


# ----------------------------------------------------------------------------------------------
# One update, in the authors' order (PAPER.md §2): gradient of the loss -> + lambda_t (theta -
# theta_anchor) -> + coupled weight decay -> clip the global norm -> clip each value -> Adam.

class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def train_step(network: torch.nn.Module, compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
               decayed: list[torch.Tensor], tc: dict, anchor: projection.ProximalAnchor | None = None,
               lam: float = 0.0) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(network(inputs), labels)
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value}")
    loss.backward()
    if anchor is not None and lam > 0:
        anchor.add_to_grad(lam)  # gradient of (lambda_t / 2) ||theta - theta_anchor||^2
    with torch.no_grad():
        for p in decayed:
            if p.grad is not None:
                p.grad.add_(p, alpha=tc["weight_decay"])  # coupled L2: before clipping, unlike Adam(weight_decay)
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(trainable, tc["clip_norm"])
    torch.nn.utils.clip_grad_value_(trainable, tc["clip_value"])
    optimizer.step()
    return value


# ----------------------------------------------------------------------------------------------
# Embedding, validation and proxy selection.

def eval_loader(dataset, cfg: dict, sampler=None) -> torch.utils.data.DataLoader:
    workers = cfg["data"]["num_workers"]
    return torch.utils.data.DataLoader(dataset, batch_size=cfg["data"]["eval_batch_size"], sampler=sampler,
                                       num_workers=workers, generator=torch.Generator().manual_seed(0))


def embed_normalized(network, dataset, cfg: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n(f(x)) for a whole split: retrieval runs in the space the loss shapes (DESIGN.md)."""
    embeddings, labels = evaluate.embed(network, eval_loader(dataset, cfg), device)
    return normalizer(cfg)(embeddings), labels


def reselect_proxies(cfg: dict, network, objective: losses.CCPLoss, fit, current: torch.Tensor | None,
                     device: torch.device, seed: int, instance: int) -> dict:
    """P <- select(pool(theta), initial = P*, K): greedy k-center on fresh candidates (PAPER.md §5).

    The pool is embedded by the current network in inference mode with the training augmentation,
    and k-center runs on raw f(x); the covering radius is logged in the normalised space.
    """
    per_class = cfg["ccp"]["proxies_per_class"]
    pool_size = cfg["ccp"]["pool_size"]
    if pool_size < per_class:
        pool_size *= per_class  # the authors enlarge a pool smaller than K to b * K (PAPER.md §5)

    def embed_fn(indices: list[int]) -> torch.Tensor:
        # one augmentation seed per candidate, from a stream that is stable across numpy versions
        seeds = np.random.SeedSequence([seed, instance]).generate_state(len(indices), np.uint64) >> np.uint64(1)
        keys = [(i, int(s)) for i, s in zip(indices, seeds)]
        return evaluate.embed(network, eval_loader(fit, cfg, sampler=keys), device)[0]

    class_to_indices = [[] for _ in range(fit.num_classes)]
    for index, label in enumerate(fit.labels):
        class_to_indices[label].append(index)
    generator = torch.Generator().manual_seed(seed * 1000 + instance)
    pool, resampled = selection.candidate_pool(embed_fn, class_to_indices, pool_size, generator,
                                               batch_size=len(class_to_indices) * pool_size)
    new = selection.select_proxies(pool, current, per_class)
    n = normalizer(cfg)
    points = n(pool.reshape(-1, pool.shape[-1]))
    point_labels = torch.arange(pool.shape[0]).repeat_interleave(pool.shape[1])
    center_labels = objective.proxies.labels.cpu()
    report = {"pool_size": pool_size, "classes_resampled": resampled}
    for when, centers in (("before", objective.proxies.weight.detach().cpu()), ("after", new)):
        report[f"covering_radius_{when}"] = selection.covering_radius(points, point_labels, n(centers), center_labels)[1]
        report[f"interclass_distance_{when}"] = selection.mean_interclass_distance(n(centers), center_labels)
    objective.proxies.reset(new.to(objective.proxies.weight.device))
    return report


def test_embeddings(cfg: dict, network, splits: dict, device: torch.device) -> dict[str, tuple]:
    names = ("query", "gallery") if "query" in splits else ("test",)
    return {name: embed_normalized(network, splits[name], cfg, device) for name in names}


def test_metrics(cfg: dict, embedded: dict[str, tuple]) -> dict[str, float]:
    """P@1, P@R, MAP@R, R@K and NMI on the test classes (PAPER.md §6)."""
    query, query_labels = embedded.get("query", embedded.get("test"))
    gallery, gallery_labels = embedded.get("gallery", (None, None))
    metrics = evaluate.retrieval_metrics(query, query_labels, gallery, gallery_labels,
                                         recall_ks=tuple(cfg["evaluation"]["recall_ks"]))
    if cfg["evaluation"]["nmi"]:
        metrics["NMI"] = evaluate.nmi(query, query_labels, seed=0)
    return metrics


# ----------------------------------------------------------------------------------------------
# Training one model: PAPER.md §2 as one loop.

def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host-memory copy of a module's state (theta*, P*): the device holds only theta_anchor."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


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


def train_one_model(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str = "") -> dict:
    """Train one model of one fold; return its test metrics and normalised test embeddings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))
    make_deterministic(seed)
    device = resolve_device(cfg["device"])
    tc, dc, method = cfg["train"], cfg["data"], cfg["method"]

    splits = build_splits(cfg, fold)
    fit, val = splits["fit"], splits["val"]
    tests = ", ".join(f"{len(d)} {name} images" for name, d in splits.items() if name not in ("fit", "val"))
    what = f"{cfg['loss']['name'].upper()}-CCP" if method == "ccp" else (
        f"{cfg['loss']['name'].upper()} (no proxies)" if method == "baseline" else method)
    print(f"{prefix}{what} on {cfg['dataset']['name']}, fold {fold} of {cfg['folds']}, seed {seed}: "
          f"{fit.num_classes} training classes ({len(fit)} images), {val.num_classes} validation classes "
          f"({len(val)}), {tests}; device {device}; writing to {run_dir}", flush=True)
    mc = cfg["model"]
    network = models.build_model(mc["backbone"], mc["embedding_dim"], mc["pretrained"], mc["pooling"],
                                 mc["freeze_bn"], seed=seed, backbone_kwargs=mc["backbone_kwargs"]).to(device)
    objective = build_objective(cfg, fit.num_classes, mc["embedding_dim"], seed)
    if objective is not None:
        objective.to(device)
    n = normalizer(cfg)
    pair_loss = losses.LOSSES[cfg["loss"]["name"]]
    memory = None
    if method == "xbm":
        size = cfg["baseline"]["xbm_memory_batches"] * dc["classes_per_batch"] * dc["samples_per_class"]
        memory = losses.CrossBatchMemory(pair_loss, mc["embedding_dim"], size, normalize=n,
                                         **cfg["loss"]["params"]).to(device)
    optimizer = build_optimizer(cfg, network, objective)
    decayed = decayed_parameters(network, objective)
    backbone_trainable = [p for p in network.backbone.parameters() if p.requires_grad]

    # The projection (PAPER.md §2): theta_anchor on the device, lambda_0 = 0 in the first instance.
    ccp = method == "ccp"
    anchor = projection.ProximalAnchor([p for p in network.parameters() if p.requires_grad]) if ccp else None
    controller = projection.AlternatingProjections(**cfg["projection"]) if ccp else None
    stopper = projection.EarlyStopping(tc["patience"], cfg["projection"]["min_delta"])
    sampler = data.MPerClassSampler(fit.labels, dc["samples_per_class"], dc["classes_per_batch"],
                                    tc["eval_every"], seed)
    loader = torch.utils.data.DataLoader(fit, batch_sampler=sampler, num_workers=dc["num_workers"],
                                         persistent_workers=dc["num_workers"] > 0,
                                         generator=torch.Generator().manual_seed(seed))

    def compute_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if objective is not None:
            return objective(embeddings, labels)
        loss = pair_loss(n(embeddings), labels, **cfg["loss"]["params"])
        if memory is not None and step >= cfg["baseline"]["xbm_start_step"]:
            if memory.is_full:  # past batches as extra references, then this batch joins the queue
                loss = loss + memory(embeddings, labels)
            else:  # the memory fills before its loss term is switched on (PAPER.md §4)
                memory.enqueue(embeddings.detach(), labels)
        return loss

    step, best_instance, log_path = 0, None, run_dir / "metrics.jsonl"
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    resume = cfg["resume"]
    if resume == "auto":
        resume = str(last_path) if last_path.exists() else None
    if resume:
        state = load_checkpoint(resume, cfg)
        network.load_state_dict(state["model"])
        if objective is not None:
            objective.load_state_dict(state["objective"])
        if memory is not None:
            memory.load_state_dict(state["memory"])
        optimizer.load_state_dict(state["optimizer"])
        # progress from the checkpoint, settings from the config: a resumed run may be given more patience
        if ccp:
            anchor.load_state_dict(state["anchor"])
            controller.load_state_dict({**state["controller"], **cfg["projection"]})
        stopper.load_state_dict({**state["stopper"], "patience": tc["patience"],
                                 "min_delta": cfg["projection"]["min_delta"]})
        sampler.load_state_dict(state["sampler"])
        best_instance, step = state["instance_best"], state["step"]
        set_rng_state(state["rng"])
        if log_path.exists():  # drop log lines written after the checkpoint we continue from
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        print(f"{prefix}resumed from {resume} at step {step}", flush=True)
    else:
        log_path.unlink(missing_ok=True)
        if ccp:
            anchor.anchor()
            if cfg["ccp"]["proxy_init"] == "kcenter":  # P <- select(pool(theta), initial = 0, K)
                report = reselect_proxies(cfg, network, objective, fit, None, device, seed, 0)
                append_jsonl({"step": 0, "instance": 0, "lam": 0.0, "selection": report}, log_path)
                print(f"{prefix}step 0: {objective.proxies.proxies_per_class} proxies per class chosen by k-center "
                      f"from pools of {report['pool_size']} images", flush=True)

    def checkpoint(path: Path) -> None:
        state = {
            "model": network.state_dict(),
            "objective": None if objective is None else objective.state_dict(),
            "memory": None if memory is None else memory.state_dict(),
            "optimizer": optimizer.state_dict(),
            "anchor": anchor.state_dict() if ccp else None,
            "controller": controller.state_dict() if ccp else None,
            "stopper": stopper.state_dict(),
            "sampler": sampler.state_dict(),
            "instance_best": best_instance,
            "step": step, "fold": fold, "seed": seed,
            "rng": rng_state(), "config": cfg, "git_commit": git_commit(),
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    progress = Progress(tc["max_steps"], tc["log_every_seconds"], dc["classes_per_batch"] * dc["samples_per_class"],
                        prefix)
    status, loss_value, started = "no validation yet", float("nan"), time.time()
    stopped = stopper.stale >= stopper.patience  # a finished run resumed with resume=auto goes straight to testing
    network.train()
    while step < tc["max_steps"] and not stopped:
        sampler.set_epoch(step // tc["eval_every"], step % tc["eval_every"])
        for inputs, labels in loader:
            for p in backbone_trainable:  # warm-up trains only the embedding layer and the loss's parameters
                p.requires_grad_(step >= cfg["baseline"]["warmup_steps"])
            lam = controller.lam if ccp else 0.0
            try:
                loss_value = train_step(network, compute_loss, optimizer, inputs.to(device), labels.to(device),
                                        decayed, tc, anchor, lam)
            except NonFiniteLoss as err:
                raise NonFiniteLoss(f"{err} at step {step + 1}; training stopped, {last_path} holds the "
                                    f"last good state") from None
            step += 1
            progress.update(step, loss_value, status)
            if step % tc["eval_every"]:
                if step >= tc["max_steps"]:  # stopped between validations: save, so resuming stays exact
                    checkpoint(last_path)
                    break
                continue

            # Validation MAP@R on the held-out classes, then the decisions of PAPER.md §2.
            val_metrics = evaluate.retrieval_metrics(*embed_normalized(network, val, cfg, device), recall_ks=(1,))
            score = val_metrics["MAP@R"]
            record = {"step": step, "instance": controller.instance if ccp else 0, "lam": lam,
                      "loss": loss_value, "val": val_metrics, "seconds": round(time.time() - started, 3)}
            overall = stopper.update(score)
            if overall == "improved":
                checkpoint(best_path)
            if ccp:
                decision = controller.update(score)
                if decision == "improved":  # theta*, P* of the current instance
                    best_instance = {"model": snapshot(network), "proxies": snapshot(objective.proxies)}
                elif decision == "converged":  # "project": theta_anchor <- theta*, new proxies far from P*
                    weights = best_instance["model"]
                    anchor.anchor([weights[name] for name, p in network.named_parameters() if p.requires_grad])
                    message = f"instance {controller.instance - 1} converged; lambda -> {controller.lam:g}"
                    if cfg["ccp"]["proxy_init"] == "kcenter":
                        report = reselect_proxies(cfg, network, objective, fit, best_instance["proxies"]["weight"],
                                                  device, seed, controller.instance)
                        record["selection"] = report
                        message += (f", proxies re-selected: covering radius {report['covering_radius_before']:.4f}"
                                    f" -> {report['covering_radius_after']:.4f}")
                    best_instance = None
                    print(f"{prefix}step {step}: {message}", flush=True)
            append_jsonl(record, log_path)
            stopped = overall == "stop"
            checkpoint(last_path)
            status = f"val MAP@R {score:.4f} (best {stopper.best:.4f})" + (
                f" | instance {controller.instance}, lambda {controller.lam:g}" if ccp else "")
            if stopped:
                print(f"{prefix}step {step}: no improvement for {tc['patience']} evaluations; stopping", flush=True)
            if stopped or step >= tc["max_steps"]:
                break
    progress.update(step, loss_value, status, force=True)

    # Restore the overall best weights and proxies, chosen on validation classes, then test.
    if best_path.exists():
        best = load_checkpoint(best_path)
        network.load_state_dict(best["model"])
        print(f"{prefix}best validation MAP@R {stopper.best:.4f} at step {best['step']}: testing that "
              f"checkpoint on the test classes", flush=True)
    else:
        best = {"step": step}
        print(f"{prefix}no validation ran (max_steps {tc['max_steps']} < eval_every {tc['eval_every']}): "
              f"testing the last weights", flush=True)
    embedded = test_embeddings(cfg, network, splits, device)
    metrics = test_metrics(cfg, embedded)
    result = {"fold": fold, "seed": seed, "best_step": best["step"], "best_val_MAP@R": stopper.best,
              "steps": step, "test": metrics}
    save_json(result, run_dir / "results.json")
    return {**result, "embeddings": embedded}


# ----------------------------------------------------------------------------------------------
# The protocol: folds, 512-D ensemble, repeats (PAPER.md §7), and evaluating a checkpoint.

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


def ensemble_metrics(cfg: dict, parts: list[dict[str, tuple]]) -> dict[str, float]:
    """Metrics of the concatenated, per-part L2-normalised embeddings of the fold models (MLRC)."""
    joined = {name: (evaluate.ensemble([p[name][0] for p in parts]), parts[0][name][1]) for name in parts[0]}
    return test_metrics(cfg, joined)


def run(cfg: dict) -> dict:
    """Train every requested (seed, fold) model and write run_dir/results.json."""
    run_dir = Path(cfg["run_dir"])
    if cfg["resume"] is None and holds_results(run_dir):
        raise ConfigError(f"run_dir {run_dir} already holds a run; continue it with resume=auto, or choose "
                          f"another run_dir (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))
    folds = range(cfg["folds"]) if cfg["fold"] is None else [cfg["fold"]]
    seeds = [cfg["seed"] + r for r in range(cfg["repeats"])]
    results: dict[str, Any] = {"config": cfg, "git_commit": git_commit(), "models": []}
    per_seed = []
    for seed in seeds:
        trained = []
        for fold in folds:
            model_dir = run_dir
            if len(seeds) > 1:
                model_dir = model_dir / f"seed{seed}"
            if len(folds) > 1:
                model_dir = model_dir / f"fold{fold}"
            prefix = f"[seed {seed} fold {fold}] " if len(seeds) * len(folds) > 1 else ""
            trained.append(train_one_model(cfg, fold, seed, model_dir, prefix))
            results["models"].append({k: v for k, v in trained[-1].items() if k != "embeddings"})
        summary = {"seed": seed, "mean": summarize([t["test"] for t in trained])[0]}
        if len(trained) > 1:
            summary["ensemble"] = ensemble_metrics(cfg, [t["embeddings"] for t in trained])
        per_seed.append(summary)
    results["per_seed"] = per_seed
    results["mean"], results["sd"] = summarize([s["mean"] for s in per_seed])
    if "ensemble" in per_seed[0]:
        results["ensemble_mean"], results["ensemble_sd"] = summarize([s["ensemble"] for s in per_seed])
    save_json(results, run_dir / "results.json")
    dim = cfg["model"]["embedding_dim"]
    over_seeds = f", mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else ""
    print(f"\ntest metrics, {dim}-D" + (f", mean of {len(folds)} fold models" if len(folds) > 1 else "") + over_seeds)
    print(table_with_sd(results["mean"], results["sd"] if over_seeds else None))
    if "ensemble_mean" in results:
        print(f"\ntest metrics, {dim * len(folds)}-D ensemble of the {len(folds)} fold models" + over_seeds)
        print(table_with_sd(results["ensemble_mean"], results["ensemble_sd"] if over_seeds else None))
    print(f"\nresults: {run_dir / 'results.json'}")
    return results


def evaluate_checkpoint(cfg: dict) -> dict:
    """eval_only: rebuild the checkpoint's network, evaluate it on the test split, print the table."""
    path, run_dir = Path(cfg["resume"]), Path(cfg["run_dir"])
    if holds_results(run_dir):
        raise ConfigError(f"eval_only: run_dir {run_dir} already holds a run's results; set run_dir to a new "
                          f"folder so that nothing there is overwritten")
    state = load_checkpoint(path)
    # the network and n(x) as the checkpoint was trained; the test data and metrics from cfg
    trained = state["config"]
    mc = trained["model"]
    network = models.build_model(mc["backbone"], mc["embedding_dim"], None, mc["pooling"], mc["freeze_bn"],
                                 backbone_kwargs=mc["backbone_kwargs"])
    network.load_state_dict(state["model"])
    device = resolve_device(cfg["device"])
    cfg = {**cfg, "normalization": trained["normalization"]}
    splits = build_splits(cfg, state["fold"])
    metrics = test_metrics(cfg, test_embeddings(cfg, network.to(device), splits, device))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json({"checkpoint": str(path), "step": state["step"], "test": metrics}, run_dir / "results.json")
    print(f"test metrics of {path} (step {state['step']})")
    print(evaluate.format_table(metrics))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        if cfg["eval_only"]:
            evaluate_checkpoint(cfg)
        else:
            run(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as err:  # ConfigError is a ValueError
        # bad input (config, files, data, weights) is reported in one message, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
