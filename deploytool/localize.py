"""Localise where a candidate ONNX model diverges from a reference ONNX model.

Both models are run with every intermediate float tensor they share (by name) exposed as
an output; the tensors are compared in the reference's topological order. Quantized
(QDQ) and simplified models keep the float model's tensor names, so the comparison
lines up without any mapping.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.compare import compare_arrays

_FLOAT = 1
_DQ = "_DequantizeLinear_Output"


def _float_tensors(model: Any) -> dict[str, tuple[str, str]]:
    """{tensor name: (node name, op type)} for node outputs known (or presumed) to be float, in node order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    tensors: dict[str, tuple[str, str]] = {}
    for index, node in enumerate(model.graph.node):
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


def localize(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], min_cosine: float = 0.99) -> dict[str, Any]:
    """Per shared tensor: cosine and errors; plus the first tensor under `min_cosine` and the worst one."""
    import onnx

    from deploytool.runners import OrtRunner

    ref_model, cand_model = onnx.load(str(reference)), onnx.load(str(candidate))
    ref_tensors = _float_tensors(ref_model)
    cand_tensors = _float_tensors(cand_model)
    # in a QDQ model the value downstream nodes consume is the dequantized one (a Conv may write the
    # pre-ReLU value under the ReLU's name and leave the ReLU to the quantizer's clipping)
    paired = {n: f"{n}{_DQ}" if f"{n}{_DQ}" in cand_tensors else n for n in ref_tensors}
    shared = [n for n in ref_tensors if paired[n] in cand_tensors]
    if not shared:
        return {"tensors": [], "first": None, "worst": None, "note": "the models share no intermediate tensor names"}
    with tempfile.TemporaryDirectory(prefix="deploytool-localize-") as tmp:
        folder = Path(tmp)
        ref_runner = OrtRunner("reference", _with_outputs(ref_model, shared, folder, "reference"))
        cand_runner = OrtRunner("candidate", _with_outputs(cand_model, [paired[n] for n in shared], folder, "candidate"))
        ref_out = dict(zip(ref_runner.output_names, ref_runner.infer(feeds)))
        cand_out = dict(zip(cand_runner.output_names, cand_runner.infer(feeds)))
    rows: list[dict[str, Any]] = []
    for name in shared:
        stats = compare_arrays(ref_out[name], cand_out[paired[name]])
        if not stats["shape_match"]:
            continue
        node, op = ref_tensors[name]
        rows.append(
            {
                "tensor": name,
                "node": node,
                "op": op,
                "cosine_mean": round(float(stats["cosine_mean"]), 6),  # type: ignore[arg-type]
                "max_abs_error": float(stats["max_abs_error"]),  # type: ignore[arg-type]
                "snr_db": stats["snr_db"],
            }
        )
    diverging = [r for r in rows if not r["cosine_mean"] >= min_cosine]  # NaN counts as diverging
    worst = min(rows, key=lambda r: r["cosine_mean"] if np.isfinite(r["cosine_mean"]) else -2.0) if rows else None
    return {"tensors": rows, "first": diverging[0] if diverging else None, "worst": worst, "threshold": min_cosine}
