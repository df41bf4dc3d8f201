"""Localise where a candidate ONNX model diverges from a reference ONNX model.

Both models are run with every intermediate float tensor they share (by name) exposed as
an output; the tensors are compared in the reference's topological order. Quantized
(QDQ) and simplified models keep the float model's tensor names, so the comparison
lines up without any mapping.

Memory stays bounded by running the tensors in groups and, for a model whose batch axis is
free, the samples a few at a time: each group's two sessions are made once and see every
sample, so a large model costs a few sessions, not one pair per slice of its tensors.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.compare import Signal
from deploytool.shapes import tensor_bytes

_FLOAT = 1
_DQ = "_DequantizeLinear_Output"


def _float_tensors(inferred: Any) -> dict[str, tuple[str, str]]:
    """{tensor name: (node name, op type)} for node outputs of a shape-inferred model known (or presumed) to be
    float, in node order."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    tensors: dict[str, tuple[str, str]] = {}
    for index, node in enumerate(inferred.graph.node):
        for name in node.output:
            if name and types.get(name, _FLOAT) == _FLOAT:
                tensors[name] = (node.name or f"{node.op_type}_{index}", node.op_type)
    return tensors


def _with_outputs(model: Any, names: list[str], folder: Path, label: str) -> Path:
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, _FLOAT, None))
    path = folder / f"{label}.onnx"
    onnx.save(exposed, str(path))
    return path


def _groups(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive tensors in groups of at most `budget` estimated bytes (a larger tensor forms a group alone)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    return [g for g in groups if g]


def _row(name: str, node: str, op: str, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "tensor": name,
        "node": node,
        "op": op,
        "cosine_mean": round(float(stats["cosine_mean"]), 6),
        "max_abs_error": float(stats["max_abs_error"]),
        "snr_db": stats["snr_db"],
    }


def _free_batch(model: Any) -> bool:
    """Whether every graph input has a batch axis of free size (the samples can be run a few at a time)."""
    initializers = {t.name for t in model.graph.initializer}
    for value in (i for i in model.graph.input if i.name not in initializers):
        dims = value.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return True


def localize(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], min_cosine: float = 0.99,
             budget_bytes: int = 128 * 2**20) -> dict[str, Any]:
    """Per shared tensor: cosine and errors; plus the first tensor under `min_cosine` and the worst one.

    Memory stays bounded whatever the number of tensors: they are exposed in groups of at most `budget_bytes`
    (estimated, per model) and only statistics are kept. Where both models take any batch size, a group runs
    the samples as many at a time as fit the budget (one at least); the statistics are those of all samples."""
    import onnx

    from deploytool.runners import OrtRunner

    ref_model, cand_model = onnx.load(str(reference)), onnx.load(str(candidate))
    ref_inferred = onnx.shape_inference.infer_shapes(ref_model)  # read for tensor types and sizes
    ref_tensors = _float_tensors(ref_inferred)
    cand_tensors = _float_tensors(onnx.shape_inference.infer_shapes(cand_model))
    # in a QDQ model the value downstream nodes consume is the dequantized one (a Conv may write the
    # pre-ReLU value under the ReLU's name and leave the ReLU to the quantizer's clipping)
    paired = {n: f"{n}{_DQ}" if f"{n}{_DQ}" in cand_tensors else n for n in ref_tensors}
    shared = [n for n in ref_tensors if paired[n] in cand_tensors]
    if not shared:
        return {"tensors": [], "first": None, "worst": None, "note": "the models share no intermediate tensor names"}
    samples = len(next(iter(feeds.values()))) if feeds else 1
    step = samples
    if samples > 1 and _free_batch(ref_model) and _free_batch(cand_model):
        per_sample = sum(tensor_bytes(ref_inferred, shared, 1, feeds).values())
        step = max(1, min(samples, budget_bytes // max(per_sample, 1)))
    groups = _groups(shared, tensor_bytes(ref_inferred, shared, step, feeds), budget_bytes)
    del ref_inferred  # a copy of the model, weights included: not held while the sessions run
    chunks = [{k: v[start:start + step] for k, v in feeds.items()} for start in range(0, samples, step)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deploytool-localize-") as tmp:
        folder = Path(tmp)
        for index, group in enumerate(groups):
            ref_runner = OrtRunner("reference", _with_outputs(ref_model, group, folder, f"reference{index}"))
            cand_runner = OrtRunner("candidate", _with_outputs(cand_model, [paired[n] for n in group], folder, f"candidate{index}"))
            signals = {name: Signal() for name in group}
            for chunk in chunks:
                ref_out = dict(zip(ref_runner.output_names, ref_runner.infer(chunk)))
                cand_out = dict(zip(cand_runner.output_names, cand_runner.infer(chunk)))
                for name in group:
                    signals[name].add(ref_out.pop(name), cand_out.pop(paired[name]))
                ref_out.clear()
                cand_out.clear()
            del ref_runner, cand_runner
            for name in group:
                stats = signals[name].result()
                if stats["shape_match"]:
                    rows.append(_row(name, *ref_tensors[name], stats))
            for label in (f"reference{index}", f"candidate{index}"):
                (folder / f"{label}.onnx").unlink(missing_ok=True)
    diverging = [r for r in rows if not r["cosine_mean"] >= min_cosine]  # NaN counts as diverging
    worst = min(rows, key=lambda r: r["cosine_mean"] if np.isfinite(r["cosine_mean"]) else -2.0) if rows else None
    return {"tensors": rows, "first": diverging[0] if diverging else None, "worst": worst, "threshold": min_cosine,
            "groups": len(groups), "samples_per_run": step}
