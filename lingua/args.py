"""Typed configuration: dataclass defaults < YAML file(s) < CLI dotlist overrides.

Every entry point owns one dataclass config. ``parse_args(Cls, argv)`` reads
``config=FILE.yaml`` plus ``key.sub=value`` overrides and returns a validated instance.
Unknown keys and wrong types raise :class:`ConfigError` naming the offending key.

A YAML file may start with ``_base_: other.yaml`` (or a list); bases are merged first, paths
relative to the including file. That is how model presets are shared between configs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)
T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A configuration problem, with the key (and file) that caused it."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} include ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return _deep_merge(merged, data)


class _Replace(dict):
    """A mapping given whole on the command line (``data.sources={a: 1.0}``): it replaces the
    mapping below it instead of merging into it, so keys from the YAML do not linger."""


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, _Replace):
            out[k] = dict(v)
        elif isinstance(v, dict):  # into the section below, or a new one (no _Replace left inside)
            out[k] = _deep_merge(out[k] if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = v
    return out


def _friendly(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "is not in struct" in msg:
        return ConfigError(f"{where}: unknown config key '{key}' ({msg})")
    return ConfigError(f"{where}: bad value for config key '{key}': {msg}")


def _check_keys(cls: type, data: Any, prefix: str, where: str) -> None:
    """Walk ``data`` against the dataclass tree of ``cls`` and reject unknown keys early,
    with a suggestion for near misses (typos are the common case)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    for k, v in data.items():
        if k not in fields:
            close = _closest(str(k), list(fields))
            hint = f"; did you mean '{prefix}{close}'?" if close else ""
            raise ConfigError(f"{where}: unknown config key '{prefix}{k}'{hint}")
        sub = hints.get(k)
        if dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise ConfigError(
                    f"{where}: bad value for config key '{prefix}{k}': expected a section (mapping), "
                    f"got {type(v).__name__} {v!r}"
                )
            _check_keys(sub, v, f"{prefix}{k}.", where)


def _type_hints(cls: type) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - forward refs we cannot resolve
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return m[0] if m else None


def _dotlist_to_dict(items: Sequence[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_\w]+)*", key):
            raise ConfigError(f"override '{item}': bad key '{key}'")
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, dict):
            value = _Replace(value)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build a validated ``cls`` instance from a nested dict (defaults fill the gaps)."""
    _check_keys(cls, data, "", where)
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _friendly(e, where) from e
    _post_validate(obj, "")
    return obj  # type: ignore[return-value]


def _post_validate(obj: Any, prefix: str) -> None:
    """Call ``validate()`` on every nested dataclass that defines it (children first)."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _post_validate(getattr(obj, f.name), f"{prefix}{f.name}.")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"invalid config{(' section ' + prefix.rstrip('.')) if prefix else ''}: {e}") from e


def check_min(cfg: Any, minimum: int, *names: str, prefix: str = "") -> None:
    """For ``validate()`` methods: raise a ``ValueError`` naming the first field among ``names``
    whose value is below ``minimum`` (``None`` passes: it means "the default"). A zero where a
    count or size must be positive otherwise fails deep inside a run (``range() arg 3 must not
    be zero``) instead of at the command line."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """defaults < YAML at ``path`` (with its ``_base_`` chain) < ``overrides`` (dotlist)."""
    data: dict = {}
    where = "config"
    if path is not None:
        data = _read_yaml(Path(path))
        where = str(path)
    if overrides:
        try:
            data = _deep_merge(data, _dotlist_to_dict(overrides))
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from e
        where = f"{where} + command line"
    return from_dict(cls, data, where)


def parse_args(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """CLI form used by every entry point: ``config=FILE.yaml key.sub=value ...``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: config=FILE.yaml [key.sub=value ...]\n\nDefaults of {cls.__name__}:\n")
        print(dump_config(cls()))  # type: ignore[call-arg]
        raise SystemExit(0)
    path = None
    rest = []
    for a in argv:
        if a.startswith("config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--") and "=" in a:
            rest.append(a[2:])
        else:
            rest.append(a)
    return load_config(cls, path, rest)


def cli_config(cls: type[T], argv: Sequence[str] | None, prog: str, *, log_level: str = "INFO") -> T:
    """The shared start of every entry point's ``main``: console logging, parse the command line
    (``config=FILE.yaml key.sub=value ...``), print the resolved config. A configuration error is
    one line naming the key (exit status 2), not a traceback."""
    import sys

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        cfg = parse_args(cls, argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(dump_config(cfg), flush=True)
    return cfg


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def dump_config(cfg: Any, path: str | os.PathLike | None = None) -> str:
    """YAML text of a config; written atomically to ``path`` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        from lingua.io import atomic_write_text

        atomic_write_text(Path(path), text)
    return text


def dc_replace(cfg: T, changes: dict[str, Any] | None = None, /, **kw: Any) -> T:
    """A validated copy of ``cfg`` with some values changed; keys may be dotted
    (``{"optim.lr": 1e-3}``). Values are Python objects (a dataclass or a mapping replaces the
    whole section or mapping below its key), so no value goes through text. Unknown keys and bad
    values raise :class:`ConfigError` as in :func:`load_config`. This is how a program derives a
    stage's config from a loaded one (the EM driver does it for every stage it runs)."""
    data = to_dict(cfg)
    for key, value in {**(changes or {}), **kw}.items():
        node, parts = data, key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"replace: unknown config section '{'.'.join(parts[: i + 1])}'")
            node = node[p]
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        node[parts[-1]] = dict(value) if isinstance(value, dict) else value
    return from_dict(type(cfg), data, f"{type(cfg).__name__} (derived)")


__all__ = [
    "ConfigError",
    "check_min",
    "cli_config",
    "DictConfig",
    "dc_replace",
    "dump_config",
    "from_dict",
    "load_config",
    "parse_args",
    "to_dict",
]
