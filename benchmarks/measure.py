"""Measurements on the variants: output quality on the validation set, and latency by deploytool's own
block method (deploytool.latency), with a look at what other processes took of the machine meanwhile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.machine import other_load, wait_for_quiet
from deploytool.compare import classification_metrics, compare_arrays
from deploytool.data import Dataset
from deploytool.latency import AA_SUFFIX, Measurement, Ratio, Timed, TimingPlan, Twin, measure
from deploytool.runners import OrtRunner, Runner, infer_dataset


@dataclass
class Quality:
    """A variant's outputs against the original model's on the validation set."""

    accuracy: float | None
    top1_agreement: float | None
    cosine_mean: float
    cosine_min: float


@dataclass(frozen=True)
class Quiet:
    """Before timing, wait (at most `max_wait` seconds) until other processes take at most `max_others`
    of the machine's CPU; timing itself is deploytool.latency's, untouched."""

    max_others: float = 0.15
    max_wait: float = 45.0


@dataclass
class Timing:
    """One block-method measurement of several variants at one batch size, and the machine's state meanwhile."""

    batch: int
    measurement: Measurement
    others: float | None  # share of the machine's CPU other processes took while timing (None: unknown)
    waited: float  # seconds spent waiting for a quiet machine before timing
    quiet: bool  # False: the machine was still busy when the wait ran out
    controls: tuple[str, ...] = ()  # A/A copies: "<name> (A/A copy)" of each variant timed twice

    @property
    def rounds(self) -> int:
        return self.measurement.rounds

    @property
    def calls(self) -> int:
        """Timed calls per variant."""
        return min((len(t.samples_ms) for t in self.measurement.timed.values()), default=0)

    def timed(self, name: str) -> Timed | None:
        return self.measurement.timed.get(name)

    def speedup(self, baseline: str, candidate: str) -> Ratio | None:
        """baseline time / candidate time with its bootstrap interval; None where either was not timed."""
        if baseline not in self.measurement or candidate not in self.measurement:
            return None
        return self.measurement.speedup(baseline, candidate)

    def aa(self, name: str) -> Ratio | None:
        """The A/A control of `name`: its time over its copy's (1.00 within noise)."""
        return self.speedup(name, name + AA_SUFFIX)


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


def block_latency(runners: Sequence[Runner], feeds: Mapping[str, np.ndarray], plan: TimingPlan, batch: int,
                  quiet: Quiet = Quiet(), controls: Sequence[str] = ()) -> Timing:
    """Time `runners` with deploytool.latency.measure: the first one is the A/A control (timed a second
    time, as a runner of its own); each runner named in `controls` gets an A/A copy of its own too.

    Waits for a quiet machine first (within quiet.max_wait) and records what other processes took of
    the CPU while timing; it neither discards nor repeats anything."""
    if not runners:
        raise ValueError("nothing to time")
    extra = [Twin(r) for r in runners[1:] if r.name in controls]
    waited, calm = wait_for_quiet(quiet.max_others, quiet.max_wait)
    with other_load() as load:
        measurement = measure([*runners, *extra], feeds, plan, control=True)
    names = (runners[0].name, *(t.name.removesuffix(AA_SUFFIX) for t in extra))
    return Timing(batch, measurement, load.share, waited, calm, names)
