"""Segmentation metrics: a confusion matrix over labelled pixels, pixel accuracy, IoU.

`ConfusionMatrix` accumulates, batch by batch, how many pixels of true class ``i`` were
predicted as class ``j`` (``matrix[i, j]``); pixels whose label is ``ignore_index`` are
not counted. From it:

* pixel accuracy: correctly classified labelled pixels / labelled pixels;
* IoU of class ``c``: ``TP / (TP + FP + FN)`` = ``matrix[c, c] / (row c + column c - matrix[c, c])``;
  undefined (NaN) for a class that occurs neither in the labels nor in the predictions
  (zero union);
* mean IoU: the mean over the classes with a non-zero union, i.e. classes present in the
  labels or in the predictions (PASCAL VOC's convention; a class absent from both is
  left out rather than counted as 0 or 1).

`predicted_classes` turns logits into the class map: argmax over the channel axis of
N×C×H×W logits, or ``logit > 0`` for a binary model's N×1×H×W output (classes {0, 1}),
as the exported model's ``classes`` output (`gfcompiler.manifest.CLASS_MAP_OUTPUT`) does. `SegmentationScores`
is what ``Trainer.evaluate`` reports for segmentation models. Numpy only.
"""

from __future__ import annotations

import numpy as np

from gfcompiler.runtime.losses import labelled_mask


def predicted_classes(logits: np.ndarray) -> np.ndarray:
    """The N×H×W int64 class map of N×C×H×W logits (C = 1: a binary model, class 1 where logit > 0)."""
    logits = np.asarray(logits)
    if logits.ndim != 4:
        raise ValueError(f"segmentation logits are N×C×H×W, got shape {logits.shape}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1).astype(np.int64)


class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]`` over ``num_classes`` classes, ignored pixels left out."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch: ``predicted`` and ``labels`` are integer class maps of one shape."""
        predicted, labels = np.asarray(predicted), np.asarray(labels)
        if predicted.shape != labels.shape:
            raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} differ in shape")
        keep = labelled_mask(labels, self.ignore_index)
        truth, guess = labels[keep].astype(np.int64), predicted[keep].astype(np.int64)
        classes = self.num_classes
        for name, values in (("labels", truth), ("predictions", guess)):
            if values.size and (values.min() < 0 or values.max() >= classes):
                raise ValueError(f"{name} range over {values.min()}..{values.max()}; expected 0..{classes - 1}")
        self.matrix += np.bincount(truth * classes + guess, minlength=classes * classes).reshape(classes, classes)

    @property
    def labelled(self) -> int:
        """Pixels counted so far (ignored pixels excluded)."""
        return int(self.matrix.sum())

    def pixel_accuracy(self) -> float:
        """Correct labelled pixels / labelled pixels (NaN before any labelled pixel)."""
        total = self.labelled
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def class_iou(self) -> np.ndarray:
        """IoU per class (float64, length num_classes); NaN where a class has a zero union."""
        hits = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - hits
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, hits / np.maximum(union, 1), np.nan)

    def mean_iou(self) -> float:
        """Mean IoU over the classes present in the labels or the predictions (NaN if none)."""
        iou = self.class_iou()
        present = ~np.isnan(iou)
        return float(iou[present].mean()) if present.any() else float("nan")

    def summary(self) -> dict:
        """``pixel_accuracy``, ``mean_iou``, ``class_iou`` (a list), ``pixels``: JSON-ready, None
        for what is undefined (no labelled pixel; a class with a zero union)."""
        return {
            "pixel_accuracy": _defined(self.pixel_accuracy()),
            "mean_iou": _defined(self.mean_iou()),
            "class_iou": [_defined(v) for v in self.class_iou()],
            "pixels": self.labelled,
        }


class SegmentationScores:
    """A segmentation model's evaluation, batch by batch: the loss as one mean over every
    labelled pixel of the data (batch means weighted by their labelled pixels) and the
    confusion matrix of the class maps.

    Labels: N×H×W class indices, or a binary model's N×1×H×W 0/1 targets (class 1 where
    the target is at least 0.5).
    """

    def __init__(self, num_classes: int, ignore_index: int | None):
        self.matrix = ConfusionMatrix(num_classes, ignore_index)
        self.loss_sum = 0.0
        self.samples = 0

    def add(self, loss: float, logits: np.ndarray, labels: np.ndarray) -> None:
        """One batch: its mean loss (over its labelled pixels), logits and labels."""
        before = self.matrix.labelled
        self.matrix.update(predicted_classes(logits), label_classes(labels))
        self.loss_sum += float(loss) * (self.matrix.labelled - before)
        self.samples += len(logits)

    def result(self) -> dict:
        """``loss``, ``samples`` and `ConfusionMatrix.summary`'s metrics."""
        labelled = self.matrix.labelled
        return {"loss": self.loss_sum / labelled if labelled else 0.0, "samples": self.samples,
                **self.matrix.summary()}


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def label_classes(labels: np.ndarray) -> np.ndarray:
    """N×H×W int64 class labels: as given, or a binary model's N×1×H×W targets as 0/1."""
    labels = np.asarray(labels)
    if labels.ndim == 4:
        return (labels[:, 0] >= 0.5).astype(np.int64)
    return labels.astype(np.int64)
