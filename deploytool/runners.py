"""One inference interface for PyTorch and ONNX Runtime models, used for accuracy and latency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from deploytool.data import Dataset
from deploytool.errors import StageError, UserError, first_line

if TYPE_CHECKING:
    import onnxruntime
    import torch


class Runner(Protocol):
    name: str
    output_names: list[str]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def keyword_inputs(model: torch.nn.Module, input_names: Sequence[str]) -> bool:
    """Whether forward() names every input but takes them in another order than the recipe lists them (e.g. a
    transformers decoder's forward(input_ids, past_key_values, attention_mask, ...)): then it is called by keyword."""
    import inspect

    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not set(input_names) <= named:
        return False
    positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD][: len(input_names)]
    return positional != list(input_names)


def require_positional(model: torch.nn.Module, input_names: Sequence[str], stage: str) -> None:
    """A UserError for the stages that call forward() by position (prune, distill) when the model takes its inputs
    by name in another order: passed by position they would silently land in the wrong parameters."""
    if keyword_inputs(model, input_names):
        import inspect

        order = [p for p in inspect.signature(model.forward).parameters if p in set(input_names)]
        raise UserError(f"{stage} calls forward() with the inputs by position, and {type(model).__name__}.forward() takes "
                        f"{list(input_names)} in another order or with other parameters between them (its order: {order})",
                        "list [model] inputs in forward()'s order, or prune and distill a model whose forward() takes "
                        "them first and in that order")


class TorchRunner:
    """Eager PyTorch; forward(*inputs) in the order of the input specs, or by keyword where forward() names them in
    another order (keyword_inputs)."""

    def __init__(self, name: str, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str] | None):
        """output_names None: return whatever outputs forward() gives (for internal scoring)."""
        self.name = name
        self.model = model.eval()
        self.input_names = list(input_names)
        self.names = None if output_names is None else list(output_names)
        self.output_names = self.names or []
        self.by_keyword = keyword_inputs(self.model, self.input_names)

    def twin(self, name: str) -> TorchRunner:
        """Another runner over the same module (the A/A control of the latency method)."""
        return TorchRunner(name, self.model, self.input_names, self.names)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        tensors = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names}
        with torch.inference_mode():
            result = self.model(**tensors) if self.by_keyword else self.model(*tensors.values())
        return [t.detach().numpy() for t in flatten_outputs(result, self.names)]


def flatten_outputs(result: object, names: Sequence[str] | None) -> list[torch.Tensor]:
    """A forward() result (tensor, tuple/list or dict of tensors) as a list in output order (names None: any count)."""
    import torch

    if isinstance(result, torch.Tensor):
        outputs = [result]
    elif isinstance(result, Mapping):
        missing = [n for n in names or [] if n not in result]
        if missing:  # by position would put another entry's tensor under the name
            raise UserError(f"[model] outputs names {', '.join(map(repr, missing))}, which forward() does not return: it "
                            f"returns a {type(result).__name__} with {', '.join(map(repr, result.keys())) or 'no entries'}",
                            "name the entries to export in [model] outputs (--output-name on the commands)")
        outputs = [result[n] for n in names] if names else list(result.values())
    elif isinstance(result, (tuple, list)):
        outputs = list(result)
    else:
        raise UserError(f"the model's forward() returned {type(result).__name__}; expected tensors")
    if names is not None and len(outputs) != len(names):
        raise UserError(
            f"the model returns {len(outputs)} output(s) but [model] outputs names {len(names)}: {list(names)}"
        )
    return outputs


def session_options(threads: int) -> onnxruntime.SessionOptions:
    """Deploy-time session options: pinned intra-op threads, sequential execution, full graph optimization,
    and intra-op threads that sleep instead of spin-waiting between calls (spinning threads steal the CPU
    from whatever runs next, which biases every side-by-side timing on a small machine)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtRunner:
    """An ONNX Runtime CPU session."""

    def __init__(self, name: str, path: Path, threads: int = 1, user_file: bool = False) -> None:
        """`user_file`: the model is one the user named, so a model ONNX Runtime cannot load is a user error
        (exit 2); a model deploytool made that does not load is a stage failure (exit 3)."""
        self.name = name
        self.path = path
        self.threads = threads
        self.user_file = user_file
        self.session = self._open()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _open(self) -> onnxruntime.InferenceSession:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.path), session_options(self.threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            if self.user_file:
                raise UserError(f"cannot load ONNX model {self.path}: {first_line(exc)}") from None
            raise StageError("onnxruntime", f"cannot load {self.path.name}: {first_line(exc)}") from exc

    def reopen(self) -> None:
        """A fresh session: gives back the memory a large batch made the old one's arena keep."""
        self.session = None  # type: ignore[assignment]  # the old session goes before the new one comes
        self.session = self._open()

    def twin(self, name: str) -> OrtRunner:
        """A second session of the same file (the A/A control of the latency method)."""
        return OrtRunner(name, self.path, self.threads, self.user_file)

    def batch_dim(self) -> int | None:
        """The fixed batch size of the first input, or None when the batch axis is dynamic."""
        dim = self.session.get_inputs()[0].shape[0] if self.session.get_inputs()[0].shape else None
        return dim if isinstance(dim, int) else None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {n: feeds[n] for n in self.input_names})


def infer_dataset(runner: Runner, dataset: Dataset, batch_size: int, pad: bool = False) -> list[np.ndarray]:
    """All outputs of a runner over a dataset, concatenated along the sample axis.

    pad: fill a short last batch up to batch_size (a model with a fixed batch size) and drop the extra outputs."""
    chunks: list[list[np.ndarray]] = [runner.infer(batch) for batch in dataset.batches(batch_size, pad)]
    return [np.concatenate([c[i] for c in chunks])[: len(dataset)] for i in range(len(chunks[0]))]
