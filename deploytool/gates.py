"""Gates: what a candidate must meet, the defaults applied where the user names none, and the verdicts.

Default gates depend on what is compared (the README has the same table):

| candidate | default gates |
|---|---|
| same precision as the reference, nothing removed (an export, a simplified model, a float copy) | every element within `atol` or `rtol`: atol = 1e-3 x the output's RMS, rtol = 1e-3 |
| quantized (QDQ, QOperator or integer ops in its graph) | cosine >= 0.99, SNR >= 15 dB, top-1 agreement >= 0.99 (classification), not slower than the float model it was made from |
| pruned or distilled | accuracy drop <= 0.01 with labels; else top-1 agreement >= 0.99 (classification) or cosine >= 0.99 |

Quality gates of a quantized model of a run compare it with the float model it was made from; user
gates compare every candidate with the reference. Speed gates are decided on the confidence
interval of the measured ratio: they pass only when the whole interval clears the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["equivalent", "quantized", "lossy"]

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1_AGREEMENT = 0.99
DEFAULT_MIN_SNR_DB = 15.0
DEFAULT_MAX_ACCURACY_DROP = 0.01
DEFAULT_MIN_SPEEDUP_VS_FLOAT = 1.0
# equivalence: an element passes within atol = ATOL_OF_RMS x the output's RMS, or within RTOL x |reference|
ATOL_OF_RMS = 1e-3
RTOL = 1e-3

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd",
    "QLinearMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "MatMulNBits", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearConcat",
})

SPEED_GATES = ("min_speedup", "min_speedup_vs_fp32", "min_speedup_vs_ort_fp32")
HIGHER_IS_BETTER = {
    "max_accuracy_drop": False, "min_top1_agreement": True, "min_cosine": True, "min_snr_db": True,
    "min_speedup": True, "min_speedup_vs_fp32": True, "min_speedup_vs_ort_fp32": True, "max_size_ratio": False, "within_tolerance": True,
    "outputs_valid": True,
}


@dataclass
class Gate:
    name: str
    model: str
    value: float | None
    threshold: float
    passed: bool
    default: bool = False
    against: str | None = None  # the model the value compares with, when it is not the reference
    interval: list[float] | None = None  # speed gates: the ratio's confidence interval; share gates: the share's

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "model": self.model, "value": self.value, "threshold": self.threshold,
                                  "passed": self.passed, "default": self.default}
        if self.against is not None:
            out["against"] = self.against
        if self.interval is not None:
            out["interval"] = self.interval
        return out


def judge(name: str, model: str, value: object, threshold: float, default: bool = False, against: str | None = None) -> Gate:
    """A gate on a plain number: None or NaN always fails."""
    number = None if value is None else float(value)  # type: ignore[arg-type]
    ok = number is not None and not math.isnan(number) and (
        number >= threshold if HIGHER_IS_BETTER.get(name, True) else number <= threshold)
    return Gate(name, model, None if number is None or math.isnan(number) else round(number, 6), threshold, ok, default, against)


def share_interval(share: float, count: int, z: float = 1.96) -> list[float]:
    """The 95 % (Wilson score) interval of a share measured over `count` answers taken as independent: where it
    holds a gate's threshold, the sample count cannot tell the measured share from one that meets the gate."""
    if count <= 0:
        return [0.0, 1.0]
    factor = z * z / count
    center = (share + factor / 2) / (1 + factor)
    half = z * math.sqrt(max(share * (1 - share), 0.0) / count + factor / (4 * count)) / (1 + factor)
    return [round(max(0.0, center - half), 4), round(min(1.0, center + half), 4)]


def drop_interval(lost: int, gained: int, count: int) -> list[float]:
    """The 95 % interval of an accuracy drop measured on `count` paired answers, `lost` right before and wrong now,
    `gained` the reverse: the share of the changed answers that were lost (a Wilson interval, given how many changed)
    scaled to the drop. No changed answer: exactly no drop."""
    changed = lost + gained
    if changed == 0 or count <= 0:
        return [0.0, 0.0]
    low, high = share_interval(lost / changed, changed)
    return [round(changed / count * (2 * low - 1), 4), round(changed / count * (2 * high - 1), 4)]


def is_quantized(path: Path) -> bool:
    """Whether an ONNX file holds quantized operators (QDQ pairs, QLinear*/integer ops)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    for function in model.functions:
        ops.update(n.op_type for n in function.node)
    return bool(ops & QUANTIZED_OPS)


def defaults(kind: Kind, task: str, has_labels: bool, speed_gate: str | None) -> dict[str, float]:
    """The default gates for a candidate of this kind (the tolerance gate is 'atol'/'rtol' set to NaN: automatic).

    speed_gate: the gate that times a quantized model against the float model it was made from
    ('min_speedup_vs_fp32' in a run, 'min_speedup' when that float model is the reference), or None."""
    if kind == "equivalent":
        return {"atol": math.nan, "rtol": RTOL}
    if kind == "quantized":
        gates = {"min_cosine": DEFAULT_MIN_COSINE, "min_snr_db": DEFAULT_MIN_SNR_DB}
        if task == "classification":
            gates["min_top1_agreement"] = DEFAULT_MIN_TOP1_AGREEMENT
        if speed_gate is not None:
            gates[speed_gate] = DEFAULT_MIN_SPEEDUP_VS_FLOAT
        return gates
    if task == "classification" and has_labels:
        return {"max_accuracy_drop": DEFAULT_MAX_ACCURACY_DROP}
    if task == "classification":
        return {"min_top1_agreement": DEFAULT_MIN_TOP1_AGREEMENT}
    return {"min_cosine": DEFAULT_MIN_COSINE}


def effective(user: dict[str, float], kind: Kind, task: str, has_labels: bool, speed_gate: str | None,
              use_defaults: bool) -> tuple[dict[str, float], set[str]]:
    """(gates to apply, names of those that are defaults): the user's gates, and defaults for the gates they leave out."""
    chosen = dict(user)
    added: set[str] = set()
    if not use_defaults:
        return chosen, added
    for name, value in defaults(kind, task, has_labels, speed_gate).items():
        if name in ("atol", "rtol") and ("atol" in user or "rtol" in user):
            continue
        if name not in chosen:
            chosen[name] = value
            added.add(name)
    return chosen, added
