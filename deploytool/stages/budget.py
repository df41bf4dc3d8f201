"""Pruning to a latency budget: the channel-pruning ratio is searched by measured ONNX Runtime latency on this
CPU, not by MACs.

Every candidate ratio is pruned (Torch-Pruning, as the prune stage does), exported to ONNX and timed against
the ONNX export of the original by the shared block method (deploytool.latency, with its A/A control), at the
latency batch of the recipe. The search looks for the smallest ratio whose pruned model is at least
`target_speedup` times faster (or runs within `target_latency_ms`), by bisection over the ratio: the fewest
channels removed for the speed asked for, so the least accuracy lost. Each measured point (ratio, MACs,
latency, speedup with its interval, agreement with the original before any distillation) is recorded: the
trade-off curve of the report.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.hardware import DEFAULT_THREADS
from deploytool.recipe import ExportConfig, InputSpec, PruneConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STEPS = 6  # bisection rounds after the end points: the ratio to within (max_ratio - 0) / 2**6


@dataclass
class BudgetSearch:
    """What the search measured and chose (the record's `budget`)."""

    target_speedup: float | None
    target_latency_ms: float | None
    baseline_ms: float = 0.0
    needed_speedup: float = 0.0
    chosen_ratio: float = 0.0
    max_effective_ratio: float = 0.0
    met: bool = False
    points: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "notes"}


def _outputs_quality(reference: list[np.ndarray], outputs: list[np.ndarray], task: str) -> dict[str, float]:
    from deploytool.compare import compare_arrays, top1_agreement

    stats = compare_arrays(reference[0], outputs[0])
    quality = {"cosine": round(float(stats["cosine_mean"]), 6)}  # type: ignore[arg-type]
    if task == "classification" and reference[0].ndim >= 2 and reference[0].shape[-1] > 1:
        quality["top1_agreement"] = round(top1_agreement(reference[0], outputs[0]), 6)
    return quality


def search_ratio(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    outputs: Sequence[str],
    cfg: PruneConfig,
    data: Dataset,
    task: str,
    export: ExportConfig,
    latency_batch: int = 1,
    threads: int = DEFAULT_THREADS,
    progress: Any = None,
) -> BudgetSearch:
    """The smallest channel-pruning ratio (up to cfg.max_ratio) that meets the latency budget, by measurement."""
    import torch

    from deploytool.latency import TimingPlan, measure
    from deploytool.runners import OrtRunner, infer_dataset
    from deploytool.stages.export import export_onnx
    from deploytool.stages.prune import channel_prune, count_macs

    if cfg.target_speedup is None and cfg.target_latency_ms is None:
        raise UserError("[prune] a latency budget needs target_speedup or target_latency_ms")
    search = BudgetSearch(cfg.target_speedup, cfg.target_latency_ms)
    probe = data.head(min(len(data), 256))
    batch = min(latency_batch, len(data))
    feeds = next(data.head(batch).batches(batch))
    example_data = data.head(2)
    plan = TimingPlan.for_calls(100, block=10, warmup=5, max_seconds=20.0)
    with tempfile.TemporaryDirectory(prefix="deploytool-budget-") as tmp:
        folder = Path(tmp)
        original = folder / "original.onnx"
        export_onnx(model, specs, outputs, export, example_data, original)
        base = OrtRunner("original", original, threads)
        reference = infer_dataset(base, probe, 64)
        measured: dict[float, dict[str, Any]] = {}

        architectures: dict[tuple[int | None, int], dict[str, Any]] = {}

        def point(ratio: float) -> dict[str, Any]:
            ratio = round(ratio, 4)
            if ratio in measured:
                return measured[ratio]
            pruned = channel_prune(model, specs, cfg.model_copy(update={"ratio": ratio}), data)
            macs, params = count_macs(pruned, example)
            if (macs, params) in architectures:  # round_to gives several ratios the same widths: the same network
                measured[ratio] = architectures[(macs, params)]
                return measured[ratio]
            path = folder / f"pruned-{len(measured)}.onnx"
            export_onnx(pruned, specs, outputs, export, example_data, path)
            runner = OrtRunner("pruned", path, threads)
            timing = measure([base, runner], feeds, plan, control=True)
            speedup = timing.speedup("original", "pruned")
            base_ms, pruned_ms = timing.timed["original"].center_ms, timing.timed["pruned"].center_ms
            row = {"ratio": ratio, "macs": macs, "latency_ms": round(pruned_ms, 4), "original_ms": round(base_ms, 4),
                   "speedup": round(speedup.value, 4), "speedup_ci": [round(speedup.low, 4), round(speedup.high, 4)],
                   **_outputs_quality(reference, infer_dataset(runner, probe, 64), task)}
            measured[ratio] = architectures[(macs, params)] = row
            search.points.append(row)
            log.info("budget search: ratio %.3f -> %.3f ms, %s", ratio, pruned_ms, speedup)
            return row

        def needed(row: dict[str, Any]) -> float:
            """The speedup over the original the budget asks for, from this row's own timing of the original."""
            wanted = cfg.target_speedup or 0.0
            if cfg.target_latency_ms is not None:
                wanted = max(wanted, float(row["original_ms"]) / cfg.target_latency_ms)
            return wanted

        def meets(row: dict[str, Any]) -> bool:
            return float(row["speedup"]) >= needed(row)

        # Torch-Pruning leaves a layer alone when its ratio would round its width to nothing (round_to), so past
        # some ratio MACs grow again: the search's upper end is the ratio with the fewest MACs on a grid
        grid = np.round(np.arange(0.1, cfg.max_ratio + 1e-9, 0.1), 4).tolist() or [cfg.max_ratio]
        example = tuple(torch.from_numpy(np.ascontiguousarray(example_data.feeds[s.name][:1])) for s in specs)
        macs = {r: count_macs(channel_prune(model, specs, cfg.model_copy(update={"ratio": r}), data), example)[0] for r in grid}
        known = {r: m for r, m in macs.items() if m is not None}
        top = min(known, key=lambda r: (known[r], r)) if known else cfg.max_ratio
        search.max_effective_ratio = top
        widest = point(top)
        if not meets(widest):
            search.chosen_ratio, search.met = top, False
            search.notes.append(
                f"latency budget not reached by channel pruning: at ratio {top:g} (the fewest MACs up to max_ratio "
                f"{cfg.max_ratio:g}) the pruned model is {widest['speedup']:.2f}x the original's ONNX Runtime speed "
                f"(needs {needed(widest):.2f}x); kept that ratio")
        else:
            low, high = 0.0, top  # low: known (or presumed, at 0) to miss; high: known to meet
            rounds = range(STEPS) if progress is None else progress.track(range(STEPS), STEPS, "searching the pruning ratio")
            for _ in rounds:
                middle = round((low + high) / 2, 4)
                if meets(point(middle)):
                    high = middle
                else:
                    low = middle
            search.chosen_ratio, search.met = high, True
        chosen = measured[round(search.chosen_ratio, 4)]
        chosen["chosen"] = True
        search.chosen_ratio = float(chosen["ratio"])  # the ratio the chosen network was measured at
        search.baseline_ms = float(chosen["original_ms"])
        search.needed_speedup = round(needed(chosen), 4)
    search.points.sort(key=lambda row: float(row["ratio"]))
    return search
