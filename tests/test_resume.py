"""Resumable and reproducible runs: a run killed mid-way reuses its finished stages and ends with
the same artifacts; the same recipe and inputs give byte-identical ONNX files and the same metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRUNED = ROOT / "recipes" / "digits-cnn-pruned.toml"
# few timed calls and no default gates (their speed gate needs longer timing): these tests are about artifacts
FAST = ["--set", "distill.epochs=2", "--set", "verify.runs=5", "--set", "verify.memory=false",
        "--set", "verify.default_gates=false"]

ARTIFACTS = ("pruned.safetensors", "distilled.safetensors", "model.onnx", "model.int8.onnx", "model.unpruned.onnx")


def deploytool(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploytool", *args]


def non_timing(report: dict) -> dict:
    """The metrics that must not change between runs: everything but latencies, speed-ups and memory."""
    drop = {"latency_ms", "throughput_per_s", "throughput", "peak_memory_bytes"}
    return {name: {k: v for k, v in m.items() if k not in drop and not k.startswith("speedup")}
            for name, m in report["metrics"].items()}


def hashes(folder: Path) -> dict[str, str]:
    from deploytool.artifacts import sha256

    return {name: sha256(folder / name) for name in ARTIFACTS}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    done = subprocess.run(deploytool("run", str(PRUNED), "--out", str(out), "--no-cache", *FAST), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_rerun_is_byte_identical(clean_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    done = subprocess.run(deploytool("run", str(PRUNED), "--out", str(out), "--no-cache", *FAST), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert hashes(out) == hashes(clean_run)
    first = json.loads((clean_run / "report.json").read_text())
    second = json.loads((out / "report.json").read_text())
    assert non_timing(first) == non_timing(second)
    assert first["gates"] and [g["name"] for g in first["gates"]] == [g["name"] for g in second["gates"]]


def test_killed_run_resumes_from_finished_stages(clean_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    process = subprocess.Popen(deploytool("run", str(PRUNED), "--out", str(out), *FAST), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill it once pruning is cached, while distillation runs
    deadline = time.monotonic() + 240
    while not list((out / ".cache" / "prune").glob("*/record.json")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "pruning never finished"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "report.json").exists()
    assert not list(out.glob("*.partial")), "a half-written artifact was left behind"

    done = subprocess.run(deploytool("run", str(PRUNED), "--out", str(out), *FAST), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status["prune"] == "cached"
    assert status["distill"] in ("done", "cached")
    assert hashes(out) == hashes(clean_run)

    # a forced rerun replaces the results but reuses every cached stage
    again = subprocess.run(deploytool("run", str(PRUNED), "--out", str(out), "--force", *FAST), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    status = {s["name"]: s["status"] for s in json.loads((out / "report.json").read_text())["stages"]}
    assert [status[s] for s in ("prune", "distill", "export", "simplify", "quantize")] == ["cached"] * 5
    assert status["verify"] == "done"
    assert hashes(out) == hashes(clean_run)


def test_finished_run_is_not_overwritten_without_force(clean_run: Path) -> None:
    before = (clean_run / "report.json").read_bytes()
    done = subprocess.run(deploytool("run", str(PRUNED), "--out", str(clean_run), *FAST), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "already holds results" in done.stderr and "--force" in done.stderr
    assert "Traceback" not in done.stderr
    assert (clean_run / "report.json").read_bytes() == before


def test_a_change_to_deploytool_itself_invalidates_the_cached_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage key covers deploytool's own source as well as its version: code changed under the same version
    number (a source checkout) does not reuse results the old code cached."""
    from deploytool import cache

    digest = cache.source_digest()
    assert len(digest) == 16 and digest == cache.source_digest()
    before = cache.stage_key("quantize", {"mode": "static"}, {"model": "abc"})
    monkeypatch.setattr(cache, "source_digest", lambda: "0" * 16)
    assert cache.stage_key("quantize", {"mode": "static"}, {"model": "abc"}) != before
