"""Detection metrics and decision thresholds, computed honestly.

Scores are raw (higher means more anomalous) and are never rescaled with
statistics of the set being evaluated. Thresholds are fitted on the validation
split and stored with the model, so one new image can be classified alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


class NonFiniteScoreError(ValueError):
    """A model produced NaN or infinite anomaly scores."""


def check_finite(scores: np.ndarray, keys: Sequence[str]) -> None:
    """Raise naming the samples whose score is not finite."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        names = ", ".join(str(keys[i]) for i in bad[:10])
        raise NonFiniteScoreError(
            f"{bad.size} non-finite anomaly scores, for samples {names}"
            f"{' and more' if bad.size > 10 else ''}; the model diverged or an input is broken"
        )


@dataclass(frozen=True)
class Threshold:
    value: float
    method: str  # "val_best_f1" or "val_normal_percentile"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "method": self.method}


def fit_threshold(scores: np.ndarray, labels: np.ndarray, percentile: float) -> Threshold:
    """Fit a decision threshold on validation scores.

    With both classes present, take the threshold of best F1; with normal
    images only, take the given percentile of their scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.size == 0:
        raise ValueError("cannot fit a threshold on an empty validation split")
    if labels.min() == labels.max():
        normals = scores[labels == 0] if labels.min() == 0 else scores
        return Threshold(float(np.percentile(normals, percentile)), "val_normal_percentile")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point has no threshold
    return Threshold(float(thresholds[best]), "val_best_f1")


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """AUROC, AP and threshold metrics, with AUROC undefined (None) for one class."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_anomalous = int(labels.sum())
    n_normal = int(labels.size - n_anomalous)
    both = n_normal > 0 and n_anomalous > 0
    metrics: dict[str, Any] = {
        "n_normal": n_normal,
        "n_anomalous": n_anomalous,
        "auroc": float(roc_auc_score(labels, scores)) if both else None,
        "average_precision": float(average_precision_score(labels, scores)) if both else None,
    }
    if not both:
        metrics["auroc_undefined_reason"] = (
            f"the split holds one class only ({n_normal} normal, {n_anomalous} anomalous)"
        )
    if threshold is not None:
        predicted = scores >= threshold
        true_pos = int(np.sum(predicted & (labels == 1)))
        false_pos = int(np.sum(predicted & (labels == 0)))
        false_neg = int(np.sum(~predicted & (labels == 1)))
        precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
        recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics.update(
            threshold=float(threshold), precision=precision, recall=recall, f1=f1,
            false_positive_rate=false_pos / n_normal if n_normal else None,
        )
    return metrics


def dedupe_by_key(keys: Sequence[str], scores: Sequence[float], labels: Sequence[int]
                  ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Drop repeated keys (ranks may share samples), keeping the first, sorted by key."""
    first: dict[str, tuple[float, int]] = {}
    for key, score, label in zip(keys, scores, labels):
        first.setdefault(key, (float(score), int(label)))
    ordered = sorted(first)
    return (
        ordered,
        np.array([first[k][0] for k in ordered], dtype=np.float64),
        np.array([first[k][1] for k in ordered], dtype=np.int64),
    )


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
