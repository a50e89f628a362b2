"""benchmarks/gpu_check.py: its reduced check runs green on a CPU (so that the script does not rot between
visits to a GPU), its figures and projection follow their stated arithmetic, and it can fail — a run that
computes differently, or a kernel that refuses deterministic algorithms, is reported as a problem.
train.py's own determinism and resume are tested in tests/test_train.py, not here."""
import contextlib
import dataclasses
import functools
import io
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import data
import losses
import model
import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """gpu_check.main --quick in this process, reduced further: the two methods the speed section needs
    (each run twice, MS-CCP resumed twice), one timed step per variant, and a loader without workers
    (workers left prefetching can stall this process when they are collected): every section runs."""
    folder = tmp_path_factory.mktemp("gpu_check")
    speed_overrides = gpu_check.speed_overrides
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_check, "METHOD_CONFIGS", {m: gpu_check.METHOD_CONFIGS[m] for m in ("ccp", "baseline")})
        patch.setattr(gpu_check, "QUICK", dataclasses.replace(gpu_check.QUICK, timed_steps=1, loader_batches=2,
                                                              reselection_classes=200))
        patch.setattr(gpu_check, "speed_overrides", lambda *a: speed_overrides(*a) + ["data.num_workers=0"])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(folder / "report.json"),
                                   "--workdir", str(folder / "work")])
    return code, out.getvalue(), json.loads((folder / "report.json").read_text())


def test_quick_check_finds_no_problem_on_cpu(quick_report):
    code, out, report = quick_report
    assert code == 0, out
    assert out.splitlines()[-1] == "gpu_check: 0 problems"
    for heading in ("1. determinism", "2. resume", "3. speed and memory", "4. projection"):
        assert heading in out
    assert report["problems"] == [] and report["mode"] == "quick" and report["device"].startswith("cpu")
    assert report["settings"]["deterministic_algorithms"] is True
    assert report["settings"]["fill_uninitialized_memory"] is False  # the fast path's setting, still identical
    assert [e["method"] for e in report["determinism"]] == ["ccp", "baseline"]
    # two identical runs are reported identical: what differs by design (folder, commit, seconds) is left out
    for entry in report["determinism"] + report["resume"]:
        assert entry["identical"] and entry["error"] is None and entry["differences"] == []
        assert entry["compared"] > 100  # both checkpoints, the log and the results were walked
    assert [e["interrupt"] for e in report["resume"]] == [6, 8]  # at a validation, and between two


def test_quick_check_reports_speed_memory_and_projection(quick_report):
    _, _, report = quick_report
    step = report["speed"]["step"]
    rows, dim = step["proxies"]
    # CCP's extra state, counted from the model's definition: one copy of the trainable weights
    # (theta_anchor) and the proxies four times (values, gradient, Adam's m and v) plus their int64 labels
    trainable = sum(p.numel() * 4 for p in model.build_model("bninception", 128).parameters() if p.requires_grad)
    assert step["ccp"]["state_bytes"] - step["plain"]["state_bytes"] == trainable + 4 * rows * dim * 4 + rows * 8
    for other in ("ccp_nchw", "ccp_unfolded"):
        assert step[other]["state_bytes"] == step["ccp"]["state_bytes"]  # a layout, a path: not a model
    # unfolded, each BatchNorm is one op forward and one backward where folding it into its conv takes more
    assert step["ccp_unfolded"]["ops"] < step["ccp"]["ops"]
    assert step["batch"] == 32 and dim == 128
    for variant in ("plain", "ccp", "ccp_nchw", "ccp_unfolded"):
        assert 0 < step[variant]["min_ms"] <= step[variant]["median_ms"]
        # the inputs' checks where they enter (one read), each loss term's count of positives, the NaN guard
        assert step[variant]["host_reads"] == (3 if variant == "plain" else 4)
        assert step[variant]["ops"] > 100  # a network's forward and backward, the loss, Adam
    assert step["channels_last_over_nchw"] == step["ccp"]["median_ms"] / step["ccp_nchw"]["median_ms"]
    assert step["unfolded_over_folded"] == step["ccp_unfolded"]["median_ms"] / step["ccp"]["median_ms"]
    assert step["network_ms"] > 0
    assert report["speed"]["reselection"]["classes"] == 200 and report["speed"]["reselection"]["pool_size"] == 7
    assert report["speed"]["validation"]["images"] > 0 and report["speed"]["loader"]["workers"] == 0
    once = report["speed"]["validation"]["decoded_once"]  # uint8 crops of the speed section's 64 x 64
    assert once["identical"] and once["bytes"] == report["speed"]["validation"]["images"] * 3 * 64 * 64
    for config in ("configs/sop_ms.yaml", "configs/cub_ms.yaml"):
        low, high = report["projection"][config]["hours"]
        assert 0 < low < high and report["projection"][config]["folds"] == 4
    assert report["projection"]["configs/sop_ms.yaml"]["steps_per_model"] == 91_000
    assert report["projection"]["configs/cub_ms.yaml"]["steps_per_model"] == 364 * 25


# ------------------------------------------------------------------------------ it can fail

def tiny_run_overrides(tmp_path: Path, method: str) -> list[str]:
    """The quick layout at 3 JPEGs a class, 3 steps and one validation: enough for a difference to show."""
    scale = gpu_check.QUICK
    sizes = {"train": [3] * scale.train_classes, "test": [3] * scale.test_classes}
    layout = gpu_check.write_sop_layout(tmp_path / "sop", sizes, scale.jpeg_size)
    return gpu_check.run_overrides(method, scale, layout, tmp_path / "unused.pth", "cpu", 0) + ["train.max_steps=3"]


def test_a_run_that_computes_differently_is_a_problem(tmp_path, monkeypatch):
    """Nondeterminism simulated: every step adds noise from an unseeded generator to one weight."""
    original = train.train_step

    def noisy_step(network, *args, **kwargs):
        value = original(network, *args, **kwargs)
        noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
        with torch.no_grad():
            next(network.parameters()).add_(torch.randn(1, generator=noise) * 1e-6)
        return value

    monkeypatch.setattr(train, "train_step", noisy_step)
    entry, problems = gpu_check.check_determinism("baseline", tiny_run_overrides(tmp_path, "baseline"), tmp_path)
    assert not entry["identical"] and entry["error"] is None
    assert any(d.startswith(".last.pt.model.") for d in entry["differences"])
    assert len(problems) == 1 and problems[0].startswith("determinism, baseline: two identical runs differ")


def test_a_kernel_without_a_deterministic_implementation_is_named(tmp_path, monkeypatch):
    """put_ (accumulate=False) refuses torch.use_deterministic_algorithms(True) on every device."""
    ms = losses.LOSSES["ms"]

    @functools.wraps(ms)  # the config checks loss.params against this signature
    def loss_with_put(x, y, *args, **kwargs):
        torch.zeros(2).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return ms(x, y, *args, **kwargs)

    monkeypatch.setitem(losses.LOSSES, "ms", loss_with_put)
    entry, problems = gpu_check.check_determinism("baseline", tiny_run_overrides(tmp_path, "baseline"), tmp_path)
    assert entry["error"].startswith("kernel put_ has no deterministic implementation (at test_gpu_check.py:")
    assert problems == [f"determinism, baseline: {entry['error']}"]


# ------------------------------------------------------------------------------ the pieces

@pytest.mark.parametrize("method", sorted(gpu_check.METHOD_CONFIGS))
def test_every_method_gets_a_valid_short_run_with_its_phases_inside(tmp_path, method):
    """The runs the full check makes of every method (only two of them run above): valid configs, whose
    warm-up and XBM memory start inside the run."""
    overrides = gpu_check.run_overrides(method, gpu_check.QUICK, tmp_path, tmp_path / "w.pth", "cpu", 0)
    cfg = train.load_config(ROOT / "configs" / gpu_check.METHOD_CONFIGS[method], overrides)
    E = gpu_check.QUICK.eval_every
    assert (cfg["train"]["max_steps"], cfg["train"]["eval_every"], cfg["model"]["backbone"]) == (4 * E, E, "tiny_cnn")
    if method in ("proxy_anchor", "proxynca++", "softtriple"):
        assert 0 < cfg["baseline"]["warmup_steps"] < 4 * E
    if method == "xbm":
        assert 0 <= cfg["baseline"]["xbm_start_step"] < 4 * E


def test_compare_is_bitwise():
    differences = []
    a = {"w": torch.tensor([0.0, 1.0]), "nan": float("nan"), "x": [1, {"y": 2}], "only_a": 1}
    b = {"w": torch.tensor([-0.0, 1.0]), "nan": float("nan"), "x": [1, {"y": 3}]}
    assert gpu_check.compare(a, b, "", differences) == 4  # w, nan, x[0], x[1].y; only_a is in one run only
    assert sorted(differences) == [".only_a: only in one run", ".w (max |diff| 0)", ".x[1].y: 2 vs 3"]
    assert gpu_check.compare(torch.ones(2, dtype=torch.float64), torch.ones(2), "t", differences) == 1
    assert differences[-1] == "t (max |diff| 0)"  # same values, other dtype: other bits
    assert gpu_check.compare([1, 2], [1], "s", differences) == 1 and differences[-1] == "s: list of 2 vs list of 1"
    assert gpu_check.compare(1.0, 1, "n", differences) == 1 and differences[-1] == "n: float vs int"


def test_generated_layout_reads_as_sop(tmp_path):
    sizes = {"train": gpu_check.class_sizes(23, 5), "test": gpu_check.class_sizes(9, 3)}
    assert sizes == {"train": [4, 5, 4, 5, 5], "test": [3, 3, 3]}
    root = gpu_check.write_sop_layout(tmp_path / "tinted", sizes)
    photos = [str(p) for p in sorted((tmp_path / "tinted" / "Stanford_Online_Products" / "images").iterdir())[:2]]
    listing = gpu_check.write_sop_layout(tmp_path / "listing", sizes, photos=photos)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # far fewer images than SOP: data.py warns
        for folder, distinct in ((root, 23), (listing, 2)):
            train_split = data.build_dataset("sop", folder, "train")
            test_split = data.build_dataset("sop", folder, "test")
            assert (len(train_split), train_split.num_classes, len(test_split), test_split.num_classes) == (23, 5, 9, 3)
            assert len(set(train_split.paths)) == distinct and all(Path(p).is_file() for p in train_split.paths)
            assert train_split[0][0].size == (24, 20)  # (width, height) of the default JPEG size


def test_step_counter_counts_host_reads_and_operations_that_do_work():
    x = torch.arange(6.0)
    with gpu_check.StepCounter() as counter:
        x.sum().item(), bool(x[0] > 1), x.tolist(), x.numpy(), torch.nonzero(x), x[x > 2], torch.unique(x)
        y = x.clone()
        y[y > 3] = 0.0
        (x * 2 + 1).sum(), x[1:3], x[torch.tensor([0, 2])], x.abs()  # none of these waits
    assert counter.host_reads == 8  # item, bool, tolist, numpy, nonzero, a mask read, unique, a mask written
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # .tolist is restored on exit
    with gpu_check.StepCounter() as counter:
        x.sum(), x[1:3], x.view(2, 3), x.t(), (x * 2 + 1).exp(), x.detach()
    assert counter.ops == 4 and counter.host_reads == 0  # sum, mul, add, exp; four views
    with gpu_check.StepCounter() as counter, pytest.raises(NotImplementedError):
        torch.zeros(3, device="meta").tolist()  # not a CPU tensor: read through a copy, as from a GPU
    assert counter.host_reads == 1


def test_projection_follows_its_stated_model():
    """Every step at the slower of step and loader; validations, re-selection candidates and the
    test pass at the validation pass's images/s; metrics free here (metrics_s 0) for clarity; every
    fold and repeat a model; a baseline at the plain step, without re-selections."""
    speed = {"step": {"ccp": {"median_ms": 100.0}, "plain": {"median_ms": 250.0}, "batch": 32},
             "loader": {"images_per_s": 160.0, "keeps_up": False, "retry": None},
             "validation": {"images_per_s": 1000.0, "metrics_s": 0.0, "images": 100},
             "reselection": {"classes": 11318, "kcenter_ms": 0.0, "covering_radius_s": 0.0,
                             "interclass_distance_s": 0.0}}
    sop = train.load_config(ROOT / "configs" / "sop_ms.yaml")
    p = gpu_check.project(sop, speed)
    # SOP (docs/DATASETS.md): 59,551 training images of 11,318 classes, 60,502 test images; fold 0
    # validates on classes [0, 2829) and fits 8,489; the loader's 160 images/s make a step 0.2 s;
    # MS-CCP's Table 3 row: 91K steps; 4 folds x 3 repeats
    val_images, fit_classes = 59551 * 2829 / 11318, 11318 - 2829
    evaluation = 364 * val_images / 1000 + 60502 / 1000
    reselection = fit_classes * 7 / 1000
    assert p["reselections_per_model"] == [1, 1 + 364 // 4]
    assert p["hours"] == pytest.approx([12 * (91_000 * 0.2 + evaluation + n * reselection) / 3600 for n in (1, 92)])
    baseline = gpu_check.project(train.load_config(ROOT / "configs" / "sop_ms_baseline.yaml", ["repeats=1"]), speed)
    per_model = 67_000 * 0.25 + 268 * val_images / 1000 + 60502 / 1000  # Table 3's MS row at the plain step
    assert baseline["hours"] == pytest.approx([4 * per_model / 3600] * 2)
    # validations from the decoded-once copy (data.cache_validation) at 4,000 images/s, built in 0.5 s per
    # 100 images; the test pass and the candidates still decode
    speed["validation"]["decoded_once"] = {"images_per_s": 4000.0, "build_s": 0.5}
    cached = gpu_check.project(train.load_config(ROOT / "configs" / "sop_ms_baseline.yaml", ["repeats=1"]), speed)
    per_model = 67_000 * 0.25 + 0.5 * val_images / 100 + 268 * val_images / 4000 + 60502 / 1000
    assert cached["hours"] == pytest.approx([4 * per_model / 3600] * 2)
    off = ["repeats=1", "data.cache_validation=false"]
    assert gpu_check.project(train.load_config(ROOT / "configs" / "sop_ms_baseline.yaml", off), speed) == baseline


def test_every_paper_config_states_its_projected_cost():
    # the `# cost:` line of each shipped paper config is what `gpu_check.py --costs` writes from the
    # H200 figures: a config whose repeats, folds or method changed without it fails here
    report = ROOT / "benchmarks" / "h200_9d103c4.json"
    configs = gpu_check.paper_configs()
    assert len(configs) == 48
    for path, cfg in configs.items():
        summary, p = gpu_check.cost(cfg, json.loads(report.read_text()))
        assert gpu_check.cost_comment(summary, report) in path.read_text().splitlines(), path.name
        assert p["folds"] * p["repeats"] == 12
