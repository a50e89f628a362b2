"""Pictures and tables of finished runs: what train.py logged, drawn beside the paper's figures.

usage: python report.py RUN_DIR [RUN_DIR ...] [--out DIR] [--split val|test]

Per model (the run dir, or each seed{S}/fold{F}/): report.png (validation MAP@R, instances, λ_t, covering
radius, steps per instance, loss: metrics.jsonl), instances.png (the supplement's Fig. 1, with
ccp.save_selections) and tsne.png (its Fig. 2, with evaluation.save_embeddings); summary.png for several
models; comparison.png (and tsne_comparison.png) for several run dirs, in --out. Titles name the method and
dataset (config.yaml); text and legends sit outside the data; error bars only over several models. The test
metrics are printed beside PAPER.md §8 only where it has a row for that dataset and method. Drawing
functions return the numbers they write (tests check those, not pixels); metrics are fractions (0..1)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: report.py runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import evaluate  # noqa: E402
import losses  # noqa: E402
import selection  # noqa: E402

ROOT = Path(__file__).resolve().parent
DPI = 100
SELECTION_KEYS = ("step", "instance", "converged_proxies", "selected_proxies", "proxy_labels",
                  "fit_embeddings", "fit_labels", "normalization")
PAPER_DATASETS = {"CUB": "cub", "Cars": "cars", "SOP": "sop", "In-Shop": "inshop"}
PAPER_LOSSES = {"c1": "C1", "c2": "C2", "ms": "MS", "triplet": "Triplet"}
DATASET_NAMES = {**{name: title for title, name in PAPER_DATASETS.items()}, "digits": "digits"}
BASELINE_NAMES = {"proxy_anchor": "Proxy-Anchor", "proxynca++": "ProxyNCA++", "softtriple": "SoftTriple"}


class ReportError(ValueError):
    """A run dir or file that cannot be reported on; the message names the path."""


# ----------------------------------------------------------------------------------------------
# Reading a run: metrics.jsonl, results.json, config, the model folders of a multi-model run.

def parse_record(line: str, path: Path, number: int) -> dict:
    """One metrics.jsonl line as a dict with an integer step."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ReportError(f"{path}:{number}: expected a JSON object with an integer 'step', got {line[:80]!r}")
    if "val" in record and "MAP@R" not in (record["val"] if isinstance(record["val"], dict) else {}):
        raise ReportError(f"{path}:{number}: a validation record needs 'val': {{'MAP@R': ...}}, got {line[:80]!r}")
    return record


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is left out."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: not found (a run dir written by train.py holds metrics.jsonl)")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(parse_record(line, path, number))
        except json.JSONDecodeError as err:
            if position < len(lines) - 1:
                raise ReportError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not any("val" in r for r in records):
        raise ReportError(f"{path}: holds no validation record (a line with 'val'); has the run validated yet?")
    return records


def read_json(path: Path) -> dict | None:
    """A JSON file as a dict, None if absent; a corrupt one is an error naming it."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(run_dir: Path) -> dict:
    """The run's resolved config: config.yaml (written when the run starts), else results.json's copy, else {}."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        results = read_json(Path(run_dir) / "results.json") or {}
        return results["config"] if isinstance(results.get("config"), dict) else {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not valid YAML: {err}") from None
    return config if isinstance(config, dict) else {}


def method_name(config: dict) -> str | None:
    """'MS-CCP' (ccp), 'MS' (baseline), 'C2-XBM', 'Proxy-Anchor', ...: the method as the paper names it."""
    method, loss = config.get("method"), (config.get("loss") or {}).get("name")
    loss = PAPER_LOSSES.get(loss, str(loss).upper()) if loss else None
    if method in ("ccp", "xbm"):
        return f"{loss}-{method.upper()}" if loss else method.upper()
    if method == "baseline":
        return loss
    return BASELINE_NAMES.get(method, method)


def dataset_name(config: dict) -> str | None:
    """'CUB', 'digits', ...; for dataset.name folder, 'your images (NAME/)' with NAME the root folder's name."""
    dataset = config.get("dataset") or {}
    if dataset.get("name") == "folder":
        root = str(dataset.get("root") or "?").rstrip("/\\")
        return f"your images ({Path(root).name or root}/)"
    return DATASET_NAMES.get(dataset.get("name"), dataset.get("name"))


def which_models(config: dict, model_dir: Path) -> list[str]:
    """['fold 2', 'seed 0'] for one model (its seed{S}/fold{F}/ folders name it), ['3 folds', 'seeds 0-1'] for a run."""
    named = {m[1]: int(m[2]) for part in (model_dir.parent.name, model_dir.name)
             if (m := re.fullmatch(r"(seed|fold)(\d+)", part))}
    fold, folds, seed, repeats = config.get("fold"), config.get("folds"), config.get("seed"), config.get("repeats") or 1
    out = []
    if fold is not None or "fold" in named:
        out.append(f"fold {fold if fold is not None else named['fold']}")
    elif folds:
        out.append(f"{folds} folds")
    if repeats > 1 and "seed" in named:
        seed, repeats = named["seed"], 1
    if seed is not None:
        out.append(f"seed {seed}" if repeats == 1 else f"seeds {seed}-{seed + repeats - 1}")
    return out


def run_title(run_dir: Path, models: bool = True) -> str:
    """'MS-CCP on digits, fold 2, seed 0': method and dataset from the run's config (and which model(s))."""
    run_dir, config = Path(run_dir), {}
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):  # a model folder's run holds the config
        config = read_config(folder)
        if config or not re.fullmatch(r"(seed|fold)\d+", folder.name):
            break
    if not config:
        return f"{run_dir.name}: no config.yaml, method and dataset unknown"
    title = f"{method_name(config) or '?'}{ablations(config)} on {dataset_name(config) or '?'}"
    return ", ".join([title, *which_models(config, run_dir)]) if models else title


def ablations(config: dict) -> str:
    """' (λ = 0, no re-selection)': what a CCP run's config switches off (PAPER.md §2, §5), else ''."""
    ccp, lam = config.get("ccp") or {}, (config.get("projection") or {}).get("lam")
    off = [text for text, on in (("λ = 0", lam == 0), ("no re-selection", ccp.get("reselect") is False),
                                 ("random first proxies", ccp.get("proxy_init") == "random")) if on]
    return f" ({', '.join(off)})" if off and config.get("method") == "ccp" else ""


def natural_key(path: Path) -> list:
    """seed2 before seed10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def model_dirs(run_dir: Path) -> list[Path]:
    """The folders that hold one model each: the run dir itself, or its seed{S}/fold{F}/ folders."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run dir not found: {run_dir}")
    if (run_dir / "metrics.jsonl").is_file():
        return [run_dir]
    found = [p.parent for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl") for p in run_dir.glob(pattern)]
    if not found:
        raise ReportError(f"{run_dir}: no metrics.jsonl in it or in its seed*/fold* folders (not a train.py run dir)")
    return sorted(found, key=natural_key)


# ----------------------------------------------------------------------------------------------
# What metrics.jsonl says about the algorithm of PAPER.md §2.

def validations(records: list[dict]) -> list[dict]:
    return [r for r in records if "val" in r]


def instance_spans(records: list[dict]) -> list[dict]:
    """Problem instances as {instance, start, end, steps, converged}, from the validation records.

    The record of the evaluation at which instance t converged still carries t; the next carries t + 1,
    so instance t + 1 starts where t's last record is. The last instance converged only if its last
    record re-selected proxies.
    """
    spans: list[dict] = []
    for r in validations(records):
        if spans and spans[-1]["instance"] == r.get("instance", 0):
            spans[-1]["end"] = r["step"]
            continue
        if spans:
            spans[-1]["converged"] = True
        start = spans[-1]["end"] if spans else 0
        spans.append({"instance": r.get("instance", 0), "start": start, "end": r["step"], "converged": False})
    last = validations(records)[-1]
    spans[-1]["converged"] = "selection" in last and last["step"] == spans[-1]["end"]
    for span in spans:
        span["steps"] = span["end"] - span["start"]
    return spans


def covering_radii(records: list[dict]) -> list[tuple[int, float | None, float]]:
    """(step, radius of the converged proxies P*, radius of the new ones) at every selection.

    The initial selection (step 0) has no converged proxies: its 'before' is None (the logged value
    is that of the random initial proxy table, which nothing trained).
    """
    out = []
    for r in records:
        if "selection" in r:
            s = r["selection"]
            before = s["covering_radius_before"] if r["step"] > 0 else None
            out.append((r["step"], before, s["covering_radius_after"]))
    return out


# ----------------------------------------------------------------------------------------------
# Figures of one model (report.png) and of several (summary.png, comparison.png).

def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename) and close the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def finish_figure(fig: plt.Figure, title: str, note: str, right: float = 0.0) -> None:
    """The title (method and dataset) on top, `note` (what the numbers are, the run's path) in small grey type
    at the bottom, the panels laid out between them; `right` inches on the right stay free for legends."""
    height = fig.get_figheight() * 72  # points
    title = textwrap.fill(title, int(11 * fig.get_figwidth()), break_long_words=False)  # 11-point characters a line
    fig.suptitle(title, fontsize=11, y=1 - 4 / height, va="top").set_in_layout(False)  # the rect below keeps it free
    width = int(17 * fig.get_figwidth())  # characters of 7-point type across the figure
    note = "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in note.splitlines())
    fig.text(0.005, 0.005, note, fontsize=7, color="0.35", va="bottom")
    top, bottom = 1 - (4 + 14 * (title.count("\n") + 1) + 4) / height, (9 * (note.count("\n") + 1) + 4) / height
    fig.tight_layout(rect=(0, bottom, 1 - right / fig.get_figwidth(), top))


def legend_below(ax: plt.Axes, ncol: int = 2) -> None:
    """The axes' legend under its x label (36 points below the axes, whatever their size): off the data."""
    below = matplotlib.transforms.ScaledTranslation(0, -36 / 72, ax.figure.dpi_scale_trans)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=ax.transAxes + below, ncol=ncol,
              fontsize=8, frameon=False)


def mark_instances(ax: plt.Axes, spans: list[dict]) -> list[int]:
    """Dashed lines where instances converged; returns their steps."""
    boundaries = [s["end"] for s in spans if s["converged"]]
    for step in boundaries:
        ax.axvline(step, color="0.6", linestyle="--", linewidth=0.8)
    return boundaries


def draw_validation(ax: plt.Axes, records: list[dict]) -> dict:
    """Validation MAP@R against step, instance boundaries, λ_t on a second axis (PAPER.md §2)."""
    evals = validations(records)
    steps = [r["step"] for r in evals]
    scores = [r["val"]["MAP@R"] for r in evals]
    best = int(np.argmax(scores))  # the first maximum, as train.py's early stopping keeps it
    ax.plot(steps, scores, color="C0", marker=".", label="validation MAP@R")
    ax.plot(steps[best], scores[best], marker="*", markersize=12, color="C3")
    boundaries = mark_instances(ax, instance_spans(records))
    lam = [(r["step"], r.get("lam", 0.0)) for r in evals]
    pulled = any(v for _, v in lam)
    if pulled:
        twin = ax.twinx()
        twin.step(steps, [v for _, v in lam], where="pre", color="C2", linewidth=1)
        twin.set_ylabel("λ_t", color="C2")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        twin.set_ylim(0, 1.3 * max(v for _, v in lam))  # its top line below the best score's star
    ax.set(xlabel="step", ylabel="validation MAP@R")
    ax.set_title(f"validation MAP@R, best {scores[best]:.4f} at step {steps[best]} (red star)\n"
                 + ("instances end at the dashed lines" if boundaries else "one problem instance")
                 + ("; λ_t in green (right axis)" if pulled else "; λ_t = 0 throughout"), fontsize=10)
    return {"best_val_MAP@R": scores[best], "best_step": steps[best], "boundaries": boundaries, "lam": lam}


def draw_covering_radius(ax: plt.Axes, records: list[dict]) -> dict:
    """Covering radius of the training pools before (P*) and after each re-selection (PAPER.md §5)."""
    radii = covering_radii(records)
    ax.set(xlabel="step", ylabel="covering radius (n-space)", title="covering radius of k-center's pools")
    if not radii:
        ax.text(0.5, 0.5, "no proxy selection logged", ha="center", va="center", transform=ax.transAxes)
        return {"covering_radius": []}
    for step, before, after in radii:
        if before is not None:
            ax.annotate("", (step, after), (step, before), arrowprops={"arrowstyle": "->", "color": "0.5"})
    with_before = [(s, b) for s, b, _ in radii if b is not None]
    ax.plot([s for s, _ in with_before], [b for _, b in with_before], "s", mfc="none", color="C1",
            label="before: converged proxies P*")
    ax.plot([s for s, _, _ in radii], [a for _, _, a in radii], "o", color="C0", label="after: k-center's proxies")
    legend_below(ax)
    return {"covering_radius": radii}


def draw_steps_per_instance(ax: plt.Axes, records: list[dict]) -> dict:
    """Steps each problem instance took (the supplement's Fig. 4 reading); the unfinished one hatched."""
    spans = instance_spans(records)
    bars = ax.bar([s["instance"] for s in spans], [s["steps"] for s in spans], color="C0", edgecolor="k")
    for bar, span in zip(bars, spans):
        if not span["converged"]:
            bar.set_hatch("//")
            bar.set_facecolor("none")
        ax.annotate(str(span["steps"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    textcoords="offset points", xytext=(0, 2), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.12)  # room above the tallest bar for its number
    ax.set(xlabel="problem instance t", ylabel="steps", title="steps per instance (hatched: did not converge)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))  # one bar: tick 0
    return {"steps_per_instance": [s["steps"] for s in spans]}


def draw_loss(ax: plt.Axes, records: list[dict]) -> dict:
    """Training loss (the last batch before each validation) against step."""
    points = [(r["step"], r["loss"]) for r in validations(records) if "loss" in r]
    ax.plot([s for s, _ in points], [v for _, v in points], color="C4", marker=".")
    mark_instances(ax, instance_spans(records))
    last = points[-1][1] if points else None
    ax.set(xlabel="step", ylabel="training loss")
    ax.set_title("training loss (batch before each validation)" + (f", last {last:.4f}" if last is not None else ""))
    return {"last_loss": last}


def figure_run(model_dir: Path, path: Path | None = None) -> dict:
    """report.png of one model: the four panels above; returns the numbers written on them and the title."""
    model_dir = Path(model_dir)
    records = read_metrics(model_dir / "metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    numbers = {"title": run_title(model_dir)}
    for ax, draw in zip(axes.flat, (draw_validation, draw_covering_radius, draw_steps_per_instance, draw_loss)):
        numbers.update(draw(ax, records))
    finish_figure(fig, numbers["title"], f"run: {model_dir}")
    numbers["path"] = save_figure(fig, path or model_dir / "report.png")
    return numbers


def model_test_map_at_r(model_dir: Path) -> float | None:
    """The model's test MAP@R from its results.json, None if it has not finished."""
    results = read_json(model_dir / "results.json") or {}
    test = results.get("test") or (results.get("models") or [{}])[0].get("test") or {}
    return test.get("MAP@R")


def figure_comparison(groups: dict[str, list[Path]], path: Path, title: str | None = None,
                      note: str | None = None) -> dict:
    """One figure for several models: every validation curve, coloured by group, and per group the best
    validation MAP@R and the test MAP@R: a group's mean, ± sd (an error bar) only where several models
    contribute. `title` defaults to the groups' methods and datasets, `note` to their paths."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    numbers = {}
    for i, (label, dirs) in enumerate(groups.items()):
        best, test = [], []
        for j, model_dir in enumerate(dirs):
            evals = validations(read_metrics(model_dir / "metrics.jsonl"))
            curves.plot([r["step"] for r in evals], [r["val"]["MAP@R"] for r in evals], color=f"C{i % 10}",
                        linewidth=1, alpha=0.8, label=label if j == 0 else None,
                        marker="." if len(evals) == 1 else None)  # a curve of one validation is a point
            best.append(max(r["val"]["MAP@R"] for r in evals))
            score = model_test_map_at_r(model_dir)
            if score is not None:
                test.append(score)
        numbers[label] = {"best_val_MAP@R": group_mean(best), "test_MAP@R": group_mean(test) if test else None}
    draw_group_bars(bars, numbers)
    curves.set(xlabel="step", ylabel="validation MAP@R", title="validation MAP@R")
    legend_below(curves, ncol=min(3, len(groups)))
    if title is None:
        title = " vs ".join(dict.fromkeys(run_title(dirs[0], models=False) for dirs in groups.values()))
    if note is None:
        note = "; ".join(f"{label}: {os.path.commonpath([str(d) for d in dirs])}" for label, dirs in groups.items())
    finish_figure(fig, title, note)
    save_figure(fig, path)
    return numbers


def group_mean(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; None for the sd of one value (one model has no spread)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def draw_group_bars(ax: plt.Axes, numbers: dict[str, dict]) -> None:
    """Best validation and test MAP@R per group: the mean, with an error bar (± sd) only over several models;
    the mean written above the bar (and above its error bar)."""
    width = 0.4
    for k, (key, name) in enumerate((("best_val_MAP@R", "best validation"), ("test_MAP@R", "test"))):
        for i, values in enumerate(numbers.values()):
            if values[key] is None:
                continue
            mean, sd = values[key]
            x = i + (k - 0.5) * width
            ax.bar(x, mean, width, color=f"C{k}", label=name if i == 0 else None,
                   **({"yerr": sd, "capsize": 3} if sd is not None else {}))
            ax.annotate(f"{mean:.3f}", (x, mean + (sd or 0.0)), textcoords="offset points", xytext=(0, 2),
                        ha="center", va="bottom", fontsize=7)
    ax.margins(y=0.12)
    ax.set_xticks(range(len(numbers)), list(numbers), rotation=20, ha="right", fontsize=8)
    several = any(v[key] is not None and v[key][1] is not None for v in numbers.values()
                  for key in ("best_val_MAP@R", "test_MAP@R"))
    ax.set(ylabel="MAP@R", title="MAP@R: mean ± sd over a run's models" if several else "MAP@R (one model each)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


# ----------------------------------------------------------------------------------------------
# The supplement's Fig. 1: proxies and training embeddings at each selection (PAPER.md §5, §9).

def read_selection(path: Path) -> dict[str, Any]:
    """A selections/*.npz written by train.py, every key checked."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the selection file: {err}") from None
    missing = [k for k in SELECTION_KEYS if k not in data]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)} (expected {', '.join(SELECTION_KEYS)})")
    name = str(data["normalization"])
    if name not in losses.NORMALIZATIONS:
        raise ReportError(f"{path}: normalization {name!r} is not one of {', '.join(losses.NORMALIZATIONS)}")
    data.update(step=int(data["step"]), instance=int(data["instance"]), normalization=name, final=path.stem == "final")
    return data


def selection_files(run_dir: Path) -> list[Path]:
    """selections/step*.npz in step order, then final.npz."""
    folder = Path(run_dir) / "selections"
    steps = sorted(folder.glob("step*.npz"), key=natural_key)
    return steps + ([folder / "final.npz"] if (folder / "final.npz").is_file() else [])


def normalized(x: np.ndarray, name: str) -> torch.Tensor:
    """n(x) of PAPER.md §3 (or the l2 ablation) as a float64 tensor."""
    return losses.NORMALIZATIONS[name](torch.as_tensor(np.asarray(x, dtype=np.float64)))


def proxy_spread(proxies: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean over classes of the mean pairwise distance between a class's proxies (0: they coalesced); None
    when no class has two (K = 1)."""
    spreads = [float(torch.pdist(own).mean()) for own in (proxies[labels == c] for c in torch.unique(labels))
               if len(own) > 1]  # mean over the k(k-1)/2 pairs
    return float(np.mean(spreads)) if spreads else None


def selection_numbers(sel: dict[str, Any]) -> dict:
    """Covering radius (n(fit) vs n(proxies)) and spread of the converged and the next proxies."""
    name = sel["normalization"]
    fit, fit_labels = normalized(sel["fit_embeddings"], name), torch.as_tensor(sel["fit_labels"])
    labels = torch.as_tensor(sel["proxy_labels"])
    numbers = {"step": sel["step"], "instance": sel["instance"], "final": sel["final"]}
    for key, which in (("converged", "converged_proxies"), ("next", "selected_proxies")):
        trained = key == "next" or np.any(sel[which])  # all zeros: no converged proxies yet (step 0)
        proxies = normalized(sel[which], name)
        numbers[f"covering_radius_{key}"] = selection.covering_radius(fit, fit_labels, proxies, labels)[1] if trained else None
        numbers[f"spread_{key}"] = proxy_spread(proxies, labels) if trained else None
    return numbers


def plane(points: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """Points in the drawing plane: themselves in 2-D, else their coordinates on the basis."""
    return points if basis is None else points @ basis


def principal_plane(points: np.ndarray) -> np.ndarray | None:
    """None for 2-D points; otherwise the top two principal axes (d, 2), for embeddings wider than 2."""
    if points.shape[1] == 2:
        return None
    centred = points - points.mean(axis=0)
    return np.linalg.svd(centred, full_matrices=False)[2][:2].T


def class_colors(labels: np.ndarray) -> np.ndarray:
    """An RGBA row per label: tab10's colours C0.. for up to 10 classes, a continuous map beyond."""
    classes = np.unique(labels)
    index = np.searchsorted(classes, labels)
    if len(classes) <= 10:
        return plt.get_cmap("tab10")(index)
    return plt.get_cmap("turbo")(index / (len(classes) - 1))


def selection_title(numbers: dict) -> str:
    if numbers["final"]:
        return f"end: best model (step {numbers['step']}, instance {numbers['instance']})"
    if numbers["step"] == 0:
        return "step 0: initial k-center"
    return f"step {numbers['step']}: instance {numbers['instance'] - 1} converged"


def draw_selection(ax: plt.Axes, sel: dict[str, Any]) -> dict:
    """One panel of Fig. 1: n(fit) by class, n(P*) squares, n(next proxies) circles, radii written below."""
    numbers = selection_numbers(sel)
    name = sel["normalization"]
    fit = normalized(sel["fit_embeddings"], name).numpy()
    basis = principal_plane(fit)
    xy = plane(fit, basis)
    ax.scatter(xy[:, 0], xy[:, 1], c=class_colors(sel["fit_labels"]), s=4, alpha=0.35, linewidths=0)
    proxy_colors = class_colors(sel["proxy_labels"])
    for key, which, marker in (("converged", "converged_proxies", "s"), ("next", "selected_proxies", "o")):
        if numbers[f"covering_radius_{key}"] is not None:
            p = plane(normalized(sel[which], name).numpy(), basis)
            ax.scatter(p[:, 0], p[:, 1], marker=marker, s=70, facecolors=proxy_colors, edgecolors="k", linewidths=1)
            xy = np.concatenate([xy, p])
    if basis is None:
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.7", linewidth=0.8))  # n(x) lies in the unit disc
        half = min(1.15, 1.15 * float(np.abs(xy).max()))  # zoom in while the embeddings are still small
        ax.set(xlim=(-half, half), ylim=(-half, half))
    ax.set_aspect("equal")
    ax.set_title(selection_title(numbers), fontsize=9)
    ax.set_xlabel(selection_caption(numbers), fontsize=7)  # under the panel, off the points
    return numbers


def selection_caption(numbers: dict) -> str:
    lines = []
    for key, what in (("converged", "P* (squares)"), ("next", "next (circles)")):
        if numbers[f"covering_radius_{key}"] is not None:
            spread = numbers[f"spread_{key}"]
            lines.append(f"{what}: radius {numbers[f'covering_radius_{key}']:.3f}, "
                         f"spread {'— (K = 1)' if spread is None else f'{spread:.3f}'}")
    return "\n".join(lines)


def class_names(selections: list[dict[str, Any]]) -> dict[int, str]:
    """{label: what the legend calls it}: the class's name where the selection file records class_names
    (indexed by label: train.py records them), else its label within the fit split."""
    labels = np.unique(np.concatenate([s["fit_labels"] for s in selections]))
    names = selections[0].get("class_names")
    if names is not None and len(names) > labels.max():
        return {int(c): str(names[c])[:18] for c in labels}
    return {int(c): str(c) for c in labels}


LEGEND_INCHES = 1.7  # the strip right of Fig. 1's panels that holds its legends
MAX_LEGEND_CLASSES = 10  # tab10's distinct colours; more classes get a colour bar of class ids instead


def class_legend(fig: plt.Figure, names: dict[int, str], top: float, bottom: float) -> None:
    """Fig. 1's key right of the panels (between heights top and bottom): the markers, then one entry per
    class in its colour (a colour bar of class ids beyond MAX_LEGEND_CLASSES)."""
    left = 1 - LEGEND_INCHES / fig.get_figwidth()
    grey = {"linestyle": "", "markerfacecolor": "0.75", "markeredgecolor": "k"}
    markers = [matplotlib.lines.Line2D([], [], marker="s", markersize=8, **grey),
               matplotlib.lines.Line2D([], [], marker="o", markersize=8, **grey),
               matplotlib.lines.Line2D([], [], marker=".", linestyle="", color="0.6")]
    key = fig.legend(markers, ["converged proxies P*", "next proxies (k-center)", "training image"], title="marker",
                     loc="upper left", bbox_to_anchor=(left, top), fontsize=8, title_fontsize=8, frameon=False)
    end = key.get_window_extent(fig.canvas.get_renderer()).y0  # where the marker key ends: the classes go below
    y = fig.transFigure.inverted().transform((0, end))[1] - 0.02
    if len(names) > MAX_LEGEND_CLASSES:
        bar = fig.add_axes((left + 0.03, bottom, 0.15 / fig.get_figwidth(), y - 0.05 - bottom))
        norm = matplotlib.colors.Normalize(0, len(names) - 1)  # class_colors' map: the i-th class of the split
        fig.colorbar(matplotlib.cm.ScalarMappable(norm, "turbo"), cax=bar, label="class (training split)")
        return
    handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=c,
                                       markeredgecolor=c) for c in class_colors(np.array(list(names)))]
    fig.legend(handles, list(names.values()), title="class", loc="upper left", bbox_to_anchor=(left, y),
               fontsize=8, title_fontsize=8, frameon=False)


def figure_instances(run_dir: Path, path: Path | None = None, files: Sequence[Path] | None = None) -> list[dict]:
    """instances.png: the supplement's Fig. 1, one panel per selection file; returns each panel's numbers."""
    run_dir = Path(run_dir)
    files = list(files) if files is not None else selection_files(run_dir)
    if not files:
        raise ReportError(f"{run_dir}: no selections/*.npz (train with ccp.save_selections: true)")
    rows = math.ceil(len(files) / 4)  # at most 4 panels a row, the rows as full as they can be
    columns = math.ceil(len(files) / rows)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + LEGEND_INCHES, 3.5 * rows + 0.9),
                             squeeze=False)
    selections = [read_selection(f) for f in files]
    panels = [draw_selection(ax, sel) for ax, sel in zip(axes.flat, selections)]
    for ax in list(axes.flat)[len(files):]:
        ax.axis("off")
    dim = selections[0]["fit_embeddings"].shape[1]
    where = "" if dim == 2 else f", drawn on their first two principal axes ({dim}-D)"
    note = (f"training embeddings n(f(x)){where} at each proxy selection; radius = covering radius of the training "
            f"images, spread = mean distance between a class's proxies (0: coalesced)\nrun: {run_dir}")
    finish_figure(fig, f"{run_title(run_dir)}: proxies at each selection (the supplement's Fig.\u00a01)", note,
                  right=LEGEND_INCHES)
    class_legend(fig, class_names(selections), axes[0, 0].get_position().y1, axes[-1, 0].get_position().y0)
    save_figure(fig, path or run_dir / "instances.png")
    return panels


# ----------------------------------------------------------------------------------------------
# The supplement's Fig. 2: held-out embeddings in 2-D with the coverage statistics (PAPER.md §9).

def read_embeddings(run_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(points, labels, retrieval metrics) of embeddings.npz's split; In-Shop's test is query + gallery."""
    path = Path(run_dir) / "embeddings.npz"
    if not path.is_file():
        raise ReportError(f"{path}: not found (train with evaluation.save_embeddings: true)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {key: f[key] for key in f.files}
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the embeddings: {err}") from None
    names = ["query", "gallery"] if split == "test" and "query_embeddings" in data else [split]
    missing = [f"{n}_{part}" for n in names for part in ("embeddings", "labels") if f"{n}_{part}" not in data]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    parts = [(data[f"{n}_embeddings"].astype(np.float32), data[f"{n}_labels"]) for n in names]
    metrics = evaluate.retrieval_metrics(*[a for part in parts for a in part], recall_ks=(1,))
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]), metrics


def k_center_radii(points: torch.Tensor) -> torch.Tensor:
    """r_k for k = 1..n: covering radius of n points by the first k of greedy k-center's picks.

    Textbook farthest-first (Gonzalez): no initial set, so the first pick is the first point and each
    next pick the point farthest from those picked; r_k is within a factor 2 of the best k centers.
    """
    nothing = points.new_zeros(0, points.shape[1])  # no initial set (not the zero vector of PAPER.md §5)
    order = selection.greedy_k_center(points, points.shape[0], nothing)
    distances = torch.cdist(points, points[order])  # (n, n): point i to the j-th pick
    return torch.cummin(distances, dim=1).values.amax(dim=0)  # max_i min_{j<=k} d(i, pick_j)


def average_covering_radius(points: np.ndarray, labels: np.ndarray) -> float:
    """The supplement's average covering radius: mean over classes of mean_{k=1..n} r_k (PAPER.md §9)."""
    x = torch.as_tensor(points, dtype=torch.float64)
    return float(np.mean([float(k_center_radii(x[torch.as_tensor(labels == c)]).mean()) for c in np.unique(labels)]))


def embedding_numbers(points: np.ndarray, labels: np.ndarray, metrics: dict[str, float]) -> dict:
    """MAP@R, average covering radius and mean inter-class distance, all in the embedding space."""
    x = torch.as_tensor(points, dtype=torch.float64)
    return {"MAP@R": metrics["MAP@R"], "average_covering_radius": average_covering_radius(points, labels),
            "interclass_distance": selection.mean_interclass_distance(x, torch.as_tensor(labels))}


def plane_2d(points: np.ndarray, seed: int, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices drawn, their 2-D coordinates): the points themselves in 2-D, else seeded t-SNE."""
    keep = np.arange(len(points))
    if len(points) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(points), max_points, replace=False))
    if points.shape[1] == 2:
        return keep, points[keep]
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    perplexity = min(30.0, (len(keep) - 1) / 3)  # TSNE needs perplexity < number of points
    # one thread: Barnes-Hut's sums then do not depend on the machine's core count (the same picture
    # everywhere), and its OpenMP threads cannot spin-wait for minutes on a busy machine
    with threadpool_limits(1):
        return keep, TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points[keep])


def figure_tsne(runs: dict[str, Path], path: Path, split: str = "val", seed: int = 0,
                max_points: int = 3000) -> dict[str, dict]:
    """tsne.png: one panel per run (e.g. before / after CCP), the numbers of each written under it."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 5.6), squeeze=False)
    numbers = {}
    for ax, (label, run_dir) in zip(axes.flat, runs.items()):
        points, labels, metrics = read_embeddings(run_dir, split)
        numbers[label] = embedding_numbers(points, labels, metrics)
        keep, xy = plane_2d(points, seed, max_points)
        ax.scatter(xy[:, 0], xy[:, 1], c=class_colors(labels[keep]), s=5, alpha=0.6, linewidths=0)
        if points.shape[1] == 2:  # the embedding itself: equal axes, and the unit circle n(x) lives in
            ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.7", linewidth=0.8))
            ax.set_aspect("equal", adjustable="datalim")
        method = "2-D embedding" if points.shape[1] == 2 else f"t-SNE of {points.shape[1]}-D (t-SNE seed {seed})"
        ax.set_title(f"{label}\n{split} embeddings, {method}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        n = numbers[label]
        ax.set_xlabel(f"MAP@R {n['MAP@R']:.4f}, average covering radius {n['average_covering_radius']:.4f}\n"
                      f"mean inter-class distance {n['interclass_distance']:.4f}", fontsize=8)  # off the points
    title = " vs ".join(dict.fromkeys(run_title(d) for d in runs.values()))
    note = ("numbers computed in the embedding space n(f(x)), not in the drawing plane; colours: classes\n"
            + "; ".join(f"{label}: {d}" for label, d in runs.items()))
    finish_figure(fig, f"{title}: the supplement's Fig.\u00a02", note)
    save_figure(fig, path)
    return numbers


# ----------------------------------------------------------------------------------------------
# The run's test metrics beside the paper's (PAPER.md §8).

def paper_numbers(path: Path = ROOT / "PAPER.md") -> dict[tuple[str, str], dict[str, float]]:
    """{(method row, dataset): {"P@1": f, "MAP@R": f}} from the table of PAPER.md §8, as fractions."""
    if not Path(path).is_file():
        return {}
    section = re.search(r"^## 8\..*?(?=^## |\Z)", Path(path).read_text(), re.M | re.S)
    rows = [line.strip().strip("|").split("|") for line in (section.group(0) if section else "").splitlines()
            if line.startswith("|")]
    if len(rows) < 3:
        return {}
    header = [h.strip() for h in rows[0][1:]]  # e.g. "CUB 512D P@1 / MAP@R"
    datasets = [PAPER_DATASETS.get(h.split()[0]) for h in header]
    metrics = [[m.strip() for m in h.split("512D", 1)[-1].split("/")] for h in header]
    table = {}
    for row in rows[2:]:
        for dataset, names, cell in zip(datasets, metrics, row[1:]):
            try:
                values = [float(v) / 100 for v in cell.split("/")]
            except ValueError:  # a cell without numbers (e.g. "—"): the paper has none there
                continue
            table[(row[0].strip(), dataset)] = dict(zip(names, values))
    return table


def paper_method(config: dict) -> str | None:
    """The row of PAPER.md §8 that a run's method and loss correspond to, if any."""
    method, loss = config.get("method"), PAPER_LOSSES.get((config.get("loss") or {}).get("name"))
    if method == "proxy_anchor":
        return "Proxy-Anchor"
    if loss is None or method not in ("ccp", "baseline"):
        return None
    return f"{loss}-CCP (L)" if method == "ccp" else loss


def run_summary(results: dict) -> tuple[dict, dict | None, dict | None, dict | None, int]:
    """(mean, sd over seeds or None, ensemble mean or None, its sd over the combinations of the seeds' models
    or None, number of seeds) from a results.json."""
    if "mean" not in results:  # a single model's results.json
        return results["test"], None, None, None, 1
    seeds = len(results.get("per_seed") or [None])
    sd, ensemble_sd = (results.get("sd"), results.get("ensemble_sd")) if seeds > 1 else (None, None)
    return results["mean"], sd, results.get("ensemble_mean"), ensemble_sd, seeds


def percent(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def results_table(run_dir: Path, paper: dict | None = None) -> tuple[str, dict[str, dict]]:
    """A markdown table of the run's test metrics and its numbers (fractions); PAPER.md §8's number and the
    difference beside them only where the paper has a row for the run's dataset and method."""
    run_dir = Path(run_dir)
    results = read_json(run_dir / "results.json")
    if results is None or not ({"mean", "test"} & results.keys()):
        above = run_dir.parent if (run_dir.parent / "results.json").is_file() else None  # run_dir is a seed*/ folder
        return (f"{run_dir}: no results.json with test metrics" + (f"; the run it belongs to has them: {above}"
                if above else " yet (the run has not finished)")), {}
    config = read_config(run_dir)
    mean, sd, ensemble, ensemble_sd, seeds = run_summary(results)
    dataset, method = (config.get("dataset") or {}).get("name"), paper_method(config)
    paper = paper if paper is not None else paper_numbers()
    reference = paper.get((method, dataset), {}) if dataset in PAPER_DATASETS.values() else {}
    rows = {}
    for key in (k for k, v in mean.items() if isinstance(v, float)):
        ours = ensemble[key] if ensemble else mean[key]
        ref = reference.get(key)
        rows[key] = {"mean": mean[key], "sd": sd[key] if sd else None, "ensemble": ensemble[key] if ensemble else None,
                     "ensemble_sd": (ensemble_sd or {}).get(key), "paper": ref,
                     "difference": None if ref is None else ours - ref}
    return table_text(run_dir, config, rows, method, bool(reference), seeds, results), rows


def table_text(run_dir: Path, config: dict, rows: dict, method: str | None, has_paper: bool, seeds: int,
               results: dict) -> str:
    dim = (config.get("model") or {}).get("embedding_dim", "?")
    models = max(1, len(results.get("models") or [None]) // seeds)
    over = f", ± sd over {seeds} seeds" if seeds > 1 else ""
    head = [f"{dim}-D mean of {models} model(s){over}"]
    has_ensemble = any(r["ensemble"] is not None for r in rows.values())
    if has_ensemble:
        combinations = f", ± sd over {results['ensemble_combinations']} combinations" if seeds > 1 else ""
        head.append(f"{dim * models if isinstance(dim, int) else '?'}-D ensemble{combinations}")
    if has_paper:
        head += ["paper 512-D", "difference (points)"]
    lines = [f"test metrics of {run_title(run_dir)} ({run_dir}), in %",
             "", "| metric | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for key, r in rows.items():
        cells = [percent(r["mean"], r["sd"])] + ([percent(r["ensemble"], r["ensemble_sd"])] if has_ensemble else [])
        if has_paper:
            cells += [percent(r["paper"]), "—" if r["difference"] is None else f"{100 * r['difference']:+.2f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", paper_note(config, method, has_paper, has_ensemble)]
    return "\n".join(lines)


def paper_note(config: dict, method: str | None, has_paper: bool, has_ensemble: bool) -> str:
    dataset = (config.get("dataset") or {}).get("name")
    if dataset not in PAPER_DATASETS.values():
        return (f"Not compared with the paper: no paper row for this dataset ({dataset_name(config) or '?'}; "
                "PAPER.md §8 covers CUB, Cars, SOP and In-Shop).")
    if not has_paper:
        return (f"Not compared with the paper: PAPER.md §8 has no row for this method ({method_name(config) or '?'}) "
                f"on {dataset_name(config)}.")
    if not has_ensemble:
        return ("Difference: this run's single-model mean against the paper's 512-D ensemble; the paper says "
                "128-D single models score about 4-10 points lower (PAPER.md §8).")
    return f"Difference: this run's ensemble minus the paper's 512-D {method} on {dataset_name(config)} (PAPER.md §8)."


# ----------------------------------------------------------------------------------------------
# The command line.

def report_run(run_dir: Path, split: str) -> list[Path]:
    """Every figure of one run dir; returns the paths written."""
    dirs = model_dirs(run_dir)
    written = []
    for model_dir in dirs:
        written.append(figure_run(model_dir)["path"])
        if selection_files(model_dir):
            figure_instances(model_dir)
            written.append(model_dir / "instances.png")
        if (model_dir / "embeddings.npz").is_file():
            written.append(model_dir / "tsne.png")
            figure_tsne({"best model": model_dir}, written[-1], split)
    if len(dirs) > 1:
        written.append(Path(run_dir) / "summary.png")
        figure_comparison({str(d.relative_to(run_dir)): [d] for d in dirs}, written[-1], run_title(run_dir),
                          f"run: {run_dir}")
    return written


def report_comparison(run_dirs: list[Path], out: Path, split: str) -> list[Path]:
    """comparison.png of several runs, and tsne_comparison.png when each run saved its embeddings."""
    out.mkdir(parents=True, exist_ok=True)
    labels = [run_title(d) for d in run_dirs]  # the method and dataset; the path where two runs share them
    labels = [f"{t} ({d})" if labels.count(t) > 1 else t for t, d in zip(labels, run_dirs)]
    groups = dict(zip(labels, map(model_dirs, run_dirs)))
    figure_comparison(groups, out / "comparison.png", note="; ".join(f"{t}: {d}" for t, d in zip(labels, run_dirs)))
    written = [out / "comparison.png"]
    # t-SNE draws one model per run: its first (seed, fold), named where the run has several
    firsts = {label if len(dirs) == 1 else f"{label}, {dirs[0].relative_to(run_dir)}": dirs[0]
              for (label, dirs), run_dir in zip(groups.items(), run_dirs)}
    if all((d / "embeddings.npz").is_file() for d in firsts.values()):
        figure_tsne(firsts, out / "tsne_comparison.png", split)
        written.append(out / "tsne_comparison.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="folder for comparison.png (default: the first RUN_DIR)")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="embeddings drawn by t-SNE")
    args = parser.parse_args(argv)
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ReportError(f"--out {args.out} is a file; name a folder for comparison.png")
        for run_dir in args.run_dirs:
            written = report_run(run_dir, args.split)
            print(results_table(run_dir)[0])
            print("\nfigures: " + ", ".join(map(str, written)) + "\n")
        if len(args.run_dirs) > 1:
            written = report_comparison(args.run_dirs, args.out or args.run_dirs[0], args.split)
            print("comparison: " + ", ".join(map(str, written)))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
