"""Where a step's time goes: onnxruntime's profiler, its kernels attributed to parts of the step.

Each graph node of the training model belongs to one part (`CATEGORIES`; a ``--backend
onnx`` step model adds ``optimizer``): `NodeCategories` for ort-training's
``training_model.onnx`` (found through the graph: ``ConvGrad`` nodes and what the loss
depends on), `StepNodeCategories` for the onnx backend's ``step_model.onnx`` (read from
the ``gfc.phase`` / ``gfc.layer`` metadata the compiler gives every emitted node).

onnxruntime's profiler reports kernels by node name, and the nodes it creates while
optimizing get new names: mostly the source node's name with a suffix (``X_mean`` →
``X_mean_nchwc``, ``dW_sum_per_sample/MatmulTransposeFusion/``), sometimes the name of
the value they compute (a Conv fused with its Relu: ``<relu output>_nchwc``). `lookup`
maps a profiled name back to the graph node it came from; what matches no node (layout
reorders onnxruntime inserts, ``ReorderInput_token_5``) is *unattributed*: counted by
position (forward before the run's first backward kernel, else other backward) and
reported as ``unmatched_ms``.
"""

from __future__ import annotations

import json
from pathlib import Path

from gfcompiler.bench.options import CATEGORIES, STEP_CATEGORIES, BenchOptions, Progress, _silent
from gfcompiler.bench.timing import TrainerStep, TrainingStep, _median, stats, time_interleaved
from gfcompiler.manifest import BACKEND_ONNX, FILES, STEP_FILES


class NodeCategories:
    """Which part of a step each node of a ``training_model.onnx`` belongs to (`CATEGORIES`).

    Forward nodes are those the loss depends on (ancestors of the graph outputs that are
    not gradient accumulators). ``trained_bwd``: the ``ConvGrad`` of a trained conv (its
    forward Conv found through use-def links, as the compiler does) and every node the
    gradient filter emitted for a trained conv (`gfcompiler.emit.nodes_of_layer`: the
    ``gfc.layer`` metadata) that is not in the forward; ``gf_fwd``: those that are.
    ``layer_of`` maps the nodes of the trained convs to their conv.
    """

    names: tuple[str, ...] = CATEGORIES

    def __init__(self, training_model: Path, trained_convs: list[str]) -> None:
        import onnx_ir as ir

        from gfcompiler.emit import nodes_of_layer
        from gfcompiler.passes.gradient_filter import forward_conv_of, is_conv_grad

        graph = ir.load(str(training_model)).graph
        forward = self._forward_nodes(graph)
        trained = set(trained_convs)
        emitted = {node: conv for conv in trained_convs for node in nodes_of_layer(graph, conv)}
        self.category: dict[str, str] = {}
        self.layer_of: dict[str, str] = {}
        self._index_values(graph)
        for node in graph:
            if not node.name:
                continue
            layer = None
            if is_conv_grad(node):
                conv = forward_conv_of(node)
                layer = conv.name if conv is not None and conv.name in trained else None
            else:
                layer = emitted.get(node)
            if layer is not None:
                self.layer_of[node.name] = layer
                self.category[node.name] = "gf_fwd" if node in forward else "trained_bwd"
            else:
                self.category[node.name] = "fwd" if node in forward else "other_bwd"

    def _index_values(self, graph) -> None:
        """The node that computes each named value (onnxruntime names some fused nodes after their output)."""
        self.producer: dict[str, str] = {}
        for node in graph:
            if node.name:
                for value in node.outputs:
                    if value.name:
                        self.producer.setdefault(value.name, node.name)

    @staticmethod
    def _forward_nodes(graph) -> set:
        stack = [out.producer() for out in graph.outputs
                 if out.producer() is not None and out.producer().op_type != "InPlaceAccumulatorV2"]
        seen: set = set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(value.producer() for value in node.inputs if value is not None)
        return seen

    def lookup(self, profiled_name: str) -> str | None:
        """The graph node a profiled node came from: the node of that name (or computing the value
        of that name), else the same for the longest prefix of it that ends before a ``_`` or ``/``
        (onnxruntime renames nodes it transforms, such as ``X_mean`` → ``X_mean_nchwc`` or
        ``dW_sum_per_sample/MatmulTransposeFusion/``)."""
        name = profiled_name
        while name:
            if name in self.category:
                return name
            if name in self.producer:
                return self.producer[name]
            cut = max(name.rfind("_"), name.rfind("/"))
            if cut <= 0:
                return None
            name = name[:cut]
        return None


class StepNodeCategories(NodeCategories):
    """The parts of a ``--backend onnx`` ``step_model.onnx`` (`STEP_CATEGORIES`), from node metadata.

    The compiler marks every node it emits with ``gfc.phase`` (``forward`` for the loss and
    the filter's forward summaries, ``backward``, ``optimizer``) and ``gfc.layer`` (the
    forward node it belongs to). ``trained_bwd``: backward nodes of a trained conv (the
    filter's ``<conv>/gf/...`` backward or the exact ``<conv>/grad/...``); ``gf_fwd``:
    forward nodes of a trained conv (its summaries and their scheduling anchor);
    ``other_bwd``: the other backward nodes (activation gradients, gradient sums);
    ``optimizer``: the update; ``fwd``: the rest (the model's own nodes carry no metadata,
    the loss is ``forward``). Names are never parsed for this.
    """

    names = STEP_CATEGORIES

    def __init__(self, step_model: Path, trained_convs: list[str]) -> None:
        import onnx_ir as ir

        graph = ir.load(str(step_model)).graph
        trained = set(trained_convs)
        self.category = {}
        self.layer_of = {}
        self._index_values(graph)
        for node in graph:
            if not node.name:
                continue
            phase, layer = node.metadata_props.get("gfc.phase"), node.metadata_props.get("gfc.layer")
            if phase == "optimizer":
                category = "optimizer"
            elif layer in trained and phase in ("backward", "forward"):
                category = "trained_bwd" if phase == "backward" else "gf_fwd"
                self.layer_of[node.name] = layer
            else:
                category = "other_bwd" if phase == "backward" else "fwd"
            self.category[node.name] = category


def parse_profile(path: Path, categories: NodeCategories, skip_runs: int = 1) -> dict:
    """Kernel milliseconds per category (and per trained layer) of each profiled run.

    Profiled nodes that match no graph node (nodes onnxruntime inserted) count as
    forward when they ran before the first backward node of their run, else as other
    backward; their time is also reported as ``unmatched_ms`` (median over runs).
    """
    names = categories.names
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: list[dict] = [{"categories": dict.fromkeys(names, 0.0), "layers": {}, "unmatched": 0.0, "first_bwd": None}
                           for _ in runs]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    placed = []
    for event in kernels:
        index = next((i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end), None)
        if index is None:
            continue
        node = categories.lookup(event["name"][: -len("_kernel_time")])
        category = categories.category.get(node) if node else None
        run = per_run[index]
        if category in ("trained_bwd", "other_bwd") and run["first_bwd"] is None:
            run["first_bwd"] = event["ts"]
        placed.append((run, event, node, category))
    for run, event, node, category in placed:
        ms = event["dur"] / 1e3
        if category is None:
            run["unmatched"] += ms
            category = "fwd" if run["first_bwd"] is None or event["ts"] < run["first_bwd"] else "other_bwd"
        run["categories"][category] += ms
        layer = categories.layer_of.get(node) if node else None
        if layer is not None and category == "trained_bwd":
            run["layers"][layer] = run["layers"].get(layer, 0.0) + ms
    kept = per_run[skip_runs:]
    if not kept:
        return {}
    result = {}
    for category in names:
        values = [run["categories"][category] / 1e3 for run in kept]
        result[category] = stats(values)
    result["kernels"] = stats([sum(run["categories"].values()) / 1e3 for run in kept])
    result["unmatched_ms"] = _median([run["unmatched"] for run in kept])
    layers = sorted({layer for run in kept for layer in run["layers"]})
    result["trained_bwd_per_layer_ms"] = {layer: _median([run["layers"].get(layer, 0.0) for run in kept]) for layer in layers}
    result["runs"] = len(kept)
    return result


def profile_variants(variants: list, batch: int, options: BenchOptions, workdir: Path,
                     progress: Progress = _silent) -> dict[str, dict]:
    """Profile ``options.profile_steps`` interleaved steps of every variant (after one unprofiled).

    ort-training variants run as a `TrainingStep` without optimizer session (its profile
    would go to a file of the same name); onnx ones through the Trainer, whose one step
    model includes the optimizer."""
    steps: dict = {}
    for variant in variants:
        prefix = workdir / f"profile-{variant.key}" / "step"
        prefix.parent.mkdir()
        if variant.backend == BACKEND_ONNX:
            steps[variant.key] = TrainerStep(variant.directory, variant.manifest, batch, options.threads,
                                             profile_prefix=str(prefix))
        else:
            steps[variant.key] = TrainingStep(variant.directory, variant.manifest, batch, options.threads,
                                              optimizer=False, profile_prefix=str(prefix))
    time_interleaved(steps, options.profile_steps, 1, options.pause)
    results = {}
    for variant in variants:
        trained = list(variant.manifest.selection.trained_convs)
        step = steps[variant.key]
        if variant.backend == BACKEND_ONNX:
            path = step.end_profiling()
            step.close()
            if path is None or not path.is_file():
                progress(f"warning: no onnxruntime profile for {variant.label} ({variant.backend})")
                results[variant.key] = {}
                continue
            categories: NodeCategories = StepNodeCategories(variant.directory / STEP_FILES["step_model"], trained)
            results[variant.key] = parse_profile(path, categories, skip_runs=1)
            continue
        step.close()
        files = sorted((workdir / f"profile-{variant.key}").glob("step*.json"))
        if len(files) != 1:
            progress(f"warning: expected one onnxruntime profile for {variant.label}, found {len(files)}")
            results[variant.key] = {}
            continue
        categories = NodeCategories(variant.directory / FILES["training_model"], trained)
        results[variant.key] = parse_profile(files[0], categories, skip_runs=1)
    return results
