"""Subject-independent stratified folds and explicit split files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.data.folds import Fold, check_folds, load_split_file, make_folds


def manifest(num_subjects: int = 12, num_classes: int = 7, per_cell: int = 2) -> pd.DataFrame:
    rows = []
    for s in range(1, num_subjects + 1):
        for label in range(num_classes):
            for rep in range(per_cell):
                rows.append({"clip": f"Actor_{s:02d}/02-01-{label + 1:02d}-01-01-{rep + 1:02d}-"
                                     f"{s:02d}.mp4",
                             "clip_id": f"a{s:02d}_c{label}_r{rep}", "label": label,
                             "subject": f"{s:02d}"})
    return pd.DataFrame(rows)


def subjects_of(fold: Fold, table: pd.DataFrame, role: str) -> set[str]:
    return set(table.set_index("clip_id").loc[getattr(fold, role), "subject"])


def test_invariants_hold() -> None:
    table = manifest()
    folds = make_folds(table, n_folds=5, seed=0)
    check_folds(folds, table)
    assert [f.index for f in folds] == [0, 1, 2, 3, 4]
    tested = [c for f in folds for c in f.test]
    assert sorted(tested) == sorted(table["clip_id"])  # every clip in exactly one test fold
    for fold in folds:
        roles = {r: subjects_of(fold, table, r) for r in ("train", "val", "test")}
        assert not roles["train"] & roles["val"] and not roles["train"] & roles["test"]
        assert not roles["val"] & roles["test"]
        assert roles["train"] | roles["val"] | roles["test"] == set(table["subject"])
        assert len(fold.train) + len(fold.val) + len(fold.test) == len(table)
        assert fold.subjects["test"] == sorted(roles["test"])


def test_folds_are_stratified() -> None:
    table = manifest(num_subjects=10)
    for fold in make_folds(table, n_folds=5, seed=3):
        labels = table.set_index("clip_id").loc[fold.test, "label"]
        assert labels.nunique() == 7


def test_deterministic_per_seed_and_independent_of_row_order() -> None:
    table = manifest()
    a = make_folds(table, seed=1)
    b = make_folds(table.sample(frac=1.0, random_state=5), seed=1)
    assert a == b
    c = make_folds(table, seed=2)
    assert [set(f.test) for f in a] != [set(f.test) for f in c]


@pytest.mark.parametrize("val_subjects", [0.15, 0.4, 2, 0])
def test_validation_subject_count(val_subjects: float) -> None:
    table = manifest(num_subjects=10)
    for fold in make_folds(table, n_folds=5, val_subjects=val_subjects):
        rest = len(fold.subjects["train"]) + len(fold.subjects["val"])
        expected = val_subjects if isinstance(val_subjects, int) else max(1, round(val_subjects *
                                                                                 rest))
        assert len(fold.subjects["val"]) == expected
        assert len(fold.val) == expected * 14


def test_tiny_datasets_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="cannot make 5 subject-independent folds from 3"):
        make_folds(manifest(num_subjects=3), n_folds=5)
    with pytest.raises(ValueError, match="cannot carve 4 validation"):
        make_folds(manifest(num_subjects=5), n_folds=5, val_subjects=4)
    with pytest.raises(ValueError, match="lacks column"):
        make_folds(manifest().drop(columns="subject"))
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        make_folds(manifest(), n_folds=1)


def test_check_folds_catches_violations() -> None:
    table = manifest(num_subjects=6)
    fold = make_folds(table, n_folds=3)[0]
    leaky = Fold(0, fold.train + fold.test[:1], fold.val, fold.test)
    with pytest.raises(ValueError, match="in both"):
        check_folds([leaky], table)
    with pytest.raises(ValueError, match="not in exactly one test fold"):
        check_folds([fold], table)


def test_subject_fold_mapping_text_and_json(tmp_path: Path) -> None:
    table = manifest(num_subjects=6)
    text = tmp_path / "split.txt"
    text.write_text("subject,fold\n" + "".join(f"{s:02d} -> {(s - 1) // 2}\n" for s in range(1, 7)))
    folds = load_split_file(text, table, val_subjects=1)
    assert [f.subjects["test"] for f in folds] == [["01", "02"], ["03", "04"], ["05", "06"]]
    check_folds(folds, table)
    js = tmp_path / "split.json"
    js.write_text(json.dumps({f"{s:02d}": (s - 1) // 2 for s in range(1, 7)}))
    assert [f.test for f in load_split_file(js, table, val_subjects=1)] == [f.test for f in folds]
    js.write_text(json.dumps({"01": 0, "99": 1}))
    with pytest.raises(ValueError, match=r"subject\(s\) \['99'\] are not in the manifest"):
        load_split_file(js, table)


def test_mae_dfer_split_directory(tmp_path: Path) -> None:
    """MAE-DFER layout: splitNN/{train,test}.csv of '<frame dir> <label>' lines."""
    table = manifest(num_subjects=6)
    for k, subjects in enumerate(((1, 2), (3, 4), (5, 6)), 1):
        lines = [f"/data/RAVDESS/face_aligned/{Path(c).parent.name}/{Path(c).stem} 3"
                 for c in table["clip"] if int(Path(c).stem[-2:]) in subjects]
        (tmp_path / f"split0{k}").mkdir()
        (tmp_path / f"split0{k}" / "test.csv").write_text("\n".join(lines) + "\n")
    folds = load_split_file(tmp_path, table, val_subjects=1)
    assert [f.subjects["test"] for f in folds] == [["01", "02"], ["03", "04"], ["05", "06"]]
    check_folds(folds, table)


def test_path_label_fold_lines_and_overlap_error(tmp_path: Path) -> None:
    table = manifest(num_subjects=4)
    clips = table["clip"].tolist()
    split = tmp_path / "split.txt"
    split.write_text("".join(f"{c} 0 {int(Path(c).stem[-2:]) % 2}\n" for c in clips))
    folds = load_split_file(split, table, val_subjects=1)
    assert [f.subjects["test"] for f in folds] == [["02", "04"], ["01", "03"]]
    one = tmp_path / "one.txt"
    one.write_text(f"{clips[0]} 0\n")
    (fold,) = load_split_file(one, table, val_subjects=1)
    assert fold.subjects["test"] == ["01"] and len(fold.test) == 14
    split.write_text(f"{clips[0]} 0 0\n{clips[1]} 0 1\n")  # subject 01 in two test folds
    with pytest.raises(ValueError, match="test sets of folds 0 and 1"):
        load_split_file(split, table)
    with pytest.raises(FileNotFoundError):
        load_split_file(tmp_path / "missing.txt", table)
