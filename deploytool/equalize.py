"""Cross-layer equalization and bias correction of a float ONNX graph, before static int8 quantization.

Both come from the data-free quantization of Nagel et al. (2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction") and work on the exported graph, where BatchNorm is already
folded into the convolutions (which is what spreads the per-channel ranges apart):

- **Cross-layer equalization.** For two convolutions in a chain conv1 -> f -> conv2 where f is
  positive-homogeneous per channel (f(s x) = s f(x) for s > 0: identity, ReLU, LeakyReLU, PReLU),
  dividing output channel i of conv1 (weights and bias) by s_i and multiplying input channel i of
  conv2 by s_i leaves the function unchanged, but moves range between the tensors that share one
  quantization scale. With per-channel weights (deploytool's default) the scales are chosen from the
  calibrated per-channel ranges of the activation between the two convolutions, which is quantized
  with one scale for all channels: channels that use a small part of that range are scaled up (when
  conv2 is depthwise its per-channel weights do not mind), or balanced against conv2's weight columns
  (Nagel's geometric mean, with activation ranges in place of conv1's weight ranges). With per-tensor
  weights the classic data-free rule balances the weight ranges of conv1 and conv2.
  ReLU6 (Clip(0, 6)) is positive-homogeneous only below its bound: a channel whose calibrated values
  reach the bound is left alone, and other channels are scaled only as far as keeps their values below
  it, so the function is unchanged on the calibration data. A channel is never scaled up beyond
  1/HEADROOM of the tensor's range, leaving room for values the calibration data did not show.
- **Bias correction.** Quantizing weights changes a layer's expected output by (W_q - W) E[x]. With the
  quantized weights read back from the quantized model and E[x] the mean input of each convolution on
  the calibration data (per position, so zero padding is accounted for), the float bias is corrected
  by that shift and the model quantized again (the weights quantize to the same values).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.data import Dataset
from deploytool.shapes import per_sample_bytes

# activations with f(s x) = s f(x) for every s > 0, channel by channel
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
# a bounded activation's channel whose calibrated maximum reaches this share of the bound is taken to clip
SATURATED = 0.999
# a channel is scaled up to at most 1 / HEADROOM of its tensor's calibrated range
HEADROOM = 2.0
# at most this many bytes of exposed tensors per batch when collecting statistics
BUDGET_BYTES = 128 * 2**20


@dataclass
class Pair:
    """Two convolutions in a chain: conv1 -> [activation] -> conv2, conv2 reading only that tensor."""

    first: int  # index of conv1 in graph.node
    second: int  # index of conv2
    tensor: str  # what conv2 reads: the activation's output (conv1's output for identity)
    activation: str  # "identity", "Relu", "LeakyRelu", "PRelu" or "Clip"
    bound: float | None = None  # the activation's upper bound (ReLU6: 6); None: unbounded
    names: tuple[str, str] = ("", "")
    reads: str = ""  # conv2's input: `tensor`, or what zero padding / max pooling make of it


class Graph:
    """Lookups over one ONNX graph: constant arrays, producers and consumers of tensors."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(graph.node):
            for name in node.output:
                self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.outputs = {o.name for o in graph.output}
        self.uses = Counter(name for node in graph.node for name in node.input if name in self.initializers)

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return self.constants.get(name)

    def set_array(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    def only_consumer(self, tensor: str) -> int | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def owned(self, name: str) -> bool:
        """A float initializer that only one node reads (so changing it changes nothing else)."""
        tensor = self.initializers.get(name)
        return tensor is not None and tensor.data_type == 1 and self.uses[name] == 1


def attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _conv_ok(graph: Graph, node: Any) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or not graph.owned(node.input[1]):
        return False
    if len(node.input) > 2 and node.input[2] and not graph.owned(node.input[2]):
        return False
    return len(graph.initializers[node.input[1]].dims) >= 3


def _clip_bounds(graph: Graph, node: Any) -> tuple[float | None, float | None] | None:
    """(low, high) of a Clip node (None: unbounded), or None when a bound is not a constant."""
    low: float | None = attribute(node, "min")
    high: float | None = attribute(node, "max")
    for position in (1, 2):
        if len(node.input) > position and node.input[position]:
            value = graph.array(node.input[position])
            if value is None or value.size != 1:
                return None
            if position == 1:
                low = float(value)
            else:
                high = float(value)
    if low is not None and math.isinf(low) and low < 0:
        low = None
    if high is not None and math.isinf(high):
        high = None
    return low, high


def find_pairs(model: Any) -> list[Pair]:
    """Every conv1 -> [ReLU | ReLU6 | LeakyReLU | PReLU | nothing] -> conv2 chain that can be equalized."""
    graph = Graph(model)
    nodes = model.graph.node
    pairs: list[Pair] = []
    for index, node in enumerate(nodes):
        if not _conv_ok(graph, node):
            continue
        tensor = node.output[0]
        follower_index = graph.only_consumer(tensor)
        if follower_index is None:
            continue
        follower = nodes[follower_index]
        activation, bound = "identity", None
        if follower.op_type in HOMOGENEOUS or follower.op_type == "Clip":
            if follower.op_type == "Clip":
                bounds = _clip_bounds(graph, follower)
                if bounds is None or bounds[0] != 0.0:
                    continue  # only Clip(0, c): ReLU, ReLU6
                bound = bounds[1]
            if follower.op_type == "PRelu" and graph.array(follower.input[1]) is None:
                continue
            activation, tensor = follower.op_type, follower.output[0]
            follower_index = graph.only_consumer(tensor)
            if follower_index is None:
                continue
            follower = nodes[follower_index]
        reads = tensor
        while follower.op_type in PASS_THROUGH and _passes_scaling(graph, follower):
            reads = follower.output[0]
            follower_index = graph.only_consumer(reads)
            if follower_index is None:
                break
            follower = nodes[follower_index]
        if follower_index is None or not _conv_ok(graph, follower) or follower.input[0] != reads:
            continue
        first_weight = graph.initializers[node.input[1]]
        second_weight = graph.initializers[follower.input[1]]
        if second_weight.dims[1] * int(attribute(follower, "group", 1)) != first_weight.dims[0]:
            continue
        pairs.append(Pair(index, follower_index, tensor, activation, bound, (node.name, follower.name), reads))
    return pairs


# ops between the activation and conv2 that commute with a positive per-channel scale (TF-style "same"
# padding exports as Pad before the convolution)
PASS_THROUGH = ("Pad", "MaxPool", "Identity", "Dropout")


def _passes_scaling(graph: Graph, node: Any) -> bool:
    if node.op_type != "Pad":
        return node.op_type != "MaxPool" or len(node.output) == 1
    if attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        return False
    if len(node.input) > 2 and node.input[2]:
        value = graph.array(node.input[2])
        if value is None or np.any(value != 0):
            return False
    pads = graph.array(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "pads")
    if pads is None or (len(node.input) > 3 and node.input[3]):
        return False  # unknown pads, or pads on chosen axes
    pads = np.asarray(pads).reshape(-1)
    rank = len(pads) // 2
    return rank > 1 and pads[1] == 0 and pads[1 + rank] == 0  # the channel axis is not padded


@dataclass
class Statistics:
    """Per-channel ranges and mean inputs of float tensors over calibration data."""

    absmax: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> max |x| per channel (axis 1)
    mean: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> mean over samples (per position)
    samples: int = 0

    def rescale(self, tensor: str, scales: np.ndarray) -> None:
        """The tensor's channels were divided by `scales`."""
        if tensor in self.absmax:
            self.absmax[tensor] = self.absmax[tensor] / scales
        if tensor in self.mean:
            mean = self.mean[tensor]
            self.mean[tensor] = mean / scales.reshape(-1, *[1] * (mean.ndim - 1))


def run_exposed(model: Any, names: Sequence[str], dataset: Dataset, batch: int, fixed: bool, threads: int = 1,
                extra_bytes: int = 0) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """Run `model` with `names` exposed as outputs over `dataset`; yields (valid samples, {name: array}) per batch.

    The batch shrinks so that the exposed tensors of one batch stay within BUDGET_BYTES (a model with a
    fixed batch size keeps its batch; a short last batch is then filled up and the extra samples dropped)."""
    import onnx
    import onnxruntime as ort

    from deploytool.runners import session_options

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if not fixed:
        per_sample = per_sample_bytes(model, names, dataset.feeds) + extra_bytes
        batch = max(1, min(batch, BUDGET_BYTES // max(per_sample, 1)))
    options = session_options(threads)
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    wanted = list(names)
    for start, feeds in zip(range(0, len(dataset), batch), dataset.batches(batch, pad=fixed), strict=False):
        valid = min(batch, len(dataset) - start)
        arrays = session.run(wanted, {k: v for k, v in feeds.items() if k in inputs})
        yield valid, {name: array[:valid] for name, array in zip(wanted, arrays, strict=True)}


def collect_statistics(model: Any, dataset: Dataset, absmax: Sequence[str], mean: Sequence[str], batch: int,
                       fixed: bool, threads: int = 1, channel_axis: int = 1) -> Statistics:
    """Per-channel absolute maxima of `absmax` tensors (channels on `channel_axis`: 1 for convolutions, -1 for
    the hidden size of a transformer) and per-position means of `mean` tensors over `dataset`."""
    stats = Statistics()
    sums: dict[str, np.ndarray] = {}
    names = list(dict.fromkeys([*absmax, *mean]))
    if not names:
        return stats
    for valid, arrays in run_exposed(model, names, dataset, batch, fixed, threads):
        stats.samples += valid
        for name in absmax:
            array = arrays[name]
            if array.ndim < 2:
                continue
            axis = channel_axis % array.ndim
            channel = np.abs(array).max(axis=tuple(a for a in range(array.ndim) if a != axis))
            stats.absmax[name] = np.maximum(stats.absmax.get(name, 0.0), channel.astype(np.float64))
        for name in mean:
            total = arrays[name].astype(np.float64).sum(axis=0)
            sums[name] = sums[name] + total if name in sums else total
    for name, total in sums.items():
        stats.mean[name] = total / max(stats.samples, 1)
    return stats


def _reshape_channels(values: np.ndarray, ndim: int, axis: int = 0) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _second_view(weight: np.ndarray, group: int) -> np.ndarray:
    """conv2's weights as (group, out per group, in per group, *kernel)."""
    return weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])


def _column_ranges(weight: np.ndarray, group: int) -> np.ndarray:
    """max |w| of conv2's weights per input channel (the channels conv1 produces)."""
    view = np.abs(_second_view(weight, group))
    return view.max(axis=(1, *range(3, view.ndim))).reshape(-1)


def _activation_scales(a: np.ndarray, w2: np.ndarray, invariant: bool, bound: float | None) -> np.ndarray:
    """Scales s (conv1 channel / s, conv2 channel * s) from calibrated activation ranges `a` and conv2's column ranges."""
    live = (a > 0) & (w2 > 0)
    if not live.any():
        return np.ones_like(a)
    top = float(a[live].max())
    if invariant:  # conv2's per-channel weights do not care: fill the activation's range
        target = np.full_like(a, top)
    else:  # balance each channel's share of the activation range with its share of conv2's weight range
        balance = np.sqrt(np.where(live, a * w2, 0.0))
        target = balance * (top / balance.max())
    up = target > a
    target = np.where(up, np.maximum(a, np.minimum(target, top / HEADROOM)), target)
    if bound is not None:  # ReLU6: leave clipping channels alone; shrink only channels far below the bound
        keep = (a >= SATURATED * bound) | ((target < a) & (a > bound / HEADROOM))
        target = np.where(keep, a, target)
    return np.where(live & (target > 0), a / np.where(target > 0, target, 1.0), 1.0)


def _weight_scales(r1: np.ndarray, r2: np.ndarray, a: np.ndarray | None, bound: float | None) -> np.ndarray:
    """Nagel's data-free rule s = sqrt(r1 / r2) (per-tensor weights), kept within a bounded activation's range."""
    live = (r1 > 0) & (r2 > 0)
    scales = np.where(live, np.sqrt(np.where(live, r1, 1.0) / np.where(live, r2, 1.0)), 1.0)
    if bound is not None:
        if a is None:
            return np.ones_like(r1)
        scaled = a / scales
        keep = (a >= SATURATED * bound) | (scaled > bound / HEADROOM) | ((scales > 1) & (a > bound / HEADROOM))
        scales = np.where(keep, 1.0, scales)
    return scales


@dataclass
class Equalized:
    model: Any
    pairs: list[dict[str, object]]
    scaled_channels: int = 0


def equalize(model: Any, pairs: Sequence[Pair], stats: Statistics | None, per_channel: bool = True,
             sweeps: int = 3) -> Equalized:
    """A copy of `model` with each pair's channels rescaled (see the module docstring); `stats` are rescaled too.

    Pairs are processed from the last to the first, so a pair sees its conv2's final output scaling; the
    data-free rule for per-tensor weights couples neighbouring pairs and is repeated `sweeps` times."""
    import onnx

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = Graph(result)
    nodes = result.graph.node
    before = {p.tensor: stats.absmax[p.tensor].copy() for p in pairs if stats is not None and p.tensor in stats.absmax}
    applied: dict[int, np.ndarray] = {}
    ordered = sorted(range(len(pairs)), key=lambda i: -pairs[i].second)
    for _ in range(1 if per_channel else sweeps):
        for position in ordered:
            pair = pairs[position]
            first, second = nodes[pair.first], nodes[pair.second]
            w1 = graph.array(first.input[1]).astype(np.float64)  # type: ignore[union-attr]
            w2 = graph.array(second.input[1]).astype(np.float64)  # type: ignore[union-attr]
            group = int(attribute(second, "group", 1))
            r2 = _column_ranges(w2, group)
            a = None if stats is None else stats.absmax.get(pair.tensor)
            if per_channel:
                if a is None:
                    continue
                invariant = w2.shape[1] == 1  # one input channel per filter: per-channel weights absorb s
                scales = _activation_scales(a, r2, invariant, pair.bound)
            else:
                r1 = np.abs(w1).max(axis=tuple(range(1, w1.ndim)))
                scales = _weight_scales(r1, r2, a, pair.bound)
            scales = np.clip(scales, 1e-4, 1e4)
            if not (np.abs(np.log(scales)) > 1e-6).any():
                continue
            graph.set_array(first.input[1], w1 / _reshape_channels(scales, w1.ndim))
            if len(first.input) > 2 and first.input[2]:
                graph.set_array(first.input[2], graph.array(first.input[2]).astype(np.float64) / scales)  # type: ignore[union-attr]
            view = _second_view(w2, group) * scales.reshape(group, 1, -1, *[1] * (w2.ndim - 2))
            graph.set_array(second.input[1], view.reshape(w2.shape))
            if stats is not None:
                for name in dict.fromkeys([pair.tensor, first.output[0], pair.reads or pair.tensor]):
                    stats.rescale(name, scales)
            applied[position] = applied.get(position, np.ones_like(scales)) * scales
    records: list[dict[str, object]] = []
    for position, scales in sorted(applied.items()):
        pair = pairs[position]
        record: dict[str, object] = {"conv1": pair.names[0], "conv2": pair.names[1], "activation": pair.activation,
                                     "channels_scaled": int((np.abs(np.log(scales)) > 1e-6).sum()), "channels": int(scales.size)}
        if pair.tensor in before and stats is not None:
            record["range_use_before"] = _spread(before[pair.tensor])
            record["range_use_after"] = _spread(stats.absmax[pair.tensor])
        records.append(record)
    return Equalized(result, records, sum(int(r["channels_scaled"]) for r in records))  # type: ignore[call-overload]


def _spread(ranges: np.ndarray) -> float:
    """Median of channel range / largest channel range: how much of the shared scale a typical channel uses."""
    live = ranges[ranges > 0]
    return round(float(np.median(live) / live.max()), 4) if live.size else 0.0


def dequantized_weights(quantized: Any, op_types: Sequence[str] = ("Conv",)) -> dict[str, np.ndarray]:
    """{node name: the float weights it computes with} for QDQ nodes of `op_types` whose weights are dequantized
    initializers (the quantized values, exactly as ONNX Runtime dequantizes them)."""
    graph = Graph(quantized)
    nodes = quantized.graph.node
    weights: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op_type not in op_types or len(node.input) < 2 or not node.name:
            continue
        producer = graph.producer.get(node.input[1])
        if producer is None or nodes[producer].op_type != "DequantizeLinear":
            continue
        weights[node.name] = dequantize(graph, nodes[producer])  # type: ignore[assignment]
    return {k: v for k, v in weights.items() if v is not None}


def dequantize(graph: Graph, node: Any) -> np.ndarray | None:
    """The float value of a DequantizeLinear node whose inputs are all constants, else None."""
    values = [graph.array(name) if name else None for name in node.input]
    if values[0] is None or values[1] is None:
        return None
    q, scale = values[0].astype(np.float64), values[1].astype(np.float64)
    zero = values[2].astype(np.float64) if len(values) > 2 and values[2] is not None else np.zeros_like(scale)
    if scale.size > 1:
        axis = int(attribute(node, "axis", 1))
        scale, zero = _reshape_channels(scale, q.ndim, axis), _reshape_channels(zero, q.ndim, axis)
    return (q - zero) * scale


def bias_correct(model: Any, quantized: Any, stats: Statistics | None, threads: int = 1,
                 shifts: dict[str, np.ndarray] | None = None) -> tuple[Any, list[dict[str, object]]]:
    """A copy of `model` whose Conv biases absorb the expected output shift of their quantization.

    Without `shifts`, the shift of the quantized weights: mean over output positions of conv(E[x], W_q - W),
    computed by ONNX Runtime with each convolution's own attributes, E[x] being the per-position mean input
    over the calibration data (`stats.mean`). `shifts` ({Conv node: per-channel shift}) are measured ones
    instead, e.g. deploytool.sensitivity's, which also hold the rounding of the node's input."""
    import onnx

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = Graph(result)
    if shifts is None:
        assert stats is not None
        shifts = _weight_shifts(result, graph, quantized, stats, threads)
    records = []
    for node in result.graph.node:
        shift = shifts.get(node.name) if node.op_type == "Conv" else None
        if shift is None or not np.isfinite(shift).all() or not shift.any():
            continue
        if len(node.input) > 2 and node.input[2] and not graph.owned(node.input[2]):
            continue
        records.append(_apply_shift(result, graph, node, shift.astype(np.float64)))
    return result, records


def _apply_shift(model: Any, graph: Graph, node: Any, shift: np.ndarray) -> dict[str, object]:
    from onnx import numpy_helper

    if len(node.input) > 2 and node.input[2]:
        bias = graph.array(node.input[2]).astype(np.float64)  # type: ignore[union-attr]
        graph.set_array(node.input[2], bias - shift)
    else:
        bias = np.zeros_like(shift)
        name = f"{node.input[1]}_corrected_bias"
        model.graph.initializer.append(numpy_helper.from_array((bias - shift).astype(np.float32), name))
        graph.initializers[name] = model.graph.initializer[-1]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return {"node": node.name, "max_shift": round(float(np.abs(shift).max()), 6),
            "max_bias": round(float(np.abs(bias).max()) if bias.size else 0.0, 6)}


def _weight_shifts(result: Any, graph: Graph, quantized: Any, stats: Statistics, threads: int) -> dict[str, np.ndarray]:
    """{Conv node: per-channel mean of conv(E[x], W_q - W)} over output positions."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from deploytool.runners import session_options

    model = result
    deq = dequantized_weights(quantized)
    probe_nodes, inits, inputs, feeds, targets = [], [], [], {}, []
    for index, node in enumerate(result.graph.node):
        if node.op_type != "Conv" or node.name not in deq or node.input[0] not in stats.mean:
            continue
        weight = graph.array(node.input[1])
        if weight is None or deq[node.name].shape != weight.shape:
            continue
        if len(node.input) > 2 and node.input[2] and not graph.owned(node.input[2]):
            continue
        delta = (deq[node.name] - weight.astype(np.float64)).astype(np.float32)
        if not delta.any():
            continue
        mean_name, delta_name, out_name = f"mean_{index}", f"delta_{index}", f"shift_{index}"
        mean = stats.mean[node.input[0]].astype(np.float32)[None]
        inputs.append(helper.make_tensor_value_info(mean_name, onnx.TensorProto.FLOAT, list(mean.shape)))
        feeds[mean_name] = mean
        inits.append(numpy_helper.from_array(delta, delta_name))
        probe = helper.make_node("Conv", [mean_name, delta_name], [out_name], name=f"probe_{index}")
        probe.attribute.extend(node.attribute)
        probe_nodes.append(probe)
        targets.append((index, out_name))
    if not targets:
        return {}
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for _, name in targets]
    probe_model = helper.make_model(helper.make_graph(probe_nodes, "bias_shift", inputs, outputs, inits),
                                    opset_imports=[helper.make_opsetid("", max(13, _opset(model)))])
    probe_model.ir_version = model.ir_version
    session = ort.InferenceSession(probe_model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    outs = session.run([name for _, name in targets], feeds)
    return {result.graph.node[index].name: out[0].reshape(out.shape[1], -1).mean(axis=1).astype(np.float64)
            for (index, _), out in zip(targets, outs, strict=True)}


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def conv_inputs(model: Any, names: Iterable[str] | None = None) -> list[str]:
    """The activation inputs of the Conv nodes (those named, or all) whose weights are constants."""
    graph = Graph(model)
    wanted = None if names is None else set(names)
    found = []
    for node in model.graph.node:
        if node.op_type == "Conv" and (wanted is None or node.name in wanted) and graph.array(node.input[1]) is not None:
            found.append(node.input[0])
    return list(dict.fromkeys(found))


def save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path
