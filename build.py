"""Builds one model's training run from a config: the fold's data, the network, the objective with its
proxies, the optimiser, the sampler and loader, and the method's state (train.py's CCP or NoCCP); and
restores it from a checkpoint.

train.py runs Algorithm 1 (PAPER.md §2) on the `Run` this file returns; `Run.stateful` lists, once,
every object a checkpoint carries so that a resumed run continues exactly. The protocol's settings
(folds, transforms, the 8 x 4 batch, the optimiser's update order) are those of PAPER.md §7.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import config
import data
import losses
import model
import optimizer
import projection
from bookkeeping import (Progress, keep_freed_memory, keep_log_until, load_checkpoint, make_deterministic,
                         read_jsonl, record_segment, restore_checkpoint, save_checkpoint)
from config import ConfigError


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
    optimizer: torch.optim.Optimizer  # coupled decay, clipping and Adam in the authors' order (optimizer.py)
    stopper: projection.EarlyStopping
    sampler: data.MPerClassSampler
    loader: torch.utils.data.DataLoader
    progress: Progress
    backbone_trainable: list[torch.Tensor]
    ccp: Any = None  # CCP's state and decisions (train.CCP), or train.NoCCP for the baselines
    step: int = 0
    loss: float = float("nan")
    status: str = "no validation yet"
    started: float = 0.0
    best: dict | None = None  # the overall best validation: step, score, host copies of theta and P
    resumed: bool = False

    log_path = property(lambda self: self.dir / "metrics.jsonl")
    last_path = property(lambda self: self.dir / "last.pt")
    best_path = property(lambda self: self.dir / "best.pt")

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint carries so that a resumed run continues exactly: listed once."""
        return {"model": self.network, "objective": self.objective, "memory": self.memory,
                "optimizer": self.optimizer, "ccp": self.ccp, "stopper": self.stopper, "sampler": self.sampler}

    def save(self, path: Path) -> None:
        # with the layout and BatchNorm path it trains in: evaluate_saved and embed.py rebuild it so (last bits)
        save_checkpoint(path, self.stateful(), step=self.step, fold=self.fold, seed=self.seed, config=self.cfg,
                        best=self.best, channels_last=self.network.channels_last,
                        fold_bn=on_cpu(self.cfg["model"]["fold_bn"], self.device))

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(embeddings, labels)
        loss = losses.LOSSES[self.cfg["loss"]["name"]](normalizer(self.cfg)(embeddings), labels,
                                                     **self.cfg["loss"]["params"])
        return loss if self.memory is None else loss + self.memory.scheduled_loss(embeddings, labels)

    def say(self, message: str) -> None:
        print(f"{self.prefix}{message}", flush=True)


def training_run(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str, method: Callable[[Run], Any]) -> Run:
    """Build every piece of one model's training, the method's state as method(run); resume it from a
    checkpoint if asked (resume:)."""
    state = find_checkpoint(cfg, fold, seed, run_dir)  # checked before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    make_deterministic(seed)
    keep_freed_memory()
    device = resolve_device(cfg["device"])
    tc, dc, mc = cfg["train"], cfg["data"], cfg["model"]
    splits = build_splits(cfg, fold)
    fit = splits["fit"]
    network = build_network(cfg, seed, device).to(device)
    objective = build_objective(cfg, fit.num_classes, mc["embedding_dim"], seed)
    if objective is not None:
        objective.to(device)
    memory = build_memory(cfg, device)
    sampler = data.MPerClassSampler(fit.labels, dc["samples_per_class"], dc["classes_per_batch"], tc["eval_every"],
                                    seed, order=dc["sampler"], refill=dc["refill"])
    workers = loader_workers(cfg)
    if dc["cache_validation"]:  # validated every E steps: decode its images once
        splits["val"] = data.decoded(splits["val"], workers, dc["eval_batch_size"])
    loader = torch.utils.data.DataLoader(fit, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(seed))
    stopper, E = projection.EarlyStopping(tc["patience"], cfg["projection"]["min_delta"]), tc["eval_every"]
    progress = Progress(tc["max_steps"], tc["log_every_seconds"], dc["classes_per_batch"] * dc["samples_per_class"],
                        prefix, steps_to_stop=lambda step: (stopper.patience - stopper.stale) * E - step % E)
    r = Run(cfg, fold, seed, run_dir, prefix, device, splits, network, objective, memory,
            build_optimizer(cfg, network, objective), stopper, sampler, loader, progress,
            [p for p in network.backbone.parameters() if p.requires_grad])
    r.ccp = method(r)
    describe_run(r)
    if state is not None:
        restore(r, state)
    # drop log lines written after the checkpoint we continue from (all of them when there is none)
    keep_log_until(r.log_path, r.step if r.resumed else -1)
    # after every check: a refused resume leaves no trace
    record_segment(run_dir, cfg, r.step, resolved={"model.channels_last": network.channels_last,
                                                   "model.fold_bn": on_cpu(cfg["model"]["fold_bn"], device),
                                                   "data.num_workers": workers})
    if r.resumed:
        say_resumed(r, state)
    r.started = time.time()
    network.train()
    return r


def build_memory(cfg: dict, device: torch.device) -> losses.CrossBatchMemory | None:
    """XBM's cross-batch memory of xbm_memory_batches batches (PAPER.md §4); None for the other methods."""
    if cfg["method"] != "xbm":
        return None
    dc, bc = cfg["data"], cfg["baseline"]
    return losses.CrossBatchMemory(losses.LOSSES[cfg["loss"]["name"]], cfg["model"]["embedding_dim"],
                                   bc["xbm_memory_batches"] * dc["classes_per_batch"] * dc["samples_per_class"],
                                   normalize=normalizer(cfg), start=bc["xbm_start_step"],
                                   include_batch=bc["xbm_include_batch"], **cfg["loss"]["params"]).to(device)


def say_resumed(r: Run, state: dict) -> None:
    """Where the run continues from, and what makes this segment differ from the checkpoint's."""
    cfg = r.cfg
    r.status = f"resumed at step {r.step}"
    ended = r.stopper.stopped or r.step >= cfg["train"]["max_steps"]  # e.g. resume=auto on a finished run
    r.say(f"resumed from {cfg['resume'] if cfg['resume'] != 'auto' else r.last_path} at step {r.step}"
          + (", where its training had ended: only the test runs again" if ended else ""))
    changed = changed_settings(state["config"], cfg)
    if changed:
        r.say(f"warning: this segment runs with {changed} (the checkpoint's differ); config.yaml keeps the "
              f"settings the run started with, segments.jsonl records each segment's")
    if state.get("threads") != torch.get_num_threads():
        r.say(f"warning: this process computes with {torch.get_num_threads()} threads, the checkpoint was "
              f"written with {state.get('threads')}: sums round differently, so the continuation is not "
              f"bit-identical to an uninterrupted run (set OMP_NUM_THREADS={state.get('threads')})")


def restore(r: Run, state: dict) -> None:
    """Continue from a checkpoint: its objects' states, its progress and the best state so far."""
    try:
        restore_checkpoint(state, r.stateful())
        # progress from the checkpoint, settings from the config: a resumed run may be given more patience
        r.stopper.load_state_dict({**state["stopper"], "patience": r.cfg["train"]["patience"],
                                   "min_delta": r.cfg["projection"]["min_delta"]})
    except (RuntimeError, KeyError, ValueError) as err:  # a state of another shape than this config builds
        raise ConfigError(f"resume: {r.cfg['resume']} does not fit this config: {' '.join(str(err).split())}") from None
    r.step, r.best, r.resumed = state["step"], state["best"], True


def find_checkpoint(cfg: dict, fold: int, seed: int, run_dir: Path) -> dict | None:
    """The checkpoint that `resume:` names for this model (auto: run_dir/last.pt if any), checked: a resume
    never starts afresh over a run's files, nor continues another run's checkpoint among them."""
    resume, last = cfg["resume"], run_dir / "last.pt"
    # what a run wrote after its start (a log of the initial selection alone is rewritten the same by a restart)
    written = [name for name in ("results.json", "best.pt") if (run_dir / name).exists()] + (
        ["metrics.jsonl"] if any(r["step"] > 0 for r in read_jsonl(run_dir / "metrics.jsonl")) else [])
    if resume == "auto" and not last.exists():
        if written:
            raise ConfigError(f"resume=auto: {run_dir} holds {', '.join(written)} but no last.pt to continue from; "
                              f"starting afresh would overwrite them: move them away or choose another run_dir")
        continued = [s for s in read_jsonl(run_dir / "segments.jsonl") if s["from_step"] > 0]
        if continued:  # stopped before writing a last.pt of its own
            source = continued[-1]["config"]["resume"]
            raise ConfigError(f"resume=auto: {run_dir} has no last.pt, but its training continued "
                              f"{last if source == 'auto' else source} at step {continued[-1]['from_step']} "
                              f"(segments.jsonl): continue from that checkpoint with resume=PATH, not from step 0")
    if resume not in (None, "auto") and written and Path(resume).expanduser().resolve() != last.resolve():
        raise ConfigError(f"resume: {run_dir} already holds a run's {', '.join(written)}; continuing {resume} there "
                          f"would mix two runs: choose a new run_dir for it")
    if resume == "auto":
        resume = last if last.exists() else None
    if not resume:
        return None
    state = load_checkpoint(resume, cfg)
    if (state["fold"], state["seed"]) != (fold, seed):
        raise ConfigError(f"resume: {resume} holds the model of fold {state['fold']}, seed {state['seed']}; "
                          f"this run asks for fold {fold}, seed {seed}")
    return state


def changed_settings(saved: dict, cfg: dict) -> str:
    """The keys that change what is trained (all but where and how a run is started and logged), as
    "k=new, ..." for those whose value differs from the checkpoint's."""
    bookkeeping_keys = {"run_dir", "resume", "eval_only", "device", "train.log_every_seconds", "data.num_workers",
                        "evaluation.save_embeddings", "ccp.save_selections"}
    old, new = config.flatten(saved), config.flatten(cfg)
    return ", ".join(f"{k}={new[k]!r}" for k in new if k not in bookkeeping_keys and old.get(k, new[k]) != new[k])


def model_folders(cfg: dict) -> list[tuple[int, int, Path]]:
    """(seed, fold, folder relative to run_dir) of every model the config trains, in training order:
    seedS/ and foldF/ only where there are several."""
    folds = range(cfg["folds"]) if cfg["fold"] is None else [cfg["fold"]]
    seeds = [cfg["seed"] + r for r in range(cfg["repeats"])]
    return [(seed, fold, Path(f"seed{seed}" if len(seeds) > 1 else "") / (f"fold{fold}" if len(folds) > 1 else ""))
            for seed in seeds for fold in folds]


def check_inputs(cfg: dict, folds: list[int]) -> None:
    """What a run reads and what its folds must hold, checked before anything is written: the data (read
    once for every fold), the pretrained weights, and that the network takes the transform's images."""
    name, root, dc, mc = cfg["dataset"]["name"], cfg["dataset"]["root"], cfg["data"], cfg["model"]
    labels = data.build_dataset(name, root, "train").labels
    tests = [data.build_dataset(name, root, split) for split in data.SPLITS[name][1:]]  # the test split(s)
    for fold in folds:
        fold_classes(cfg, labels, fold)
    network = build_network(cfg, cfg["seed"], torch.device("cpu"))  # the layout does not change the weights
    image, _ = tests[0].with_transform(transform(cfg, train=False))[0]
    try:  # one test image: e.g. tiny_cnn's one channel and RGB photos fail here, not at the first step
        with torch.no_grad():
            network.eval()(image[None])
    except RuntimeError as err:
        raise ConfigError(f"config keys model.backbone and data.transform: {mc['backbone']} "
                          f"(backbone_kwargs {mc['backbone_kwargs']}) cannot take the images of data.transform "
                          f"{dc['transform']} ({str(err).splitlines()[0]})") from None


def saved_network(state: dict, device: torch.device, default_layout: bool | str = "auto") -> model.EmbeddingModel:
    """A checkpoint's network with its weights, not moved to `device`, in the layout and BatchNorm path it
    was trained in, so that its test metrics come out to the last bit (recorded in the checkpoint; before
    that, its config's model.channels_last, and before that key, `default_layout`, resolved for `device`;
    BatchNorm folded, the only path before model.fold_bn)."""
    mc = state["config"]["model"]
    layout = state.get("channels_last", on_cpu(mc.get("channels_last", default_layout), device))
    network = model.build_model(mc["backbone"], mc["embedding_dim"], None, mc["pooling"], mc["freeze_bn"],
                                backbone_kwargs=mc["backbone_kwargs"], channels_last=layout,
                                fold_bn=state.get("fold_bn", True))
    network.load_state_dict(state["model"])
    return network


def build_network(cfg: dict, seed: int, device: torch.device) -> model.EmbeddingModel:
    """The embedding model of the config, in the layout and BatchNorm path of model.channels_last and
    model.fold_bn on `device` (not moved there); backbone_kwargs that leave a layer without weights are an
    error."""
    mc = cfg["model"]
    try:
        network = model.build_model(mc["backbone"], mc["embedding_dim"], mc["pretrained"], mc["pooling"],
                                    mc["freeze_bn"], seed=seed, backbone_kwargs=mc["backbone_kwargs"],
                                    channels_last=on_cpu(mc["channels_last"], device),
                                    fold_bn=on_cpu(mc["fold_bn"], device))
    except RuntimeError as err:  # e.g. a negative width: torch refuses the layer's size
        raise ConfigError(f"config key model.backbone_kwargs: {mc['backbone']} cannot be built with "
                          f"{mc['backbone_kwargs']}: {err}") from None
    empty = [name for name, p in network.named_parameters() if p.numel() == 0]
    if empty:  # e.g. width 0: torch builds the layer, and the first forward pass fails
        raise ConfigError(f"config key model.backbone_kwargs: {mc['backbone_kwargs']} leaves {mc['backbone']} "
                          f"layers without weights ({', '.join(empty[:3])}); every width must be at least 1")
    return network


def describe_run(r: Run) -> None:
    cfg, fit, val = r.cfg, r.splits["fit"], r.splits["val"]
    tests = ", ".join(f"{len(d)} {name} images" for name, d in r.splits.items() if name not in ("fit", "val", "fit_eval"))
    method, loss = cfg["method"], cfg["loss"]["name"].upper()
    what = f"{loss}-CCP" if method == "ccp" else f"{loss} (no proxies)" if method == "baseline" else method
    dataset = cfg["dataset"]["name"] if cfg["dataset"]["name"] != "folder" else f"your images in {cfg['dataset']['root']}"
    cached = f", decoded once: {val.images.nbytes / 2**20:.2f} MiB in memory" \
        if val.images is not None and val.images.dtype == torch.uint8 else ""  # data.decoded
    r.say(f"{what} on {dataset}, fold {r.fold} of {cfg['folds']}, seed {r.seed}: "
          f"{fit.num_classes} training classes ({len(fit)} images), {val.num_classes} validation classes "
          f"({len(val)}{cached}), {tests}; device {r.device}; writing to {r.dir}")


def on_cpu(value: bool | str, device: torch.device) -> bool:
    """model.channels_last and model.fold_bn on `device`: auto is true on a CPU and false on CUDA. Each is
    the CPU's faster path; on an H200 channels_last stepped 45.1 ms against NCHW's 42.7, and folding
    BatchNorm adds about 390 small ops to a step, each a kernel launch (docs/gpu.md)."""
    return device.type != "cuda" if value == "auto" else bool(value)


def loader_workers(cfg: dict) -> int:
    """data.num_workers: auto is the CPU cores this process may use divided by the processes torchrun
    starts on this node (LOCAL_WORLD_SIZE), minus one for the main process, within [0, 16]."""
    value = cfg["data"]["num_workers"]
    if value != "auto":
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available; under torchrun, auto and cuda mean this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def fold_classes(cfg: dict, labels: list[int], fold: int) -> tuple[list[int], list[int]]:
    """The fit and validation classes of one MLRC fold (PAPER.md §7), refused where they cannot give a
    meaningful run: fewer than 2 validation classes (MAP@R would be 1 for any model), or fewer fit classes
    than a batch holds."""
    classes = sorted(set(labels))
    fit_classes, val_classes = data.mlrc_folds(classes, cfg["folds"])[fold]
    if len(val_classes) < 2:
        raise ConfigError(f"config key folds: fold {fold} of {cfg['folds']} validates on {len(val_classes)} class of "
                          f"{len(classes)} training classes; validation needs at least 2: use fewer folds")
    if len(fit_classes) < cfg["data"]["classes_per_batch"]:
        raise ConfigError(f"config key data.classes_per_batch: {cfg['data']['classes_per_batch']} classes a batch, "
                          f"but fold {fold} of {cfg['folds']} trains on {len(fit_classes)} classes")
    return fit_classes, val_classes


def transform(cfg: dict, train: bool) -> Callable:
    """data.transform of the config with its crop_size and resize: the training augmentation or the evaluation's."""
    dc = cfg["data"]
    return data.build_transform(dc["transform"], train, dc["crop_size"], dc["resize"])


def build_splits(cfg: dict, fold: int) -> dict:
    """The fit and validation classes of one MLRC fold, and the test split(s) (PAPER.md §7)."""
    name, root = cfg["dataset"]["name"], cfg["dataset"]["root"]
    train_tf, eval_tf = transform(cfg, train=True), transform(cfg, train=False)
    train = data.build_dataset(name, root, "train")
    fit_classes, val_classes = fold_classes(cfg, train.labels, fold)
    splits = {
        "fit": data.class_subset(train.with_transform(train_tf), fit_classes),
        "val": data.class_subset(train.with_transform(eval_tf), val_classes),
        "fit_eval": data.class_subset(train.with_transform(eval_tf), fit_classes),  # for saved selections
    }
    for split in data.SPLITS[name][1:]:  # the test split(s)
        splits[split] = data.build_dataset(name, root, split, eval_tf)
    return splits


def normalizer(cfg: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return losses.NORMALIZATIONS[cfg["normalization"]]


def ensemble_normalizer(cfg: dict) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fold ensemble's outer normalisation: n(concat(n(f_1), ...)) as the authors (PAPER.md §7), or None:
    each part L2-normalised as MLRC (evaluation.ensemble: mlrc; a checkpoint older than the key: the authors')."""
    return normalizer(cfg) if cfg["evaluation"].get("ensemble", "authors") == "authors" else None


def build_objective(cfg: dict, num_classes: int, dim: int, seed: int) -> torch.nn.Module | None:
    """The loss module that owns learnable proxies, if the method has one (PAPER.md §2, §4)."""
    generator = torch.Generator().manual_seed(seed + 1)
    if cfg["method"] == "ccp":
        proxies = losses.Proxies(num_classes, cfg["ccp"]["proxies_per_class"], dim, generator=generator)
        return losses.CCPLoss(losses.LOSSES[cfg["loss"]["name"]], proxies, cfg["ccp"]["pair_weight"],
                              cfg["ccp"]["proxy_weight"], normalize=normalizer(cfg), **cfg["loss"]["params"])
    if cfg["method"] in config.PROXY_BASELINES:
        return config.PROXY_BASELINES[cfg["method"]](num_classes, dim, generator=generator, normalize=normalizer(cfg),
                                                     **cfg["baseline"]["params"])
    return None


def build_optimizer(cfg: dict, network: torch.nn.Module, objective: torch.nn.Module | None) -> optimizer.KerasAdam:
    """The authors' update (PAPER.md §2, §7): coupled L2 on every trainable tensor but BatchNorm's (the
    proxies included), clip the global norm, clip each value, then Adam; the proxies of the baselines
    get a learning-rate multiplier (PAPER.md §4)."""
    tc = cfg["train"]
    batchnorm = model.batchnorm_parameter_names(network)
    trainable = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name not in batchnorm]},
              {"params": [p for name, p in trainable if name in batchnorm], "weight_decay": 0.0}]
    if objective is not None and any(True for _ in objective.parameters()):
        multiplier = cfg["baseline"]["proxy_lr_multiplier"] if cfg["method"] in config.PROXY_BASELINES else 1.0
        groups.append({"params": list(objective.parameters()), "lr": tc["lr"] * multiplier})
    return optimizer.KerasAdam([g for g in groups if g["params"]], lr=tc["lr"], betas=tuple(tc["betas"]),
                               eps=tc["eps"], weight_decay=tc["weight_decay"], clip_norm=tc["clip_norm"],
                               clip_value=tc["clip_value"], epsilon=tc["adam_epsilon"])
