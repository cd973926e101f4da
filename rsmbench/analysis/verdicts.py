"""The verdict rules of the claims study (``rsmbench claims``), one function per kind of claim, on plain
per-seed values; each returns a ``Verdict``: supported, contradicted or inconclusive, with the one line
that says why and, when inconclusive, the power the test had.

- ``better``: "X beats Y" on a metric. P(X > Y) (``stats.probability_of_improvement``) with its 95 % CI:
  supported when the CI lies above ½, contradicted when it lies below ½, inconclusive otherwise, with the
  smallest difference of means detectable at these seed counts (``stats.smallest_detectable``).
- ``no_material_loss``: "pruning costs nothing material". The loss L = (unpruned − pruned) on the
  metric (sign so that a positive L is a loss) with its 95 % CI (``stats.difference``), against a
  margin m = fraction × the unpruned configuration's gain over the base model: supported when the CI's
  upper end is below m, contradicted when its lower end is above m, inconclusive otherwise.
- ``all_pass``: every check passes (an exact identity): supported, else contradicted with the failures.
- ``vanishes``: a gap that must go to 0 with a scale: supported when the gap at scale 0 is below the
  tolerance and the gap does not grow as the scale shrinks; contradicted otherwise.
- ``pattern``: every named item has the property: supported, else contradicted naming the exceptions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsmbench.analysis import stats

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass
class Verdict:
    label: str
    why: str
    power: str = ""

    def __str__(self) -> str:
        return f"**{self.label}**: {self.why}" + (f" ({self.power})" if self.power else "")


def _power(x, y, level: float, power: float) -> str:
    x, y = np.asarray(x, float), np.asarray(y, float)
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else float("nan")  # noqa: E731
    d = stats.smallest_detectable(sd(x), len(x), sd(y), len(y), alpha=level, power=power)
    return (f"with {len(x)} and {len(y)} seeds the smallest difference of means detectable at {power:.0%} power "
            f"and level {level:g} is {d:.3g}")


def better(x, y, higher: bool = True, name_x: str = "X", name_y: str = "Y", level: float = 0.05,
           power: float = 0.8) -> Verdict:
    """Does X beat Y? (per-seed values of one metric; `higher`: larger is better)."""
    sx, sy = (list(x), list(y)) if higher else ([-v for v in x], [-v for v in y])
    p, lo, hi = stats.probability_of_improvement(sx, sy, confidence=1 - level)
    text = f"P({name_x} > {name_y}) = {p:.2f} [{lo:.2f}, {hi:.2f}]"
    if len(x) < 2 or len(y) < 2:
        return Verdict(INCONCLUSIVE, text + "; one seed cannot make an interval", _power(x, y, level, power))
    if lo > 0.5:
        return Verdict(SUPPORTED, text)
    if hi < 0.5:
        return Verdict(CONTRADICTED, text)
    return Verdict(INCONCLUSIVE, text + ", the CI contains ½", _power(x, y, level, power))


def no_material_loss(pruned, unpruned, base: float, higher: bool = True, fraction: float = 0.1,
                     level: float = 0.05, power: float = 0.8) -> Verdict:
    """Is the pruned configuration's loss against the unpruned one below the material margin?"""
    sign = 1.0 if higher else -1.0
    loss, lo, hi = stats.difference([sign * v for v in unpruned], [sign * v for v in pruned], confidence=1 - level)
    gain = sign * (float(np.mean(unpruned)) - base)
    margin = fraction * abs(gain)
    text = (f"loss of the pruned form {loss:.3g} [{lo:.3g}, {hi:.3g}] against a material margin {margin:.3g} "
            f"({fraction:.0%} of the unpruned gain {gain:.3g} over the base)")
    if len(pruned) < 2 or len(unpruned) < 2:
        return Verdict(INCONCLUSIVE, text + "; one seed cannot make an interval",
                       _power(pruned, unpruned, level, power))
    if hi < margin:
        return Verdict(SUPPORTED, text)
    if lo > margin:
        return Verdict(CONTRADICTED, text)
    return Verdict(INCONCLUSIVE, text + ", the CI straddles the margin", _power(pruned, unpruned, level, power))


def all_pass(results: dict[str, bool], what: str = "checks") -> Verdict:
    failed = sorted(k for k, ok in results.items() if not ok)
    if not failed:
        return Verdict(SUPPORTED, f"all {len(results)} {what} pass")
    return Verdict(CONTRADICTED, f"{len(failed)} of {len(results)} {what} fail: {', '.join(failed)}")


def vanishes(scales, gaps, tol: float = 1e-9) -> Verdict:
    """A gap measured at decreasing scales (any order) must shrink to ≤ tol at scale 0."""
    order = np.argsort(-np.asarray(scales, float))
    s, g = np.asarray(scales, float)[order], np.asarray(gaps, float)[order]
    at_zero = g[s == 0]
    if len(at_zero) == 0:
        return Verdict(INCONCLUSIVE, "the scale 0 was not measured")
    monotone = bool(np.all(np.diff(g) <= 1e-12 + 1e-9 * np.abs(g[:-1])))
    text = "gap " + ", ".join(f"{gi:.2g} at {si:g}" for si, gi in zip(s, g))
    if at_zero.max() <= tol and monotone:
        return Verdict(SUPPORTED, text)
    why = "; it does not vanish" if at_zero.max() > tol else "; it grows as the scale shrinks"
    return Verdict(CONTRADICTED, text + why)


def pattern(values: dict[str, bool], property_text: str) -> Verdict:
    breaks = sorted(k for k, ok in values.items() if not ok)
    if not values:
        return Verdict(INCONCLUSIVE, "no method to check")
    if not breaks:
        return Verdict(SUPPORTED, f"all of {', '.join(sorted(values))} {property_text}")
    follow = sorted(k for k, ok in values.items() if ok)
    return Verdict(CONTRADICTED, f"{', '.join(breaks)} do not ({property_text}); "
                                 f"{', '.join(follow) or 'none'} do")
