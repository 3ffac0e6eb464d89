"""The standard-ONNX backend (``gfc compile --backend onnx``).

The compiler owns the backward here: `autodiff` differentiates the trained region op
by op (`grad_rules`, `conv_backward`, and the gradient filter of
`gfcompiler.passes.filter_ops`), `optimizers` appends the parameter update, and
`step_model` assembles one plain ONNX model per training step that stock onnxruntime
runs anywhere (default-domain ops only). `gfcompiler.runtime` runs it.
"""
