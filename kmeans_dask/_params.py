"""Declarative parameter constraints, checked in one place when ``fit`` starts.

In the spirit of scikit-learn's ``_parameter_constraints``: an estimator
maps each parameter to the values it accepts, and :func:`check_params`
names the parameter, what it accepts and what it got.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Number:
    """A real (or, with ``integer``, whole) number at or above ``low`` (above, if ``strict``)."""

    low: float
    integer: bool = False
    strict: bool = False

    def accepts(self, value) -> bool:
        kind = numbers.Integral if self.integer else numbers.Real
        if not isinstance(value, kind) or isinstance(value, (bool, np.bool_)):
            return False
        if math.isnan(value):
            return False
        return value > self.low if self.strict else value >= self.low

    def __str__(self) -> str:
        kind = "an int" if self.integer else "a float"
        return f"{kind} {'>' if self.strict else '>='} {self.low:g}"


@dataclass(frozen=True)
class Options:
    """One of a few strings."""

    values: tuple

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


class _Kind:
    def __init__(self, text: str, test):
        self.text, self.test = text, test

    def accepts(self, value) -> bool:
        return self.test(value)

    def __str__(self) -> str:
        return self.text


def _array_like(value) -> bool:
    return (hasattr(value, "__array__") or isinstance(value, (list, tuple))) and np.ndim(value) > 0


ARRAY = _Kind("an array-like", _array_like)
CALLABLE = _Kind("a callable", callable)
NONE = _Kind("None", lambda v: v is None)
BOOLEAN = _Kind("a bool", lambda v: isinstance(v, (bool, np.bool_)))
VERBOSE = _Kind("a bool or an int >= 0", lambda v: BOOLEAN.accepts(v) or Number(0, True).accepts(v))
RANDOM_STATE = _Kind("None, an int or a numpy RandomState",
                     lambda v: v is None or isinstance(v, np.random.RandomState)
                     or Number(0, True).accepts(v))


def check_params(estimator) -> None:
    """Raise ``ValueError`` for the first parameter no constraint of ``estimator`` accepts."""
    for name, accepted in type(estimator)._parameter_constraints.items():
        value = getattr(estimator, name)
        if not any(c.accepts(value) for c in accepted):
            what = " or ".join(str(c) for c in accepted)
            raise ValueError(f"The {name!r} parameter of {type(estimator).__name__} must be "
                             f"{what}; got {value!r}")
