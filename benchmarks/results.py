"""What one benchmark run found, in plain data the Markdown renderer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from benchmarks.measure import Quality, Timing, TimingPlan
from benchmarks.toolchain import ToolchainRun
from benchmarks.variants import Variant
from deploytool.recipe import Recipe
from deploytool.runners import Latency


@dataclass
class Row:
    """One variant with everything measured on it; None where it could not be measured."""

    variant: Variant
    quality: Quality | None = None
    latency: Latency | None = None  # batch 1
    batch_latency: Latency | None = None  # the throughput batch

    @property
    def name(self) -> str:
        return self.variant.name

    def p50(self) -> float | None:
        return None if self.latency is None else self.latency.percentile(50)

    def batch_p50(self) -> float | None:
        return None if self.batch_latency is None else self.batch_latency.percentile(50)


@dataclass
class ToolchainEntry:
    """A recipe and what running it through deploytool produced."""

    recipe: Recipe
    run: ToolchainRun


@dataclass
class Comparison:
    """All variants of one original model (one checkpoint), measured in one interleaved session."""

    title: str
    dataset: str
    samples: int
    task: str
    entries: list[ToolchainEntry]  # the recipes whose artifacts are compared
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    timings: dict[int, Timing] = field(default_factory=dict)  # by batch size: how the latency was sampled

    @property
    def reference(self) -> Row:
        return self.rows[0]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)


@dataclass
class BenchResult:
    """Everything docs/benchmarks.md is rendered from."""

    started: datetime
    environment: dict[str, Any]
    threads: int
    batch: int
    latency_plan: TimingPlan
    batch_plan: TimingPlan
    comparisons: list[Comparison]
    toolchain: list[ToolchainEntry]
    import_floor_rss: int
    failed: dict[str, str] = field(default_factory=dict)  # recipe path -> why it could not be benchmarked
    seconds: float = 0.0
