"""``gfc inspect``: what the compiler did, as a table, a subgraph listing, or DOT.

For an artifacts directory everything comes from its manifest (written by the
compiler at compile time) and, for ``--layer``, from ``training_model.onnx``. For an
``.onnx`` model the model is compiled into a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gfcompiler.errors import ArtifactError, InputError
from gfcompiler.manifest import FILES, MANIFEST_NAME, Manifest


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.2f}"


def _mmacs(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3g}"


def _shape(dims) -> str:
    return "x".join("N" if d is None else str(d) for d in dims) if dims else "?"


def layer_table(manifest: Manifest) -> str:
    """One row per conv: geometry, trained?, backward kind, MACs and held bytes exact vs emitted."""
    header = ("layer", "in -> out", "k/s/g/d", "trained", "backward", "MMAC exact", "MMAC", "held MiB exact", "held MiB")
    rows = [header]
    for layer in manifest.layers:
        conv = layer.geometry
        geometry = "?"
        if conv is not None:
            k, s, d = conv.kernel, conv.strides, conv.dilations
            geometry = f"{k[0]}x{k[1]}/{s[0]}x{s[1]}/{conv.group}/{d[0]}"
        backward = layer.backward + (f" ({layer.reason})" if layer.reason else "")
        rows.append((
            layer.name,
            f"{_shape(conv and conv.input_shape)} -> {_shape(conv and conv.output_shape)}",
            geometry,
            "yes" if layer.trained else "no",
            backward,
            _mmacs(layer.backward_macs_exact),
            _mmacs(layer.backward_macs),
            _mib(layer.held_bytes_exact) if layer.trained else "-",
            _mib(layer.held_bytes) if layer.trained else "-",
        ))
    trained = [row for row in rows[1:] if row[3] == "yes"]
    frozen = len(rows) - 1 - len(trained)
    shown = [rows[0]] + ([("...", f"{frozen} frozen convs", "", "no", "", "", "", "", "")] if frozen else []) + trained
    widths = [max(len(str(row[i])) for row in shown) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in shown]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_summary(manifest: Manifest | dict) -> str:
    """The compile summary: layer table, selection, MACs and bytes held, form, and the compiler's notes.

    ``manifest``: a `Manifest` or its JSON (what `compile_model` returns).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(manifest)
    totals = manifest.totals
    batch = manifest.accounting_batch or 1
    exact_macs, macs = totals.backward_macs_exact, totals.backward_macs
    ratio = f"{exact_macs / macs:.1f}x fewer" if macs else "n/a"
    patch = manifest.patch
    lines = [
        layer_table(manifest),
        "",
        f"selection: {manifest.selection.rule}; {len(manifest.trainable_params)} trainable tensors; "
        f"patch {patch}{' (exact backward)' if patch == 0 else ''}",
        _loss_line(manifest),
        f"filtered {totals.filtered_layers} of {totals.trained_layers} trained convs; "
        f"trained-conv backward MACs (batch {batch}): {_mmacs(exact_macs)}M exact -> {_mmacs(macs)}M ({ratio})",
        f"held from forward to backward, batch {batch}: trained convs' backward "
        f"{_mib(totals.trained_convs_held_bytes_exact)} MiB exact -> {_mib(totals.trained_convs_held_bytes)} MiB; "
        f"whole graph {_mib(totals.held_bytes_exact)} MiB exact -> {_mib(totals.held_bytes)} MiB",
        _form_line(manifest),
    ]
    lines += [f"note: {note}" for note in manifest.notes]
    return "\n".join(lines)


def _loss_line(manifest: Manifest) -> str:
    """The loss as compiled (older manifests name only its kind) and the label input it takes."""
    line = f"loss: {manifest.loss_form or manifest.loss}"
    if manifest.label is not None:
        line += f"; label input {manifest.label.name!r}: {_shape(manifest.label.shape)} {manifest.label.dtype}"
    return line


def _form_line(manifest: Manifest) -> str:
    """How the artifacts run: frozen prefix + trained suffix (and what crosses), or one training graph."""
    form = manifest.form
    if form.kind == "step_model":
        return ("form: one standard-ONNX step model (forward, loss, backward and optimizer update) for "
                "plain onnxruntime; frozen layers are its constants")
    if form.kind != "two_stage":
        return "form: single training graph" + (f" ({form.single_graph_reason})" if form.single_graph_reason else "")
    crossing = ", ".join(f"{b.name} {_shape(b.shape)}" for b in form.boundary)
    return (f"form: two-stage: frozen prefix_model.onnx ({form.prefix_nodes} nodes, inference session) -> "
            f"training suffix ({form.suffix_nodes} nodes); crossing: {crossing}")


def _layer_subgraph(directory: Path, layer_name: str, manifest: Manifest):
    import onnx_ir as ir

    from gfcompiler.emit import nodes_of_layer
    from gfcompiler.passes.gradient_filter import forward_conv_of, is_conv_grad

    names = [layer.name for layer in manifest.layers]
    if layer_name not in names:
        trained = ", ".join(manifest.selection.trained_convs) if manifest.selection else "none recorded"
        raise InputError(f"--layer: no conv named {layer_name!r} (trained: {trained})")
    if manifest.form.kind == "step_model":
        model = ir.load(str(directory / manifest.files["step_model"]))
        return [node for node in model.graph if node.name == layer_name] + nodes_of_layer(model.graph, layer_name)
    model = ir.load(str(directory / FILES["training_model"]))
    emitted = set(nodes_of_layer(model.graph, layer_name))  # the gradient filter's nodes for the layer
    return [
        node for node in model.graph
        if node in emitted
        or (is_conv_grad(node) and (conv := forward_conv_of(node)) is not None and conv.name == layer_name)
        or (node.op_type == "Conv" and node.name == layer_name)
    ]


def _format_node(node) -> str:
    inputs = ", ".join(v.name if v is not None else "" for v in node.inputs)
    outputs = ", ".join(v.name for v in node.outputs)
    attrs = ", ".join(f"{k}={a.value}" for k, a in node.attributes.items())
    domain = f"{node.domain}::" if node.domain else ""
    return f"  {outputs} = {domain}{node.op_type}({inputs})" + (f"  [{attrs}]" if attrs else "")


def _dot(nodes) -> str:
    lines = ["digraph gradient_filter {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    ids = {node: f"n{i}" for i, node in enumerate(nodes)}
    for node, ident in ids.items():
        lines.append(f'  {ident} [label="{node.op_type}\\n{node.name}"];')
    for node, ident in ids.items():
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer in ids:
                lines.append(f'  {ids[producer]} -> {ident} [label="{value.name.rsplit("/", 1)[-1]}"];')
            else:
                source = f"v{abs(hash(value.name))}"
                lines.append(f'  {source} [shape=ellipse, label="{value.name}"];')
                lines.append(f"  {source} -> {ident};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _load_directory(directory: Path) -> Manifest:
    if not (directory / MANIFEST_NAME).exists():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME} (not a gfc compile output)")
    try:
        return Manifest.read(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{directory / MANIFEST_NAME}: unreadable ({error})") from None


def _show(directory: Path, args: argparse.Namespace) -> int:
    manifest = _load_directory(directory)
    if args.json:
        print(json.dumps([layer.to_json() for layer in manifest.layers], indent=2))
    elif args.layer:
        nodes = _layer_subgraph(directory, args.layer, manifest)
        print(f"{args.layer}: forward conv and backward subgraph ({len(nodes)} nodes)")
        for node in nodes:
            print(_format_node(node))
        if args.dot:
            Path(args.dot).write_text(_dot(nodes))
            print(f"wrote {args.dot} (render: dot -Tsvg {args.dot} -o layer.svg)")
    else:
        print(render_summary(manifest))
    return 0


def run(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir():
        return _show(target, args)
    if not target.exists():
        raise InputError(f"{target}: no such file or directory")
    from gfcompiler.driver import CompileOptions, compile_model
    from gfcompiler.loading import InputShape

    options = CompileOptions(layers=args.layers, patch=args.patch, input_shapes=[InputShape.parse(t) for t in args.input_shape],
                             train_output=args.train_output)
    with tempfile.TemporaryDirectory(prefix="gfc-inspect-") as scratch:
        out = Path(scratch) / "artifacts"
        compile_model(target, out, options)
        return _show(out, args)
