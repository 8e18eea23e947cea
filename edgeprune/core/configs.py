"""Frozen configuration dataclasses that round-trip through dicts, JSON and YAML (``yaml.safe_load`` only)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgeprune.core.errors import EdgePruneError

T = TypeVar("T", bound="FrozenConfig")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (EdgePruneError, TypeError, ValueError):
                continue
        raise EdgePruneError(f"{where}: cannot interpret {value!r} as {annotation}")
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise EdgePruneError(f"{where}: expected a mapping, got {value!r}")
        return annotation.from_dict(value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise EdgePruneError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_convert(v, item_type, f"{where}[]") for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise EdgePruneError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base for all configs: immutable, validated in ``__post_init__`` by subclasses, serialisable."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str | None = None) -> T:
        where = where or cls.__name__
        if data is not None and not isinstance(data, dict):
            raise EdgePruneError(f"{where}: expected a mapping of options, got {type(data).__name__} {data!r:.60}")
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EdgePruneError(f"{where}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise EdgePruneError(f"{where}: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        if not path.is_file():
            raise EdgePruneError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is valid YAML
        except yaml.YAMLError as exc:
            raise EdgePruneError(f"{path}: not valid YAML/JSON ({exc.__class__.__name__})") from None
        except UnicodeDecodeError:
            raise EdgePruneError(f"{path}: not a text file (YAML/JSON expected)") from None
        except OSError as exc:
            raise EdgePruneError(f"cannot read config file {path}: {exc.strerror}") from None
        if data is not None and not isinstance(data, dict):
            raise EdgePruneError(f"{path}: expected a mapping of options (key: value) at the top level, got a "
                                 f"{type(data).__name__}")
        return cls.from_dict(data or {}, where=str(path))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)
