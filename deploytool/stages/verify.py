"""verify: compare candidates with the reference on validation data, time them, apply the gates."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploytool.compare import (
    accuracy,
    classification_metrics,
    compare_arrays,
    regression_metrics,
    within_tolerance,
)
from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.progress import Progress, Silent
from deploytool.recipe import GatesConfig, VerifyConfig
from deploytool.runners import OrtRunner, Runner, infer_dataset, measure_latency


@dataclass
class Gate:
    name: str
    model: str
    value: float | None
    threshold: float
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "model": self.model, "value": self.value, "threshold": self.threshold, "passed": self.passed}


@dataclass
class VerifyResult:
    metrics: dict[str, dict[str, object]]
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    latency_samples_ms: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin PyTorch's intra-op threads for the block; a no-op where PyTorch is not in use (e.g. golden outputs)."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fixed_batch(runner: Runner) -> int | None:
    return runner.batch_dim() if isinstance(runner, OrtRunner) else None


def _batch_size(runner: Runner, wanted: int) -> int:
    return _fixed_batch(runner) or wanted


def _output_metrics(
    names: Sequence[str],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    task: str,
    labels: np.ndarray | None,
    tolerance: tuple[float, float] | None = None,
) -> dict[str, object]:
    per_output = {name: compare_arrays(r, c) for name, r, c in zip(names, reference, candidate)}
    for name, r, c in zip(names, reference, candidate):
        per_output[name]["dtype_match"] = r.dtype == c.dtype
        if tolerance is not None and r.shape == c.shape:
            per_output[name]["within_tolerance"] = within_tolerance(r, c, *tolerance)
    valid = all(o["shape_match"] and o["dtype_match"] and not o.get("nonfinite") for o in per_output.values())
    metrics: dict[str, object] = {"outputs": per_output, "outputs_valid": valid}
    if tolerance is not None:
        metrics["within_tolerance"] = min(float(o.get("within_tolerance", 0.0)) for o in per_output.values())  # type: ignore[arg-type]
    if not valid:  # the stable keys stay present, as null
        metrics.update(cosine_mean=None, cosine_min=None, max_abs_error=None, snr_db=None)
    if valid:
        metrics["cosine_mean"] = min(float(o["cosine_mean"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["cosine_min"] = min(float(o["cosine_min"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["max_abs_error"] = max(float(o["max_abs_error"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["snr_db"] = min(float(o["snr_db"]) for o in per_output.values())  # type: ignore[arg-type]
        if task == "classification":
            metrics.update(classification_metrics(reference[0], candidate[0], labels))
        elif task == "regression" and labels is not None:
            metrics.update(regression_metrics(candidate[0], labels))
    return metrics


def check_labels(dataset: Dataset, logits: np.ndarray, task: str) -> None:
    """Labels must fit the model's first output: class indices within its width, or one target per output value."""
    labels = dataset.labels
    if labels is None:
        return
    if task == "classification":
        classes = logits.shape[-1] if logits.ndim >= 2 else 0
        whole = labels.dtype.kind in "iu" or bool(np.all(np.mod(labels, 1) == 0))
        if not whole or labels.size != len(logits) or labels.min() < 0 or labels.max() >= classes:
            raise UserError(
                f"{dataset.source}: labels do not match the model's output: classification needs one class index "
                f"in 0..{classes - 1} per sample (got {labels.dtype} values {labels.min()}..{labels.max()}, "
                f"shape {list(labels.shape)}, for output shape {list(logits.shape)})"
            )
    elif task == "regression" and labels.size not in (logits.size, len(logits)):
        raise UserError(
            f"{dataset.source}: labels do not match the model's output: regression needs one target per output "
            f"value (got shape {list(labels.shape)} for output shape {list(logits.shape)})"
        )


def _gates(name: str, metrics: dict[str, object], reference: dict[str, object], gates: GatesConfig) -> list[Gate]:
    result = [Gate("outputs_valid", name, float(bool(metrics["outputs_valid"])), 1.0, bool(metrics["outputs_valid"]))]

    def add(gate: str, value: object, threshold: float | None, higher_is_better: bool) -> None:
        if threshold is None:
            return
        number = None if value is None else float(value)  # type: ignore[arg-type]
        ok = number is not None and not math.isnan(number) and (number >= threshold if higher_is_better else number <= threshold)
        result.append(Gate(gate, name, None if number is None else round(number, 6), threshold, ok))

    drop = None
    if "accuracy" in metrics and "accuracy" in reference:
        drop = float(reference["accuracy"]) - float(metrics["accuracy"])  # type: ignore[arg-type]
    add("max_accuracy_drop", drop, gates.max_accuracy_drop, higher_is_better=False)
    add("min_top1_agreement", metrics.get("top1_agreement"), gates.min_top1_agreement, higher_is_better=True)
    add("min_cosine", metrics.get("cosine_mean"), gates.min_cosine, higher_is_better=True)
    add("min_speedup", metrics.get("speedup"), gates.min_speedup, higher_is_better=True)
    add("max_size_ratio", metrics.get("size_ratio"), gates.max_size_ratio, higher_is_better=False)
    if gates.atol is not None or gates.rtol is not None:
        add("within_tolerance", metrics.get("within_tolerance"), 1.0, higher_is_better=True)
    return result


def tolerance_of(gates: GatesConfig) -> tuple[float, float] | None:
    """(atol, rtol) of the element-wise tolerance gate, or None when neither is set."""
    if gates.atol is None and gates.rtol is None:
        return None
    return gates.atol or 0.0, gates.rtol or 0.0


def verify_models(
    reference: Runner,
    candidates: Sequence[Runner],
    dataset: Dataset,
    task: str,
    cfg: VerifyConfig,
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    extra: Sequence[Runner] = (),
) -> VerifyResult:
    """Outputs, task metrics, interleaved latency and gates for each candidate against the reference.

    `extra` runners are measured like candidates but not gated (e.g. the unpruned model, for comparison)."""
    progress = progress or Silent()
    sizes = sizes or {}
    names = reference.output_names
    result = VerifyResult(metrics={})
    with torch_threads(cfg.threads):
        runners = [reference, *candidates, *extra]
        outputs = {
            r.name: infer_dataset(r, dataset, _batch_size(r, cfg.batch_size), pad=_fixed_batch(r) is not None)
            for r in progress.track(runners, len(runners), "running validation data")
        }
        result.outputs = outputs
        check_labels(dataset, outputs[reference.name][0], task)
        ref_metrics: dict[str, object] = {}
        if task == "classification" and dataset.labels is not None:
            ref_metrics["accuracy"] = accuracy(outputs[reference.name][0], dataset.labels)
        result.metrics[reference.name] = ref_metrics
        if task == "regression" and dataset.labels is not None:
            ref_metrics.update(regression_metrics(outputs[reference.name][0], dataset.labels))
        for runner in [*candidates, *extra]:
            result.metrics[runner.name] = _output_metrics(
                names, outputs[reference.name], outputs[runner.name], task, dataset.labels, tolerance_of(cfg.gates)
            )
        latency_batch = min(cfg.latency_batch, len(dataset))
        timeable = [r for r in runners if getattr(r, "timeable", True)]
        timed = [r for r in timeable if _batch_size(r, latency_batch) == latency_batch]
        for r in timeable:
            if r not in timed:
                result.notes.append(f"{r.name}: fixed batch size differs from latency_batch {latency_batch}; not timed")
        feeds = next(dataset.head(latency_batch).batches(latency_batch))
        latencies = measure_latency(timed, feeds, cfg.warmup, cfg.runs, progress, cfg.min_seconds)
        result.latency_samples_ms = {name: lat.samples_ms for name, lat in latencies.items()}
        for batch in cfg.throughput_batches:
            if batch > len(dataset):
                result.notes.append(f"throughput at batch {batch} skipped: only {len(dataset)} samples")
                continue
            feeds = next(dataset.batches(batch))
            batched = [r for r in timeable if _batch_size(r, batch) == batch]
            for name, lat in measure_latency(batched, feeds, 2, max(10, cfg.runs // 5), None).items():
                throughput = result.metrics[name].setdefault("throughput", {})
                throughput[str(batch)] = round(batch * 1000.0 / lat.percentile(50), 2)  # type: ignore[index]
    ref_p50 = latencies[reference.name].percentile(50) if reference.name in latencies else None
    for runner in runners:
        metrics = result.metrics[runner.name]
        if runner.name in latencies:
            lat = latencies[runner.name]
            metrics["latency_ms"] = lat.summary()
            metrics["throughput_per_s"] = round(latency_batch * 1000.0 / lat.percentile(50), 2)
            if ref_p50 is not None:
                metrics["speedup"] = round(ref_p50 / lat.percentile(50), 4)
        if runner.name in sizes and reference.name in sizes:
            metrics["size_ratio"] = round(sizes[runner.name] / sizes[reference.name], 4)
    for runner in candidates:
        result.gates.extend(_gates(runner.name, result.metrics[runner.name], ref_metrics, cfg.gates))
    return result


def _probe_batch(runner: Runner | None, dataset: Dataset, size: int = 32) -> dict[str, np.ndarray]:
    """Up to `size` samples, or exactly the runner's fixed batch size (wrapping around if needed)."""
    fixed = _fixed_batch(runner) if runner is not None else None
    return next(dataset.batches(fixed or min(size, len(dataset)), pad=fixed is not None))


def verify_and_explain(
    reference: Runner,
    candidates: Sequence[tuple[str, Path]],
    dataset: Dataset,
    task: str,
    cfg: VerifyConfig,
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    extra: Sequence[tuple[str, Path]] = (),
    localize_pairs: Sequence[tuple[str, Path, Path]] = (),
    always_localize: bool = False,
    golden: Path | None = None,
    user_files: bool = False,
) -> dict[str, object]:
    """verify_models on ONNX files, plus what explains the verdict: session memory, where failing
    candidates diverge (pairs of name, base model, candidate model), golden outputs. A report fragment."""
    from deploytool.golden import save_golden
    from deploytool.localize import localize
    from deploytool.memory import session_peak_bytes

    runners = [OrtRunner(name, path, cfg.threads, user_files) for name, path in candidates]
    extras = [OrtRunner(name, path, cfg.threads, user_files) for name, path in extra]
    expected = sorted(getattr(reference, "input_names", dataset.feeds))
    for runner in [*runners, *extras]:
        if sorted(runner.input_names) != expected:
            raise UserError(f"{runner.path}: inputs {sorted(runner.input_names)} differ from the reference's {expected}")
    result = verify_models(reference, runners, dataset, task, cfg, sizes, progress, extra=extras)
    if golden is not None:
        save_golden(golden, dataset, reference.output_names, result.outputs[reference.name], reference.name)
    feeds = _probe_batch(runners[0] if runners else None, dataset, cfg.latency_batch)
    if cfg.memory:
        for name, path in [*candidates, *extra]:
            result.metrics[name]["peak_memory_bytes"] = session_peak_bytes(path, feeds, cfg.threads)
    failed = {g.model for g in result.failed}
    threshold = cfg.gates.min_cosine or 0.99
    by_name = {r.name: r for r in runners}
    localization = {
        name: localize(base, path, _probe_batch(by_name.get(name), dataset), threshold)
        for name, base, path in localize_pairs
        if always_localize or name in failed
    }
    notes = list(result.notes)
    for name, where in localization.items():
        spot = where.get("first") if name in failed else None
        if spot:
            worst = where["worst"]
            notes.append(
                f"{name} first diverges at tensor '{spot['tensor']}' (node '{spot['node']}', {spot['op']}, cosine "
                f"{spot['cosine_mean']:.4f}); worst at '{worst['tensor']}' (node '{worst['node']}', cosine {worst['cosine_mean']:.4f})"
            )
    for gate in result.failed:
        if gate.name == "within_tolerance":
            for output, stats in result.metrics[gate.model]["outputs"].items():  # type: ignore[union-attr]
                notes.append(
                    f"{gate.model} output '{output}': smallest atol that passes {stats['min_atol']:.3g} (rtol 0), "
                    f"smallest rtol {stats['min_rtol']:.3g} (atol 0)"
                )
    return {
        "metrics": result.metrics,
        "gates": [g.as_dict() for g in result.gates],
        "passed": result.passed,
        "latency_batch": min(cfg.latency_batch, len(dataset)),
        "latency_samples_ms": {k: [round(v, 4) for v in vals] for k, vals in result.latency_samples_ms.items()},
        "localization": localization,
        "notes": notes,
    }
