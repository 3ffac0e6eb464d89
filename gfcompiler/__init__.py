"""gfcompiler: compile gradient filtering (Yang, Li, Marculescu, CVPR 2023) into ONNX Runtime training artifacts.

This package root imports nothing heavy: ``gfcompiler.runtime`` must stay importable
with only onnxruntime and numpy installed, so the compiler's modules (onnx, onnx-ir,
networkx) are imported by their own submodules, never from here.
"""

__version__ = "0.1.0"

# The artifact format version written into every manifest. The runtime refuses
# artifacts whose format it does not know (see gfcompiler.runtime.artifacts).
ARTIFACT_FORMAT = 1
