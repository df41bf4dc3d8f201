"""inspect: what an ONNX file holds (opset, inputs/outputs, op histogram, parameters, size)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from deploytool.errors import UserError, first_line
from deploytool.recipe import InputSpec

_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def read_onnx(path: Path) -> Any:
    """onnx.load with a clear error for missing, empty or corrupt files."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"ONNX file {path} is empty")
    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise UserError(f"{path} is not a readable ONNX model: {first_line(exc)}") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path} is not a readable ONNX model: it holds no graph")
    return model


def _shape(value_info: Any) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def input_specs(path: Path) -> list[InputSpec]:
    model = read_onnx(path)
    initializers = {t.name for t in model.graph.initializer}
    return [
        InputSpec(name=i.name, shape=_shape(i) or [1], dtype=_DTYPES.get(i.type.tensor_type.elem_type, "float32"))  # type: ignore[arg-type]
        for i in model.graph.input
        if i.name not in initializers
    ]


def inspect_onnx(path: Path) -> dict[str, Any]:
    import numpy as np

    model = read_onnx(path)
    initializers = {t.name for t in model.graph.initializer}

    def io(values: Any) -> list[dict[str, Any]]:
        return [
            {"name": v.name, "shape": _shape(v), "dtype": _DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))}
            for v in values
            if v.name not in initializers
        ]

    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
        "nodes": len(model.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "params": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer)),
        "quantized": any(op in ops for op in ("QuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                                              "DynamicQuantizeLinear")),
    }
