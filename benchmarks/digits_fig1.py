"""The supplement's Fig. 1 on the embedded digits, over seeds: without CCP, do a class's proxies coalesce?

Run by hand from the repository root (about 2 CPU-minutes per run, 2 runs per seed):
    python benchmarks/digits_fig1.py [--seeds 0 1 2 3 4] [--runs runs/digits_fig1] [--jobs 1]
It trains configs/digits_fig1_before.yaml (one proxy-based instance, no re-selection) and
configs/digits_fig1_ccp.yaml (CCP) once per seed with `python train.py CONFIG seed=S
run_dir=RUNS/NAME/seedS` (a finished run is reused, an interrupted one resumed), then prints mean ± sd
over the seeds of, all in the normalised space n(·) of PAPER.md §3:
  - the spread of a class's K proxies (mean pairwise distance between them; 0 = coalesced),
  - the covering radius of the training images by those proxies (PAPER.md §5),
for the converged proxies P* of every instance, for k-center's next proxies, and for the best
model at the end; and the best validation MAP@R and the test MAP@R. It writes report.py's figures of
one seed (--figure-seed) into docs/figures/ (Fig. 1 of each run, Fig. 2 before/after, CCP's report).
"""
import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402

RUNS = {"before": ROOT / "configs" / "digits_fig1_before.yaml", "CCP": ROOT / "configs" / "digits_fig1_ccp.yaml"}
QUANTITIES = (("spread_converged", "spread of P*"), ("covering_radius_converged", "covering radius of P*"),
              ("spread_next", "spread of next proxies"), ("covering_radius_next", "covering radius of next proxies"))


def train(config: Path, seed: int, run_dir: Path) -> Path:
    """One `python train.py` run, its console in run_dir/train.log; a finished run is left as it is."""
    if (run_dir / "results.json").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train.py"), str(config), f"seed={seed}", f"run_dir={run_dir}",
               "resume=auto", "train.log_every_seconds=60"]
    with (run_dir / "train.log").open("a") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {run_dir / 'train.log'}")
    return run_dir


def per_instance(run_dir: Path) -> dict[str, dict]:
    """Each selection's numbers (report.selection_numbers), keyed by the instance whose P* it holds.

    The file written when instance t converged starts instance t + 1: its P* are instance t's. The
    initial selection (step 0) has no P*; final.npz holds the restored best model's proxies ("end").
    """
    out = {}
    for path in report.selection_files(run_dir):
        numbers = report.selection_numbers(report.read_selection(path))
        key = "end" if numbers["final"] else ("init" if numbers["step"] == 0 else f"t={numbers['instance'] - 1}")
        out[key] = numbers
    return out


def run_numbers(run_dir: Path) -> dict:
    """Selections by instance, best validation and test MAP@R, and the number of instances of one run."""
    results = report.read_json(run_dir / "results.json")
    model = results["models"][0] if "models" in results else results
    spans = report.instance_spans(report.read_metrics(run_dir / "metrics.jsonl"))
    return {"selections": per_instance(run_dir), "best_val": model["best_val_MAP@R"],
            "test": model["test"]["MAP@R"], "instances": len(spans)}


def cell(values: list[float], seeds: int) -> str:
    """mean ± sd over seeds; (n = k) when only k of the seeds got there."""
    if not values:
        return "—"
    mean, sd = report.group_mean(values)  # sd None for one value
    spread = f" ± {sd:.3f}" if sd is not None else ""
    return f"{mean:.3f}{spread}" + (f" (n = {len(values)})" if len(values) < seeds else "")


def instance_table(numbers: dict[str, list[dict]]) -> str:
    """Spread and covering radius per instance, mean ± sd over seeds, for both runs."""
    keys = sorted({k for runs in numbers.values() for n in runs for k in n["selections"]}, key=column_order)
    lines = ["| quantity (n-space) | run | " + " | ".join(keys) + " |", "|---|---" + "|---" * len(keys) + "|"]
    for quantity, title in QUANTITIES:
        for name, runs in numbers.items():
            cells = [cell([n["selections"][k][quantity] for n in runs if k in n["selections"]
                           and n["selections"][k][quantity] is not None], len(runs)) for k in keys]
            lines.append(f"| {title} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def column_order(key: str) -> tuple[int, int]:
    """init, t=0, t=1, ..., end."""
    if key == "init":
        return (0, 0)
    return (2, 0) if key == "end" else (1, int(key[2:]))


def summary_table(numbers: dict[str, list[dict]]) -> str:
    lines = ["| run | seeds | instances | best validation MAP@R | test MAP@R |", "|---|---|---|---|---|"]
    for name, runs in numbers.items():
        n = len(runs)
        lines.append(f"| {name} | {n} | {cell([r['instances'] for r in runs], n)} | "
                     f"{cell([r['best_val'] for r in runs], n)} | {cell([r['test'] for r in runs], n)} |")
    return "\n".join(lines)


def figures(before: Path, ccp: Path, out: Path) -> list[Path]:
    """Fig. 1 of both runs, Fig. 2 before/after (validation embeddings) and CCP's report.png, into out.

    CCP's Fig. 1 shows the initial selection, the first four re-selections (the supplement's
    iterations 1-4) and the end, which keeps the PNG small.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "digits_fig1_before.png", out / "digits_fig1_ccp.png", out / "digits_fig2.png",
             out / "digits_report_ccp.png"]
    report.figure_instances(before, paths[0])
    files = report.selection_files(ccp)
    report.figure_instances(ccp, paths[1], files[:5] + files[-1:] if len(files) > 6 else files)
    report.figure_tsne({"before": before, "CCP": ccp}, paths[2], split="val")
    report.figure_run(ccp, paths[3])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "digits_fig1")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--figure-seed", type=int, default=None, help="seed drawn into docs/figures (default: first)")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    jobs = [(name, config, seed, args.runs / name / f"seed{seed}") for seed in args.seeds for name, config in RUNS.items()]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda job: train(*job[1:]), jobs))
    numbers = {name: [run_numbers(args.runs / name / f"seed{seed}") for seed in args.seeds] for name in RUNS}
    print(f"digits, 2-D, K = 4 proxies per class, mean ± sd over seeds {args.seeds}\n")
    print(summary_table(numbers) + "\n")
    print(instance_table(numbers) + "\n")
    seed = args.seeds[0] if args.figure_seed is None else args.figure_seed
    paths = figures(args.runs / "before" / f"seed{seed}", args.runs / "CCP" / f"seed{seed}", args.figures)
    sizes = ", ".join(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} ({p.stat().st_size // 1024} KB)"
                      for p in paths)
    print(f"figures of seed {seed}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
