"""bench: latency, throughput and session memory of ONNX models, side by side, by the one block method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.latency import Timer, TimingPlan


def bench_models(models: list[Path], dataset: Dataset, batches: list[int], threads: int, plan: TimingPlan,
                 memory: bool = True) -> dict[str, Any]:
    """Per model and batch: p50/p90/p99, the block median, throughput and the speedup over the first model
    (with its interval); the A/A control of the first model; each session's peak memory in a fresh process."""
    from deploytool.memory import session_peak_bytes
    from deploytool.runners import OrtRunner

    runners = [OrtRunner(str(m), m, threads, user_file=True) for m in models]
    first = sorted(runners[0].input_names)
    for runner in runners[1:]:
        if sorted(runner.input_names) != first:
            raise UserError(f"{runner.path}: inputs {sorted(runner.input_names)} differ from {models[0]}'s {first}",
                            "bench compares models that take the same inputs")
    for runner in runners:
        fixed = runner.batch_dim()
        if fixed is not None and any(b != fixed for b in batches):
            raise UserError(f"{runner.path} has a fixed batch size of {fixed}", f"use --batch {fixed}")
    if len(dataset) < max(batches):
        raise UserError(f"{dataset.source} holds {len(dataset)} samples; --batch {max(batches)} needs that many")
    results: dict[str, Any] = {"models": {str(m): {"size_bytes": m.stat().st_size, "batches": {}} for m in models},
                               "latency": {}}
    for batch in batches:
        timer = Timer(runners, next(dataset.batches(batch)), plan, control=True)
        measurement = timer.run()
        for runner in runners:
            timed = measurement.timed[runner.name]
            entry: dict[str, Any] = {**timed.summary(), "throughput_per_s": round(batch * 1000 / timed.center_ms, 2)}
            if runner is not runners[0]:
                ratio = measurement.speedup(runners[0].name, runner.name)
                entry["speedup"], entry["speedup_ci"] = round(ratio.value, 4), [round(ratio.low, 4), round(ratio.high, 4)]
            results["models"][runner.name]["batches"][str(batch)] = entry
        results["latency"][str(batch)] = measurement.describe(threads)
    if memory:
        for m in models:
            results["models"][str(m)]["peak_memory_bytes"] = session_peak_bytes(m, next(dataset.batches(batches[0])), threads)
    return results
