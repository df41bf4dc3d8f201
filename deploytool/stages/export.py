"""export: PyTorch module -> checked ONNX file; dynamo exporter first, TorchScript when dynamo fails or its graph fails a check."""

from __future__ import annotations

import inspect
import keyword
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import Dataset
from deploytool.errors import StageError, UserError, first_line
from deploytool.logs import captured, quiet
from deploytool.recipe import ExportConfig, InputSpec
from deploytool.runners import OrtRunner, TorchRunner, keyword_inputs

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
            kwargs: dict[str, Any] = {"dynamo": dynamo, "external_data": False, "verbose": False} if dynamo else {"dynamo": False}
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


def _as_exported(model: torch.nn.Module, args: tuple, specs: Sequence[InputSpec], outputs: Sequence[str]) -> torch.nn.Module:
    """The model as the exporters see it: inputs passed positionally, in the recipe's order, and exactly the named
    outputs. A wrapper is put around the model where that is not so already:
    - forward() takes the inputs by name in another order (runners.keyword_inputs): it is called by keyword;
    - forward() returns a dict (or a transformers ModelOutput) whose keys are not exactly the named outputs in
      order: exporters flatten it by order and name the graph outputs positionally (a recipe naming
      `pooler_output` of {last_hidden_state, pooler_output} would get last_hidden_state), so the wrapper returns
      the named outputs, in order."""
    import torch

    from deploytool.runners import flatten_outputs

    names = [s.name for s in specs]
    by_keyword = keyword_inputs(model, names)
    try:
        with torch.no_grad():  # not inference_mode: tensors a forward() caches lazily must stay usable for tracing
            result = model(**dict(zip(names, args))) if by_keyword else model(*args)
    except MemoryError:
        raise
    except Exception as exc:  # before any exporter: no exporter or opset can change this
        shapes = ", ".join(f"{s.name} {list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for s, a in zip(specs, args))
        raise UserError(f"the model's forward() fails on the declared inputs ({shapes}): "
                        f"{type(exc).__name__}: {first_line(exc)[:200]}",
                        "check the declared inputs ([model] inputs, or --input: names, order, shapes, dtypes) against what "
                        "forward() expects; --debug shows the traceback") from exc
    flatten_outputs(result, outputs)  # the outputs named exist (a dict's by name) and are as many as forward() returns
    select = isinstance(result, Mapping) and list(result.keys()) != list(outputs)
    if not by_keyword and not select:
        return model

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> object:
            result = self.model(**dict(zip(names, inputs))) if by_keyword else self.model(*inputs)
            return tuple(result[name] for name in outputs) if select else result

    # the exporters match dynamic axes to forward()'s parameters one by one (not to one *inputs): give it one
    # parameter per input, named after it where the name is a Python identifier
    def identifier(name: str, index: int) -> str:
        return name if name.isidentifier() and not keyword.iskeyword(name) and name != "self" else f"input_{index}"

    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = [inspect.Parameter(identifier(name, i), inspect.Parameter.POSITIONAL_OR_KEYWORD) for i, name in enumerate(names)]
    Exported.forward.__signature__ = inspect.Signature([self_parameter, *parameters])  # type: ignore[attr-defined]
    return Exported().eval()


class _Rejected(Exception):
    """An exporter's graph that fails a check: the reason is said, and the next exporter is tried."""


def _validate(proto: onnx.ModelProto, model: torch.nn.Module, specs: Sequence[InputSpec], outputs: Sequence[str],
              cfg: ExportConfig, sample: Dataset, folder: Path) -> float:
    """onnx.checker, ONNX Runtime loading and running it, and its outputs against PyTorch's; the largest error."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise _Rejected(f"fails onnx.checker: {first_line(exc)}") from exc
    path = folder / "candidate.onnx"
    onnx.save(proto, str(path))
    try:
        got = OrtRunner("onnx", path, threads=1).infer(sample.feeds)
    except Exception as exc:  # ORT raises its own exception types
        raise _Rejected(f"ONNX Runtime cannot run it: {first_line(exc)[:200]}") from exc
    expected = TorchRunner("torch", model, [s.name for s in specs], outputs).infer(sample.feeds)
    worst = 0.0
    for name, want, have in zip(outputs, expected, got):
        if want.shape != have.shape:
            raise _Rejected(f"output '{name}' has shape {list(have.shape)} in ONNX, {list(want.shape)} in PyTorch")
        error = float(np.max(np.abs(want.astype(np.float64) - have.astype(np.float64)))) if want.size else 0.0
        worst = max(worst, error)
        if not np.allclose(have, want, atol=cfg.atol, rtol=cfg.rtol):
            raise _Rejected(f"ONNX output '{name}' differs from PyTorch by up to {error:.3g} (atol {cfg.atol}, rtol {cfg.rtol})")
    return worst


def export_onnx(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    outputs: Sequence[str],
    cfg: ExportConfig,
    sample: Dataset,
    out_path: Path,
) -> ExportRecord:
    """Export and accept the first exporter's graph that passes every check: onnx.checker, ONNX Runtime
    running it, and its outputs against PyTorch's on `sample`. A graph that fails a check is not used:
    the next exporter is tried, and the note says why."""
    import onnx
    import torch

    model = model.eval()
    if not cfg.dynamic_batch:
        fixed = next((d for d in (specs[0].shape[0],) if isinstance(d, int)), 1)
        sample = Dataset(next(sample.batches(fixed, pad=True)), None, sample.source)  # exactly the fixed batch
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample.feeds[s.name])) for s in specs)
    model = _as_exported(model, args, specs, outputs)
    attempts = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[cfg.exporter]
    rejected: list[str] = []
    accepted: tuple[str, onnx.ModelProto, float] | None = None
    with tempfile.TemporaryDirectory(prefix="deploytool-export-check-") as tmp:
        for exporter in attempts:
            try:
                proto = _export_once(model, args, specs, outputs, cfg, dynamo=exporter == "dynamo")
                accepted = (exporter, proto, _validate(proto, model, specs, outputs, cfg, sample, Path(tmp)))
                break
            except UserError:
                raise  # the model does not fit its description (e.g. the outputs named): no exporter can help
            except _Rejected as exc:
                log.debug("the %s exporter's graph was rejected", exporter, exc_info=True)
                rejected.append(f"the {exporter} exporter's graph {exc}")
            except Exception as exc:
                # torch's exporter wraps the real failure in a generic "Failed to decompose ..." error: say the cause
                cause: BaseException = exc
                for _ in range(10):  # bounded: a cause chain could loop
                    if cause.__cause__ is None:
                        break
                    cause = cause.__cause__
                shown = first_line(exc) if cause is exc else f"{type(cause).__name__}: {first_line(cause)}"
                reason = re.sub(r"\x1b\[[0-9;]*m", "", shown)  # torch colours some of its messages
                log.debug("%s exporter failed", exporter, exc_info=True)
                rejected.append(f"the {exporter} exporter failed ({reason[:200]})")
            log.info(rejected[-1])
    if accepted is None:
        raise StageError("export", "; ".join(rejected)[:600],
                         "the details are in run.log; [export] exporter or opset may choose another path")
    exporter, proto, worst = accepted
    notes = [f"{reason}; used the {exporter} exporter" for reason in rejected]
    with atomic_path(out_path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return ExportRecord(exporter=exporter, opset=cfg.opset, max_abs_error=worst, notes=notes)
