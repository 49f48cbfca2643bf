"""Typed configurations (dataclasses) and their YAML form.

Every config is a dataclass of plain values so that ``config.yaml`` in a run directory rebuilds exactly what
was run. :func:`from_dict` refuses unknown keys with the list of accepted ones: a typo in a recipe or an
override must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from landscape.errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass (nested ones included) as a plain dict of YAML-safe values."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields are built recursively."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown {where} field(s) {', '.join(unknown)}; accepted fields are {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints.get(name))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is not valid YAML ({e.__class__.__name__}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field names to values.")
    return data


def save_yaml(data: dict[str, Any] | Any, path: str | os.PathLike) -> None:
    """Write a mapping (or dataclass) as YAML, atomically."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    text = yaml.safe_dump(_plain(data), sort_keys=False)
    atomic_write_text(Path(path), text)


def config_hash(data: dict[str, Any] | Any) -> str:
    """A short stable hash of a config, stored in every checkpoint to tie it to its run."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    blob = json.dumps(_plain(data), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (``key`` may be dotted) with the value parsed as YAML: ``lr=1e-3``, ``mixup=0``."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must have the form key=value.")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def parse_value(value: str) -> Any:
    """A command-line value as YAML, except that numbers like ``1e-3`` are numbers (YAML 1.1 says strings)."""
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied."""
    out = json.loads(json.dumps(data, default=str))
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {key!r} goes through {part!r}, which is not a section.")
        node[parts[-1]] = value
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write(path: str | os.PathLike, write: typing.Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``path``.

    The temporary file lives in the same directory (so the rename is atomic on POSIX) and is removed if
    ``write`` fails, leaving any previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
