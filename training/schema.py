"""The typed-config machinery every config section is built on (the run core's sections in training/config.py, the
optimizer wing's in training/optim/config.py): a dataclass field per key, its type annotation and range checked when
a section is built, errors that name the key, the value and what is allowed (`train.max_steps=2.5: must be an
integer`). It imports nothing of the project, so any wing may build its own section on it.
"""

import dataclasses
import math
import operator
import types
import typing
from dataclasses import field
from typing import ClassVar, Literal


class ConfigError(ValueError):
    """A config value, key or combination that is not allowed; the message names it."""


RANGES = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def setting(default=None, *, factory=None, **rules):
    """A config field with its allowed range (ge/gt/le/lt, checked for numbers and for each item of a list) and an
    optional `check(value) -> error text or None` for what a range cannot say."""
    unknown = set(rules) - {*RANGES, "check"}
    if unknown:
        raise TypeError(f"setting(): unknown rule(s) {sorted(unknown)}; rules: {sorted(RANGES)} and 'check'")
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


def describe(hint) -> str:
    """What a type annotation allows, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}s" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def check_value(key: str, value, hint, rules: dict | None = None):
    """`value` as the annotation `hint` wants it (an int given for a float becomes a float), or ConfigError naming
    `key`, the value and what is allowed. Ranges in `rules` apply to numbers and to every item of a list."""
    rules = rules or {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, option, rules)
            except ConfigError as err:
                if _typed_like(value, option):  # the right type but out of range: that is the error to report
                    raise err
        raise ConfigError(f"{key}={value!r}: must be {describe(hint)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}={value!r}: must be {describe(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: must be {describe(hint)}")
        return [check_value(f"{key}[{i}]", item, args[0], rules) for i, item in enumerate(value)]
    if not _typed_like(value, hint):
        raise ConfigError(f"{key}={value!r}: must be {describe(hint)}")
    given = value
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={given!r}: must be a finite number")
    for rule, bound in rules.items():
        if rule in RANGES and not RANGES[rule][1](value, bound):
            raise ConfigError(f"{key}={given!r}: must be {RANGES[rule][0]} {bound}")
    if "check" in rules and (problem := rules["check"](value)):
        raise ConfigError(f"{key}={given!r}: {problem}")
    return value


def _typed_like(value, hint) -> bool:
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int  # not bool, not 2.5, not 2.0: a step count is an integer
    if hint is float:
        return type(value) in (int, float)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    return isinstance(value, typing.get_origin(hint) or hint)


class Section:
    """Base of the config sections: every field is checked against its annotation and range on construction."""

    NAME: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(f"{self.NAME}.{f.name}", getattr(self, f.name), hints[f.name], dict(f.metadata))
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks across the section's fields (override)."""
