"""What a run guarantees (issue 14), each on the digits demo with a few steps: the best model is the one
tested wherever a run continues; a resume continues the same model of the same run; a collapsed model
stops the run; one process per run directory; the record of a run is kept, never rewritten; logs and
results are strict JSON; checkpoints never run code; bad input and interruptions end in one line."""
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import bookkeeping
import train
from test_train import DIGITS, FAST, ROOT, read_log, run_digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One run of 10 steps: validations at 5 and 10, the best at 5 (min_delta 1: no later one improves)."""
    root = tmp_path_factory.mktemp("trained")
    run_digits(root, "run", "train.max_steps=10")
    return root / "run"


def copy_run(trained: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(trained, tmp_path / name))


def main(run_dir: Path, *overrides: str) -> int:
    return train.main([str(DIGITS), f"run_dir={run_dir}", *FAST, *overrides])


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a run directory but the lock, which each attempt rewrites."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file() and f.name != ".lock"}


def strict_json(text: str):
    """json.loads that rejects NaN and Infinity, which Python accepts and other JSON readers do not."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"not JSON: {token}"))


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -------------------------------------------------------------------- 1: the best model is tested

def test_the_best_model_is_tested_in_a_new_run_dir_and_without_best_pt(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path, "A")
    best_val = next(r["val"]["MAP@R"] for r in read_log(run / "metrics.jsonl") if r.get("step") == 5)
    expected = train.evaluate_checkpoint(train.load_config(DIGITS, [f"run_dir={tmp_path / 'eval'}", "eval_only=true",
                                                                     f"resume={run / 'best.pt'}"]))
    capsys.readouterr()
    for name, resume in (("B", f"resume={run / 'last.pt'}"), ("A", "resume=auto")):
        if name == "A":
            (run / "best.pt").unlink()  # the best state travels in last.pt
        model = run_digits(tmp_path, name, "train.max_steps=15", resume)["models"][0]
        out = capsys.readouterr().out
        assert "no validation ran" not in out and "best validation MAP@R" in out and "at step 5" in out
        saved = strict_json((tmp_path / name / "results.json").read_text())["models"][0]
        for result in (model, saved):
            assert (result["steps"], result["best_step"], result["best_val_MAP@R"]) == (15, 5, best_val)
            assert result["test"] == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------- 2, 3: a resume continues the same models

def test_a_checkpoint_of_another_fold_or_seed_is_refused_and_leaves_nothing(trained, tmp_path, capsys,
                                                                           monkeypatch):
    target = tmp_path / "B"
    for change, said in (("fold=0", "fold 0, seed 0"), ("seed=1", "fold 2, seed 1")):
        assert main(target, "train.max_steps=10", f"resume={trained / 'last.pt'}", change) == 1
        err = one_line_error(capsys.readouterr().err)
        assert "holds the model of fold 2, seed 0" in err and f"asks for {said}" in err
        assert files(target) == {}  # nothing written: the corrected command below is not refused
    monkeypatch.setenv("HOME", str(trained.parent))
    assert main(target, "train.max_steps=10", "resume=~/run/last.pt") == 0  # ~ expands in resume too
    assert strict_json((target / "results.json").read_text())["models"][0]["best_step"] == 5


def test_a_resume_may_not_change_the_models_a_run_dir_holds(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = files(run)
    for change, saved in (("fold=0", "fold=2"), ("fold=null", "fold=2"), ("repeats=2", "repeats=1"),
                          ("seed=1", "seed=0")):
        assert main(run, "train.max_steps=20", "resume=auto", change) == 1
        err = one_line_error(capsys.readouterr().err)
        assert f"holds a run with {saved}" in err and f"config says {change.replace('null', 'None')}" in err
        assert files(run) == before


# ----------------------------------------------------------- 4: a collapsed model stops the run

@pytest.mark.parametrize("steps", [3, 5])  # found before the save between validations, and at the validation
def test_non_finite_batchnorm_statistics_stop_the_run(tmp_path, capsys, steps):
    """lr 1e9 sends BatchNorm's running_var to inf while the training loss stays finite (issue 14, item 4)."""
    run = tmp_path / "run"
    assert main(run, f"train.max_steps={steps}", "train.lr=1.0e+9") == 1
    err = one_line_error(capsys.readouterr().err)
    assert "running_var holds NaN or inf" in err and f"at step {steps}" in err
    assert f"{run / 'last.pt'} holds the last good state" in err and not (run / "results.json").exists()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 0  # the state training started from


# ---------------------------------------------------------------- 7: one process per run_dir

def test_a_run_dir_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    ready, told = os.pipe()
    holder = os.fork()  # another process (a fork: no second start of Python and torch) takes the lock
    if holder == 0:
        try:
            with bookkeeping.RunLock(run):
                os.write(told, b"locked")
                time.sleep(600)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 6) == b"locked"
        assert main(run, "train.max_steps=5") == 1
        err = one_line_error(capsys.readouterr().err)
        assert f"in use by pid {holder} on " in err
        assert not [f for f in run.rglob("*") if f.is_file() and f.name != ".lock"]  # no model folder has a file
    finally:
        os.kill(holder, signal.SIGKILL)  # no clean-up runs in the holder
        os.waitpid(holder, 0)
        os.close(ready), os.close(told)
    with bookkeeping.RunLock(run):  # the kernel released the killed process's lock
        with pytest.raises(train.ConfigError, match=f"in use by pid {os.getpid()} "):
            with bookkeeping.RunLock(run):  # the same process twice is refused as well
                pass


# --------------------------------------------------- 8: the record of a run is kept, per segment

def test_config_is_written_once_and_every_segment_is_recorded(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    config_text = (run / "config.yaml").read_text()
    first = read_log(run / "segments.jsonl")
    threads = torch.get_num_threads()
    assert [s["from_step"] for s in first] == [0] and first[0]["threads"] == threads
    assert first[0]["config"]["train"]["max_steps"] == 10 and "git_commit" in first[0]
    assert torch.load(run / "last.pt", weights_only=True)["threads"] == threads
    before = files(run)
    assert main(run, "train.max_steps=15", "resume=auto", "model.embedding_dim=16") == 1  # refused
    assert "model.embedding_dim=32" in one_line_error(capsys.readouterr().err)
    assert files(run) == before
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        assert main(run, "train.max_steps=12", "resume=auto", "train.lr=2.0e-3") == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"warning: this process computes with {other} threads, the checkpoint was written with {threads}" in out
    assert (run / "config.yaml").read_text() == config_text  # the settings the run started with
    segments = read_log(run / "segments.jsonl")
    assert segments[0] == first[0] and [s["from_step"] for s in segments] == [0, 10]
    assert (segments[1]["threads"], segments[1]["config"]["train"]["lr"]) == (other, 2.0e-3)
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["step"], last["threads"], last["config"]["train"]["lr"]) == (12, other, 2.0e-3)


# ------------------------------------------------------------------- 9: a torn or damaged log

def test_read_jsonl_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5}\n{"step": 10}\n{"step": 15, "val": {"MAP')
    assert bookkeeping.read_jsonl(path) == [{"step": 5}, {"step": 10}]
    path.write_text('{"step": 5}\n{"step": 1\n{"step": 15}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a JSON record"):
        bookkeeping.read_jsonl(path)


def test_resume_after_a_torn_log_line_and_refusal_of_a_damaged_log(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    records = read_log(run / "metrics.jsonl")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + '{"step": 7, "loss"\n' + "".join(lines[1:]))
    before = files(run)
    assert main(run, "train.max_steps=10", "resume=auto") == 1
    assert f"{run / 'metrics.jsonl'}, line 2: not a JSON record" in one_line_error(capsys.readouterr().err)
    assert files(run) == before  # no segment recorded for the refused resume
    (run / "metrics.jsonl").write_text("".join(lines) + '{"step": 15, "val": {"MAP@R": 0.')  # killed mid-append
    assert main(run, "train.max_steps=10", "resume=auto") == 0
    assert [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == records


# ----------------------------------------------------- 10: strict JSON, run_dir and its files

def test_without_validation_results_are_strict_json_and_tilde_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(Path("~/short"), "train.max_steps=3") == 0  # max_steps < eval_every: no validation
    results = strict_json((tmp_path / "short" / "results.json").read_text())
    assert (results["models"][0]["best_step"], results["models"][0]["best_val_MAP@R"]) == (None, None)
    for log in ("metrics.jsonl", "segments.jsonl"):
        for line in (tmp_path / "short" / log).read_text().splitlines():
            strict_json(line)
    assert list((tmp_path / "cwd").iterdir()) == []  # no folder named ~


def test_save_json_refuses_non_finite_numbers_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    bookkeeping.save_json({"MAP@R": 0.5}, path)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            bookkeeping.save_json({"MAP@R": bad}, path)
        with pytest.raises(ValueError):
            bookkeeping.append_jsonl({"MAP@R": bad}, tmp_path / "log.jsonl")
    # the old file kept, no .tmp left, and the refused record wrote nothing (not even an empty log)
    assert strict_json(path.read_text()) == {"MAP@R": 0.5} and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json"]


def test_an_empty_run_dir_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for overrides in ([], ["eval_only=true", f"resume={tmp_path / 'last.pt'}"]):
        assert main(Path("''"), "train.max_steps=3", *overrides) == 1
        assert "config key run_dir" in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_start_refused_after_the_lock_leaves_no_folder_behind(tmp_path, capsys):
    """The missing dataset is found after run_dir and the model folders were locked (made): they go again."""
    (tmp_path / "kept").mkdir()
    for run_dir in (tmp_path / "new" / "run", tmp_path / "kept" / "run"):
        assert train.main([str(ROOT / "configs" / "cub_ms.yaml"), f"run_dir={run_dir}",
                           f"dataset.root={tmp_path / 'no_data'}"]) == 1
        assert "CUB_200_2011" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # a folder that was there stays


def test_the_lock_removes_only_its_own_empty_folders_and_only_after_an_error(tmp_path):
    with bookkeeping.RunLock(tmp_path / "ok" / "run"):  # a run that ended well keeps its folder and lock
        pass
    with pytest.raises(RuntimeError):  # one that failed after writing keeps what it wrote
        with bookkeeping.RunLock(tmp_path / "wrote" / "run"):
            (tmp_path / "wrote" / "run" / "last.pt").write_bytes(b"state")
            raise RuntimeError
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "ok", "ok/run", "ok/run/.lock", "wrote", "wrote/run", "wrote/run/.lock", "wrote/run/last.pt"]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl"])
def test_a_folder_with_a_config_or_a_log_holds_a_run(tmp_path, capsys, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("kept\n")
    assert main(run, "train.max_steps=3") == 1
    assert "already holds a run" in one_line_error(capsys.readouterr().err)
    assert files(run) == {name: b"kept\n"}


# ---------------------------------------------------------------- 11: checkpoints never run code

class Payload:
    """Unpickling this runs open(marker, "w"): it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(trained, tmp_path, capsys):
    marker = tmp_path / "created_by_the_checkpoint"
    crafted = tmp_path / "crafted.pt"
    state = torch.load(trained / "last.pt", weights_only=True)  # a real checkpoint loads without any allowance
    torch.save({**state, "model": Payload(marker)}, crafted)
    for mode in (["eval_only=true"], ["train.max_steps=10"]):
        assert main(tmp_path / "run", f"resume={crafted}", *mode) == 1
        err = one_line_error(capsys.readouterr().err)
        assert f"refused to load {crafted}" in err and "open" in err and "could run code" in err
        assert not marker.exists()
    torch.load(crafted, weights_only=False)["model"].close()  # the payload is live: an unrestricted load runs it
    assert marker.exists()


# ----------------------------------------------------------------------- one-line errors

@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes that would grow a file past `limit` bytes fail with EFBIG, as writes to a full disk fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    last = (run / "last.pt").read_bytes()
    with file_size_limit(len(last) // 2):  # the logs fit, a checkpoint does not
        code = main(run, "train.max_steps=12", "resume=auto")
    err = one_line_error(capsys.readouterr().err)
    assert code == 1 and f"cannot write {run / 'last.pt'}: File too large" in err
    assert (run / "last.pt").read_bytes() == last and not (run / "last.pt.tmp").exists()


def test_a_full_disk_while_logging_or_locking_names_the_file(tmp_path):
    # /dev/full answers every write with ENOSPC; the lock file is a link to it
    with pytest.raises(OSError, match="cannot append to /dev/full: No space left on device$"):
        bookkeeping.append_jsonl({"step": 1}, Path("/dev/full"))
    (tmp_path / ".lock").symlink_to("/dev/full")
    with pytest.raises(OSError, match=f"cannot write the lock file {tmp_path / '.lock'}: "):
        with bookkeeping.RunLock(tmp_path):
            pass


def test_an_unwritable_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.access(run, os.W_OK):  # root writes anyway: refuse writes there as the kernel would refuse others
        real_open = Path.open

        def read_only_open(self, mode="r", *args, **kwargs):
            if run in self.parents and set(mode) & set("wax+"):
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", read_only_open)
    try:
        assert main(run, "train.max_steps=3") == 1
    finally:
        run.chmod(0o755)
    err = one_line_error(capsys.readouterr().err)
    assert "Permission denied" in err and str(run) in err


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's, for width 0
@pytest.mark.parametrize("width", [0, -1])
def test_a_backbone_without_weights_is_one_line(tmp_path, capsys, width):
    assert main(tmp_path / "run", "train.max_steps=3", f"model.backbone_kwargs={{width: {width}}}") == 1
    err = one_line_error(capsys.readouterr().err)
    assert "model.backbone_kwargs" in err and "tiny_cnn" in err


@pytest.mark.parametrize("interrupt, steps", [(13, 15), (2, 3)])  # after the checkpoint at step 10; at step 0
def test_ctrl_c_exits_130_and_names_the_command_that_continues(trained, tmp_path, capsys, monkeypatch, interrupt,
                                                               steps):
    calls = {"n": 0}
    real_step = train.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupted)
    run = tmp_path / "run"
    assert main(run, f"train.max_steps={steps}", "model.backbone_kwargs={width: 32}") == 130  # 32: the default
    command = capsys.readouterr().err.strip().splitlines()[-1].strip()
    assert command.endswith(" resume=auto") and not (run / "last.pt.tmp").exists()
    reference = torch.load(trained / "last.pt", weights_only=True)
    if interrupt > 10:  # last.pt holds step 10, exactly as the uninterrupted run
        last = torch.load(run / "last.pt", weights_only=True)
        assert last["step"] == 10 and all(torch.equal(last["model"][k], v) for k, v in reference["model"].items())
    args = shlex.split(command)  # quoted where an argument holds a space
    assert Path(args[0]).resolve() == Path(sys.executable).resolve() and args[1] == "train.py"  # this Python
    assert train.main(args[2:]) == 0  # the printed command continues the run to the end
    assert torch.load(run / "last.pt", weights_only=True)["step"] == steps
    initial = [r for r in read_log(run / "metrics.jsonl") if r["step"] == 0]
    assert initial == read_log(trained / "metrics.jsonl")[:1]  # one initial selection, as in an uninterrupted run


def test_a_kill_at_the_first_validation_between_best_pt_and_last_pt_resumes_exactly(trained, tmp_path, capsys,
                                                                                       monkeypatch):
    """best.pt is written before the log line and last.pt: a run stopped there holds best.pt, and the
    last.pt written where training started (step 0), which resume=auto continues (it refused before)."""
    real_append = train.append_jsonl

    def killed_at_first_validation(record, path):
        if "val" in record:
            raise KeyboardInterrupt  # as a kill there: nothing after this line runs
        real_append(record, path)

    monkeypatch.setattr(train, "append_jsonl", killed_at_first_validation)
    run = tmp_path / "run"
    assert main(run, "train.max_steps=10") == 130
    assert (run / "best.pt").exists() and torch.load(run / "last.pt", weights_only=True)["step"] == 0
    monkeypatch.setattr(train, "append_jsonl", real_append)
    assert main(run, "train.max_steps=10", "resume=auto") == 0
    for name in ("last.pt", "best.pt"):
        got, want = torch.load(run / name, weights_only=True), torch.load(trained / name, weights_only=True)
        assert got["step"] == want["step"] and all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_log(folder / "metrics.jsonl")]
               for folder in (run, trained)]
    assert untimed[0] == untimed[1]  # one initial selection, every validation once


def test_a_start_that_fails_before_training_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys):
    """Missing data, or a network that cannot take the data's images, is found before config.yaml or a model
    folder is written (issue 21)."""
    from test_train import make_fake_cub
    args = [str(ROOT / "configs" / "cub_ms.yaml"), f"dataset.root={tmp_path / 'cub'}", f"run_dir={tmp_path / 'run'}",
            "device=cpu", "folds=2", "fold=1", "model.backbone=tiny_cnn", "model.pretrained=null",
            "model.embedding_dim=8", "model.freeze_bn=false", "model.backbone_kwargs={in_channels: 3}",
            "data.transform=resnet", "data.crop_size=24", "data.resize=28", "data.classes_per_batch=2",
            "data.samples_per_class=2", "data.num_workers=0", "ccp.proxies_per_class=2", "ccp.pool_size=2",
            "train.max_steps=2", "train.eval_every=2", "evaluation.nmi=false"]
    assert train.main(args) == 1
    one_line_error(capsys.readouterr().err)
    assert files(tmp_path / "run") == {}
    make_fake_cub(tmp_path / "cub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # far fewer images than CUB: data.py warns
        # and a network that cannot take the transform's images (tiny_cnn takes one channel by default)
        assert train.main([arg for arg in args if "in_channels" not in arg]) == 1
        assert "tiny_cnn (backbone_kwargs {}) cannot take the images of data.transform resnet (Given groups=1" \
            in one_line_error(capsys.readouterr().err)
        assert files(tmp_path / "run") == {}
        assert train.main(args) == 0  # the same command, once the data is there
    assert (tmp_path / "run" / "results.json").exists()


def test_the_progress_line_shows_days_and_both_ends_of_a_run(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 100.0, 200.0, 200.0])  # construction, first step, 100 s later; then a second line
    monkeypatch.setattr(bookkeeping.time, "time", lambda: next(clock))
    progress = bookkeeping.Progress(2_500_000, 0.0, 32, "", steps_to_stop=lambda step: 60 * 250 - step % 250)
    progress.update(1000, 0.5, "val")
    progress.update(1100, 0.5, "val")  # 1 step/s: max_steps is 2,498,900 s away = 28d 22:08:20
    line = capsys.readouterr().out.splitlines()[-1]
    assert "ends in 04:08:20 (if no new best) to 28d 22:08:20 (max_steps)" in line, line
    # a resumed run before its first step has no loss yet: shown as --, not as nan
    resumed = bookkeeping.Progress(600, 0.0, 32, "", steps_to_stop=lambda step: 0)
    resumed.update(460, float("nan"), "resumed at step 460", force=True)
    assert capsys.readouterr().out.startswith("step    460/600 | loss   --   |")


def test_the_report_hint_names_the_interpreter_that_ran(trained, capsys):
    results = json.loads((trained / "results.json").read_text())
    bookkeeping.print_results(train.load_config(DIGITS), results, 1, 1, trained)
    hint = capsys.readouterr().out.splitlines()[-1]
    command = shlex.split(hint.split(": ", 1)[1])
    assert Path(command[0]).resolve() == Path(sys.executable).resolve() and command[1:] == ["report.py", str(trained)]


# ------------------------------------------- issue 22: nothing a user already has is ever lost

def test_resume_auto_refuses_to_start_afresh_over_a_finished_run_without_last_pt(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "last.pt").unlink()  # copied without it, or deleted
    before = files(run)
    assert main(run, "train.max_steps=10", "resume=auto") == 1
    err = one_line_error(capsys.readouterr().err)
    assert f"{run} holds results.json, best.pt, metrics.jsonl but no last.pt" in err
    assert files(run) == before


def test_resume_auto_does_not_start_afresh_where_the_training_continued_another_checkpoint(trained, tmp_path,
                                                                                          capsys):
    """A run continued from elsewhere and stopped before its first last.pt: resume=auto names that checkpoint."""
    run = tmp_path / "continued"
    run.mkdir()
    config = yaml.safe_load((trained / "config.yaml").read_text())
    bookkeeping.record_segment(run, {**config, "resume": str(trained / "last.pt")}, 30, resolved={})
    before = files(run)
    assert main(run, "resume=auto") == 1
    err = one_line_error(capsys.readouterr().err)
    assert f"{run} has no last.pt, but its training continued {trained / 'last.pt'} at step 30" in err
    assert files(run) == before


def test_a_checkpoint_of_another_run_is_not_continued_into_a_run_dir_that_holds_one(trained, tmp_path, capsys):
    other = copy_run(trained, tmp_path, "other")
    run = copy_run(trained, tmp_path, "run")
    before = files(run)
    assert main(run, "train.max_steps=15", f"resume={other / 'last.pt'}") == 1
    assert "would mix two runs" in one_line_error(capsys.readouterr().err)
    assert files(run) == before
    assert main(run, "train.max_steps=15", f"resume={run / 'last.pt'}") == 0  # its own last.pt continues it


def test_a_run_inside_a_running_run_dir_is_refused(tmp_path, capsys):
    """A fold folder of a fold run is locked with the run: a second process cannot train in it."""
    with bookkeeping.RunLock(tmp_path / "X" / "fold2"):  # a single-fold run in X/fold2 holds its lock
        assert main(tmp_path / "X", "train.max_steps=5", "fold=null") == 1
        err = one_line_error(capsys.readouterr().err)
        assert f"run_dir {tmp_path / 'X' / 'fold2'} is in use by pid {os.getpid()}" in err
    assert files(tmp_path / "X") == {}


def test_a_validation_fold_of_one_class_is_refused_before_training(tmp_path, capsys):
    assert main(tmp_path / "run", "train.max_steps=5", "folds=6", "fold=0") == 1  # 6 training digits, 6 folds
    err = one_line_error(capsys.readouterr().err)
    assert "config key folds: fold 0 of 6 validates on 1 class" in err and files(tmp_path / "run") == {}


@pytest.mark.parametrize("damage", ["no config", "other shapes", "folds"])
def test_eval_only_of_an_unusable_checkpoint_is_one_line(trained, tmp_path, capsys, damage):
    state = torch.load(trained / "best.pt", weights_only=True)
    if damage == "no config":
        del state["config"]["model"]
    elif damage == "other shapes":
        state["model"] = {k: v[..., :1] if v.dim() else v for k, v in state["model"].items()}
    path = tmp_path / "best.pt"
    torch.save(state, path)
    folds = ["folds=2", "fold=null"] if damage == "folds" else []  # fold 2 of a 3-fold run: its folds come from the checkpoint
    code = main(tmp_path / "eval", "eval_only=true", f"resume={path}", *folds)
    if damage == "folds":
        assert code == 0
    else:
        assert code == 1 and "is not a checkpoint this version of train.py can evaluate" in one_line_error(
            capsys.readouterr().err)


def test_checkpoints_and_segments_record_the_library_versions_and_a_changed_setting_is_named(trained, tmp_path,
                                                                                            capsys):
    import torchvision
    run = copy_run(trained, tmp_path)
    assert main(run, "train.max_steps=15", "resume=auto", "loss.params={alpha: 3.0, beta: 40.0, base: 0.5}") == 0
    out = capsys.readouterr().out
    assert "warning: this segment runs with loss.params={'alpha': 3.0, 'beta': 40.0, 'base': 0.5}" in out
    last = torch.load(run / "last.pt", weights_only=True)
    segment = read_log(run / "segments.jsonl")[-1]
    for versions in (last["versions"], segment["versions"]):
        assert versions["torch"] == torch.__version__ and versions["torchvision"] == torchvision.__version__
