"""The input-rounding floor: the float model run on inputs rounded exactly as a quantized model rounds them.

A static int8 model quantizes its float inputs (the first QuantizeLinear: a scale and zero point from
calibration). Whatever that rounding alone does to the float model's outputs, no model that quantizes its input
can undo. For a well-conditioned network it is negligible (real images are 8-bit to begin with); for a chaotic
one (random weights, near-tied classes) it can already flip top-1 answers and cost more cosine than the whole
int8 model does. Comparing the two tells "the quantizer loses accuracy" apart from "the model is this sensitive".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.data import Dataset
from deploytool.runners import Runner


@dataclass(frozen=True)
class Rounding:
    """How a QuantizeLinear rounds one graph input: x -> (clip(round(x / scale) + zero_point) - zero_point) * scale."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 1

    def apply(self, array: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.zero_point.dtype)
        scale, zero = self.scale.astype(np.float32), self.zero_point.astype(np.float32)
        if scale.ndim == 1 and scale.size > 1:  # per-axis: broadcast along the axis
            shape = [1] * array.ndim
            shape[self.axis % array.ndim] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        # round half to even, as QuantizeLinear does
        quantized = np.clip(np.rint(array / scale) + zero, info.min, info.max)
        return ((quantized - zero) * scale).astype(array.dtype)


def input_rounding(model: Any) -> dict[str, Rounding]:
    """{graph input: its rounding} for every float graph input that a QuantizeLinear reads directly (empty for
    float, dynamic or QOperator models)."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = constants.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == 1}  # float32
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):  # they read the input's shape, not its values
            continue
        for name in node.input:
            if name in inputs:
                readers.setdefault(name, []).append(node)
    found: dict[str, Rounding] = {}
    for name, nodes in readers.items():
        # only an input that every reader takes rounded: where a node kept in float reads it as it is, rounding it
        # for the float model would overstate what the quantized model loses
        if len(nodes) != 1 or nodes[0].op_type != "QuantizeLinear":
            continue
        node = nodes[0]
        if any(a.name in ("output_dtype", "block_size", "saturate") for a in node.attribute):
            continue  # opset 21 output types, block quantization, float8: not reproduced here
        scale = value(node.input[1])
        zero = value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0, dtype=np.uint8)
        if scale is None or zero is None or zero.dtype.kind not in "iu":
            continue  # a computed scale, or a float8 zero point: not reproduced here
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        found[name] = Rounding(scale, zero, axis)
    return found


def round_inputs(feeds: Mapping[str, np.ndarray], rounding: Mapping[str, Rounding]) -> dict[str, np.ndarray]:
    return {name: rounding[name].apply(array) if name in rounding else array for name, array in feeds.items()}


class RoundedInputs:
    """A runner that rounds its inputs first (`rounding`), then runs `runner`."""

    def __init__(self, runner: Runner, rounding: Mapping[str, Rounding]) -> None:
        self.runner = runner
        self.rounding = dict(rounding)
        self.name = f"{runner.name} (rounded inputs)"
        self.output_names = runner.output_names

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.infer(round_inputs(feeds, self.rounding))


def run_rounded(runner: Runner, quantized: Path, dataset: Dataset, batch: int, pad: bool = False
                ) -> tuple[list[np.ndarray], float | None] | None:
    """`runner` over `dataset` with its inputs rounded as the quantized model at `quantized` rounds them, and the
    SNR (dB, finite, else None) of that rounding; None when that model rounds no float input (dynamic, QOperator,
    integer inputs, an input a float node also reads)."""
    import onnx

    from deploytool.runners import infer_dataset

    rounding = input_rounding(onnx.load(str(quantized), load_external_data=False))
    if not rounding:
        return None
    outputs = infer_dataset(RoundedInputs(runner, rounding), dataset, batch, pad=pad)
    snr = input_snr_db(dataset.feeds, rounding)
    return outputs, round(snr, 2) if snr is not None and np.isfinite(snr) else None


def input_snr_db(feeds: Mapping[str, np.ndarray], rounding: Mapping[str, Rounding]) -> float | None:
    """SNR (dB) of the rounding itself, over every rounded input together."""
    signal = noise = 0.0
    for name, rule in rounding.items():
        if name not in feeds:
            continue
        array = np.asarray(feeds[name], dtype=np.float32).reshape(-1)  # float64 sums, no float64 copies
        error = (rule.apply(feeds[name]).astype(np.float32).reshape(-1) - array)
        signal += float(np.einsum("i,i->", array, array, dtype=np.float64))
        noise += float(np.einsum("i,i->", error, error, dtype=np.float64))
    if signal == 0.0:
        return None
    return float("inf") if noise == 0.0 else 10.0 * float(np.log10(signal / noise))


def describe(floor: Mapping[str, object]) -> str:
    """'cosine 0.9707, top-1 agreement 0.578, SNR 13.6 dB' from a floor's metrics."""
    parts = []
    for key, label, digits in (("cosine", "cosine", 4), ("top1_agreement", "top-1 agreement", 4), ("snr_db", "SNR", 1)):
        value = floor.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            parts.append(f"{label} {value:.{digits}f}" + (" dB" if key == "snr_db" else ""))
    return ", ".join(parts)
