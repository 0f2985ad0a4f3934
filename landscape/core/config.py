"""Configuration: dataclass defaults < YAML file < command-line flags < ``key=value`` overrides.

Every command's options live in one frozen dataclass; this module fills it from those sources with type checks,
so a typo (``lr=abc``, ``batchsize=8``) fails with one line naming the key and what is expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from landscape.core.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` (safe loader only)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["lr=3e-5", "task=mrpc"]`` into a dict; values are parsed as YAML scalars (``3e-5`` -> float)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str):
            value = raw  # keep strings verbatim (YAML would strip quotes or spaces)
        result[key.strip().replace("-", "_")] = value
    return result


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field's type annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the types above are used in configs
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"option {name} = {value!r} is not a valid {expected}")


def build_config(cls: type[T], *sources: dict[str, Any]) -> T:
    """Instantiate the dataclass ``cls`` from ``sources``, later sources overriding earlier ones.

    Unknown keys are refused with the list of valid ones; ``None`` in a source means "not given".
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if key not in fields:
                raise ConfigError(f"unknown option {key!r}; expected one of: {', '.join(sorted(fields))}")
            if value is not None:
                values[key] = _coerce(key, hints[key], value)
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    return cls(**values)


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass."""
    return dataclasses.asdict(config)
