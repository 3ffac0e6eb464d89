"""Device selection: CPU always; CUDA only when every piece works, else a one-line reason."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fixtures import compiled, digits_npz

from gfcompiler.errors import InputError, TrainingError
from gfcompiler.runtime import Trainer, device
from gfcompiler.runtime.cli import main as runtime_main


@pytest.fixture(autouse=True)
def _fresh_cache():
    device.cuda_unavailable.cache_clear()
    device.preload_cuda_libraries.cache_clear()
    yield
    device.cuda_unavailable.cache_clear()
    device.preload_cuda_libraries.cache_clear()


CUDA_WORKS = device.cuda_problem() is None
needs_cuda = pytest.mark.skipif(not CUDA_WORKS, reason=f"CUDA unavailable: {device.cuda_problem()}")


def test_parse_device():
    assert device.parse_device("CPU") == ("cpu", 0)
    assert device.parse_device("cuda:1") == ("cuda", 1)
    assert device.parse_device("auto") == ("auto", 0)
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        device.parse_device("tpu")
    assert device.select_device("cpu") == device.Device("cpu")


def test_probe_model_is_the_relu_model_and_runs():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="gfc")
    model.ir_version = 8
    assert model.SerializeToString() == device.PROBE_MODEL
    onnx.checker.check_model(onnx.load_from_string(device.PROBE_MODEL))
    import onnxruntime as ort

    session = ort.InferenceSession(device.PROBE_MODEL, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([-1, 2, -3, 4], np.float32)})[0].tolist() == [0, 2, 0, 4]


@pytest.mark.skipif(CUDA_WORKS, reason="this onnxruntime has a working CUDA provider")
def test_cuda_request_without_cuda_is_one_line(tmp_path, capsys):
    with pytest.raises(TrainingError) as caught:
        device.select_device("cuda")
    assert "cannot train on cuda:0" in str(caught.value) and "\n" not in str(caught.value)
    auto = device.select_device("auto")
    assert auto.kind == "cpu" and auto.note.startswith("auto: CUDA unavailable")
    assert "pip install" not in auto.note  # the fix is for those who asked for CUDA
    with pytest.raises(TrainingError, match="cannot train on cuda:0"):
        Trainer(compiled(), device="cuda")
    code = runtime_main(["train", str(compiled()), "--data", str(digits_npz(tmp_path / "d.npz", n=32)),
                         "--device", "cuda", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == TrainingError.exit_code and len(err.splitlines()) == 1 and "cuda" in err


def test_cpu_build_names_the_missing_provider(monkeypatch):
    monkeypatch.setattr(device.onnxruntime(), "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "no CUDA execution provider in this onnxruntime build" in device.cuda_problem()


class _Driver:
    def __init__(self, init_status=0, count=1):
        self.init_status, self.count = init_status, count

    def cuInit(self, flags):  # noqa: N802 - CUDA driver API names
        return self.init_status

    def cuDeviceGetCount(self, pointer):  # noqa: N802
        pointer._obj.value = self.count
        return 0


def _pretend_cuda_build(monkeypatch):
    monkeypatch.setattr(device.onnxruntime(), "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_missing_driver_or_gpu(monkeypatch):
    _pretend_cuda_build(monkeypatch)

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(device, "_load_library", no_driver)
    assert device.cuda_problem() == "no GPU: the NVIDIA driver (libcuda.so.1) is not installed"
    device.cuda_unavailable.cache_clear()
    monkeypatch.setattr(device, "_load_library", lambda name: _Driver(init_status=100))
    assert device.cuda_problem() == "no GPU: the NVIDIA driver finds no CUDA device"
    device.cuda_unavailable.cache_clear()
    monkeypatch.setattr(device, "_load_library", lambda name: _Driver(count=1))
    with pytest.raises(device.CudaUnavailable, match="no GPU cuda:2: the driver finds 1 device"):
        device.check_gpu(2)


def test_preload_order_and_missing_cudnn(monkeypatch, tmp_path):
    for library in device.CUDA_LIBRARIES:
        if library.package != "cudnn":
            (tmp_path / library.package / "lib").mkdir(parents=True, exist_ok=True)
            (tmp_path / library.package / "lib" / library.soname).write_bytes(b"")
    monkeypatch.setattr(device, "nvidia_wheel_dirs", lambda: [str(tmp_path)])
    loaded = []

    def fake_load(name):
        if name == "libcudnn.so.8":
            raise OSError("libcudnn.so.8: cannot open shared object file: No such file or directory")
        loaded.append(name)

    monkeypatch.setattr(device, "_load_library", fake_load)
    with pytest.raises(device.CudaUnavailable) as caught:
        device.preload_cuda_libraries()
    message = str(caught.value)
    assert message.startswith("libcudnn.so.8 not found") and "pip install nvidia-cudnn-cu11==8.9.6.50" in message
    assert [p.rsplit("/", 1)[-1] for p in loaded] == [
        "libcudart.so.11.0", "libcublasLt.so.11", "libcublas.so.11", "libcufft.so.10", "libcurand.so.10"]
    assert all(p.startswith(str(tmp_path)) for p in loaded)  # from the wheels, not the system path

    # With cuDNN's wheel present its sub-libraries load before libcudnn itself.
    (tmp_path / "cudnn" / "lib").mkdir(parents=True)
    for library in device.CUDA_LIBRARIES:
        if library.package == "cudnn":
            (tmp_path / "cudnn" / "lib" / library.soname).write_bytes(b"")
    loaded.clear()
    monkeypatch.setattr(device, "_load_library", loaded.append)
    device.preload_cuda_libraries.cache_clear()
    names = [p.rsplit("/", 1)[-1] for p in device.preload_cuda_libraries()]
    assert names[-1] == "libcudnn.so.8" and names.index("libcudnn_ops_infer.so.8") < names.index("libcudnn_cnn_infer.so.8")


def test_threads_setting():
    assert device.session_options(1).intra_op_num_threads == 1
    with pytest.raises(InputError, match="--threads must be at least 1"):
        device.session_options(0)
    trainer = Trainer(compiled(), device="cpu", threads=1)
    x = np.zeros((2, 1, 16, 16), np.float32)
    assert np.isfinite(trainer.step(x, np.array([0, 1])))


@pytest.mark.cuda
@needs_cuda
def test_cuda_training_matches_cpu():
    x = np.random.default_rng(0).random((8, 1, 16, 16)).astype(np.float32)
    y = np.arange(8) % 10
    cpu, gpu = Trainer(compiled(), device="cpu"), Trainer(compiled(), device="cuda")
    assert gpu.device.kind == "cuda" and device.select_device("auto").kind == "cuda"
    for _ in range(3):
        assert gpu.step(x, y, lr=1e-2) == pytest.approx(cpu.step(x, y, lr=1e-2), rel=1e-3)
    np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), rtol=1e-3, atol=1e-4)
