"""Choosing where training runs: CPU always, CUDA when it really works.

``--device cpu`` needs nothing. ``--device cuda`` (or ``cuda:N``) checks, in order, each
piece CUDA training needs and names the first one missing, in one line:

1. a CUDA execution provider in this onnxruntime build (``onnxruntime-training-cpu`` and
   the plain ``onnxruntime`` have none; ``onnxruntime-training`` is the CUDA 11.8 /
   cuDNN 8 build of the training package, ``onnxruntime-gpu`` the CUDA 12 build of the
   plain one, enough for ``--backend onnx`` artifacts);
2. an NVIDIA driver (``libcuda.so.1``) that reports a GPU;
3. the CUDA libraries. For the training build, the CUDA 11 / cuDNN 8 libraries are
   preloaded with ``RTLD_GLOBAL`` in dependency order from the ``nvidia-*-cu11`` wheels
   (the ``gfcompiler[cuda]`` extra) when those are installed, else looked up on the
   system path, so nobody hunts for ``LD_LIBRARY_PATH``. For a plain ``onnxruntime-gpu``
   (CUDA 12 or later), its own ``onnxruntime.preload_dlls`` loads them from the
   ``nvidia-*`` wheels or the system path;
4. a tiny session that actually runs on the GPU (CPU fallback disabled).

``--device auto`` runs the same checks and picks CUDA only when all pass, else CPU, and
`Device.describe` says which and why. Results are cached per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import io
import os

import numpy as np

from gfcompiler.errors import InputError, TrainingError, first_line
from gfcompiler.ort_training import error_message, onnxruntime

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class CudaLibrary:
    """One shared library of the CUDA 11.8 / cuDNN 8 stack the CUDA provider loads."""

    package: str  # directory under site-packages/nvidia/ of the wheel that ships it
    soname: str
    wheel: str  # the pip requirement that provides it
    required: bool = True  # cuDNN's sub-libraries are found by libcudnn itself otherwise


_CUDNN = "nvidia-cudnn-cu11==8.9.6.50"
# Dependency order: each library's dependencies come before it.
CUDA_LIBRARIES: tuple[CudaLibrary, ...] = (
    CudaLibrary("cuda_runtime", "libcudart.so.11.0", "nvidia-cuda-runtime-cu11==11.8.89"),
    CudaLibrary("cublas", "libcublasLt.so.11", "nvidia-cublas-cu11==11.11.3.6"),
    CudaLibrary("cublas", "libcublas.so.11", "nvidia-cublas-cu11==11.11.3.6"),
    CudaLibrary("cufft", "libcufft.so.10", "nvidia-cufft-cu11==10.9.0.58"),
    CudaLibrary("curand", "libcurand.so.10", "nvidia-curand-cu11==10.3.0.86"),
    CudaLibrary("cudnn", "libcudnn_ops_infer.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn_ops_train.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn_cnn_infer.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn_cnn_train.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn_adv_infer.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn_adv_train.so.8", _CUDNN, required=False),
    CudaLibrary("cudnn", "libcudnn.so.8", _CUDNN),
)

# A serialized ONNX model (IR 8, opset 13): y = Relu(x), x and y float[4]. Built once with
# onnx.helper (tests/test_runtime_device.py rebuilds and compares it) and kept as bytes
# so that probing a device needs no onnx package.
PROBE_MODEL = (
    b'\x08\x08\x12\x03gfc:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n'
    b"\x08\x08\x01\x12\x04\n\x02\x08\x04b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x04B\x04\n\x00\x10\r"
)


class CudaUnavailable(Exception):
    """CUDA cannot run here: ``reason`` names the missing piece, ``hint`` how to add it."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason + (f"; {hint}" if hint else ""))
        self.reason = reason
        self.hint = hint


@dataclasses.dataclass(frozen=True)
class Device:
    """Where sessions run: ``kind`` is "cpu" or "cuda"; ``note`` says why (for ``auto``)."""

    kind: str
    index: int = 0
    note: str = ""

    @property
    def ort_device(self) -> str:
        """The device string of onnxruntime.training.api.Module ("cpu", "cuda:0")."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def providers(self) -> list:
        """Execution providers for an InferenceSession on this device."""
        if self.kind == "cpu":
            return [CPU_PROVIDER]
        return [(CUDA_PROVIDER, {"device_id": self.index}), CPU_PROVIDER]

    def describe(self) -> str:
        return self.ort_device + (f" ({self.note})" if self.note else "")


def parse_device(request: str) -> tuple[str, int]:
    """``"cpu" | "cuda" | "cuda:N" | "auto"`` -> (kind, index); InputError otherwise."""
    text = str(request).strip().lower()
    if text in ("cpu", "auto", "cuda", "gpu"):
        return ("cuda" if text == "gpu" else text), 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise InputError(f"unknown device {request!r}: use cpu, cuda, cuda:N or auto")


def select_device(request: str = "auto") -> Device:
    """The device for ``request``; TrainingError naming the missing piece when CUDA cannot run."""
    kind, index = parse_device(request)
    if kind == "cpu":
        return Device("cpu")
    problem = cuda_unavailable(index)
    if problem is None:
        return Device("cuda", index, "auto: CUDA works" if kind == "auto" else "")
    if kind == "auto":
        return Device("cpu", note=f"auto: CUDA unavailable, {problem.reason}")
    raise TrainingError(f"cannot train on cuda:{index}: {problem}")


def cuda_problem(index: int = 0) -> str | None:
    """None when CUDA works on GPU ``index``, else the first missing piece and its fix (one line)."""
    problem = cuda_unavailable(index)
    return None if problem is None else str(problem)


@functools.cache
def cuda_unavailable(index: int = 0) -> CudaUnavailable | None:
    """None when CUDA works on GPU ``index``, else why not (cached per process)."""
    try:
        check_cuda_provider()
        check_gpu(index)
        preload_cuda_libraries()
        probe_cuda_session(index)
    except CudaUnavailable as problem:
        return problem
    return None


def check_cuda_provider() -> None:
    ort = onnxruntime()
    if CUDA_PROVIDER not in ort.get_available_providers():
        package = _package_name(ort)
        if is_training_build(ort):
            hint = 'install the CUDA build: pip uninstall -y onnxruntime-training-cpu && pip install "gfcompiler[cuda]"'
        else:
            installed = package.split()[0]
            hint = f"install the CUDA build: pip uninstall -y {installed} && pip install onnxruntime-gpu"
        raise CudaUnavailable(f"no CUDA execution provider in this onnxruntime build ({package})", hint)


def is_training_build(ort=None) -> bool:
    """Whether the installed onnxruntime is onnxruntime-training (CUDA 11.8 when it has CUDA)."""
    ort = ort or onnxruntime()
    try:
        from onnxruntime.capi import build_and_package_info as info  # type: ignore

        return str(info.package_name).startswith("onnxruntime-training")
    except Exception:  # noqa: BLE001 - older builds lack the module: look for the training package
        return any(os.path.isdir(os.path.join(path, "training")) for path in getattr(ort, "__path__", []))


def _package_name(ort) -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info  # type: ignore

        return f"{info.package_name} {info.__version__}"
    except Exception:  # noqa: BLE001 - informational only
        return f"onnxruntime {getattr(ort, '__version__', '?')}"


def check_gpu(index: int = 0) -> None:
    """The NVIDIA driver loads and reports GPU ``index`` (CUDA driver API through ctypes)."""
    try:
        driver = _load_library("libcuda.so.1")
    except OSError:
        raise CudaUnavailable("no GPU: the NVIDIA driver (libcuda.so.1) is not installed") from None
    status = driver.cuInit(0)
    if status == 100:  # CUDA_ERROR_NO_DEVICE
        raise CudaUnavailable("no GPU: the NVIDIA driver finds no CUDA device")
    if status != 0:
        raise CudaUnavailable(f"no usable GPU: the NVIDIA driver fails to initialise (cuInit error {status})")
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise CudaUnavailable("no GPU: the NVIDIA driver finds no CUDA device")
    if index >= count.value:
        raise CudaUnavailable(f"no GPU cuda:{index}: the driver finds {count.value} device(s)")


def _load_library(name_or_path: str) -> ctypes.CDLL:
    return ctypes.CDLL(name_or_path, mode=ctypes.RTLD_GLOBAL)


def nvidia_wheel_dirs() -> list[str]:
    """The ``site-packages/nvidia`` directories of installed ``nvidia-*`` wheels."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [str(path) for path in spec.submodule_search_locations]


@functools.cache
def preload_cuda_libraries() -> tuple[str, ...]:
    """Load the CUDA libraries the installed onnxruntime needs; returns what was loaded."""
    if not is_training_build():
        return preload_with_onnxruntime()
    return preload_cuda11_libraries()


def preload_with_onnxruntime() -> tuple[str, ...]:
    """A plain onnxruntime-gpu (CUDA 12+): its own ``preload_dlls``, quietly; the probe session judges."""
    ort = onnxruntime()
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # before onnxruntime 1.21: the libraries must be on the system path
        return ()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints what it cannot find
            preload(directory="")  # "": the nvidia-* wheels, then the system path (never torch's copies)
    except Exception:  # noqa: BLE001 - a missing library shows in probe_cuda_session, with onnxruntime's words
        return ()
    return ("onnxruntime.preload_dlls",)


def preload_cuda11_libraries() -> tuple[str, ...]:
    """Load the CUDA 11 / cuDNN 8 libraries globally, wheels first; returns what was loaded."""
    loaded = []
    wheel_dirs = nvidia_wheel_dirs()
    for library in CUDA_LIBRARIES:
        candidates = [os.path.join(d, library.package, "lib", library.soname) for d in wheel_dirs]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None and not library.required:
            continue  # no wheel: a system libcudnn finds its own sub-libraries
        try:
            _load_library(path or library.soname)
        except OSError as error:
            where = path or "the wheels or the system library path"
            raise CudaUnavailable(
                f"{library.soname} not found in {where} ({first_line(error)})",
                f"pip install {library.wheel}, or gfcompiler[cuda]",
            ) from None
        loaded.append(path or library.soname)
    return tuple(loaded)


def probe_cuda_session(index: int = 0) -> None:
    """Run a one-node model on GPU ``index`` with CPU fallback disabled."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(PROBE_MODEL, options, providers=[(CUDA_PROVIDER, {"device_id": index})])
        if CUDA_PROVIDER not in session.get_providers():
            raise CudaUnavailable("the CUDA execution provider did not start (onnxruntime fell back to CPU)")
        x = np.array([-1.0, 0.0, 2.0, -3.0], dtype=np.float32)
        (y,) = session.run(None, {"x": x})
    except CudaUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
        raise CudaUnavailable(f"the CUDA execution provider fails: {error_message(error)}") from None
    if not np.array_equal(y, np.maximum(x, 0)):
        raise CudaUnavailable("the CUDA execution provider computes wrong results on a probe model")


def session_options(threads: int | None = None, *, memory_arena: bool = True, spinning: bool = True):
    """onnxruntime SessionOptions: ``threads`` intra-op threads (None: onnxruntime's default).

    ``memory_arena=False`` disables the CPU arena, so that peak memory follows what the
    graph keeps alive rather than the arena's growth policy (for measurements). With the
    arena on, every session of the process allocates CPU memory from one shared arena
    (`shared_cpu_arena`). ``spinning=False`` makes idle intra-op threads sleep at once
    instead of spinning, for sessions that run back to back with others.
    """
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if memory_arena:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


@functools.cache
def shared_cpu_arena() -> None:
    """Register one CPU arena allocator with onnxruntime's environment (once per process).

    A training step runs up to three sessions one after another (frozen prefix, training
    module, optimizer). Each with its own arena would keep its own high-water mark of
    activations reserved while the others run; sharing one arena lets the training
    step reuse what the prefix freed, so a two-stage step needs no more memory than a
    single training graph. Sessions opt in with ``session.use_env_allocators``.
    """
    ort = onnxruntime()
    memory_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory_info, ort.OrtArenaCfg(0, -1, -1, -1))


