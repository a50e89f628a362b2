"""config.py's checks, made before any work starts: every key's valid range, friendlier parsing
(1e-3 as a float, duplicate keys refused, a section given a value), one-line errors naming the
file, the key, the value and what is valid. One test per kind of error, its variants parametrized."""
import contextlib
import copy
import io
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import pytest

import config
import train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_ccp.yaml"
# Keys whose values are free text (a folder, a file or a weight name): no range to check.
FREE_TEXT = {"dataset.root", "model.pretrained"}


def error_of(overrides: list[str], path: Path = DIGITS) -> str:
    with pytest.raises(config.ConfigError) as info:
        train.load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message  # one line: main() prints it as it is
    return message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def value_of(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


# ------------------------------------------------------------------------------ ranges, one per key

OUT_OF_RANGE = [  # (override, key, what the message says is valid, the value as shown)
    ("train.lr=0", "train.lr", "a finite number > 0", "0"),
    ("train.lr=nan", "train.lr", "a finite number > 0", "nan"),  # the string nan, read as a float
    (f"train.lr={10**400}", "train.lr", "a finite number > 0", str(10**400)),  # an int beyond floats
    ("train.eps=0.0", "train.eps", "a finite number > 0", "0.0"),
    ("train.clip_norm=-1", "train.clip_norm", "a finite number > 0", "-1"),
    ("train.clip_value=0", "train.clip_value", "a finite number > 0", "0"),
    ("train.weight_decay=-1.0e-4", "train.weight_decay", "a finite number >= 0", "-0.0001"),
    ("train.log_every_seconds=-1", "train.log_every_seconds", "a finite number >= 0", "-1"),
    ("train.max_steps=0", "train.max_steps", "an integer >= 1", "0"),
    ("train.eval_every=0", "train.eval_every", "an integer >= 1", "0"),
    ("train.patience=0", "train.patience", "an integer >= 1", "0"),
    ("baseline.proxy_lr_multiplier=0", "baseline.proxy_lr_multiplier", "a finite number > 0", "0"),
    ("baseline.warmup_steps=-1", "baseline.warmup_steps", "an integer >= 0", "-1"),
    ("baseline.xbm_memory_batches=0", "baseline.xbm_memory_batches", "an integer >= 1", "0"),
    ("baseline.xbm_start_step=-1", "baseline.xbm_start_step", "an integer >= 0", "-1"),
    ("ccp.pair_weight=-0.1", "ccp.pair_weight", "a finite number >= 0", "-0.1"),
    ("ccp.proxy_weight=.inf", "ccp.proxy_weight", "a finite number >= 0", "inf"),
    ("ccp.proxies_per_class=0", "ccp.proxies_per_class", "an integer >= 1", "0"),
    ("ccp.pool_size=0", "ccp.pool_size", "an integer >= 1", "0"),
    ("projection.lam=.nan", "projection.lam", "a finite number >= 0", "nan"),
    ("projection.decay=-0.5", "projection.decay", "a finite number >= 0", "-0.5"),
    ("projection.min_delta=.inf", "projection.min_delta", "a finite number >= 0", "inf"),
    ("projection.instance_patience=0", "projection.instance_patience", "an integer >= 1", "0"),
    ("projection.min_evaluations=0", "projection.min_evaluations", "an integer >= 1", "0"),
    ("evaluation.recall_ks=[0]", "evaluation.recall_ks", "a non-empty list of distinct integers >= 1", "[0]"),
    ("evaluation.recall_ks=[]", "evaluation.recall_ks", "a non-empty list of distinct integers >= 1", "[]"),
    ("evaluation.recall_ks=[1, 1]", "evaluation.recall_ks", "a non-empty list of distinct integers >= 1", "[1, 1]"),
    ("evaluation.recall_ks=[1.5]", "evaluation.recall_ks", "a non-empty list of distinct integers >= 1", "[1.5]"),
    ("data.crop_size=0", "data.crop_size", "an integer >= 1", "0"),
    ("data.resize=0", "data.resize", "an integer >= 1", "0"),
    ("data.classes_per_batch=0", "data.classes_per_batch", "an integer >= 1", "0"),
    ("data.samples_per_class=0", "data.samples_per_class", "an integer >= 1", "0"),
    ("data.eval_batch_size=0", "data.eval_batch_size", "an integer >= 1", "0"),
    ("data.num_workers=-1", "data.num_workers", "an integer >= 0", "-1"),
    ("model.embedding_dim=0", "model.embedding_dim", "an integer >= 1", "0"),
    ("seed=-1", "seed", "an integer in [0, 2**32)", "-1"),
    (f"seed={2**32}", "seed", "an integer in [0, 2**32)", str(2**32)),
    ("folds=1", "folds", "an integer >= 2", "1"),
    ("repeats=0", "repeats", "an integer >= 1", "0"),
    ("run_dir=''", "run_dir", "a non-empty path", "''"),
    ("resume=' '", "resume", "a checkpoint path, auto or null", "' '"),
    ("device=foo", "device", "auto, cpu, cuda or cuda:N", "'foo'"),
    ("device=cuda:x", "device", "auto, cpu, cuda or cuda:N", "'cuda:x'"),
    ("train.betas=[0.9]", "train.betas", "exactly 2 numbers (beta1, beta2), each in [0, 1)", "[0.9]"),
    ("train.betas=[1.0, 0.999]", "train.betas", "exactly 2 numbers (beta1, beta2), each in [0, 1)", "[1.0, 0.999]"),
]


@pytest.mark.parametrize("override, key, valid, shown", OUT_OF_RANGE, ids=[c[0][:40] for c in OUT_OF_RANGE])
def test_out_of_range_value_names_file_key_range_and_value(override, key, valid, shown):
    assert error_of([override]) == f"{DIGITS}: config key {key}: expected {valid}, got {shown}"


ACCEPTED = [  # the smallest (or largest) valid values, and valid combinations: what the config then holds
    (["train.lr=1.0e-300"], "train.lr", 1e-300),
    (["train.weight_decay=0"], "train.weight_decay", 0),
    (["train.log_every_seconds=0.0"], "train.log_every_seconds", 0.0),
    (["train.max_steps=1"], "train.max_steps", 1),
    (["train.betas=[0.0, 0.999999]"], "train.betas", [0.0, 0.999999]),
    (["baseline.warmup_steps=0"], "baseline.warmup_steps", 0),
    (["baseline.xbm_start_step=0"], "baseline.xbm_start_step", 0),
    (["baseline.xbm_memory_batches=1"], "baseline.xbm_memory_batches", 1),
    (["projection.lam=0"], "projection.lam", 0),
    (["projection.decay=0.0"], "projection.decay", 0.0),
    (["projection.min_delta=0"], "projection.min_delta", 0),
    (["ccp.pair_weight=0"], "ccp.pair_weight", 0),
    (["ccp.proxy_weight=0"], "ccp.pair_weight", 0.1),  # one loss weight 0 is enough
    (["data.num_workers=0"], "data.num_workers", 0),
    (["data.num_workers=7"], "data.num_workers", 7),
    (["data.num_workers=auto"], "data.num_workers", "auto"),
    (["model.channels_last=auto"], "model.channels_last", "auto"),
    (["model.channels_last=true"], "model.channels_last", True),
    (["model.channels_last=false"], "model.channels_last", False),
    (["model.fold_bn=auto"], "model.fold_bn", "auto"),
    (["model.fold_bn=false"], "model.fold_bn", False),
    (["evaluation.recall_ks=[1]"], "evaluation.recall_ks", [1]),
    (["seed=0"], "seed", 0),
    ([f"seed={2**32 - 1}"], "seed", 2**32 - 1),
    (["folds=2", "fold=1"], "folds", 2),
    (["device=cuda:1"], "device", "cuda:1"),
    (["device=cpu"], "device", "cpu"),
    (["device=auto"], "device", "auto"),
    (["device=cuda"], "device", "cuda"),
    (["data.transform=resnet", "data.crop_size=256", "data.resize=256"], "data.crop_size", 256),
    (["data.crop_size=300"], "data.transform", "digits"),  # digits images are not cropped: no bound
    (["eval_only=true", "resume=runs/x/best.pt"], "resume", "runs/x/best.pt"),
]


@pytest.mark.parametrize("overrides, key, value", ACCEPTED, ids=[" ".join(c[0])[:50] for c in ACCEPTED])
def test_valid_edge_values_and_combinations_are_accepted(overrides, key, value):
    assert value_of(train.load_config(DIGITS, overrides), key) == value


def test_every_key_of_defaults_has_a_rule_and_every_rule_a_key():
    """Numbers and lists have a range, strings a choice or a range; no rule names a key that does not exist."""
    flat = config.flatten(config.DEFAULTS)
    unchecked = [key for key, value in flat.items()
                 if not isinstance(value, (bool, dict)) and config.AUTO.get(key) is not bool
                 and key not in config.RANGES and key not in config.CHOICES and key not in FREE_TEXT and key != "fold"]
    assert unchecked == []
    assert [key for key in (*config.RANGES, *config.CHOICES) if key not in flat] == []


def test_the_defaults_themselves_are_valid():
    cfg = config.validate_config(copy.deepcopy(config.DEFAULTS))
    assert cfg == config.DEFAULTS


@pytest.mark.parametrize("override, key, choices", [
    ("train.adam_epsilon=pytorch", "train.adam_epsilon", "keras, torch"),
    ("data.sampler=random", "data.sampler", "rounds, independent"),
    ("evaluation.ensemble=mean", "evaluation.ensemble", "authors, mlrc"),
    ("ccp.proxy_init=kmeans", "ccp.proxy_init", "kcenter, random"),
    ("data.transform=imagenet", "data.transform", "bninception, resnet, digits"),
])
def test_a_value_outside_the_choices_lists_them(override, key, choices):
    value = override.split("=")[1]
    assert error_of([override]).endswith(f"config key {key}: {value!r} is not one of {choices}")


CONFLICTS = [  # keys valid one by one, refused together
    (["ccp.pair_weight=0", "ccp.proxy_weight=0.0"],
     "config keys ccp.pair_weight and ccp.proxy_weight are both 0: the loss would be 0"),
    (["data.transform=resnet", "data.crop_size=257", "data.resize=256"],
     "config key data.crop_size: expected at most data.resize (256), got 257"),
    (["fold=3"], "config key fold: 3 is outside 0..2 (folds: 3)"),
    (["eval_only=true", "resume=auto"], "eval_only: true needs resume: PATH, the checkpoint to evaluate, got resume: "
                                        "auto (auto is for continuing a training run in run_dir)"),
    (["eval_only=true"], "eval_only: true needs resume: PATH, the checkpoint to evaluate, got resume: null"),
]


@pytest.mark.parametrize("overrides, message", CONFLICTS, ids=[" ".join(c[0]) for c in CONFLICTS])
def test_keys_that_contradict_each_other_are_refused(overrides, message):
    assert error_of(overrides).endswith(message)


@pytest.mark.parametrize("override, message", [
    ("train.lr=0", "config key train.lr: expected a finite number > 0, got 0"),
    ("loss.params={alpha: .nan}", "config key loss.params.alpha: expected a finite number, got nan"),
    ("model.backbone_kwargs={width: 3e1}", "config key model.backbone_kwargs.width: expected int, got '3e1' (str); "
                                           "write 30"),
], ids=["a range", "a loss parameter", "a backbone parameter"])
def test_a_refused_value_stops_main_before_any_work(tmp_path, capsys, override, message):
    assert train.main([str(DIGITS), f"run_dir={tmp_path / 'run'}", override]) == 1
    assert capsys.readouterr().err == f"error: {DIGITS}: {message}\n"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ keyword-argument values

# (overrides, the mapping, what it then holds): where the default is a number, the rules of a top-level key
KWARG_VALUES = [
    (["loss.params={alpha: 4e1, beta: 1e-1, base: 1}"], "loss.params", {"alpha": 40.0, "beta": 0.1, "base": 1}),
    (["method=softtriple", "baseline.params={la: 2E1, centers_per_class: 5}"], "baseline.params",
     {"la": 20.0, "centers_per_class": 5}),
    (["model.backbone_kwargs={width: 16}"], "model.backbone_kwargs", {"width": 16}),
    # a default that is not a number (a bool, a string, None): the value is left as it is
    (["method=proxy_anchor", "baseline.params={push_over_all_proxies: true}"], "baseline.params",
     {"push_over_all_proxies": True}),
]


@pytest.mark.parametrize("overrides, key, held", KWARG_VALUES, ids=[" ".join(c[0])[:50] for c in KWARG_VALUES])
def test_a_keyword_argument_with_a_numeric_default_is_read_as_a_number(overrides, key, held):
    """YAML 1.1 reads 4e1 as the string '4e1': passed on, it failed at step 1 and config.yaml kept it."""
    params = value_of(train.load_config(DIGITS, overrides), key)
    assert params == held and [type(v) for v in params.values()] == [type(v) for v in held.values()]


@pytest.mark.parametrize("overrides, message", [
    (["loss.params={alpha: .nan}"], "config key loss.params.alpha: expected a finite number, got nan"),
    (["loss.params={alpha: nan}"], "config key loss.params.alpha: expected a finite number, got nan"),
    (["loss.params={beta: -.inf}"], "config key loss.params.beta: expected a finite number, got -inf"),
    (["loss.params={beta: 1e999}"], "config key loss.params.beta: expected a finite number, got inf"),
    (["loss.params={alpha: true}"], "config key loss.params.alpha: expected float, got True (bool)"),
    (["loss.params={alpha: fast}"], "config key loss.params.alpha: expected float, got 'fast' (str)"),
    (["model.backbone_kwargs={width: 2.5}"], "config key model.backbone_kwargs.width: expected int, got 2.5 (float)"),
    (["method=softtriple", "baseline.params={centers_per_class: 1e1}"],
     "config key baseline.params.centers_per_class: expected int, got '1e1' (str); write 10"),
], ids=["nan", "the string nan", "-inf", "1e999", "a bool", "a word", "a float for an int", "1e1 for an int"])
def test_a_keyword_argument_that_is_not_a_finite_number_names_its_key(overrides, message):
    assert error_of(overrides) == f"{DIGITS}: {message}"


@pytest.mark.parametrize("overrides, message", [
    (["method=proxynca++", "baseline.params={logits: .nan}"],
     "config key baseline.params.logits: expected str, got nan (float)"),
    (["method=proxy_anchor", "baseline.params={push_over_all_proxies: [1.0, .inf]}"],
     "config key baseline.params.push_over_all_proxies: expected bool, got [1.0, inf] (list)"),
    # BN-Inception's fold_bn is model.fold_bn's: build_model would override a second setting silently
    (["model.backbone=bninception", "model.backbone_kwargs={fold_bn: false}"],
     "config key model.backbone_kwargs.fold_bn: set model.fold_bn (true, false or auto) instead"),
    (["method=proxy_anchor", "baseline.params={push_over_all_proxies: maybe}"],
     "config key baseline.params.push_over_all_proxies: expected bool, got 'maybe' (str)"),
    # a value the module refuses: found by building it once while the config is read
    (["method=softtriple", "baseline.params={center_regularizer: bogus}"],
     "config key baseline.params: SoftTriple: expected center_regularizer to be one of ('normalized', 'raw'), "
     "got 'bogus'"),
], ids=["nan for a string", "a list for a bool", "fold_bn of model.fold_bn", "a word for a bool",
        "a word the module refuses"])
def test_a_bool_or_string_keyword_argument_takes_its_type_and_the_module_its_values(overrides, message):
    """A truthy string passed for a bool ran as True; a refused choice stopped the run after config.yaml."""
    assert error_of(overrides) == f"{DIGITS}: {message}"


# ------------------------------------------------------------------------------ friendlier parsing

def test_float_written_without_a_dot_is_read_as_a_float(tmp_path):
    """YAML 1.1 reads 1e-3 as a string: config.py reads it as the float a user meant."""
    cfg = train.load_config(DIGITS, ["train.lr=1e-3", "train.eps=1E-8"])
    assert (cfg["train"]["lr"], cfg["train"]["eps"]) == (0.001, 1e-8)
    path = write(tmp_path, f"base: {DIGITS}\ntrain:\n  lr: 5e-4\n  betas: [9e-1, 0.999]\nprojection:\n  lam: 2e-4\n")
    cfg = train.load_config(path)
    assert (cfg["train"]["lr"], cfg["train"]["betas"], cfg["projection"]["lam"]) == (5e-4, [0.9, 0.999], 2e-4)
    assert all(type(v) is float for v in (cfg["train"]["lr"], *cfg["train"]["betas"], cfg["projection"]["lam"]))


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "config key train.lr: expected float, got 'fast' (str)"),
    # an integer key is not read from a float: the message says what to write
    ("train.max_steps=1e5", "config key train.max_steps: expected int, got '1e5' (str); write 100000"),
    ("train.betas=0.9", "config key train.betas: expected a list of numbers, got 0.9 (float)"),
    ("train.betas=[a, 0.9]", "config key train.betas: expected a list of numbers, got ['a', 0.9] (list)"),
    # the keys that take auto besides their type
    ("model.channels_last=sometimes", "config key model.channels_last: expected bool or auto, got 'sometimes' (str)"),
    ("model.channels_last=1", "config key model.channels_last: expected bool or auto, got 1 (int)"),
    ("model.fold_bn=yes please", "config key model.fold_bn: expected bool or auto, got 'yes please' (str)"),
    ("data.num_workers=sometimes", "config key data.num_workers: expected int or auto, got 'sometimes' (str)"),
    ("data.num_workers=true", "config key data.num_workers: expected int or auto, got True (bool)"),
])
def test_a_value_of_the_wrong_type_names_the_type_expected(override, message):
    assert error_of([override]).endswith(message)


@pytest.mark.parametrize("where, text, message", [
    ("file", "train:\n  lr: 0.1\nseed: 1\ntrain:\n  max_steps: 5\n",
     "duplicate key 'train' at line 5 (first at line 2)"),
    ("file", "train:\n  lr: 0.1\n  eps: 1.0e-8\n  lr: 0.2\n", "duplicate key 'lr' at line 5 (first at line 3)"),
    ("override", "loss.params={alpha: 2, alpha: 3}", "duplicate key 'alpha' at line 1 (first at line 1)"),
], ids=["file, a section", "file, a key in a section", "override"])
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path, where, text, message):
    if where == "file":  # the file's first line names its base: the lines counted are the file's own
        path = write(tmp_path, f"base: {DIGITS}\n{text}")
        assert error_of([], path) == f"{path}: {message}"
    else:
        assert error_of([text]) == f"override {text!r}: {message}"


def test_merge_keys_may_still_be_overridden():
    assert config.parse_yaml("d:\n  <<: {b: 1, c: 2}\n  b: 3\n") == {"d": {"b": 3, "c": 2}}


def billion_laughs(mapping: bool) -> list[str]:
    """9 levels, each 9 aliases of the level below: 9**9 (387 million) values from under 1 KB."""
    lines, below = [], ["lol"] * 9
    for name in "abcdefghi":
        if mapping:
            lines.append(f"{name}: &{name} {{" + ", ".join(f"x{i}: {v}" for i, v in enumerate(below)) + "}")
        else:
            lines.append(f"- &{name} [" + ", ".join(below) + "]")
        below = [f"*{name}"] * 9
    return lines


def main_with_limits(argv: list[str], memory: int = 2**28, seconds: float = 60) -> tuple:
    """train.main(argv) in a forked child whose address space may grow by `memory` bytes only: its
    exit code (or the exception it raised), stderr and the seconds main took; killed after `seconds`."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)

    def child():
        in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (in_use + memory, hard))
        err, start = io.StringIO(), time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                outcome = train.main(argv)
        except BaseException as exc:  # MemoryError, RecursionError: what the test is about
            outcome = type(exc).__name__
        send.send((outcome, err.getvalue(), time.perf_counter() - start))

    process = fork.Process(target=child)
    process.start()
    try:
        if not receive.poll(seconds):
            pytest.fail(f"train.main({argv}) still running after {seconds} s")
        return receive.recv()
    finally:
        process.kill()
        process.join()


LAUGHS = {  # the routes by which the expanded aliases reached memory: (the YAML, the first anchor's line)
    "an error message's repr": ("train:\n  betas:\n" + "".join(f"  {line}\n" for line in billion_laughs(False)), 4),
    "the segments.jsonl dump": ("model:\n  backbone: bninception\n  backbone_kwargs:\n    fold_bn:\n"
                                + "".join(f"    {line}\n" for line in billion_laughs(False)), 6),
    "flattening": ("train:\n" + "".join(f"  {line}\n" for line in billion_laughs(True)), 3),
    "a mapping inside itself": ("a: &a {b: *a}\n", 2),  # flattening it raised RecursionError
}


@pytest.mark.parametrize("route", LAUGHS)
def test_yaml_anchors_and_aliases_are_refused_fast_and_in_little_memory(tmp_path, route):
    """A 1 KB billion laughs passed 5 GB within a minute; refused now within 256 MB (no timed assertion:
    the old code ran out of that memory, the new one answers at once)."""
    text, line = LAUGHS[route]
    path = write(tmp_path, f"base: {DIGITS}\n{text}")
    assert len(text) < 1024
    outcome, err, _ = main_with_limits([str(path), f"run_dir={tmp_path / 'run'}"])
    assert (outcome, err) == (1, f"error: {path}: YAML aliases/anchors are not supported in configs; "
                                 f"write the values out (anchor &a at line {line})\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("loss.params=&a {b: *a}",
     "YAML aliases/anchors are not supported in configs; write the values out (anchor &a at line 1)"),
    ("loss.params={alpha: *a}",
     "YAML aliases/anchors are not supported in configs; write the values out (alias *a at line 1)"),
    ("loss.params={alpha: " + "[" * sys.getrecursionlimit() + "]" * sys.getrecursionlimit() + "}",
     "YAML nested too deeply to read (a config needs a few levels)"),  # was RecursionError
], ids=["an anchor", "an alias", "deep nesting"])
def test_an_override_with_an_alias_or_deep_nesting_is_one_line(override, message):
    assert error_of([override]) == f"override {override!r}: {message}"


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    path = write(tmp_path, "train:\n  lr: [0.1\n")
    assert error_of([], path).startswith(f"{path}: not valid YAML: line 3, column 1: ")


@pytest.mark.parametrize("given, ending", [
    ("dataset=digits", "config key dataset is a section, not a value: set one of dataset.name, dataset.root; "
                       "did you mean dataset.name=digits?"),
    ("model=resnet50", "did you mean model.backbone=resnet50?"),
    ("loss=triplet", "did you mean loss.name=triplet?"),
    ("evaluation=5", "config key evaluation is a section, not a value: set one of "  # no key takes 5: all listed
     + ", ".join(k for k in config.flatten(config.DEFAULTS) if k.startswith("evaluation."))),
    ("file: dataset: digits", "did you mean dataset.name=digits?"),
], ids=["dataset", "model", "loss", "evaluation", "in a file"])
def test_a_section_given_a_value_suggests_its_key(tmp_path, given, ending):
    if given.startswith("file: "):
        path = write(tmp_path, f"base: {DIGITS}\n{given.removeprefix('file: ')}\n")
        message = error_of([], path)
    else:
        path, message = DIGITS, error_of([given])
    assert message.startswith(f"{path}: ") and message.endswith(ending)


def test_a_dotted_key_in_a_file_is_refused_not_ignored(tmp_path):
    path = write(tmp_path, f"base: {DIGITS}\ntrain.lr: 0.5\n")
    assert error_of([], path) == (f"{path}: config key 'train.lr': write sections nested (train: ...), "
                                  f"dotted keys are for key=value overrides")


@pytest.mark.parametrize("base, shown", [("5", "5 (int)"), ("[a.yaml]", "['a.yaml'] (list)"), ("''", "'' (str)")])
def test_base_that_is_not_a_path_is_a_one_line_error(tmp_path, base, shown):
    path = write(tmp_path, f"base: {base}\nseed: 1\n")
    assert error_of([], path) == f"{path}: base: expected the path of a config file, got {shown}"


def test_an_unknown_key_names_the_closest_valid_one_and_its_file(tmp_path):
    with pytest.raises(config.ConfigError, match=r"train\.max_stpes.*did you mean train\.max_steps"):
        train.load_config(DIGITS, ["train.max_stpes=10"])
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {DIGITS}\nprojection:\n  lamda: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"typo\.yaml.*projection\.lamda.*did you mean projection\.lam"):
        train.load_config(path)
