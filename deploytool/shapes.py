"""Tensor sizes estimated from ONNX shape inference, for the memory budgets of the stages that expose a model's
intermediate tensors (calibration, equalization statistics, the sensitivity probe, localisation).

A dimension the graph fixes counts as it is. A symbolic dimension that a graph input names takes the size the
inputs are fed with (a free sequence length counts at its fed length), the inputs' first axis the batch size, and
any other symbolic dimension the largest of those. A tensor without an inferred shape counts as the largest one
that has a shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def infer(model: Any) -> Any:
    """The model with inferred shapes, or the model itself where inference fails (the sizes are only estimates)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model


def tensor_bytes(inferred: Any, names: Iterable[str], batch: int, feeds: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, int]:
    """{name: estimated bytes of the tensor for `batch` samples} from a shape-inferred model; `feeds` gives the
    sizes of the free axes of the graph inputs other than the first."""
    names = list(names)
    named: dict[str, int] = {}
    for value in inferred.graph.input:
        dims = value.type.tensor_type.shape.dim
        if feeds is None or value.name not in feeds:
            continue
        for axis, dim in enumerate(dims[1:], start=1):
            if dim.dim_param and axis < feeds[value.name].ndim:
                named[dim.dim_param] = max(named.get(dim.dim_param, 0), int(feeds[value.name].shape[axis]))
    for value in inferred.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            named[dims[0].dim_param] = batch
    unknown = max([batch, *named.values()])
    shapes: dict[str, int] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            count = 1
            for dim in tensor.shape.dim:
                count *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else named.get(dim.dim_param, unknown)
            shapes[value.name] = 4 * count
    known = [shapes[n] for n in names if n in shapes]
    fallback = max(known) if known else 4 * batch * 1024
    return {n: shapes.get(n, fallback) for n in names}


def fixed_batch(model: Any) -> int | None:
    """The batch size the model's first graph input fixes, or None where its first axis is free."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None
    return None


def per_sample_bytes(model: Any, names: Iterable[str], feeds: Mapping[str, np.ndarray] | None = None) -> int:
    """Estimated bytes of the tensors for one sample (for a model with a fixed batch, its batch's share)."""
    total = sum(tensor_bytes(infer(model), names, 1, feeds).values())
    return max(1, total // (fixed_batch(model) or 1))
