"""Train and evaluate deep metric learning with chance constraints (CCP) from one YAML file.

usage: python train.py CONFIG.yaml [key=value ...]
  e.g. python train.py configs/digits_ccp.yaml
       python train.py configs/sop_ms.yaml fold=0 run_dir=runs/sop_ms_fold0
       python train.py configs/sop_ms.yaml resume=auto          (continue an interrupted run)
       python train.py configs/sop_ms.yaml eval_only=true resume=runs/sop_ms/fold0/best.pt run_dir=runs/eval

Read it beside PAPER.md §2 (the paper's Algorithm 1): `train_one_model` is that algorithm, one step
a line, in order. Around it this file owns the MLRC protocol of PAPER.md §7 (class-disjoint folds,
the 128-D mean and the 512-D ensemble, repeats) and the test evaluation of PAPER.md §6. build.py
assembles the pieces (data.py, model.py, losses.py, projection.py, selection.py, optimizer.py) from
the config that config.py reads; bookkeeping.py writes checkpoints and logs. `eval_only: true`
evaluates a saved checkpoint.

Everything a run depends on is a config key; DEFAULTS below lists every key with the paper's value.
"""
from __future__ import annotations

import itertools
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import build
import config
import evaluate
import model
import selection
from bookkeeping import (RunLock, append_jsonl, check_run_dir, git_commit, holds_results, load_checkpoint, print_results,
                         save_json, save_npz, summarize, write_config_once)
from config import ConfigError
from projection import host_copy

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
        "sampler": "rounds",  # rounds: every class once per shuffled round, as the authors (PAPER.md §7) | independent
    },
    "model": {
        "backbone": "bninception",  # bninception | resnet50 | tiny_cnn | mlp
        "pretrained": "imagenet",  # a path, a known name (model.py), or null for random weights
        "embedding_dim": 128,
        "pooling": "avg",  # avg | max
        "freeze_bn": True,  # BatchNorm gamma, beta and running statistics frozen (MLRC)
        "backbone_kwargs": {},  # keyword arguments of the backbone, e.g. {in_channels: 3} for tiny_cnn
        "channels_last": True,  # weights and images in channels_last (NHWC) memory: the same model, a faster step
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
        "proxy_init": "kcenter",  # the first proxies: kcenter (PAPER.md §5) | random (the authors' random_init ablation)
        "reselect": True,  # k-center at every converged instance; false: the first proxies are kept (ablation)
        "save_selections": False,  # write every selection (P*, new P, fit embeddings) to selections/*.npz
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
        "max_steps": 2_500_000,  # the authors' cap (10,000 x 250): early stopping ends runs (PAPER.md §7)
        "eval_every": 250,  # validation interval E (25 for CUB and Cars)
        "patience": 60,  # overall early stopping, in evaluations
        "lr": 1.0e-5,
        "betas": [0.9, 0.999],  # Keras defaults, which the authors' code runs
        "eps": 1.0e-7,
        "adam_epsilon": "keras",  # keras: eps added before bias correction, as the authors' Adam | torch
        "weight_decay": 1.0e-4,  # coupled L2, added to the gradient before clipping
        "clip_norm": 10.0,
        "clip_value": 10.0,
        "log_every_seconds": 20.0,
    },
    "evaluation": {
        "recall_ks": [1, 10, 100, 1000],
        "nmi": True,
        "ensemble": "authors",  # authors: n(concat(n(f_1), ...)) with the run's n (PAPER.md §7) | mlrc: per-part L2
        "save_embeddings": False,  # write the best model's normalised val/test embeddings to embeddings.npz
    },
}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- the file (with its `base:` files) <- `key=value` overrides, validated (config.py)."""
    return config.load_config(path, list(overrides), DEFAULTS)


# ----------------------------------------------------------------------------------------------
# Algorithm 1 (PAPER.md §2) for one model of one fold.

def train_one_model(cfg: dict, fold: int, seed: int, run_dir: Path, prefix: str = "") -> dict:
    """Train one model with CCP (or a baseline); return its test metrics and normalised test embeddings."""
    r = build.training_run(cfg, fold, seed, run_dir, prefix)  # theta, P, optimiser, theta_anchor <- theta; or resumed
    if not r.resumed and r.instances is not None and cfg["ccp"]["proxy_init"] == "kcenter":
        initial_proxies(r)  # P <- k-center(pool(theta), initial = 0, K)
    tc, E = cfg["train"], cfg["train"]["eval_every"]
    stopped = r.stopper.stale >= r.stopper.patience  # a finished run resumed with resume=auto goes to testing
    while r.step < tc["max_steps"] and not stopped:
        r.sampler.set_epoch(r.step // E, r.step % E)  # an epoch is one validation interval
        for inputs, labels in r.loader:  # a batch: m images of each of P classes (8 x 4, PAPER.md §7)
            # L = w_pair l(batch) + w_proxy l(proxies); grad += lambda_t (theta - theta_anchor); one update of (theta, P)
            r.loss = update(r, inputs.to(r.device, non_blocking=True), labels.to(r.device, non_blocking=True))
            r.step += 1
            r.progress.update(r.step, r.loss, r.status)
            if r.step >= tc["max_steps"]:
                break
        if r.step % E:  # stopped between two validations: save, so that resuming stays exact
            check_finite_state(r)  # last.pt only ever holds a finite state
            r.save(r.last_path)
            break
        # Every E steps: validation MAP@R on the held-out classes (PAPER.md §6).
        score, record = validate(r)
        if r.stopper.update(score) == "improved":  # the overall best (theta, P): what is tested at the end
            r.best = {"step": r.step, "val_MAP@R": score, "model": host_copy(r.network),
                      "objective": None if r.objective is None else host_copy(r.objective)}
            r.save(r.best_path)
        if r.instances is not None:
            # theta*, P* kept at the instance's best; after instance_patience evaluations without a new best
            # the instance has converged: theta_anchor <- theta*, t <- t + 1, lambda_t = lam * decay^t
            outcome = r.instances.after_validation(score)
            if outcome.converged:
                message = f"instance {outcome.instance - 1} converged; lambda -> {outcome.lam:g}"
                if cfg["ccp"]["reselect"]:  # P <- k-center(pool(theta), initial = P*)
                    record["selection"] = reselect_proxies(r, outcome.converged_proxies, outcome.instance)
                    message += (f", proxies re-selected: covering radius {record['selection']['covering_radius_before']:.4f}"
                                f" -> {record['selection']['covering_radius_after']:.4f}")
                r.say(f"step {r.step}: {message}")
        append_jsonl(record, r.log_path)
        stopped = r.stopper.stale >= r.stopper.patience
        r.save(r.last_path)
        r.status = f"val MAP@R {score:.4f} (best {r.stopper.best:.4f})" + (
            f" | instance {r.instances.instance}, lambda {r.instances.lam:g}" if r.instances else "")
        if stopped:  # no improvement of the overall best for `patience` evaluations: stop
            r.say(f"step {r.step}: no improvement for {tc['patience']} evaluations; stopping")
    r.progress.update(r.step, r.loss, r.status, force=True)
    # Restore the overall best theta (and P), chosen on the validation classes; evaluate on the test classes.
    return test_best(r)


def update(r: build.Run, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """One train_step; the proxy baselines' warm-up first trains only the embedding layer and the loss."""
    for p in r.backbone_trainable:
        p.requires_grad_(r.step >= r.cfg["baseline"]["warmup_steps"])
    try:
        return train_step(r.network, r.compute_loss, r.optimizer, inputs, labels,
                          r.instances.pull if r.instances else None)
    except NonFiniteError as err:
        raise NonFiniteError(f"{err} at step {r.step + 1}; training stopped, {last_good_state(r)}") from None


def initial_proxies(r: build.Run) -> None:
    report = reselect_proxies(r, None, 0)
    append_jsonl({"step": 0, "instance": 0, "lam": 0.0, "selection": report}, r.log_path)
    r.say(f"step 0: {r.cfg['ccp']['proxies_per_class']} proxies per class chosen by k-center "
          f"from pools of {report['pool_size']} images")


class NonFiniteError(RuntimeError):
    """The loss, a weight or a buffer became NaN or infinite; the message names it and the step."""


def train_step(network: torch.nn.Module, compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
               pull: Callable[[], None] | None = None) -> float:
    """One update in the authors' order (PAPER.md §2): gradient of the loss, + lambda_t (theta - theta_anchor)
    (`pull`), then the optimiser's coupled decay -> clip the global norm -> clip each value -> Adam."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(network(inputs), labels)
    loss.backward()
    # the guard against a non-finite loss, read after backward is queued so that a GPU is not left idle
    # while the host waits; nothing has changed a weight yet when it raises
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteError(f"loss is {value}")
    if pull is not None:
        pull()  # grad += lambda_t (theta - theta_anchor): before decay and clipping, as the authors
    optimizer.step()
    return value


def check_finite_state(r: build.Run) -> None:
    """Stop like a non-finite loss when a weight or buffer (e.g. BatchNorm's running_var) is not finite."""
    for owner, module in (("model", r.network), ("objective", r.objective)):
        for name, tensor in ({} if module is None else module.state_dict()).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"{owner} tensor {name} holds NaN or inf at step {r.step}; training stopped, "
                                     f"{last_good_state(r)}")


def last_good_state(r: build.Run) -> str:
    if r.last_path.exists():
        return f"{r.last_path} holds the last good state"
    return "no checkpoint was written" + (f" here; {r.cfg['resume']} holds the state it resumed from"
                                          if r.resumed and r.cfg["resume"] != "auto" else "")


# ----------------------------------------------------------------------------------------------
# Validation, proxy selection and the test of the best model.

def eval_loader(dataset, cfg: dict, device: torch.device, sampler=None) -> torch.utils.data.DataLoader:
    workers = cfg["data"]["num_workers"]
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
    record = {"step": r.step, "instance": r.instances.instance if r.instances else 0,
              "lam": r.instances.lam if r.instances else 0.0, "loss": r.loss, "val": val_metrics,
              "seconds": round(time.time() - r.started, 3)}
    return val_metrics["MAP@R"], record


def reselect_proxies(r: build.Run, initial: torch.Tensor | None, instance: int, apply: bool = True) -> dict:
    """P <- select(pool(theta), initial, K): greedy k-center on the next candidates (PAPER.md §5).

    The pool is the next b images of every class from the run-long candidate stream, embedded by the
    current network in inference mode with the training augmentation; k-center runs on raw f(x),
    starting from `initial` (P*, or the zero vector at the start). The covering radius and the
    inter-class distance are logged in the normalised space, for the proxies k-center starts from
    ("before": P*, or the current proxies at the start) and for its choice ("after").
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
        return evaluate.embed(r.network, eval_loader(fit, cfg, r.device, sampler=keys), r.device)[0]

    drawn = r.candidates.draw(pool_size)
    pool = selection.candidate_pool(embed_fn, drawn, batch_size=len(drawn) * pool_size)
    new = selection.select_proxies(pool, initial, per_class)
    n = build.normalizer(cfg)
    points = n(pool.reshape(-1, pool.shape[-1]))
    point_labels = torch.arange(pool.shape[0]).repeat_interleave(pool.shape[1])
    center_labels = proxies.labels.cpu()
    start = proxies.weight.detach().cpu() if initial is None else initial
    report = {"pool_size": pool_size}
    for when, centers in (("before", start), ("after", new)):
        report[f"covering_radius_{when}"] = selection.covering_radius(points, point_labels, n(centers), center_labels)[1]
        report[f"interclass_distance_{when}"] = selection.mean_interclass_distance(n(centers), center_labels)
    if cfg["ccp"]["save_selections"]:
        save_selection(r, torch.zeros_like(new) if initial is None else initial, new, instance,
                       "final" if not apply else f"step{r.step:07d}")
    if apply:
        proxies.reset(new.to(proxies.weight.device))
    return report


def save_selection(r: build.Run, converged: torch.Tensor, selected: torch.Tensor, instance: int, name: str) -> None:
    """selections/NAME.npz: P*, k-center's choice and the raw fit embeddings, for report.py's Fig. 1."""
    folder = r.dir / "selections"
    folder.mkdir(exist_ok=True)
    loader = eval_loader(r.splits["fit_eval"], r.cfg, r.device)
    fit_embeddings, fit_labels = evaluate.embed(r.network, loader, r.device)
    arrays = {"step": np.int64(r.step), "instance": np.int64(instance), "normalization": r.cfg["normalization"],
              "converged_proxies": converged.numpy(), "selected_proxies": selected.numpy(),
              "proxy_labels": r.objective.proxies.labels.cpu().numpy(),
              "fit_embeddings": fit_embeddings.numpy(), "fit_labels": fit_labels.numpy()}
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
    if r.instances is not None and cfg["ccp"]["save_selections"]:  # what k-center would pick next
        reselect_proxies(r, r.objective.proxies.weight.detach().cpu(), r.instances.instance, apply=False)
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
    """Metrics of the fold models' embeddings as one: n(concat(n(f_1), ...)) as the authors (PAPER.md §7),
    or each part L2-normalised as MLRC (evaluation.ensemble: mlrc)."""
    normalize = build.normalizer(cfg) if cfg["evaluation"]["ensemble"] == "authors" else None
    joined = {name: (evaluate.ensemble([p[name][0] for p in parts], normalize), parts[0][name][1])
              for name in parts[0]}
    return test_metrics(cfg, joined)


def run_directory(cfg: dict) -> Path:
    """run_dir with ~ expanded; empty is refused, as it would write into the current directory."""
    if not str(cfg["run_dir"]).strip():
        raise ConfigError("config key run_dir: empty; name the folder that will hold the run")
    return Path(cfg["run_dir"]).expanduser()


def run(cfg: dict) -> dict:
    """Train every requested (seed, fold) model and write run_dir/results.json."""
    run_dir = run_directory(cfg)
    with RunLock(run_dir):  # one process per run_dir
        check_run_dir(cfg, run_dir)
        return train_all_models(cfg, run_dir)


def train_all_models(cfg: dict, run_dir: Path) -> dict:
    folds = range(cfg["folds"]) if cfg["fold"] is None else [cfg["fold"]]
    seeds = [cfg["seed"] + r for r in range(cfg["repeats"])]
    # (seed, fold, the folder of its checkpoints and log): seedS/ and foldF/ only where there are several
    models = [(seed, fold, run_dir / (f"seed{seed}" if len(seeds) > 1 else "")
               / (f"fold{fold}" if len(folds) > 1 else "")) for seed in seeds for fold in folds]
    for seed, fold, model_dir in models:  # every checkpoint a resume names is checked before anything is written
        build.find_checkpoint(cfg, fold, seed, model_dir)
    write_config_once(run_dir, cfg)
    results: dict[str, Any] = {"config": cfg, "git_commit": git_commit(), "models": []}
    embeddings = {}  # (seed, fold) -> the model's normalised test embeddings
    for seed, fold, model_dir in models:
        prefix = f"[seed {seed} fold {fold}] " if len(models) > 1 else ""
        trained = train_one_model(cfg, fold, seed, model_dir, prefix)
        embeddings[seed, fold] = trained.pop("embeddings")
        results["models"].append(trained)
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
    path, run_dir = Path(cfg["resume"]).expanduser(), run_directory(cfg)
    with RunLock(run_dir):
        if holds_results(run_dir):
            raise ConfigError(f"eval_only: run_dir {run_dir} already holds a run's results; set run_dir to a new "
                              f"folder so that nothing there is overwritten")
        return evaluate_saved(cfg, path, run_dir)


def evaluate_saved(cfg: dict, path: Path, run_dir: Path) -> dict:
    """The test metrics of the checkpoint at `path`, written to run_dir/results.json."""
    state = load_checkpoint(path)
    # the network and n(x) as the checkpoint was trained; the test data and metrics from cfg
    trained = state["config"]
    mc = trained["model"]
    # the layout it was trained in, so that the run's own test metrics are reproduced to the last bit
    channels_last = mc.get("channels_last", cfg["model"]["channels_last"])  # absent before it was a key
    network = model.build_model(mc["backbone"], mc["embedding_dim"], None, mc["pooling"], mc["freeze_bn"],
                                 backbone_kwargs=mc["backbone_kwargs"], channels_last=channels_last)
    network.load_state_dict(state["model"])
    device = build.resolve_device(cfg["device"])
    cfg = {**cfg, "normalization": trained["normalization"]}
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
    return shlex.join(["python", "train.py", *args])


if __name__ == "__main__":
    sys.exit(main())
