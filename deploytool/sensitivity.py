"""Local quantization error of every quantized node, from one pass over the data.

The idea of onnxruntime.quantization.qdq_loss_debug (pair float and fake-quantized activations),
made local: each quantized compute node of a QDQ model gets twins in the float model that compute
from the *float* inputs, fake-quantized with the QDQ model's own scales, and from its dequantized
weights. One session runs all twins over the data and keeps only sums, so one pass ranks every node
by the error it adds by itself (not by the error it inherits), and separates what its weights cost
from what its input activations cost. Optional alternative weights (e.g. 8-bit instead of 7-bit) are
scored in the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploytool.data import Dataset
from deploytool.equalize import Graph, dequantize, run_exposed

COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")


@dataclass
class LayerError:
    """Sums over the data of one node's output y: signal sum(y^2) and squared errors of its twins."""

    node: str
    op: str
    signal: float = 0.0
    total: float = 0.0  # inputs and weights quantized, as in the quantized model
    weights: float = 0.0  # weights only
    alternative: float | None = None  # weights only, with the alternative weights
    cosine_sum: float = 0.0  # per-sample cosine of the quantized output to y, summed over samples
    samples: int = 0
    shift_sum: np.ndarray | None = None  # per output channel (axis 1): sum of (quantized - y)
    positions: int = 0  # values per channel in shift_sum

    @property
    def shift(self) -> np.ndarray | None:
        """Mean error per output channel: the expected output shift the node's quantization causes."""
        return None if self.shift_sum is None or not self.positions else self.shift_sum / self.positions

    @staticmethod
    def _db(signal: float, error: float | None) -> float | None:
        if error is None:
            return None
        if error <= 0:
            return math.inf
        return 10 * math.log10(max(signal, 1e-30) / error)

    @property
    def cosine(self) -> float:
        """Mean per-sample cosine of the node's output with its inputs and weights quantized."""
        return self.cosine_sum / self.samples if self.samples else 1.0

    @property
    def noise(self) -> float:
        """Error energy over signal energy of the quantized node's output: the ranking key."""
        return self.total / self.signal if self.signal > 0 else (math.inf if self.total > 0 else 0.0)

    @property
    def snr_db(self) -> float:
        return self._db(self.signal, self.total)  # type: ignore[return-value]

    @property
    def weight_snr_db(self) -> float:
        return self._db(self.signal, self.weights)  # type: ignore[return-value]

    @property
    def alternative_snr_db(self) -> float | None:
        return self._db(self.signal, self.alternative)


def local_errors(float_model: Any, quantized: Any, dataset: Dataset, batch: int, fixed: bool, threads: int = 1,
                 alternative: Mapping[str, np.ndarray] | None = None, op_types: Sequence[str] = COMPUTE_OPS,
                 weights: bool = True, nodes: Collection[str] | None = None) -> dict[str, LayerError]:
    """{node name: LayerError} for each node of `op_types` that `quantized` (made from `float_model`, same names)
    quantizes. `alternative`: {node name: other float weights for its input 1} to score as well. `weights`: also
    the error of the quantized weights alone (`LayerError.weights`); without it each node runs one twin less.
    `nodes`: only these nodes (no pass over the data when none of them is quantized)."""
    import onnx
    from onnx import helper, numpy_helper

    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    qgraph = Graph(quantized)
    qnodes = {n.name: n for n in quantized.graph.node if n.name}
    exposed: dict[str, tuple[str, str, str | None, str | None]] = {}
    errors: dict[str, LayerError] = {}
    new_nodes = []
    for node in float_model.graph.node:
        qnode = qnodes.get(node.name)
        if node.op_type not in op_types or (nodes is not None and node.name not in nodes):
            continue
        if qnode is None or qnode.op_type != node.op_type or len(qnode.input) != len(node.input):
            continue
        full, weights_only = list(node.input), list(node.input)
        for position, (name, qname) in enumerate(zip(node.input, qnode.input, strict=True)):
            producer = qgraph.producer.get(qname)
            if not qname or producer is None or quantized.graph.node[producer].op_type != "DequantizeLinear":
                continue
            dq = quantized.graph.node[producer]
            value = dequantize(qgraph, dq)
            if value is not None:  # a quantized constant: weights or bias
                constant = f"{node.name}__q{position}"
                probe.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), constant))
                full[position] = weights_only[position] = constant
                continue
            scale, zero = qgraph.array(dq.input[1]), qgraph.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            if scale is None:
                continue
            scale_name, zero_name = f"{node.name}__s{position}", f"{node.name}__z{position}"
            probe.graph.initializer.append(numpy_helper.from_array(scale, scale_name))
            args = [name, scale_name]
            if zero is not None:
                probe.graph.initializer.append(numpy_helper.from_array(zero, zero_name))
                args.append(zero_name)
            quantized_name, fake = f"{node.name}__x{position}", f"{node.name}__fx{position}"
            new_nodes.append(helper.make_node("QuantizeLinear", args, [quantized_name], name=f"{node.name}__Q{position}"))
            new_nodes.append(helper.make_node("DequantizeLinear", [quantized_name, *args[1:]], [fake],
                                              name=f"{node.name}__DQ{position}"))
            full[position] = fake
        if full == list(node.input):
            continue

        def twin(inputs: list[str], suffix: str, node: Any = node) -> str:
            out = f"{node.output[0]}__{suffix}"
            copy = helper.make_node(node.op_type, inputs, [out], name=f"{node.name}__{suffix}")
            copy.attribute.extend(node.attribute)
            copy.domain = node.domain
            new_nodes.append(copy)
            return out

        full_out = twin(full, "full")
        weights_out = twin(weights_only, "weights") if weights and weights_only != list(node.input) else None
        alternative_out = None
        if alternative and node.name in alternative and len(node.input) > 1:
            constant = f"{node.name}__alt"
            probe.graph.initializer.append(numpy_helper.from_array(alternative[node.name].astype(np.float32), constant))
            alternative_out = twin([weights_only[0], constant, *weights_only[2:]], "alternative")
        exposed[node.name] = (node.output[0], full_out, weights_out, alternative_out)
        errors[node.name] = LayerError(node.name, node.op_type, alternative=0.0 if alternative_out else None)
    if not exposed:
        return errors
    probe.graph.node.extend(new_nodes)
    names = [n for outs in exposed.values() for n in outs if n]
    for _, arrays in run_exposed(probe, names, dataset, batch, fixed, threads):
        for node_name, (reference, full_out, weights_out, alternative_out) in exposed.items():
            # float32 products (BLAS dots), float64 sums where many values add up: the float64 copies of every
            # activation took as long as the pass itself on a 224x224 CNN
            y = np.ascontiguousarray(arrays[reference], dtype=np.float32)
            record = errors[node_name]
            quantized = np.ascontiguousarray(arrays[full_out], dtype=np.float32)
            error = quantized - y
            record.signal += _energy(y)
            record.total += _energy(error)
            flat, flat_q = y.reshape(len(y), -1), quantized.reshape(len(y), -1)
            dots = np.einsum("ij,ij->i", flat, flat_q, dtype=np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64) * np.einsum("ij,ij->i", flat_q, flat_q, dtype=np.float64))
            exact = ~error.reshape(len(y), -1).any(axis=1)
            cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), exact.astype(np.float64))
            record.cosine_sum += float(cosines.sum())
            record.samples += len(y)
            if y.ndim >= 2:
                axes = tuple(a for a in range(error.ndim) if a != 1)
                total = error.sum(axis=axes, dtype=np.float64)
                record.shift_sum = total if record.shift_sum is None else record.shift_sum + total
                record.positions += error.size // error.shape[1]
            if weights_out:
                record.weights += _energy(np.asarray(arrays[weights_out], dtype=np.float32) - y)
            if alternative_out:
                record.alternative = (record.alternative or 0.0) + _energy(np.asarray(arrays[alternative_out], dtype=np.float32) - y)
    return errors


def _energy(values: np.ndarray) -> float:
    """sum(values^2), accumulated in float64 without a float64 copy of `values`."""
    flat = values.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))
