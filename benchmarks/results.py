"""What one benchmark run found, in plain data the Markdown renderer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from benchmarks.measure import Quality, Quiet, Timing
from benchmarks.toolchain import ToolchainRun
from benchmarks.variants import Variant
from deploytool.latency import Ratio, Timed, TimingPlan
from deploytool.recipe import Recipe


@dataclass
class Row:
    """One variant with everything measured on it; None where it could not be measured."""

    variant: Variant
    quality: Quality | None = None
    latency: Timed | None = None  # batch 1
    batch_latency: Timed | None = None  # the throughput batch

    @property
    def name(self) -> str:
        return self.variant.name

    def ms(self) -> float | None:
        """Latency at batch 1: the median of the block means."""
        return None if self.latency is None else self.latency.center_ms

    def p90(self) -> float | None:
        """90th percentile of single calls at batch 1."""
        return None if self.latency is None else self.latency.percentile(90)

    def batch_ms(self) -> float | None:
        return None if self.batch_latency is None else self.batch_latency.center_ms


@dataclass
class ToolchainEntry:
    """A recipe and what running it through deploytool produced."""

    recipe: Recipe
    run: ToolchainRun


@dataclass
class Comparison:
    """All variants of one original model (one checkpoint), measured together by the block method."""

    title: str
    dataset: str
    samples: int
    task: str
    entries: list[ToolchainEntry]  # the recipes whose artifacts are compared
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    timings: dict[int, Timing] = field(default_factory=dict)  # by batch size: how the latency was sampled
    throughput_batch: int = 0
    threads: int = 2  # intra-op threads every variant of this model was timed at

    @property
    def reference(self) -> Row:
        return self.rows[0]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def speedup(self, baseline: str | None, candidate: str | None, batch: int = 1) -> Ratio | None:
        """time(baseline) / time(candidate) at `batch` with its bootstrap interval; None where not measured."""
        timing = self.timings.get(batch)
        if timing is None or baseline is None or candidate is None:
            return None
        return timing.speedup(baseline, candidate)


@dataclass
class BenchResult:
    """Everything docs/benchmarks.md is rendered from."""

    started: datetime
    environment: dict[str, Any]
    threads: int | None  # None: each model at its recipes' [verify] threads
    batch: int
    latency_plan: TimingPlan
    batch_plan: TimingPlan
    quiet: Quiet
    comparisons: list[Comparison]
    toolchain: list[ToolchainEntry]
    import_floor_rss: int
    failed: dict[str, str] = field(default_factory=dict)  # recipe path -> why it could not be benchmarked
    seconds: float = 0.0
