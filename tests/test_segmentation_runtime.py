"""Segmentation in the runtime: data, metrics, training, evaluation and export.

A tiny segmentation network (conv-relu ×3 with one stride 2, a 1×1 class head and a
bilinear Resize back to the input size; onnx.helper, no torch) is compiled with
``--backend onnx`` for per-pixel cross-entropy (11 classes, ignore_index 255) and for
binary BCE. The metrics are checked against scikit-learn, the numpy loss against torch,
the mask folder's nearest resize against an independent numpy one, and the exported
class map against the argmax of the runtime's own logits.
"""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from runtime_fixtures import _SESSION_DIR

from gfcompiler.errors import InputError
from gfcompiler.manifest import CLASS_MAP_OUTPUT
from gfcompiler.runtime import Trainer, load_dataset, open_artifacts
from gfcompiler.runtime.data import digit_scenes, resize_nearest
from gfcompiler.runtime.losses import numpy_loss, per_pixel_cross_entropy
from gfcompiler.runtime.metrics import ConfusionMatrix, SegmentationScores, predicted_classes

SIZE = 16
CLASSES = 11  # builtin:digit-scenes: background + 10 digits
IGNORE = 255


def build_segmenter(path, *, classes: int, size: int = SIZE, seed: int = 0):
    """conv3×3(8)-relu, conv3×3(16, stride 2)-relu, conv3×3(16)-relu, conv1×1(classes), Resize ×2 (bilinear)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    initializers, nodes = [], []

    def conv(name: str, x: str, c_in: int, c_out: int, kernel: int, stride: int) -> str:
        weight = rng.standard_normal((c_out, c_in, kernel, kernel)) * np.sqrt(2.0 / (c_in * kernel * kernel))
        initializers.extend([numpy_helper.from_array(weight.astype(np.float32), f"{name}.weight"),
                             numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name,
                                      kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[kernel // 2] * 4))
        return f"{name}_out"

    x = "input"
    for i, (c_in, c_out, stride) in enumerate([(3, 8, 1), (8, 16, 2), (16, 16, 1)]):
        nodes.append(helper.make_node("Relu", [conv(f"conv{i}", x, c_in, c_out, 3, stride)], [f"relu{i}"]))
        x = f"relu{i}"
    head = conv("head", x, 16, classes, 1, 1)
    initializers.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes.append(helper.make_node("Resize", [head, "", "scales"], ["logits"], mode="linear",
                                  coordinate_transformation_mode="half_pixel"))
    graph = helper.make_graph(
        nodes, "tiny_segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, size, size])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@functools.cache
def compiled_segmenter(loss: str = "cross_entropy") -> str:
    """The tiny segmenter compiled once per session (all convs trained, exact backward)."""
    from gfcompiler.driver import CompileOptions, compile_model

    classes = 1 if loss == "bce" else CLASSES
    source = build_segmenter(_SESSION_DIR / f"segmenter-{loss}.onnx", classes=classes)
    out = _SESSION_DIR / f"segmenter-{loss}"
    compile_model(source, out, CompileOptions(layers="all", patch=0, loss=loss, backend="onnx"))
    return str(out)


@pytest.fixture(scope="module")
def artifacts():
    return open_artifacts(compiled_segmenter())


@pytest.fixture(scope="module")
def binary_artifacts():
    return open_artifacts(compiled_segmenter("bce"))


def _random_maps(shape, classes: int, seed: int, ignored: float = 0.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, shape)
    labels[rng.random(shape) < ignored] = IGNORE
    return rng.integers(0, classes, shape), labels


# ---------------------------------------------------------------- metrics and loss


def test_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    classes = 6
    matrix = ConfusionMatrix(classes, IGNORE)
    batches = [_random_maps((3, 7, 5), classes - 1, seed) for seed in range(4)]  # class 5 never occurs
    for predicted, labels in batches:
        matrix.update(predicted, labels)
    predicted = np.concatenate([p.ravel() for p, _ in batches])
    labels = np.concatenate([lab.ravel() for _, lab in batches])
    keep = labels != IGNORE
    truth, guess = labels[keep], predicted[keep]
    np.testing.assert_array_equal(matrix.matrix, metrics.confusion_matrix(truth, guess, labels=range(classes)))
    assert matrix.pixel_accuracy() == pytest.approx(metrics.accuracy_score(truth, guess))
    present = np.union1d(truth, guess)
    assert list(present) == [0, 1, 2, 3, 4]
    expected_iou = metrics.jaccard_score(truth, guess, labels=present, average=None)
    np.testing.assert_allclose(matrix.class_iou()[present], expected_iou)
    assert np.isnan(matrix.class_iou()[5])  # absent from labels and predictions: left out of the mean
    assert matrix.mean_iou() == pytest.approx(expected_iou.mean())
    summary = matrix.summary()
    assert summary["class_iou"][5] is None and summary["pixels"] == keep.sum()


def test_binary_class_maps_and_scores():
    logits = np.array([[[[-1.0, 0.5], [2.0, -0.1]]]], np.float32)  # N×1×H×W
    np.testing.assert_array_equal(predicted_classes(logits), [[[0, 1], [1, 0]]])
    scores = SegmentationScores(2, None)
    scores.add(0.5, logits, np.array([[[[0.0, 1.0], [0.0, 0.0]]]], np.float32))
    result = scores.result()
    assert result["pixel_accuracy"] == 0.75 and result["class_iou"] == [pytest.approx(2 / 3), 0.5]


def test_per_pixel_loss_equals_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 5, 4, 3)) * 3).astype(np.float32)
    _, labels = _random_maps((2, 4, 3), 5, seed=1, ignored=0.3)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), ignore_index=IGNORE)
    assert numpy_loss("cross_entropy", logits, labels, IGNORE) == pytest.approx(float(expected), rel=1e-6)
    assert per_pixel_cross_entropy(logits, np.full_like(labels, IGNORE), IGNORE) == 0.0  # compiled loss: 0, torch: NaN


# ---------------------------------------------------------------- data


def test_npz_labels_are_checked(artifacts, tmp_path):
    x = np.zeros((4, 3, SIZE, SIZE), np.float32)
    y = np.random.default_rng(0).integers(0, CLASSES, (4, SIZE, SIZE))
    y[0, 0, 0] = IGNORE
    np.savez(tmp_path / "ok.npz", x=x, y=y.astype(np.uint8))
    data = load_dataset(tmp_path / "ok.npz", artifacts)
    assert data.y.dtype == np.int64 and data.y.shape == (4, SIZE, SIZE)
    np.savez(tmp_path / "channel.npz", x=x, y=y[:, None])
    assert load_dataset(tmp_path / "channel.npz", artifacts).y.shape == (4, SIZE, SIZE)
    cases = [
        (y[:, :8], r"y is 4×8×16; the segmentation model takes per-pixel labels N×16×16"),
        (y + 1, r"labels include 11, 256; the model has 11 classes \(0..10\) and ignores 255"),
        (y - 1, r"labels include -1"),
        (y + 0.5, "fractional"),
        (y[:, 0], "y is 4×16"),
    ]
    for i, (labels, message) in enumerate(cases):
        np.savez(tmp_path / f"bad{i}.npz", x=x, y=labels)
        with pytest.raises(InputError, match=message):
            load_dataset(tmp_path / f"bad{i}.npz", artifacts)


def test_binary_npz_masks(binary_artifacts, tmp_path):
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    masks = np.random.default_rng(0).integers(0, 2, (2, SIZE, SIZE))
    np.savez(tmp_path / "masks.npz", x=x, y=masks)
    data = load_dataset(tmp_path / "masks.npz", binary_artifacts)
    assert data.y.shape == (2, 1, SIZE, SIZE) and data.y.dtype == np.float32
    np.testing.assert_array_equal(data.y[:, 0], masks)
    np.savez(tmp_path / "ignored.npz", x=x, y=np.where(masks, IGNORE, 0))
    with pytest.raises(InputError, match="binary .bce. model takes masks of 0 and 1"):
        load_dataset(tmp_path / "ignored.npz", binary_artifacts)


def _mask_folder(root, image_module, *, size=(24, 20), count=3, mode="P"):
    """images/*.jpg and masks/*.png (class indices 0..4 and 255) of ``size`` (H, W)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for i in range(count):
        image_module.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
        mask = rng.choice([0, 1, 2, 3, 4, IGNORE], size).astype(np.uint8)
        picture = image_module.fromarray(mask, mode="L")
        if mode == "P":
            picture = picture.convert("P")  # VOC-style palette image whose indices are the classes
            picture.putpalette(list(rng.integers(0, 256, 768)))
        picture.save(root / "masks" / f"{i:03d}.png")
        masks.append(mask)
    return np.stack(masks).astype(np.int64)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_mask_folder(artifacts, tmp_path, mode):
    image_module = pytest.importorskip("PIL.Image")
    masks = _mask_folder(tmp_path / "data", image_module, mode=mode)
    with image_module.open(tmp_path / "data" / "masks" / "000.png") as saved:
        assert saved.mode == mode
    data = load_dataset(tmp_path / "data", artifacts)
    assert data.x.shape == (3, 3, SIZE, SIZE) and data.y.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(data.y, resize_nearest(masks, (SIZE, SIZE)))  # labels stay class indices
    assert set(np.unique(data.y)) <= {0, 1, 2, 3, 4, IGNORE}


def test_resize_nearest_picks_pixel_centres():
    labels = np.arange(6)[None, None, :].repeat(2, axis=1)  # 1×2×6
    np.testing.assert_array_equal(resize_nearest(labels, (2, 4))[0, 0], [0, 2, 3, 5])  # centres 0.75, 2.25, 3.75, 5.25
    np.testing.assert_array_equal(resize_nearest(labels, (4, 12))[0, 0], np.repeat(np.arange(6), 2))


def test_mask_folder_mismatches_are_refused(artifacts, tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "data"
    _mask_folder(root, image_module)
    (root / "images" / "003.jpg").write_bytes((root / "images" / "000.jpg").read_bytes())
    with pytest.raises(InputError, match=r"1 image\(s\) in .*images have no mask in .*masks .matched by file stem., e.g. 003.jpg"):
        load_dataset(root, artifacts)
    shutil.copy(root / "masks" / "000.png", root / "masks" / "003.png")
    shutil.copy(root / "masks" / "000.png", root / "masks" / "004.png")
    with pytest.raises(InputError, match=r"1 mask\(s\) in .*masks have no image"):
        load_dataset(root, artifacts)
    (root / "masks" / "004.png").unlink()
    image_module.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "003.png")
    with pytest.raises(InputError, match=r"mask .*003.png is 10×10 but image .*003.jpg is 24×20"):
        load_dataset(root, artifacts)
    image_module.fromarray(np.full((24, 20), 11, np.uint8)).save(root / "masks" / "003.png")
    with pytest.raises(InputError, match=r"mask .*003.png has class 11; the model has 11 classes .0..10. and ignores 255"):
        load_dataset(root, artifacts)
    image_module.fromarray(np.zeros((24, 20, 3), np.uint8)).save(root / "masks" / "003.png")
    with pytest.raises(InputError, match=r"mask .*003.png is a RGB image; a mask holds one class index per pixel"):
        load_dataset(root, artifacts)
    (root / "masks" / "003.png").unlink()
    image_module.fromarray(np.zeros((24, 20), np.uint8)).save(root / "masks" / "003.jpg")
    with pytest.raises(InputError, match="lossy"):
        load_dataset(root, artifacts)
    shutil.rmtree(root / "masks")
    with pytest.raises(InputError, match="holds images/ and masks/"):
        load_dataset(root, artifacts)


def test_digit_scenes_are_deterministic_and_labelled(artifacts, binary_artifacts):
    pytest.importorskip("skimage")
    train = load_dataset("builtin:digit-scenes/train", artifacts)
    again = load_dataset("builtin:digit-scenes/train", artifacts)
    test = load_dataset("builtin:digit-scenes/test", artifacts)
    assert train.fingerprint() == again.fingerprint() != test.fingerprint()
    assert train.x.shape == (400, 3, SIZE, SIZE) and test.y.shape == (100, SIZE, SIZE)
    assert train.classes == ("background",) + tuple("0123456789")
    assert set(np.unique(train.y)) == set(range(CLASSES)) | {IGNORE}  # every digit, borders ignored
    background = (train.y == 0).mean(axis=(1, 2))
    assert background.min() > 0.3 and (train.y.reshape(400, -1) % IGNORE > 0).any(axis=1).all()  # a digit in each
    binary = load_dataset("builtin:digit-scenes/train", binary_artifacts)
    labelled = train.y != IGNORE  # the same scenes: masks are "any digit" where the 11-class labels are defined
    np.testing.assert_array_equal(binary.y[:, 0][labelled], (train.y[labelled] > 0).astype(np.float32))
    np.testing.assert_array_equal(binary.x, train.x)


def test_digit_scenes_borders_touch_strokes():
    pytest.importorskip("skimage")
    images, labels, edges = digit_scenes("test", (48, 40), count=6, seed=3)
    assert images.shape == (6, 3, 48, 40) and 0 <= images.min() and images.max() <= 255
    strokes = labels > 0
    near = np.zeros_like(strokes)
    for dy in range(-3, 4):  # within 3 pixels of a stroke pixel (the anti-aliased rim)
        for dx in range(-3, 4):
            near |= np.roll(strokes, (dy, dx), axis=(1, 2))
    assert edges.any() and (near | ~edges).all()
    again = digit_scenes("test", (48, 40), count=6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((images, labels, edges), again))


def test_digit_scenes_need_scikit_image(artifacts, monkeypatch):
    import importlib

    from gfcompiler.runtime import data

    real_import = importlib.import_module

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    data._scene_photos.cache_clear()
    monkeypatch.setattr("importlib.import_module", no_skimage)
    with pytest.raises(InputError, match=r"builtin:digit-scenes needs scikit-image.*gfcompiler\[demo\]"):
        load_dataset("builtin:digit-scenes/test", artifacts)
    with pytest.raises(InputError, match="does not fit a segmentation model"):
        load_dataset("builtin:digits", artifacts)


# ---------------------------------------------------------------- training, evaluation, export


def _scenes(artifacts, split: str, n: int):
    data = load_dataset(f"builtin:digit-scenes/{split}", artifacts)
    return data.x[:n], data.y[:n]


def test_train_evaluate_and_export(artifacts, tmp_path):
    pytest.importorskip("skimage")
    x, y = _scenes(artifacts, "train", 64)
    trainer = Trainer(artifacts, "cpu", lr=1e-2)
    before = trainer.evaluate((x, y), batch_size=24)
    losses = [trainer.step(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16) for _ in range(2)]
    after = trainer.evaluate((x, y), batch_size=24)
    assert after["loss"] < before["loss"] and losses[-1] < losses[0]
    assert set(after) >= {"loss", "pixel_accuracy", "mean_iou", "class_iou", "pixels", "samples"}
    assert len(after["class_iou"]) == CLASSES and after["pixels"] == np.count_nonzero(y != IGNORE)
    # Independent of the batching: the loss is one mean over every labelled pixel, the metrics
    # those of the whole class map.
    logits = trainer.predict(x)
    assert logits.shape == (64, CLASSES, SIZE, SIZE)
    assert after["loss"] == pytest.approx(per_pixel_cross_entropy(logits, y, IGNORE), rel=1e-4)
    whole = ConfusionMatrix(CLASSES, IGNORE)
    whole.update(logits.argmax(axis=1), y)
    assert after["mean_iou"] == pytest.approx(whole.mean_iou()) and after["pixel_accuracy"] == pytest.approx(whole.pixel_accuracy())
    classes = trainer.predict_classes(x)
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))

    import onnxruntime

    path = trainer.export(tmp_path / "segmenter.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [artifacts.output.name, CLASS_MAP_OUTPUT]
    exported_logits, exported_classes = session.run(None, {artifacts.input.name: x[:8]})
    _, eval_logits = trainer.eval_batch(x[:8], y[:8])
    np.testing.assert_allclose(exported_logits, eval_logits, rtol=1e-4, atol=1e-5)
    assert exported_classes.dtype == np.int64
    np.testing.assert_array_equal(exported_classes, eval_logits.argmax(axis=1))


def test_class_map_output_name_is_the_compilers():
    from gfcompiler.onnx_step import step_model

    assert CLASS_MAP_OUTPUT == step_model.CLASS_MAP_OUTPUT  # the name the export model's output is given


def test_bad_labels_in_a_step_are_refused(artifacts):
    trainer = Trainer(artifacts, "cpu")
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    y = np.zeros((2, SIZE, SIZE), np.int64)
    y[1, 3, 4] = 12
    with pytest.raises(InputError, match=r"a batch y has label 12; the model has 11 classes .0..10. and ignores 255"):
        trainer.step(x, y)


def test_binary_model_trains_and_scores_two_classes(binary_artifacts, tmp_path):
    pytest.importorskip("skimage")
    x, y = _scenes(binary_artifacts, "test", 32)
    trainer = Trainer(binary_artifacts, "cpu", lr=1e-2)
    trainer.step(x[:16], y[:16, 0])  # N×H×W masks are given their channel axis
    result = trainer.evaluate((x, y))
    assert len(result["class_iou"]) == 2 and result["pixels"] == y.size
    np.testing.assert_array_equal(trainer.predict_classes(x), (trainer.predict(x)[:, 0] > 0).astype(np.int64))
    trainer.export(tmp_path / "binary.onnx")


def test_gfc_train_and_eval_report_mean_iou(tmp_path, capsys):
    pytest.importorskip("skimage")
    from gfcompiler.runtime.cli import main

    artifacts = tmp_path / "artifacts"
    shutil.copytree(compiled_segmenter(), artifacts)
    np.savez(tmp_path / "train.npz", **dict(zip("xy", _scenes(open_artifacts(artifacts), "train", 48))))
    assert main(["train", str(artifacts), "--data", str(tmp_path / "train.npz"), "--val-data", "builtin:digit-scenes/test",
                 "--epochs", "1", "--batch-size", "16", "--lr", "0.01", "--device", "cpu"]) == 0
    assert "val pixel acc" in capsys.readouterr().err
    epoch = [json.loads(line) for line in (artifacts / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "epoch"][0]
    assert 0 <= epoch["val_mean_iou"] <= 1 and len(epoch["val_class_iou"]) == CLASSES and 0 < epoch["pixel_accuracy"] <= 1
    assert main(["eval", str(artifacts), "--data", "builtin:digit-scenes/test", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mean_iou"] == pytest.approx(epoch["val_mean_iou"]) and result["class_names"][0] == "background"
    assert main(["eval", str(artifacts), "--data", "builtin:digit-scenes/test", "--device", "cpu"]) == 0
    assert "mean IoU" in capsys.readouterr().out
    assert main(["export", str(artifacts), "-o", str(tmp_path / "out.onnx")]) == 0
    assert "'classes'" in capsys.readouterr().out
