"""Device selection: CPU always; CUDA only when every piece works, else a one-line reason.

Runs with the onnxruntime-training build and with plain onnxruntime / onnxruntime-gpu:
the artifacts here are ``--backend onnx`` ones (tests/onnx_step_fixtures.py), except in
the ort-training CUDA check, which skips without onnxruntime-training.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx_step_fixtures import ort_training_available, step_artifacts, synthetic_npz

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
        Trainer(step_artifacts(), device="cuda")
    code = runtime_main(["train", str(step_artifacts()), "--data", str(synthetic_npz(tmp_path / "d.npz", n=32)),
                         "--device", "cuda", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == TrainingError.exit_code and len(err.splitlines()) == 1 and "cuda" in err


def test_cpu_build_names_the_missing_provider(monkeypatch):
    monkeypatch.setattr(device.onnxruntime(), "get_available_providers", lambda: ["CPUExecutionProvider"])
    problem = device.cuda_problem()
    assert "no CUDA execution provider in this onnxruntime build" in problem
    if device.is_training_build():
        assert 'pip install "gfcompiler[cuda]"' in problem
    else:
        assert "pip install onnxruntime-gpu" in problem


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
        device.preload_cuda11_libraries()
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
    names = [p.rsplit("/", 1)[-1] for p in device.preload_cuda11_libraries()]
    assert names[-1] == "libcudnn.so.8" and names.index("libcudnn_ops_infer.so.8") < names.index("libcudnn_cnn_infer.so.8")


def test_plain_gpu_build_preloads_with_onnxruntime(monkeypatch, capsys):
    """onnxruntime-gpu (CUDA 12+) loads its libraries with its own preload_dlls, quietly; the training build does not."""
    calls = []

    def preload_dlls(**kwargs):
        calls.append(kwargs)
        print("Failed to load libcudnn.so.9")

    monkeypatch.setattr(device.onnxruntime(), "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(device, "is_training_build", lambda ort=None: False)
    monkeypatch.setattr(device, "preload_cuda11_libraries", lambda: pytest.fail("CUDA 11 preload for a plain build"))
    assert device.preload_cuda_libraries() == ("onnxruntime.preload_dlls",)
    assert calls == [{"directory": ""}] and capsys.readouterr().out == ""
    device.preload_cuda_libraries.cache_clear()
    monkeypatch.setattr(device, "is_training_build", lambda ort=None: True)
    monkeypatch.setattr(device, "preload_cuda11_libraries", lambda: ("libcudart.so.11.0",))
    assert device.preload_cuda_libraries() == ("libcudart.so.11.0",) and len(calls) == 1


def test_threads_setting():
    assert device.session_options(1).intra_op_num_threads == 1
    with pytest.raises(InputError, match="--threads must be at least 1"):
        device.session_options(0)
    trainer = Trainer(step_artifacts(), device="cpu", threads=1)
    x = np.zeros((2, 1, 16, 16), np.float32)
    assert np.isfinite(trainer.step(x, np.array([0, 1])))


def _artifacts(backend: str):
    if backend == "onnx":
        return step_artifacts()
    if not ort_training_available():
        pytest.skip("ort-training artifacts need onnxruntime-training")
    from runtime_fixtures import compiled

    return compiled(backend="ort-training")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["ort-training", "onnx"])
def test_cuda_training_matches_cpu(backend):
    x = np.random.default_rng(0).random((8, 1, 16, 16)).astype(np.float32)
    y = np.arange(8) % 10
    artifacts = _artifacts(backend)
    cpu, gpu = Trainer(artifacts, device="cpu"), Trainer(artifacts, device="cuda")
    assert gpu.device.kind == "cuda" and device.select_device("auto").kind == "cuda"
    for _ in range(3):
        assert gpu.step(x, y, lr=1e-2) == pytest.approx(cpu.step(x, y, lr=1e-2), rel=1e-3)
    np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_onnx_backend_state_stays_on_the_gpu(tmp_path):
    """Step k's state outputs are step k+1's inputs on the GPU; checkpoints and export still work."""
    from onnx_step_fixtures import fresh_step_copy, synthetic_data

    artifacts = fresh_step_copy(tmp_path)
    gpu, cpu = Trainer(artifacts, device="cuda"), Trainer(artifacts, device="cpu")
    x, y = synthetic_data(32)
    for _ in range(3):
        assert gpu.step(x, y, lr=0.02) == pytest.approx(cpu.step(x, y, lr=0.02), rel=1e-4)
    assert all(v.device_name().lower() == "cuda" for v in gpu.engine.values.values())
    for name, value in cpu.engine.state_arrays().items():
        np.testing.assert_allclose(gpu.engine.state_arrays()[name], value, rtol=1e-3, atol=1e-5)
    gpu.save_checkpoint(tmp_path / "gpu.npz")
    resumed = Trainer(artifacts, device="cuda", checkpoint=tmp_path / "gpu.npz")
    assert resumed.step(x, y, lr=0.02) == gpu.step(x, y, lr=0.02)
    gpu.export(tmp_path / "gpu.onnx")  # verified against the GPU eval outputs
