"""`compile_model`: ONNX CNN in, gradient-filtered training artifacts out.

The stages, in order (each reported through ``progress``):

1. load and normalize versions / input shapes (`gfcompiler.loading`);
2. canonicalize (`gfcompiler.passes.canonicalize`) and infer shapes;
3. select the trained layers (`gfcompiler.selection`) and rewrite ops without a
   gradient in the trained region (`gfcompiler.passes.gradient_support`);
4. cut the model before the trained region into a frozen prefix inference model and
   the trained suffix (`gfcompiler.split`; ``single_graph`` keeps one graph), and
   generate onnxruntime-training artifacts for the suffix (`gfcompiler.artifacts`);
5. rewrite the trained convs' backward (`gfcompiler.passes.gradient_filter`) and
   account the memory held for backward, exact vs filtered (`gfcompiler.memory`);
6. check the artifacts load in onnxruntime, write the manifest, and move the
   finished directory into place with one rename (`gfcompiler.outdir`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

import gfcompiler
from gfcompiler import artifacts, memory, outdir, split
from gfcompiler.emit import nodes_of_layer
from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.geometry import ConvShape, FilterGeometry
from gfcompiler.layers import conv_shape
from gfcompiler.loading import InputShape, data_inputs, infer_shapes, load_model, measure_unknown_conv_inputs
from gfcompiler.manifest import (
    BACKENDS,
    FILES,
    STEP_FILES,
    TWO_STAGE_FILES,
    ConvGeometryRecord,
    Form,
    LayerRecord,
    Manifest,
    PreprocessRecord,
    SelectionRecord,
    SourceModel,
    StepRecord,
    TensorRecord,
    Totals,
    sha256_file,
    write_manifest,
)
from gfcompiler.onnx_step.losses import LossForm, loss_form
from gfcompiler.passes.canonicalize import canonicalization_passes
from gfcompiler.passes.gradient_filter import GradientFilterPass, forward_conv_of, is_conv_grad
from gfcompiler.passes.gradient_support import DecomposeGradientlessOpsPass
from gfcompiler.passes.output_head import META_KEY as STRIPPED_SOFTMAX_KEY
from gfcompiler.passes.output_head import strip_softmax_for_loss
from gfcompiler.passes.output_select import META_KEY as SELECTED_OUTPUT_KEY
from gfcompiler.passes.output_select import describe_value, select_trained_output
from gfcompiler.passes.training_cleanup import CoupledWeightDecayPass, DropUnusedMaxPoolIndicesPass
from gfcompiler.selection import Selection, parse_layers, select_layers, untie_frozen_uses

Progress = Callable[[str], None]


@dataclasses.dataclass
class CompileOptions:
    """Everything ``gfc compile`` takes besides the model and the output directory."""

    layers: int | list[str] | str | None = None  # None: the last 4 convs (fewer if the model has fewer)
    patch: int = 4  # 0: exact backward (the baseline)
    loss: str = "cross_entropy"
    optimizer: artifacts.OptimizerSpec = dataclasses.field(default_factory=artifacts.OptimizerSpec)
    input_shapes: list[InputShape] = dataclasses.field(default_factory=list)
    force: bool = False
    force_forward_pooling: bool = True  # False only to demonstrate what the dependency buys
    preprocess: dict | None = None
    keep_softmax: bool = False  # cross_entropy: keep an output Softmax instead of training on its input
    single_graph: bool = False  # True: no frozen prefix model, the whole forward in the training graph
    backend: str = "onnx"  # standard-ONNX step model for stock onnxruntime; or "ort-training" (onnxruntime-training 1.19.2)
    gradient_outputs: bool = False  # onnx backend: the step model also outputs <param>.grad (verification)
    ignore_index: int | None = None  # per-pixel cross_entropy: the label value ignored (None: 255)
    train_output: str | None = None  # the graph output the loss trains (required when the model has several)


def _silent(_: str) -> None:
    pass


def prepare_model(model_path: Path, options: CompileOptions, progress: Progress = _silent) -> tuple[ir.Model, Selection]:
    """Stages 1–3: the canonical, shape-annotated model and its layer selection."""
    progress(f"loading {model_path}")
    model = load_model(Path(model_path), options.input_shapes, progress)
    progress("canonicalizing (constants, Dropout/Identity, BatchNorm folding)")
    for canonical_pass in canonicalization_passes():
        canonical_pass(model)
    infer_shapes(model)
    select_trained_output(model, options.train_output, progress)  # the others dropped; result in model.meta
    strip_softmax_for_loss(model, options.loss, options.keep_softmax, progress)  # result in model.meta
    _require_one_data_input(model)
    _require_spatial_sizes(model)
    measure_unknown_conv_inputs(model)
    layers = parse_layers(options.layers) if isinstance(options.layers, str) else options.layers  # None: default
    selection = select_layers(model.graph, layers)
    untie_frozen_uses(model.graph, selection)
    if options.backend == "ort-training":  # the onnx backend has gradient rules for these ops
        DecomposeGradientlessOpsPass(list(selection.trained_region))(model)
    # Nodes and parameters changed; recompute the selection on the rewritten graph.
    selection = select_layers(model.graph, layers)
    return model, selection


def _require_one_data_input(model: ir.Model) -> None:
    """The runtime feeds one data tensor per step; a model with more inputs (recurrent state, a sample rate) is refused."""
    inputs = data_inputs(model)
    if len(inputs) > 1:
        listed = ", ".join(describe_value(value) for value in inputs)
        raise UnsupportedModelError(
            f"the model has {len(inputs)} data inputs: {listed}; gfcompiler trains models with one data input "
            "(make the others constants or initializers before compiling)"
        )


def _require_spatial_sizes(model: ir.Model) -> None:
    for value in data_inputs(model):
        shape = value.shape
        if shape is not None and len(shape) == 4 and not all(isinstance(d, int) for d in shape[1:]):
            dims = ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise InputError(
                f"input {value.name!r} has dynamic dims ({dims}); the filter needs spatial sizes: "
                f"pass --input-shape {value.name}=N,C,H,W"
            )


def _layer_geometries(selection: Selection, patch: int) -> tuple[dict[str, ConvShape | str], dict[str, FilterGeometry]]:
    shapes = {conv.name: conv_shape(conv) for conv in selection.convs}
    geometries: dict[str, FilterGeometry] = {}
    if patch > 0:
        for conv in selection.trained_convs:
            shape = shapes[conv.name]
            if isinstance(shape, ConvShape):
                geometry = FilterGeometry(shape, patch)
                if geometry.unsupported_reason() is None:
                    geometries[conv.name] = geometry
    return shapes, geometries


def _check_patch(patch: int, selection: Selection, shapes: dict[str, ConvShape | str]) -> None:
    if patch < 0:
        raise InputError(f"--patch must be >= 0 (0 = exact backward), got {patch}")
    sizes = [max(s.out_height, s.out_width) for c in selection.trained_convs if isinstance(s := shapes[c.name], ConvShape)]
    if patch > 0 and sizes and patch > max(sizes):
        raise InputError(f"--patch {patch} is larger than every trained layer's output map (largest side {max(sizes)})")


def _loss_form(model: ir.Model, options: CompileOptions) -> LossForm:
    """How ``options.loss`` applies to the model output (per sample or per pixel; `losses.loss_form`)."""
    return loss_form(options.loss, model.graph.outputs[0], options.ignore_index)


def _choose_loss_form(model: ir.Model, options: CompileOptions, progress: Progress) -> LossForm:
    """The loss form, said in a progress line; per-pixel losses are built by the onnx backend only."""
    form = _loss_form(model, options)
    progress(f"loss: {form.description}")
    if form.segmentation and options.backend == "ort-training":
        raise UnsupportedModelError(
            f"--backend ort-training cannot train a segmentation output ({form.description}): onnxruntime-training's "
            "loss blocks take the classes on the last axis with no ignore_index, and it has no CPU kernel for "
            "ResizeGrad (the upsampling of segmentation heads); use --backend onnx (the default)")
    return form


def compile_model(model_path: os.PathLike | str, output_dir: os.PathLike | str, options: CompileOptions | None = None,
                  progress: Progress = _silent) -> dict:
    """Compile ``model_path`` into artifacts at ``output_dir``; returns the manifest.

    Raises a `GfcError` subclass for anything the user can fix; nothing is left at
    ``output_dir`` unless the whole compilation succeeded.
    """
    options = options or CompileOptions()
    if options.backend not in BACKENDS:
        raise InputError(f"unknown backend {options.backend!r} (choose from {', '.join(BACKENDS)})")
    model_path, output_dir = Path(model_path), Path(output_dir)
    outdir.check_writable_target(output_dir, options.force)
    model, selection = prepare_model(model_path, options, progress)
    shapes, geometries = _layer_geometries(selection, options.patch)
    _check_patch(options.patch, selection, shapes)
    _choose_loss_form(model, options, progress)
    if options.backend == "onnx":
        return _compile_step_model(model_path, output_dir, model, selection, shapes, geometries, options, progress)
    form = _Form.choose(model, selection, options)
    with outdir.staging_directory(output_dir, force=options.force) as staging:
        training_source = model
        if form.split is not None:
            progress(f"splitting: {form.split.prefix_nodes} frozen nodes into the prefix model, "
                     f"{form.split.suffix_nodes} in the trained suffix, {len(form.split.boundary)} tensor(s) cross")
            form.write_stage_models(model, selection, staging)
            training_source = form.split.suffix
        progress(f"generating training graph ({selection.rule}; {len(selection.trainable_params)} trainable tensors)")
        artifacts.generate(training_source, selection.trainable_params, options.loss, options.optimizer, staging)
        progress("rewriting the backward of trained convs" if geometries else "keeping the exact backward")
        boundary = frozenset(t.name for t in form.split.boundary) if form.split is not None else frozenset()
        accounting = _rewrite_training_model(staging / FILES["training_model"], geometries, model, options, boundary,
                                             selection.trainable_params)
        progress("checking the artifacts load in onnxruntime")
        outdir.check_loadable(staging)
        files = {**FILES, **(TWO_STAGE_FILES if form.split is not None else {})}
        manifest = _manifest(model_path, model, selection, shapes, geometries, accounting, options, files,
                             form.to_manifest(), staging)
        write_manifest(staging, manifest)
    progress(f"wrote {output_dir}")
    return manifest


@dataclasses.dataclass
class _Form:
    """Two-stage (a frozen prefix model, then the trained suffix's artifacts) or a single graph, and why."""

    split: split.Split | None
    reason: str | None  # why single-graph

    @classmethod
    def choose(cls, model: ir.Model, selection: Selection, options: CompileOptions) -> _Form:
        if options.single_graph:
            return cls(None, "--single-graph")
        reason = split.why_not_split(model, selection)
        return cls(None, reason) if reason else cls(split.split_model(model, selection), None)

    def write_stage_models(self, model: ir.Model, selection: Selection, staging: Path) -> None:
        artifacts.save_model(self.split.prefix, staging / TWO_STAGE_FILES["prefix_model"])
        artifacts.save_model(split.export_model(model, selection.trainable_params), staging / TWO_STAGE_FILES["export_model"])

    def to_manifest(self) -> Form:
        if self.split is None:
            return Form("single_graph", single_graph_reason=self.reason)
        return Form("two_stage", boundary=tuple(self.split.boundary), prefix_nodes=self.split.prefix_nodes,
                    suffix_nodes=self.split.suffix_nodes)


@dataclasses.dataclass
class _Accounting:
    batch: int
    exact: memory.HeldTensors
    emitted: memory.HeldTensors
    input_grad_needed: dict[str, bool]


def _known_shapes(model: ir.Model) -> dict[str, tuple]:
    shapes = {}
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None:
                shapes[value.name] = tuple(d if isinstance(d, int) else None for d in value.shape)
    return shapes


def _accounting_batch(model: ir.Model) -> int:
    shape = data_inputs(model)[0].shape
    return shape[0] if shape is not None and isinstance(shape[0], int) else 1


def _rewrite_training_model(path: Path, geometries: dict[str, FilterGeometry], model: ir.Model,
                            options: CompileOptions, boundary: frozenset[str], trainable: list[str]) -> _Accounting:
    training = ir.load(os.fspath(path))
    DropUnusedMaxPoolIndicesPass()(training)
    if options.optimizer.name == "sgd" and options.optimizer.effective_weight_decay > 0:
        CoupledWeightDecayPass(trainable, options.optimizer.effective_weight_decay, artifacts.accumulation_buffer_name)(training)
    batch, shapes = _accounting_batch(model), _known_shapes(model)
    conv_grads = {}
    for node in training.graph:
        forward = forward_conv_of(node) if is_conv_grad(node) else None
        if forward is not None:
            conv_grads[forward.name] = node
    input_grad_needed = {name: bool(node.outputs[0].uses()) for name, node in conv_grads.items()}
    exact = memory.held_for_backward(training.graph, {name: {node} for name, node in conv_grads.items()}, batch, shapes,
                                     boundary)
    if not geometries:
        artifacts.save_model(training, path)
        return _Accounting(batch, exact, exact, input_grad_needed)
    rewritten = GradientFilterPass(geometries, force_forward_pooling=options.force_forward_pooling)(training).rewritten
    layer_nodes = {name: {node} for name, node in conv_grads.items() if name not in rewritten}
    # A layer's summary nodes count too: without the forward dependency they run lazily, in the backward.
    layer_nodes.update({name: set(nodes_of_layer(training.graph, name)) for name in rewritten})
    emitted = memory.held_for_backward(training.graph, layer_nodes, batch, shapes, boundary)
    artifacts.save_model(training, path)
    return _Accounting(batch, exact, emitted, input_grad_needed)


def _layer_record(conv: ir.Node, selection: Selection, shape: ConvShape | str, geometry: FilterGeometry | None,
                  accounting: _Accounting, patch: int) -> LayerRecord:
    known = isinstance(shape, ConvShape)
    conv_geometry = ConvGeometryRecord(
        input_shape=(shape.batch, shape.in_channels, shape.height, shape.width),
        output_shape=(shape.batch, shape.out_channels, shape.out_height, shape.out_width),
        kernel=tuple(shape.kernel), strides=tuple(shape.strides), pads=tuple(shape.pads),
        dilations=tuple(shape.dilations), group=shape.group,
    ) if known else None
    if not selection.is_trained(conv):
        return LayerRecord(conv.name, trained=False, backward="none (frozen)", geometry=conv_geometry)
    needs_dx = accounting.input_grad_needed.get(conv.name, True)
    reason = None  # why the backward stays exact
    if geometry is None and patch == 0:
        reason = "--patch 0 (exact baseline)"
    elif geometry is None:
        reason = FilterGeometry(shape, patch).unsupported_reason() if known else shape
    exact_macs = macs = None
    if known:
        exact_macs = FilterGeometry(shape, max(patch, 1)).exact_backward_macs(accounting.batch, needs_dx)
        macs = geometry.backward_macs(accounting.batch, needs_dx) if geometry is not None else exact_macs
    return LayerRecord(
        conv.name, trained=True, backward="filtered" if geometry is not None else "exact", geometry=conv_geometry,
        needs_input_grad=needs_dx, reason=reason, backward_macs_exact=exact_macs, backward_macs=macs,
        patches=tuple(geometry.patches) if geometry is not None else None,
        held_bytes_exact=accounting.exact.per_layer.get(conv.name),
        held_bytes=accounting.emitted.per_layer.get(conv.name),
        held_tensors=tuple(accounting.emitted.per_layer_tensors.get(conv.name, [])),
    )


def _manifest(model_path: Path, model: ir.Model, selection: Selection, shapes: dict, geometries: dict,
              accounting: _Accounting, options: CompileOptions, files: dict, form: Form, staging: Path) -> dict:
    """The manifest's JSON (gfcompiler.manifest.Manifest) for the artifacts in ``staging``."""
    layers = [
        _layer_record(conv, selection, shapes[conv.name], geometries.get(conv.name), accounting, options.patch)
        for conv in selection.convs
    ]
    eval_inputs = outdir.session_io(staging / files["eval_model"])
    data_names = {value.name for value in data_inputs(model)} | {tensor.name for tensor in form.boundary}
    label = [io for io in eval_inputs["inputs"] if io.name not in data_names and io.name not in selection.trainable_params]
    loss = _loss_form(model, options)
    return Manifest(
        format=gfcompiler.ARTIFACT_FORMAT,
        backend=options.backend,
        gfcompiler_version=gfcompiler.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source_model=SourceModel(str(model_path), sha256_file(model_path)),
        files=files,
        form=form,
        inputs=tuple(TensorRecord.of_value(value) for value in data_inputs(model)),
        outputs=tuple(TensorRecord.of_value(value) for value in model.graph.outputs),
        label=label[0] if label else None,
        loss=options.loss,
        task=loss.task or "classification",
        ignore_index=loss.ignore_index,
        loss_form=loss.description if loss.segmentation else None,  # classifier manifests stay as they were
        optimizer=options.optimizer.to_manifest(options.backend),
        patch=options.patch,
        selection=SelectionRecord(selection.rule, tuple(c.name for c in selection.trained_convs)),
        trainable_params=tuple(selection.trainable_params),
        preprocess=None if options.preprocess is None else PreprocessRecord.from_json(options.preprocess),
        accounting_batch=accounting.batch,
        totals=Totals.of_layers(layers, accounting.exact.total_bytes, accounting.emitted.total_bytes,
                                accounting.emitted.unknown),
        layers=tuple(layers),
        notes=_notes(model),
        file_digests={name: sha256_file(staging / name) for name in files.values()},
    ).to_json()


def _notes(model: ir.Model) -> tuple[str, ...]:
    """What the compile changed that the user must know when using the artifacts."""
    selected = model.meta.get(SELECTED_OUTPUT_KEY)
    chosen = () if selected is None else (
        f"the model's output {selected.output!r} is trained and exported (--train-output); its other outputs "
        f"{', '.join(map(repr, selected.dropped_outputs))} and the nodes only they needed were dropped",)
    return chosen + tuple(
        f"output {stripped.output!r} was a Softmax ({stripped.node}); cross-entropy applies its own, so the model "
        f"is trained on, and outputs, its input {stripped.logits!r} (logits; argmax unchanged, softmax over axis "
        f"{stripped.axis} gives the probabilities); --keep-softmax keeps it"
        for stripped in model.meta.get(STRIPPED_SOFTMAX_KEY, ())
    )


def _compile_step_model(model_path: Path, output_dir: Path, model: ir.Model, selection: Selection, shapes: dict,
                        geometries: dict[str, FilterGeometry], options: CompileOptions, progress: Progress) -> dict:
    """Stages 4–6 for ``--backend onnx``: step, eval and export models for stock onnxruntime."""
    from gfcompiler.onnx_step import step_model

    trainable = list(selection.trainable_params)
    with outdir.staging_directory(output_dir, force=options.force) as staging:
        progress(f"building the training step in standard ONNX ({selection.rule}; {len(trainable)} trainable tensors)")
        built = step_model.build_step_model(model, selection, geometries, options.loss, options.optimizer,
                                            force_forward_pooling=options.force_forward_pooling,
                                            gradient_outputs=options.gradient_outputs,
                                            ignore_index=options.ignore_index)
        batch, known = _accounting_batch(model), _known_shapes(model)
        emitted = memory.held_for_backward(built.model.graph, built.layer_nodes, batch, known)
        exact = emitted
        if geometries:  # the same step with every conv's exact backward, for the held-bytes comparison
            exact_step = step_model.build_step_model(model, selection, {}, options.loss, options.optimizer,
                                                     ignore_index=options.ignore_index)
            exact = memory.held_for_backward(exact_step.model.graph, exact_step.layer_nodes, batch, known)
        files = STEP_FILES
        models = {
            "step_model": built.model,
            "eval_model": step_model.build_eval_model(model, trainable, options.loss, options.ignore_index),
            "export_model": step_model.build_export_model(model, trainable, options.loss),
        }
        for key, built_model in models.items():
            artifacts.save_model(built_model, staging / files[key])
        np.savez(staging / files["state"], **built.initial_state)
        progress("checking the step and eval models load in onnxruntime")
        outdir.check_models_loadable(staging, [files["step_model"], files["eval_model"]])
        accounting = _Accounting(batch, exact, emitted, built.needs_input_grad)
        state = tuple(entry.to_manifest() for entry in built.state)
        form = Form("step_model", step=StepRecord(step_model.LEARNING_RATE, step_model.STEP, "loss",
                                                  model.graph.outputs[0].name, state))
        manifest = _manifest(model_path, model, selection, shapes, geometries, accounting, options, dict(files),
                             form, staging)
        write_manifest(staging, manifest)
    progress(f"wrote {output_dir}")
    return manifest
