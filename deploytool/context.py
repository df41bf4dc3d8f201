"""What the stages of a run share: the recipe, the run folder, the artifacts handed from stage to stage, and the
records the report is built from. The pipeline's loop owns the timing, logging, error wrapping and caching."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool.cache import StageCache, stage_key
from deploytool.errors import DeployError, StageError, first_line
from deploytool.progress import Progress, Silent
from deploytool.recipe import Recipe

log = logging.getLogger("deploytool")


@dataclass
class Inputs:
    """What the PyTorch-side stages start from, and the hashes cache keys are built on."""

    model: Any
    calibration: Any
    validation: Any
    sample: Any
    hashes: dict[str, str | None]
    notes: list[str] = field(default_factory=list)  # what loading the checkpoint unwrapped or stripped


@dataclass
class RunContext:
    """One run of a recipe. `out_dir` is None for a torchrun follower: it takes part in distillation and writes nothing
    (no files, no cache, no stage records)."""

    recipe: Recipe
    out_dir: Path | None
    progress: Progress = field(default_factory=Silent)
    cache: StageCache | None = None
    # what the report is built from
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    # the artifacts handed from stage to stage
    start: Inputs | None = None
    model: Any = None  # the PyTorch model to export (pruned and distilled when those stages ran)
    identity: dict[str, str | None] = field(default_factory=dict)  # hashes that identify `model`
    example: tuple[Any, ...] = ()
    macs: int | None = None  # of the original model
    final_macs: int | None = None  # of the model exported
    exported: Path | None = None  # the export stage's file (simplify's input)
    unpruned: Path | None = None  # the original model in ONNX, when pruning or distillation changed it
    candidates: list[tuple[str, Path]] = field(default_factory=list)  # ONNX models to verify: fp32 first
    _record: dict[str, Any] = field(default_factory=dict)

    @property
    def writing(self) -> bool:
        return self.out_dir is not None

    @property
    def folder(self) -> Path:
        assert self.out_dir is not None, "a follower writes nothing"
        return self.out_dir

    @property
    def inputs(self) -> Inputs:
        assert self.start is not None, "the load stage runs first"
        return self.start

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time, log and record one stage; an unexpected exception becomes a StageError naming it (exit 3)."""
        if not self.writing:
            self._record = {"name": name}
            yield self._record
            return
        log.info("stage %s: start", name)
        start = time.perf_counter()
        record: dict[str, Any] = {"name": name, "status": "done", "seconds": 0.0}
        self.stages.append(record)
        self._record = record
        try:
            yield record
        except BaseException as exc:
            record["status"] = "failed"
            record["seconds"] = round(time.perf_counter() - start, 3)
            log.error("stage %s failed:\n%s", name, traceback.format_exc())
            if isinstance(exc, StageError) and exc.hint is None:
                exc.hint = "the details are in run.log"
            if isinstance(exc, DeployError):
                record["error"] = exc.message
                raise
            if not isinstance(exc, Exception):
                record["error"] = f"interrupted ({type(exc).__name__})"
                raise
            error = StageError(name, f"{type(exc).__name__}: {first_line(exc)[:300]}", "the traceback is in run.log")
            record["error"] = error.message
            raise error from exc
        record["seconds"] = round(time.perf_counter() - start, 3)
        log.info("stage %s: %s in %.2fs", name, record["status"], record["seconds"])

    def cached(self, config: Any, inputs: dict[str, str | None], outputs: Sequence[Path], compute: Callable[[], dict[str, Any]],
               main: bool = True) -> dict[str, Any]:
        """compute() through the stage cache under the current stage's name; a hit marks the stage 'cached' (unless
        this is a side output, main=False)."""
        if self.cache is None or not self.writing:
            return compute()
        name = self._record["name"]
        result, hit = self.cache.run(name, stage_key(name, config, inputs), outputs, compute)
        if hit and main:
            self._record["status"] = "cached"
        return result

    def skip(self, name: str) -> None:
        if self.writing:
            self.stages.append({"name": name, "status": "skipped", "seconds": 0.0})
