"""The compiled losses recomputed in numpy, and the class scores accuracy is counted on.

The Trainer uses `numpy_loss` for a padded last batch of a fixed-batch model (the
model's mean would include the padding), the export check to tie the exported model's
outputs to the eval model's loss, and the loop and the Trainer count accuracy on
`class_scores`. Imports numpy only: the bottom of the runtime's import layers
(loop → trainer → export → losses).
"""

from __future__ import annotations

import numpy as np


def class_scores(outputs: np.ndarray) -> np.ndarray:
    """Logits as N×classes: a conv head's N×C×1×1 output has its trailing 1×1 dimensions dropped."""
    if outputs.ndim > 2 and all(d == 1 for d in outputs.shape[2:]):
        return outputs.reshape(outputs.shape[:2])
    return outputs


def numpy_loss(loss: str, outputs: np.ndarray, labels: np.ndarray) -> float:
    """The mean loss of ``outputs`` against ``labels`` as the compiled loss computes it."""
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
