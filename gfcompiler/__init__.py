"""gfcompiler: compile gradient filtering (Yang, Li, Marculescu, CVPR 2023) into ONNX Runtime training artifacts.

This package root imports nothing heavy: ``gfcompiler.runtime`` must stay importable
with only onnxruntime and numpy installed, so the compiler's modules (onnx, onnx-ir,
networkx) are imported by their own submodules, never from here.
"""

__version__ = "0.2.0"

# The artifact format version written into every manifest. The runtime refuses
# artifacts whose format it does not know (see gfcompiler.runtime.artifacts).
# Format 2 added two-stage artifacts (a frozen prefix model before the training suffix);
# format 1 directories are single-graph ones and still read. Format 3 added the
# ``backend`` key: "ort-training" (the formats 1 and 2 layout) or "onnx" (one plain ONNX
# step model run by stock onnxruntime; see gfcompiler.manifest).
ARTIFACT_FORMAT = 3
READABLE_ARTIFACT_FORMATS = (1, 2, 3)
