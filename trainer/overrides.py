"""``key=value`` overrides into nested frozen config dataclasses, and the reverse, ``flatten``.

``apply_overrides(cfg, ["optim.lr=1e-3", "data.augment.scale=0.08,1.0", "distill.kind=soft"])`` returns
a new config: each dotted key walks the nested dataclasses, the value is parsed from the *type
annotation* of the field it lands on (int, float, bool, str, ``X | None``, ``Literal[...]``, tuples such
as ``0.08,1.0``), and the config is rebuilt with ``dataclasses.replace`` so the original is untouched.
Mistakes fail early with the fix in the message: an unknown key lists the close matches and the valid
keys of its section; a bad value names the key, the value and the expected type.

``flatten(cfg)`` gives ``{dotted_key: text}`` in exactly the syntax ``apply_overrides`` reads, so a
logged parameter set can be replayed: ``apply_overrides(base, [f"{k}={v}" ...])`` rebuilds the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal, TypeVar, Union

__all__ = ["OverrideError", "apply_overrides", "flatten", "leaf_keys", "parse_value", "format_value"]

T = TypeVar("T")

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class OverrideError(ValueError):
    """An override that cannot be applied; the message names the key and says what would work."""


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """Return ``config`` with every ``key=value`` of ``overrides`` applied, in order (later ones win)."""
    for text in overrides:
        key, raw = _split(text)
        config = _set(config, key, raw)
    return config


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted_key: value_text}`` for every leaf field, in field order; values in override syntax."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, key + "."))
        else:
            out[key] = format_value(value)
    return out


def leaf_keys(config: Any) -> list[str]:
    """Every dotted key that ``apply_overrides`` accepts for ``config``."""
    return list(flatten(config))


def format_value(value: Any) -> str:
    """A leaf value as override text: ``none``, ``true``/``false``, ``repr`` of floats, ``a,b`` tuples."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    return str(value)


def parse_value(raw: str, annotation: Any, key: str = "value") -> Any:
    """Parse ``raw`` as a value of type ``annotation``; ``OverrideError`` naming ``key`` if it is not one."""
    try:
        return _parse(raw.strip(), annotation)
    except _BadValue:
        raise OverrideError(f"{key}={raw!r}: expected {_describe(annotation)}") from None


# ---------------------------------------------------------------------------------------------------


def _split(text: str) -> tuple[str, str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"override {text!r} is not key=value, e.g. optim.lr=1e-3")
    return key, raw.strip()


@cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (its module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def _set(config: Any, key: str, raw: str) -> Any:
    """Return a copy of ``config`` with dotted ``key`` set from ``raw``."""
    parts = key.split(".")
    chain = [config]  # the dataclass at each level of the path
    for depth, part in enumerate(parts):
        node = chain[-1]
        names = [f.name for f in dataclasses.fields(node)]
        section = ".".join(parts[:depth]) or "(top level)"
        if part not in names:
            raise OverrideError(_unknown_key(config, key, parts[:depth], part, names))
        value = getattr(node, part)
        is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        last = depth == len(parts) - 1
        if last and is_section:
            sub = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(value))
            raise OverrideError(f"{key} is a section, not a value: set one of its keys: {sub}")
        if not last and not is_section:
            raise OverrideError(
                f"{'.'.join(parts[: depth + 1])} is a value, not a section (in {key!r}; "
                f"section {section} has keys: {', '.join(names)})"
            )
        if not last:
            chain.append(value)
    leaf_owner = chain[-1]
    new_value = parse_value(raw, _hints(type(leaf_owner))[parts[-1]], key)
    # Rebuild bottom-up; the pipeline's dataclasses check their fields in __post_init__.
    for depth in range(len(parts) - 1, -1, -1):
        owner = chain[depth]
        try:
            new_value = dataclasses.replace(owner, **{parts[depth]: new_value})
        except (ValueError, TypeError) as exc:
            raise OverrideError(f"{key}={raw!r} rejected: {exc}") from None
    return new_value


def _unknown_key(config: Any, key: str, section_parts: list[str], part: str, names: list[str]) -> str:
    section = ".".join(section_parts)
    everything = leaf_keys(config)
    last = key.rsplit(".", 1)[-1]
    # A key in the wrong section (model.epochs) first: the same last part anywhere else.
    close = [other for other in everything if other.rsplit(".", 1)[-1] == last]
    candidates = difflib.get_close_matches(key, everything, n=4, cutoff=0.6)
    candidates += [f"{section}.{n}" if section else n for n in difflib.get_close_matches(part, names, 3, 0.5)]
    close += [c for c in dict.fromkeys(candidates) if c not in close]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    where = f"section {section}" if section else "the top level"
    return f"unknown key {key!r}: {hint}valid keys of {where}: {', '.join(names)}"


class _BadValue(Exception):
    pass


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _parse(raw: str, annotation: Any) -> Any:
    union = _union_args(annotation)
    if union is not None:
        if type(None) in union and raw.lower() in _NONE_WORDS:
            return None
        for arg in union:
            if arg is type(None):
                continue
            try:
                return _parse(raw, arg)
            except _BadValue:
                continue
        raise _BadValue
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if raw == str(choice):
                return choice
        raise _BadValue
    if origin is tuple:
        return _parse_tuple(raw, typing.get_args(annotation))
    if annotation is bool:
        word = raw.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _BadValue
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise _BadValue from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise _BadValue from None
        if not math.isfinite(value):
            raise _BadValue
        return value
    if annotation is str:
        return raw
    if annotation is type(None):
        if raw.lower() in _NONE_WORDS:
            return None
        raise _BadValue
    raise _BadValue  # a section or an unsupported annotation


def _parse_tuple(raw: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    text = raw
    if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):
        text = text[1:-1]
    items = [s.strip() for s in text.split(",")] if text.strip() else []
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_parse(item, args[0]) for item in items)
    if len(items) != len(args):
        raise _BadValue
    return tuple(_parse(item, arg) for item, arg in zip(items, args, strict=True))


def _describe(annotation: Any, brief: bool = False) -> str:
    """Human words for a type; unless ``brief``, with an example of the accepted syntax."""
    union = _union_args(annotation)
    if union is not None:
        parts = [_describe(a, brief=True) for a in union if a is not type(None)]
        if type(None) in union:
            parts.append("none")
        return " or ".join(parts)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {_describe(args[0], brief=True)} values"
        kinds = ",".join(_name(a) for a in args)
        return f"a tuple of {len(args)} values ({kinds}), comma-separated, e.g. 0.08,1.0"
    simple = {
        bool: ("a bool", " (true/false)"),
        int: ("an int", ", e.g. 1024"),
        float: ("a float", " (finite), e.g. 5e-4"),
        str: ("a string", ""),
    }
    if annotation in simple:
        noun, example = simple[annotation]
        return noun if brief else noun + example
    return f"a value of type {annotation!r} (sections cannot be set directly)"


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))
