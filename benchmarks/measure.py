"""Measurements on the variants: output quality on the validation set and interleaved latency."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.machine import other_load, others_share
from deploytool.compare import classification_metrics, compare_arrays
from deploytool.data import Dataset
from deploytool.runners import Latency, OrtRunner, Runner, infer_dataset, measure_latency


@dataclass
class Quality:
    """A variant's outputs against the original model's on the validation set."""

    accuracy: float | None
    top1_agreement: float | None
    cosine_mean: float
    cosine_min: float


@dataclass
class TimingPlan:
    """How latency is sampled: up to `rounds` rounds of `block` timed calls per variant, within `max_seconds`.

    Rounds run in segments of about `segment_seconds`; a segment during which other processes
    took more than `max_others` of the machine's CPU is discarded and timed again while the
    budget lasts. While other processes are busy, timing pauses, for at most `max_wait` seconds
    in all. With fewer than `min_rounds` quiet rounds, every round is used."""

    rounds: int
    block: int
    block_warmup: int
    warmup: int
    max_seconds: float
    max_wait: float = 0.0
    segment_seconds: float = 1.0
    max_others: float = 0.15
    min_rounds: int = 3
    seed: int = 0


@dataclass
class _Segment:
    samples: dict[str, list[float]]
    rounds: int
    others: float | None  # share of the machine's CPU other processes took meanwhile


@dataclass
class Timing:
    """Latency per runner, and how many rounds were kept or discarded because other processes were busy."""

    latencies: dict[str, Latency]
    kept: int
    dropped: int
    others_kept: float | None  # other processes' CPU share over the kept rounds
    filtered: bool  # False when too few quiet rounds came, and every round was used
    waited: float = 0.0  # seconds paused while other processes were busy

    @property
    def calls(self) -> int:
        """Timed calls per runner."""
        return min((len(v.samples_ms) for v in self.latencies.values()), default=0)


def fixed_batch(runner: Runner) -> int | None:
    """The batch size an ONNX model is fixed to, or None when its batch axis is dynamic."""
    return runner.batch_dim() if isinstance(runner, OrtRunner) else None


def accepts_batch(runner: Runner, batch: int) -> bool:
    fixed = fixed_batch(runner)
    return fixed is None or fixed == batch


def first_output(runner: Runner, dataset: Dataset, batch: int) -> np.ndarray:
    """The runner's first output over the whole dataset."""
    fixed = fixed_batch(runner)
    return infer_dataset(runner, dataset, fixed or batch, pad=fixed is not None)[0]


def quality(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, task: str) -> Quality:
    """Accuracy and top-1 agreement (classification), and per-sample cosine to the reference outputs."""
    stats = compare_arrays(reference, candidate)
    accuracy = agreement = None
    if task == "classification":
        metrics = classification_metrics(reference, candidate, labels)
        accuracy, agreement = metrics.get("accuracy"), metrics["top1_agreement"]
    return Quality(accuracy, agreement, float(stats["cosine_mean"]), float(stats["cosine_min"]))  # type: ignore[arg-type]


def _round(
    runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan, index: int
) -> dict[str, list[float]]:
    """One round: every runner once, in a seeded random order; `block` timed calls each after `block_warmup`.

    A random order rather than a rotation: rotating keeps each runner behind the same predecessor,
    and what that predecessor leaves behind (busy worker threads, evicted caches) then biases it."""
    order = list(runners)
    random.Random(plan.seed * 1_000_003 + index).shuffle(order)
    samples: dict[str, list[float]] = {}
    for runner in order:
        samples[runner.name] = measure_latency([runner], feeds, plan.block_warmup, plan.block)[runner.name].samples_ms
    return samples


def _segment(
    runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan, first: int, most: int
) -> _Segment:
    """Rounds `first`, `first + 1`, ... for about `segment_seconds` (at least one, at most `most`)."""
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    rounds = 0
    with other_load() as load:
        start = time.perf_counter()
        while rounds < most and (rounds == 0 or time.perf_counter() - start < plan.segment_seconds):
            for name, values in _round(runners, feeds, plan, first + rounds).items():
                samples[name] += values
            rounds += 1
    return _Segment(samples, rounds, load.share)


def interleaved_latency(runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan) -> Timing:
    """Latency samples per runner, interleaved: each round times every runner once, in a fresh random order.

    Within a round a runner gets `block_warmup` untimed calls, then `block` timed ones
    (deploytool.runners.measure_latency on that runner alone). The untimed calls absorb
    what the previous runner left behind: its runtime's worker threads still spin-waiting
    for work on the same cores, and caches full of its weights. Segments during which other
    processes were busy are timed again (see TimingPlan).
    """
    for runner in runners:
        for _ in range(plan.warmup):
            runner.infer(feeds)
    kept: list[_Segment] = []
    dropped: list[_Segment] = []
    timed, waited, index, quiet_rounds, busy = 0.0, 0.0, 0, 0, True  # busy: look before the first segment
    while quiet_rounds < plan.rounds and timed < plan.max_seconds:
        if busy and waited < plan.max_wait:  # pause until other processes calm down, within max_wait
            share = others_share(1.0)
            busy = share is not None and share > plan.max_others
            waited += 1.0 if busy else 0.0
            continue
        start = time.perf_counter()
        segment = _segment(runners, feeds, plan, index, plan.rounds - quiet_rounds)
        timed += time.perf_counter() - start
        index += segment.rounds
        busy = segment.others is not None and segment.others > plan.max_others
        if busy:
            dropped.append(segment)
        else:
            kept.append(segment)
            quiet_rounds += segment.rounds
    filtered = quiet_rounds >= min(plan.min_rounds, plan.rounds)
    used = kept if filtered else [*kept, *dropped]
    latencies = {r.name: Latency([v for s in used for v in s.samples[r.name]]) for r in runners}
    weighted = [(s.others, s.rounds) for s in kept if s.others is not None]
    others = sum(o * n for o, n in weighted) / sum(n for _, n in weighted) if weighted else None
    return Timing(latencies, quiet_rounds, sum(s.rounds for s in dropped), others, filtered, waited)
