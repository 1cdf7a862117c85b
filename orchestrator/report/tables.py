"""Result tables from MLflow trial runs, in the paper's shape (``mtcae table``).

Pipeline: :func:`orchestrator.report.results.load_runs` (MLflow -> one row per dataset/arch/configuration/
fold) -> :func:`orchestrator.report.results.aggregate` (mean ± std over folds per dataset/arch, folds
present vs expected, the configuration chosen on validation; conventions in that module) ->
table builders (:func:`table1`, :func:`comparison_tables`, :func:`recall_tables`,
:func:`compare_archs`, here) -> renderers (``render``: Markdown, LaTeX; ``figures``) ->
``export.make_tables`` writes the files and logs them to the sweep's parent run.

Tables show percent, like the paper; ``±`` is the sample standard deviation over folds (none for a
single fold); missing, failed and running folds are listed next to every mean. Datasets without a
paper reference (e.g. ``demo``) show ``n/a`` in the paper columns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import vocab
from orchestrator.report import paper
from orchestrator.report.results import (
    SCALE,
    arch_rank,
    chosen_runs,
    dataset_rank,
)
from orchestrator.tracking import (
    RECALL_PREFIX,
)

logger = logging.getLogger(__name__)

WILCOXON_MIN_PAIRS = 5  # below this the signed-rank test is not reported
ALPHA = 0.05
MISSING = "—"
NA = "n/a"


@dataclass
class Table:
    """A rendered-agnostic table.

    Attributes:
        name: file stem of its exports (``table1``, ``table2_ravdess`` ...).
        title: caption.
        cells: display strings without markup; columns may be a 2-level MultiIndex (group, name).
        marks: same shape as ``cells``: ``"best"`` (bold), ``"second"`` (underline) or ``""``.
        data: machine-readable numbers for the CSV export.
        align: LaTeX column alignment per column (``l``, ``c``, ``r``).
        notes: lines printed under the table (missing folds, selection, legend).
    """

    name: str
    title: str
    cells: pd.DataFrame
    marks: pd.DataFrame
    data: pd.DataFrame
    align: list[str]
    notes: list[str] = field(default_factory=list)


def fmt_mean_std(mean: float, std: float) -> str:
    """``82.10 ± 1.23``; no ``±`` when std is undefined; ``—`` when there is no mean."""
    if pd.isna(mean):
        return MISSING
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def _fmt_num(value: float | None, signed: bool = False, missing: str = NA) -> str:
    if value is None or pd.isna(value):
        return missing
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def rank_marks(values: pd.Series, second: bool = False) -> pd.Series:
    """``best`` on the maximum of ``values`` (ties included), ``second`` on the runner-up.

    Nothing is marked when there are no values, or when several values all tie.
    """
    marks = pd.Series("", index=values.index, dtype=object)
    numeric = pd.to_numeric(values, errors="coerce")
    present = numeric.dropna()
    if present.empty or (len(present) > 1 and present.nunique() == 1):
        return marks
    top = numeric.max()
    marks[numeric == top] = "best"
    rest = numeric[numeric < top]
    if second and len(rest):
        marks[numeric == rest.max()] = "second"
    return marks


PROTOCOL_NOTES = {
    vocab.SELECTION_NESTED: "nested selection: each fold's configuration was chosen on a validation slice of that "
              "fold's own training subjects; test subjects never influenced a choice",
    vocab.SELECTION_POOLED: "selection on pooled folds (optimistic): configurations were chosen on validation "
              "slices holding other folds' test subjects",
}


def protocol_notes(agg: pd.DataFrame) -> list[str]:
    """One line per selection protocol the groups used (nothing for fixed configurations)."""
    protocols = agg["protocol"].dropna().unique() if "protocol" in agg else []
    return [PROTOCOL_NOTES[p] for p in sorted(protocols) if p in PROTOCOL_NOTES]


def chance_note(agg: pd.DataFrame) -> str:
    """``chance UAR (1 / classes): RAVDESS 14.29, ...`` for the datasets whose class count is known."""
    if "n_classes" not in agg:
        return ""
    parts = []
    for dataset in sorted(agg["dataset"].unique(), key=dataset_rank):
        counts = agg.loc[agg["dataset"] == dataset, "n_classes"].dropna()
        if len(counts):
            parts.append(f"{paper.dataset_display(dataset)} {SCALE / counts.max():.2f}")
    return f"chance UAR (1 / classes): {', '.join(parts)}" if parts else ""


def _notes_for_groups(agg: pd.DataFrame) -> list[str]:
    notes = protocol_notes(agg)
    for row in agg.itertuples():
        problems = [
            f"{label} {getattr(row, col)}"
            for label, col in (("missing fold(s)", "folds_missing"), ("failed fold(s)",
                               "folds_failed"), ("running fold(s)", "folds_running"))
            if getattr(row, col)
        ]
        if problems:
            done = f"{row.folds_done}/{row.folds_expected} folds done"
            notes.append(f"{paper.dataset_display(row.dataset)} / {row.arch}: {done}; "
                         + "; ".join(problems))
        if row.n_configs > 1:
            notes.append(f"{paper.dataset_display(row.dataset)} / {row.arch}: config "
                         f"{row.config_hash} chosen among {row.n_configs} by folds done, then the "
                         f"mean of its selection metric at the selected epoch (never a test metric)")
    return notes


def table1(agg: pd.DataFrame) -> Table:
    """Table 1: rows = structure strategy, columns = UAR/WAR per dataset next to the paper's.

    Per dataset: measured ``UAR`` and ``WAR`` (mean ± std), the ``paper`` value and ``Δ``
    (measured - paper), and ``folds`` done/expected. The best measured and the best paper value
    per dataset and metric are marked ``best``.
    """
    datasets = sorted(agg["dataset"].unique(), key=dataset_rank)
    archs = sorted(agg["arch"].unique(), key=arch_rank)
    cells: dict[tuple[str, str], list[str]] = {
        ("", "MTL Type"): [paper.arch_info(a).mtl_type for a in archs],
        ("", "Decoder"): [paper.arch_info(a).decoder_label for a in archs],
    }
    marks: dict[tuple[str, str], list[str]] = {}
    data_rows = []
    for dataset in datasets:
        group = agg[agg["dataset"] == dataset].set_index("arch").reindex(archs)
        display = paper.dataset_display(dataset)
        for metric, ref_index in (("uar", 0), ("war", 1)):
            label = metric.upper()
            mean, std = group[f"{metric}_mean"].to_numpy(), group[f"{metric}_std"].to_numpy()
            ref = [paper_value(dataset, a, ref_index) for a in archs]
            cells[(display, label)] = [fmt_mean_std(m, s) for m, s in zip(mean, std)]
            cells[(display, f"{label} paper")] = [_fmt_num(r) for r in ref]
            cells[(display, f"Δ{label}")] = [
                _fmt_num(None if r is None else m - r, signed=True) for m, r in zip(mean, ref)
            ]
            marks[(display, label)] = rank_marks(pd.Series(mean, dtype=float)).tolist()
            marks[(display, f"{label} paper")] = rank_marks(pd.Series(ref, dtype=float)).tolist()
        cells[(display, "folds")] = [
            MISSING if pd.isna(d) else f"{int(d)}/{int(e)}"
            for d, e in zip(group["folds_done"], group["folds_expected"])
        ]
        data_rows.append(_table1_data(group, dataset))
    frame = pd.DataFrame(cells)
    mark_frame = pd.DataFrame({k: marks.get(k, [""] * len(archs)) for k in cells})
    notes = _notes_for_groups(agg)
    chance = chance_note(agg)
    if chance:
        notes.append(chance)
    if any(dataset not in paper.DATASETS for dataset in datasets):
        notes.append("n/a: the paper reports no result for this dataset")
    align = ["l", "l"] + ["r"] * (frame.shape[1] - 2)
    data = pd.concat(data_rows, ignore_index=True) if data_rows else pd.DataFrame()
    title = "Table 1: structure strategies, test UAR/WAR (%) over folds vs. the paper"
    if "protocol" in agg and (agg["protocol"] == vocab.SELECTION_POOLED).any():
        title += " (selection on pooled folds, optimistic)"
    return Table("table1", title, frame, mark_frame, data, align, notes)


def paper_value(dataset: str, arch: str, index: int) -> float | None:
    ref = paper.paper_table1(dataset, arch)
    return None if ref is None else ref[index]


def _table1_data(group: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = []
    for arch, row in group.iterrows():
        if pd.isna(row.get("folds_done")):
            continue
        info = paper.arch_info(arch)
        entry = {"dataset": dataset, "arch": arch, "mtl_type": info.mtl_type,
                 "decoder": info.decoder_label, "config_hash": row["config_hash"]}
        for metric, ref_index in (("uar", 0), ("war", 1)):
            ref = paper_value(dataset, arch, ref_index)
            entry[f"{metric}_mean"] = row[f"{metric}_mean"]
            entry[f"{metric}_std"] = row[f"{metric}_std"]
            entry[f"{metric}_paper"] = np.nan if ref is None else ref
            entry[f"{metric}_delta"] = np.nan if ref is None else row[f"{metric}_mean"] - ref
        for col in ("done", "expected", "missing", "failed", "running"):
            entry[f"folds_{col}"] = row[f"folds_{col}"]
        rows.append(entry)
    return pd.DataFrame(rows)


def _ssl_flag(runs: pd.DataFrame) -> bool | None:
    """Self-supervised = every run's encoder started from a (VideoMAE) checkpoint.

    A run without an ``encoder_checkpoint`` param but with its hyperparameters (``param.arch``) had
    none: unset settings are not logged (``resolved_params``). None when no run logged its
    hyperparameters.
    """
    if "param.arch" not in runs:
        return None
    logged = runs[runs["param.arch"].notna()]
    if logged.empty:
        return None
    if "param.encoder_checkpoint" not in logged:
        return False
    values = logged["param.encoder_checkpoint"]
    return bool((values.notna() & ~values.astype(str).isin(["", "None", "none", "null"])).all())


def _flag(value: bool | None) -> str:
    return "?" if value is None else ("✓" if value else "×")


def comparison_tables(agg: pd.DataFrame, runs: pd.DataFrame) -> list[Table]:
    """Tables 2-4: per dataset, the paper's literature rows and the measured rows, ranked by WAR.

    Literature rows are marked ``reported``; measured rows ``measured (done/expected folds)``.
    Datasets without literature rows get a table of measured rows only.
    """
    tables = []
    for dataset in sorted(agg["dataset"].unique(), key=dataset_rank):
        group = agg[agg["dataset"] == dataset]
        rows = [_literature_row(r) for r in paper.LITERATURE.get(dataset, ())]
        rows += [_measured_row(g, runs) for g in group.itertuples()]
        frame = pd.DataFrame(rows)
        frame = frame.sort_values(["war", "uar"], ascending=False, na_position="last",
                                  kind="stable").reset_index(drop=True)
        frame.insert(0, "rank", range(1, len(frame) + 1))
        tables.append(_comparison_table(dataset, frame))
    return tables


def _literature_row(row: paper.LiteratureRow) -> dict:
    return {"method": row.method, "ssl": row.ssl, "mtl": row.mtl, "uar": row.uar,
            "uar_std": np.nan, "war": row.war, "war_std": np.nan, "source": "reported"}


def _measured_row(group, runs: pd.DataFrame) -> dict:
    info = paper.arch_info(group.arch)
    mine = runs[(runs["dataset"] == group.dataset) & (runs["arch"] == group.arch)]
    name = "STL" if not info.multitask else f"{info.mtl_type} {info.decoder_label}"
    return {"method": f"{name} [{group.arch}] (this repo)", "ssl": _ssl_flag(mine),
            "mtl": info.multitask, "uar": group.uar_mean, "uar_std": group.uar_std,
            "war": group.war_mean, "war_std": group.war_std,
            "source": f"measured ({group.folds_done}/{group.folds_expected} folds)"}


def _comparison_table(dataset: str, frame: pd.DataFrame) -> Table:
    display = paper.dataset_display(dataset)
    number = paper.COMPARISON_TABLE_NUMBER.get(dataset)
    cells = pd.DataFrame({
        "Rank": frame["rank"].astype(str),
        "Method": frame["method"],
        "SSL": [_flag(v) for v in frame["ssl"]],
        "MTL": [_flag(v) for v in frame["mtl"]],
        "UAR": [fmt_mean_std(m, s) if src != "reported" else _fmt_num(m, missing="-")
                for m, s, src in zip(frame["uar"], frame["uar_std"], frame["source"])],
        "WAR": [fmt_mean_std(m, s) if src != "reported" else _fmt_num(m, missing="-")
                for m, s, src in zip(frame["war"], frame["war_std"], frame["source"])],
        "Source": frame["source"],
    })
    marks = pd.DataFrame("", index=cells.index, columns=cells.columns)
    marks["UAR"] = rank_marks(frame["uar"], second=True)
    marks["WAR"] = rank_marks(frame["war"], second=True)
    if number is None:
        name, title = f"comparison_{slug(dataset)}", f"{display}: measured rows (paper: n/a)"
        notes = [f"n/a: the paper reports no results on {display}"]
    else:
        name = f"table{number}_{slug(dataset)}"
        title = f"Table {number}: comparison with published methods on {display} (%)"
        notes = []
    notes.append("bold = best, underlined (markdown: italic) = second best; ranked by WAR")
    return Table(name, title, cells, marks, frame.assign(dataset=dataset),
                 ["r", "l", "c", "c", "r", "r", "l"], notes)


def recall_tables(agg: pd.DataFrame, runs: pd.DataFrame) -> list[Table]:
    """Per dataset: mean test recall (%) per class and architecture over the chosen folds."""
    done = chosen_runs(runs, agg)
    tables = []
    for dataset in sorted(agg["dataset"].unique(), key=dataset_rank):
        mine = done[done["dataset"] == dataset]
        columns = [c for c in mine.columns if c.startswith(RECALL_PREFIX) and mine[c].notna().any()]
        if not columns:
            continue
        means = mine.groupby("arch")[columns].mean() * SCALE
        means = means.loc[sorted(means.index, key=arch_rank)]
        classes = [c[len(RECALL_PREFIX):] for c in columns]
        cells = pd.DataFrame({"Arch": means.index})
        marks = pd.DataFrame({"Arch": [""] * len(means)})
        for cls, col in zip(classes, columns):
            cells[cls] = [_fmt_num(v, missing=MISSING) for v in means[col]]
            marks[cls] = rank_marks(means[col].reset_index(drop=True))
        data = means.set_axis(classes, axis=1).reset_index().assign(dataset=dataset)
        title = f"Per-class test recall (%) on {paper.dataset_display(dataset)}"
        tables.append(Table(f"recall_{slug(dataset)}", title, cells, marks, data,
                            ["l"] + ["r"] * len(classes), ["bold = best architecture per class"]))
    return tables


def compare_archs(
    runs: pd.DataFrame,
    agg: pd.DataFrame,
    arch_a: str,
    arch_b: str,
    metrics: Sequence[str] = ("test_uar", "test_war"),
) -> Table:
    """Paired comparison of two architectures across the folds both completed, per dataset.

    Reports mean A, mean B, mean and std of the per-fold difference A - B (percent points), the
    paired t-test (``scipy.stats.ttest_rel``) and, with at least ``WILCOXON_MIN_PAIRS`` pairs, the
    Wilcoxon signed-rank test (two-sided p-values).

    Raises:
        ValueError: an architecture has no runs.
    """
    for arch in (arch_a, arch_b):
        if arch not in set(agg["arch"]):
            raise ValueError(f"--compare: no runs for architecture {arch!r}; "
                             f"present: {sorted(set(agg['arch']))}")
    done = chosen_runs(runs, agg)
    rows = []
    for dataset in sorted(agg["dataset"].unique(), key=dataset_rank):
        mine = done[done["dataset"] == dataset]
        for metric in metrics:
            wide = mine.pivot_table(index="fold", columns="arch", values=metric, aggfunc="first")
            if arch_a not in wide or arch_b not in wide:
                continue
            pairs = wide[[arch_a, arch_b]].dropna() * SCALE
            rows.append({"dataset": dataset, "metric": metric,
                         **paired_test(pairs[arch_a].to_numpy(), pairs[arch_b].to_numpy())})
    data = pd.DataFrame(rows)
    return _comparison_result_table(data, arch_a, arch_b)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean difference and paired tests for matched fold scores ``a`` and ``b``."""
    from scipy import stats

    diff = a - b
    out = {"n_pairs": len(diff), "mean_a": np.mean(a) if len(a) else np.nan,
           "mean_b": np.mean(b) if len(b) else np.nan,
           "mean_diff": np.mean(diff) if len(diff) else np.nan,
           "std_diff": np.std(diff, ddof=1) if len(diff) > 1 else np.nan,
           "t": np.nan, "p_ttest": np.nan, "p_wilcoxon": np.nan}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if len(diff) > 1 and np.ptp(diff) > 0:  # constant differences leave t undefined
            result = stats.ttest_rel(a, b)
            out["t"], out["p_ttest"] = float(result.statistic), float(result.pvalue)
        if len(diff) >= WILCOXON_MIN_PAIRS and np.any(diff != 0):
            out["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
    out["verdict"] = _verdict(out)
    return out


def _verdict(result: dict) -> str:
    if result["n_pairs"] < 2:
        return "too few paired folds"
    if result["std_diff"] == 0:
        return "identical difference on every fold (no test)"
    p = result["p_ttest"]
    if pd.isna(p) or p >= ALPHA:
        return "no significant difference"
    return "A better" if result["mean_diff"] > 0 else "B better"


def _comparison_result_table(data: pd.DataFrame, arch_a: str, arch_b: str) -> Table:
    def p_text(p: float) -> str:
        return NA if pd.isna(p) else f"{p:.4f}"

    cells = pd.DataFrame({
        "Dataset": [paper.dataset_display(d) for d in data.get("dataset", [])],
        "Metric": [m.replace("test_", "").upper() for m in data.get("metric", [])],
        "folds": [str(n) for n in data.get("n_pairs", [])],
        f"A={arch_a}": [_fmt_num(v) for v in data.get("mean_a", [])],
        f"B={arch_b}": [_fmt_num(v) for v in data.get("mean_b", [])],
        "A-B": [_fmt_num(m, signed=True) + ("" if pd.isna(s) else f" ± {s:.2f}")
                for m, s in zip(data.get("mean_diff", []), data.get("std_diff", []))],
        "p (t-test)": [p_text(p) for p in data.get("p_ttest", [])],
        "p (Wilcoxon)": [p_text(p) for p in data.get("p_wilcoxon", [])],
        "verdict": list(data.get("verdict", [])),
    })
    marks = pd.DataFrame("", index=cells.index, columns=cells.columns)
    if len(data):
        marks.loc[data["verdict"].isin(["A better", "B better"]).to_numpy(), "verdict"] = "best"
    notes = [f"paired over folds both architectures completed (chosen configurations); "
             f"two-sided p; Wilcoxon needs >= {WILCOXON_MIN_PAIRS} pairs; alpha = {ALPHA}"]
    few = sorted({int(n) for n in data.get("n_pairs", []) if n < WILCOXON_MIN_PAIRS})
    if few:
        warning = (f"warning: only {'/'.join(map(str, few))} paired fold(s): with fewer than "
                   f"{WILCOXON_MIN_PAIRS} the t-test has little power and no Wilcoxon p is reported; "
                   "do not read 'no significant difference' as 'no difference'")
        notes.append(warning)
        logger.warning("%s vs %s: %s", arch_a, arch_b, warning)
    title = f"Paired comparison {arch_a} (A) vs {arch_b} (B), test metrics (%)"
    return Table(f"compare_{slug(arch_a)}_vs_{slug(arch_b)}", title, cells, marks, data,
                 ["l", "l", "r", "r", "r", "r", "r", "r", "l"], notes)


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
