"""inspect: what an ONNX file holds (opset, inputs/outputs, op histogram, parameters, size)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from deploytool.errors import UserError, first_line
from deploytool.recipe import InputSpec, Recipe

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
    return model_io(path)[0]


def model_io(path: Path) -> tuple[list[InputSpec], list[str]]:
    """An ONNX file's inputs (initializers aside) as input specs, and its output names."""
    from pydantic import ValidationError

    model = read_onnx(path)
    initializers = {t.name for t in model.graph.initializer}
    try:
        specs = [
            InputSpec(name=i.name, shape=_shape(i) or [1], dtype=_DTYPES.get(i.type.tensor_type.elem_type, "float32"))  # type: ignore[arg-type]
            for i in model.graph.input
            if i.name not in initializers
        ]
    except ValidationError as exc:
        raise UserError(f"{path}: an input deploytool cannot feed: {exc.errors()[0]['msg']}") from None
    return specs, [o.name for o in model.graph.output]


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


def recipe_io(recipe: Recipe) -> Recipe:
    """The recipe, with the inputs and outputs of a [model] onnx file filled in from the file (inputs the recipe names
    must be the file's: their shapes and dtypes then replace the file's)."""
    if recipe.model.onnx is None:
        return recipe
    path = recipe.resolve(recipe.model.onnx)
    specs, outputs = model_io(path)
    if recipe.model.inputs:
        names, given = sorted(s.name for s in specs), sorted(s.name for s in recipe.model.inputs)
        if names != given:
            raise UserError(f"[model] inputs {given} are not the inputs of {path}: {names}", "leave inputs out to use the file's")
        specs = recipe.model.inputs
    if recipe.model.outputs and sorted(recipe.model.outputs) != sorted(outputs):
        raise UserError(f"[model] outputs {recipe.model.outputs} are not the outputs of {path}: {outputs}",
                        "leave outputs out to use the file's")
    update: dict[str, Any] = {"model": recipe.model.model_copy(update={"inputs": specs, "outputs": outputs})}
    if recipe.quantize is not None and recipe.quantize.calibration_batch is None:  # what the file's batch axis takes
        update["quantize"] = recipe.quantize.model_copy(update={"calibration_batch": 16 if isinstance(specs[0].shape[0], str) else 1})
    return recipe.model_copy(update=update)
