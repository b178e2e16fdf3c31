"""YAML run configs for ``scripts/finetune.py``: inheritance, command-line overrides, strict key checking.

A config has five sections::

    base: _base.yaml          # optional: deep-merged underneath (path relative to this file)
    model:    ModelConfig fields (name_or_path, pooling, lora: LoraSettings fields, ...)
    data:     DataConfig fields (lap2_hf.data)
    privacy:  every Lap2TrainingArguments dp_* field without its prefix (mechanism, target_epsilon, ...)
    training: any transformers/Lap2TrainingArguments field (not the dp_* ones: use privacy)
    run:      RunConfig fields (name, results_dir, resume)

Each section's keys and types are declared once, by a dataclass (``Lap2TrainingArguments`` for training and
privacy, ``DataConfig``, ``ModelConfig``, ``RunConfig``). Overrides are ``--section.key value`` (or
``--section.key=value``), parsed as YAML scalars. Unknown sections or keys are an error naming them, so a typo
never silently falls back to a default; every value is checked against the type of the field it sets, so a
wrong value is refused by name before anything is built.
Every such error is a :class:`ConfigError`: one line naming the field and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import math
import os
import re
import types
import typing
from typing import Any

import yaml

from .data import DataConfig

#: ``model.pooling``: the classifier's sentence representation (lap2_hf.models).
POOLINGS = ("cls", "mean", "mean_normalized")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: LoRA adapters through ``peft`` (only adapters and the head are trained and noised)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``model:`` -- what is loaded and which of its parameters are trained (``lap2_hf.finetune``)."""

    name_or_path: str
    tokenizer: str | None = None
    trust_remote_code: bool = False
    pooling: typing.Literal[POOLINGS] = "cls"
    head_prompts: list[str] | None = None  # a zero-shot start for the mean-pooling head (models.py)
    head_scale: float | None = None
    trainable: list[str] | str | None = None
    frozen: list[str] | str | None = None
    lora: dict | None = None  # LoraSettings fields
    config_overrides: dict | None = None  # model config attributes set at load, e.g. {hidden_dropout_prob: 0.0}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """``run:`` -- where results go and how an interrupted run continues (``finetune.resume_checkpoint``)."""

    name: str
    results_dir: str = "results"
    resume: bool | str = "auto"


def _keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


MODEL_KEYS, LORA_KEYS, RUN_KEYS = _keys(ModelConfig), _keys(LoraSettings), _keys(RunConfig)
SECTIONS = ("model", "data", "privacy", "training", "run")


class ConfigError(ValueError):
    """A run configuration that cannot be used, found before training: ``scripts/finetune.py`` prints it as
    one line (no traceback) and exits 2. The message is flattened to one line and names the field and value."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which
    turns ``eval_strategy: no`` into False ("False is not a valid IntervalStrategy")."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# HF strategy fields take "no" for off; accept the spellings people write for it.
_STRATEGY_FIELDS = ("eval_strategy", "save_strategy", "logging_strategy")
_OFF = (False, "off", "Off", "OFF", "none", "None", "false")


def _yaml_load(text):
    return yaml.load(text, Loader=_Yaml12Loader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one phrase with its position (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str, _seen: tuple = ()) -> dict:
    """Read ``path`` and, recursively, its ``base`` files (deep merge, the file itself wins)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"config {path!r} includes itself through 'base'")
    try:
        with open(path) as fh:
            cfg = _yaml_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path!r} is not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path!r} must be a mapping of sections, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"config {path!r}: base must be a file name (relative to that config), got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            # Said here: the recursive call would report it as a missing --config.
            raise ConfigError(f"config {path!r} names base {base!r}, which does not exist (looked for {base_path!r})")
        cfg = _deep_merge(load_yaml(base_path, _seen + (os.path.abspath(path),)), cfg)
    return cfg


def parse_overrides(argv: list[str]) -> dict:
    """``['--privacy.target_epsilon', '1.0', '--run.name=x']`` -> nested dict with YAML-parsed values."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key value (sections: {', '.join(SECTIONS)})")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = _yaml_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{key}: value {raw!r} is not valid YAML ({_yaml_problem(exc)})") from exc
    return out


def privacy_fields() -> set[str]:
    """The ``privacy:`` keys: every ``dp_<key>`` field of Lap2TrainingArguments (declared there, once)."""
    from .config import Lap2TrainingArguments

    return {f.name[3:] for f in dataclasses.fields(Lap2TrainingArguments) if f.init and f.name.startswith("dp_")}


def training_fields() -> set[str]:
    """The ``training:`` keys: every init field of Lap2TrainingArguments that is not a ``dp_*`` field."""
    from .config import Lap2TrainingArguments

    return {f.name for f in dataclasses.fields(Lap2TrainingArguments) if f.init and not f.name.startswith("dp_")}


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _numbers(node):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; every such scalar here is meant as a number."""
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    if isinstance(node, str) and _FLOAT.match(node):
        return float(node)
    return node


def resolve(config_path: str | None, overrides: list[str], default: dict | None = None) -> dict:
    """The merged, validated config (YAML file or ``default``, then overrides)."""
    cfg = load_yaml(config_path) if config_path else copy.deepcopy(default or {})
    cfg = _numbers(_deep_merge(cfg, parse_overrides(overrides)))
    training = cfg.get("training")
    if isinstance(training, dict):
        for name in _STRATEGY_FIELDS:
            if name in training and training[name] in _OFF:
                training[name] = "no"  # recorded as run: config.yaml shows the value HF was given
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Refuse unknown sections and keys, values of the wrong type or range, and missing required keys."""
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; allowed: {list(SECTIONS)}")
    checks = {
        "model": MODEL_KEYS,
        "privacy": privacy_fields(),
        "run": RUN_KEYS,
        "data": {f.name for f in dataclasses.fields(DataConfig)},
        "training": training_fields(),
    }
    for section, allowed in checks.items():
        body = cfg.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {body!r}")
        bad = set(body) - allowed
        if bad:
            dp_key = section == "training" and any(k.startswith("dp_") for k in bad)
            hint = " (privacy settings go in the 'privacy' section)" if dp_key else ""
            raise ConfigError(f"unknown key(s) {sorted(bad)} in section {section!r}{hint}")
    lora = (cfg.get("model") or {}).get("lora")
    if lora is not None:
        if not isinstance(lora, dict) or set(lora) - LORA_KEYS:
            raise ConfigError(f"model.lora must be null or a mapping with keys {sorted(LORA_KEYS)}, got {lora!r}")
    if not (cfg.get("model") or {}).get("name_or_path"):
        raise ConfigError("model.name_or_path is required")
    if not (cfg.get("run") or {}).get("name"):
        raise ConfigError("run.name is required (results go to <results_dir>/<name>/)")
    for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("run", "name"), ("run", "results_dir")):
        value = (cfg.get(section) or {}).get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{section}.{key} must be a non-empty string, got {value!r}")
    check_values(cfg)


def check_values(cfg: dict) -> None:
    """Check the training, privacy and data values against the types of the fields they set, and the ranges
    that would otherwise fail only once training runs. Raises :class:`ConfigError` naming ``section.key``."""
    targets = {
        "training": ("", _argument_fields()),
        "privacy": ("dp_", _argument_fields()),
        "data": ("", _fields(DataConfig)),
        "model": ("", _fields(ModelConfig)),
        "run": ("", _fields(RunConfig)),
    }
    for section, (prefix, fields) in targets.items():
        for key, value in (cfg.get(section) or {}).items():
            _check_value(f"{section}.{key}", value, *fields[prefix + key])
    for key, value in ((cfg.get("model") or {}).get("lora") or {}).items():
        _check_value(f"model.lora.{key}", value, *_fields(LoraSettings)[key])
    training = cfg.get("training") or {}
    # Ranges that HF checks only when the optimizer or the data loaders are built, inside train().
    for key, low in (("learning_rate", 0), ("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1)):
        value = training.get(key)
        if value is not None and value < low:
            raise ConfigError(f"training.{key} must be >= {low}, got {value!r}")
    # HF counts by epochs unless max_steps > 0 (its default is -1); 0 or fewer epochs would plan no step.
    if training.get("max_steps", -1) <= 0 and training.get("num_train_epochs", 3.0) <= 0:
        epochs = training["num_train_epochs"]
        raise ConfigError(f"training.num_train_epochs must be > 0 (or set training.max_steps > 0), got {epochs!r}")


@functools.cache
def _argument_fields() -> dict[str, tuple[Any, list | None]]:
    """Every init field of Lap2TrainingArguments: (resolved type, allowed values from its ``choices`` or None)."""
    from .config import Lap2TrainingArguments

    hints = typing.get_type_hints(Lap2TrainingArguments)
    out = {}
    for f in dataclasses.fields(Lap2TrainingArguments):
        if f.init:
            choices = f.metadata.get("choices")
            out[f.name] = (hints.get(f.name, Any), list(choices) if choices is not None else None)
    return out


def _check_value(name: str, value, tp, choices) -> None:
    if not _fits(value, tp):
        raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


@functools.cache
def _fields(cls) -> dict[str, tuple[Any, None]]:
    """The fields of a config dataclass: (resolved type, None)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, Any), None) for f in dataclasses.fields(cls)}


def _union_args(tp) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _enum_values(members) -> list:
    return [m.value for e in members if isinstance(e, type) and issubclass(e, enum.Enum) for m in e]


def _fits(value, tp) -> bool:
    """Whether a YAML value can be given to a field annotated ``tp`` (ints are not bools, floats are finite)."""
    args = _union_args(tp)
    if args is not None:
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            # HF types its strategy fields as ``SomeEnum | str``: the string must be one of the enum's values.
            return value in _enum_values(enums)
        return any(_fits(value, a) for a in args)
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin is typing.Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in _enum_values([tp])
    if origin is list or tp is list:
        item = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not model: left to the field's own validation


def _describe(tp) -> str:
    """``tp`` in words, for error messages."""
    args = _union_args(tp)
    if args is not None:
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:
            words = [f"one of {_enum_values(enums)}"] + ["null" for a in args if a is type(None)]
        else:
            words = [_describe(a) for a in args]
        return " or ".join(dict.fromkeys(words))
    origin = typing.get_origin(tp)
    if tp is type(None) or tp is None:
        return "null"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    named = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping"}
    if tp in named:
        return named[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {_enum_values([tp])}"
    if origin is list or tp is list:
        item = (typing.get_args(tp) or (Any,))[0]
        return "a list" if item is Any else f"a list of ({_describe(item)})"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def training_kwargs(cfg: dict) -> dict[str, Any]:
    """Lap2TrainingArguments keyword arguments from the training and privacy sections of a resolved config."""
    kw = dict(cfg.get("training") or {})  # strategy spellings of "off" were mapped to "no" by resolve()
    for k, v in (cfg.get("privacy") or {}).items():
        kw[f"dp_{k}"] = v
    kw.setdefault("output_dir", os.path.join("runs", cfg["run"]["name"]))
    return kw
