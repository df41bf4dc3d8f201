"""simplify: onnxsim, then our own numeric check; the unsimplified model is kept if either fails."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import Dataset
from deploytool.errors import first_line
from deploytool.recipe import SimplifyConfig
from deploytool.runners import OrtRunner

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


@dataclass
class SimplifyRecord:
    simplified: bool
    nodes_before: int
    nodes_after: int
    max_abs_error: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def global_average_pools(model: onnx.ModelProto) -> int:
    """AveragePool nodes whose window covers the whole, statically known input (no padding, no dilation) become
    GlobalAveragePool, in place; returns how many. Same result in float; but ONNX Runtime's quantized average pool
    divides a window larger than its input (as in EfficientNet's AvgPool2d(1280, ceil_mode=True) on a 7x7 map)
    by the whole window's area, which makes an int8 model's outputs vanish."""
    import onnx
    from onnx import helper

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here
        return 0
    shapes: dict[str, list[int | None]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    count = 0
    for node in model.graph.node:
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel, shape = attrs.get("kernel_shape"), shapes.get(node.input[0])
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or any(attrs.get("pads", [])):
            continue
        if any(d != 1 for d in attrs.get("dilations", [])) or not kernel or not shape or len(shape) != len(kernel) + 2:
            continue
        spatial = shape[2:]
        if any(d is None for d in spatial) or any(k < d for k, d in zip(kernel, spatial)):
            continue
        if any(k > d for k, d in zip(kernel, spatial)) and not attrs.get("ceil_mode", 0):
            continue  # without ceil_mode such a window has no output at all
        node.op_type = "GlobalAveragePool"
        del node.attribute[:]
        count += 1
    return count


def simplify_onnx(in_path: Path, out_path: Path, cfg: SimplifyConfig, sample: Dataset) -> SimplifyRecord:
    import onnx
    import onnxsim

    original = onnx.load(str(in_path))
    before = len(original.graph.node)

    def keep_original(reason: str) -> SimplifyRecord:
        log.warning("simplification skipped: %s", reason)
        if in_path != out_path:
            with atomic_path(out_path) as tmp:
                shutil.copyfile(in_path, tmp)
        return SimplifyRecord(False, before, before, notes=[f"kept the unsimplified model: {reason}"])

    try:
        simplified, ok = onnxsim.simplify(original)
    except Exception as exc:
        return keep_original(f"onnxsim failed: {first_line(exc)}")
    if not ok:
        return keep_original("onnxsim could not validate its result")
    notes = []
    pools = global_average_pools(simplified)  # checked below with everything else
    if pools:
        notes.append(f"{pools} AveragePool node(s) whose window covers the whole input became GlobalAveragePool "
                     "(the same result; ONNX Runtime's int8 average pool gets oversized windows wrong)")
    with tempfile.TemporaryDirectory(prefix="deploytool-simplify-") as folder:
        candidate = Path(folder) / "simplified.onnx"
        onnx.save(simplified, str(candidate))
        try:
            reference = OrtRunner("original", in_path)
            fixed = reference.batch_dim()
            feeds = next(sample.batches(fixed, pad=True)) if fixed else sample.feeds  # a fixed batch takes exactly that many
            expected = reference.infer(feeds)
            got = OrtRunner("simplified", candidate).infer(feeds)
        except Exception as exc:
            reason = first_line(exc)
            return keep_original(f"the simplified model does not run: {reason}")
        if any(a.shape != b.shape for a, b in zip(expected, got)):
            return keep_original("the simplified model's output shapes differ")
        worst = max((float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(expected, got)), default=0.0)
        if not all(np.allclose(b, a, atol=cfg.atol, rtol=cfg.rtol) for a, b in zip(expected, got)):
            return keep_original(f"the simplified model's outputs differ by up to {worst:.3g}")
        with atomic_path(out_path) as tmp:
            shutil.copyfile(candidate, tmp)
    return SimplifyRecord(True, before, len(simplified.graph.node), worst, notes)
