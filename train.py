"""Train and evaluate deep metric learning with chance constraints (CCP) from one YAML file.

usage: python train.py CONFIG.yaml [key=value ...]
  e.g. python train.py configs/digits_ccp.yaml
       python train.py configs/sop_ms.yaml fold=0 run_dir=runs/sop_ms_fold0
       python train.py configs/sop_ms.yaml resume=auto          (continue an interrupted run)
       python train.py configs/sop_ms.yaml eval_only=true resume=runs/sop_ms/fold0/best.pt run_dir=runs/eval

Read it beside PAPER.md §2 (the paper's Algorithm 1): `train_one_model` is that algorithm, one step
a line, in order. Around it this file owns the MLRC protocol of PAPER.md §7 (class-disjoint folds,
the 128-D mean and the 512-D ensemble, repeats) and the test evaluation of PAPER.md §6; the pieces
come from data.py, model.py, losses.py, projection.py and selection.py, the config machinery from
config.py and checkpoints and logs from bookkeeping.py. `eval_only: true` evaluates a saved checkpoint.

Everything a run depends on is a config key; DEFAULTS below lists every key with the paper's value.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

import config
import data
import evaluate
import losses
import model
import projection
import selection
from bookkeeping import (Progress, append_jsonl, atomic_write, git_commit, holds_results, load_checkpoint,
                         make_deterministic, restore_checkpoint, save_checkpoint, save_json, summarize, table_with_sd)
from config import ConfigError

# Every key a run can use, with the defaults of the paper and the authors' code (PAPER.md §2, §7).
# A config file names only what differs; `base:` points at a file to inherit.
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


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- the file (with its `base:` files) <- `key=value` overrides, validated (config.py)."""
    return config.load_config(path, list(overrides), DEFAULTS)


# ----------------------------------------------------------------------------------------------
# Algorithm 1 (PAPER.md §2) for one model of one fold.

def train_one_model(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str = "") -> dict:
    """Train one model with CCP (or a baseline); return its test metrics and normalised test embeddings."""
    r = setup_run(cfg, fold, seed, run_dir, prefix)  # θ, P, optimiser, θ_anchor ← θ, P ← k-center; or resumed
    tc, E = cfg["train"], cfg["train"]["eval_every"]
    stopped = r.stopper.stale >= r.stopper.patience  # a finished run resumed with resume=auto goes to testing
    while r.step < tc["max_steps"] and not stopped:
        r.sampler.set_epoch(r.step // E, r.step % E)  # an epoch is one validation interval
        for inputs, labels in r.loader:  # a batch: m images of each of P classes (8 x 4, PAPER.md §7)
            # L = w_pair l(batch) + w_proxy l(proxies); grad += lambda_t (theta - theta_anchor); one update of (theta, P)
            r.loss = r.update(inputs.to(r.device), labels.to(r.device))
            r.step += 1
            r.progress.update(r.step, r.loss, r.status)
            if r.step >= tc["max_steps"]:
                break
        if r.step % E:  # stopped between two validations: save, so that resuming stays exact
            save_checkpoint(r.last_path, r.stateful(), **r.progress_state())
            break
        # Every E steps: validation MAP@R on the held-out classes (PAPER.md §6).
        score, record = validate(r)
        if r.stopper.update(score) == "improved":  # the overall best (theta, P): what is tested at the end
            save_checkpoint(r.best_path, r.stateful(), **r.progress_state())
        if r.instances is not None:
            # theta*, P* kept at the instance's best; after instance_patience evaluations without a new best
            # the instance has converged: theta_anchor <- theta*, t <- t + 1, lambda_t = lam * decay^t
            outcome = r.instances.after_validation(score)
            if outcome.converged:
                message = f"instance {outcome.instance - 1} converged; lambda -> {outcome.lam:g}"
                if cfg["ccp"]["proxy_init"] == "kcenter":  # P <- k-center(pool(theta), initial = P*)
                    record["selection"] = reselect_proxies(r, outcome.converged_proxies, outcome.instance)
                    message += (f", proxies re-selected: covering radius {record['selection']['covering_radius_before']:.4f}"
                                f" -> {record['selection']['covering_radius_after']:.4f}")
                r.say(f"step {r.step}: {message}")
        append_jsonl(record, r.log_path)
        stopped = r.stopper.stale >= r.stopper.patience
        save_checkpoint(r.last_path, r.stateful(), **r.progress_state())
        r.status = f"val MAP@R {score:.4f} (best {r.stopper.best:.4f})" + (
            f" | instance {r.instances.instance}, lambda {r.instances.lam:g}" if r.instances else "")
        if stopped:  # no improvement of the overall best for `patience` evaluations: stop
            r.say(f"step {r.step}: no improvement for {tc['patience']} evaluations; stopping")
    r.progress.update(r.step, r.loss, r.status, force=True)
    # Restore the overall best theta (and P), chosen on the validation classes; evaluate on the test classes.
    return test_best(r)


# ----------------------------------------------------------------------------------------------
# The run's pieces, built from the config (or restored from a checkpoint).

@dataclass
class Run:
    """Everything one model's training holds: the pieces of Algorithm 1 and the run's progress."""
    cfg: dict
    fold: int
    seed: int
    dir: Path
    prefix: str
    device: torch.device
    splits: dict
    network: torch.nn.Module
    objective: torch.nn.Module | None  # owns the proxies P (CCP, proxy baselines)
    memory: losses.CrossBatchMemory | None  # XBM
    optimizer: torch.optim.Optimizer
    decayed: list[torch.Tensor]
    instances: projection.ProblemInstances | None  # CCP's theta_anchor, t, lambda_t, theta*, P*
    stopper: projection.EarlyStopping
    sampler: data.MPerClassSampler
    loader: torch.utils.data.DataLoader
    progress: Progress
    backbone_trainable: list[torch.Tensor]
    step: int = 0
    loss: float = float("nan")
    status: str = "no validation yet"
    started: float = 0.0

    log_path = property(lambda self: self.dir / "metrics.jsonl")
    last_path = property(lambda self: self.dir / "last.pt")
    best_path = property(lambda self: self.dir / "best.pt")

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint carries so that a resumed run continues exactly: listed once."""
        return {"model": self.network, "objective": self.objective, "memory": self.memory,
                "optimizer": self.optimizer, "instances": self.instances, "stopper": self.stopper,
                "sampler": self.sampler}

    def progress_state(self) -> dict[str, Any]:
        return {"step": self.step, "fold": self.fold, "seed": self.seed, "config": self.cfg}

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(embeddings, labels)
        loss = losses.LOSSES[self.cfg["loss"]["name"]](normalizer(self.cfg)(embeddings), labels,
                                                     **self.cfg["loss"]["params"])
        return loss if self.memory is None else loss + self.memory.scheduled_loss(embeddings, labels)

    def pull(self) -> tuple[projection.ProximalAnchor | None, float]:
        """theta_anchor and lambda_t of the running instance (lambda_0 = 0: no pull in the first)."""
        return (self.instances.anchor, self.instances.lam) if self.instances else (None, 0.0)

    def update(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """One train_step; the proxy baselines' warm-up first trains only the embedding layer and the loss."""
        for p in self.backbone_trainable:
            p.requires_grad_(self.step >= self.cfg["baseline"]["warmup_steps"])
        try:
            return train_step(self.network, self.compute_loss, self.optimizer, inputs, labels, self.decayed,
                              self.cfg["train"], *self.pull())
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"{err} at step {self.step + 1}; training stopped, {self.last_path} holds the "
                                f"last good state") from None

    def say(self, message: str) -> None:
        print(f"{self.prefix}{message}", flush=True)


def setup_run(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str) -> Run:
    """Build every piece of one model's training; resume it from a checkpoint if asked (resume:)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))
    make_deterministic(seed)
    device = resolve_device(cfg["device"])
    tc, dc, mc = cfg["train"], cfg["data"], cfg["model"]
    splits = build_splits(cfg, fold)
    fit = splits["fit"]
    network = model.build_model(mc["backbone"], mc["embedding_dim"], mc["pretrained"], mc["pooling"],
                                mc["freeze_bn"], seed=seed, backbone_kwargs=mc["backbone_kwargs"]).to(device)
    objective = build_objective(cfg, fit.num_classes, mc["embedding_dim"], seed)
    if objective is not None:
        objective.to(device)
    memory = None
    if cfg["method"] == "xbm":
        size = cfg["baseline"]["xbm_memory_batches"] * dc["classes_per_batch"] * dc["samples_per_class"]
        memory = losses.CrossBatchMemory(losses.LOSSES[cfg["loss"]["name"]], mc["embedding_dim"], size,
                                         normalize=normalizer(cfg), start=cfg["baseline"]["xbm_start_step"],
                                         **cfg["loss"]["params"]).to(device)
    instances = None
    if cfg["method"] == "ccp":  # theta_anchor on the device; lambda_0 = 0 in the first instance (PAPER.md §2)
        instances = projection.ProblemInstances(network, objective.proxies, **cfg["projection"])
    sampler = data.MPerClassSampler(fit.labels, dc["samples_per_class"], dc["classes_per_batch"], tc["eval_every"],
                                    seed)
    loader = torch.utils.data.DataLoader(fit, batch_sampler=sampler, num_workers=dc["num_workers"],
                                         persistent_workers=dc["num_workers"] > 0,
                                         generator=torch.Generator().manual_seed(seed))
    r = Run(cfg, fold, seed, run_dir, prefix, device, splits, network, objective, memory,
            build_optimizer(cfg, network, objective), decayed_parameters(network, objective), instances,
            projection.EarlyStopping(tc["patience"], cfg["projection"]["min_delta"]), sampler, loader,
            Progress(tc["max_steps"], tc["log_every_seconds"], dc["classes_per_batch"] * dc["samples_per_class"],
                     prefix), [p for p in network.backbone.parameters() if p.requires_grad])
    describe_run(r)
    resume = cfg["resume"]
    if resume == "auto":
        resume = str(r.last_path) if r.last_path.exists() else None
    if resume:
        state = load_checkpoint(resume, cfg)
        restore_checkpoint(state, r.stateful())
        # progress from the checkpoint, settings from the config: a resumed run may be given more patience
        r.stopper.load_state_dict({**state["stopper"], "patience": tc["patience"],
                                   "min_delta": cfg["projection"]["min_delta"]})
        r.step = state["step"]
        if r.log_path.exists():  # drop log lines written after the checkpoint we continue from
            kept = [line for line in r.log_path.read_text().splitlines() if json.loads(line)["step"] <= r.step]
            atomic_write(r.log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        r.say(f"resumed from {resume} at step {r.step}")
    else:
        r.log_path.unlink(missing_ok=True)
        if instances is not None and cfg["ccp"]["proxy_init"] == "kcenter":  # P <- k-center(pool(theta), 0)
            report = reselect_proxies(r, None, 0)
            append_jsonl({"step": 0, "instance": 0, "lam": 0.0, "selection": report}, r.log_path)
            r.say(f"step 0: {objective.proxies.proxies_per_class} proxies per class chosen by k-center "
                  f"from pools of {report['pool_size']} images")
    r.started = time.time()
    network.train()
    return r


def describe_run(r: Run) -> None:
    cfg, fit, val = r.cfg, r.splits["fit"], r.splits["val"]
    tests = ", ".join(f"{len(d)} {name} images" for name, d in r.splits.items() if name not in ("fit", "val"))
    method, loss = cfg["method"], cfg["loss"]["name"].upper()
    what = f"{loss}-CCP" if method == "ccp" else f"{loss} (no proxies)" if method == "baseline" else method
    r.say(f"{what} on {cfg['dataset']['name']}, fold {r.fold} of {cfg['folds']}, seed {r.seed}: "
          f"{fit.num_classes} training classes ({len(fit)} images), {val.num_classes} validation classes "
          f"({len(val)}), {tests}; device {r.device}; writing to {r.dir}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} asked for, but CUDA is not available here")
    return device


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
    if cfg["method"] in config.PROXY_BASELINES:
        return config.PROXY_BASELINES[cfg["method"]](num_classes, dim, generator=generator,
                                                     **cfg["baseline"]["params"])
    return None


def build_optimizer(cfg: dict, network: torch.nn.Module, objective: torch.nn.Module | None) -> torch.optim.Adam:
    """Adam at a constant learning rate; proxies of the baselines get a multiplier (PAPER.md §4, §7)."""
    tc = cfg["train"]
    groups = [{"params": [p for p in network.parameters() if p.requires_grad], "lr": tc["lr"]}]
    if objective is not None and any(True for _ in objective.parameters()):
        multiplier = cfg["baseline"]["proxy_lr_multiplier"] if cfg["method"] in config.PROXY_BASELINES else 1.0
        groups.append({"params": list(objective.parameters()), "lr": tc["lr"] * multiplier})
    return torch.optim.Adam(groups, lr=tc["lr"], betas=tuple(tc["betas"]), eps=tc["eps"], weight_decay=0.0)


def decayed_parameters(network: torch.nn.Module, objective: torch.nn.Module | None) -> list[torch.Tensor]:
    """Every trainable tensor but BatchNorm's, proxies included: what the authors' L2 decays (PAPER.md §2)."""
    batchnorm = model.batchnorm_parameter_names(network)
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
# Validation, proxy selection and the test of the best model.

def eval_loader(dataset, cfg: dict, sampler=None) -> torch.utils.data.DataLoader:
    workers = cfg["data"]["num_workers"]
    return torch.utils.data.DataLoader(dataset, batch_size=cfg["data"]["eval_batch_size"], sampler=sampler,
                                       num_workers=workers, generator=torch.Generator().manual_seed(0))


def embed_normalized(network, dataset, cfg: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n(f(x)) for a whole split: retrieval runs in the space the loss shapes (PAPER.md §3)."""
    embeddings, labels = evaluate.embed(network, eval_loader(dataset, cfg), device)
    return normalizer(cfg)(embeddings), labels


def validate(r: Run) -> tuple[float, dict]:
    """Validation MAP@R on the held-out classes of the fold, and the log record of this evaluation."""
    val_metrics = evaluate.retrieval_metrics(*embed_normalized(r.network, r.splits["val"], r.cfg, r.device),
                                             recall_ks=(1,))
    record = {"step": r.step, "instance": r.instances.instance if r.instances else 0, "lam": r.pull()[1],
              "loss": r.loss, "val": val_metrics, "seconds": round(time.time() - r.started, 3)}
    return val_metrics["MAP@R"], record


def reselect_proxies(r: Run, initial: torch.Tensor | None, instance: int) -> dict:
    """P <- select(pool(theta), initial, K): greedy k-center on fresh candidates (PAPER.md §5).

    The pool is embedded by the current network in inference mode with the training augmentation,
    and k-center runs on raw f(x), starting from `initial` (P*, or the zero vector at the start);
    the covering radius is logged in the normalised space.
    """
    cfg, fit, proxies = r.cfg, r.splits["fit"], r.objective.proxies
    per_class = cfg["ccp"]["proxies_per_class"]
    pool_size = cfg["ccp"]["pool_size"]
    if pool_size < per_class:
        pool_size *= per_class  # the authors enlarge a pool smaller than K to b * K (PAPER.md §5)

    def embed_fn(indices: list[int]) -> torch.Tensor:
        # one augmentation seed per candidate, from a stream that is stable across numpy versions
        seeds = np.random.SeedSequence([r.seed, instance]).generate_state(len(indices), np.uint64) >> np.uint64(1)
        keys = [(i, int(s)) for i, s in zip(indices, seeds)]
        return evaluate.embed(r.network, eval_loader(fit, cfg, sampler=keys), r.device)[0]

    class_to_indices = [[] for _ in range(fit.num_classes)]
    for index, label in enumerate(fit.labels):
        class_to_indices[label].append(index)
    generator = torch.Generator().manual_seed(r.seed * 1000 + instance)
    pool, resampled = selection.candidate_pool(embed_fn, class_to_indices, pool_size, generator,
                                               batch_size=len(class_to_indices) * pool_size)
    new = selection.select_proxies(pool, initial, per_class)
    n = normalizer(cfg)
    points = n(pool.reshape(-1, pool.shape[-1]))
    point_labels = torch.arange(pool.shape[0]).repeat_interleave(pool.shape[1])
    center_labels = proxies.labels.cpu()
    report = {"pool_size": pool_size, "classes_resampled": resampled}
    for when, centers in (("before", proxies.weight.detach().cpu()), ("after", new)):
        report[f"covering_radius_{when}"] = selection.covering_radius(points, point_labels, n(centers), center_labels)[1]
        report[f"interclass_distance_{when}"] = selection.mean_interclass_distance(n(centers), center_labels)
    proxies.reset(new.to(proxies.weight.device))
    return report


def test_best(r: Run) -> dict:
    """Restore the best validation checkpoint (if one was written) and evaluate it on the test split."""
    cfg, tc = r.cfg, r.cfg["train"]
    if r.best_path.exists():
        best = load_checkpoint(r.best_path)
        r.network.load_state_dict(best["model"])
        r.say(f"best validation MAP@R {r.stopper.best:.4f} at step {best['step']}: testing that "
              f"checkpoint on the test classes")
    else:
        best = {"step": r.step}
        r.say(f"no validation ran (max_steps {tc['max_steps']} < eval_every {tc['eval_every']}): "
              f"testing the last weights")
    embedded = test_embeddings(cfg, r.network, r.splits, r.device)
    metrics = test_metrics(cfg, embedded)
    result = {"fold": r.fold, "seed": r.seed, "best_step": best["step"], "best_val_MAP@R": r.stopper.best,
              "steps": r.step, "test": metrics}
    save_json(result, r.dir / "results.json")
    return {**result, "embeddings": embedded}


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
# The protocol: folds, 512-D ensemble, repeats (PAPER.md §7), and evaluating a checkpoint.

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
    network = model.build_model(mc["backbone"], mc["embedding_dim"], None, mc["pooling"], mc["freeze_bn"],
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
