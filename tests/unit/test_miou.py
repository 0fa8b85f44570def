"""mIoU against an independent per-class computation: ignore pixels, absent classes, summing."""

from __future__ import annotations

import numpy as np
import pytest

from wsss_ray.eval.miou import confusion_matrix, iou_from_confusion


def _reference_miou(preds, labels, num_classes):
    """Straight from the definition, one class at a time, over all images' pixels."""
    ious = []
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, t in zip(preds, labels):
            valid = t != 255
            tp += np.sum((p == c) & (t == c) & valid)
            fp += np.sum((p == c) & (t != c) & valid)
            fn += np.sum((p != c) & (t == c) & valid)
        union = tp + fp + fn
        ious.append(tp / union if union else np.nan)
    ious = np.array(ious, dtype=float)
    return ious, float(np.nanmean(ious))


def test_miou_matches_reference_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    c = 7
    labels, preds = [], []
    for _ in range(5):
        t = rng.integers(0, 5, size=(33, 41))  # classes 5 and 6 never in the ground truth
        t[rng.random(t.shape) < 0.1] = 255  # ignore pixels
        p = rng.integers(0, 6, size=t.shape)  # class 5 predicted (false positives only), 6 never
        p[t == 2] = 2  # class 2 mostly right
        labels.append(t)
        preds.append(p)
    conf = sum(confusion_matrix(p, t, c) for p, t in zip(preds, labels))
    result = iou_from_confusion(conf, [f"c{i}" for i in range(c)])
    want_iou, want_miou = _reference_miou(preds, labels, c)
    np.testing.assert_allclose(result.iou, want_iou, equal_nan=True)
    assert result.miou == pytest.approx(want_miou)
    assert np.isnan(result.iou[6]) and result.iou[5] == 0.0  # absent vs only-false-positive
    assert conf.sum() == sum(int((t != 255).sum()) for t in labels)  # ignore pixels dropped
    assert "c6" not in {k.split("/")[-1] for k in result.metrics()}
    rows = dict(line.split() for line in result.table().splitlines()[1:])
    assert rows["c6"] == "-" and float(rows["mIoU"]) == pytest.approx(100 * want_miou, abs=0.05)
    # what MLflow, results.json and Tune get: percent, as the table prints
    m = result.metrics("val/")
    assert m["val/miou"] == pytest.approx(100 * want_miou)
    assert m["val/iou/c2"] == pytest.approx(100 * want_iou[2]) and m["val/iou/c5"] == 0.0
    assert m["val/pixel_acc"] == pytest.approx(100 * result.pixel_acc)
    assert float(rows["mIoU"]) == pytest.approx(m["val/miou"], abs=0.05)


def test_confusion_sums_equal_one_big_matrix():
    """Partial matrices (blocks, workers) summed == one matrix over all pixels."""
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4, size=(8, 64, 64))
    p = rng.integers(0, 4, size=t.shape)
    whole = confusion_matrix(p, t, 4)
    parts = confusion_matrix(p[:3], t[:3], 4) + confusion_matrix(p[3:], t[3:], 4)
    np.testing.assert_array_equal(whole, parts)


def test_perfect_and_wrong_class_list():
    t = np.array([[0, 1], [2, 255]])
    assert iou_from_confusion(confusion_matrix(t.clip(0, 2), t, 3)).miou == 1.0
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(t, np.array([[0, 1], [7, 0]]), 3)


def test_sweep_scores_are_percent():
    """The VPL phase-1 sweep's patch scores use the same unit as the jobs' mIoU."""
    import torch

    from wsss_ray.tune.trials import patch_scores

    F = torch.eye(3)  # three patches, one per feature direction
    W = torch.eye(3)  # rows: 2 foreground classes, then 1 background word
    allowed = torch.ones(3, 3, dtype=torch.bool)
    gt = torch.tensor([1, 2, 0])  # class 1, class 2, background
    assert patch_scores(F, W, allowed, gt, num_fg=2) == {"patch/miou": 100.0, "patch/acc": 100.0}
    wrong = patch_scores(F, W[[1, 0, 2]], allowed, gt, num_fg=2)
    assert wrong["patch/acc"] == pytest.approx(100 / 3) and wrong["patch/miou"] == pytest.approx(
        100 / 3
    )
