"""Running an OpenVINO IR on the CPU with the precision-sensitive parts of the graph in float32 while the convolutions
run in bf16 or int8 (``IRRunner``), and the graph analysis behind it.

Why the graph is split. OpenVINO's CPU plugin applies its bf16 inference precision to nearly every node; only the graph
tail after the last "significant" node (convolution, matmul, interpolate) stays float32, and per-node rt_info marks are
lost on nodes its own transformations replace (Interpolate, MatMul -> FullyConnected). Run that way the anomaly maps
differ from float32 by 10-14 % of their range: bf16 sampling grids (a bf16 coordinate is off by up to half a pixel at
256), a bf16 VQ distance matmul (the nearest-prototype argmin flips) and a bf16 upsampling of the discrepancy maps.
So ``split_by_precision`` cuts the graph into alternating segments, each compiled on its own: *sensitive* nodes run
in float32 (``sensitive_nodes``: every node after the last convolution on its paths to the outputs, the sampling grids
with the GridSample that uses them, the distance matmul and top-k of the codebook lookup with what computes their
inputs after the last convolution), everything else in the low precision. Tensors are copied from one segment to the
next (cheap next to the convolutions). The IR on disk is one ordinary OpenVINO model (any OpenVINO tool reads it); the
split happens when it is loaded. Writing IRs (conversion, fp16 weights, int8) is ``openvino.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from task.common.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")  # EXPORT.precision (openvino.py says what each means)

METADATA_SECTION = "tnvision"  # rt_info section of the IR that holds the toolkit's metadata (strings)


HEAVY = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData"})


# Nodes whose inputs must be exact: sampling grids, distances compared by an argmin / top-k.
SENSITIVE_SINKS = frozenset({"GridSample", "MatMul", "TopK", "ArgMin", "ArgMax"})  # GridSample: its grid input


SOURCES = frozenset({"Constant", "Parameter"})


def openvino_core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO is not installed; pip install openvino nncf (see requirements.txt)") from None
    return ov.Core()


def has_bf16_units(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512-BF16 or AMX); without, bf16 would be emulated."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def low_precision_hint(core: Any, precision: str) -> str:
    """OpenVINO inference precision of the non-sensitive segments for an IR of ``precision``."""
    return "bf16" if precision != "fp32" and has_bf16_units(core) else "f32"


# --------------------------------------------------------------------------------------------- graph analysis
def _name(node: Any) -> str:
    return node.get_friendly_name()


def sensitive_nodes(model: Any) -> set[str]:
    """Friendly names of the nodes that must run in float32 (module docstring): the tail after the last convolution,
    and the cones that compute the inputs of GridSample / MatMul / TopK / ArgMin nodes, back to the last convolution."""
    order = model.get_ordered_ops()
    feeds_heavy: set[str] = set()
    conv_inputs: set[str] = set()  # nodes a convolution reads directly
    for node in reversed(order):
        consumers = [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]
        if any(c.get_type_name() in HEAVY for c in consumers):
            conv_inputs.add(_name(node))
        if any(c.get_type_name() in HEAVY or _name(c) in feeds_heavy for c in consumers):
            feeds_heavy.add(_name(node))
    skip = SOURCES | HEAVY | {"Result"}
    sensitive = {_name(n) for n in order if _name(n) not in feeds_heavy and n.get_type_name() not in skip}
    stack = [n for n in order if n.get_type_name() in SENSITIVE_SINKS]
    while stack:
        node = stack.pop()
        kind = node.get_type_name()
        # The cone ends at the last convolution's output (an activation that convolutions also read stays low
        # precision: following it would run back along residual connections through a whole ResNet stage).
        if kind in skip or (_name(node) in conv_inputs and kind not in SENSITIVE_SINKS):
            continue
        if _name(node) in sensitive and kind not in SENSITIVE_SINKS:
            continue
        sensitive.add(_name(node))
        values = node.input_values()
        # A GridSample's sampling grid is what must be exact, not the image it samples.
        stack += [v.get_node() for v in (values[1:2] if kind == "GridSample" else values)]
    return sensitive


@dataclass
class Segment:
    """One compiled piece of a split graph: reads ``inputs`` (tensor keys), writes ``outputs``; ``precision`` is its
    hint."""

    compiled: Any
    precision: str
    inputs: list[str]
    outputs: list[str]


def _neutral(node: Any) -> bool:
    """Shape arithmetic (ShapeOf and integer/boolean results): runs in any segment, no precision to choose."""
    return node.get_type_name() == "ShapeOf" or all(
        not output.get_element_type().is_real() for output in node.outputs()
    )


def fold_constants(model: Any) -> Any:
    """``model`` with its constant subgraphs (coordinate grids, index tables of the traced graph) folded."""
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model


def constant_subgraphs(model: Any) -> set[str]:
    """Nodes computed from constants only that constant folding keeps on purpose: fp16 weight decompression
    (Convert), int8 weight quantisation (FakeQuantize). They belong with the weights, in the segment that uses them."""
    constant: set[str] = set()
    for node in model.get_ordered_ops():
        values = node.input_values()
        if (
            node.get_type_name() not in SOURCES | {"Result"}
            and values
            and all(v.get_node().get_type_name() == "Constant" or _name(v.get_node()) in constant for v in values)
        ):
            constant.add(_name(node))
    return constant


def _key(output: Any) -> str:
    return f"{_name(output.get_node())}:{output.get_index()}"


def split_by_precision(
    model: Any, sensitive: set[str]
) -> tuple[list[tuple[Any, bool, list[str], list[str]]], dict[str, str]]:
    """Cut ``model`` (modified in place) into alternating low-precision / float32 segments.

    Returns ([(ov.Model, is_float32, input keys, output keys)] in execution order, {output name: tensor key}). The
    model's parameters are keyed by their input names. A node's segment is the lowest one after all of its inputs'
    whose parity matches its precision (even: low precision, odd: float32).
    """
    import openvino.opset13 as ops

    segment: dict[str, int] = {}
    keys_of_params = {_name(p): p.get_output_tensor(0).get_any_name() for p in model.get_parameters()}
    constant = constant_subgraphs(model)
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind in SOURCES or kind == "Result" or _name(node) in constant:
            continue
        above = [segment[_name(v.get_node())] for v in node.input_values() if _name(v.get_node()) in segment]
        if _neutral(node):  # shape arithmetic: no precision of its own, joins the latest segment it reads from
            segment[_name(node)] = max(above, default=0)
            continue
        parity = 1 if _name(node) in sensitive else 0
        segment[_name(node)] = max([parity] + [level if level % 2 == parity else level + 1 for level in above])

    outputs = {result.get_output_tensor(0).get_any_name(): result.input_value(0) for result in model.get_results()}
    output_keys = {name: _key(value) for name, value in outputs.items()}
    # Tensors that cross segments: (producer segment) -> outputs; consumers get a new Parameter per segment.
    produced: dict[int, dict[str, Any]] = {}
    consumed: dict[int, dict[str, Any]] = {}
    rewire: list[tuple[Any, int, str]] = []
    for node in model.get_ordered_ops():
        if _name(node) not in segment:
            continue
        level = segment[_name(node)]
        for inp in node.inputs():
            value = inp.get_source_output()
            source = value.get_node()
            kind = source.get_type_name()
            if kind == "Constant" or _name(source) in constant:  # weights stay constants of every segment using them
                continue
            if kind == "Parameter":
                key = keys_of_params[_name(source)]
            elif segment[_name(source)] != level:
                key = _key(value)
                produced.setdefault(segment[_name(source)], {})[key] = value
            else:
                continue
            consumed.setdefault(level, {}).setdefault(key, value)
            rewire.append((inp, level, key))
    for name, value in outputs.items():
        source = value.get_node()
        if _name(source) in segment:
            produced.setdefault(segment[_name(source)], {})[output_keys[name]] = value

    params: dict[tuple[int, str], Any] = {}
    for level, values in consumed.items():
        for key, value in values.items():
            params[(level, key)] = ops.parameter(value.get_partial_shape(), value.get_element_type(), name=f"in:{key}")
    for inp, level, key in rewire:
        inp.replace_source_output(params[(level, key)].output(0))

    pieces = []
    for level in sorted(set(produced) | set(consumed)):
        outs = produced.get(level, {})
        if not outs:
            continue
        ins = list(consumed.get(level, {}))
        piece = _segment_model(ops, list(outs.values()), [params[(level, key)] for key in ins], f"segment{level}")
        pieces.append((piece, level % 2 == 1, ins, list(outs)))
    return pieces, output_keys


def _segment_model(ops: Any, values: list[Any], params: list[Any], name: str) -> Any:
    import openvino as ov

    return ov.Model([ops.result(v) for v in values], params, name)


# --------------------------------------------------------------------------------------------- runner
@dataclass
class GraphInput:
    """Name and shape (None for a dynamic dimension) of a graph input."""

    name: str
    shape: list[int | None]


class IRRunner:
    """An IR compiled for this CPU: float32 as one model, otherwise split by precision (module docstring).

    ``run({input name: array})`` -> {output name: float32 array}; ``metadata`` holds the toolkit's rt_info strings.
    """

    def __init__(self, source: Path | Any, name: str, threads: int) -> None:
        core = openvino_core()
        try:
            # A model in memory is cloned: the split below rewires the graph it works on.
            model = core.read_model(str(source)) if isinstance(source, Path) else source.clone()
        except Exception as exc:  # noqa: BLE001  (OpenVINO raises RuntimeError and others, with a C++ trace, for bad files)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"cannot load OpenVINO IR {name} ({reason}); re-create it with --mode export EXPORT.format=openvino"
            ) from None
        self.metadata = read_metadata(model)
        self.precision = self.metadata.get("precision", "fp32")
        if self.precision not in PRECISIONS:
            raise UserError(
                f"{name} has an unknown precision {self.precision!r:.20}; re-create it with --mode export "
                "EXPORT.format=openvino"
            )
        self.input_names = [p.get_output_tensor(0).get_any_name() for p in model.get_parameters()]
        self.graph_inputs = [
            GraphInput(name, [d.get_length() if d.is_static else None for d in p.get_partial_shape()])
            for name, p in zip(self.input_names, model.get_parameters())
        ]
        self.output_names = [r.get_output_tensor(0).get_any_name() for r in model.get_results()]
        self.low = low_precision_hint(core, self.precision)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if self.low == "f32":
            self.segments = [
                Segment(
                    core.compile_model(model, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}),
                    "f32",
                    self.input_names,
                    self.output_names,
                )
            ]
            self.output_keys = {n: n for n in self.output_names}
            self.requests = [self.segments[0].compiled.create_infer_request()]
            return
        fold_constants(model)
        pieces, self.output_keys = split_by_precision(model, sensitive_nodes(model))
        self.segments = [
            Segment(
                core.compile_model(piece, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32" if exact else self.low}),
                "f32" if exact else self.low,
                ins,
                outs,
            )
            for piece, exact, ins, outs in pieces
        ]
        self.requests = [segment.compiled.create_infer_request() for segment in self.segments]

    def get_inputs(self) -> list[GraphInput]:
        """The graph's inputs as onnxruntime's ``session.get_inputs()`` lists them (dynamic dimensions: None)."""
        return self.graph_inputs

    @property
    def description(self) -> str:
        if len(self.segments) == 1:
            return f"{self.precision} IR, float32 inference"
        return (
            f"{self.precision} IR, {self.low} convolutions with float32 grids, codebook lookup and maps "
            f"({len(self.segments)} segments)"
        )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        for segment, request in zip(self.segments, self.requests):
            request.infer({index: arrays[key] for index, key in enumerate(segment.inputs)})
            # Copied out: a request's output memory is reused by its next call with another batch size, and handing
            # the live tensor to the next segment gave wrong results after a batch-size change.
            for index, key in enumerate(segment.outputs):
                arrays[key] = request.get_output_tensor(index).data.copy()
        return {name: arrays[key].astype(np.float32, copy=False) for name, key in self.output_keys.items()}


# --------------------------------------------------------------------------------------------- writing
def read_metadata(model: Any) -> dict[str, str]:
    if not model.has_rt_info([METADATA_SECTION]):
        return {}
    section = model.get_rt_info()[METADATA_SECTION]
    names = section.keys() if hasattr(section, "keys") else section.astype(dict).keys()
    return {key: model.get_rt_info([METADATA_SECTION, key]).astype(str) for key in names}
