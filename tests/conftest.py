"""Shared pytest set-up: tests import the flat project files from the repository root, compute with
one thread, and share one trained digits run (`digits_run`)."""
import os
import sys
from pathlib import Path

# Before torch and numpy load, so that every `python train.py` a test starts inherits it (runs and resumes alike).
# 1 thread: on 2 idle cores 2 threads are ~10% faster, but beside another job they spin and take 5-7x as long.
THREADS = "1"
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[variable] = THREADS

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))  # in case torch was loaded before this file (a plugin)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The digits demo with instances converging on a schedule: with min_delta 1 no evaluation after an
# instance's first counts as an improvement, so every instance lasts 1 + instance_patience = 2 evaluations.
DIGITS_RUN = ["train.max_steps=20", "train.eval_every=5", "projection.min_delta=1.0", "projection.instance_patience=1",
              "train.patience=1000", "train.log_every_seconds=1000", "ccp.save_selections=true",
              "evaluation.save_embeddings=true"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The run dir of one finished run, shared by the whole session: READ it, never write into it
    (copy it with shutil.copytree to resume or damage it).

    Made by `python train.py configs/digits_ccp.yaml run_dir=<dir> ` + DIGITS_RUN above: MS-CCP on
    digits, fold 2 of 3, seed 0, 20 steps, validations at steps 5, 10, 15, 20; instance 0 converges
    at step 10 and instance 1 at step 20, each followed by a proxy re-selection. It holds last.pt,
    best.pt, config.yaml, segments.jsonl, metrics.jsonl, results.json, embeddings.npz and
    selections/*.npz (steps 0, 10, 20 and final)."""
    import train

    run_dir = tmp_path_factory.mktemp("digits_run") / "run"
    assert train.main([str(ROOT / "configs" / "digits_ccp.yaml"), f"run_dir={run_dir}", *DIGITS_RUN]) == 0
    return run_dir
