"""Multi-task loss (paper section 4.2): weighted MSE for boxes and landmarks, cross-entropy for expressions.

Frames where the detector found no face carry ``valid = False`` and contribute nothing to the
box and landmark terms; the released code had no such frames (every label file has 16 lines).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.architectures import MTCAEOutput


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the frames marked valid.

    Args:
        pred: (B, T, ...) predictions.
        target: (B, T, ...) targets, same shape.
        valid: (B, T) bool mask of frames with a detected face.

    Returns:
        A scalar; zero (still attached to the graph) when no frame is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()).pow(2).flatten(2).mean(dim=2)  # (B, T)
    mask = valid.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass(frozen=True)
class MultiTaskLoss:
    """``w_box * MSE(boxes) + w_landmark * MSE(landmarks) + w_expr * CE(logits)``.

    Attributes:
        w_box: Box loss weight (0.5 in the paper).
        w_landmark: Landmark loss weight (0.5).
        w_expr: Expression loss weight (1.5).
        label_smoothing: Cross-entropy label smoothing (0 in the paper).
    """

    w_box: float = 0.5
    w_landmark: float = 0.5
    w_expr: float = 1.5
    label_smoothing: float = 0.0

    def __call__(self, out: MTCAEOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms and their weighted sum.

        Args:
            out: Model output; STL's missing boxes/landmarks give zero terms.
            batch: ``label`` (B,), ``boxes`` (B, T, 4), ``landmarks`` (B, T, 5, 2), ``valid`` (B, T).

        Returns:
            ``loss`` (the weighted total), ``loss_expr``, ``loss_box``, ``loss_landmark``.
        """
        loss_expr = F.cross_entropy(out.logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        zero = loss_expr.new_zeros(())
        loss_box = masked_mse(out.boxes, batch["boxes"], batch["valid"]) if out.boxes is not None else zero
        loss_lmk = (masked_mse(out.landmarks, batch["landmarks"], batch["valid"])
                    if out.landmarks is not None else zero)
        total = self.w_expr * loss_expr + self.w_box * loss_box + self.w_landmark * loss_lmk
        return {"loss": total, "loss_expr": loss_expr, "loss_box": loss_box, "loss_landmark": loss_lmk}
