"""Run a deploytool recipe in a fresh process: its report (stage wall times) and the process's peak RSS.

A fresh process per recipe makes its RSS high-water mark that of the recipe alone. The
parent runs `python -m benchmarks.toolchain RECIPE OUT_DIR RESULT_JSON THREADS`; the child
writes its result as JSON, because the exporter and the stages may print to stdout.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# modules every recipe run imports; an import-only process gives the memory floor
HEAVY_MODULES = ("torch", "onnx", "onnxruntime", "onnxsim", "deploytool.pipeline")


@dataclass
class ToolchainRun:
    """One recipe run by deploytool: where its artifacts are, its report, and what it cost."""

    recipe_path: Path
    out_dir: Path
    report: dict[str, Any]
    peak_rss_bytes: int
    process_seconds: float

    @property
    def stage_seconds(self) -> dict[str, float | None]:
        """Wall time per stage from report["stages"]; None for a skipped stage."""
        return {s["name"]: (None if s["status"] == "skipped" else float(s["seconds"])) for s in self.report["stages"]}


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark.

    On Linux VmHWM, because ru_maxrss of a child carries its parent's peak across fork and
    exec; elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _child(argv: list[str], result_path: Path, cwd: Path) -> tuple[dict[str, Any], float]:
    """Run `python -m benchmarks.toolchain ARGV...`; returns the JSON it wrote and the process wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.toolchain", *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if not result_path.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the benchmark process for {argv[0]} exited with {done.returncode}: {last}")
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise RuntimeError(str(result["error"]))
    return result, seconds


def run_recipe_process(recipe_path: Path, out_dir: Path, threads: int, cwd: Path) -> ToolchainRun:
    """Run one recipe through deploytool's library in a child process and collect its costs."""
    with tempfile.TemporaryDirectory(prefix="bench-toolchain-") as folder:
        result_path = Path(folder) / "result.json"
        result, seconds = _child([str(recipe_path), str(out_dir), str(result_path), str(threads)], result_path, cwd)
    return ToolchainRun(recipe_path, out_dir, result["report"], int(result["peak_rss_bytes"]), seconds)


def import_floor_rss(cwd: Path) -> int:
    """Peak RSS of a process that only imports the heavy libraries a recipe run needs."""
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as folder:
        result_path = Path(folder) / "result.json"
        result, _ = _child(["--imports-only", str(result_path)], result_path, cwd)
    return int(result["peak_rss_bytes"])


def _run_recipe(recipe_path: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """The child's work: deploytool.recipe.load_recipe + deploytool.pipeline.run_recipe."""
    import torch

    from deploytool.errors import DeployError
    from deploytool.pipeline import run_recipe
    from deploytool.recipe import load_recipe

    torch.set_num_threads(threads)
    try:
        result = run_recipe(load_recipe(recipe_path), out_dir, force=True, use_cache=False)
    except DeployError as exc:
        return {"error": f"{type(exc).__name__}: {exc.message}"}
    report = json.loads((result.out_dir / "report.json").read_text(encoding="utf-8"))  # as written, every key
    return {"report": report, "peak_rss_bytes": peak_rss_bytes()}


def _imports_only() -> dict[str, Any]:
    import importlib

    for name in HEAVY_MODULES:
        importlib.import_module(name)
    return {"peak_rss_bytes": peak_rss_bytes()}


def main(argv: list[str]) -> int:
    """Child entry point: RECIPE OUT_DIR RESULT_JSON THREADS, or --imports-only RESULT_JSON."""
    if argv[:1] == ["--imports-only"]:
        result, result_path = _imports_only(), Path(argv[1])
    else:
        recipe, out_dir, result_path, threads = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
        result = _run_recipe(recipe, out_dir, threads)
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
