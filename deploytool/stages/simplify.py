"""simplify: onnxsim, then our own numeric check; the unsimplified model is kept if either fails."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import Dataset
from deploytool.errors import first_line
from deploytool.recipe import SimplifyConfig
from deploytool.runners import OrtRunner

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
    return SimplifyRecord(True, before, len(simplified.graph.node), worst)
