"""Typed configuration: a dataclass filled from defaults < file < environment < command line.

One mechanism for all four programs, so every setting is documented in one place (the field's
``metadata["help"]``), can be set the same three ways (``--some-field``, ``NETCTL_SOME_FIELD``,
``some_field:`` in a YAML/JSON file named by ``--config`` or ``NETCTL_CONFIG``), and is checked
before the program starts doing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

ENV_PREFIX = "NETCTL_"
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong type; the message names it and its source."""


@dataclasses.dataclass
class CommonConfig:
    """Settings every program has."""

    kubeconfig: str | None = dataclasses.field(
        default=None,
        metadata={"help": "kubeconfig path (default: in-cluster, else $KUBECONFIG or ~/.kube/config)"},
    )
    metrics_address: str = dataclasses.field(
        default="127.0.0.1",
        metadata={"help": "address for /metrics and /healthz (0.0.0.0 only if you mean it)"},
    )
    metrics_port: int = dataclasses.field(default=9101, metadata={"help": "port for /metrics and /healthz"})
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    workers: int = dataclasses.field(default=4, metadata={"help": "work-queue worker threads"})
    resync_period_s: float = dataclasses.field(
        default=300.0, metadata={"help": "seconds between full resyncs of cached objects (0 = never)"}
    )
    leader_elect: bool = dataclasses.field(default=True, metadata={"help": "run leader election (one active replica)"})
    lease_name: str = dataclasses.field(default="netctl", metadata={"help": "leader-election Lease name"})
    lease_namespace: str = dataclasses.field(
        default="kube-system", metadata={"help": "leader-election Lease namespace"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} is not a TCP port")
        if self.workers < 1:
            raise ConfigError(f"workers: must be at least 1, got {self.workers}")
        if self.resync_period_s < 0:
            raise ConfigError(f"resync_period_s: must not be negative, got {self.resync_period_s}")
        if logging.getLevelName(self.log_level.upper()) not in (10, 20, 30, 40, 50):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        self.log_level = self.log_level.upper()


def _fields(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    """Each field with its resolved type (annotations may be strings)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(name: str, tp: Any, value: Any, source: str) -> Any:
    """Coerce ``value`` (a string from env/CLI, or a parsed YAML value) to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} ({source}): must not be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if base is str:
            if isinstance(value, dict | list):
                raise ValueError(f"not a string: {value!r}")
            return str(value)
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base) or (str,)
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            return [_convert(name, item, v.strip() if isinstance(v, str) else v, source) for v in items]
    except ValueError as exc:
        raise ConfigError(f"{name} ({source}): {exc}") from None
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def build_parser(cls: type[Any], prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; unset flags are absent from the namespace."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip() or None,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help=f"YAML or JSON settings file (env {ENV_PREFIX}CONFIG)")
    for f, tp in _fields(cls):
        base, _ = _unwrap_optional(tp)
        default = _default_of(f)
        help_text = f.metadata.get("help", "")
        help_text += f" (default: {default!r}; env {_env_name(f.name)})"
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), help=help_text)
    return parser


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def help_text(cls: type[Any], prog: str | None = None) -> str:
    return build_parser(cls, prog).format_help()


def read_file(path: str | Path) -> dict[str, Any]:
    """Settings from a ``.json`` file, or YAML (any other name); the top level must be a mapping."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {p}: not valid {kind}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return data


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> T:
    """Build ``cls`` from defaults < file < environment < flags in ``argv``; exits on ``--help``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    args = vars(build_parser(cls, prog).parse_args(argv))
    fields = {f.name: tp for f, tp in _fields(cls)}
    values: dict[str, Any] = {}

    config_path = args.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in read_file(config_path).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ConfigError(f"config file {config_path}: unknown setting {key!r}")
            values[name] = _convert(name, fields[name], value, f"file {config_path}")
    for name, tp in fields.items():
        if _env_name(name) in env:
            values[name] = _convert(name, tp, env[_env_name(name)], f"env {_env_name(name)}")
    for name, value in args.items():
        values[name] = _convert(name, fields[name], value, f"flag {_flag(name)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
