"""report.py: the figures of short digits runs and of synthetic selection / embedding files, checked by
the numbers each figure writes (recomputed here from metrics.jsonl or by brute force) and by the Figure
objects it saves (titles, legends, error bars, where text lies), never by pixels; the table beside
PAPER.md §8 only for the paper's datasets; clear errors for broken run dirs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle
from PIL import Image

import report
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(digits_run, tmp_path_factory) -> dict[str, Path]:
    """A copy of the session's digits_run (report.py writes its figures into a run dir; selections at
    steps 0, 10, 20) and a 3-fold run of 5 steps each."""
    root = tmp_path_factory.mktemp("runs")
    single = Path(shutil.copytree(digits_run, root / "single"))
    schedule = ["train.eval_every=5", "projection.min_delta=1.0", "projection.instance_patience=1",
                "train.patience=1000", "train.log_every_seconds=1000"]
    assert train.main([str(ROOT / "configs" / "digits_ccp.yaml"), f"run_dir={root / 'folds'}", "train.max_steps=5",
                       "fold=null", *schedule]) == 0
    return {"single": single, "folds": root / "folds"}


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The matplotlib Figures report.py saves during a test, in order (they stay readable after saving)."""
    figures = []
    save = report.save_figure

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    return figures


def rendered(fig):
    """Draw the figure again on an Agg canvas (report.py closed it); returns that canvas's renderer."""
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size < 400_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 2000 and 250 <= image.height <= 2000


# ----------------------------------------------------------------------------- brute-force references

def lipschitz(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))  # n(x) = x / max(1, ||x||)


def covering_radius_reference(points, labels, centers, center_labels) -> float:
    radii = []
    for c in np.unique(labels):
        own = [p for p, l in zip(centers, center_labels) if l == c]
        radii.append(max(min(np.linalg.norm(x - p) for p in own) for x, l in zip(points, labels) if l == c))
    return float(np.mean(radii))


def spread_reference(proxies, labels) -> float:
    per_class = []
    for c in np.unique(labels):
        own = proxies[labels == c]
        per_class.append(np.mean([np.linalg.norm(own[i] - own[j]) for i in range(len(own))
                                  for j in range(i + 1, len(own))]))
    return float(np.mean(per_class))


def map_at_r_reference(x, y) -> float:
    scores = []
    for q in range(len(x)):
        others = [i for i in range(len(x)) if i != q]
        ranked = sorted(others, key=lambda i: np.linalg.norm(x[i] - x[q]))
        r = sum(y[i] == y[q] for i in others)
        hits, total = 0, 0.0
        for rank, i in enumerate(ranked[:r], 1):
            if y[i] == y[q]:
                hits += 1
                total += hits / rank
        scores.append(total / r)
    return float(np.mean(scores))


def average_covering_radius_reference(x, y) -> float:
    per_class = []
    for c in np.unique(y):
        points = x[y == c]
        nearest = np.full(len(points), np.inf)  # farthest-first from nothing: the first point first
        picked, radii = [], []
        for _ in range(len(points)):
            candidates = [i for i in range(len(points)) if i not in picked]
            pick = max(candidates, key=lambda i: nearest[i])
            picked.append(pick)
            nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
            radii.append(nearest.max())
        per_class.append(np.mean(radii))
    return float(np.mean(per_class))


def interclass_reference(x, y) -> float:
    means = [x[y == c].mean(axis=0) for c in np.unique(y)]
    return float(np.mean([np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]))


# ----------------------------------------------------------------------------- figures of a real run

def test_report_png_numbers_equal_metrics_jsonl(runs, tmp_path):
    log = read_log(runs["single"] / "metrics.jsonl")
    evals = [r for r in log if "val" in r]
    numbers = report.figure_run(runs["single"], tmp_path / "report.png")
    assert_png(tmp_path / "report.png")
    scores = [r["val"]["MAP@R"] for r in evals]
    assert numbers["best_val_MAP@R"] == max(scores)
    assert numbers["best_step"] == evals[scores.index(max(scores))]["step"]
    assert numbers["lam"] == [(r["step"], r["lam"]) for r in evals]
    # an instance ends at the last record that carries its number; here every 10 steps
    ends = [a["step"] for a, b in zip(evals, evals[1:]) if b["instance"] > a["instance"]]
    last_converged = "selection" in evals[-1]  # the last instance converged if its last record re-selected
    assert numbers["boundaries"] == ends + [evals[-1]["step"]] * last_converged == [10, 20]
    starts = [0] + ends
    assert numbers["steps_per_instance"] == [e - s for s, e in zip(starts, ends + [evals[-1]["step"]])] == [10, 10]
    selections = [r for r in log if "selection" in r]
    assert numbers["covering_radius"] == [
        (r["step"], None if r["step"] == 0 else r["selection"]["covering_radius_before"],
         r["selection"]["covering_radius_after"]) for r in selections]
    assert numbers["last_loss"] == evals[-1]["loss"]


def test_command_line_writes_every_figure_and_the_tables(runs, tmp_path, capsys, drawn):
    assert report.main([str(runs["single"]), str(runs["folds"]), "--out", str(tmp_path)]) == 0
    # every title names the method and the dataset (and which model), the run's path in small type below
    titles = [fig.get_suptitle() for fig in drawn]
    assert len(titles) == 3 + 4 + 1  # report, instances, tsne; 3 fold reports and the summary; the comparison
    assert all(title.startswith("MS-CCP on digits, fold 2, seed 0") for title in titles[:3])
    assert titles[3:7] == [f"MS-CCP on digits, fold {f}, seed 0" for f in range(3)] + [
        "MS-CCP on digits, 3 folds, seed 0"]
    assert titles[7] == "MS-CCP on digits"  # the comparison: both runs are MS-CCP on digits
    assert all(str(runs["single"]) in fig.texts[-1].get_text() for fig in drawn[:3])
    assert error_bars(drawn[6]) == 0  # summary.png: one model a bar
    out = capsys.readouterr().out
    results = json.loads((runs["single"] / "results.json").read_text())
    assert f"| MAP@R | {100 * results['mean']['MAP@R']:.2f} |\n" in out  # no paper columns for digits
    assert "no paper row for this dataset (digits;" in out and "paper 512-D" not in out
    assert report.results_table(runs["folds"])[0] in out
    single = [runs["single"] / name for name in ("report.png", "instances.png", "tsne.png")]
    folds = [runs["folds"] / f"fold{fold}" / "report.png" for fold in range(3)] + [runs["folds"] / "summary.png"]
    figures = [line for line in out.splitlines() if line.startswith("figures: ")]
    assert figures == ["figures: " + ", ".join(map(str, paths)) for paths in (single, folds)]
    assert f"comparison: {tmp_path / 'comparison.png'}" in out
    for path in single + folds + [tmp_path / "comparison.png"]:
        assert_png(path)


@pytest.mark.parametrize("lam, instance_line", [
    (0.0, "one problem instance; λ_t = 0 throughout"),  # a baseline: no λ axis, one instance
    (2e-4, "instances end at the dashed lines; λ_t in green (right axis)")])
def test_the_validation_panel_draws_lambda_only_where_it_is_not_zero(tmp_path, drawn, lam, instance_line):
    converged = f', "selection": {{"pool_size": 7, "covering_radius_before": 0.5, "covering_radius_after": 0.4}}'
    write_metrics(tmp_path, '{"step": 5, "instance": 0, "lam": 0.0, "val": {"MAP@R": 0.5}}',
                  '{"step": 10, "instance": 0, "lam": 0.0, "val": {"MAP@R": 0.4}' + (converged if lam else "") + "}",
                  f'{{"step": 15, "instance": {int(lam > 0)}, "lam": {lam}, "val": {{"MAP@R": 0.6}}}}')
    report.figure_run(tmp_path)
    validation, _, steps = drawn[0].axes[:3]
    assert validation.get_title().endswith(instance_line)
    assert len(drawn[0].axes) == 4 + (lam > 0)  # the λ_t axis twins the validation panel
    low, high = steps.get_xlim()
    assert [t for t in steps.get_xticks() if low <= t <= high] == list(range(1 + (lam > 0)))  # a tick an instance


def test_fold_run_table_has_the_mean_and_the_ensemble_column(runs):
    results = json.loads((runs["folds"] / "results.json").read_text())
    text, rows = report.results_table(runs["folds"])
    for key in ("P@1", "MAP@R", "NMI"):
        assert rows[key]["mean"] == results["mean"][key]
        assert rows[key]["ensemble"] == results["ensemble_mean"][key]
        assert rows[key]["paper"] is None and rows[key]["difference"] is None
    assert "| 32-D mean of 3 model(s) | 96-D ensemble |" in text


def test_comparison_of_two_runs(runs, tmp_path):
    numbers = report.figure_comparison({"single": [runs["single"]],
                                        "folds": sorted(runs["folds"].glob("fold*"))}, tmp_path / "c.png")
    assert_png(tmp_path / "c.png")
    best = [max(r["val"]["MAP@R"] for r in read_log(runs["folds"] / f"fold{f}" / "metrics.jsonl") if "val" in r)
            for f in range(3)]
    assert numbers["folds"]["best_val_MAP@R"] == pytest.approx((np.mean(best), np.std(best, ddof=1)))
    tests = [json.loads((runs["folds"] / f"fold{f}" / "results.json").read_text())["test"]["MAP@R"]
             for f in range(3)]
    assert numbers["folds"]["test_MAP@R"] == pytest.approx((np.mean(tests), np.std(tests, ddof=1)))
    single = json.loads((runs["single"] / "results.json").read_text())["mean"]["MAP@R"]
    assert numbers["single"]["test_MAP@R"] == (single, None)  # one model: no sd


def test_tsne_comparison_names_the_model_it_draws_of_a_run_of_several(runs, tmp_path, monkeypatch):
    folds, drawn = Path(shutil.copytree(runs["folds"], tmp_path / "folds")), {}
    (folds / "fold0" / "embeddings.npz").touch()  # what report_comparison looks for; figure_tsne is replaced
    monkeypatch.setattr(report, "figure_tsne", lambda models, path, split: drawn.update(models))
    report.report_comparison([runs["single"], folds], tmp_path / "out", "val")
    titles = [report.run_title(d) for d in (runs["single"], folds)]
    assert drawn == {titles[0]: runs["single"], f"{titles[1]}, fold0": folds / "fold0"}


def test_fig1_and_fig2_of_a_real_run(runs, tmp_path):
    panels = report.figure_instances(runs["single"], tmp_path / "fig1.png")
    assert_png(tmp_path / "fig1.png")
    files = sorted((runs["single"] / "selections").glob("*.npz"))
    assert [p["step"] for p in panels[:-1]] == [0, 10, 20] and panels[-1]["final"]
    assert len(panels) == len(files)
    for panel, path in zip(panels, report.selection_files(runs["single"])):
        with np.load(path) as f:
            fit = lipschitz(f["fit_embeddings"].astype(np.float64))
            nxt = lipschitz(f["selected_proxies"].astype(np.float64))
            assert panel["covering_radius_next"] == pytest.approx(
                covering_radius_reference(fit, f["fit_labels"], nxt, f["proxy_labels"]), rel=1e-6)
    # t-SNE draws 60 of the points (the command line drew them all); the numbers are of every point
    numbers = report.figure_tsne({"run": runs["single"]}, tmp_path / "fig2.png", max_points=60)
    with np.load(runs["single"] / "embeddings.npz") as f:
        x, y = f["val_embeddings"].astype(np.float64), f["val_labels"]
    assert len(x) > 60
    assert numbers["run"]["interclass_distance"] == pytest.approx(interclass_reference(x, y), rel=1e-6)


# ----------------------------------------------------------------------------- what a new user reads on the figures

@pytest.mark.parametrize("config, title", [
    ({"method": "ccp", "loss": {"name": "triplet"}, "dataset": {"name": "cub"}}, "Triplet-CCP on CUB"),
    ({"method": "baseline", "loss": {"name": "c2"}, "dataset": {"name": "inshop"}}, "C2 on In-Shop"),
    ({"method": "xbm", "loss": {"name": "c1"}, "dataset": {"name": "sop"}}, "C1-XBM on SOP"),
    ({"method": "proxy_anchor", "loss": {"name": "ms"}, "dataset": {"name": "cars"}}, "Proxy-Anchor on Cars"),
    ({"method": "ccp", "loss": {"name": "ms"}, "dataset": {"name": "folder", "root": "/data/flowers/"}},
     "MS-CCP on your images (flowers/)"),
    ({"method": "ccp", "loss": {"name": "ms"}, "dataset": {"name": "digits"}, "projection": {"lam": 0.0},
      "ccp": {"reselect": False}}, "MS-CCP (λ = 0, no re-selection) on digits"),  # digits_fig1_before.yaml
])
def test_title_of_each_method_and_dataset(tmp_path, config, title):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 3, "fold": None, "folds": 4}))
    assert report.run_title(tmp_path) == f"{title}, 4 folds, seed 3"
    (tmp_path / "fold1").mkdir()  # a model of the run: its folder names its fold
    assert report.run_title(tmp_path / "fold1") == f"{title}, fold 1, seed 3"


def test_fig1_has_a_legend_entry_per_class_outside_the_panels(runs, tmp_path, drawn):
    report.figure_instances(runs["single"], tmp_path / "fig1.png")
    fig = drawn[-1]
    renderer = rendered(fig)
    legend = next(legend for legend in fig.legends if legend.get_title().get_text() == "class")
    with np.load(runs["single"] / "selections" / "final.npz") as f:
        classes, names = np.unique(f["fit_labels"]), list(f["class_names"])
    # fold 2 of the digits trains on digits 0-3: labels 0-3 in the fit split, named by their digits (another
    # fold's fit split names its classes by their digits too: test_class_subset_relabels_in_sorted_order)
    assert [t.get_text() for t in legend.get_texts()] == names == [str(c) for c in classes] == ["0", "1", "2", "3"]
    for box in (legend.get_window_extent(renderer) for legend in fig.legends):
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_fig1_legend_names_the_classes_where_the_selection_file_does(tmp_path, drawn):
    fit = np.random.default_rng(0).normal(0, 0.5, (20, 2))
    write_selection(tmp_path / "selections" / "final.npz", 40, 1, fit[:6], fit[6:12], fit, np.repeat([0, 1], 10),
                    class_names=np.array(["roses", "tulips"]))
    report.figure_instances(tmp_path)
    legend = next(legend for legend in drawn[-1].legends if legend.get_title().get_text() == "class")
    assert [t.get_text() for t in legend.get_texts()] == ["roses", "tulips"]


def densify(xy: np.ndarray, samples: int = 20) -> np.ndarray:
    """The polyline's vertices and `samples` points along each of its segments."""
    if len(xy) < 2:
        return xy
    t = np.linspace(0, 1, samples)[None, :, None]
    return (xy[:-1, None, :] + (xy[1:] - xy[:-1])[:, None, :] * t).reshape(-1, 2)


def drawn_data(ax) -> tuple[np.ndarray, list]:
    """Display coordinates of everything the axes draw as data inside them (line vertices and points along
    the lines, scatter points, error bars), and the window boxes of its bars."""
    points = [densify(line.get_transform().transform(line.get_xydata())) for line in ax.lines]
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            points.append(collection.get_offset_transform().transform(collection.get_offsets()))
        elif isinstance(collection, LineCollection):
            points += [densify(collection.get_transform().transform(s)) for s in collection.get_segments()]
    xy = np.concatenate(points) if points else np.zeros((0, 2))
    box = ax.get_window_extent()
    inside = (xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)
    return xy[inside], [p.get_window_extent() for p in ax.patches if isinstance(p, Rectangle)]


def text_boxes(fig, renderer) -> list:
    """(text, window box) of every written text but tick labels: titles, axis labels, annotations, figure
    texts, legend entries (and the legends' frames)."""
    texts = list(fig.texts) + ([fig._suptitle] if fig._suptitle not in fig.texts else [])
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    texts += [t for legend in legends for t in legend.get_texts()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]
    frames = [(f"legend {legend.get_title().get_text()}", legend.get_window_extent(renderer)) for legend in legends]
    return boxes + frames


def assert_no_text_over_data(fig) -> int:
    renderer = rendered(fig)
    boxes = text_boxes(fig, renderer)
    checked = 0
    for ax in fig.axes:
        points, bars = drawn_data(ax)
        checked += len(points) + len(bars)
        for text, box in boxes:
            covered = [p for p in points if box.x0 < p[0] < box.x1 and box.y0 < p[1] < box.y1]
            assert not covered, f"{text!r} covers data at {covered[0]} on the axes titled {ax.get_title()!r}"
            assert not any(box.overlaps(bar) for bar in bars), f"{text!r} covers a bar on {ax.get_title()!r}"
    return checked


def test_no_text_or_legend_covers_data(runs, tmp_path, drawn):
    report.figure_run(runs["single"], tmp_path / "report.png")
    report.figure_instances(runs["single"], tmp_path / "fig1.png")
    report.figure_tsne({"run": runs["single"]}, tmp_path / "fig2.png", max_points=60)
    report.figure_comparison({"single": [runs["single"]], "folds": sorted(runs["folds"].glob("fold*"))},
                             tmp_path / "c.png")
    for fig in drawn:
        assert assert_no_text_over_data(fig) > 50  # it did look at the data
    # the check itself: a caption inside a panel, as report.py once wrote them, is caught
    ax = drawn[0].axes[0]
    ax.text(0.98, 0.03, "best 0.7 at step 5", transform=ax.transAxes, ha="right")
    ax.text(*ax.lines[0].get_xydata()[1], "a text on a point")
    with pytest.raises(AssertionError, match="covers data"):
        assert_no_text_over_data(drawn[0])


def error_bars(fig) -> int:
    return sum(isinstance(c, ErrorbarContainer) for ax in fig.axes for c in ax.containers)


def test_error_bars_only_where_several_models_contribute(runs, tmp_path, drawn):
    folds = sorted(runs["folds"].glob("fold*"))
    numbers = report.figure_comparison({"single": [runs["single"]]}, tmp_path / "one.png")
    assert numbers["single"]["best_val_MAP@R"][1] is None and error_bars(drawn[-1]) == 0
    assert "±" not in drawn[-1].axes[1].get_title()
    report.figure_comparison({"single": [runs["single"]], "folds": folds}, tmp_path / "two.png")
    assert error_bars(drawn[-1]) == 2  # best validation and test of the 3 fold models; none for the single run
    assert "mean ± sd" in drawn[-1].axes[1].get_title()


# ----------------------------------------------------------------------------- Fig. 1 on synthetic files

def write_selection(path: Path, step: int, instance: int, converged, selected, fit, fit_labels, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"step": step, "instance": instance, "converged_proxies": converged,
                      "selected_proxies": selected, "proxy_labels": np.repeat(np.arange(2), 3), "fit_embeddings": fit,
                      "fit_labels": fit_labels, "normalization": "lipschitz", **extra})


@pytest.mark.parametrize("dim", [2, 3])
def test_fig1_panels_carry_brute_force_radius_and_spread(tmp_path, dim, drawn):
    rng = np.random.default_rng(dim)
    fit, fit_labels = rng.normal(0, 0.8, (40, dim)), np.repeat([0, 1], 20)  # inside and outside the unit ball
    proxies = [rng.normal(0, 0.8, (6, dim)) for _ in range(3)]
    folder = tmp_path / "run" / "selections"
    write_selection(folder / "step0000000.npz", 0, 0, np.zeros((6, dim)), proxies[0], fit, fit_labels)
    write_selection(folder / "step0000050.npz", 50, 1, proxies[0], proxies[1], fit, fit_labels)
    write_selection(folder / "final.npz", 80, 1, proxies[1], proxies[2], fit, fit_labels)
    panels = report.figure_instances(tmp_path / "run")
    assert_png(tmp_path / "run" / "instances.png")
    assert [(p["step"], p["final"]) for p in panels] == [(0, False), (50, False), (80, True)]
    assert [ax.get_title() for ax in drawn[0].axes[:3]] == [
        "step 0: initial k-center", "step 50: instance 0 converged", "end: best model (step 80, instance 1)"]
    assert "Fig.\u00a01" in drawn[0].get_suptitle()  # never broken between "Fig." and its number
    assert panels[0]["covering_radius_converged"] is None and panels[0]["spread_converged"] is None
    labels = np.repeat(np.arange(2), 3)
    for panel, converged, selected in zip(panels, [None, proxies[0], proxies[1]], proxies):
        for key, p in (("converged", converged), ("next", selected)):
            if p is None:
                continue
            expected = covering_radius_reference(lipschitz(fit), fit_labels, lipschitz(p), labels)
            assert panel[f"covering_radius_{key}"] == pytest.approx(expected, rel=1e-9)
            assert panel[f"spread_{key}"] == pytest.approx(spread_reference(lipschitz(p), labels), rel=1e-9)


def test_one_proxy_per_class_draws_radii_without_a_spread(tmp_path):
    """K = 1 (ccp.proxies_per_class: 1) has no pair of proxies in a class: no spread, the radii still drawn."""
    rng = np.random.default_rng(0)
    fit, fit_labels = rng.normal(0, 0.8, (40, 2)), np.repeat([0, 1], 20)
    selected = rng.normal(0, 0.8, (2, 2))
    path = tmp_path / "run" / "selections" / "step0000000.npz"
    write_selection(path, 0, 0, np.zeros((2, 2)), selected, fit, fit_labels, proxy_labels=np.arange(2))
    [panel] = report.figure_instances(tmp_path / "run")
    assert panel["spread_next"] is None
    assert panel["covering_radius_next"] == pytest.approx(
        covering_radius_reference(lipschitz(fit), fit_labels, lipschitz(selected), np.arange(2)), rel=1e-9)
    assert_png(tmp_path / "run" / "instances.png")


def test_coalesced_proxies_have_zero_spread():
    proxies = np.array([[0.5, 0.5], [0.5, 0.5], [-1.0, 0.0], [-1.0, 1e-3]])
    labels = np.array([0, 0, 1, 1])
    spread = report.proxy_spread(report.normalized(proxies, "lipschitz"), torch.as_tensor(labels))
    assert spread == pytest.approx(1e-3 / 2, rel=1e-3)  # class 0: 0, class 1: ~1e-3


# ----------------------------------------------------------------------------- Fig. 2 on synthetic files

@pytest.mark.parametrize("dim", [2, 5])
def test_fig2_numbers_equal_brute_force(tmp_path, dim):
    rng = np.random.default_rng(10 + dim)
    runs = {}
    for name, scale in (("before", 0.6), ("after", 0.2)):
        y = np.repeat([3, 5, 7], 12)
        x = (rng.normal(0, scale, (36, dim)) + np.eye(dim)[y % dim]).astype(np.float32)
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "embeddings.npz", val_embeddings=x, val_labels=y,
                 test_embeddings=x[:4], test_labels=y[:4])
        runs[name] = (tmp_path / name, x.astype(np.float64), y)
    numbers = report.figure_tsne({k: v[0] for k, v in runs.items()}, tmp_path / "fig2.png")
    assert_png(tmp_path / "fig2.png")
    for name, (_, x, y) in runs.items():
        assert numbers[name]["MAP@R"] == pytest.approx(map_at_r_reference(x, y), abs=1e-6)
        assert numbers[name]["average_covering_radius"] == pytest.approx(average_covering_radius_reference(x, y),
                                                                         rel=1e-6)
        assert numbers[name]["interclass_distance"] == pytest.approx(interclass_reference(x, y), rel=1e-6)


# ----------------------------------------------------------------------------- the paper's table

def test_paper_numbers_are_read_from_paper_md_section_8():
    table = report.paper_numbers()
    assert table[("MS-CCP (L)", "sop")] == pytest.approx({"P@1": 0.7896, "MAP@R": 0.5185})
    assert table[("C2", "inshop")] == pytest.approx({"P@1": 0.8632, "MAP@R": 0.5942})
    assert table[("Proxy-Anchor", "cub")] == pytest.approx({"P@1": 0.6843, "MAP@R": 0.2653})


def test_table_puts_the_ensemble_beside_the_paper_with_the_difference(tmp_path):
    config = {"method": "ccp", "dataset": {"name": "cars"}, "loss": {"name": "c1"}, "model": {"embedding_dim": 128}}
    mean, ensemble = {"P@1": 0.75, "MAP@R": 0.21, "queries_without_match": 0}, {"P@1": 0.80, "MAP@R": 0.25}
    per_seed = [{"seed": s, "mean": mean} for s in (0, 1)]
    results = {"config": config, "models": [{}] * 8, "per_seed": per_seed, "mean": mean,
               "sd": {"P@1": 0.01, "MAP@R": 0.02}, "ensemble_mean": ensemble, "ensemble_sd": {"P@1": 0.005},
               "ensemble_combinations": 16}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text, rows = report.results_table(tmp_path)
    assert rows["P@1"] == pytest.approx({"mean": 0.75, "sd": 0.01, "ensemble": 0.80, "ensemble_sd": 0.005,
                                         "paper": 0.8376, "difference": 0.80 - 0.8376})
    assert "queries_without_match" not in rows
    assert "| P@1 | 75.00 ± 1.00 | 80.00 ± 0.50 | 83.76 | -3.76 |" in text
    assert "| metric | 128-D mean of 4 model(s), ± sd over 2 seeds | 512-D ensemble, ± sd over 16 combinations |" in text


def test_no_paper_comparison_for_digits_or_your_own_images(runs, tmp_path, drawn):
    # even with a (made-up) paper row for the method on these datasets: the paper has none
    paper = {("MS-CCP (L)", name): {"P@1": 0.5, "MAP@R": 0.2} for name in ("digits", "folder")}
    text, rows = report.results_table(runs["single"], paper)
    assert "no paper row for this dataset (digits;" in text
    folder = Path(shutil.copytree(runs["single"], tmp_path / "flowers_run"))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["dataset"] = {"name": "folder", "root": "/some/flowers"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    folder_text, folder_rows = report.results_table(folder, paper)
    assert "test metrics of MS-CCP on your images (flowers/), fold 2, seed 0" in folder_text
    assert "no paper row for this dataset (your images (flowers/);" in folder_text
    for table, numbers in ((text, rows), (folder_text, folder_rows)):
        assert "paper" not in table.splitlines()[2] and "difference" not in table  # the header: no paper columns
        assert all(r["paper"] is None and r["difference"] is None for r in numbers.values())
    report.figure_run(folder, tmp_path / "report.png")
    assert drawn[-1].get_suptitle() == "MS-CCP on your images (flowers/), fold 2, seed 0"


def test_a_seed_folder_of_a_run_points_to_the_run_s_results(tmp_path):
    (tmp_path / "run" / "seed1").mkdir(parents=True)
    assert report.results_table(tmp_path / "run" / "seed1")[0].endswith("the run has not finished)")
    (tmp_path / "run" / "results.json").write_text('{"mean": {"MAP@R": 0.5}}')
    assert report.results_table(tmp_path / "run" / "seed1")[0].endswith(
        f"no results.json with test metrics; the run it belongs to has them: {tmp_path / 'run'}")


def test_the_paper_note_names_the_row_and_the_dataset_as_the_table_does():
    note = report.paper_note({"dataset": {"name": "cub"}}, "MS-CCP (L)", True, True)
    assert note.endswith("the paper's 512-D MS-CCP (L) on CUB (PAPER.md §8).")


def test_a_method_the_paper_does_not_report_is_said_so(tmp_path):
    config = {"method": "xbm", "dataset": {"name": "sop"}, "loss": {"name": "c1"}, "model": {"embedding_dim": 128}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "test": {"MAP@R": 0.4}}))
    text, rows = report.results_table(tmp_path)
    assert rows["MAP@R"]["paper"] is None and "no row for this method" in text


# ----------------------------------------------------------------------------- broken run dirs

def test_missing_run_dir_is_a_one_line_error_and_exit_code_1(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == f"error: run dir not found: {tmp_path / 'nowhere'}\n"


def test_an_out_that_is_a_file_is_refused_before_any_figure(runs, tmp_path, capsys, drawn):
    (tmp_path / "a_file").write_text("kept")
    assert report.main([str(runs["single"]), str(runs["folds"]), "--out", str(tmp_path / "a_file")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'a_file'} is a file; name a folder for comparison.png\n"
    assert drawn == [] and (tmp_path / "a_file").read_text() == "kept"


def test_torn_last_line_is_tolerated(runs, tmp_path):
    lines = (runs["single"] / "metrics.jsonl").read_text().splitlines()
    torn = tmp_path / "metrics.jsonl"
    torn.write_text("\n".join(lines) + '\n{"step": 25, "val": {"MAP')
    assert report.read_metrics(torn) == [json.loads(line) for line in lines]


def write_metrics(run: Path, *lines: str) -> None:
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def write_selection_without_proxies(run: Path) -> None:
    (run / "selections").mkdir()
    np.savez(run / "selections" / "step0000000.npz", step=0, instance=0)


VALIDATION = '{"step": 5, "val": {"MAP@R": 0.5}}'
BROKEN = [  # (what is broken, how, what reads it, what the message says)
    ("empty run dir", lambda run: None, report.model_dirs, "no metrics.jsonl in it or in its seed*/fold* folders"),
    ("corrupt line", lambda run: write_metrics(run, VALIDATION, "{not json", VALIDATION), report.figure_run,
     "metrics.jsonl:2: not valid JSON"),
    ("record without a step", lambda run: write_metrics(run, VALIDATION, '{"val": {"MAP@R": 0.5}}'),
     report.figure_run, "metrics.jsonl:2: expected a JSON object with an integer 'step'"),
    ("validation without MAP@R", lambda run: write_metrics(run, '{"step": 5, "val": {"P@1": 1.0}}'),
     report.figure_run, "metrics.jsonl:1: a validation record needs 'val': {'MAP@R': ...}"),
    ("no validation", lambda run: write_metrics(run, '{"step": 0, "selection": {}}'), report.figure_run,
     "holds no validation record"),
    ("selection without a key", lambda run: write_selection_without_proxies(run), report.figure_instances,
     "step0000000.npz: missing key(s) converged_proxies"),
]


@pytest.mark.parametrize("broken, read, message", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_broken_run_dir_is_a_report_error_naming_the_file(tmp_path, broken, read, message):
    broken(tmp_path)
    with pytest.raises(report.ReportError) as info:
        read(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
