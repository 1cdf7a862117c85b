"""Expression metrics: UAR (mean per-class recall) and WAR (overall accuracy), from a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict:
    """UAR, WAR and the confusion matrix for any number of classes.

    UAR averages recall over the classes present in ``y_true`` (a class with no samples has no
    recall; one never predicted has recall 0). WAR is the trace over the total (= accuracy).

    Args:
        y_true: Ground-truth class ids in ``[0, num_classes)``.
        y_pred: Predicted class ids in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        ``uar``, ``war``, ``accuracy`` (floats), ``per_class_recall`` (K floats, NaN where a class has
        no samples) and ``confusion`` (K x K ints, rows = truth, columns = prediction).

    Raises:
        ValueError: Empty input, length mismatch or a label out of range.
    """
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"need two equal-length, non-empty label lists, got {t.shape} and {p.shape}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    cm = confusion_matrix(t, p, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(cm) / support, np.nan)
    war = float(np.trace(cm) / cm.sum())
    return {
        "uar": float(np.nanmean(recall)),
        "war": war,
        "accuracy": war,
        "per_class_recall": recall.tolist(),
        "confusion": cm,
    }
