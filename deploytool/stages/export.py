"""export: PyTorch module -> checked ONNX file, dynamo exporter first, TorchScript as fallback."""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import Dataset
from deploytool.errors import StageError, first_line
from deploytool.logs import captured, quiet
from deploytool.recipe import ExportConfig, InputSpec
from deploytool.runners import OrtRunner, TorchRunner

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)


@dataclass
class ExportRecord:
    exporter: str
    opset: int
    max_abs_error: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _axes(specs: Sequence[InputSpec], outputs: Sequence[str], dynamic_batch: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str) and (i > 0 or dynamic_batch)}
        if dynamic_batch and 0 not in named:
            named[0] = "batch"
        if named:
            axes[spec.name] = named
    batch_name = next((a[0] for a in axes.values() if 0 in a), "batch")
    if dynamic_batch:
        for name in outputs:
            axes[name] = {0: batch_name}
    return axes


def _export_once(
    model: torch.nn.Module, args: tuple, specs: Sequence[InputSpec], outputs: Sequence[str], cfg: ExportConfig, dynamo: bool
) -> onnx.ModelProto:
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix="deploytool-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        # torch logs (and prints, also from C++) its own view of a failure; it belongs in run.log, not the terminal
        with warnings.catch_warnings(), captured(log), quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            kwargs = {"dynamo": dynamo, "external_data": False, "verbose": False} if dynamo else {"dynamo": False}
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=[s.name for s in specs],
                output_names=list(outputs),
                dynamic_axes=_axes(specs, outputs, cfg.dynamic_batch),
                opset_version=cfg.opset,
                **kwargs,
            )
        proto = onnx.load(str(path))
    proto.producer_name = "deploytool"
    _strip_trace_metadata(proto.graph)
    return proto


def _strip_trace_metadata(graph: onnx.GraphProto) -> None:
    """Drop per-node tracing metadata (stack traces with local file paths, FX node dumps): it leaks
    the exporting machine's paths into the artifact and makes identical models differ byte-wise."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            if attribute.g.node:
                _strip_trace_metadata(attribute.g)
            for subgraph in attribute.graphs:
                _strip_trace_metadata(subgraph)


def export_onnx(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    outputs: Sequence[str],
    cfg: ExportConfig,
    sample: Dataset,
    out_path: Path,
) -> ExportRecord:
    """Export, run onnx.checker, and check ONNX Runtime's outputs against PyTorch's on `sample`."""
    import onnx
    import torch

    model = model.eval()
    if not cfg.dynamic_batch:
        fixed = next((d for d in (specs[0].shape[0],) if isinstance(d, int)), 1)
        sample = Dataset(next(sample.batches(fixed, pad=True)), None, sample.source)  # exactly the fixed batch
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample.feeds[s.name])) for s in specs)
    attempts = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[cfg.exporter]
    notes: list[str] = []
    proto = None
    for exporter in attempts:
        try:
            proto = _export_once(model, args, specs, outputs, cfg, dynamo=exporter == "dynamo")
            break
        except Exception as exc:
            reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))  # torch colours some of its messages
            log.debug("%s exporter failed", exporter, exc_info=True)
            if exporter != attempts[-1]:
                notes.append(f"the dynamo exporter failed ({reason[:200]}); fell back to the TorchScript exporter")
                log.info(notes[-1])  # a note of the record: printed by the command, kept in the report
                continue
            raise StageError("export", f"torch.onnx.export ({exporter}) failed: {reason[:300]}") from exc
    assert proto is not None
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise StageError("export", f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
        exported = OrtRunner("onnx", tmp, threads=1)
        expected = TorchRunner("torch", model, [s.name for s in specs], outputs).infer(sample.feeds)
        got = exported.infer(sample.feeds)
        worst = 0.0
        for name, want, have in zip(outputs, expected, got):
            if want.shape != have.shape:
                raise StageError("export", f"output '{name}' has shape {list(have.shape)} in ONNX, {list(want.shape)} in PyTorch")
            worst = max(worst, float(np.max(np.abs(want - have))) if want.size else 0.0)
            if not np.allclose(have, want, atol=cfg.atol, rtol=cfg.rtol):
                raise StageError(
                    "export",
                    f"ONNX output '{name}' differs from PyTorch by up to {np.max(np.abs(want - have)):.3g} "
                    f"(atol {cfg.atol}, rtol {cfg.rtol})",
                )
    exporter_used = "dynamo" if not notes and attempts[0] == "dynamo" else "torchscript"
    return ExportRecord(exporter=exporter_used, opset=cfg.opset, max_abs_error=worst, notes=notes)
