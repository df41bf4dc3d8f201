"""verify: compare candidates with the reference on validation data, time them, apply the gates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from deploytool.compare import accuracy, classification_metrics, compare_arrays
from deploytool.data import Dataset
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

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batch_size(runner: Runner, wanted: int) -> int:
    fixed = runner.batch_dim() if isinstance(runner, OrtRunner) else None
    return fixed or wanted


def _output_metrics(
    names: Sequence[str], reference: list[np.ndarray], candidate: list[np.ndarray], task: str, labels: np.ndarray | None
) -> dict[str, object]:
    per_output = {name: compare_arrays(r, c) for name, r, c in zip(names, reference, candidate)}
    valid = all(o["shape_match"] and not o.get("nonfinite") for o in per_output.values())
    metrics: dict[str, object] = {"outputs": per_output, "outputs_valid": valid}
    if valid:
        metrics["cosine_mean"] = min(float(o["cosine_mean"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["cosine_min"] = min(float(o["cosine_min"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["max_abs_error"] = max(float(o["max_abs_error"]) for o in per_output.values())  # type: ignore[arg-type]
        metrics["snr_db"] = min(float(o["snr_db"]) for o in per_output.values())  # type: ignore[arg-type]
        if task == "classification":
            metrics.update(classification_metrics(reference[0], candidate[0], labels))
    return metrics


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
    return result


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
            r.name: infer_dataset(r, dataset, _batch_size(r, cfg.batch_size))
            for r in progress.track(runners, len(runners), "running validation data")
        }
        ref_metrics: dict[str, object] = {}
        if task == "classification" and dataset.labels is not None:
            ref_metrics["accuracy"] = accuracy(outputs[reference.name][0], dataset.labels)
        result.metrics[reference.name] = ref_metrics
        for runner in [*candidates, *extra]:
            result.metrics[runner.name] = _output_metrics(names, outputs[reference.name], outputs[runner.name], task, dataset.labels)
        latency_batch = min(cfg.latency_batch, len(dataset))
        timed = [r for r in runners if _batch_size(r, latency_batch) == latency_batch]
        for r in runners:
            if r not in timed:
                result.notes.append(f"{r.name}: fixed batch size differs from latency_batch {latency_batch}; not timed")
        feeds = next(dataset.head(latency_batch).batches(latency_batch))
        latencies = measure_latency(timed, feeds, cfg.warmup, cfg.runs, progress)
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
