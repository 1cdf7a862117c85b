"""The results figure: UAR per architecture and dataset, fold scores over the means, the paper's values marked."""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)



def plot_results(agg: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """Grouped bars of UAR/WAR per architecture, one panel per dataset.

    Bars are the fold means with ±1 std error bars; dots are the individual folds; ticks are
    the paper's values where it reports them (red).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted(agg["dataset"].unique(), key=dataset_rank)
    done = chosen_runs(runs, agg)
    fig = Figure(figsize=(1.0 + 4.2 * max(len(datasets), 1), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(datasets), 1), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        _plot_dataset(ax, agg[agg["dataset"] == dataset], done[done["dataset"] == dataset], dataset)
    axes[0].set_ylabel("test score (%)")
    axes[0].legend(loc="upper left", ncols=3, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _plot_dataset(ax, group: pd.DataFrame, folds: pd.DataFrame, dataset: str) -> None:
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
    ax.set_xticks(x, labels=list(group.index), rotation=30, ha="right", fontsize=8)
    ax.set_title(paper.dataset_display(dataset))
    ax.set_ylim(0, 110)
