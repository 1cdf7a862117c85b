"""Tables as text: Markdown for the terminal and MLflow, LaTeX for the paper."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pandas as pd

from orchestrator.report.tables import Table

logger = logging.getLogger(__name__)


def _flat_columns(cells: pd.DataFrame) -> list[str]:
    if isinstance(cells.columns, pd.MultiIndex):
        return [" ".join(p for p in col if p) for col in cells.columns]
    return [str(c) for c in cells.columns]


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with the title as a heading and notes below."""
    header = _flat_columns(table.cells)
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else ":---:" if a == "c" else ":---"
                               for a in table.align) + " |"]
    for i in range(len(table.cells)):
        row = []
        for j in range(len(header)):
            text, mark = str(table.cells.iat[i, j]), table.marks.iat[i, j]
            styled = {"best": f"**{text}**", "second": f"_{text}_"}.get(mark, text)
            row.append(styled)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the table symbols (± Δ ✓ × —) to math/text commands."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_header(cells: pd.DataFrame) -> list[str]:
    if not isinstance(cells.columns, pd.MultiIndex):
        return [" & ".join(latex_escape(c) for c in cells.columns) + r" \\"]
    groups, rules, start = [], [], 1
    for name, size in _runs_of(cells.columns.get_level_values(0)):
        groups.append(rf"\multicolumn{{{size}}}{{c}}{{{latex_escape(name)}}}" if name else
                      " & ".join([""] * size))
        if name:
            rules.append(rf"\cmidrule(lr){{{start}-{start + size - 1}}}")
        start += size
    subs = " & ".join(latex_escape(c) for c in cells.columns.get_level_values(1))
    return [" & ".join(groups) + r" \\", " ".join(rules), subs + r" \\"]


def _runs_of(values: Iterable[str]) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def to_latex(table: Table) -> str:
    """A ``booktabs`` table (needs ``\\usepackage{booktabs}`` and ``amssymb`` for ✓)."""
    body = []
    for i in range(len(table.cells)):
        row = []
        for j in range(table.cells.shape[1]):
            text, mark = latex_escape(table.cells.iat[i, j]), table.marks.iat[i, j]
            row.append(rf"\textbf{{{text}}}" if mark == "best" else
                       rf"\underline{{{text}}}" if mark == "second" else text)
        body.append(" & ".join(row) + r" \\")
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.name}}}", rf"\begin{{tabular}}{{{''.join(table.align)}}}",
             r"\toprule", *_latex_header(table.cells), r"\midrule", *body, r"\bottomrule",
             r"\end{tabular}"]
    if table.notes:
        notes = "; ".join(latex_escape(n) for n in table.notes)
        lines.append(rf"\par\smallskip{{\footnotesize {notes}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
                  "✓": r"\checkmark", "×": r"$\times$", "—": "--"}
