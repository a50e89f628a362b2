"""Train and evaluate deep metric learning with chance constraints (CCP) from one YAML file.

usage: python train.py CONFIG.yaml [key=value ...]
  e.g. python train.py configs/digits_ccp.yaml
       python train.py configs/sop_ms.yaml resume=auto          (continue an interrupted run)
       python train.py configs/sop_ms.yaml eval_only=true resume=runs/sop_ms/fold0/best.pt run_dir=runs/eval
       torchrun --standalone --nproc_per_node=4 train.py configs/sop_ms.yaml   (the models over 4 processes)
Every key, with the paper's value, is in config.py's DEFAULTS (docs/configuration.md explains each).

Read `train_one_model` beside PAPER.md §2 (Algorithm 1, one step a line) and the class CCP below it (the
method's state and decisions; the baselines run the same loop with NoCCP). Then the protocol of PAPER.md
§7 (folds, the 512-D ensemble, repeats, spread over torchrun's processes) and the test of §6.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import shlex
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import build
import evaluate
import projection
import selection
from bookkeeping import (RunLock, append_jsonl, check_run_dir, git_commit, holds_results, interpreter, load_checkpoint,
                         print_results, save_json, save_npz, summarize, write_config_once)
from config import ConfigError, load_config


# ----------------------------------------------------------------------------------------------
# Algorithm 1 (PAPER.md §2) for one model of one fold.

def train_one_model(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str = "") -> dict:
    """Train one model with CCP (or a baseline); return its test metrics and normalised test embeddings."""
    method = CCP if cfg["method"] == "ccp" else NoCCP
    r = build.training_run(cfg, fold, seed, run_dir, prefix, method)  # θ, P, θ_anchor ← θ, λ_0 = 0; or resumed
    if not r.resumed:
        r.ccp.start()  # P ← select(pool(θ), initial = 0, K)
    if not r.last_path.exists():  # from here on a kill leaves a last.pt that resume=auto continues exactly
        save_last(r)
    E = cfg["train"]["eval_every"]
    while r.step < cfg["train"]["max_steps"] and not r.stopper.stopped:
        # an epoch is one validation interval: the loader yields the E - step % E batches up to the next one
        r.sampler.set_epoch(r.step // E, r.step % E)
        for inputs, labels in r.loader:  # a batch: 4 images of each of 8 classes (PAPER.md §7)
            # L = w_pair ℓ(batch) + w_proxy ℓ(proxies) (r.compute_loss: losses.CCPLoss); grad += λ_t (θ − θ_anchor),
            # the pull's gradient (its value is not in the logged L); one update of (θ, P)
            r.loss = update(r, inputs.to(r.device, non_blocking=True), labels.to(r.device, non_blocking=True))
            r.step += 1
            r.progress.update(r.step, r.loss, r.status)
            if r.step >= cfg["train"]["max_steps"]:
                break
        if r.step % E:  # stopped between two validations: save, so that resuming stays exact
            save_last(r)
            break
        score, record = validate(r)  # every E steps: validation MAP@R on the held-out classes (PAPER.md §6)
        if r.stopper.update(score):  # improved: the overall best (θ, P) is what is tested at the end
            r.best = {"step": r.step, "instance": r.ccp.instance, "val_MAP@R": score,
                      "model": projection.host_copy(r.network),
                      "objective": None if r.objective is None else projection.host_copy(r.objective)}
            r.save(r.best_path)
        # θ*, P* at the instance's best; converged: θ_anchor ← θ*, t ← t + 1, P ← select(pool(θ), P*, K)
        record.update(r.ccp.after_validation(score))
        append_jsonl(record, r.log_path)
        r.save(r.last_path)
        r.status = f"val MAP@R {score:.4f} (best {r.stopper.best:.4f}){r.ccp.status()}"
        if r.stopper.stopped:  # no improvement of the overall best for `patience` evaluations: stop
            r.say(f"step {r.step}: no improvement for {r.stopper.patience} evaluations; stopping")
    r.progress.update(r.step, r.loss, r.status, force=True)
    # Restore the overall best θ (and P), chosen on the validation classes; evaluate on the test classes.
    return test_best(r)


def update(r: build.Run, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """One train_step; the proxy baselines' warm-up first trains only the embedding layer and the loss."""
    warmup = r.cfg["baseline"]["warmup_steps"]
    for p in r.backbone_trainable:
        p.requires_grad_(r.step >= warmup)
    if r.step == warmup > 0:  # after the warm-up a fresh Adam (t = 0, no moments), as the authors compile one
        r.optimizer = build.build_optimizer(r.cfg, r.network, r.objective)
    try:
        return train_step(r.network, r.compute_loss, r.optimizer, inputs, labels, r.ccp.pull)
    except NonFiniteError as err:
        raise NonFiniteError(f"{err} at step {r.step + 1}; training stopped, {last_good_state(r)}") from None


def train_step(network: torch.nn.Module, compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
               pull: Callable[[], None] | None = None) -> float:
    """The authors' update order (PAPER.md §2): ∇L, + λ_t (θ − θ_anchor) (`pull`), then in optimizer.step()
    the coupled decay, clipping of the global norm, clipping of each value, and Adam."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(network(inputs), labels)
    loss.backward()
    if pull is not None:
        pull()
    value = loss.item()  # read once backward and the pull are queued, so that a GPU is not left idle meanwhile
    if not math.isfinite(value):  # nothing has changed a weight yet
        raise NonFiniteError(f"loss is {value}")
    optimizer.step()
    return value


class CCP:
    """CCP's state and decisions (PAPER.md §2, §5): θ_anchor and the pull, the problem instance t and λ_t,
    θ* and P* of the running instance, pool(θ) and the k-center (re-)selection of the proxies P."""

    def __init__(self, r: build.Run):
        # a weak reference to the run that owns this object: no cycle keeps the loader's workers alive
        self.r, self.settings, self.proxies = weakref.proxy(r), r.cfg["ccp"], r.objective.proxies
        self.trainable = [name for name, p in r.network.named_parameters() if p.requires_grad]
        self.anchor = projection.ProximalAnchor(p for p in r.network.parameters() if p.requires_grad)  # θ_anchor ← θ
        self.controller = projection.AlternatingProjections(**r.cfg["projection"])  # t, λ_t, convergence
        labels = np.asarray(r.splits["fit"].labels)  # pool(θ) draws from one run-long stream of images per class
        self.candidates = selection.CandidateStream([np.flatnonzero(labels == c).tolist()
                                                     for c in range(r.splits["fit"].num_classes)], r.seed,
                                                    refill=r.cfg["data"]["refill"])
        self.best: dict | None = None  # θ*, P* of the running instance, in host memory

    instance = property(lambda self: self.controller.instance)  # t
    lam = property(lambda self: self.controller.lam)  # λ_t (the config's projection.lam is λ)

    def start(self) -> None:
        """P ← select(pool(θ), initial = 0, K) before the first step (`proxy_init: random` keeps random P)."""
        if self.settings["proxy_init"] == "kcenter":
            report = self.select(None)
            append_jsonl({"step": 0, "instance": 0, "lam": 0.0, "selection": report}, self.r.log_path)
            self.r.say(f"step 0: {self.settings['proxies_per_class']} proxies per class chosen by k-center "
                       f"from pools of {report['pool_size']} images")

    def pull(self) -> None:
        """grad += λ_t (θ − θ_anchor): the gradient of (λ_t / 2)‖θ − θ_anchor‖² (nothing while λ_t = 0)."""
        self.anchor.add_to_grad(self.lam)

    def after_validation(self, score: float) -> dict:
        """Keep θ*, P* at the instance's best; once the instance has converged: θ_anchor ← θ*, t ← t + 1,
        λ_t = λ·decay^t, and P ← select(pool(θ), initial = P*, K). Returns additions to the log record."""
        decision = self.controller.update(score)  # on "converged" it has already set t ← t + 1 and λ_t
        if decision == "improved":
            self.best = {"network": projection.host_copy(self.r.network), "proxies": projection.host_copy(self.proxies)}
        if decision != "converged":
            return {}
        theta_star, p_star = self.best["network"], self.best["proxies"]["weight"]
        self.anchor.anchor([theta_star[name] for name in self.trainable])  # the network continues from its θ
        self.best, record = None, {}
        message = f"instance {self.instance - 1} converged; lambda -> {self.lam:g}"
        if self.settings["reselect"]:
            record["selection"] = report = self.select(p_star)
            message += (f", proxies re-selected: covering radius {report['covering_radius_before']:.4f}"
                        f" -> {report['covering_radius_after']:.4f}")
        self.r.say(f"step {self.r.step}: {message}")
        return record

    def pool(self) -> torch.Tensor:
        """pool(θ): the next b images of every class from the run-long candidate stream, embedded by the
        current network in inference mode with the training augmentation: raw f(x), (C, b, d)."""
        b, K = self.settings["pool_size"], self.settings["proxies_per_class"]
        b = b * K if b < K else b  # the authors enlarge a pool smaller than K to b·K (PAPER.md §5)
        return selection.candidate_pool(lambda indices: embed_augmented(self.r, indices, self.instance),
                                        self.candidates.draw(b))

    def select(self, initial: torch.Tensor | None, final: tuple[int, int] | None = None) -> dict:
        """P ← select(pool(θ), initial, K): greedy k-center per class from `initial` (P*, or 0 at the start).
        `final`: finish()'s (step, instance) of the tested model; that choice is saved, not applied."""
        pool = self.pool()
        new = selection.select_proxies(pool, initial, self.settings["proxies_per_class"])
        start = self.proxies.weight.detach().cpu() if initial is None else initial
        report = {"pool_size": pool.shape[1], **selection_report(self.r, pool, start, new)}
        if self.settings["save_selections"]:
            save_selection(self.r, torch.zeros_like(new) if initial is None else initial, new,
                           *(final or (self.r.step, self.instance)), "final" if final else f"step{self.r.step:07d}")
        if final is None:
            self.proxies.reset(new.to(self.proxies.weight.device))
        return report

    def finish(self) -> None:
        """With save_selections: what k-center would pick next from the restored best P (report.py's Fig. 1),
        recorded at that model's step and instance (the last weights' when no validation ran)."""
        if self.settings["save_selections"]:
            best = self.r.best or {"step": self.r.step}
            self.select(self.proxies.weight.detach().cpu(), final=(best["step"], best.get("instance", self.instance)))

    def status(self) -> str:
        return f" | instance {self.instance}, lambda {self.lam:g}"

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.state_dict(), "controller": self.controller.state_dict(), "best": self.best,
                "candidates": self.candidates.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Progress from `state`; λ, decay and the patiences as configured (a resumed run may change them)."""
        self.anchor.load_state_dict(state["anchor"])
        settings = {k: v for k, v in self.controller.state_dict().items() if k in projection.SETTINGS}
        self.controller.load_state_dict({**state["controller"], **settings})
        self.candidates.load_state_dict(state["candidates"])
        self.best = state["best"]


class NoCCP:
    """What the baselines run in CCP's place, so that they share its loop: one problem instance with λ = 0,
    no pull, no proxy selection, nothing to save."""

    instance, lam = 0, 0.0

    def __init__(self, r: build.Run): pass
    def start(self) -> None: pass
    def pull(self) -> None: pass
    def after_validation(self, score: float) -> dict: return {}
    def finish(self) -> None: pass
    def status(self) -> str: return ""
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: pass


class NonFiniteError(RuntimeError):
    """The loss, a weight or a buffer became NaN or infinite; the message names it and the step."""


def check_finite_state(r: build.Run) -> None:
    """Stop like a non-finite loss when a weight or buffer (e.g. BatchNorm's running_var) is not finite."""
    for owner, module in (("model", r.network), ("objective", r.objective)):
        for name, tensor in ({} if module is None else module.state_dict()).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"{owner} tensor {name} holds NaN or inf at step {r.step}; training stopped, "
                                     f"{last_good_state(r)}")


def save_last(r: build.Run) -> None:
    """last.pt, which only ever holds a finite state."""
    check_finite_state(r)
    r.save(r.last_path)


def last_good_state(r: build.Run) -> str:
    if r.last_path.exists():
        return f"{r.last_path} holds the last good state"
    return "no checkpoint was written" + (f" here; {r.cfg['resume']} holds the state it resumed from"
                                          if r.resumed and r.cfg["resume"] != "auto" else "")


# ----------------------------------------------------------------------------------------------
# Validation, proxy selection and the test of the best model.

def eval_loader(dataset, cfg: dict, device: torch.device, sampler=None) -> torch.utils.data.DataLoader:
    workers = build.loader_workers(cfg)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg["data"]["eval_batch_size"], sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(0))


def embed_normalized(network, dataset, cfg: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n(f(x)) for a whole split: retrieval runs in the space the loss shapes (PAPER.md §3)."""
    embeddings, labels = evaluate.embed(network, eval_loader(dataset, cfg, device), device)
    return build.normalizer(cfg)(embeddings), labels


def validate(r: build.Run) -> tuple[float, dict]:
    """Validation MAP@R on the held-out classes of the fold, and the log record of this evaluation."""
    check_finite_state(r)
    val_metrics = evaluate.retrieval_metrics(*embed_normalized(r.network, r.splits["val"], r.cfg, r.device),
                                             recall_ks=(1,))
    record = {"step": r.step, "instance": r.ccp.instance, "lam": r.ccp.lam, "loss": r.loss, "val": val_metrics,
              "seconds": round(time.time() - r.started, 3)}
    return val_metrics["MAP@R"], record


def embed_augmented(r: build.Run, indices: list[int], instance: int) -> torch.Tensor:
    """Raw f(x) of training images under the training augmentation, one augmentation seed per image from
    a stream that is stable across numpy versions (pool(θ), PAPER.md §5)."""
    seeds = np.random.SeedSequence([r.seed, instance]).generate_state(len(indices), np.uint64) >> np.uint64(1)
    keys = [(i, int(s)) for i, s in zip(indices, seeds)]
    return evaluate.embed(r.network, eval_loader(r.splits["fit"], r.cfg, r.device, sampler=keys), r.device)[0]


def selection_report(r: build.Run, pool: torch.Tensor, start: torch.Tensor, new: torch.Tensor) -> dict:
    """Covering radius and mean inter-class distance, in the normalised space (PAPER.md §5), of the proxies before
    the selection (P*, which k-center starts from; at step 0 the random initial proxies, while k-center starts
    from the zero vector) and of its choice."""
    n = build.normalizer(r.cfg)
    points = n(pool.reshape(-1, pool.shape[-1]))
    point_labels = torch.arange(pool.shape[0]).repeat_interleave(pool.shape[1])
    center_labels = r.objective.proxies.labels.cpu()
    report = {}
    for when, centers in (("before", start), ("after", new)):
        report[f"covering_radius_{when}"] = selection.covering_radius(points, point_labels, n(centers), center_labels)[1]
        report[f"interclass_distance_{when}"] = selection.mean_interclass_distance(n(centers), center_labels)
    return report


def save_selection(r: build.Run, converged: torch.Tensor, selected: torch.Tensor, step: int, instance: int,
                   name: str) -> None:
    """selections/NAME.npz: P*, k-center's choice and the raw fit embeddings (labels 0.. within the fit split,
    class_names their names, or labels in the training split), for report.py's Fig. 1."""
    folder = r.dir / "selections"
    folder.mkdir(exist_ok=True)
    loader = eval_loader(r.splits["fit_eval"], r.cfg, r.device)
    fit_embeddings, fit_labels = evaluate.embed(r.network, loader, r.device)
    arrays = {"step": np.int64(step), "instance": np.int64(instance), "normalization": r.cfg["normalization"],
              "converged_proxies": converged.numpy(), "selected_proxies": selected.numpy(),
              "proxy_labels": r.objective.proxies.labels.cpu().numpy(),
              "fit_embeddings": fit_embeddings.numpy(), "fit_labels": fit_labels.numpy(),
              "class_names": np.array(r.splits["fit_eval"].class_names, dtype=str)}
    save_npz(folder / f"{name}.npz", arrays)


def test_best(r: build.Run) -> dict:
    """Restore the overall best theta and P (chosen on validation classes) and evaluate on the test split."""
    cfg, tc = r.cfg, r.cfg["train"]
    if r.best is not None:
        r.network.load_state_dict(r.best["model"])
        if r.objective is not None:
            r.objective.load_state_dict(r.best["objective"])
        r.say(f"best validation MAP@R {r.best['val_MAP@R']:.4f} at step {r.best['step']}: testing that "
              f"model on the test classes")
    else:
        r.say(f"no validation ran (max_steps {tc['max_steps']} < eval_every {tc['eval_every']}): "
              f"testing the last weights")
    r.ccp.finish()
    embedded = test_embeddings(cfg, r.network, r.splits, r.device)
    metrics = test_metrics(cfg, embedded)
    if cfg["evaluation"]["save_embeddings"]:
        val = embed_normalized(r.network, r.splits["val"], cfg, r.device)
        arrays = {f"{split}_{kind}": t.numpy() for split, pair in {"val": val, **embedded}.items()
                  for kind, t in zip(("embeddings", "labels"), pair)}
        save_npz(r.dir / "embeddings.npz", arrays)
    result = {"fold": r.fold, "seed": r.seed, "best_step": None if r.best is None else r.best["step"],
              "best_val_MAP@R": None if r.best is None else r.best["val_MAP@R"], "steps": r.step, "test": metrics}
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
    """Metrics of the fold models' embeddings as one (build.ensemble_normalizer, PAPER.md §7)."""
    normalize = build.ensemble_normalizer(cfg)
    joined = {name: (evaluate.ensemble([p[name][0] for p in parts], normalize), parts[0][name][1])
              for name in parts[0]}
    return test_metrics(cfg, joined)


def run_directory(cfg: dict) -> Path:
    """run_dir with ~ expanded (config.py refuses an empty one, which would write into the current directory)."""
    return Path(cfg["run_dir"]).expanduser()


def run(cfg: dict) -> dict:
    """Train every requested (seed, fold) model and write run_dir/results.json. Under torchrun the models
    are dealt out to the processes, each trains its own exactly as one process would, and rank 0 writes
    the results from what all of them return."""
    run_dir = run_directory(cfg)
    models = [(seed, fold, run_dir / folder) for seed, fold, folder in build.model_folders(cfg)]
    rank, world = process_group()
    mine = models[rank::world]
    with contextlib.ExitStack() as locks:
        # one process per run_dir and per model folder, so nested runs too; every check before anything is written
        with all_agree(world):
            for folder in dict.fromkeys([run_dir] * (rank == 0) + [model_dir for _, _, model_dir in mine]):
                locks.enter_context(RunLock(folder))
            if rank == 0:
                check_run_dir(cfg, run_dir)
            for seed, fold, model_dir in mine:  # the checkpoint a resume names, the data and the weights
                build.find_checkpoint(cfg, fold, seed, model_dir)
            build.check_inputs(cfg, sorted({fold for _, fold, _ in mine}))
        if rank == 0:
            write_config_once(run_dir, cfg)
        trained = {}
        for seed, fold, model_dir in mine:
            prefix = f"[seed {seed} fold {fold}] " if len(models) > 1 else ""
            try:
                trained[seed, fold] = train_one_model(cfg, fold, seed, model_dir, prefix)
            except (ValueError, OSError, NonFiniteError) as err:
                if world > 1:  # under torchrun: say which model failed
                    raise type(err)(f"{prefix}{err}") from None
                raise
        trained = gather(trained, world)
        return summarize_run(cfg, run_dir, models, trained) if rank == 0 else {}


def process_group() -> tuple[int, int]:
    """(rank, number of processes) under torchrun, joined in a gloo group for the checks and the results;
    (0, 1) otherwise. Each process computes on its own device (build.resolve_device: cuda:LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    if not dist.is_initialized():  # models train for hours between the group's two meetings
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def all_agree(world: int):
    """Run the checks of every process; if one fails, all stop with its error before anything is written."""
    error = None
    try:
        yield
    except (ValueError, OSError) as err:
        error = err
    others = [None] * world
    if world > 1:
        dist.all_gather_object(others, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if any(others):
        raise ConfigError(f"another process refused to start: {next(filter(None, others))}")


def gather(trained: dict, world: int) -> dict:
    """Every process's trained models, on rank 0 (as one dict); unchanged in one process."""
    if world == 1:
        return trained
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(trained, parts, dst=0)
    # the group's last meeting: closed by every process together, so that no process exits with gloo's
    # threads still running (which aborts it: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    return {key: value for part in parts or [] for key, value in part.items()}


def summarize_run(cfg: dict, run_dir: Path, models: list[tuple[int, int, Path]], trained: dict) -> dict:
    """results.json: every model's test metrics, their mean, the fold ensemble and the repeats (PAPER.md §7)."""
    folds, seeds = sorted({fold for _, fold, _ in models}), sorted({seed for seed, _, _ in models})
    results: dict[str, Any] = {"config": cfg, "git_commit": git_commit(), "models": []}
    embeddings = {}  # (seed, fold) -> the model's normalised test embeddings
    for seed, fold, _ in models:
        result = dict(trained[seed, fold])
        embeddings[seed, fold] = result.pop("embeddings")
        results["models"].append(result)
    per_seed = [{"seed": seed, "mean": summarize([m["test"] for m in results["models"] if m["seed"] == seed])[0]}
                for seed in seeds]
    results["per_seed"] = per_seed
    results["mean"], results["sd"] = summarize([s["mean"] for s in per_seed])
    if len(folds) > 1:
        for s in per_seed:
            s["ensemble"] = ensemble_metrics(cfg, [embeddings[s["seed"], fold] for fold in folds])
        # the authors' mean +- sd over repeats: every combination of one repeat's model per fold (PAPER.md §7)
        combos = [ensemble_metrics(cfg, [embeddings[seed, fold] for seed, fold in zip(choice, folds)])
                  for choice in itertools.product(seeds, repeat=len(folds))]
        results["ensemble_mean"], results["ensemble_sd"] = summarize(combos)
        results["ensemble_combinations"] = len(combos)
    save_json(results, run_dir / "results.json")
    print_results(cfg, results, len(seeds), len(folds), run_dir)
    return results


def evaluate_checkpoint(cfg: dict) -> dict:
    """eval_only: rebuild the checkpoint's network, evaluate it on the test split, print the table."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every process would evaluate into the one run_dir
        raise ConfigError("eval_only evaluates one checkpoint in one process: run it with python, not torchrun")
    path, run_dir = Path(cfg["resume"]).expanduser(), run_directory(cfg)
    with RunLock(run_dir):
        if holds_results(run_dir):
            raise ConfigError(f"eval_only: run_dir {run_dir} already holds a run's results; set run_dir to a new "
                              f"folder so that nothing there is overwritten")
        return evaluate_saved(cfg, path, run_dir)


def evaluate_saved(cfg: dict, path: Path, run_dir: Path) -> dict:
    """The test metrics of the checkpoint at `path`, written to run_dir/results.json."""
    state = load_checkpoint(path)
    device = build.resolve_device(cfg["device"])
    # the network, n(x) and folds as the checkpoint was trained; the test data and metrics from cfg
    try:
        network = build.saved_network(state, device, default_layout=cfg["model"]["channels_last"])
        trained = state["config"]
        cfg = {**cfg, "normalization": trained["normalization"], "folds": trained["folds"]}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another version's or a damaged checkpoint
        raise ConfigError(f"eval_only: {path} is not a checkpoint this version of train.py can evaluate "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    splits = build.build_splits(cfg, state["fold"])
    metrics = test_metrics(cfg, test_embeddings(cfg, network.to(device), splits, device))
    save_json({"checkpoint": str(path), "step": state["step"], "test": metrics}, run_dir / "results.json")
    print(f"test metrics of {path} (step {state['step']})")
    print(evaluate.format_table(metrics))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cfg = None
    try:
        cfg = load_config(argv[0], argv[1:])
        if cfg["eval_only"]:
            evaluate_checkpoint(cfg)
        else:
            run(cfg)
    except (ValueError, OSError, NonFiniteError) as err:  # ConfigError is a ValueError
        # bad input (config, files, data, weights, a full disk) is reported in one message, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; the checkpoints written so far are kept: continue with\n  "
              f"{continue_command(argv, cfg)}", file=sys.stderr)
        return 130
    return 0


def continue_command(argv: list[str], cfg: dict | None) -> str:
    """The command that continues an interrupted run: with resume=auto (run_dir's last.pt, or a fresh start
    if none was written); unchanged for an evaluation or a resume from elsewhere that wrote no checkpoint yet."""
    same = cfg is None or cfg["eval_only"] or (
        cfg["resume"] not in (None, "auto") and not any(run_directory(cfg).rglob("last.pt")))
    args = argv if same else [arg for arg in argv if not arg.startswith("resume=")] + ["resume=auto"]
    return shlex.join([interpreter(), "train.py", *args])


if __name__ == "__main__":
    sys.exit(main())
