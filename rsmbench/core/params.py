"""Declared values: the type and range of every value a user can set, checked before anything runs.

``Param`` declares one value: its default, its type (inferred from the default unless given), a range
(``gt``/``ge``/``lt``/``le``), a set of ``choices``, literal ``extra`` values accepted beside the type
(e.g. ``"all"``), whether null is allowed, and, for a list, the declaration of its items. Method
hyperparameters (``Method.defaults``, with the ``hp`` helper) and the task-file schema
(``rsmbench.run.schema``) are declared with it, so that an unknown name, a wrong type and an
out-of-range value are each one line (``TaskError``) naming the value and what it accepts.

Numbers: a float accepts an int or a numeric string (``--hp beta=1e-3``: PyYAML reads ``1e-3`` as a
string) and is stored as a float; NaN is always rejected and ±inf unless ``finite=False``. An int
accepts an integral float (``2.0``). A bool is never a number.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from rsmbench.errors import TaskError

TYPES = (float, int, bool, str, list, dict)
_WORD = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
         dict: "a mapping"}


@dataclass(frozen=True)
class Param:
    default: object = None
    type: type | None = None  # one of TYPES; None: inferred from the default (any value if the default is None)
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    extra: tuple = ()  # literal values accepted besides the type (e.g. "all")
    null: bool | None = None  # None: allowed iff the default is None
    items: "Param | None" = None  # each element of a list
    length: int | None = None  # a list's exact length
    finite: bool = True

    def __post_init__(self):
        if self.type is None and self.default is not None and not self.choices:
            t = next(t for t in (bool, int, float, str, list, dict) if isinstance(self.default, t))
            object.__setattr__(self, "type", t)
        if self.null is None:
            object.__setattr__(self, "null", self.default is None)

    # -- what it accepts, in words ---------------------------------------------------------------
    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        else:
            text = _WORD.get(self.type, "any value")
            bounds = [f"{op} {_num(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                      if v is not None]
            if self.type is list:
                text = "a list" + (f" of {self.length}" if self.length is not None else "")
                if self.items is not None:
                    text += f" (each {self.items.describe()})"
            elif bounds:
                text += " " + " and ".join(bounds)
        if self.extra:
            text += " or " + " or ".join(_show(e) for e in self.extra)
        return ("null or " if self.null else "") + text

    # -- the check -------------------------------------------------------------------------------
    def check(self, value, name: str):
        """The value, converted where the type allows (int → float, numeric string → float); raises
        ``TaskError`` (one line: the name, what it accepts, what it got) otherwise."""
        if value is None:
            if self.null:
                return None
            raise TaskError(f"{name} must be {self.describe()}, got null")
        if any(type(e) is type(value) and e == value for e in self.extra):
            return value
        if self.choices is not None:
            if any(type(c) is type(value) and c == value for c in self.choices):
                return value
            raise TaskError(f"{name} must be {self.describe()}, got {_show(value)}"
                            + did_you_mean(value, self.choices))
        v = self._typed(value, name)
        if self.type in (float, int):
            for op, bound, ok in ((">", self.gt, lambda a, b: a > b), (">=", self.ge, lambda a, b: a >= b),
                                  ("<", self.lt, lambda a, b: a < b), ("<=", self.le, lambda a, b: a <= b)):
                if bound is not None and not ok(v, bound):
                    raise TaskError(f"{name} must be {self.describe()}, got {_show(value)}")
        if self.type is list:
            if self.length is not None and len(v) != self.length:
                raise TaskError(f"{name} must be {self.describe()}, got {_show(value)}")
            if self.items is not None:
                v = [self.items.check(x, f"{name}[{k}]") for k, x in enumerate(v)]
        return v

    def _typed(self, value, name):
        t = self.type
        bad = TaskError(f"{name} must be {self.describe()}, got {_show(value)}")
        if t is None:
            return value
        if t is bool:
            if isinstance(value, bool):
                return value
            raise bad
        if t is float:
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    raise bad from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            value = float(value)
            if math.isnan(value) or (self.finite and math.isinf(value)):
                raise TaskError(f"{name} must be a finite number, got {_show(value)}")
            return value
        if t is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if t is list:
            if isinstance(value, (list, tuple)):
                return list(value)
            raise bad
        if not isinstance(value, t):
            raise bad
        return value


def hp(default=None, **kw) -> Param:
    """A hyperparameter declaration next to its default, e.g. ``hp(1e-4, gt=0)``,
    ``hp("quad", choices=("quad", "linear"))``, ``hp(None, type=int, ge=1)``."""
    return Param(default, **kw)


def as_param(value) -> Param:
    """A declared value (a ``Param``) or a plain default (its type inferred, any value of that type)."""
    return value if isinstance(value, Param) else Param(value)


def did_you_mean(name, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to a mistyped string, else ''."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(values: dict, declared, where: str, noun: str = "key") -> None:
    """Every key of `values` is declared: else one line with a 'did you mean' and the valid keys."""
    for key in values:
        if key not in declared:
            raise TaskError(f"{where}: unknown {noun} {key!r}{did_you_mean(key, declared)}; valid {noun}s: "
                            + ", ".join(sorted(declared)))


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return repr(v)
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
