"""Typed dataclass configs: YAML files and ``key.sub=value`` overrides in, checked dataclasses out.

Each component owns a dataclass whose fields carry the defaults and a docstring literal under each
field; cross-field checks live in its ``__post_init__`` and raise ``ValueError`` saying the fix.
This module holds no component configs, only the machinery:

* ``from_dict`` builds nested dataclasses, checking every value against the field's type hint;
* ``load_config`` reads a YAML file (optionally ``base: other.yaml``, merged under it) and
  command-line overrides, then calls ``from_dict``;
* ``to_dict`` / ``dump_yaml`` / ``config_diff`` go the other way (e.g. to refuse resuming a run
  whose config changed); ``field_docs`` / ``describe`` print help.

Every problem is a one-line ``ConfigError`` naming the dotted field path, the value given and
what is allowed. YAML is read with YAML 1.2 float rules, so ``lr: 1e-4`` is a float, not a string.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError", "from_dict", "parse_overrides", "load_config", "to_dict", "dump_yaml",
    "config_diff", "field_docs", "describe",
]

T = TypeVar("T")
_NONE = type(None)


class ConfigError(ValueError):
    """A config value, override or file is invalid; the message names the field and the fix."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``3E5`` as floats (PyYAML's 1.1 rules need a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not get_args(tp) else repr(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls)
    except NameError as e:  # a forward reference the module cannot resolve
        raise TypeError(f"cannot resolve the type hints of {cls.__qualname__}: {e}") from e


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


# --------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build ``cls`` from a (nested) mapping, checking types; missing keys take the defaults."""
    where = path or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}; "
                          f"write it as 'key: value' lines")
    fields = {f.name: f for f in _init_fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            fix = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                   else f"valid keys: {', '.join(fields)}")
            raise ConfigError(f"{where}: unknown key '{_join(path, str(key))}' in "
                              f"{cls.__name__}; {fix}")
        kwargs[key] = _convert(hints[key], value, _join(path, key))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required field is missing; set it in the "
                              f"YAML file or with {_join(path, name)}=<value>")
    try:
        return cls(**kwargs)  # runs the component's own __post_init__ checks
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in canonical form."""

    def fail(fix: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} "
                          f"({type(value).__name__}); {fix}")

    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path=path)
    if origin in (Union, types.UnionType):
        if value is None:
            if _NONE in args:
                return None
            fail("this field cannot be null")
        members = [a for a in args if a is not _NONE]
        if len(members) == 1:
            return _convert(members[0], value, path)
        for member in members:
            try:
                return _convert(member, value, path)
            except ConfigError:
                continue
        fail(f"give a value of one of: {', '.join(_type_name(m) for m in members)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of "
                          f"{', '.join(repr(a) for a in args)}")
    if tp is bool:
        return value if isinstance(value, bool) else fail("write true or false")
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) \
            else fail("give a whole number, e.g. 4")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail("give a number, e.g. 0.5 or 1e-4")
    if tp is str:
        return value if isinstance(value, str) else fail("quote it to pass it as text")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail("give a list, e.g. [1, 2]")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                fail(f"give exactly {len(args)} items")
            items = [_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            fail("give a mapping of 'key: value' lines")
        key_tp, value_tp = args
        return {_convert(key_tp, k, f"{path} key"): _convert(value_tp, v, _join(path, str(k)))
                for k, v in value.items()}
    raise TypeError(f"{path}: field type {_type_name(tp)} is not supported by streamkd.config")


# --------------------------------------------------------------------------- files and overrides


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b.c=value", ...]`` into a nested dict; values follow YAML scalar rules."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is malformed; expected the form key.sub=value, "
                              f"e.g. model.num_layers=4")
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML "
                              f"({str(e).splitlines()[0]}); quote it, e.g. {key}='{raw}'") from e
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' was already "
                                  f"set to a value; drop one of the two overrides")
        previous = node.get(parts[-1])
        if isinstance(previous, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"override {item!r}: '{key}' is a section with sub-keys set by "
                                  f"another override; drop one of the two overrides")
            value = deep_merge(previous, value)
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file, first loading and merging under it the file named by ``base:``."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: 'base:' includes form a cycle ({cycle}); remove one of them")
    if not path.is_file():
        via = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{via}; check the path")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}; fix the syntax at that line") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}; write it as 'key: value' lines")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}; e.g. base: default.yaml")
    return deep_merge(_read_yaml(path.parent / base, (*chain, path)), data)


def _coerce_override_bools(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Read overrides ``flag=1`` / ``flag=0`` as booleans where the field is a bool.

    YAML already makes ``true/false/yes/no/on/off`` booleans; ``1``/``0`` stay ints and files must
    still say ``true``/``false``, so this applies to command-line overrides only.
    """
    hints, out = _hints(cls), dict(data)
    for key, value in data.items():
        tp = hints.get(key)
        members = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        nested = [m for m in members if _is_dataclass_type(m)]
        if nested and isinstance(value, Mapping):
            out[key] = _coerce_override_bools(nested[0], value)
        elif bool in members and type(value) is int and value in (0, 1):
            out[key] = bool(value)
    return out


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None,
                overrides: typing.Iterable[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file, then apply ``key.sub=value`` overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    data = deep_merge(data, _coerce_override_bools(cls, parse_overrides(overrides)))
    return from_dict(cls, data)


# --------------------------------------------------------------------------- dataclass -> text


def to_dict(cfg: Any) -> Any:
    """Plain JSON/YAML-serializable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The config as YAML, fields in declaration order; ``load_config`` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _flatten(data: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            _flatten(value, _join(path, str(key)), out)
    else:
        out[path] = data
    return out


def config_diff(a: Any, b: Any) -> list[str]:
    """Dotted fields whose values differ between two configs, as ``"field: old -> new"``."""
    flat_a, flat_b = _flatten(to_dict(a), "", {}), _flatten(to_dict(b), "", {})
    missing = "<unset>"
    keys = list(flat_a) + [k for k in flat_b if k not in flat_a]
    return [f"{k}: {flat_a.get(k, missing)!r} -> {flat_b.get(k, missing)!r}"
            for k in keys if flat_a.get(k, missing) != flat_b.get(k, missing)]


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively: no source to read
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring literal under each field of ``cls`` (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}


def describe(cls: type, indent: int = 0) -> str:
    """Help text: a tree of fields with type, default and doc, nested sections indented."""
    hints, docs, pad = _hints(cls), field_docs(cls), "  " * indent
    lines = [f"{cls.__name__}:"] if indent == 0 else []
    for f in _init_fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines.append(f"{pad}  {f.name}: {tp.__name__}")
        else:
            if f.default is not dataclasses.MISSING:
                default = repr(to_dict(f.default))
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(to_dict(f.default_factory()))
            else:
                default = "(required)"
            lines.append(f"{pad}  {f.name}: {_type_name(tp)} = {default}")
        if f.name in docs:
            lines += [f"{pad}      {line}" for line in docs[f.name].splitlines()]
        if _is_dataclass_type(tp):
            lines.append(describe(tp, indent + 1))
    return "\n".join(lines)
