"""train.py end to end on CPU: config validation, the algorithm of PAPER.md §2 on the digits demo,
exact reproducibility and resumption, checkpoints, evaluation of a saved checkpoint, the fold
protocol, and a fake CUB-200-2011 layout trained for a few steps."""
import functools
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import build
import config
import evaluate
import losses
import model
import projection
import train
from conftest import DIGITS_RUN

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_ccp.yaml"
# Converges instances on a schedule: with min_delta 1 no evaluation after an instance's first counts
# as an improvement, so every instance lasts exactly 1 + instance_patience evaluations.
FAST = ["train.eval_every=5", "projection.min_delta=1.0", "projection.instance_patience=1",
        "train.patience=1000", "train.log_every_seconds=1000"]


def run_digits(tmp_path: Path, name: str, *overrides: str, config: Path = DIGITS) -> dict:
    cfg = train.load_config(config, [f"run_dir={tmp_path / name}", *FAST, *overrides])
    return train.run(cfg)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- config

def test_paper_defaults_for_sop_ms():
    """configs/sop_ms.yaml resolves to the protocol of PAPER.md §2, §4 and §7."""
    cfg = train.load_config(ROOT / "configs" / "sop_ms.yaml")
    assert (cfg["method"], cfg["dataset"]["name"], cfg["loss"]["name"]) == ("ccp", "sop", "ms")
    assert cfg["loss"]["params"] == {"alpha": 2.0, "beta": 40.0, "base": 0.5}
    assert (cfg["ccp"]["proxies_per_class"], cfg["ccp"]["pool_size"]) == (4, 7)
    assert (cfg["ccp"]["pair_weight"], cfg["ccp"]["proxy_weight"]) == (0.1, 1.0)
    assert cfg["projection"] == {"lam": 2e-4, "decay": 1.0, "instance_patience": 3, "min_evaluations": 1,
                                 "min_delta": 1e-5}
    t = cfg["train"]
    assert (t["lr"], t["betas"], t["eps"], t["weight_decay"], t["clip_norm"], t["clip_value"]) == (
        1e-5, [0.9, 0.999], 1e-7, 1e-4, 10.0, 10.0)
    assert (t["eval_every"], t["patience"]) == (250, 60)
    assert (cfg["data"]["classes_per_batch"], cfg["data"]["samples_per_class"]) == (8, 4)
    assert (cfg["model"]["backbone"], cfg["model"]["embedding_dim"], cfg["model"]["freeze_bn"]) == (
        "bninception", 128, True)
    assert cfg["folds"] == 4 and cfg["evaluation"]["recall_ks"] == [1, 10, 100, 1000]
    # the authors' protocol (docs/fidelity.md): 3 repeats, their cap, their queues, their XBM order
    assert (cfg["repeats"], t["max_steps"], cfg["data"]["refill"], cfg["baseline"]["xbm_include_batch"]) == (
        3, 2_500_000, "cycle", True)
    for dataset, cap in (("cub", 250_000), ("cars", 250_000), ("inshop", 2_500_000)):
        other = train.load_config(ROOT / "configs" / f"{dataset}_ms.yaml")
        assert (other["repeats"], other["train"]["max_steps"]) == (3, cap)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = train.load_config(path)
    assert cfg["dataset"]["name"] in path.name or path.name.startswith("base")


@pytest.mark.parametrize("channels_last", [True, False])
def test_model_channels_last_sets_the_layout_of_the_network(channels_last):
    cfg = train.load_config(DIGITS, [f"model.channels_last={str(channels_last).lower()}"])
    network = build.build_network(cfg, seed=0, device=torch.device("cpu"))
    conv = max((m for m in network.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.in_channels)
    assert conv.in_channels > 1 and conv.weight.is_contiguous() != channels_last
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_base_files_merge_and_cycles_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text(f"base: {DIGITS}\ntrain:\n  max_steps: 7\n")
    cfg = train.load_config(tmp_path / "a.yaml", ["train.eval_every=3"])
    assert (cfg["train"]["lr"], cfg["train"]["max_steps"], cfg["train"]["eval_every"]) == (0.5, 7, 3)
    assert cfg["model"]["backbone"] == "tiny_cnn"  # from digits_ccp.yaml, two bases down
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(train.ConfigError, match="cycle"):
        train.load_config(tmp_path / "c.yaml")


def test_main_reports_config_errors_without_traceback(capsys):
    assert train.main([str(DIGITS), "train.max_stpes=10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean train.max_steps" in err and "Traceback" not in err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    config = ROOT / "configs" / "cub_ms.yaml"
    code = train.main([str(config), f"dataset.root={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}",
                       "device=cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "nowhere" in err and "data.py download cub" in err


# ------------------------------------------------------------------------------ the algorithm

def test_update_order_matches_the_authors(tmp_path):
    """One train_step with the optimiser build_optimizer returns equals the hand-written sequence of
    PAPER.md §2: loss gradient, + lam (theta - theta_anchor), + coupled decay on the non-BatchNorm
    weights, global-norm clip, value clip, then Adam with Keras' epsilon."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net.train()
    x, y = torch.randn(4, 3) * 50, torch.tensor([0, 0, 1, 1])
    cfg = train.load_config(DIGITS, ["train.weight_decay=0.1", "train.clip_norm=0.5", "train.clip_value=0.2",
                                     "train.lr=0.01"])
    params = list(net.parameters())
    anchor_values = [p.detach() + 1.0 for p in params]
    loss_fn = lambda e, lab: (e ** 2).sum() * (1 + lab.float()).mean()  # noqa: E731
    decayed = [True, True, False, False]  # Linear weight and bias; not BatchNorm's gamma and beta

    def manual(values):
        w, b, gamma, beta = values
        z = torch.nn.functional.linear(x, w, b)
        z = torch.nn.functional.batch_norm(z, None, None, gamma, beta, training=True)
        grads = torch.autograd.grad(loss_fn(z, y), values)
        grads = [g + 0.3 * (p - a) + (0.1 * p if d else 0) for g, p, a, d in zip(grads, values, anchor_values, decayed)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        grads = [g * min(1.0, 0.5 / (norm.item() + 1e-6)) for g in grads]
        grads = [g.clamp(-0.2, 0.2) for g in grads]
        # Keras' Adam, first step: m = (1 - b1) g, v = (1 - b2) g^2, theta -= lr sqrt(1 - b2)/(1 - b1) m/(sqrt(v) + eps)
        m = [0.1 * g for g in grads]
        v = [0.001 * g ** 2 for g in grads]
        return [p - 0.01 * (0.001 ** 0.5) / 0.1 * mi / (vi.sqrt() + 1e-7) for p, mi, vi in zip(values, m, v)]

    expected = manual([p.detach().clone().requires_grad_() for p in params])
    anchor = projection.ProximalAnchor(params)
    anchor.anchor(anchor_values)
    opt = build.build_optimizer(cfg, net, None)
    train.train_step(net, loss_fn, opt, x, y, pull=lambda: anchor.add_to_grad(0.3))
    for p, q in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method, proxy_lr", [("ccp", 1e-5), ("proxy_anchor", 1e-3), ("softtriple", 1e-3)])
def test_the_proxies_are_decayed_and_a_baseline_s_learn_100_times_faster(method, proxy_lr):
    """PAPER.md §2: the coupled decay 1e-4 covers the proxies; §4: the proxy baselines' proxies learn at
    100 x the network's rate (CCP's at 1 x); BatchNorm's weights are not decayed."""
    cfg = train.load_config(DIGITS, [f"method={method}", "train.lr=1.0e-5", "model.freeze_bn=false"])
    net = build.build_network(cfg, 0, torch.device("cpu"))
    objective = build.build_objective(cfg, 4, cfg["model"]["embedding_dim"], seed=0)
    groups = build.build_optimizer(cfg, net, objective).param_groups
    batchnorm = {id(p) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
    proxies = {id(p) for p in objective.parameters()}
    settings = {(id(p), g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert settings == {(id(p), proxy_lr if id(p) in proxies else 1e-5, 0.0 if id(p) in batchnorm else 1e-4)
                        for p in [*net.parameters(), *objective.parameters()]}


def test_train_step_queues_backward_and_the_pull_before_it_reads_the_loss(monkeypatch):
    """The one host read of a step comes after everything but the update is queued (a GPU keeps busy),
    and a non-finite loss still stops the step before any weight changes."""
    events, item = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: events.append("read") or item(t))
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    weights = [p.detach().clone() for p in net.parameters()]
    train.train_step(net, lambda e, lab: e.sum(), opt, torch.randn(4, 3), torch.zeros(4), lambda: events.append("pull"))
    assert events == ["pull", "read"]
    assert not any(torch.equal(p, w) for p, w in zip(net.parameters(), weights))  # the step updated
    weights = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(train.NonFiniteError, match="loss is nan"):
        train.train_step(net, lambda e, lab: e.sum() * math.nan, opt, torch.randn(4, 3), torch.zeros(4),
                         lambda: events.append("pull"))
    assert events == ["pull", "read", "pull", "read"]
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))  # this one did not


def test_a_pool_smaller_than_k_is_enlarged_to_b_times_k(tmp_path):
    """PAPER.md §5: the authors draw b·K candidates per class when b < K (here b = 2, K = 4: 8)."""
    run_digits(tmp_path, "run", "train.max_steps=1", "ccp.pool_size=2")
    assert read_log(tmp_path / "run" / "metrics.jsonl")[0]["selection"]["pool_size"] == 8


def test_pool_embeds_each_candidate_under_its_own_augmentation_seed_of_the_instance(tmp_path):
    """pool(θ) (PAPER.md §5): candidate k of instance t is augmented with the k-th value of the documented
    stream SeedSequence([seed, t]) (uint64 >> 1) and embedded raw in inference mode; another instance
    draws other augmentations."""
    cfg = train.load_config(DIGITS, [f"run_dir={tmp_path}"])
    r = build.training_run(cfg, 0, 3, tmp_path / "model", "", train.CCP)
    indices = [5, 0, 5, 17]  # a repeated image gets two draws
    seeds = np.random.SeedSequence([3, 2]).generate_state(len(indices), np.uint64) // 2
    r.network.eval()
    with torch.no_grad():
        expected = r.network(torch.stack([r.splits["fit"][(i, int(s))][0] for i, s in zip(indices, seeds)]))
    r.network.train()
    pooled = train.embed_augmented(r, indices, 2)
    assert torch.equal(pooled, expected)
    assert not torch.equal(pooled[0], pooled[2])  # the same image, two augmentations
    assert not torch.equal(train.embed_augmented(r, indices, 1), pooled)


def test_digits_run_converges_instances_and_reselects_proxies(digits_run):
    log = read_log(digits_run / "metrics.jsonl")
    evaluations = [r for r in log if "val" in r]
    assert [r["step"] for r in evaluations] == [5, 10, 15, 20]
    # Instance t lasts 2 evaluations (first improves, second has no improvement > min_delta = 1).
    assert [r["instance"] for r in evaluations] == [0, 0, 1, 1]
    assert [r["lam"] for r in evaluations] == [0.0, 0.0, 2e-4, 2e-4]  # lambda_0 = 0, then lam (decay 1)
    selections = [r for r in log if "selection" in r]
    assert [r["step"] for r in selections] == [0, 10, 20]  # initial k-center, then at each convergence
    for r in selections:
        s = r["selection"]
        assert s["pool_size"] == 16
        assert math.isfinite(s["covering_radius_after"]) and s["covering_radius_after"] >= 0
    for r in evaluations:
        assert 0.0 <= r["val"]["MAP@R"] <= 1.0
    results = json.loads((digits_run / "results.json").read_text())
    assert {"P@1", "P@R", "MAP@R", "R@1", "R@8", "NMI"} <= results["mean"].keys()
    best = torch.load(digits_run / "best.pt", weights_only=False)
    assert best["step"] in [r["step"] for r in evaluations]
    with np.load(digits_run / "selections" / "final.npz") as final:  # k-center from the tested model's P
        assert (final["step"], final["instance"]) == next((r["step"], r["instance"]) for r in evaluations
                                                          if r["step"] == best["step"])
    assert best["config"]["method"] == "ccp" and "git_commit" in best
    saved = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 20


def test_lambda_decay_schedule(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=30", "projection.decay=0.5", "projection.lam=0.01")
    lams = [r["lam"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if "val" in r]
    assert lams == [0.0, 0.0, 0.005, 0.005, 0.0025, 0.0025]  # lam * decay^t for instance t >= 1


def test_the_anchor_is_the_best_weights_of_the_finished_instance(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=10")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    # The instance converged at step 10; its best evaluation was step 5, saved as best.pt.
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["step"] == 5
    names = [n for n, p in model.build_model("tiny_cnn", 32, None, "avg", False).named_parameters()
             if p.requires_grad]
    assert len(names) == len(last["ccp"]["anchor"]["anchors"])
    for name, anchored in zip(names, last["ccp"]["anchor"]["anchors"]):
        assert torch.equal(anchored, best["model"][name])
        assert not torch.equal(anchored, last["model"][name])  # the network itself continued training


def test_two_runs_are_identical_with_or_without_loader_workers(digits_run, tmp_path):
    run_digits(tmp_path, "b", *DIGITS_RUN, "data.num_workers=1")  # augmentation seeded per item
    assert_same_run(digits_run, tmp_path / "b")


def test_each_pool_is_augmented_with_the_seeds_of_the_instance_it_starts(tmp_path, monkeypatch):
    """pool(θ) at a re-selection draws the augmentations of instance t + 1, the one its proxies start (the
    instance that converged at steps 10 and 20 is 0, then 1), and at step 0 those of instance 0."""
    instances, embed = [], train.embed_augmented
    monkeypatch.setattr(train, "embed_augmented", lambda r, indices, t: instances.append(t) or embed(r, indices, t))
    run_digits(tmp_path, "run", *DIGITS_RUN[:-2])  # no saved selections: one pool per selection
    assert instances == [0, 1, 2]


def test_resume_of_an_early_stopped_run_says_its_training_had_ended(tmp_path, capsys):
    run_digits(tmp_path, "run", "train.max_steps=200", "train.eval_every=5", "train.patience=1")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["models"][0]["steps"] < 200
    capsys.readouterr()
    run_digits(tmp_path, "run", "train.max_steps=200", "train.eval_every=5", "train.patience=1", "resume=auto")
    assert "where its training had ended: only the test runs again" in capsys.readouterr().out


@pytest.mark.parametrize("include_batch", [True, False])
def test_xbm_memory_holds_the_configured_batches(include_batch):
    cfg = train.load_config(DIGITS, ["method=xbm", "baseline.xbm_memory_batches=3", "data.classes_per_batch=2",
                                     "data.samples_per_class=5", f"baseline.xbm_include_batch={include_batch}"])
    memory = build.build_memory(cfg, torch.device("cpu"))
    assert memory.memory.shape == (3 * 2 * 5, cfg["model"]["embedding_dim"]) and memory.include_batch is include_batch
    assert build.build_memory(train.load_config(DIGITS), torch.device("cpu")) is None


def test_a_checkpoint_without_evaluation_ensemble_is_ensembled_as_the_authors():
    cfg = train.load_config(DIGITS)
    assert build.ensemble_normalizer(cfg) is build.normalizer(cfg)
    assert build.ensemble_normalizer({**cfg, "evaluation": {}}) is build.normalizer(cfg)  # older than the key
    assert build.ensemble_normalizer({**cfg, "evaluation": {"ensemble": "mlrc"}}) is None


def test_resume_auto_on_a_finished_run_only_tests_again(digits_run, tmp_path, capsys):
    run = Path(shutil.copytree(digits_run, tmp_path / "run"))
    assert train.main([str(DIGITS), f"run_dir={run}", *DIGITS_RUN, "resume=auto"]) == 0
    assert "at step 20, where its training had ended: only the test runs again" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "metrics.jsonl"):  # nothing trained
        assert (run / name).read_bytes() == (digits_run / name).read_bytes(), name
    again, before = ({k: v for k, v in json.loads((r / "results.json").read_text()).items() if k != "config"}
                     for r in (run, digits_run))
    assert again == before  # the same test (its config says resume=auto)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical last checkpoints (weights, proxies, CCP's state), logs and test metrics."""
    sa, sb = (torch.load(r / "last.pt", weights_only=False) for r in (a, b))
    assert sa["step"] == sb["step"]
    assert tensors_equal(sa["model"], sb["model"]) and tensors_equal(sa["objective"], sb["objective"])
    assert sa["ccp"]["controller"] == sb["ccp"]["controller"]
    assert all(torch.equal(x, y) for x, y in zip(sa["ccp"]["anchor"]["anchors"], sb["ccp"]["anchor"]["anchors"]))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_log(a / "metrics.jsonl")) == strip(read_log(b / "metrics.jsonl"))
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert ra["mean"] == rb["mean"]


@pytest.mark.parametrize("interrupt", [10, 13])  # at a validation with a re-selection, and between two
def test_resume_continues_bit_for_bit(digits_run, tmp_path, interrupt):
    run_digits(tmp_path, "resumed", *DIGITS_RUN, f"train.max_steps={interrupt}")
    run_digits(tmp_path, "resumed", *DIGITS_RUN, "resume=auto")
    assert_same_run(digits_run, tmp_path / "resumed")


def test_baselines_train(tmp_path):
    for method, extra in [("baseline", []), ("proxy_anchor", ["baseline.warmup_steps=5"]),
                          ("proxynca++", []), ("softtriple", ["baseline.params={centers_per_class: 2}"]),
                          ("xbm", ["baseline.xbm_start_step=5", "baseline.xbm_memory_batches=2",
                                   "loss.name=c1", "loss.params={margin: 0.5}"])]:
        run_digits(tmp_path, method, "train.max_steps=15", f"method={method}", *extra)
        log = read_log(tmp_path / method / "metrics.jsonl")
        assert [r["step"] for r in log] == [5, 10, 15] and all(r["lam"] == 0.0 for r in log)
        assert all(math.isfinite(r["loss"]) for r in log)


def test_warmup_trains_only_the_embedding_layer(tmp_path):
    run_digits(tmp_path, "warm", "train.max_steps=5", "method=proxy_anchor", "baseline.warmup_steps=5")
    cfg = train.load_config(DIGITS)
    initial = model.build_model("tiny_cnn", 32, None, "avg", False, seed=cfg["seed"])
    trained = torch.load(tmp_path / "warm" / "last.pt", weights_only=False)["model"]
    changed = {k for k, p in initial.named_parameters() if not torch.equal(p, trained[k])}
    assert changed and all(k.startswith("embedding") for k in changed), changed
    # then a fresh Adam (as the authors compile one), also when resumed at the warm-up's end: after 2
    # more steps every tensor has made 2 Adam steps (the warm-up's moments of the embedding are gone)
    run_digits(tmp_path, "warm", "train.max_steps=7", "method=proxy_anchor", "baseline.warmup_steps=5", "resume=auto")
    state = torch.load(tmp_path / "warm" / "last.pt", weights_only=False)["optimizer"]["state"]
    assert len(state) == len(list(initial.parameters())) + 1  # the network's tensors and the proxies
    assert {s["step"] for s in state.values()} == {2}


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    @functools.wraps(losses.c1_contrastive)
    def exploding(*args, **kwargs):
        calls["n"] += 1
        value = losses.c1_contrastive(*args, **kwargs)
        return value * float("nan") if calls["n"] > 14 else value

    monkeypatch.setitem(losses.LOSSES, "c1", exploding)
    code = train.main([str(DIGITS), f"run_dir={tmp_path / 'run'}", *FAST, "train.max_steps=40",
                       "method=baseline", "loss.name=c1", "loss.params={margin: 0.5}"])
    err = capsys.readouterr().err
    assert code == 1 and "at step 15" in err and "nan" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 10


@pytest.mark.parametrize("value, device, expected", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("auto", "cuda:1", False),
    (True, "cuda", True), (False, "cpu", False), (True, "cpu", True), (False, "cuda", False)])
def test_channels_last_and_fold_bn_auto_are_true_on_a_cpu_and_false_on_cuda(value, device, expected):
    assert build.on_cpu(value, torch.device(device)) is expected  # a device object, no GPU needed


@pytest.mark.parametrize("cores, processes, expected", [
    (16, None, 15), (16, "2", 7), (64, None, 16), (2, None, 1), (1, None, 0), (4, "8", 0), (33, "2", 15)])
def test_auto_loader_workers_share_the_cores_among_the_processes(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(build.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert build.loader_workers({"data": {"num_workers": "auto"}}) == expected
    assert build.loader_workers({"data": {"num_workers": 3}}) == 3  # an integer is taken as it is
    monkeypatch.delattr(build.os, "sched_getaffinity")  # where it does not exist: all the machine's cores
    monkeypatch.setattr(build.os, "cpu_count", lambda: cores)
    assert build.loader_workers({"data": {"num_workers": "auto"}}) == expected


def test_a_checkpoint_records_its_layout_and_eval_only_rebuilds_it(digits_run, tmp_path, monkeypatch):
    """Trained on the CPU with model.channels_last and model.fold_bn: auto, the checkpoint says channels_last
    and folded; eval_only follows the checkpoint, not what auto would resolve to on the evaluating device."""
    mc = train.load_config(DIGITS)["model"]
    assert mc["channels_last"] == mc["fold_bn"] == "auto"
    for name in ("best.pt", "last.pt"):
        state = torch.load(digits_run / name, weights_only=True)
        assert state["channels_last"] is True and state["fold_bn"] is True
    segment = json.loads((digits_run / "segments.jsonl").read_text().splitlines()[0])
    assert segment["resolved"] == {"model.channels_last": True, "model.fold_bn": True, "data.num_workers": 0}
    built, build_model = [], model.build_model
    monkeypatch.setattr(model, "build_model",
                        lambda *a, **k: built.append((k["channels_last"], k["fold_bn"])) or build_model(*a, **k))
    monkeypatch.setattr(train.build, "on_cpu", lambda value, device: False)  # as on CUDA
    cfg = train.load_config(DIGITS, [f"run_dir={tmp_path / 'eval'}", "eval_only=true",
                                     f"resume={digits_run / 'best.pt'}"])
    train.evaluate_checkpoint(cfg)
    assert built == [(True, True)]


@pytest.mark.parametrize("recorded, expected", [({"fold_bn": False}, False), ({"fold_bn": True}, True),
                                                ({}, True)])  # before model.fold_bn every checkpoint folded
def test_a_saved_bninception_is_rebuilt_with_the_batchnorm_path_it_trained_in(recorded, expected):
    cfg = train.load_config(DIGITS, ["model.backbone=bninception", "model.pretrained=null",
                                     "model.backbone_kwargs={}", "model.fold_bn=false"])  # the config does not decide
    state = {"config": cfg, "model": model.build_model("bninception", cfg["model"]["embedding_dim"]).state_dict(),
             "channels_last": False, **recorded}
    assert build.saved_network(state, torch.device("cpu")).backbone.fold_bn is expected


@pytest.mark.parametrize("value, expected", [("auto", True), (False, False)])
def test_model_fold_bn_chooses_bninception_s_batchnorm_path(value, expected):
    cfg = train.load_config(DIGITS, ["model.backbone=bninception", "model.pretrained=null", "model.backbone_kwargs={}",
                                     f"model.fold_bn={str(value).lower()}"])
    assert build.build_network(cfg, 0, torch.device("cpu")).backbone.fold_bn is expected


def test_eval_only_reproduces_the_final_test_metrics(digits_run, tmp_path):
    results = json.loads((digits_run / "results.json").read_text())
    cfg = train.load_config(DIGITS, [f"run_dir={tmp_path / 'eval'}", "eval_only=true",
                                     f"resume={digits_run / 'best.pt'}"])
    metrics = train.evaluate_checkpoint(cfg)
    assert metrics == pytest.approx(results["mean"], abs=1e-9)


# --------------------------------------------------------------------------- a fake CUB layout

def make_fake_cub(root: Path, classes_per_side: int = 4, images_per_class: int = 6) -> None:
    base = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, names = [], [], []
    class_ids = list(range(1, classes_per_side + 1)) + list(range(101, 101 + classes_per_side))
    for cid in class_ids:
        folder = f"{cid:03d}.Bird_{cid}"
        names.append(f"{cid} {folder}")
        (base / "images" / folder).mkdir(parents=True)
        for k in range(images_per_class):
            pixels = (rng.random((40, 48, 3)) * 60 + cid % 7 * 25).astype(np.uint8)
            Image.fromarray(pixels).save(base / "images" / folder / f"img_{k}.jpg")
            images.append(f"{folder}/img_{k}.jpg")
            labels.append(cid)
    (base / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(images)))
    (base / "image_class_labels.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(labels)))
    (base / "classes.txt").write_text("\n".join(names) + "\n")


def test_validation_decoded_once_gives_the_same_run(tmp_path):
    # data.cache_validation: the validation images decoded once (read by a loader worker here) against
    # decoding them at every validation: the same log and results, bit for bit
    make_fake_cub(tmp_path / "cub")
    runs = {}
    for cache, workers in ((True, 1), (False, 0)):
        overrides = [f"dataset.root={tmp_path / 'cub'}", f"run_dir={tmp_path / str(cache)}", "device=cpu",
                     "repeats=1", "folds=2", "fold=1", "model.backbone=tiny_cnn", "model.pretrained=null",
                     "model.embedding_dim=8", "model.freeze_bn=false", "model.backbone_kwargs={in_channels: 3}",
                     "data.transform=resnet", "data.crop_size=24", "data.resize=28", "data.classes_per_batch=2",
                     "data.samples_per_class=3", f"data.num_workers={workers}", "ccp.proxies_per_class=2",
                     "ccp.pool_size=3", "train.max_steps=4", "train.eval_every=2", "evaluation.nmi=false",
                     f"data.cache_validation={str(cache).lower()}"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fake has far fewer images than CUB: data.py warns
            runs[cache] = train.run(train.load_config(ROOT / "configs" / "cub_ms.yaml", overrides))
    logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / str(c) / "metrics.jsonl")]
            for c in (True, False)]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0] if "val" in r] == [2, 4]
    assert runs[True]["mean"] == runs[False]["mean"]


def test_fake_cub_trains_with_the_tiny_cnn(tmp_path):
    make_fake_cub(tmp_path / "cub")
    overrides = [f"dataset.root={tmp_path / 'cub'}", f"run_dir={tmp_path / 'run'}", "device=cpu", "repeats=1",
                 "folds=2", "fold=1", "model.backbone=tiny_cnn", "model.pretrained=null",
                 "model.embedding_dim=16", "model.freeze_bn=false", "model.backbone_kwargs={in_channels: 3}", "data.transform=resnet",
                 "data.crop_size=32", "data.resize=36", "data.classes_per_batch=2", "data.samples_per_class=3",
                 "data.num_workers=0", "ccp.proxies_per_class=2", "ccp.pool_size=3", "train.max_steps=6",
                 "train.eval_every=3", "train.lr=0.001"]
    cfg = train.load_config(ROOT / "configs" / "cub_ms.yaml", overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fake has far fewer images than CUB: data.py warns
        results = train.run(cfg)
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in log if "val" in r] == [3, 6]
    assert results["mean"].keys() >= {"R@1", "R@2", "R@4", "R@8", "MAP@R"}
    assert 0.0 <= results["mean"]["MAP@R"] <= 1.0


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=5")
    with pytest.raises(train.ConfigError, match=r"model\.embedding_dim=32.*config says model\.embedding_dim=16"):
        run_digits(tmp_path, "run", "train.max_steps=10", "resume=auto", "model.embedding_dim=16")
    # a checkpoint of older code, from before a key that shapes the state (data.refill): named as such
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    del state["config"]["data"]["refill"]
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(train.ConfigError, match=r"with no data\.refill \(older code\) but the config says "
                                                r"data\.refill='cycle'"):
        run_digits(tmp_path, "run", "train.max_steps=10", "resume=auto")
    # a shape no config key names (SoftTriple's centers per class): one line naming the tensor
    run_digits(tmp_path, "soft", "train.max_steps=5", "method=softtriple")
    with pytest.raises(train.ConfigError, match=r"^resume: auto does not fit this config: Error\(s\) in loading "
                                                r"state_dict for SoftTriple: size mismatch for proxies: [^\n]*$"):
        run_digits(tmp_path, "soft", "train.max_steps=10", "resume=auto", "method=softtriple",
                   "baseline.params={centers_per_class: 3}")
    with pytest.raises(train.ConfigError, match=r"baseline\.xbm_memory_batches=25 but the config says "
                                                r"baseline\.xbm_memory_batches=3$"):  # XBM's memory: its size
        run_digits(tmp_path, "soft", "train.max_steps=10", "resume=auto", "method=softtriple",
                   "baseline.xbm_memory_batches=3")


def test_eval_only_under_torchrun_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it in each process
    code = train.main([str(DIGITS), f"run_dir={tmp_path / 'eval'}", "eval_only=true", f"resume={tmp_path / 'a.pt'}"])
    assert code == 1 and "eval_only evaluates one checkpoint in one process" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_unreadable_checkpoint_and_occupied_eval_dir_are_clear_errors(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    code = train.main([str(DIGITS), f"run_dir={tmp_path / 'eval'}", "eval_only=true",
                       f"resume={tmp_path / 'broken.pt'}"])
    assert code == 1 and "cannot read checkpoint" in capsys.readouterr().err
    run_digits(tmp_path, "run", "train.max_steps=5")
    before = (tmp_path / "run" / "results.json").read_text()
    code = train.main([str(DIGITS), f"run_dir={tmp_path / 'run'}", "eval_only=true",
                       f"resume={tmp_path / 'run' / 'best.pt'}"])
    assert code == 1 and "already holds a run's results" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=5")
    files = lambda: {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir() if f.name != ".lock"}  # noqa: E731
    before = files()
    with pytest.raises(train.ConfigError, match="already holds a run; continue it with resume=auto"):
        run_digits(tmp_path, "run", "train.max_steps=10")
    assert files() == before


def test_random_proxy_init_replaces_only_the_first_k_center(tmp_path):
    """The authors' random_init (PAPER.md §7): the first proxies are the random draw; every converged
    instance still re-selects by k-center."""
    run_digits(tmp_path, "run", "train.max_steps=10", "ccp.proxy_init=random")
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in log if "selection" in r] == [10]  # none at step 0, one at the convergence
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)  # step 5: still the first instance
    initial = build.build_objective(train.load_config(DIGITS), 4, 32, seed=0).proxies.weight
    trained = best["objective"]["proxies.weight"]
    assert not torch.equal(initial, trained)  # trained from the random draw ...
    assert (trained - initial).abs().max() < 0.1  # ... by small Adam steps, not replaced at step 0


def test_a_resumed_run_keeps_its_progress_and_takes_the_new_lambda(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=20")
    run_digits(tmp_path, "run", "train.max_steps=30", "projection.lam=0.01", "resume=auto")
    log = [(r["instance"], r["lam"]) for r in read_log(tmp_path / "run" / "metrics.jsonl") if "val" in r]
    assert log == [(0, 0.0), (0, 0.0), (1, 2e-4), (1, 2e-4), (2, 0.01), (2, 0.01)]


def test_without_reselection_the_first_proxies_are_kept_and_lambda_still_switches_on(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=20", "ccp.reselect=false")
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in log if "selection" in r] == [0]  # the initial k-center only
    assert [r["lam"] for r in log if "val" in r] == [0.0, 0.0, 2e-4, 2e-4]


def test_fake_cub_with_bninception_from_a_weight_file(tmp_path):
    """The paper's set-up end to end at a tiny scale: a BN-Inception weight file with the port's key
    names, the BGR/Caffe input, frozen BatchNorm (statistics and affine parameters never change)."""
    make_fake_cub(tmp_path / "cub", images_per_class=4)
    weights = model.BNInception().state_dict()
    torch.save({k: v.clone() for k, v in weights.items()}, tmp_path / "bn_inception.pth")
    overrides = [f"dataset.root={tmp_path / 'cub'}", f"run_dir={tmp_path / 'run'}", "device=cpu", "folds=2",
                 "fold=0", "repeats=1", f"model.pretrained={tmp_path / 'bn_inception.pth'}", "data.crop_size=64",
                 "data.resize=72", "data.classes_per_batch=2", "data.samples_per_class=2", "data.num_workers=0",
                 "ccp.proxies_per_class=2", "ccp.pool_size=2", "train.max_steps=2", "train.eval_every=2",
                 "evaluation.nmi=false"]
    cfg = train.load_config(ROOT / "configs" / "cub_ms.yaml", overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # far fewer images than CUB: data.py warns
        train.run(cfg)
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    batchnorm = [k for k in weights if "_bn." in k]
    assert batchnorm and all(torch.equal(trained[f"backbone.{k}"], weights[k]) for k in batchnorm)
    convs = [k for k in weights if "_bn." not in k]
    assert any(not torch.equal(trained[f"backbone.{k}"], weights[k]) for k in convs)  # the rest trains


def test_a_finished_run_resumed_with_more_patience_trains_on(tmp_path):
    run_digits(tmp_path, "run", "train.max_steps=40", "train.patience=2", "projection.min_delta=1.0")
    steps = [r["step"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if "val" in r]
    assert steps == [5, 10, 15]  # min_delta 1: nothing improves after the first validation
    run_digits(tmp_path, "run", "train.max_steps=40", "train.patience=4", "projection.min_delta=1.0", "resume=auto")
    steps = [r["step"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if "val" in r]
    assert steps == [5, 10, 15, 20, 25]


def write_jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(shade).random((36, 40, 3)) * 60 + shade % 5 * 40).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def make_fake_sop(root: Path) -> None:
    base = root / "Stanford_Online_Products"
    for split, classes in (("train", range(1, 5)), ("test", range(5, 9))):
        rows = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(4):
                name = f"bicycle_final/{c}_{k}.JPG"
                write_jpeg(base / name, c)
                rows.append(f"{len(rows)} {c} 1 {name}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")


def make_fake_inshop(root: Path) -> None:
    rows = []
    for item in range(1, 8):
        statuses = ["train"] * 4 if item <= 4 else ["query", "query", "gallery", "gallery"]
        for k, status in enumerate(statuses):
            name = f"img/MEN/Denim/id_{item:08d}/{k:02d}_1_front.jpg"
            write_jpeg(root / "Img" / name, item)
            rows.append(f"{name}   id_{item:08d}   {status}")
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows]) + "\n")


@pytest.mark.parametrize("dataset, make", [("sop", make_fake_sop), ("inshop", make_fake_inshop)])
def test_fake_sop_and_inshop_train_and_test(tmp_path, capsys, dataset, make):
    make(tmp_path / dataset)
    overrides = [f"dataset.root={tmp_path / dataset}", f"run_dir={tmp_path / 'run'}", "device=cpu", "repeats=1",
                 "folds=2", "fold=0", "model.backbone=tiny_cnn", "model.pretrained=null", "model.embedding_dim=8",
                 "model.freeze_bn=false", "model.backbone_kwargs={in_channels: 3}", "data.transform=resnet",
                 "data.crop_size=24", "data.resize=28", "data.classes_per_batch=2", "data.samples_per_class=2",
                 "data.num_workers=0", "ccp.proxies_per_class=2", "ccp.pool_size=2", "train.max_steps=4",
                 "train.eval_every=2", "train.lr=0.001"]
    cfg = train.load_config(ROOT / "configs" / f"{dataset}_ms.yaml", overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny fakes: data.py warns about the counts
        results = train.run(cfg)
    header = capsys.readouterr().out.splitlines()[0]
    expected = "6 query images, 6 gallery images" if dataset == "inshop" else "16 test images"
    # the 8 validation images decoded once: 8 x 3 x 24 x 24 bytes
    assert expected in header and "2 training classes (8 images), 2 validation classes (8, decoded once: " \
        f"{8 * 3 * 24 * 24 / 2**20:.2f} MiB in memory)" in header
    ks = [1, 10, 20, 30, 40] if dataset == "inshop" else [1, 10, 100, 1000]
    assert {f"R@{k}" for k in ks} <= results["mean"].keys()
    assert results["mean"]["R@10"] == 1.0  # every query's class is among fewer than 10 references


def test_no_shipped_config_stops_before_the_supplements_longest_run():
    """PAPER.md §7: early stopping ends a run; Table 3's longest average run is 131K steps (In-Shop MS-CCP)."""
    assert config.DEFAULTS["train"]["max_steps"] == 10_000 * 250  # the authors' cap
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if not path.name.startswith("digits"):
            assert train.load_config(path)["train"]["max_steps"] >= 131_000, path.name


FOLD_RUN = ["train.max_steps=5", "repeats=2", "fold=null", "evaluation.save_embeddings=true", "evaluation.nmi=false"]


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory) -> tuple[Path, dict]:
    """2 seeds x 3 folds of the digits demo in one process, moved from run/ to ref/ once trained, so that
    run/ is free for the same command under torchrun and the two can be compared byte for byte."""
    root = tmp_path_factory.mktemp("folds")
    results = run_digits(root, "run", *FOLD_RUN)
    (root / "run").rename(root / "ref")
    return root, results


def test_repeats_ensemble_is_averaged_over_every_combination_of_fold_models(fold_run):
    """PAPER.md §7: the fold models' mean, the mean +- sd over repeats, and the ensemble's mean +- sd over all
    combinations of one repeat's model per fold (2 seeds x 3 folds: 2^3 = 8), each n(concat(n(f_1), ..., n(f_3)))."""
    root, results = fold_run
    assert [(m["seed"], m["fold"]) for m in results["models"]] == [(s, f) for s in (0, 1) for f in range(3)]
    per_seed = [np.mean([m["test"]["MAP@R"] for m in results["models"] if m["seed"] == s]) for s in (0, 1)]
    assert [s["mean"]["MAP@R"] for s in results["per_seed"]] == pytest.approx(per_seed)
    assert results["mean"]["MAP@R"] == pytest.approx(np.mean(per_seed))
    assert results["sd"]["MAP@R"] == pytest.approx(np.std(per_seed, ddof=1))
    assert all((root / "ref" / f"seed{s}" / f"fold{f}" / "best.pt").exists() for s in (0, 1) for f in range(3))
    assert results["ensemble_combinations"] == 8
    parts = {(s, f): np.load(root / "ref" / f"seed{s}" / f"fold{f}" / "embeddings.npz") for s in (0, 1)
             for f in range(3)}
    labels = parts[0, 0]["test_labels"]

    def n(x):  # x / max(1, ||x||), written out here
        return x / np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))

    scores = []
    for choice in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]:
        joined = n(np.concatenate([n(parts[s, f]["test_embeddings"]) for f, s in enumerate(choice)], axis=1))
        scores.append(evaluate.retrieval_metrics(joined, labels, recall_ks=(1,))["MAP@R"])
    assert results["ensemble_mean"]["MAP@R"] == pytest.approx(np.mean(scores), abs=1e-6)
    assert results["ensemble_sd"]["MAP@R"] == pytest.approx(np.std(scores, ddof=1), abs=1e-6)
    assert [s["seed"] for s in results["per_seed"]] == [0, 1] and all("ensemble" in s for s in results["per_seed"])


def test_torchrun_trains_the_models_on_its_processes_with_the_same_bits_as_one_process(fold_run):
    """torchrun --nproc_per_node=2 (gloo, CPU): each process trains its share of the 6 models; every file
    equals the one-process run's byte for byte (the logs but for their wall-clock seconds)."""
    root, _ = fold_run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               str(DIGITS), f"run_dir={root / 'run'}", *FAST, *FOLD_RUN]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = {f.relative_to(root / "ref") for f in (root / "ref").rglob("*") if f.is_file()}
    assert reference == {f.relative_to(root / "run") for f in (root / "run").rglob("*") if f.is_file()}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    for name in sorted(reference):
        a, b = root / "ref" / name, root / "run" / name
        if name.name == "metrics.jsonl":
            assert strip(read_log(a)) == strip(read_log(b)), name
        elif name.name not in (".lock", "segments.jsonl"):  # who held the lock, and when each segment started
            assert a.read_bytes() == b.read_bytes(), name


def test_covering_radius_before_a_reselection_is_that_of_the_converged_proxies(tmp_path, monkeypatch):
    """metrics.jsonl's covering_radius_before is measured for P*, the proxies k-center starts from."""
    seen = []
    original = train.selection.covering_radius

    def recording(points, labels, centers, center_labels):
        seen.append(centers.clone())
        return original(points, labels, centers, center_labels)

    monkeypatch.setattr(train.selection, "covering_radius", recording)
    run_digits(tmp_path, "run", "train.max_steps=10")  # instance 0 converges at step 10, its best was step 5
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    converged = losses.lipschitz_normalize(best["objective"]["proxies.weight"])
    before_at_step_10 = seen[2]  # calls: step 0 before, step 0 after, step 10 before, step 10 after
    assert best["step"] == 5 and torch.equal(before_at_step_10, converged)
