"""One look for every figure of the suite: a fixed colour and marker per method, family by style
(in ``core`` so that the harness figures and the report share it).

Every registered method (``rsmbench.core.method.load_all``, in sorted id order) owns one colour of
``PALETTE`` and one marker; the family is read from the style: zeroth-order methods are drawn with
solid lines and filled markers, first-order methods with dashed lines and open markers. Several
configurations of one method (a sweep's levels, a learning-rate grid) share its colour and marker and
are told apart by shade (``row_style``). Figures are sized for a page or a laptop screen at 100 %
(``WIDTH`` inches at ``DPI``) with legends outside the data (``legend_below``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rsmbench.core.method import load_all

# 18 hues that stay apart on white (tab10 + darker Kelly/Dark2 colours), one per registered method
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#000075", "#800000", "#469990", "#f032e6", "#e6ab02", "#6a3d9a",
           "#b15928", "#fb6a4a", "#4d4d00", "#00a087")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p", "h", "<", ">", "*", "d", "8", "H")
LINESTYLE = {"zeroth": "-", "first": "--"}
FAMILY = {"zeroth": "zeroth-order", "first": "first-order"}
WIDTH, DPI, FONT = 10.0, 110, 9  # 1100 px wide PNGs; 9-pt text is ≈ 14 px at 100 %
BASE = dict(color="black", ls=":", lw=1.2)  # the base-model reference line
DIVERGED_MARK = dict(marker="x", ms=8, mew=2.0)


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    ls: str
    filled: bool
    family: str

    def line(self, **kw) -> dict:
        """matplotlib kwargs of a line with markers in this style."""
        return {**dict(color=self.color, ls=self.ls, marker=self.marker, ms=5, lw=1.6,
                       mfc=self.color if self.filled else "white", mec=self.color, mew=1.3), **kw}

    def point(self, **kw) -> dict:
        """matplotlib kwargs of a marker (errorbar/scatter point) in this style, no line."""
        return {**dict(color=self.color, ls="none", marker=self.marker, ms=7,
                       mfc=self.color if self.filled else "white", mec=self.color, mew=1.5), **kw}


@lru_cache(maxsize=1)
def _registry() -> dict:
    reg = load_all()
    out, per_family = {}, {"zeroth": 0, "first": 0}
    for i, mid in enumerate(sorted(reg)):
        order = reg[mid].order
        j = per_family[order]
        per_family[order] += 1
        out[mid] = Style(PALETTE[i % len(PALETTE)], MARKERS[j % len(MARKERS)], LINESTYLE[order],
                         order == "zeroth", FAMILY[order])
    return out


def method_style(method: str) -> Style:
    """The fixed style of a registered method (grey circles for an unknown id)."""
    return _registry().get(method, Style("#555555", "o", "-.", True, "unknown family"))


def shade(color: str, k: int, n: int) -> str:
    """Variant k of n of a colour: 0 is the colour itself, later ones mix towards white, then black."""
    from matplotlib.colors import to_hex, to_rgb

    if n <= 1 or k == 0:
        return color
    rgb = to_rgb(color)
    f = 0.45 * k / (n - 1)
    mix = (1.0, 1.0, 1.0) if k % 2 else (0.0, 0.0, 0.0)
    return to_hex(tuple((1 - f) * c + f * m for c, m in zip(rgb, mix)))


def row_style(method: str, k: int = 0, n: int = 1) -> Style:
    """The style of configuration k of n of one method (same marker and line, shaded colour)."""
    s = method_style(method)
    return Style(shade(s.color, k, n), s.marker, s.ls, s.filled, s.family)


def use() -> None:
    """The suite's matplotlib defaults (Agg backend, font sizes, grid)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT, "legend.fontsize": FONT - 0.5,
        "xtick.labelsize": FONT - 0.5, "ytick.labelsize": FONT - 0.5, "axes.grid": True, "grid.alpha": 0.3,
        "figure.dpi": DPI, "savefig.dpi": DPI, "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False})


def compact_ticks(ax, axis: str = "x", n: int = 5, eng: bool = True) -> None:
    """At most `n` ticks; ``eng``: short labels for counts (2k, 1.5M) so that they never overlap."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(MaxNLocator(n))
    if eng and max(abs(v) for v in (ax.get_xlim() if axis == "x" else ax.get_ylim())) >= 1000:
        a.set_major_formatter(EngFormatter(sep=""))


def legend_below(fig, handles, labels, ncol: int | None = None, title: str | None = None, y: float = 0.0):
    """One figure legend under the panels (outside every data area); returns it."""
    ncol = ncol or min(3, max(1, len(labels)))
    return fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y), ncol=ncol, title=title,
                      handlelength=3.0, columnspacing=1.5)


def family_handles() -> tuple[list, list]:
    """Legend entries that explain the family encoding (solid/filled vs dashed/open)."""
    from matplotlib.lines import Line2D

    h = [Line2D([], [], color="0.3", ls="-", marker="o", mfc="0.3", mec="0.3"),
         Line2D([], [], color="0.3", ls="--", marker="o", mfc="white", mec="0.3")]
    return h, ["zeroth-order (solid, filled)", "first-order (dashed, open)"]


def save(fig, out, stem: str, formats=("png", "pdf")) -> list[str]:
    """Write `stem`.png/.pdf into `out` (tight bounding box, legends included); returns the names."""
    import matplotlib.pyplot as plt

    names = []
    for ext in formats:
        fig.savefig(out / f"{stem}.{ext}", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
        names.append(f"{stem}.{ext}")
    plt.close(fig)
    return names
