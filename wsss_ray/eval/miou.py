"""Mean intersection-over-union (METHODS.md 3).

A confusion matrix over the pixels whose label is not 255 (ignore); IoU per class =
TP / (TP + FP + FN); the mean runs over the classes that appear in the ground truth or the
prediction (non-zero union). Matrices are plain ``int64`` arrays so partial results from Ray
Data blocks and from train workers are summed before the IoU is taken (averaging per-image
IoUs would be a different, wrong metric).

Units: :class:`IoUResult` holds fractions (0-1) for arithmetic; everything a user sees is in
percent (0-100, as papers report mIoU): the printed table, and :meth:`IoUResult.metrics`, which
is what reaches MLflow, ``results.json`` and Tune. :func:`percent` converts anything else at
that boundary (baselines, best-of-sweep values, accuracies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


def percent(fraction: float) -> float:
    """A 0-1 score (IoU, accuracy, coverage) in the percent every output uses."""
    return 100.0 * float(fraction)


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[t, p]`` = pixels of true class t predicted as p, over pixels with label != 255.
    Labels outside ``[0, num_classes)`` other than 255 are an error (a wrong class list)."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
    keep = label != IGNORE
    pred, label = pred[keep], label[keep]
    if label.size and (label.max() >= num_classes or label.min() < 0):
        raise ValueError(f"label value {label.max()} outside 0..{num_classes - 1} (and 255)")
    if pred.size and (pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"prediction value {pred.max()} outside 0..{num_classes - 1}")
    flat = label * num_classes + pred
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass
class IoUResult:
    """Fractions (0-1); :meth:`table` and :meth:`metrics` give percent."""

    iou: np.ndarray  # per class; NaN where the class has zero union
    miou: float
    pixel_acc: float
    class_names: list[str]

    def table(self) -> str:
        """Per-class IoU (percent), '-' for classes absent from both GT and prediction."""
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'class':<{width}}  IoU"]
        for name, v in zip(self.class_names, self.iou):
            lines.append(f"{name:<{width}}  {'-' if np.isnan(v) else f'{100 * v:5.1f}'}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou:5.1f}")
        return "\n".join(lines)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``miou``, ``pixel_acc`` and ``iou/<class>`` (classes with a non-zero union), in
        percent: the figures MLflow, ``results.json`` and Tune get."""
        out = {f"{prefix}miou": percent(self.miou), f"{prefix}pixel_acc": percent(self.pixel_acc)}
        for name, v in zip(self.class_names, self.iou):
            if not np.isnan(v):
                out[f"{prefix}iou/{name}"] = percent(v)
        return out


def iou_from_confusion(conf: np.ndarray, class_names: list[str] | None = None) -> IoUResult:
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else 0.0
    total = conf.sum()
    names = class_names or [str(i) for i in range(conf.shape[0])]
    if len(names) != conf.shape[0]:
        raise ValueError(f"{len(names)} class names for a {conf.shape[0]}-class matrix")
    return IoUResult(iou, miou, float(tp.sum() / total) if total else 0.0, list(names))
