"""orchestrator.report.tables on runs with known metrics written to a real MLflow SQLite store."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from scipy import stats

from orchestrator.cli import main
from orchestrator.report import export, render, results, tables
from orchestrator.tracking import (
    TrialLogger,
    default_tracking_uri,
    ensure_experiment,
    get_or_create_run,
)

EXPERIMENT = "mtcae-test"
SWEEP = "s1"
# Test UAR per fold (fraction); WAR = UAR + WAR_OFFSET. None = the fold's run failed; a fold
# absent from the list beyond its length has no run at all.
RAVDESS_UAR = {
    "stl": [0.70, 0.72, 0.74, 0.71, 0.73],
    "shared_mlp": [0.75, 0.75, 0.80, 0.75, 0.75],
    "nonshared_vit": [0.80, 0.82, 0.81, None, 0.83],
    "cascaded_vit": [0.84, 0.86, 0.85, 0.87],  # fold 4 missing
}
DEMO_UAR = {"stl": [0.40, 0.50], "cascaded_vit": [0.60, 0.70]}
WAR_OFFSET = 0.02
CLASSES = ("angry", "happy")


def _log_fold(uri, dataset, arch, fold, uar, n_folds, *, stage="cv", config="c1", val_uar=0.5,
              parent=None, key_suffix="", checkpoint="videomae_k400.pth", sweep=SWEEP):
    tags = {"dataset": dataset, "arch": arch, "fold": fold, "sweep": sweep, "stage": stage,
            "config_hash": config}
    params = {"dataset": dataset, "arch": arch, "fold": fold, "n_folds": n_folds}
    if checkpoint is not None:  # as resolved_params: an unset setting is not logged
        params["encoder_checkpoint"] = checkpoint
    key = f"{sweep}/{stage}/{dataset}/{arch}/{config}/f{fold}{key_suffix}"
    logger = TrialLogger(uri, EXPERIMENT, key, f"{dataset}-{arch}-f{fold}", tags, params, parent)
    logger.log_epoch({"train_loss": 1.0, "val_uar": val_uar}, 0)
    if uar is None:
        logger.finish("FAILED")
        return
    final = {"test_uar": uar, "test_war": uar + WAR_OFFSET, "test_accuracy": uar + WAR_OFFSET,
             "best_epoch": 0, "test_recall_angry": uar - 0.05, "test_recall_happy": uar + 0.05}
    logger.log_metrics(final, 0)
    logger.finish()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tables_out")
    uri = default_tracking_uri(out)
    exp = ensure_experiment(uri, EXPERIMENT)
    parent = get_or_create_run(uri, exp, f"sweep/{SWEEP}", SWEEP, {"stage": "sweep", "sweep": SWEEP})
    # A per-group parent run as the sweep driver makes them: dataset/arch tags but no fold.
    group = get_or_create_run(uri, exp, f"group/{SWEEP}/ravdess/stl", "ravdess-stl",
                              {"stage": "group", "sweep": SWEEP, "dataset": "ravdess", "arch": "stl"},
                              parent_run_id=parent)
    MlflowClient(uri).log_metric(group, "test_uar", 0.99)
    for dataset, table, n_folds in (("ravdess", RAVDESS_UAR, 5), ("demo", DEMO_UAR, 2)):
        for arch, values in table.items():
            for fold, uar in enumerate(values):
                _log_fold(uri, dataset, arch, fold, uar, n_folds, parent=parent)
    # An earlier failed attempt at a fold that later finished: must not count as failed.
    _log_fold(uri, "ravdess", "cascaded_vit", 0, None, 5, key_suffix="-old")
    # Search stage: config "hi" has the better validation score but the worse test score.
    for fold in range(2):
        _log_fold(uri, "ravdess", "stl", fold, 0.60, 2, stage="search", config="hi", val_uar=0.9)
        _log_fold(uri, "ravdess", "stl", fold, 0.95, 2, stage="search", config="lo", val_uar=0.1)
    return {"uri": uri, "out": out, "parent": parent}


@pytest.fixture(scope="module")
def loaded(store) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = results.load_runs(store["uri"], EXPERIMENT, sweep=SWEEP, stage="cv")
    return runs, results.aggregate(runs)


def _group(agg: pd.DataFrame, dataset: str, arch: str) -> pd.Series:
    row = agg[(agg["dataset"] == dataset) & (agg["arch"] == arch)]
    assert len(row) == 1
    return row.iloc[0]


def _done(values: list) -> np.ndarray:
    return np.array([v for v in values if v is not None]) * 100


def test_load_runs_one_row_per_fold(loaded):
    runs, _ = loaded
    expected = sum(len(v) for v in RAVDESS_UAR.values()) + sum(len(v) for v in DEMO_UAR.values())
    assert len(runs) == expected  # duplicate fold and parent run excluded, search runs excluded
    assert set(runs["stage"]) == {"cv"}
    assert str(runs["fold"].dtype) == "Int64"
    cascaded0 = runs[(runs["arch"] == "cascaded_vit") & (runs["dataset"] == "ravdess")
                     & (runs["fold"] == 0)]
    assert cascaded0["status"].tolist() == ["FINISHED"]
    assert {"test_uar", "test_recall_angry", "param.encoder_checkpoint"} <= set(runs.columns)


def test_aggregate_mean_std_over_folds(loaded):
    _, agg = loaded
    row = _group(agg, "ravdess", "stl")
    values = _done(RAVDESS_UAR["stl"])
    assert row["uar_mean"] == pytest.approx(values.mean())
    assert row["uar_std"] == pytest.approx(values.std(ddof=1))
    assert row["war_mean"] == pytest.approx(values.mean() + WAR_OFFSET * 100)
    assert (row["folds_done"], row["folds_expected"], bool(row["complete"])) == (5, 5, True)
    assert list(agg["dataset"].unique()) == ["ravdess", "demo"]  # paper datasets first
    ravdess_order = agg.loc[agg["dataset"] == "ravdess", "arch"].tolist()
    assert ravdess_order == ["stl", "nonshared_vit", "shared_mlp", "cascaded_vit"]  # paper order


def test_missing_and_failed_folds_are_shown_not_averaged(loaded):
    _, agg = loaded
    cascaded = _group(agg, "ravdess", "cascaded_vit")
    assert (cascaded["folds_done"], cascaded["folds_missing"], cascaded["folds_failed"]) == (4, "4", "")
    assert not cascaded["complete"]
    assert cascaded["uar_mean"] == pytest.approx(_done(RAVDESS_UAR["cascaded_vit"]).mean())
    nonshared = _group(agg, "ravdess", "nonshared_vit")
    assert (nonshared["folds_done"], nonshared["folds_failed"], nonshared["folds_missing"]) == (4, "3", "")
    assert nonshared["uar_mean"] == pytest.approx(_done(RAVDESS_UAR["nonshared_vit"]).mean())
    notes = "\n".join(tables.table1(agg).notes)
    assert "RAVDESS / cascaded_vit: 4/5 folds done; missing fold(s) 4" in notes
    assert "RAVDESS / nonshared_vit: 4/5 folds done; failed fold(s) 3" in notes


def _cell(table: tables.Table, arch_label: tuple[str, str], column: tuple[str, str]):
    cells = table.cells
    mask = (cells[("", "MTL Type")] == arch_label[0]) & (cells[("", "Decoder")] == arch_label[1])
    index = cells.index[mask][0]
    return cells.at[index, column], table.marks.at[index, column]


def test_table1_paper_columns_delta_and_bold(loaded):
    _, agg = loaded
    t1 = tables.table1(agg)
    cascaded = ("Cascaded", "ViT Decoder")
    mean = _done(RAVDESS_UAR["cascaded_vit"])
    text, mark = _cell(t1, cascaded, ("RAVDESS", "UAR"))
    assert text == f"{mean.mean():.2f} ± {mean.std(ddof=1):.2f}" and mark == "best"
    assert _cell(t1, cascaded, ("RAVDESS", "UAR paper")) == ("82.73", "best")
    assert _cell(t1, cascaded, ("RAVDESS", "ΔUAR"))[0] == f"{mean.mean() - 82.73:+.2f}"
    assert _cell(t1, cascaded, ("RAVDESS", "folds"))[0] == "4/5"
    assert _cell(t1, ("STL", "-"), ("RAVDESS", "WAR paper")) == ("74.44", "")
    assert _cell(t1, ("STL", "-"), ("RAVDESS", "UAR"))[1] == ""
    assert _cell(t1, ("Fully Shared", "MLP"), ("demo", "UAR")) == ("—", "")  # not run on demo
    assert _cell(t1, cascaded, ("demo", "UAR paper"))[0] == "n/a"
    assert _cell(t1, cascaded, ("demo", "ΔWAR"))[0] == "n/a"
    markdown = render.to_markdown(t1)
    assert f"**{text}**" in markdown and "**82.73**" in markdown
    assert "| MTL Type | Decoder | RAVDESS UAR | RAVDESS UAR paper |" in markdown
    data = t1.data.set_index(["dataset", "arch"])
    assert data.loc[("ravdess", "cascaded_vit"), "uar_paper"] == 82.73
    assert np.isnan(data.loc[("demo", "cascaded_vit"), "war_paper"])


def test_comparison_tables_rank_literature_and_measured_rows(loaded):
    runs, agg = loaded
    by_name = {t.name: t for t in tables.comparison_tables(agg, runs)}
    assert set(by_name) == {"table2_ravdess", "comparison_demo"}
    t2 = by_name["table2_ravdess"]
    assert len(t2.cells) == 8 + 4
    assert (t2.cells["Source"] == "reported").sum() == 8
    wars = [float(re.match(r"[\d.]+", w).group()) for w in t2.cells["WAR"]]
    assert wars == sorted(wars, reverse=True)
    assert t2.cells["Rank"].tolist() == [str(i) for i in range(1, 13)]
    mtformer = t2.cells[t2.cells["Method"] == "MTFormer [27]"].iloc[0]
    assert (mtformer["SSL"], mtformer["MTL"], mtformer["UAR"], mtformer["WAR"]) == ("✓", "✓", "79.40", "79.68")
    lstm = t2.cells[t2.cells["Method"] == "VO-LSTM [9]"].iloc[0]
    assert (lstm["SSL"], lstm["MTL"], lstm["UAR"]) == ("×", "×", "-")
    stl = t2.cells[t2.cells["Method"].str.contains(r"\[stl\]")].iloc[0]
    assert (stl["SSL"], stl["MTL"], stl["Source"]) == ("✓", "×", "measured (5/5 folds)")
    top = t2.cells.index[t2.marks["WAR"] == "best"].tolist()
    assert t2.cells.loc[top, "Method"].tolist() == ["Cascaded ViT Decoder [cascaded_vit] (this repo)"]
    second = t2.cells.index[t2.marks["WAR"] == "second"].tolist()
    assert t2.cells.loc[second, "Method"].tolist() == ["MTCAE-DFER (paper)"]  # 83.69 > 83.50
    demo = by_name["comparison_demo"]
    assert len(demo.cells) == 2 and set(demo.cells["Source"]) == {"measured (2/2 folds)"}
    assert any("n/a" in n for n in demo.notes)


def test_ssl_column_reads_a_run_without_a_checkpoint_param_as_no(tmp_path):
    """The demo's runs train from the seeded random init and log no ``encoder_checkpoint``: their
    SSL cell is ×, not ?; and one run with a checkpoint among runs without is not enough for ✓."""
    uri = default_tracking_uri(tmp_path)
    ensure_experiment(uri, EXPERIMENT)

    def ssl_cells(sweep: str) -> dict[str, str]:
        runs = results.load_runs(uri, EXPERIMENT, sweep=sweep, stage="cv")
        (demo,) = tables.comparison_tables(results.aggregate(runs), runs)
        return dict(zip(demo.cells["Method"].str.extract(r"\[(\w+)\]")[0], demo.cells["SSL"]))

    for arch in ("stl", "cascaded_vit"):
        for fold in range(2):
            _log_fold(uri, "demo", arch, fold, 0.5, 2, checkpoint=None)
    assert ssl_cells(SWEEP) == {"stl": "×", "cascaded_vit": "×"}
    for fold, checkpoint in enumerate((None, "videomae_k400.pth")):
        _log_fold(uri, "demo", "stl", fold, 0.5, 2, checkpoint=checkpoint, sweep="mixed")
    assert ssl_cells("mixed") == {"stl": "×"}


def test_recall_table_means_per_class(loaded):
    runs, agg = loaded
    by_name = {t.name: t for t in tables.recall_tables(agg, runs)}
    recall = by_name["recall_ravdess"]
    assert list(recall.cells.columns) == ["Arch", "angry", "happy"]
    row = recall.cells[recall.cells["Arch"] == "stl"].iloc[0]
    expected = _done(RAVDESS_UAR["stl"]).mean()
    assert row["angry"] == f"{expected - 5:.2f}" and row["happy"] == f"{expected + 5:.2f}"
    best = recall.cells.loc[recall.marks["angry"] == "best", "Arch"].tolist()
    assert best == ["cascaded_vit"]


def test_paired_comparison_matches_scipy(loaded):
    runs, agg = loaded
    result = tables.compare_archs(runs, agg, "shared_mlp", "stl").data
    war = result[(result["dataset"] == "ravdess") & (result["metric"] == "test_war")].iloc[0]
    a, b = _done(RAVDESS_UAR["shared_mlp"]), _done(RAVDESS_UAR["stl"])
    assert war["n_pairs"] == 5
    assert war["mean_diff"] == pytest.approx((a - b).mean())
    assert war["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert war["p_wilcoxon"] == pytest.approx(0.0625)  # 5 positive differences, exact test
    assert war["verdict"] == "A better"
    # Only the folds both completed are paired: cascaded lacks fold 4.
    cascaded = tables.compare_archs(runs, agg, "cascaded_vit", "stl")
    first = cascaded.data[cascaded.data["dataset"] == "ravdess"].iloc[0]
    assert first["n_pairs"] == 4 and np.isnan(first["p_wilcoxon"])
    assert any(n.startswith("warning: only") and "4 paired fold" in n for n in cascaded.notes)
    assert not any(n.startswith("warning") for n in tables.compare_archs(runs, agg, "shared_mlp", "stl").notes
                   if "ravdess" in n)
    with pytest.raises(ValueError, match="no runs for architecture 'nope'"):
        tables.compare_archs(runs, agg, "nope", "stl")


def test_search_stage_selects_config_by_validation_not_test(store):
    runs = results.load_runs(store["uri"], EXPERIMENT, sweep=SWEEP, stage="search")
    agg = results.aggregate(runs)
    row = _group(agg, "ravdess", "stl")
    assert (row["config_hash"], row["n_configs"]) == ("hi", 2)
    assert row["uar_mean"] == pytest.approx(60.0)
    cv = results.load_runs(store["uri"], EXPERIMENT, stage="cv")
    assert len(results.load_runs(store["uri"], EXPERIMENT, stage="auto")) == len(cv)
    every = results.load_runs(store["uri"], EXPERIMENT, stage=None)  # group/sweep parents left out
    assert len(every) == len(cv) + len(runs) and every["fold"].notna().all()
    assert set(every["stage"]) == {"cv", "search"}


def _latex_body(tex: str) -> list[str]:
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def test_exports_and_parent_artifacts(store, tmp_path):
    report = export.make_tables(store["uri"], EXPERIMENT, sweep=SWEEP, stage="cv",
                                export_dir=tmp_path, formats="all", compare=("shared_mlp", "stl"))
    names = {p.name for p in report.files}
    for stem in ("table1", "table2_ravdess", "comparison_demo", "recall_ravdess",
                 "compare_shared_mlp_vs_stl"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= names
    assert {"results.png", "results.pdf", "results.svg", "aggregate.csv", "runs.csv"} <= names
    assert all(p.exists() for p in report.files)
    assert (tmp_path / "results.pdf").read_bytes().startswith(b"%PDF")
    svg = (tmp_path / "results.svg").read_text()
    assert "Cascaded ViT Decoder" in svg and "cascaded_vit" not in svg  # display names, not ids
    assert "chance" in svg and "error bars: ±1 sample std over folds" in svg

    tex = (tmp_path / "table1.tex").read_text()
    n_cols = 2 + 7 * 2  # MTL type, decoder + 7 columns for each of RAVDESS and demo
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    assert len(spec) == n_cols
    for marker in ("\\toprule", "\\midrule", "\\bottomrule", "\\multicolumn{7}{c}{RAVDESS}"):
        assert marker in tex
    rows = _latex_body(tex)
    assert len(rows) == 4
    assert all(row.count(" & ") == n_cols - 1 and row.endswith("\\\\") for row in rows)
    assert rows[0].startswith("STL & - & ") and rows[-1].startswith("Cascaded & ViT Decoder & ")
    assert "\\textbf{82.73}" in tex and "$\\pm$" in tex
    tex2 = (tmp_path / "table2_ravdess.tex").read_text()
    assert len(_latex_body(tex2)) == 12 and "\\underline{" in tex2 and "\\checkmark" in tex2

    csv = pd.read_csv(tmp_path / "table1.csv")
    assert len(csv) == 6 and {"uar_mean", "uar_std", "uar_paper", "uar_delta", "folds_done"} <= set(csv)
    with Image.open(tmp_path / "results.png") as image:
        image.verify()
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 400

    assert report.parent_run_id == store["parent"]
    logged = {Path(f.path).name for f in MlflowClient(store["uri"]).list_artifacts(
        store["parent"], "tables")}
    assert logged == names
    assert "Table 1" in report.markdown and "Table 2" in report.markdown
    assert "chance UAR (1 / classes): RAVDESS 50.00" in report.markdown  # the fixture logs 2 class recalls


def test_make_tables_without_parent_or_runs(store, tmp_path):
    report = export.make_tables(store["uri"], EXPERIMENT, stage="cv", export_dir=None,
                                log_artifacts=False)
    assert report.files == [] and report.parent_run_id is None
    with pytest.raises(LookupError, match="no trial runs"):
        export.make_tables(store["uri"], EXPERIMENT, sweep="absent", export_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        results.load_runs(default_tracking_uri(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown format"):
        export.parse_formats("md,docx")
    assert export.parse_formats("all") == export.FORMATS
    assert export.parse_formats("tex,md") == ("latex", "md")


def test_cli_table_prints_and_exports(store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    export = tmp_path / "export"
    rc = main(["table", "--out", str(store["out"]), "--sweep", SWEEP, "--export-dir", str(export),
               "--format", "md,csv", "--no-log-artifacts"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### Table 1" in out and "| Cascaded | ViT Decoder |" in out
    assert (export / "table1.md").exists() and (export / "table1.csv").exists()
    assert not (export / "table1.tex").exists()
    rc = main(["table", "--out", str(tmp_path / "nothing")])
    assert rc == 2 and "no MLflow store" in capsys.readouterr().err


def test_cli_table_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["table", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tracking-uri", "--out", "--experiment", "--sweep", "--export-dir", "--format",
                   "--compare", "ARCH_A", "Table 1", "examples:"):
        assert option in text


def test_latex_escape():
    assert render.latex_escape("a_b & 50% ± Δ") == r"a\_b \& 50\% $\pm$ $\Delta$"


def test_selection_prefers_best_val_uar_over_last_val_uar():
    rows = []
    for config, best_val, last_val, test in (("a", 0.9, 0.1, 0.5), ("b", 0.2, 0.8, 0.9)):
        for fold in range(2):
            rows.append({"dataset": "demo", "arch": "stl", "config_hash": config, "fold": fold,
                         "status": "FINISHED", "best_val_uar": best_val, "val_uar": last_val,
                         "test_uar": test, "test_war": test, "test_accuracy": test})
    row = results.aggregate(pd.DataFrame(rows), n_folds=2).iloc[0]
    assert (row["config_hash"], row["n_configs"], row["uar_mean"]) == ("a", 2, 50.0)


def test_paired_test_degenerate_cases():
    constant = tables.paired_test(np.array([70.0, 80.0]), np.array([60.0, 70.0]))
    assert np.isnan(constant["p_ttest"]) and constant["verdict"].startswith("identical difference")
    single = tables.paired_test(np.array([70.0]), np.array([60.0]))
    assert single["verdict"] == "too few paired folds" and np.isnan(single["std_diff"])
    noisy = tables.paired_test(np.array([70.0, 71.0, 69.0]), np.array([70.5, 70.0, 69.5]))
    assert noisy["verdict"] == "no significant difference" and np.isnan(noisy["p_wilcoxon"])


def test_rank_marks_ties_and_runner_up():
    marks = tables.rank_marks(pd.Series([1.0, 3.0, np.nan, 3.0, 2.0]), second=True)
    assert marks.tolist() == ["", "best", "", "best", "second"]
    assert tables.rank_marks(pd.Series([5.0, 5.0])).tolist() == ["", ""]
    assert tables.rank_marks(pd.Series([5.0])).tolist() == ["best"]
