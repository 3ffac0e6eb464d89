"""Hostile artifact directories and data files (issue 13, item 4): `gfc train`, `gfc eval` and
`gfc export` on mutated manifests, model files, initial states, checkpoints and data.

Every case must end with exit code 0, 2 (bad input), 5 (artifacts) or 6 (training stopped); a
refusal is exactly one line ``gfc: error: ...`` on stderr with no traceback and no ``internal
error``, and a failed export leaves nothing at ``-o``. The mutations are a fixed, seeded list
(no hypothesis: the same cases every run), run in process through `gfcompiler.cli.main` for
speed, a few through real subprocesses (where onnxruntime reads hostile bytes, a crash would
kill only the child). The whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from models import small_cnn_onnx

from gfcompiler.cli import main as gfc_main
from gfcompiler.manifest import MANIFEST_NAME, sha256_file

ALLOWED_EXIT_CODES = {0, 2, 5, 6}
SAMPLES, SIZE, CLASSES = 16, 28, 10
SEED = 13


# ---------------------------------------------------------------- running gfc and judging the result


def run_gfc(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``gfc ARGV`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = gfc_main(argv)
    return code, err.getvalue()


def run_gfc_subprocess(argv: list[str]) -> tuple[int, str]:
    process = subprocess.run([sys.executable, "-m", "gfcompiler.cli", *argv], capture_output=True, text=True, timeout=120)
    return process.returncode, process.stderr


def problem(code: int, err: str, output: Path | None = None) -> str | None:
    """What is wrong with one run's outcome (None when it behaved)."""
    if "Traceback" in err or "internal error" in err:
        return f"exit {code}: {err.strip()[-300:]}"
    if "onnxruntime_src" in err:  # a library's source location: the message is not in the model's terms
        return f"exit {code}, onnxruntime's raw text: {err.strip()[-300:]}"
    if code not in ALLOWED_EXIT_CODES:
        return f"exit {code} not in {sorted(ALLOWED_EXIT_CODES)}: {err.strip()[-300:]}"
    if code != 0:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("gfc: error: "):
            return f"exit {code} but stderr is not one 'gfc: error:' line: {err.strip()[-300:]!r}"
        if output is not None and output.exists():
            return f"exit {code} but {output} exists"
    return None


def commands(artifacts: Path, data: Path, scratch: Path, *, resume: bool = False) -> dict[str, tuple[list[str], Path | None]]:
    """train / eval / export on ``artifacts`` (train resumes the run directory's checkpoint when ``resume``)."""
    output = scratch / "exported.onnx"
    train = ["train", str(artifacts), "--data", str(data), "--epochs", "3" if resume else "1", "--batch-size", "8",
             "--device", "cpu", "--threads", "1", "--quiet", *(["--resume"] if resume else [])]
    return {
        "train": (train, None),
        "eval": (["eval", str(artifacts), "--data", str(data), "--device", "cpu", "--threads", "1"], None),
        "export": (["export", str(artifacts), "-o", str(output)], output),
    }


def check_cases(cases: dict[str, Callable[[Path], None]], base: Path, data: Path, tmp_path: Path, *,
                run=run_gfc, resume: bool = False, only: tuple[str, ...] = ("train", "eval", "export"),
                rotate: bool = False) -> dict[str, str]:
    """Apply each mutation to a fresh copy of ``base`` and run the commands; assert all behaved.

    ``rotate``: case i runs only command ``only[i % len(only)]`` (the grids of mutations, whose
    neighbours differ in one value). Returns {case / command: last stderr line} for the report."""
    failures, outcomes = [], {}
    for index, (name, mutate) in enumerate(cases.items()):
        for command in ([only[index % len(only)]] if rotate else only):
            artifacts = tmp_path / "case" / "artifacts"
            shutil.rmtree(tmp_path / "case", ignore_errors=True)
            shutil.copytree(base, artifacts)
            mutate(artifacts)
            argv, output = commands(artifacts, data, tmp_path / "case", resume=resume)[command]
            code, err = run(argv)
            outcomes[f"{name} / {command}"] = f"{code}: {err.strip().splitlines()[-1] if err.strip() else ''}"
            found = problem(code, err, output)
            if found:
                failures.append(f"{name} / {command}: {found}")
    assert not failures, "\n".join(failures)
    return outcomes


# ---------------------------------------------------------------- the artifacts and data the cases start from


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Artifacts of tests/models.py's small CNN (``--backend onnx``), a copy with a trained checkpoint
    in its run directory, and a valid data file."""
    root = tmp_path_factory.mktemp("fuzz")
    model = small_cnn_onnx("plain", batch=None)
    artifacts = root / "onnx"
    assert gfc_main(["compile", str(model), "--backend", "onnx", "--layers", "2", "-o", str(artifacts)]) == 0
    data = root / "data.npz"
    rng = np.random.default_rng(SEED)
    np.savez(data, x=rng.random((SAMPLES, 1, SIZE, SIZE), np.float32), y=rng.integers(0, CLASSES, SAMPLES))
    trained = root / "trained"
    shutil.copytree(artifacts, trained)
    assert run_gfc(commands(trained, data, root)["train"][0])[0] == 0
    return {"onnx": artifacts, "trained": trained, "data": data}


# ---------------------------------------------------------------- manifest.json

MANIFEST_PATHS = (
    "format", "backend", "task", "loss", "form", "files", "files.step_model", "files.state", "file_digests",
    "inputs", "inputs.0", "inputs.0.name", "inputs.0.shape", "inputs.0.shape.1", "inputs.0.dtype",
    "outputs", "outputs.0.shape", "outputs.0.shape.1", "label", "label.name", "label.dtype", "label.shape",
    "optimizer", "optimizer.lr_multiplier", "trainable_params", "preprocess", "ignore_index",
    "step", "step.state", "step.state.0", "step.state.0.kind", "step.state.0.name", "step.learning_rate",
    "step.loss", "step.output",
)
HOSTILE_VALUES = (None, "x", -1, 10**30)  # with "deleted": 5 cases a path, rotating commands


def _parent_and_key(document, path: str):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    parent = document
    for key in keys[:-1]:
        parent = parent[key]
    return parent, keys[-1]


def _edit_manifest(path: str, value=..., delete: bool = False) -> Callable[[Path], None]:
    def mutate(artifacts: Path) -> None:
        manifest = json.loads((artifacts / MANIFEST_NAME).read_text())
        try:
            parent, key = _parent_and_key(manifest, path)
        except (KeyError, IndexError, TypeError):
            pytest.fail(f"the fuzz's manifest path {path} does not exist")
        if delete:
            parent.pop(key, None) if isinstance(parent, dict) else parent.pop(key)
        else:
            parent[key] = copy.deepcopy(value)
        (artifacts / MANIFEST_NAME).write_text(json.dumps(manifest))
    return mutate


def manifest_grid() -> dict[str, Callable[[Path], None]]:
    """Every path in MANIFEST_PATHS deleted or set to each of HOSTILE_VALUES."""
    cases = {}
    for path in MANIFEST_PATHS:
        cases[f"manifest {path} deleted"] = _edit_manifest(path, delete=True)
        for value in HOSTILE_VALUES:
            cases[f"manifest {path} = {value!r:.20}"] = _edit_manifest(path, value)
    return cases


def manifest_cases() -> dict[str, Callable[[Path], None]]:
    """Chosen hostile manifests: unknown format, backend, task; files outside; absurd shapes; bad JSON."""
    return {
        "manifest format 99": _edit_manifest("format", 99),
        "manifest backend tensorflow": _edit_manifest("backend", "tensorflow"),
        "manifest task detection": _edit_manifest("task", "detection"),
        "manifest task segmentation": _edit_manifest("task", "segmentation"),
        "manifest loss mse": _edit_manifest("loss", "mse"),
        "manifest label dtype float32": _edit_manifest("label.dtype", "float32"),
        "manifest files.state outside": _edit_manifest("files.state", "../../../../etc/passwd"),
        "manifest files.step_model absolute": _edit_manifest("files.step_model", "/etc/passwd"),
        "manifest files.step_model is a directory": _edit_manifest("files.step_model", "."),
        "manifest inputs.0.shape huge": _edit_manifest("inputs.0.shape", [None, 1, 10**12, 10**12]),
        "manifest inputs.0.shape fixed batch huge": _edit_manifest("inputs.0.shape", [10**30, 1, SIZE, SIZE]),
        "manifest inputs.0.shape negative": _edit_manifest("inputs.0.shape", [None, -3, SIZE, SIZE]),
        "manifest outputs.0.shape classes 3": _edit_manifest("outputs.0.shape", [None, 3]),
        "manifest step.state.0.kind buffer": _edit_manifest("step.state.0.kind", "buffer"),
        "manifest step.state duplicated": lambda a: _edit_manifest("step.state", _manifest(a)["step"]["state"] * 2)(a),
        "manifest step.state.0.name unknown": _edit_manifest("step.state.0.name", "no-such-tensor"),
        "manifest step.loss unknown": _edit_manifest("step.loss", "no-such-output"),
        "manifest optimizer.lr_multiplier nan": _edit_manifest("optimizer.lr_multiplier", float("nan")),
        "manifest optimizer.lr_multiplier 1e300": _edit_manifest("optimizer.lr_multiplier", 1e300),
        "manifest preprocess.scale nan": _edit_manifest("preprocess", {"scale": float("nan")}),
        "manifest not an object": lambda a: (a / MANIFEST_NAME).write_text("[1, 2]"),
        "manifest truncated": lambda a: (a / MANIFEST_NAME).write_bytes((a / MANIFEST_NAME).read_bytes()[:100]),
        "manifest not utf-8": lambda a: (a / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00{"),
        "manifest deeply nested": lambda a: (a / MANIFEST_NAME).write_text("[" * 100000 + "]" * 100000),
        "manifest missing": lambda a: (a / MANIFEST_NAME).unlink(),
    }


def _manifest(artifacts: Path) -> dict:
    return json.loads((artifacts / MANIFEST_NAME).read_text())


def test_mutated_manifest_grid(base, tmp_path):
    check_cases(manifest_grid(), base["onnx"], base["data"], tmp_path, rotate=True)


EXPECTED_REFUSALS = {  # case / command: (exit code, a fragment of the message)
    "manifest backend tensorflow / train": (5, "names backend 'tensorflow'"),
    "manifest task detection / eval": (5, "names task 'detection'"),
    "manifest files.step_model absolute / export": (5, "plain names inside"),
    "manifest files.state outside / train": (5, "plain names inside"),
    "manifest inputs.0.shape huge / eval": (5, "has dimension 1000000000000"),
    "manifest outputs.0.shape classes 3 / export": (5, "describes 'logits' as N×3 float32 but the step model's is N×10"),
    "manifest deeply nested / eval": (5, "unreadable or corrupted"),
    "manifest optimizer.lr_multiplier nan / train": (5, "lr_multiplier nan is not a positive number"),
}


def test_hostile_manifests(base, tmp_path):
    outcomes = check_cases(manifest_cases(), base["onnx"], base["data"], tmp_path)
    for case, (code, fragment) in EXPECTED_REFUSALS.items():
        assert outcomes[case].startswith(f"{code}: gfc: error: ") and fragment in outcomes[case], (case, outcomes[case])


# ---------------------------------------------------------------- model files and the initial state


def _damage(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "empty":
        return b""
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "garbage appended":
        return data + bytes(rng.randrange(256) for _ in range(64))
    blob = bytearray(data)  # "bytes flipped"
    for _ in range(8):
        blob[rng.randrange(len(blob))] ^= 0xFF
    return bytes(blob)


def _damage_file(name: str, how: str, *, update_digest: bool) -> Callable[[Path], None]:
    """Damage artifacts file ``name``; ``update_digest`` also records the new sha256 in the manifest
    (as if the compiler had written it so), which sends the damaged bytes to the loaders."""
    def mutate(artifacts: Path) -> None:
        path = artifacts / name
        path.write_bytes(_damage(path.read_bytes(), how, random.Random(f"{SEED}-{name}-{how}")))
        if update_digest:
            manifest = _manifest(artifacts)
            manifest["file_digests"][name] = sha256_file(path)
            (artifacts / MANIFEST_NAME).write_text(json.dumps(manifest))
    return mutate


DAMAGES = ("empty", "truncated", "bytes flipped", "garbage appended")
STEP_ARTIFACT_FILES = ("step_model.onnx", "eval_model.onnx", "export_model.onnx", "initial_state.npz")


def test_damaged_files_are_caught_by_their_digest(base, tmp_path):
    cases = {f"{name} {how}": _damage_file(name, how, update_digest=False) for name in STEP_ARTIFACT_FILES for how in DAMAGES}
    outcomes = check_cases(cases, base["onnx"], base["data"], tmp_path, only=("eval",))
    assert all(o.startswith("5:") and "sha256" in o for o in outcomes.values()), outcomes


def test_damaged_files_with_matching_digest_reach_the_loaders(base, tmp_path):
    cases = {f"{name} {how} (digest updated)": _damage_file(name, how, update_digest=True)
             for name in STEP_ARTIFACT_FILES for how in DAMAGES}
    check_cases(cases, base["onnx"], base["data"], tmp_path, only=("train", "export"))


def test_a_few_cases_through_the_real_command(base, tmp_path):
    """The installed entry point in a child process: its whole stderr (onnxruntime's own log lines
    included, which in-process capture cannot see) is the one error line."""
    cases = {
        "step_model.onnx bytes flipped (digest updated)": _damage_file("step_model.onnx", "bytes flipped", update_digest=True),
        "initial_state.npz truncated (digest updated)": _damage_file("initial_state.npz", "truncated", update_digest=True),
        "manifest inputs.0.shape.1 = 3": _edit_manifest("inputs.0.shape.1", 3),
    }
    outcomes = check_cases(cases, base["onnx"], base["data"], tmp_path, run=run_gfc_subprocess, rotate=True)
    assert all(o.startswith("5:") for o in outcomes.values()), outcomes
    checkpoint = {"checkpoint bytes flipped (digest updated)": _damage_checkpoint("bytes flipped", update_digest=True)}
    check_cases(checkpoint, base["trained"], base["data"], tmp_path, run=run_gfc_subprocess, resume=True, only=("eval",))


ORT_TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "prefix_model.onnx", "checkpoint")


def test_damaged_ort_training_artifacts(tmp_path):
    """The same damage to an ort-training artifact set (two-stage), which onnxruntime-training loads."""
    pytest.importorskip("onnxruntime.training.api", reason="needs onnxruntime-training")
    artifacts = tmp_path / "ort"
    model = small_cnn_onnx("plain", batch=None)
    assert gfc_main(["compile", str(model), "--backend", "ort-training", "--layers", "2", "-o", str(artifacts)]) == 0
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(SEED)
    np.savez(data, x=rng.random((SAMPLES, 1, SIZE, SIZE), np.float32), y=rng.integers(0, CLASSES, SAMPLES))
    cases = {f"{name} {how} (digest updated)": _damage_file(name, how, update_digest=True)
             for name in ORT_TRAINING_FILES for how in ("bytes flipped",)}
    cases.update({
        "manifest backend onnx on ort-training files": _edit_manifest("backend", "onnx"),
        "manifest form single_graph with a boundary": _edit_manifest("form", "single_graph"),
        "manifest boundary deleted": _edit_manifest("boundary", delete=True),
        "manifest trainable_params unknown": _edit_manifest("trainable_params", ["no-such-parameter"]),
    })
    check_cases(cases, artifacts, data, tmp_path, rotate=True)


# ---------------------------------------------------------------- checkpoints and state.json


def _checkpoint(artifacts: Path) -> Path:
    record = json.loads((artifacts / "run" / "state.json").read_text())
    return artifacts / "run" / record["checkpoint"]


def _damage_checkpoint(how: str, *, update_digest: bool) -> Callable[[Path], None]:
    def mutate(artifacts: Path) -> None:
        path = _checkpoint(artifacts)
        path.write_bytes(_damage(path.read_bytes(), how, random.Random(f"{SEED}-checkpoint-{how}")))
        if update_digest:
            _edit_record("sha256", sha256_file(path))(artifacts)
    return mutate


def _edit_record(path: str, value=..., delete: bool = False) -> Callable[[Path], None]:
    def mutate(artifacts: Path) -> None:
        state = artifacts / "run" / "state.json"
        record = json.loads(state.read_text())
        parent, key = _parent_and_key(record, path)
        if delete:
            del parent[key]
        else:
            parent[key] = copy.deepcopy(value)
        state.write_text(json.dumps(record))
    return mutate


RECORD_PATHS = ("format", "artifacts", "checkpoint", "sha256", "training", "training.position",
                "training.position.epoch", "training.position.global_step", "training.config",
                "training.config.epochs", "training.config.batch_size", "training.config.lr",
                "training.config.schedule", "training.config.seed")


def record_grid() -> dict[str, Callable[[Path], None]]:
    """Every path in RECORD_PATHS of state.json deleted or set to a hostile value."""
    cases = {}
    for path in RECORD_PATHS:
        cases[f"state.json {path} deleted"] = _edit_record(path, delete=True)
        for value in HOSTILE_VALUES:
            cases[f"state.json {path} = {value!r:.20}"] = _edit_record(path, value)
    return cases


def checkpoint_cases() -> dict[str, Callable[[Path], None]]:
    cases = {}
    for how in DAMAGES:
        cases[f"checkpoint {how}"] = _damage_checkpoint(how, update_digest=False)
        cases[f"checkpoint {how} (digest updated)"] = _damage_checkpoint(how, update_digest=True)
    cases["state.json checkpoint escapes"] = _edit_record("checkpoint", "../../manifest.json")
    cases["state.json truncated"] = lambda a: (a / "run" / "state.json").write_text("{")
    cases["state.json deeply nested"] = lambda a: (a / "run" / "state.json").write_text("[" * 100000 + "]" * 100000)
    cases["checkpoint deleted"] = lambda a: _checkpoint(a).unlink()
    return cases


def test_mutated_record_grid(base, tmp_path):
    check_cases(record_grid(), base["trained"], base["data"], tmp_path, resume=True, rotate=True)


def test_damaged_checkpoints(base, tmp_path):
    check_cases(checkpoint_cases(), base["trained"], base["data"], tmp_path, resume=True)


# ---------------------------------------------------------------- data files


class _Tripwire:
    """Unpickling this touches ``path``: the proof that a loader ran pickle on hostile data."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _npz(**arrays) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        np.savez(path, **arrays)
    return write


def data_cases(tripwire: Path) -> dict[str, Callable[[Path], None]]:
    rng = np.random.default_rng(SEED)
    x = rng.random((SAMPLES, 1, SIZE, SIZE), np.float32)
    y = rng.integers(0, CLASSES, SAMPLES)
    objects = np.empty(SAMPLES, object)
    objects[:] = [_Tripwire(tripwire)] * SAMPLES
    nan_x = x.copy()
    nan_x[3, 0, 5, 5] = np.nan
    valid = io.BytesIO()
    np.savez(valid, x=x, y=y)
    blob = valid.getvalue()
    single = io.BytesIO()
    np.save(single, x)

    def raw(content: bytes) -> Callable[[Path], None]:
        return lambda path: path.write_bytes(content)

    flipped = bytearray(blob)
    for i in random.Random(SEED).sample(range(len(blob)), 16):
        flipped[i] ^= 0xFF
    return {
        "pickled object labels": _npz(x=x, y=objects),
        "pickled object samples": _npz(x=objects, y=y),
        "x float64": _npz(x=x.astype(np.float64), y=y),
        "x int": _npz(x=(x * 255).astype(np.uint8), y=y),
        "x complex": _npz(x=x.astype(np.complex64), y=y),
        "x strings": _npz(x=np.array(["a"] * SAMPLES), y=y),
        "x with NaN": _npz(x=nan_x, y=y),
        "x with inf": _npz(x=np.where(x > 0.5, np.inf, x).astype(np.float32), y=y),
        "x scalar": _npz(x=np.float32(1), y=y),
        "x wrong rank": _npz(x=x[:, 0], y=y),
        "x wrong size": _npz(x=x[:, :, :20, :20], y=y),
        "x empty": _npz(x=x[:0], y=y[:0]),
        "y float labels": _npz(x=x, y=y.astype(np.float32) + 0.5),
        "y NaN labels": _npz(x=x, y=np.full(SAMPLES, np.nan, np.float32)),
        "y negative": _npz(x=x, y=y - 20),
        "y too large": _npz(x=x, y=y + 1000),
        "y int64 max": _npz(x=x, y=np.full(SAMPLES, np.iinfo(np.int64).max)),
        "y uint64 max": _npz(x=x, y=np.full(SAMPLES, np.iinfo(np.uint64).max, np.uint64)),
        "y bool": _npz(x=x, y=y > 4),
        "y scalar": _npz(x=x, y=np.int64(3)),
        "y 2-D": _npz(x=x, y=y[:, None]),
        "y strings": _npz(x=x, y=np.array(["cat"] * SAMPLES)),
        "N mismatch": _npz(x=x, y=y[:-3]),
        "no y": _npz(x=x),
        "empty archive": _npz(),
        "truncated npz": raw(blob[: len(blob) // 2]),
        "flipped npz": raw(bytes(flipped)),
        "empty file": raw(b""),
        "not a zip": raw(b"not an npz at all\n" * 10),
        "a pickle renamed .npz": raw(pickle.dumps({"x": x, "y": y})),
        "a .npy renamed .npz": raw(single.getvalue()),
        "a directory named .npz": lambda path: path.mkdir(),
    }


def test_hostile_data_files(base, tmp_path):
    tripwire = tmp_path / "unpickled"
    failures, artifacts = [], base["onnx"]
    for number, (name, write) in enumerate(data_cases(tripwire).items()):
        data = tmp_path / f"case-{number}.npz"
        write(data)
        run_dir = tmp_path / f"run-{number}"
        for command in ("train", "eval"):
            argv, _ = commands(artifacts, data, tmp_path)[command]
            code, err = run_gfc([*argv, "--run-dir", str(run_dir)])
            found = problem(code, err)
            if not found and code != 0 and run_dir.exists():
                found = f"exit {code} but the refused run left {sorted(p.name for p in run_dir.iterdir())} behind"
            if found:
                failures.append(f"{name} / {command}: {found}")
    assert not failures, "\n".join(failures)
    assert not tripwire.exists(), "a runtime loader unpickled an object array"


def test_the_tripwire_fires_when_unpickled(tmp_path):
    """So that its silence in test_hostile_data_files means something."""
    tripwire, data = tmp_path / "unpickled", tmp_path / "trap.npz"
    data_cases(tripwire)["pickled object labels"](data)
    with np.load(data, allow_pickle=True) as archive:
        archive["y"]
    assert tripwire.exists()


def test_runtime_never_unpickles():
    """Every np.load in the runtime passes allow_pickle=False (numpy's default, said explicitly)."""
    import gfcompiler.runtime as runtime

    for source in Path(runtime.__file__).parent.glob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if "np.load(" in line or "numpy.load(" in line:
                assert "allow_pickle=False" in line, f"{source.name}:{number}: {line.strip()}"
