"""The one latency method: blocks in shuffled order, an A/A control, intervals that decide speed gates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyModel

from deploytool.data import Dataset
from deploytool.latency import Ratio, Timer, TimingPlan, measure
from deploytool.runners import OrtRunner, TorchRunner
from deploytool.stages.load import load_model


def test_ratio_decides_only_outside_its_interval() -> None:
    assert Ratio(1.5, 1.4, 1.6).decide(1.0) is True
    assert Ratio(0.8, 0.7, 0.9).decide(1.0) is False
    assert Ratio(1.02, 0.97, 1.07).decide(1.0) is None  # within noise: neither pass nor fail yet
    assert Ratio(1.0, 1.0, 1.0).decide(1.0) is True


def test_plan_for_calls_has_enough_rounds_for_an_interval() -> None:
    plan = TimingPlan.for_calls(100, block=10)
    assert plan.rounds == 10 and plan.block == 10 and plan.max_rounds == 40
    small = TimingPlan.for_calls(3, block=10)
    assert small.block == 3 and small.rounds == 5


def test_aa_control_of_a_model_against_its_copy(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny.onnx, copy)
    feeds = next(val.batches(1))
    plan = TimingPlan.for_calls(300, block=20, warmup=20)
    measurement = measure([OrtRunner("model", tiny.onnx, 1), OrtRunner("copy", copy, 1)], feeds, plan)
    assert set(measurement.timed) == {"model", "copy", "model (A/A copy)"}
    assert all(len(t.blocks_ms) == plan.rounds and len(t.samples_ms) == plan.rounds * t.block
               for t in measurement.timed.values())
    ratio = measurement.speedup("model", "copy")
    assert ratio.low <= ratio.value <= ratio.high
    assert 0.75 < ratio.value < 1.33  # a byte-identical copy is neither faster nor slower (generous band: shared CI)
    aa = measurement.aa
    assert aa is not None and 0.75 < aa.value < 1.33 and measurement.noise is not None
    described = measurement.describe(1)
    assert described["method"] == "blocks" and described["spinning"] is False
    assert described["aa"]["model"] == "model"  # type: ignore[index]


def test_pytorch_and_onnx_runtime_in_their_own_blocks(tiny: TinyModel, val: Dataset) -> None:
    model = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    torch_runner = TorchRunner("torch", model, ["image"], ["logits"])
    feeds = next(val.batches(1))
    timer = Timer([torch_runner, OrtRunner("ort", tiny.onnx, 1)], feeds, TimingPlan(rounds=6, block=5, warmup=2))
    measurement = timer.run()
    assert measurement.rounds == 6
    # every block holds calls of one runner only, so a block's mean is that runner's alone
    for timed in measurement.timed.values():
        assert timed.block >= 1  # more calls per block for a fast model, fewer for a slow one
        assert np.allclose(timed.blocks_ms, np.asarray(timed.samples_ms).reshape(6, timed.block).mean(axis=1))
    more = timer.run(rounds=4)
    assert more.rounds == 10 and len(more.timed["ort"].blocks_ms) == 10


def test_slow_models_get_short_blocks_and_at_least_five_rounds(tiny: TinyModel, val: Dataset) -> None:
    import time as clock

    class Slow:
        name, output_names = "slow", ["logits"]

        def infer(self, feeds: dict) -> list:
            clock.sleep(0.03)
            return []

    timer = Timer([Slow(), OrtRunner("fast", tiny.onnx, 1)], next(val.batches(1)),
                  TimingPlan(rounds=20, block=10, warmup=2, block_seconds=0.05, max_seconds=0.01), control=False)
    measurement = timer.run()
    assert measurement.timed["slow"].block == 1 and measurement.timed["fast"].block >= 10
    assert measurement.rounds == 5  # the time bound is long spent, yet an interval needs rounds


def test_extending_stops_at_the_plans_bounds(tiny: TinyModel, val: Dataset) -> None:
    feeds = next(val.batches(1))
    timer = Timer([OrtRunner("a", tiny.onnx, 1)], feeds, TimingPlan(rounds=5, block=2, warmup=1, max_rounds=8), control=False)
    timer.run()
    timer.run(rounds=100)
    assert timer.rounds == 8 and timer.exhausted


def test_session_options_turn_spinning_off(tiny: TinyModel) -> None:
    runner = OrtRunner("a", tiny.onnx, 2)
    assert runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    twin = runner.twin("b")
    assert twin.session is not runner.session and twin.path == runner.path


@pytest.mark.parametrize("resamples", [200, 2000])
def test_bootstrap_interval_is_reproducible(resamples: int) -> None:
    from deploytool.latency import _bootstrap_ratio

    rng = np.random.default_rng(1)
    a, b = list(1.0 + 0.05 * rng.standard_normal(30)), list(0.5 + 0.02 * rng.standard_normal(30))
    plan = TimingPlan(resamples=resamples)
    first, second = _bootstrap_ratio(a, b, plan), _bootstrap_ratio(a, b, plan)
    assert first == second and 1.8 < first.value < 2.2 and first.low < first.value < first.high


class _Timings:
    """Timings whose speedup intervals and A/A control are given: the decision rule alone, without a clock."""

    def __init__(self, intervals: list[tuple[float, float, float]], aa: float | None) -> None:
        self.intervals, self.rounds, self.calls = intervals, 5, 0
        self.aa = None if aa is None else Ratio(aa, aa - 0.05, aa + 0.05)

    @property
    def exhausted(self) -> bool:
        return self.calls >= len(self.intervals) - 1

    def run(self, rounds: int | None = None) -> None:
        self.calls += 1
        self.rounds += rounds or 0

    def measurement(self) -> _Timings:
        return self

    def __contains__(self, name: str) -> bool:
        return True

    @property
    def noise(self) -> float | None:
        return None if self.aa is None else 0.05

    def speedup(self, baseline: str, model: str) -> Ratio:
        return Ratio(*self.intervals[min(self.calls, len(self.intervals) - 1)])


def test_undecided_speed_gates_stop_timing_once_within_one_percent_of_the_threshold() -> None:
    from deploytool.stages.verify import _SpeedCheck, decide_speed

    check = _SpeedCheck("min_speedup_vs_fp32", "int8", "fp32", 1.0, True)
    # straddles 1.0 but wider than 1%: timed on until the plan is spent, then failed as within the noise
    wide = _Timings([(1.0, 0.97, 1.03), (1.0, 0.98, 1.02), (1.0, 0.985, 1.015)], aa=1.0)
    notes: list[str] = []
    gate = decide_speed([check], wide, notes)[0]  # type: ignore[arg-type]
    assert wide.calls == 2 and not gate.passed and "time longer" in notes[0]
    # within 1% of 1.0: timing stops at once, and the note says why
    close = _Timings([(1.0, 0.995, 1.008), (1.0, 0.99, 1.01)], aa=1.002)
    notes = []
    gate = decide_speed([check], close, notes)[0]  # type: ignore[arg-type]
    assert close.calls == 0 and not gate.passed and "within 1.0% of the threshold" in notes[0]
    # the A/A control's own offset widens the band: two copies differing by 3% make a 2% difference meaningless
    offset = _Timings([(1.0, 0.98, 1.02), (1.0, 0.99, 1.01)], aa=1.03)
    decide_speed([check], offset, [])  # type: ignore[arg-type]
    assert offset.calls == 0
    # wider than the band but heading below the threshold: timed on until decided
    slower = _Timings([(0.97, 0.90, 1.04), (0.97, 0.94, 1.01), (0.97, 0.95, 0.99)], aa=1.0)
    gate = decide_speed([check], slower, [])[0]  # type: ignore[arg-type]
    assert slower.calls == 2 and not gate.passed and gate.interval == [0.95, 0.99]
    # no A/A control: the 1% band alone
    bare = _Timings([(1.0, 0.995, 1.005)], aa=None)
    decide_speed([check], bare, [])  # type: ignore[arg-type]
    assert bare.calls == 0
