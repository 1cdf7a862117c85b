"""The results figure: UAR per architecture and dataset, fold scores over the means, the paper's values and chance marked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.report import paper
from orchestrator.report.results import (
    SCALE,
    arch_rank,
    chosen_runs,
    dataset_rank,
)
from orchestrator.report.tables import paper_value
from orchestrator.tracking import RECALL_PREFIX

logger = logging.getLogger(__name__)



FIGURE_FORMATS = ("png", "pdf", "svg")  # raster for a quick look, vector for a paper


def chance_level(runs: pd.DataFrame, dataset: str) -> float | None:
    """Chance UAR (%) of a dataset: 100 / its number of classes (the per-class recall columns logged)."""
    mine = runs[runs["dataset"] == dataset]
    classes = [c for c in mine.columns if c.startswith(RECALL_PREFIX) and mine[c].notna().any()]
    return SCALE / len(classes) if classes else None


def caption(agg: pd.DataFrame) -> str:
    """What the figure shows, in one line: bars, error bars, dots, fold counts, reference lines."""
    folds = sorted({int(n) for n in agg["folds_done"].dropna()}) if len(agg) else []
    counts = "/".join(str(n) for n in folds) or "0"
    return (f"Bars: mean test score over {counts} folds; error bars: ±1 sample std over folds; dots: "
            f"single folds; dashed grey: chance (1 / classes); red: the paper's value where it reports one.")


def plot_results(agg: pd.DataFrame, runs: pd.DataFrame, path: Path,
                 formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Grouped bars of UAR/WAR per architecture, one panel per dataset, saved in every format.

    Bars are the fold means with ±1 std error bars; dots are the individual folds; red ticks are
    the paper's values where it reports them; a dashed line marks chance UAR. The caption line
    (:func:`caption`) is drawn under the panels. ``path``'s suffix is replaced per format.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted(agg["dataset"].unique(), key=dataset_rank)
    done = chosen_runs(runs, agg)
    fig = Figure(figsize=(1.0 + 4.2 * max(len(datasets), 1), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        _plot_dataset(ax, agg[agg["dataset"] == dataset], done[done["dataset"] == dataset], dataset,
                      chance_level(runs, dataset))
    axes[0].set_ylabel("test score (%)")
    axes[0].legend(loc="upper left", ncols=2, fontsize=7)
    fig.text(0.01, 0.01, caption(agg), fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, format=fmt)
        written.append(target)
    return written


def _plot_dataset(ax, group: pd.DataFrame, folds: pd.DataFrame, dataset: str, chance: float | None) -> None:
    group = group.set_index("arch").loc[sorted(group["arch"], key=arch_rank)]
    x = np.arange(len(group))
    width = 0.38
    for offset, metric, color, ref_index in ((-width / 2, "uar", "tab:blue", 0),
                                             (width / 2, "war", "tab:orange", 1)):
        ax.bar(x + offset, group[f"{metric}_mean"], width, yerr=group[f"{metric}_std"].fillna(0),
               capsize=3, color=color, alpha=0.8, label=metric.upper())
        for i, arch in enumerate(group.index):
            scores = folds.loc[folds["arch"] == arch, f"test_{metric}"] * SCALE
            ax.scatter(np.full(len(scores), i + offset), scores, s=8, color="black", zorder=3)
            ref = paper_value(dataset, arch, ref_index)
            if ref is not None:
                ax.hlines(ref, i + offset - width / 2, i + offset + width / 2, colors="crimson",
                          linewidth=2, label="paper" if (i == 0 and metric == "uar") else None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.1f}")
    labels = [paper.arch_info(a).display if a in paper.ARCH_ORDER else a for a in group.index]
    ax.set_xticks(x, labels=labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(paper.dataset_display(dataset))
    ax.set_ylim(0, 110)
