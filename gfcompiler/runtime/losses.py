"""The compiled losses recomputed in numpy, and the class scores accuracy is counted on.

The Trainer uses `numpy_loss` for a padded last batch of a fixed-batch model (the
model's mean would include the padding), the export check to tie the exported model's
outputs to the eval model's loss, and the loop and the Trainer count accuracy on
`class_scores`. Segmentation losses are per pixel: cross-entropy of N×C×H×W logits against
N×H×W labels is the mean over the pixels whose label is not ``ignore_index`` (0 when
every pixel is ignored, as the compiled loss does; torch gives NaN there), BCE the mean
over every element. Imports numpy only: the bottom of the runtime's import layers
(loop → trainer → export → losses).
"""

from __future__ import annotations

import numpy as np


def class_scores(outputs: np.ndarray) -> np.ndarray:
    """Logits as N×classes: a conv head's N×C×1×1 output has its trailing 1×1 dimensions dropped."""
    if outputs.ndim > 2 and all(d == 1 for d in outputs.shape[2:]):
        return outputs.reshape(outputs.shape[:2])
    return outputs


def numpy_loss(loss: str, outputs: np.ndarray, labels: np.ndarray, ignore_index: int | None = None) -> float:
    """The mean loss of ``outputs`` against ``labels`` as the compiled loss computes it.

    Cross-entropy with labels of more than one dimension (N×H×W for N×C×H×W logits) is the
    per-pixel loss; ``ignore_index`` applies to it only.
    """
    if loss == "cross_entropy" and np.ndim(labels) > 1:
        return per_pixel_cross_entropy(outputs, labels, ignore_index)
    out = (class_scores(outputs) if loss == "cross_entropy" else outputs).astype(np.float64)
    if loss == "cross_entropy":
        peak = out.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(out - peak).sum(axis=-1)) + peak[:, 0]
        return float(np.mean(log_z - out[np.arange(len(out)), labels.astype(np.int64)]))
    target = labels.astype(np.float64).reshape(out.shape)
    if loss == "mse":
        return float(np.mean((out - target) ** 2))
    if loss == "l1":
        return float(np.mean(np.abs(out - target)))
    if loss == "bce":
        return float(np.mean(np.maximum(out, 0) - out * target + np.log1p(np.exp(-np.abs(out)))))
    raise ValueError(f"unknown loss {loss!r}")


def per_pixel_cross_entropy(logits: np.ndarray, labels: np.ndarray, ignore_index: int | None = None) -> float:
    """torch's ``cross_entropy(logits, labels, ignore_index=...)`` (mean over labelled pixels) in
    float64; 0.0 when no pixel is labelled. Logits N×C×..., labels N×...."""
    z = np.moveaxis(np.asarray(logits, dtype=np.float64), 1, -1)  # N×...×C
    labels = np.asarray(labels).astype(np.int64)
    keep = labelled_mask(labels, ignore_index)
    if not keep.any():
        return 0.0
    z, chosen = z[keep], labels[keep]
    peak = z.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(z - peak).sum(axis=-1)) + peak[:, 0]
    return float(np.mean(log_z - z[np.arange(len(z)), chosen]))


def labelled_mask(labels: np.ndarray, ignore_index: int | None) -> np.ndarray:
    """Which labels count (those not equal to ``ignore_index``; all when there is none)."""
    labels = np.asarray(labels)
    return labels != ignore_index if ignore_index is not None else np.ones(labels.shape, bool)
