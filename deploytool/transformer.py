"""What static int8 must leave alone in a transformer graph, and SmoothQuant for its outlier channels.

Three analyses of a float ONNX graph, before and after calibration:

- **Side paths** (`side_paths`). A tensor is *data* when it derives from a float graph input or from an
  embedding lookup (Gather on a float initializer); Shape/Size results and everything computed only from
  them, from constants or from integer/boolean inputs without an embedding lookup is a *side* tensor: the
  attention-mask path (mask -> Cast -> Sub -> Mul by the dtype's minimum), position and shape arithmetic.
  The nodes on that path and the nodes where it meets the data (the Add or Where into the attention scores,
  the multiplication by the mask in mean pooling) are never quantized: their ranges are {0, -3.4e38} or
  {0, -inf}, whose 8-bit scale wipes out the scores.
- **Extreme ranges** (`extreme_tensors`). After calibration, any tensor whose calibrated range is not
  finite or reaches EXTREME in magnitude (the mask constants -1e4, -65504, -3.4e38) is kept in float, with
  every node that reads or writes it.
- **Outlier channels and SmoothQuant** (`smooth`). Pretrained encoders have a few hidden channels 10-100x
  larger than the rest after LayerNorm. One activation scale for the whole tensor then leaves the other
  channels a handful of levels. SmoothQuant (Xiao et al. 2023) divides channel j of the activation by
  s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) and multiplies row j of every weight that reads it by s_j:
  the float function is unchanged, the activation's range is flattened and part of it moves into the
  weights, which are quantized per output channel. The division is folded into the LayerNorm that makes
  the tensor when the MatMuls are its only readers; otherwise one Mul node is inserted before them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.data import Dataset
from deploytool.equalize import Graph

# a calibrated range reaching this magnitude is a sentinel (mask constants), not a signal to quantize
EXTREME = 1e4
# a tensor has outlier channels when its largest channel is this many times its median channel: the median
# channel then gets at most 255 / OUTLIER_RATIO levels of a shared 8-bit scale (here 4 bits' worth)
OUTLIER_RATIO = 16.0
SHAPE_OPS = ("Shape", "Size")
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
                 "EmbedLayerNormalization", "GroupQueryAttention")


def _float_initializer(graph: Graph, name: str) -> bool:
    tensor = graph.initializers.get(name)
    if tensor is not None:
        return tensor.data_type in (1, 10, 11, 16)
    constant = graph.constants.get(name)
    return constant is not None and np.issubdtype(constant.dtype, np.floating)


def is_transformer(model: Any) -> bool:
    """An attention graph: fused attention or LayerNorm ops, or a Softmax next to a MatMul of two activations."""
    graph = Graph(model)
    ops = {node.op_type for node in model.graph.node}
    if ops & set(ATTENTION_OPS):
        return True
    if "Softmax" not in ops:
        return False
    return any(node.op_type == "MatMul" and not any(graph.array(i) is not None for i in node.input)
               for node in model.graph.node)


@dataclass
class SidePaths:
    """Nodes computed from side tensors only (`path`) and nodes where a side tensor meets the data (`merges`)."""

    path: set[str] = field(default_factory=set)
    merges: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)  # the graph inputs the side paths start from

    def excluded(self) -> dict[str, str]:
        """{node: why} for every named node that must stay in float."""
        source = ", ".join(sorted(self.inputs)) or "constants"
        why = {name: f"on the side path of {source} (mask/position arithmetic)" for name in self.path}
        why.update({name: f"reads the side path of {source} (e.g. the attention mask)" for name in self.merges})
        return why


def side_paths(model: Any) -> SidePaths:
    """The attention-mask and position paths of a graph; see the module docstring."""
    graph = Graph(model)
    float_types = (1, 10, 11, 16)
    data: set[str] = {i.name for i in model.graph.input
                      if i.type.tensor_type.elem_type in float_types and i.name not in graph.initializers}
    runtime_side = {i.name for i in model.graph.input if i.name not in data and i.name not in graph.initializers}
    origin: dict[str, set[str]] = {name: {name} for name in runtime_side}  # side tensor -> the inputs it derives from
    result = SidePaths()
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in SHAPE_OPS:
            continue  # shapes are side tensors that depend on no runtime value worth tracking
        if node.op_type == "Gather" and inputs and _float_initializer(graph, inputs[0]):
            data.update(node.output)  # an embedding lookup: ids in, data out
            continue
        from_data = any(i in data for i in inputs)
        sides = set().union(*(origin.get(i, set()) for i in inputs))
        if from_data:
            data.update(node.output)
            if sides:
                result.merges.add(node.name)
                result.inputs |= sides
        elif sides:
            for output in node.output:
                origin[output] = sides
            result.path.add(node.name)
            result.inputs |= sides
    result.path.discard("")
    result.merges.discard("")
    return result


def calibrated_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """{tensor: (lowest, highest)} from an ONNX Runtime calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges: dict[str, tuple[float, float]] = {}
    for name, value in load_tensors_data(cache).data.items():
        try:
            low, high = value.range_value
        except AttributeError:
            continue
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


def extreme_tensors(ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The tensors whose calibrated range is not finite or reaches EXTREME in magnitude."""
    return {name: (low, high) for name, (low, high) in ranges.items()
            if not (np.isfinite(low) and np.isfinite(high)) or max(abs(low), abs(high)) >= EXTREME}


def nodes_touching(model: Any, tensors: Iterable[str]) -> dict[str, str]:
    """{node: tensor} for the named nodes that read or write one of `tensors`."""
    wanted = set(tensors)
    touching: dict[str, str] = {}
    for node in model.graph.node:
        hit = next((t for t in [*node.input, *node.output] if t in wanted), None)
        if hit is not None and node.name:
            touching[node.name] = hit
    return touching


@dataclass
class SmoothTarget:
    """An activation read by MatMul/Gemm nodes with constant weights, which SmoothQuant can rescale."""

    tensor: str
    readers: list[int]  # indices of the MatMul/Gemm nodes in graph.node
    rows: list[tuple[str, bool]]  # (weight initializer, transposed: rows are axis 1)


def smooth_targets(model: Any) -> list[SmoothTarget]:
    """Activations whose readers include MatMul (or Gemm with transA = 0) nodes with owned constant weights."""
    from deploytool.equalize import attribute

    graph = Graph(model)
    found: dict[str, SmoothTarget] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x in graph.initializers or graph.array(x) is not None or not graph.owned(w):
            continue
        weight = graph.array(w)
        if weight is None or weight.ndim != 2:
            continue
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            continue
        transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        target = found.setdefault(x, SmoothTarget(x, [], []))
        target.readers.append(index)
        target.rows.append((w, transposed))
    return list(found.values())


def channel_absmax(model: Any, tensors: Sequence[str], dataset: Dataset, batch: int, fixed: bool,
                   threads: int = 1) -> dict[str, np.ndarray]:
    """max |x| per channel (the last axis) of each tensor over the data."""
    from deploytool.equalize import collect_statistics

    return collect_statistics(model, dataset, tensors, [], batch, fixed, threads, channel_axis=-1).absmax


def outlier_ratio(absmax: np.ndarray) -> float:
    """Largest channel over the median channel (1.0 for an empty or all-zero tensor)."""
    finite = absmax[np.isfinite(absmax)]
    if finite.size == 0:
        return 1.0
    median = float(np.median(finite))
    return float(finite.max() / median) if median > 0 else (np.inf if finite.max() > 0 else 1.0)


@dataclass
class Smoothed:
    model: Any
    tensors: list[dict[str, object]]  # per smoothed activation: tensor, readers, outlier ratio before and after, how


def smooth(model: Any, targets: Sequence[SmoothTarget], absmax: dict[str, np.ndarray], alpha: float) -> Smoothed:
    """A copy of `model` with SmoothQuant applied to `targets` (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = Graph(result)
    records: list[dict[str, object]] = []
    inserted: list[tuple[int, Any]] = []
    for target in targets:
        a = absmax.get(target.tensor)
        if a is None:
            continue
        weights = [graph.array(w) for w, _ in target.rows]
        if any(w is None for w in weights):
            continue
        rows = [np.abs(w.T if transposed else w).max(axis=1) for w, (_, transposed) in zip(weights, target.rows, strict=True)]  # type: ignore[union-attr,arg-type]
        if any(r.shape != a.shape for r in rows):
            continue
        w_max = np.maximum.reduce(rows).astype(np.float64)
        scales = np.ones_like(a)
        ok = (a > 0) & (w_max > 0) & np.isfinite(a)
        scales[ok] = a[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
        scales = np.clip(scales, 1e-5, 1e5)
        for (name, transposed), weight in zip(target.rows, weights, strict=True):
            shape = (1, -1) if transposed else (-1, 1)
            graph.set_array(name, weight * scales.reshape(shape))  # type: ignore[operator]
        how = _fold_into_layernorm(result, graph, target, scales)
        if how is None:
            inverse = f"{target.tensor}_smooth_inverse"
            smoothed = f"{target.tensor}_smoothed"
            result.graph.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inverse))
            mul = helper.make_node("Mul", [target.tensor, inverse], [smoothed], name=f"{target.tensor}_smooth")
            for index in target.readers:
                result.graph.node[index].input[0] = smoothed
            inserted.append((min(target.readers), mul))
            how = "Mul inserted before its readers"
        after = a / scales
        records.append({"tensor": target.tensor, "readers": len(target.readers), "how": how,
                        "outlier_ratio_before": round(outlier_ratio(a), 2), "outlier_ratio_after": round(outlier_ratio(after), 2)})
    for index, node in sorted(inserted, key=lambda item: -item[0]):  # keep the graph topologically sorted
        result.graph.node.insert(index, node)
    return Smoothed(result, records)


def _fold_into_layernorm(model: Any, graph: Graph, target: SmoothTarget, scales: np.ndarray) -> str | None:
    """Divide the scale and bias of the LayerNormalization making `target.tensor` by `scales`, when its only
    readers are the smoothed MatMuls; None when that is not possible."""
    index = graph.producer.get(target.tensor)
    if index is None or target.tensor in graph.outputs:
        return None
    node = model.graph.node[index]
    if node.op_type != "LayerNormalization" or sorted(graph.consumers[target.tensor]) != sorted(target.readers):
        return None
    names = [n for n in node.input[1:3] if n]
    if not all(graph.owned(n) for n in names) or any(graph.array(n).shape != scales.shape for n in names):  # type: ignore[union-attr]
        return None
    for name in names:
        graph.set_array(name, graph.array(name) / scales)  # type: ignore[operator]
    return "folded into its LayerNorm"


# ops through which ONNX Runtime carries int8 tensors unchanged: a DequantizeLinear before them stays
PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather", "Slice", "Split",
                "Expand", "Tile", "Resize", "MaxPool", "Concat", "DepthToSpace", "SpaceToDepth", "Pad")


def float_bypass(model: Any, quantized: Callable[[Any], bool]) -> int:
    """Let every node that is not itself quantized read the float tensor instead of its quantize-dequantize copy.

    ONNX Runtime's QDQ quantizer replaces a tensor by its dequantized copy for *all* readers, so the residual
    Add next to a quantized MatMul, a MatMul kept in float and a graph output that a quantized classifier
    also reads all get 8-bit values. Readers for which `quantized(node)` is false and that do not pass int8
    through (PASS_THROUGH) are rewired to the float tensor; graph outputs are restored to float. Returns the
    number of rewired inputs. Changes `model` in place."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source, copy = q.input[0], dq.output[0]
        if copy in outputs:  # ONNX Runtime renamed the producer's output to keep the graph output's name on the copy
            renamed = f"{copy}_DequantizeLinear_Output"
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == copy:
                        node.input[i] = renamed
                for i, name in enumerate(node.output):
                    if name == source:
                        node.output[i] = copy
                    elif name == copy:
                        node.output[i] = renamed
                for i, name in enumerate(node.input):
                    if name == source:
                        node.input[i] = copy
            source, copy = copy, renamed
            rewired += 1
        for node in graph.node:
            if node.op_type in PASS_THROUGH or node.op_type in ("QuantizeLinear", "DequantizeLinear") or quantized(node):
                continue
            for i, name in enumerate(node.input):
                if name == copy:
                    node.input[i] = source
                    rewired += 1
    return rewired


REMOVABLE_ACTIVATIONS = ("Relu", "Clip")


def restore_activations(model: Any, original: Any) -> int:
    """Give float readers back the activations ONNX Runtime's QDQ quantizer removed.

    The quantizer drops a Relu or Clip whose input it quantizes and lets the QuantizeLinear that follows clamp
    instead, renaming the producer's output to the activation's. A node that reads that tensor in float (kept
    in float by the search, or an op type that is not quantized) then reads the unclamped values: a ResNet
    block's second convolution kept in float took cosine from 0.998 to 0.90. Such readers get a copy of the
    original activation. Returns the number of copies inserted. Changes `model` in place."""
    import onnx

    graph = model.graph
    before = {o: n for n in original.graph.node for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    known = {t.name for t in graph.initializer} | {i.name for i in graph.input} | set(producer)
    inserted = 0
    for name, activation in before.items():
        current = producer.get(name)
        if activation.op_type not in REMOVABLE_ACTIVATIONS or current is None or current.op_type in REMOVABLE_ACTIVATIONS:
            continue
        readers = [n for n in graph.node if name in n.input and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        if not readers:
            continue
        for extra in activation.input[1:]:  # Clip's min and max, when the quantized graph dropped them
            if extra and extra not in known:
                graph.initializer.extend(t for t in original.graph.initializer if t.name == extra)
                constant = before.get(extra)
                if constant is not None and constant.op_type == "Constant" and not any(t.name == extra for t in graph.initializer):
                    graph.node.insert(0, constant)
                known.add(extra)
        restored = f"{name}_float_{activation.op_type.lower()}"
        copy = onnx.helper.make_node(activation.op_type, [name, *activation.input[1:]], [restored],
                                     name=f"{activation.name}_float_copy")
        copy.attribute.extend(activation.attribute)
        for reader in readers:
            for i, value in enumerate(reader.input):
                if value == name:
                    reader.input[i] = restored
        position = list(graph.node).index(current) + 1
        graph.node.insert(position, copy)
        inserted += 1
    return inserted


def drop_dead_qdq(model: Any) -> int:
    """Remove QuantizeLinear/DequantizeLinear nodes whose outputs nothing reads; returns how many."""
    graph = model.graph
    removed = 0
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)
