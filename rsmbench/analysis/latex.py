"""Tables as pdflatex-safe LaTeX: every non-ASCII character is written as LaTeX (math or text).

``tex(s)`` maps Greek letters, operators, sub/superscripts and combining accents (Ψ̂ = Ψ + U+0302 →
``$\\hat{\\Psi}$``) to math mode, dashes and § to text commands, and escapes LaTeX's special ASCII
characters; the result is pure ASCII. ``table`` writes a booktabs table that compiles with pdflatex
and the packages of ``PREAMBLE`` (booktabs, amsmath, amssymb).
"""
from __future__ import annotations

import unicodedata

import pandas as pd

PREAMBLE = r"\usepackage{booktabs}\usepackage{amsmath}\usepackage{amssymb}"

_GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "varepsilon", "ζ": "zeta", "η": "eta",
          "θ": "theta", "ι": "iota", "κ": "kappa", "λ": "lambda", "μ": "mu", "ν": "nu", "ξ": "xi", "π": "pi",
          "ρ": "rho", "σ": "sigma", "τ": "tau", "υ": "upsilon", "φ": "phi", "ϕ": "phi", "χ": "chi", "ψ": "psi",
          "ω": "omega", "Γ": "Gamma", "Δ": "Delta", "Θ": "Theta", "Λ": "Lambda", "Ξ": "Xi", "Π": "Pi",
          "Σ": "Sigma", "Φ": "Phi", "Ψ": "Psi", "Ω": "Omega"}
MATH = {**{k: "\\" + v + " " for k, v in _GREEK.items()},
        "·": r"\cdot ", "×": r"\times ", "−": "-", "±": r"\pm ", "√": r"\surd ", "∂": r"\partial ",
        "∇": r"\nabla ", "∝": r"\propto ", "†": r"\dagger ", "‡": r"\ddagger ", "½": r"\tfrac{1}{2}",
        "≈": r"\approx ", "≤": r"\leq ", "≥": r"\geq ", "≠": r"\neq ", "→": r"\to ", "←": r"\leftarrow ",
        "∞": r"\infty ", "‖": r"\| ", "⟨": r"\langle ", "⟩": r"\rangle ", "∈": r"\in ", "∑": r"\sum ",
        "∫": r"\int ", "≡": r"\equiv ", "∼": r"\sim ", "⊤": r"\top ", "ᵀ": r"^{\top}", "⁻": "^{-}",
        "ᾱ": r"\bar{\alpha}", "ã": r"\tilde{a}", "✕": r"\times ", "✓": r"\checkmark ", "°": r"^{\circ}",
        "∘": r"\circ ", "⊙": r"\odot ", "ℓ": r"\ell ", "∅": r"\emptyset "}
MATH.update({c: f"^{{{d}}}" for c, d in zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")})
MATH.update({c: f"_{{{d}}}" for c, d in zip("₀₁₂₃₄₅₆₇₈₉", "0123456789")})
MATH.update({"ₜ": "_{t}", "ᵢ": "_{i}", "ₖ": "_{k}", "ₙ": "_{n}"})
COMBINING = {"\u0302": "hat", "\u0303": "tilde", "\u0304": "bar", "\u0307": "dot", "\u0308": "ddot", "\u20d7": "vec"}
TEXT = {"–": "--", "—": "---", "§": r"\S{}", "\u00a0": "~", "“": "``", "”": "''", "’": "'", "‘": "`",
        "…": r"\ldots{}", "•": r"\textbullet{}", "é": r"\'e", "ü": r'\"u', "ö": r'\"o'}
ESCAPE = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
          ">": r"\textgreater{}", "|": r"\textbar{}"}


def tex(s) -> str:
    """`s` as pure-ASCII LaTeX text (consecutive math symbols share one ``$…$``)."""
    s = str(s)
    out: list[tuple[bool, str]] = []  # (math?, token)
    i = 0
    while i < len(s):
        c = s[i]
        accents = []
        while i + 1 + len(accents) < len(s) and s[i + 1 + len(accents)] in COMBINING:
            accents.append(COMBINING[s[i + 1 + len(accents)]])
        if accents:
            body = MATH.get(c, c).strip() if not c.isascii() else c
            for a in accents:
                body = f"\\{a}{{{body}}}"
            out.append((True, body))
            i += 1 + len(accents)
            continue
        if c in MATH:
            out.append((True, MATH[c]))
        elif c in TEXT:
            out.append((False, TEXT[c]))
        elif c in ESCAPE:
            out.append((False, ESCAPE[c]))
        elif c.isascii():
            out.append((False, c))
        else:  # an unmapped character: its ASCII skeleton (é → e), else its Unicode name
            plain = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
            out.append((False, plain or f"[{unicodedata.name(c, 'U+%04X' % ord(c)).lower()}]"))
        i += 1
    text, k = [], 0
    while k < len(out):
        if out[k][0]:
            j = k
            while j < len(out) and out[j][0]:
                j += 1
            text.append("$" + "".join(t for _, t in out[k:j]).strip() + "$")
            k = j
        else:
            text.append(out[k][1])
            k += 1
    return "".join(text)


def table(df: pd.DataFrame, caption: str, label: str, bold: dict | None = None, wrap: dict | None = None,
          size: str = r"\small") -> str:
    """A booktabs table of `df`; ``bold``: {column: row index} set in bold; ``wrap``: {column: width}
    (e.g. ``"3cm"``) for long text columns (a ``p{width}`` column), the others ``l``."""
    bold, wrap = bold or {}, wrap or {}
    cols = list(df.columns)
    spec = "".join(f"p{{{wrap[c]}}}" if c in wrap else "l" for c in cols)
    out = [f"% pdflatex; needs {PREAMBLE}", r"\begin{table}[t]", r"\centering", size,
           rf"\caption{{{tex(caption)}}}", rf"\label{{{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(tex(c) for c in cols) + r" \\", r"\midrule"]
    for i, row in df.iterrows():
        cells = [(rf"\textbf{{{tex(row[c])}}}" if bold.get(c) == i else tex(row[c])) for c in cols]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def document(tables: list[str]) -> str:
    """A standalone article holding `tables` (what the compile test and a reader can build)."""
    return "\n".join([r"\documentclass{article}", PREAMBLE, r"\usepackage[margin=1.5cm]{geometry}",
                      r"\begin{document}", *tables, r"\end{document}"]) + "\n"
