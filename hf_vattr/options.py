"""Allowed values of config fields, written once on the field and read by the check and the help text.

A config dataclass field declares its range in its metadata, ``metadata={"help": ..., "range": "[1, inf)"}``
(interval notation: ``[`` / ``]`` closed, ``(`` / ``)`` open, ``inf`` unbounded), and its choices as
``metadata={"choices": (...)}``. :func:`check_fields` (called by the configs' ``__post_init__``) refuses a value
outside them, and the CLI builds each option's help text and argparse type from the same metadata
(:func:`range_help`, :func:`argparse_type`), so what ``--help`` says and what is checked cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Callable

from .errors import AttributionError

__all__ = ["ConfigError", "Interval", "interval", "check_fields", "check_value", "range_help", "argparse_type"]


class ConfigError(AttributionError, ValueError):
    """A config value (or command-line option) is outside what its field allows."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """A range of numbers, e.g. ``Interval(0, 1, low_open=True, high_open=True)`` is ``(0, 1)``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        v = float(value)
        if math.isnan(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __str__(self) -> str:
        def num(x: float) -> str:
            return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"

        return f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"

    def describe(self) -> str:
        """In words, e.g. ``>= 1``, ``> 0`` or ``in (0, 1)``."""
        if self.high == math.inf and self.low != -math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf and self.high != math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {self}"


def interval(text: str | Interval) -> Interval:
    """Parse ``"[1, inf)"``-style interval notation (an :class:`Interval` is returned as is)."""
    if isinstance(text, Interval):
        return text
    s = str(text).strip()
    if len(s) < 5 or s[0] not in "[(" or s[-1] not in "])" or "," not in s:
        raise ValueError(f"not an interval: {text!r} (write e.g. '[1, inf)' or '(0, 1)').")
    low, high = (float(p.strip()) for p in s[1:-1].split(","))
    return Interval(low, high, low_open=s[0] == "(", high_open=s[-1] == ")")


def _range_of(f: dataclasses.Field) -> Interval | None:
    spec = f.metadata.get("range")
    return None if spec is None else interval(spec)


def _kind(hint: Any) -> tuple[type | None, bool]:
    """(int / float / str / None, whether None is allowed) of a type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return (base if base in (int, float, str) else None), optional


def check_value(name: str, value: Any, *, rng: Interval | None = None, choices: Any = None,
                kind: type | None = None, optional: bool = False, what: str = "") -> None:
    """Raise :class:`ConfigError` naming ``name`` and ``value`` unless the value is of ``kind`` and allowed."""
    if value is None and optional:
        return
    label = what or name
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ConfigError(f"{label} must be an integer{_allowed(rng, choices)}, got {value!r}.")
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ConfigError(f"{label} must be a number{_allowed(rng, choices)}, got {value!r}.")
    if rng is not None and value not in rng:
        raise ConfigError(f"{label} must be {rng.describe()}, got {value!r}.")
    if choices is not None and value not in tuple(choices):
        raise ConfigError(f"{label} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _allowed(rng: Interval | None, choices: Any) -> str:
    if rng is not None:
        return f" {rng.describe()}"
    return f" (one of {', '.join(map(str, choices))})" if choices is not None else ""


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass instance that declares a ``range`` or ``choices``."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        rng, choices = _range_of(f), f.metadata.get("choices")
        if rng is None and choices is None:
            continue
        kind, optional = _kind(hints.get(f.name))
        check_value(f.name, getattr(config, f.name), rng=rng, choices=choices, kind=kind, optional=optional,
                    what=f"{type(config).__name__}.{f.name}")


def range_help(f: dataclasses.Field) -> str:
    """The help text of a field with its range appended, e.g. ``"ablation masks per forward pass; >= 1"``."""
    rng = _range_of(f)
    return f.metadata["help"] + (f"; {rng.describe()}" if rng is not None else "")


def argparse_type(kind: Callable[[str], Any], rng: str | Interval | None, option: str = "") -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``kind`` and refuses values outside ``rng`` (one clear line)."""
    import argparse

    bounds = None if rng is None else interval(rng)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            noun = "an integer" if kind is int else "a number" if kind is float else kind.__name__
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if bounds is not None and value not in bounds:
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()}, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its messages
    return parse
