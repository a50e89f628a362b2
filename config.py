"""Reading and validating a run's YAML config: `base:` files, `key=value` overrides, and checks.

train.py owns the keys and their defaults (its DEFAULTS); this file owns the machinery that turns a
file and overrides into a validated config: every key known (an unknown one gets a did-you-mean),
every value of its type and among its choices, keyword-argument mappings checked against the
signature of the function they are passed to. Errors are ConfigError (a ValueError) naming the
key and the file.
"""
from __future__ import annotations

import copy
import difflib
import inspect
from pathlib import Path
from typing import Any, Callable

import yaml

import losses
import model

# Keys whose default is null, with the type they take otherwise.
NULLABLE = {"resume": str, "fold": int, "model.pretrained": str}
# Keys that hold keyword arguments of a function chosen by another key: checked against its signature.
KWARGS_KEYS = ("loss.params", "baseline.params", "model.backbone_kwargs")
KWARGS_LEAVES = {key.rsplit(".", 1)[1] for key in KWARGS_KEYS}
CHOICES = {
    "method": ("ccp", "baseline", "proxy_anchor", "proxynca++", "softtriple", "xbm"),
    "normalization": tuple(losses.NORMALIZATIONS),
    "dataset.name": ("cub", "cars", "sop", "inshop", "digits"),
    "loss.name": tuple(losses.LOSSES),
    "ccp.proxy_init": ("kcenter", "random"),
    "model.pooling": ("avg", "max"),
    "model.backbone": tuple(model.BACKBONES),
}
PROXY_BASELINES = {
    "proxy_anchor": losses.ProxyAnchor,
    "proxynca++": losses.ProxyNCAPlusPlus,
    "softtriple": losses.SoftTriple,
}


class ConfigError(ValueError):
    """A config file or override that cannot be run; the message names the key and the file."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
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
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(_read_yaml(path.parent / base, chain + (path,)), tree)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    tree[leaf] = value


def _check_type(key: str, value: Any, default: Any) -> None:
    if value is None and key in NULLABLE:
        return
    expected = NULLABLE.get(key, type(default))
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is list and ok:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"config key {key}: expected {expected.__name__}, got {value!r} ({type(value).__name__})")


def _check_kwargs(key: str, params: Any, fn: Callable) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"config key {key}: expected a mapping of keyword arguments, got {params!r}")
    valid = [
        name for name, p in inspect.signature(fn).parameters.items()
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
    ]
    valid = [v for v in valid if v not in ("generator", "normalize")]
    for name in params:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {key}.{close[0]}?" if close else ""
            raise ConfigError(f"config key {key}.{name} is not a parameter of {fn.__name__} "
                              f"(valid: {', '.join(valid)}){hint}")


def validate_config(cfg: dict, defaults: dict) -> dict:
    """Every key of cfg known to `defaults`, of the right type and among the choices; returns cfg."""
    defaults, flat = flatten(defaults), flatten(cfg)
    for key, value in flat.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key}{hint}")
        _check_type(key, value, defaults[key])
        choices = CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(choices)}")
    _check_kwargs("loss.params", cfg["loss"]["params"], losses.LOSSES[cfg["loss"]["name"]])
    _check_kwargs("model.backbone_kwargs", cfg["model"]["backbone_kwargs"], model.BACKBONES[cfg["model"]["backbone"]])
    if cfg["method"] in PROXY_BASELINES:
        _check_kwargs("baseline.params", cfg["baseline"]["params"], PROXY_BASELINES[cfg["method"]])
    if cfg["fold"] is not None and not 0 <= cfg["fold"] < cfg["folds"]:
        raise ConfigError(f"config key fold: {cfg['fold']} is outside 0..{cfg['folds'] - 1} (folds: {cfg['folds']})")
    for key in ("train.max_steps", "train.eval_every", "folds", "repeats", "data.classes_per_batch",
                "data.samples_per_class", "ccp.proxies_per_class", "ccp.pool_size"):
        if flat[key] < 1:
            raise ConfigError(f"config key {key}: must be at least 1, got {flat[key]}")
    if cfg["method"] not in PROXY_BASELINES:
        for key in ("baseline.params", "baseline.warmup_steps"):
            if flat[key]:
                raise ConfigError(f"config key {key} applies to the proxy baselines "
                                  f"({', '.join(PROXY_BASELINES)}), not to method {cfg['method']}")
    if cfg["eval_only"] and not cfg["resume"]:
        raise ConfigError("eval_only: true needs resume: PATH, the checkpoint to evaluate")
    return cfg


def load_config(path: str | Path, overrides: list[str], defaults: dict) -> dict:
    """defaults <- the file (with its bases) <- `key=value` overrides, validated."""
    cfg = _merge(defaults, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        _set_dotted(cfg, key, value)
    try:
        return validate_config(cfg, defaults)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
