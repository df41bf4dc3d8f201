"""The benchmark harness times by deploytool.latency and renders every ratio with its interval (fast, no models)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from benchmarks.measure import Quality, Quiet, block_latency
from benchmarks.report import _verify_checks, render
from benchmarks.results import BenchResult, Comparison, Row, ToolchainEntry
from benchmarks.toolchain import ToolchainRun
from benchmarks.variants import Variant, run_rows
from deploytool.latency import AA_SUFFIX, TimingPlan
from deploytool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


class Busy:
    """A runner that does a fixed amount of numpy work per call."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.output_names = ["y"]
        self.matrix = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)

    def twin(self, name: str) -> Busy:
        copy = Busy(name, 1)
        copy.matrix = self.matrix
        return copy

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [self.matrix @ self.matrix]


PLAN = TimingPlan(rounds=6, block=3, block_warmup=1, warmup=2, max_rounds=6, max_seconds=5.0)
NO_WAIT = Quiet(max_others=1.0, max_wait=0.0)


def test_block_latency_times_every_runner_and_the_controls() -> None:
    fast, slow = Busy("ort fp32", 16), Busy("pytorch fp32", 96)
    timing = block_latency([fast, slow], {}, PLAN, 1, NO_WAIT, controls=("pytorch fp32",))
    names = set(timing.measurement.timed)
    assert names == {"ort fp32", "pytorch fp32", "ort fp32" + AA_SUFFIX, "pytorch fp32" + AA_SUFFIX}
    assert timing.controls == ("ort fp32", "pytorch fp32")
    assert timing.rounds == 6 and timing.calls >= 18  # fast runners get longer blocks
    ratio = timing.speedup("pytorch fp32", "ort fp32")
    assert ratio is not None and ratio.low <= ratio.value <= ratio.high and ratio.value > 1
    assert timing.aa("ort fp32") is not None
    assert timing.speedup("missing", "ort fp32") is None


def _variant(name: str, runner: Busy, source: str = "baseline", counterpart: str | None = None) -> Variant:
    return Variant(name, "test", runner, 1000, source, counterpart)  # type: ignore[arg-type]


def test_render_gives_intervals_aa_rows_and_the_verify_agreement(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes" / "digits-cnn.toml")
    names = run_rows(recipe.name)
    runners = {
        "pytorch fp32": Busy("pytorch fp32", 64),
        "ort fp32": Busy("ort fp32", 24),
        names["fp32"]: Busy(names["fp32"], 24),
        names["int8"]: Busy(names["int8"], 16),
    }
    variants = [
        _variant("pytorch fp32", runners["pytorch fp32"]),
        _variant("ort fp32", runners["ort fp32"]),
        _variant(names["fp32"], runners[names["fp32"]], "deploytool"),
        _variant(names["int8"], runners[names["int8"]], "deploytool", names["fp32"]),
    ]
    rows = [Row(v, Quality(0.99, 1.0, 1.0, 1.0)) for v in variants]
    ordered = [runners["ort fp32"], *(r for n, r in runners.items() if n != "ort fp32")]
    one = block_latency(ordered, {}, PLAN, 1, NO_WAIT, controls=("pytorch fp32",))
    many = block_latency(ordered, {}, PLAN, 4, NO_WAIT)
    for row in rows:
        row.latency, row.batch_latency = one.timed(row.name), many.timed(row.name)
    report = {
        "passed": True,
        "stages": [{"name": "verify", "status": "done", "seconds": 1.0}],
        "latency": {"aa": {"model": "reference", "value": 1.01, "ci": [0.97, 1.05]}},
        "metrics": {
            "reference": {"speedup": 1.0, "speedup_ci": [1.0, 1.0]},
            "fp32": {"speedup": 2.0, "speedup_ci": [1.8, 2.2], "speedup_vs_ort_fp32": 1.0, "speedup_vs_ort_fp32_ci": [1, 1]},
            "int8": {"speedup": 3.0, "speedup_ci": [2.7, 3.3], "speedup_vs_ort_fp32": 1.5,
                     "speedup_vs_ort_fp32_ci": [1.4, 1.6], "speedup_vs_fp32": 1.5, "speedup_vs_fp32_ci": [1.4, 1.6]},
        },
    }
    entry = ToolchainEntry(recipe, ToolchainRun(ROOT / "recipes" / "digits-cnn.toml", tmp_path, report, 2**29, 10.0))
    comparison = Comparison("Test", "val.npz", 10, "classification", [entry], rows, [], {1: one, 4: many}, 4)
    result = BenchResult(datetime.now(UTC), {"cpu": {"model": "cpu", "machine": "x86_64", "cores": 2, "isa": []},
                                             "versions": {"numpy": np.__version__}},
                         2, 4, PLAN, PLAN, NO_WAIT, [comparison], [entry], 2**28)

    checks = _verify_checks(result)
    labels = [c.label for c in checks]
    assert labels == ["A/A: `reference` over its copy", "`fp32` over `reference`", "`int8` over `reference`",
                      "`int8` over `fp32`"]
    assert all(c.measured is not None and c.difference is not None for c in checks)
    assert checks[-1].keys == "`speedup_vs_ort_fp32`, `speedup_vs_fp32`"

    text = render(result)
    assert "`ort fp32 (A/A copy)`" in text and "`pytorch fp32 (A/A copy)`" in text
    assert "A/A `ort fp32`" in text and "## deploytool's own verify against this benchmark" in text
    aa = one.aa("ort fp32")
    assert aa is not None and f"{aa.value:.2f}x [{aa.low:.2f}, {aa.high:.2f}]" in text
    assert "median of block means" in text and "allow_spinning = 0" in text and "bootstrap" in text
    speed = [line for line in text.splitlines() if line.startswith(f"| `{names['int8']}`") and "x [" in line]
    assert len(speed) == 1 and speed[0].count("x [") == 3  # every speed ratio in the table carries its interval


@pytest.mark.parametrize("value, words", [((1.5, 1.4, 1.6), "1.50x faster"), ((0.5, 0.45, 0.55), "2.00x slower"),
                                          ((1.02, 0.97, 1.06), "no difference resolved")])
def test_verdicts_carry_their_interval(value: tuple[float, float, float], words: str) -> None:
    from benchmarks.report import _verdict
    from deploytool.latency import Ratio

    text = _verdict(Ratio(*value))
    assert words in text and "[" in text


def test_verify_memory_watches_the_process_tree_and_reads_stage_times(tmp_path: Path) -> None:
    import sys

    from benchmarks.verify_memory import EfficientNetB0Like, mbconv_blocks, run_watched, stage_windows

    child = "import subprocess, sys, time; b = bytearray(60_000_000); " \
            "subprocess.run([sys.executable, '-c', 'import time; c = bytearray(40_000_000); time.sleep(0.6)'])"
    cost = run_watched([sys.executable, "-c", child], tmp_path, interval=0.02)
    assert cost.returncode == 0
    assert cost.watch.peak > 100_000_000  # parent and child together
    assert max(n for _, _, n in cost.watch.samples) == 2
    log = tmp_path / "run.log"
    log.write_text("2026-01-01 10:00:00,000 INFO deploytool: stage load: start\n"
                   "2026-01-01 10:00:02,500 INFO deploytool: stage load: done in 2.50s\n")
    (start, end), = stage_windows(log).values()
    assert end - start == pytest.approx(2.5)
    assert mbconv_blocks(EfficientNetB0Like(classes=10)) == 16
