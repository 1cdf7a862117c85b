"""The numbers the MTCAE-DFER paper reports, transcribed once so the tables can sit next to them.

Source: /work/shared/seeds/MTCAE-DFER-paper.txt, Section 4.4 (Table 1: ablation of the six
structure strategies; Tables 2-4: comparison with published methods on RAVDESS, CREMA-D, MEAD).
All values are percentages as printed; Table 1's row labels live in ``vocab``. The text extraction
drops the paper's check marks and keeps only "x" for "no"; the SSL/MTL flags below restore them
from the row pattern and from Section 4.4.2 ("STL self-supervised model MAE-DFER", "MTL supervised model MTL-ER", "MTL self-supervised model
MTFormer"). Datasets the paper does not report (e.g. the synthetic ``demo``) have no entry: callers
show "n/a", never a made-up reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import vocab

# The paper's datasets -> display names, in the paper's order; table number of each comparison.
DATASETS: dict[str, str] = {d: vocab.DATASET_LABELS[d] for d in vocab.PAPER_DATASETS}
COMPARISON_TABLE_NUMBER: dict[str, int] = {vocab.RAVDESS: 2, vocab.CREMA_D: 3, vocab.MEAD: 4}
NUM_CLASSES: dict[str, int] = {vocab.RAVDESS: 7, vocab.CREMA_D: 6, vocab.MEAD: 8}
ARCH_ORDER: tuple[str, ...] = vocab.ARCHITECTURES  # Table 1's row order

_DATASET_ALIASES: dict[str, str] = {"cremad": vocab.CREMA_D, "crema_d": vocab.CREMA_D, "crema": vocab.CREMA_D}

# Table 1: (UAR, WAR) in percent per dataset, one pair per architecture in Table 1's row order
# (stl, nonshared_mlp, nonshared_vit, shared_mlp, shared_vit, cascaded_vit).
_TABLE1_ROWS: dict[str, tuple[tuple[float, float], ...]] = {
    vocab.RAVDESS: ((72.36, 74.44), (75.56, 77.28), (81.11, 82.17), (75.95, 76.84), (80.02, 81.43), (82.73, 83.69)),
    vocab.CREMA_D: ((75.87, 76.21), (77.23, 79.89), (83.40, 83.67), (76.25, 77.55), (81.64, 82.38), (84.71, 85.03)),
    vocab.MEAD: ((77.83, 79.61), (81.40, 82.14), (84.75, 86.57), (79.12, 80.93), (84.03, 84.74), (87.51, 88.44)),
}
TABLE1: dict[tuple[str, str], tuple[float, float]] = {
    (dataset, arch): cell for dataset, cells in _TABLE1_ROWS.items()
    for arch, cell in zip(vocab.ARCHITECTURES, cells, strict=True)
}


@dataclass(frozen=True)
class LiteratureRow:
    """One published method as reported in Tables 2-4 (UAR None where the paper prints "-")."""

    method: str
    ssl: bool
    mtl: bool
    uar: float | None
    war: float


def _rows(values: tuple[tuple[float | None, float], ...]) -> tuple[LiteratureRow, ...]:
    """Attach the method names and SSL/MTL flags (identical in Tables 2-4) to one table's values."""
    methods = (
        ("VO-LSTM [9]", False, False),
        ("3D ResNeXt-50 [20]", False, False),
        ("SVFAP [22]", True, False),
        ("MAE-DFER [21]", True, False),
        ("MNC [5]", False, True),
        ("MTL-ER [29]", False, True),
        ("MTFormer [27]", True, True),
        ("MTCAE-DFER (paper)", True, True),  # printed "MTCAE-DFER (ours)"
    )
    assert len(values) == len(methods)
    return tuple(
        LiteratureRow(name, ssl, mtl, uar, war)
        for (name, ssl, mtl), (uar, war) in zip(methods, values)
    )


# Tables 2 (RAVDESS, 7 classes), 3 (CREMA-D, 6 classes), 4 (MEAD, 8 classes), in printed order.
LITERATURE: dict[str, tuple[LiteratureRow, ...]] = {
    vocab.RAVDESS: _rows(
        (
            (None, 60.50),
            (None, 62.99),
            (75.15, 75.01),
            (75.91, 75.56),
            (61.81, 61.43),
            (73.54, 74.19),
            (79.40, 79.68),
            (82.73, 83.69),
        )
    ),
    vocab.CREMA_D: _rows(
        (
            (None, 66.80),
            (None, 69.14),
            (77.31, 77.37),
            (77.33, 77.38),
            (67.93, 68.57),
            (74.45, 75.62),
            (79.34, 80.74),
            (84.71, 85.03),
        )
    ),
    vocab.MEAD: _rows(
        (
            (None, 68.87),
            (None, 72.56),
            (80.04, 80.23),
            (80.71, 80.95),
            (70.82, 70.16),
            (77.26, 78.36),
            (84.03, 84.74),
            (87.51, 88.44),
        )
    ),
}


def canonical_dataset(name: str) -> str:
    """Lower-case dataset key with common spellings folded (``CREMA_D`` -> ``crema-d``)."""
    key = str(name).strip().lower()
    return _DATASET_ALIASES.get(key, key)


def dataset_display(name: str) -> str:
    """Display name of a dataset (``RAVDESS``); unknown datasets keep their key."""
    key = canonical_dataset(name)
    return DATASETS.get(key, key)


def paper_table1(dataset: str, arch: str) -> tuple[float, float] | None:
    """The paper's (UAR, WAR) for one Table 1 cell, or None where the paper reports none."""
    return TABLE1.get((canonical_dataset(dataset), arch))


def arch_info(arch: str) -> vocab.ArchitectureName:
    """Table 1's labels of an architecture; an unknown key is shown under its own name."""
    return vocab.ARCHITECTURE_BY_NAME.get(arch, vocab.ArchitectureName(arch, arch, "?"))
