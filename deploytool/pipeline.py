"""Runs a recipe: the stage table, and the loop that does timing, logging, error wrapping and skipping once for every
stage, then writes the report. A stage's own work (and its cache key) is in deploytool.wiring."""

from __future__ import annotations

import logging
import shutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploytool import wiring
from deploytool.cache import StageCache
from deploytool.context import RunContext
from deploytool.data import is_callable_source
from deploytool.errors import DeployError, StageError, UserError, first_line, signal_received
from deploytool.progress import Progress, Silent
from deploytool.recipe import Recipe
from deploytool.report_schema import Report
from deploytool.runfolder import CACHE_DIR, RUN_MARKER, check_out_dir, inside, prepare_out_dir
from deploytool.stages.report import json_safe

log = logging.getLogger("deploytool")


@dataclass(frozen=True)
class Stage:
    """One entry of the stage table. `follower`: a torchrun follower (rank > 0) runs it too, writing nothing."""

    name: str
    run: Callable[[RunContext], None]
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    follower: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("load", wiring.load, follower=True),
    Stage("prune", wiring.prune, lambda r: r.prune is not None, follower=True),
    Stage("distill", wiring.distill, lambda r: r.distill is not None, follower=True),
    Stage("export", wiring.export),
    Stage("simplify", wiring.simplify, lambda r: r.simplify is not None and r.simplify.enabled),
    Stage("quantize", wiring.quantize, lambda r: r.quantize is not None and r.quantize.mode != "none"),
    Stage("verify", wiring.verify, lambda r: r.verify is not None),
)


def run_stages(ctx: RunContext, stages: Sequence[Stage] = STAGES) -> None:
    """Each enabled stage in order, timed, logged and recorded (a disabled one is recorded as skipped); a follower
    runs only the stages it takes part in."""
    for stage in stages:
        if not ctx.writing and not stage.follower:
            continue
        if not stage.enabled(ctx.recipe):
            ctx.skip(stage.name)
            continue
        with ctx.stage(stage.name):
            stage.run(ctx)


@dataclass
class RunResult:
    """Where a run wrote its results, and its report (as written to report.json, typed)."""

    out_dir: Path
    report: Report

    @property
    def passed(self) -> bool:
        return self.report.passed


def preflight(recipe: Recipe) -> None:
    """Cheap checks that need no heavy imports, so obvious mistakes fail before any work."""
    model = recipe.model
    if model.checkpoint is not None and not recipe.resolve(model.checkpoint).exists():
        raise UserError(f"checkpoint not found: {recipe.resolve(model.checkpoint)}", "check [model] checkpoint")
    if model.onnx is not None and not recipe.resolve(model.onnx).is_file():
        raise UserError(f"ONNX model not found: {recipe.resolve(model.onnx)}", "check [model] onnx")
    paths = [("[data] calibration", recipe.data.calibration), ("[data] validation", recipe.data.validation)]
    if recipe.distill:
        paths += [("[distill] train", recipe.distill.train), ("[distill] validation", recipe.distill.validation),
                  ("[distill] student_checkpoint", recipe.distill.student_checkpoint)]
    for key, value in paths:
        if value is not None and not is_callable_source(value) and not recipe.resolve(value).exists():
            raise UserError(f"{key} not found: {recipe.resolve(value)}", f"check {key}")
    if recipe.quantize is not None and recipe.quantize.mode == "static" and recipe.data.calibration is None:
        raise UserError("[quantize] mode = \"static\" needs [data] calibration", "add calibration data or use mode = \"dynamic\"")
    if recipe.distill and recipe.distill.train is None and recipe.data.calibration is None:
        raise UserError("[distill] needs training data", "set [distill] train or [data] calibration")
    gates = recipe.verify.gates if recipe.verify else None
    if gates is not None and (gates.max_accuracy_drop is not None or gates.min_top1_agreement is not None):
        if recipe.data.task != "classification":
            raise UserError(f"accuracy and top-1 gates need [data] task = \"classification\" (it is \"{recipe.data.task}\")")
        if gates.max_accuracy_drop is not None and recipe.data.validation is None:
            raise UserError("gate max_accuracy_drop needs labelled [data] validation")


def run_recipe(
    recipe: Recipe, out_dir: Path, force: bool = False, progress: Progress | None = None, use_cache: bool = True,
    junit: Path | None = None, stages: Sequence[Stage] = STAGES,
) -> RunResult:
    """Run every stage the recipe enables (of `stages`) and write the report (and JUnit XML to `junit`); gate failures
    do not raise.

    The run folder is locked for the run. A run that fails or is interrupted (SIGINT, SIGTERM) leaves a
    report that does not pass and a folder that the same call resumes."""
    from contextlib import ExitStack

    from deploytool.artifacts import recording, write_text

    preflight(recipe)
    from deploytool.stages.inspect import recipe_io

    recipe = recipe_io(recipe)  # a [model] onnx file's inputs and outputs
    check_out_dir(recipe, out_dir)
    if junit is not None and junit.is_dir():
        raise UserError(f"--junit {junit} is a folder", "give the path of the XML file to write")
    folder, created, previous = prepare_out_dir(out_dir, force)
    root = logging.getLogger("deploytool")
    handler: logging.Handler | None = None
    run: RunContext | None = None

    def close_log() -> None:
        nonlocal handler
        if handler is not None:
            handler.close()
            root.removeHandler(handler)
            handler = None

    with ExitStack() as stack:
        stack.callback(folder.release)
        stack.callback(close_log)
        # the run's log goes to run.log (and, with --debug, to stderr): not to handlers a library may give the root
        # logger on the way (ONNX Runtime's quantization modules call logging.basicConfig), which would print it
        stack.callback(setattr, root, "propagate", root.propagate)
        root.propagate = False
        stack.enter_context(recording(folder.record))
        try:
            if junit is not None and inside(junit, out_dir) and (junit.exists() or junit.is_symlink()):
                raise UserError(f"--junit {junit} exists and was not written by a deploytool run", "choose another file name")
            folder.record(out_dir / "run.log")
            handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
            root.setLevel(logging.DEBUG)
            if previous:
                log.info("run folder %s holds a previous run: %s", out_dir, "replacing its results" if force else "resuming it")
            if use_cache:
                folder.record(out_dir / CACHE_DIR)
            run = RunContext(recipe, out_dir, progress or Silent(), StageCache(out_dir / CACHE_DIR) if use_cache else None)
            write_text(out_dir / "recipe.resolved.toml", recipe.absolute().to_toml())
            report = _execute(run, stages)
            if junit is not None:
                from deploytool.junit import write_junit

                write_junit(junit, recipe.name, [g.model_dump() for g in report.gates], sum(s.seconds for s in report.stages))
            folder.finish("finished")
            return RunResult(out_dir, report)
        except UserError:
            close_log()
            if created:  # a folder this call made: remove it whole
                shutil.rmtree(out_dir, ignore_errors=True)
            elif not previous:  # a folder that was empty: empty it again
                folder.remove(keep=())
                (out_dir / RUN_MARKER).unlink(missing_ok=True)
            else:
                folder.finish("failed")
            raise
        except BaseException as exc:
            # SIGINT (KeyboardInterrupt), SIGTERM (Terminated), or an error a signal caused: keep what finished, resumable
            interrupted = signal_received() or (None if isinstance(exc, Exception) else
                                                "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM")
            if isinstance(exc, Exception) and not isinstance(exc, DeployError):  # outside any stage, e.g. writing the report
                log.error("run failed:\n%s", traceback.format_exc())
            if interrupted:
                log.warning("run interrupted (%s)", interrupted)
            if run is not None:
                if interrupted:
                    run.notes.append(f"the run was interrupted ({interrupted}) before it finished; run the same command again to resume")
                _write_failed_report(run)
            folder.finish("interrupted" if interrupted else "failed")
            if isinstance(exc, Exception) and not isinstance(exc, DeployError):
                raise StageError("run", f"{type(exc).__name__}: {first_line(exc)}", "the traceback is in run.log") from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover



def _base_report(run: RunContext) -> dict[str, Any]:
    from deploytool.stages.report import environment

    return {
        "name": run.recipe.name,
        "passed": False,
        "gates": [],
        "models": run.models,
        "metrics": {},
        "stages": run.stages,
        "environment": environment(run.recipe.verify.threads if run.recipe.verify else None),
        "notes": run.notes,
        **run.details,
    }


def _write_failed_report(run: RunContext) -> None:
    from deploytool.stages.report import write_reports

    try:
        write_reports(json_safe(_base_report(run)), run.folder)
    except Exception:  # the original error matters more than a report about it
        log.exception("could not write the report of a failed run")


def follow_recipe(recipe: Recipe, stages: Sequence[Stage] = STAGES) -> None:
    """A non-zero torchrun rank: take part in distillation, write nothing."""
    run_stages(RunContext(recipe, None), stages)


def stages_named(*names: str) -> tuple[Stage, ...]:
    """The stages of the table with these names, in the table's order: what a stand-alone command runs."""
    unknown = set(names) - {stage.name for stage in STAGES}
    assert not unknown, f"no such stage: {unknown}"
    return tuple(stage for stage in STAGES if stage.name in names)


def _execute(run: RunContext, stages: Sequence[Stage] = STAGES) -> Report:
    from deploytool.stages.report import write_reports

    run_stages(run, stages)
    report = _base_report(run)
    if run.verification is not None:
        report.update(run.verification)
    else:
        report["passed"] = True
        if any(stage.name == "verify" for stage in stages):
            run.notes.append("no [verify] table: nothing was checked beyond export")
    return write_reports(report, run.folder)  # checked against the report schema there
