"""Reading and validating a run's YAML config: `base:` files, `key=value` overrides, and checks.

DEFAULTS lists every key with the paper's value (PAPER.md §2, §7; repeats, the warm-up and XBM's memory,
which the paper sets per dataset, are set in configs/base_*.yaml and the baselines' configs); the rest turns a
file and overrides into a validated config, before any work starts: every key known (an unknown one
gets a did-you-mean), every value of its type, among its CHOICES or within its RANGES, keyword-argument
mappings checked against the signature of the function they are passed to (names, and the values of
numeric parameters), no NaN or infinity anywhere, no YAML anchors or aliases, and the few rules that
tie keys together. Errors are ConfigError (a ValueError), one line naming the file, the key, the
value and what is valid.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import yaml

import data
import losses
import model

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
        "name": "sop",  # cub | cars | sop | inshop | digits | folder (your own images: docs/DATASETS.md)
        "root": "data",  # the folder the archive was extracted into; for folder, the folder of class folders
    },
    "data": {
        "transform": "bninception",  # bninception | resnet | digits (data.build_transform)
        "crop_size": 227,
        "resize": 256,
        "classes_per_batch": 8,  # batch 32 = 8 classes x 4 images (PAPER.md §7)
        "samples_per_class": 4,
        "eval_batch_size": 128,
        # decode the validation images once (resize and crop) and keep them in memory as uint8 crops, N x 3 x
        # crop_size^2 bytes (2.3 GB for an SOP fold), instead of at every validation: the same bits (data.decoded)
        "cache_validation": True,
        # DataLoader workers; auto: the CPU cores this process may use / the processes torchrun starts on this
        # node, minus one for the main process, within [0, 16] (build.loader_workers)
        "num_workers": "auto",
        "sampler": "rounds",  # rounds: every class once per shuffled round, as the authors (PAPER.md §7) | independent
        # cycle: each class's shuffled image queue restarts every ceil(mean images per class / m) rounds, leftovers
        # dropped, as the authors' samplers (batches, and k-center's candidates with m = 1) | empty: refilled when used up
        "refill": "cycle",
    },
    "model": {
        "backbone": "bninception",  # bninception | resnet50 | tiny_cnn | mlp
        "pretrained": "imagenet",  # a path, a known name (model.py), or null for random weights
        "embedding_dim": 128,
        "pooling": "avg",  # avg | max
        "freeze_bn": True,  # BatchNorm gamma, beta and running statistics frozen (MLRC)
        "backbone_kwargs": {},  # keyword arguments of the backbone, e.g. {in_channels: 3} for tiny_cnn
        # weights and images in channels_last (NHWC) memory: the same model, another speed; auto: true on a CPU
        # (faster there), false on CUDA (slower there: docs/gpu.md) (build.on_cpu)
        "channels_last": "auto",
        # BN-Inception's frozen BatchNorms folded into their convs: the same model, another speed (fewer passes
        # over the activations, more small ops); auto: true on a CPU (faster there), false on CUDA (each op is a
        # launch there: docs/gpu.md) (build.on_cpu)
        "fold_bn": "auto",
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
        "xbm_include_batch": True,  # the batch is stored before its loss, so it meets its own copy (the authors')
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

# Keys whose default is null, with the type they take otherwise.
NULLABLE = {"resume": str, "fold": int, "model.pretrained": str}
# Keys whose default is "auto" (resolved per device or machine by build.py), with the type they take otherwise.
AUTO = {"model.channels_last": bool, "model.fold_bn": bool, "data.num_workers": int}
# Keys that hold keyword arguments of a function chosen by another key: checked against its signature.
KWARGS_KEYS = ("loss.params", "baseline.params", "model.backbone_kwargs")
KWARGS_LEAVES = {key.rsplit(".", 1)[1] for key in KWARGS_KEYS}
CHOICES = {
    "method": ("ccp", "baseline", "proxy_anchor", "proxynca++", "softtriple", "xbm"),
    "normalization": tuple(losses.NORMALIZATIONS),
    "dataset.name": ("cub", "cars", "sop", "inshop", "digits", "folder"),
    "data.transform": ("bninception", "resnet", "digits"),
    "data.sampler": tuple(data.SAMPLER_ORDERS),
    "data.refill": tuple(data.QUEUE_REFILLS),
    "loss.name": tuple(losses.LOSSES),
    "ccp.proxy_init": ("kcenter", "random"),
    "model.pooling": tuple(model.POOLINGS),
    "model.backbone": tuple(model.BACKBONES),
    "train.adam_epsilon": ("keras", "torch"),
    "evaluation.ensemble": ("authors", "mlrc"),
}
PROXY_BASELINES = {
    "proxy_anchor": losses.ProxyAnchor,
    "proxynca++": losses.ProxyNCAPlusPlus,
    "softtriple": losses.SoftTriple,
}


class Range(NamedTuple):
    """The valid values of a key: a test of a value already of the key's type, and its description."""
    valid: Callable[[Any], bool]
    text: str


def finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range
        return False


def at_least(low: int) -> Range:
    return Range(lambda v: v >= low, f"an integer >= {low}")


POSITIVE = Range(lambda v: finite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Range(lambda v: finite(v) and v >= 0, "a finite number >= 0")
# The valid values of every key that is neither boolean, nor a choice, nor free text (a path, a name).
RANGES = {
    # 32 bits, so that the seeds derived from it (seed + repeat, seed + 1, ...) fit torch's 64
    "seed": Range(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "run_dir": Range(lambda v: v.strip() != "", "a non-empty path"),
    "resume": Range(lambda v: v.strip() != "", "a checkpoint path, auto or null"),
    "device": Range(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "folds": at_least(2),  # a fold validates on one block of classes and trains on the others (PAPER.md §7)
    "repeats": at_least(1),
    "data.crop_size": at_least(1),
    "data.resize": at_least(1),
    "data.classes_per_batch": at_least(1),
    "data.samples_per_class": at_least(1),
    "data.eval_batch_size": at_least(1),
    "data.num_workers": at_least(0),
    "model.embedding_dim": at_least(1),
    "ccp.pair_weight": NON_NEGATIVE,
    "ccp.proxy_weight": NON_NEGATIVE,
    "ccp.proxies_per_class": at_least(1),
    "ccp.pool_size": at_least(1),
    "projection.lam": NON_NEGATIVE,
    "projection.decay": NON_NEGATIVE,
    "projection.instance_patience": at_least(1),
    "projection.min_evaluations": at_least(1),
    "projection.min_delta": NON_NEGATIVE,
    "baseline.proxy_lr_multiplier": POSITIVE,
    "baseline.warmup_steps": at_least(0),
    "baseline.xbm_memory_batches": at_least(1),
    "baseline.xbm_start_step": at_least(0),
    "train.max_steps": at_least(1),
    "train.eval_every": at_least(1),
    "train.patience": at_least(1),
    "train.lr": POSITIVE,
    "train.betas": Range(lambda v: len(v) == 2 and all(finite(b) and 0 <= b < 1 for b in v),
                         "exactly 2 numbers (beta1, beta2), each in [0, 1)"),
    "train.eps": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.clip_norm": POSITIVE,
    "train.clip_value": POSITIVE,
    "train.log_every_seconds": NON_NEGATIVE,
    "evaluation.recall_ks": Range(lambda v: len(v) > 0 and len(set(v)) == len(v)
                                  and all(isinstance(k, int) and k >= 1 for k in v),
                                  "a non-empty list of distinct integers >= 1"),
}


class ConfigError(ValueError):
    """A config file or override that cannot be run; the one-line message names the key and the file."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    and anchors and aliases: 1 KB of nested aliases expands to billions of values, an alias inside its
    own anchor to a cycle."""

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()  # refused before any node is built: fast, whatever the aliases expand to
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise ConfigError(f"YAML aliases/anchors are not supported in configs; write the values out "
                              f"({what} at line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: {...}`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in first:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {first[key]})")
            first[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML without duplicate keys, anchors or aliases; a syntax error as one line: 'line L, column C: problem'."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:  # PyYAML recurses per level of nesting: 500 nested brackets are 1 KB
        raise ConfigError("YAML nested too deeply to read (a config needs a few levels)") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"not valid YAML: {where}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if "." in str(key):  # `train.lr: 0.1` in a file would otherwise pass as a key and change nothing
            raise ConfigError(f"config key {dotted!r}: write sections nested ({str(key).split('.')[0]}: ...), "
                              f"dotted keys are for key=value overrides")
        if isinstance(value, dict) and dotted not in KWARGS_KEYS:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        # a keyword-argument mapping is replaced as a whole: a loss's parameters never mix with another's
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in KWARGS_LEAVES:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its `base:` files merged under it (paths relative to the file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `base:` files form a cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = parse_yaml(path.read_text()) or {}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r} ({type(base).__name__})")
    return _merge(_read_yaml(path.parent / Path(base).expanduser(), chain + (path,)), tree)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    tree[leaf] = value


def _as_float(value: Any) -> Any:
    """A string that reads as a float, as one: YAML 1.1 reads 1e-3 (no dot) as the string '1e-3'."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, default: Any) -> Any:
    """value with float strings read as floats where the key holds a float (or a list of floats)."""
    if isinstance(default, float):
        return _as_float(value)
    if isinstance(default, list) and default and all(isinstance(d, float) for d in default) and isinstance(value, list):
        return [_as_float(v) for v in value]
    return value


def _check_type(key: str, value: Any, default: Any) -> None:
    if (value is None and key in NULLABLE) or (value == "auto" and key in AUTO):
        return
    expected = NULLABLE.get(key, AUTO.get(key, type(default)))
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    name = expected.__name__
    if expected is list:
        name = "a list of numbers"
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if key in AUTO:
        name += " or auto"
    if not ok:
        number = _as_float(value)
        hint = f"; write {int(number)}" if expected is int and isinstance(number, float) and number.is_integer() else ""
        raise ConfigError(f"config key {key}: expected {name}, got {value!r} ({type(value).__name__}){hint}")


def _check_value(key: str, value: Any) -> None:
    """value among the key's CHOICES and within its RANGES (null of a NULLABLE key, auto of an AUTO key pass)."""
    choices = CHOICES.get(key)
    if value == "auto" and key in AUTO:
        return
    if choices and value not in choices:
        raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")
    rule = RANGES.get(key)
    if rule and value is not None and not rule.valid(value):
        raise ConfigError(f"config key {key}: expected {rule.text}, got {value!r}")


def _unknown_key(key: str, value: Any, defaults: dict[str, Any]) -> ConfigError:
    """An unknown key, with a did-you-mean; a section given a value names the keys it holds."""
    inside = [k for k in defaults if k.startswith(key + ".")]
    if inside:
        fits = [k for k in inside if value in CHOICES.get(k, ())]  # dataset=digits -> dataset.name=digits
        hint = f"; did you mean {fits[0]}={value}?" if fits else ""
        return ConfigError(f"config key {key} is a section, not a value: set one of {', '.join(inside)}{hint}")
    close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key}{hint}")


def _check_kwargs(key: str, params: Any, fn: Callable) -> None:
    """Every name in params a keyword parameter of fn, every value checked against its default (in place)."""
    if not isinstance(params, dict):
        raise ConfigError(f"config key {key}: expected a mapping of keyword arguments, got {params!r}")
    signature = inspect.signature(fn).parameters
    valid = [
        name for name, p in signature.items()
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
    ]
    valid = [v for v in valid if v not in ("generator", "normalize")]
    for name in params:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {key}.{close[0]}?" if close else ""
            raise ConfigError(f"config key {key}.{name} is not a parameter of {fn.__name__} "
                              f"(valid: {', '.join(valid)}){hint}")
        params[name] = _check_kwarg_value(f"{key}.{name}", params[name], signature[name].default)


def _check_kwarg_value(key: str, value: Any, default: Any) -> Any:
    """A keyword argument whose default is a number takes a finite number, by the rules of a top-level key
    (float strings read as floats, an int for an int); one whose default is a bool or a string takes a value
    of that type; any other (a default of None) is left as it is. Returns value."""
    if isinstance(default, (bool, str)):
        _check_type(key, value, default)
        return value
    if not isinstance(default, (int, float)):
        return value
    value = _coerce(value, default)
    _check_type(key, value, default)
    if not finite(value):
        raise _not_finite(key, value)
    return value


def _not_finite(key: str, value: Any) -> ConfigError:
    return ConfigError(f"config key {key}: expected a finite number, got {value!r}")


def _check_finite(key: str, value: Any) -> None:
    """No NaN or infinity anywhere in the config: the run files that record it are strict JSON."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(f"{key}.{name}" if key else str(name), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _not_finite(key, value)


def _check_combinations(cfg: dict) -> None:
    """The rules that tie keys together."""
    if cfg["fold"] is not None and not 0 <= cfg["fold"] < cfg["folds"]:
        raise ConfigError(f"config key fold: {cfg['fold']} is outside 0..{cfg['folds'] - 1} (folds: {cfg['folds']})")
    if cfg["ccp"]["pair_weight"] == 0 and cfg["ccp"]["proxy_weight"] == 0:
        raise ConfigError("config keys ccp.pair_weight and ccp.proxy_weight are both 0: the loss would be 0")
    dc = cfg["data"]
    if cfg["dataset"]["name"] == "folder" and dc["transform"] == "digits":
        raise ConfigError("config key data.transform: digits takes the bundled digits' 8x8 tensors; images of "
                          "dataset.name folder need bninception or resnet")
    if dc["transform"] != "digits" and dc["crop_size"] > dc["resize"]:
        raise ConfigError(f"config key data.crop_size: expected at most data.resize ({dc['resize']}), "
                          f"got {dc['crop_size']}")
    if cfg["method"] not in PROXY_BASELINES:
        for key in ("params", "warmup_steps"):
            if cfg["baseline"][key]:
                raise ConfigError(f"config key baseline.{key} applies to the proxy baselines "
                                  f"({', '.join(PROXY_BASELINES)}), not to method {cfg['method']}")
    if cfg["eval_only"] and cfg["resume"] in (None, "auto"):
        why = " (auto is for continuing a training run in run_dir)" if cfg["resume"] else ""
        raise ConfigError(f"eval_only: true needs resume: PATH, the checkpoint to evaluate, got resume: "
                          f"{cfg['resume'] or 'null'}{why}")


def validate_config(cfg: dict) -> dict:
    """Every key of cfg known (in DEFAULTS), of its type and valid value, float strings read as floats, no NaN
    or infinity anywhere; returns cfg."""
    defaults, flat = flatten(DEFAULTS), flatten(cfg)
    for key, value in flat.items():
        if key not in defaults:
            raise _unknown_key(key, value, defaults)
        value = _coerce(value, defaults[key])
        _set_dotted(cfg, key, value)
        _check_type(key, value, defaults[key])
        _check_value(key, value)
    _check_kwargs("loss.params", cfg["loss"]["params"], losses.LOSSES[cfg["loss"]["name"]])
    _check_kwargs("model.backbone_kwargs", cfg["model"]["backbone_kwargs"], model.BACKBONES[cfg["model"]["backbone"]])
    if "fold_bn" in cfg["model"]["backbone_kwargs"]:  # build_model gives BN-Inception model.fold_bn, whatever is here
        raise ConfigError("config key model.backbone_kwargs.fold_bn: set model.fold_bn (true, false or auto) instead")
    if cfg["method"] in PROXY_BASELINES:
        baseline = PROXY_BASELINES[cfg["method"]]
        _check_kwargs("baseline.params", cfg["baseline"]["params"], baseline)
        try:  # the module checks its own values (e.g. SoftTriple's center_regularizer): built small, once here
            baseline(2, cfg["model"]["embedding_dim"], generator=torch.Generator(), **cfg["baseline"]["params"])
        except ValueError as err:
            raise ConfigError(f"config key baseline.params: {err}") from None
    _check_finite("", cfg)
    _check_combinations(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS <- the file (with its `base:` files) <- `key=value` overrides, validated."""
    cfg = _merge(DEFAULTS, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        try:
            value = parse_yaml(text)
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        _set_dotted(cfg, key, value)
    try:
        return validate_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
