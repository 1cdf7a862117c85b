"""Subject-independent, class-stratified cross-validation folds over a preprocessing manifest.

The paper's protocol is 5-fold subject-independent CV. Each :class:`Fold` has three disjoint
subject sets: ``test`` (the fold), ``val`` (carved from the fold's training subjects, for early
stopping and LR scheduling, so the test fold is never used for selection) and ``train`` (the rest).

How many validation subjects: ``val_subjects`` is either a count, or a fraction of the fold's
training subjects (default 0.15, rounded, at least 1): RAVDESS 24 actors -> 19 training subjects
-> 3 validation actors; CREMA-D 91 -> 11; the 10-actor demo -> 1. They are drawn at random with a
generator seeded by ``(seed, fold index)``; every subject of these corpora covers every class, so a
subject-level draw keeps the validation set balanced.

Explicit splits (published protocols) are read by :func:`load_split_file`. The folds a sweep or a
trial actually uses are data: :func:`write_folds` stores them (subjects and clip ids per fold, the
validation subjects included) as one JSON file, which every trial reads back with
:func:`read_folds` instead of recomputing them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)

DEFAULT_VAL_SUBJECTS = 0.15


@dataclass(frozen=True)
class Fold:
    """One CV fold: lists of ``clip_id`` values (sorted).

    Attributes:
        index: Fold number, 0-based.
        train: Clips used for gradient steps.
        val: Clips for early stopping / LR schedule (subjects disjoint from train and test).
        test: Held-out clips of this fold's test subjects.
        subjects: Role -> sorted subject ids, for reporting.
    """

    index: int
    train: list[str]
    val: list[str]
    test: list[str]
    subjects: dict[str, list[str]] = field(default_factory=dict, compare=False)


def make_folds(manifest: pd.DataFrame, n_folds: int = 5, seed: int = 0,
               val_subjects: int | float = DEFAULT_VAL_SUBJECTS) -> list[Fold]:
    """Subject-independent, class-stratified folds (sklearn ``StratifiedGroupKFold``).

    Deterministic for a given manifest content and ``seed`` (row order does not matter).

    Args:
        manifest: Needs columns ``clip_id``, ``label`` and ``subject`` (usually
            ``orchestrator.data.load_manifest(cache_dir)``).
        n_folds: Number of test folds.
        seed: Shuffling seed for the fold assignment and the validation draw.
        val_subjects: Validation subjects per fold: an ``int`` count or a ``float`` fraction of
            the fold's training subjects (0 for no validation set).

    Raises:
        ValueError: Missing columns, fewer than 2 folds, fewer subjects than folds, or too few
            training subjects to carve the validation set from.
    """
    table = _clip_table(manifest)
    subjects = table["subject"].unique()
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(subjects) < n_folds:
        raise ValueError(f"cannot make {n_folds} subject-independent folds from "
                         f"{len(subjects)} subject(s) {sorted(subjects)}; use n_folds <= "
                         f"{len(subjects)} or more data")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    test_sets = [set(table["subject"].iloc[test_idx]) for _, test_idx in
                 splitter.split(np.zeros(len(table)), table["label"], table["subject"])]
    return [_fold(table, i, test, val_subjects, seed) for i, test in enumerate(test_sets)]


def load_split_file(path: str | Path, manifest: pd.DataFrame, seed: int = 0,
                    val_subjects: int | float = DEFAULT_VAL_SUBJECTS) -> list[Fold]:
    """Folds from an explicit split, so published protocols can be reproduced.

    Accepted forms:

    * a JSON object ``{subject: fold}``;
    * a text/CSV file of ``subject fold`` lines (separated by whitespace, ``,`` or ``->``);
    * a text/CSV file of ``path label`` lines (one test fold) or ``path label fold`` lines;
    * a directory of ``split*/test.csv`` files in that ``path label`` format, one fold each
      (MAE-DFER's ``saved/data/<dataset>/splitNN/`` layout).

    Paths are matched to the manifest by file stem (``Actor_01/02-01-03-...`` and
    ``.../face_aligned/Actor_01/02-01-03-...`` both match). Training clips are all clips whose
    subjects are not in the fold's test set (subject independence is enforced), minus the
    validation subjects carved as in :func:`make_folds`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A line cannot be parsed, or a listed clip or subject is not in the manifest.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} does not exist")
    table = _clip_table(manifest)
    if path.is_dir():
        test_sets = _test_sets_from_dir(path, table)
    elif path.suffix == ".json":
        test_sets = _test_sets_from_mapping(json.loads(path.read_text()), table, path)
    else:
        test_sets = _test_sets_from_lines(path, table)
    for i, a in enumerate(test_sets):
        for j in range(i + 1, len(test_sets)):
            if a & test_sets[j]:
                raise ValueError(f"{path}: subject(s) {sorted(a & test_sets[j])} are in the test "
                                 f"sets of folds {i} and {j}")
    return [_fold(table, i, test, val_subjects, seed) for i, test in enumerate(test_sets)]


FOLDS_FORMAT = 1


def write_folds(path: Path, folds: Sequence[Fold], dataset: str, source: str) -> Path:
    """Store ``folds`` as JSON at ``path`` (atomically): what every trial of them reads.

    Args:
        path: The file to write.
        folds: The folds, in index order.
        dataset: Dataset name (recorded).
        source: Where they come from: ``computed (n_folds=5, seed=0)`` or the split file's path.
    """
    body = {"format": FOLDS_FORMAT, "dataset": dataset, "source": source, "n_folds": len(folds),
            "folds": [{"index": f.index, "train": f.train, "val": f.val, "test": f.test,
                       "subjects": f.subjects} for f in folds]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_folds(path: str | Path, manifest: pd.DataFrame) -> list[Fold]:
    """The folds :func:`write_folds` stored, checked against the cache's usable clips.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a folds file, or it does not fit the manifest (a clip missing from the
            cache, a subject in two roles, a clip in no or two test folds), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no folds file at {path}")
    try:
        body = json.loads(path.read_text())
        folds = [Fold(f["index"], list(f["train"]), list(f["val"]), list(f["test"]), dict(f["subjects"]))
                 for f in body["folds"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a folds file of format {FOLDS_FORMAT}: {err}") from None
    known = set(manifest["clip_id"])
    unknown = sorted({c for f in folds for c in f.train + f.val + f.test} - known)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} clip(s) are not usable clips of the cache, e.g. {unknown[:3]}")
    try:
        check_folds(folds, manifest)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return folds


def check_folds(folds: Sequence[Fold], manifest: pd.DataFrame) -> None:
    """Assert the CV invariants: within a fold no subject has two roles and no clip is listed
    twice; across folds every clip of the manifest is in exactly one test set.

    Raises:
        ValueError: An invariant does not hold (the message names the fold and subject/clip).
    """
    subject_of = dict(zip(manifest["clip_id"], manifest["subject"].astype(str)))
    test_count: dict[str, int] = {}
    for fold in folds:
        roles = {role: {subject_of[c] for c in getattr(fold, role)}
                 for role in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = roles[a] & roles[b]
            if shared:
                raise ValueError(f"fold {fold.index}: subject(s) {sorted(shared)} in both {a} "
                                 f"and {b}")
        clips = fold.train + fold.val + fold.test
        if len(clips) != len(set(clips)):
            raise ValueError(f"fold {fold.index}: a clip is listed twice")
        for clip in fold.test:
            test_count[clip] = test_count.get(clip, 0) + 1
    wrong = sorted(c for c in subject_of if test_count.get(c, 0) != 1)
    if wrong:
        raise ValueError(f"{len(wrong)} clip(s) are not in exactly one test fold, e.g. {wrong[:5]}")


def _clip_table(manifest: pd.DataFrame) -> pd.DataFrame:
    missing = {"clip_id", "label", "subject"} - set(manifest.columns)
    if missing:
        raise ValueError(f"manifest lacks column(s) {sorted(missing)} needed for folds")
    table = manifest[["clip_id", "label", "subject"] +
                     (["clip"] if "clip" in manifest.columns else [])].copy()
    table["subject"] = table["subject"].astype(str)
    if table["clip_id"].duplicated().any():
        raise ValueError("manifest has duplicate clip_id values")
    return table.sort_values("clip_id", kind="stable").reset_index(drop=True)


def _fold(table: pd.DataFrame, index: int, test_subjects: set[str],
          val_subjects: int | float, seed: int) -> Fold:
    rest = sorted(set(table["subject"]) - test_subjects)
    n_val = _val_count(val_subjects, len(rest))
    rng = np.random.default_rng([seed, index])
    val = set(rng.choice(rest, size=n_val, replace=False).tolist()) if n_val else set()
    roles = {"train": set(rest) - val, "val": val, "test": set(test_subjects)}
    ids = {role: table.loc[table["subject"].isin(s), "clip_id"].tolist()
           for role, s in roles.items()}
    return Fold(index, ids["train"], ids["val"], ids["test"],
                subjects={role: sorted(s) for role, s in roles.items()})


def _val_count(val_subjects: int | float, n_train: int) -> int:
    if isinstance(val_subjects, float):
        if not 0.0 <= val_subjects < 1.0:
            raise ValueError(f"val_subjects as a fraction must be in [0, 1), got {val_subjects}")
        n = 0 if val_subjects == 0 else max(1, round(val_subjects * n_train))
    else:
        n = int(val_subjects)
    if n < 0 or (n > 0 and n >= n_train):
        raise ValueError(f"cannot carve {n} validation subject(s) from {n_train} training "
                         f"subject(s); lower val_subjects or use more subjects")
    return n


def _stem(path: str) -> str:
    return PurePosixPath(path.strip().replace("\\", "/")).name.split(".")[0]


def _clips_by_stem(table: pd.DataFrame) -> dict[str, str]:
    if "clip" not in table.columns:
        raise ValueError("manifest lacks the 'clip' column needed to match split-file paths")
    by_stem: dict[str, str] = {}
    for clip, clip_id in zip(table["clip"], table["clip_id"]):
        stem = _stem(clip)
        if stem in by_stem:
            raise ValueError(f"two manifest clips share the stem {stem!r}; split files that list "
                             f"paths need unique file names")
        by_stem[stem] = clip_id
    return by_stem


def _subjects_of_paths(paths: list[str], table: pd.DataFrame, source: Path) -> set[str]:
    by_stem = _clips_by_stem(table)
    subject_of = dict(zip(table["clip_id"], table["subject"]))
    missing = [p for p in paths if _stem(p) not in by_stem]
    if missing:
        log.warning("%s: %d listed clip(s) are not in the manifest (not preprocessed or failed), "
                    "e.g. %s", source, len(missing), missing[:3])
    found = [by_stem[_stem(p)] for p in paths if _stem(p) in by_stem]
    if not found:
        raise ValueError(f"{source}: none of the {len(paths)} listed clips is in the manifest")
    return {subject_of[c] for c in found}


def _test_sets_from_dir(path: Path, table: pd.DataFrame) -> list[set[str]]:
    files = sorted(path.glob("*/test.csv"))
    if not files:
        raise ValueError(f"split directory {path} has no */test.csv files (MAE-DFER layout "
                         f"splitNN/test.csv expected)")
    return [_subjects_of_paths([r[0] for r in _rows(f, 2)], table, f) for f in files]


def _test_sets_from_mapping(mapping: dict[str, int], table: pd.DataFrame,
                            source: Path) -> list[set[str]]:
    known = set(table["subject"])
    unknown = sorted(str(s) for s in mapping if str(s) not in known)
    if unknown:
        raise ValueError(f"{source}: subject(s) {unknown} are not in the manifest")
    uncovered = sorted(known - {str(s) for s in mapping})
    if uncovered:
        raise ValueError(f"{source}: manifest subject(s) {uncovered} have no fold")
    folds = sorted({int(f) for f in mapping.values()})
    return [{str(s) for s, f in mapping.items() if int(f) == fold} for fold in folds]


def _test_sets_from_lines(path: Path, table: pd.DataFrame) -> list[set[str]]:
    rows = _rows(path, None)
    widths = {len(r) for r in rows}
    if widths == {2} and all(r[0] in set(table["subject"]) for r in rows):
        return _test_sets_from_mapping({r[0]: int(r[1]) for r in rows}, table, path)
    if widths == {2}:
        return [_subjects_of_paths([r[0] for r in rows], table, path)]
    if widths == {3}:
        folds = sorted({int(r[2]) for r in rows})
        return [_subjects_of_paths([r[0] for r in rows if int(r[2]) == f], table, path)
                for f in folds]
    raise ValueError(f"{path}: expected 'subject fold', 'path label' or 'path label fold' lines, "
                     f"found lines with {sorted(widths)} fields")


def _rows(path: Path, width: int | None) -> list[list[str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        fields = line.replace("->", " ").replace(",", " ").split()
        if not rows and not fields[-1].lstrip("-").isdigit():
            continue  # a header line such as "subject,fold"
        if width is not None and len(fields) != width:
            raise ValueError(f"{path}:{number}: expected {width} fields, got {line!r}")
        rows.append(fields)
    if not rows:
        raise ValueError(f"split file {path} is empty")
    return rows
