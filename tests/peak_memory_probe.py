"""Run one training step of compiled artifacts and print the step's peak RSS growth (KiB).

Used by tests/test_memory.py in a fresh subprocess per variant (environment
`MEASURE_ENV`), so each variant's peak is its own. The CPU memory arena is disabled so
the peak follows what the graph really keeps alive, not the arena's growth policy.
"""

import sys

import numpy as np

from gfcompiler import ort_training
from gfcompiler.runtime.peak_memory import peak_kib, reset_peak_kib


def main(directory: str, batch: int, channels: int, size: int) -> None:
    ort, api = ort_training.onnxruntime(), ort_training.api()
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = 1
    state = api.CheckpointState.load_checkpoint(f"{directory}/checkpoint")
    module = api.Module(f"{directory}/training_model.onnx", state, f"{directory}/eval_model.onnx", device="cpu", session_options=options)
    module.train()
    x = np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)
    y = np.zeros(batch, np.int64)
    baseline = reset_peak_kib()
    module(x, y)  # (loss, logits)
    print(baseline, peak_kib())


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
