"""The one latency method of deploytool, used by verify, bench, the quantize speed search and the benchmarks.

Timing single calls of several models in a rotation is biased on a small machine: a runtime's
worker threads keep spin-waiting after a call and steal the CPU from whatever runs next. So:

- every runner is warmed up, then timed in *blocks* of calls; each round times one block per
  runner, in an order shuffled afresh every round (seeded), after a few untimed calls that absorb
  what the previous runner left behind;
- ONNX Runtime sessions are created with spin-waiting off (see runners.session_options), and
  PyTorch runs in its own blocks;
- a model's latency is the median of its block means; a ratio between two models is the ratio of
  those medians, with a bootstrap confidence interval over rounds (blocks of the same round are
  paired, so slow drifts of the machine cancel);
- an A/A control, one runner (the first, unless named) timed a second time as a runner of its own,
  shows the noise floor of the measurement: its ratio to that runner must be 1.00 within that floor.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from deploytool.runners import Runner

METHOD = "blocks"
AA_SUFFIX = " (A/A copy)"
MIN_ROUNDS = 5  # the time bound never stops timing before this many rounds: fewer give no interval worth the name


@dataclass(frozen=True)
class TimingPlan:
    """How latency is sampled: `rounds` rounds of one block of timed calls per runner.

    A block holds `block` calls, more for a fast model (enough to last `min_block_seconds`: the
    cost of switching between models must not weigh on short calls) and fewer for a slow one (as
    many as fit in `block_seconds`, at least one), after untimed calls: `block_warmup`, or a
    quarter of the block when that is more. At least
    `min_seconds` of rounds are timed; timing stops at `max_rounds` rounds or after `max_seconds`
    seconds, whichever comes first, but never before MIN_ROUNDS rounds."""

    rounds: int = 20
    block: int = 10
    block_warmup: int = 2
    block_seconds: float = 0.25
    min_block_seconds: float = 0.02
    warmup: int = 10
    min_seconds: float = 0.0
    max_rounds: int = 80
    max_seconds: float = 60.0
    seed: int = 0
    confidence: float = 0.95
    resamples: int = 2000

    @classmethod
    def for_calls(cls, calls: int, block: int = 10, warmup: int = 10, min_seconds: float = 0.0,
                  max_seconds: float = 60.0, seed: int = 0) -> TimingPlan:
        """A plan of about `calls` timed calls per runner, in blocks of `block` (at least 5 rounds)."""
        block = max(1, min(block, calls))
        rounds = max(5, math.ceil(calls / block))
        return cls(rounds=rounds, block=block, warmup=warmup, min_seconds=min_seconds,
                   max_rounds=max(rounds, 4 * rounds), max_seconds=max(max_seconds, min_seconds), seed=seed)


@dataclass(frozen=True)
class Ratio:
    """time(numerator runner) / time(denominator runner), with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, object]:
        return {"value": round(self.value, 4), "ci": [round(self.low, 4), round(self.high, 4)]}

    def decide(self, threshold: float) -> bool | None:
        """True when the whole interval clears `threshold`, False when it all misses it, None: undecided."""
        if self.low >= threshold:
            return True
        if self.high < threshold:
            return False
        return None

    def __str__(self) -> str:
        return f"{self.value:.3f}x [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class Timed:
    """One runner's timings: every call, and the mean of each block (one per round, in round order)."""

    name: str
    samples_ms: list[float] = field(default_factory=list)
    blocks_ms: list[float] = field(default_factory=list)
    block: int = 0  # timed calls per block
    block_warmup: int = 0  # untimed calls before each block

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def center_ms(self) -> float:
        """The latency this method stands by: the median of the block means."""
        return float(np.median(self.blocks_ms))

    def summary(self) -> dict[str, float]:
        return {
            "p50": round(self.percentile(50), 4),
            "p90": round(self.percentile(90), 4),
            "p99": round(self.percentile(99), 4),
            "mean": round(float(np.mean(self.samples_ms)), 4),
            "block_median": round(self.center_ms, 4),
        }


@dataclass
class Measurement:
    """Timings of several runners, taken together by the block method."""

    timed: dict[str, Timed]
    plan: TimingPlan
    rounds: int
    seconds: float
    aa_name: str | None = None
    reference: str | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.timed

    def speedup(self, baseline: str, candidate: str) -> Ratio:
        """How many times faster `candidate` is than `baseline`: baseline time / candidate time."""
        return _bootstrap_ratio(self.timed[baseline].blocks_ms, self.timed[candidate].blocks_ms, self.plan)

    @property
    def aa(self) -> Ratio | None:
        if self.aa_name is None or self.reference is None:
            return None
        return self.speedup(self.reference, self.aa_name)

    @property
    def noise(self) -> float | None:
        """The A/A control's distance from 1.0 at the edges of its interval: differences below it are noise."""
        aa = self.aa
        return None if aa is None else round(max(aa.high - 1.0, 1.0 - aa.low, abs(aa.value - 1.0)), 4)

    def describe(self, threads: int | None = None) -> dict[str, object]:
        """How it was measured: for the report's `latency` key."""
        aa = self.aa
        return {
            "method": METHOD,
            "rounds": self.rounds,
            "block": self.plan.block,
            "blocks": {name: t.block for name, t in self.timed.items()},
            "block_warmup": self.plan.block_warmup,
            "warmup": self.plan.warmup,
            "order": "shuffled per round",
            "threads": threads,
            "spinning": False,
            "estimate": "median of block means; ratio intervals: bootstrap over rounds",
            "confidence": self.plan.confidence,
            "seconds": round(self.seconds, 2),
            "aa": None if aa is None else {"model": self.reference, **aa.as_dict(), "noise": self.noise},
        }


def _bootstrap_ratio(baseline: Sequence[float], candidate: Sequence[float], plan: TimingPlan) -> Ratio:
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    value = float(np.median(a) / np.median(b))
    n = min(len(a), len(b))
    if n < 2:
        return Ratio(value, value, value)
    a, b = a[:n], b[:n]
    rng = np.random.default_rng(plan.seed)
    index = rng.integers(0, n, size=(plan.resamples, n))
    ratios = np.median(a[index], axis=1) / np.median(b[index], axis=1)
    tail = (1.0 - plan.confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Ratio(value, float(min(low, value)), float(max(high, value)))


class Twin:
    """A second runner over the same model, for the A/A control."""

    def __init__(self, runner: Runner) -> None:
        twin = getattr(runner, "twin", None)
        self.runner: Runner = twin(runner.name + AA_SUFFIX) if callable(twin) else runner
        self.name = runner.name + AA_SUFFIX
        self.output_names = runner.output_names

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.infer(feeds)


class Timer:
    """Times runners by the block method; `extend` adds rounds to an undecided measurement."""

    def __init__(self, runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan,
                 control: bool | str = True, progress: object = None) -> None:
        """control: True for an A/A copy of the first runner, the name of another runner to copy, or False."""
        if not runners:
            raise ValueError("nothing to time")
        self.plan = plan
        self.feeds = feeds
        copied = next((r for r in runners if r.name == control), runners[0]) if control else None
        self.reference = copied.name if copied is not None else runners[0].name
        self.aa_name = copied.name + AA_SUFFIX if copied is not None else None
        self.runners: list[Runner] = [*runners, *([Twin(copied)] if copied is not None else [])]
        self.timed = {r.name: Timed(r.name) for r in self.runners}
        self.rounds = 0
        self.seconds = 0.0
        self.progress = progress
        self._rng = random.Random(plan.seed)
        for runner in self.runners:
            self._size_blocks(runner)

    def _size_blocks(self, runner: Runner) -> None:
        """Warm a runner up and size its blocks from how long its warm-up calls took."""
        seconds = []
        for _ in range(max(1, self.plan.warmup)):
            start = time.perf_counter()
            runner.infer(self.feeds)
            seconds.append(time.perf_counter() - start)
        call = max(float(np.median(seconds[len(seconds) // 2:])), 1e-6)
        if call * self.plan.block < self.plan.min_block_seconds:
            block = min(math.ceil(self.plan.min_block_seconds / call), 50 * self.plan.block)
        else:
            block = max(1, min(self.plan.block, int(self.plan.block_seconds / call)))
        timed = self.timed[runner.name]
        timed.block = block
        timed.block_warmup = max(min(self.plan.block_warmup, block // 4), block // 4)

    def _round(self) -> None:
        order = list(self.runners)
        self._rng.shuffle(order)
        for runner in order:
            timed = self.timed[runner.name]
            for _ in range(timed.block_warmup):
                runner.infer(self.feeds)
            samples = []
            for _ in range(timed.block):
                start = time.perf_counter()
                runner.infer(self.feeds)
                samples.append((time.perf_counter() - start) * 1000.0)
            self.timed[runner.name].samples_ms.extend(samples)
            self.timed[runner.name].blocks_ms.append(sum(samples) / len(samples))
        self.rounds += 1

    def run(self, rounds: int | None = None) -> Measurement:
        """The plan's rounds (and more until min_seconds), or `rounds` more rounds within the plan's bounds."""
        target = self.rounds + (rounds if rounds is not None else self.plan.rounds)
        target = min(target, max(self.plan.max_rounds, self.plan.rounds))
        started = time.perf_counter()
        steps = range(self.rounds, target)
        tracked = steps if self.progress is None else self.progress.track(steps, len(steps), "measuring latency")  # type: ignore[attr-defined]
        for _ in tracked:
            if self.seconds + time.perf_counter() - started > self.plan.max_seconds and self.rounds >= MIN_ROUNDS:
                break
            self._round()
        if rounds is None:
            while (self.seconds + time.perf_counter() - started < self.plan.min_seconds
                   and self.rounds < self.plan.max_rounds
                   and self.seconds + time.perf_counter() - started < self.plan.max_seconds):
                self._round()
        self.seconds += time.perf_counter() - started
        return self.measurement()

    @property
    def exhausted(self) -> bool:
        """No more rounds may be added."""
        return self.rounds >= self.plan.max_rounds or self.seconds >= self.plan.max_seconds

    def measurement(self) -> Measurement:
        return Measurement(self.timed, self.plan, self.rounds, self.seconds, self.aa_name, self.reference)


def measure(runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan, control: bool | str = True,
            progress: object = None) -> Measurement:
    """Time `runners` (and, with `control`, an A/A copy of the first) by the block method."""
    return Timer(runners, feeds, plan, control, progress).run()
