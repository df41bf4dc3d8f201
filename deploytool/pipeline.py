"""Runs a recipe's stages in order into a run folder: caching, timings, logging, errors, the report."""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool.artifacts import describe, sha256
from deploytool.cache import StageCache, content_hash, stage_key
from deploytool.data import is_callable_source
from deploytool.errors import DeployError, StageError, UserError, first_line, signal_received
from deploytool.progress import Progress, Silent
from deploytool.recipe import Recipe, VerifyConfig
from deploytool.stages.report import json_safe

log = logging.getLogger("deploytool")

# The marker only deploytool writes: what makes a folder a run folder (never common file names such as
# run.log), with the state of the run and every file it wrote, so that --force removes those and nothing else.
RUN_MARKER = ".deploytool-run.json"
MARKER_FORMAT = 1
CACHE_DIR = ".cache"
REPORT_FILES = ("report.json", "report.md", "report.html")


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report["gates"] if not g["passed"]]


@dataclass
class _Run:
    recipe: Recipe
    out_dir: Path
    progress: Progress
    cache: StageCache | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        log.info("stage %s: start", name)
        start = time.perf_counter()
        record: dict[str, Any] = {"name": name, "status": "done", "seconds": 0.0}
        self.stages.append(record)
        try:
            yield record
        except BaseException as exc:
            record["status"] = "failed"
            record["seconds"] = round(time.perf_counter() - start, 3)
            log.error("stage %s failed:\n%s", name, traceback.format_exc())
            if isinstance(exc, StageError) and exc.hint is None:
                exc.hint = "the details are in run.log"
            if isinstance(exc, DeployError) or not isinstance(exc, Exception):
                raise
            reason = first_line(exc)
            raise StageError(name, f"{type(exc).__name__}: {reason[:300]}", "the traceback is in run.log") from exc
        record["seconds"] = round(time.perf_counter() - start, 3)
        log.info("stage %s: %s in %.2fs", name, record["status"], record["seconds"])

    def cached(
        self, stage: str, record: dict[str, Any], config: Any, inputs: dict[str, str | None], outputs: Sequence[Path],
        compute: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """compute() through the stage cache; marks the stage record 'cached' on a hit."""
        if self.cache is None:
            return compute()
        result, hit = self.cache.run(stage, stage_key(stage, config, inputs), outputs, compute)
        if hit:
            record["status"] = "cached"
        return result

    def skip(self, name: str) -> None:
        self.stages.append({"name": name, "status": "skipped", "seconds": 0.0})


def preflight(recipe: Recipe) -> None:
    """Cheap checks that need no heavy imports, so obvious mistakes fail before any work."""
    model = recipe.model
    if model.checkpoint is not None and not recipe.resolve(model.checkpoint).exists():
        raise UserError(f"checkpoint not found: {recipe.resolve(model.checkpoint)}", "check [model] checkpoint")
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


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The run folder's marker, or None when the folder holds none (it is then not a run folder)."""
    path = out_dir / RUN_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"run folder {out_dir}: its marker {RUN_MARKER} is unreadable ({exc})",
                        "delete the folder yourself if it holds nothing you need, or choose another --out") from None
    if not isinstance(marker, dict) or marker.get("tool") != "deploytool" or not isinstance(marker.get("files"), list):
        raise UserError(f"run folder {out_dir}: {RUN_MARKER} is not a deploytool run marker", "choose another --out")
    if not isinstance(marker.get("format"), int) or marker["format"] > MARKER_FORMAT:
        raise UserError(f"run folder {out_dir} was written by a newer deploytool (marker format {marker.get('format')})",
                        "use that version, or choose another --out")
    return marker


def _resumable(out_dir: Path) -> bool:
    """A run folder whose run did not finish (killed, interrupted, or a stage failed) is resumed without --force."""
    marker = read_marker(out_dir)
    return marker is not None and marker.get("state") != "finished"


class RunFolder:
    """A run folder held by this process: a lock for the run's duration, and the marker listing what the run wrote.

    The marker is updated before each file is written, so that even a killed run leaves a folder whose
    own files are known."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: list[str] = []
        self.state = "running"
        self._lock: int | None = None

    def lock(self) -> None:
        """An exclusive lock on the folder itself (nothing is written for it); a second run gets exit 2."""
        import fcntl
        import os

        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (json.loads((self.path / RUN_MARKER).read_text(encoding="utf-8")) or {}).get("pid")
            except (OSError, ValueError, AttributeError):
                holder = None
            who = f"another deploytool run (pid {holder})" if holder else "another deploytool run"
            raise UserError(f"run folder {self.path} is in use by {who}",
                            "wait for it to finish, or choose another --out") from None
        self._lock = fd

    def release(self) -> None:
        import os

        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def record(self, path: Path) -> None:
        """Note that the run writes `path` (when it lies inside the folder), before it is written."""
        import os

        try:
            name = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return  # outside the run folder, e.g. a --junit file elsewhere
        if name not in (".", RUN_MARKER) and name not in self.files:
            self.files.append(name)
            self.save()

    def save(self) -> None:
        """Write the marker atomically (the first write into a folder, so it doubles as the write check)."""
        import os
        import tempfile

        from deploytool import __version__

        marker = {"tool": "deploytool", "format": MARKER_FORMAT, "version": __version__, "state": self.state,
                  "pid": os.getpid(), "files": self.files}
        fd, tmp = tempfile.mkstemp(prefix=f"{RUN_MARKER}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(marker, fh, indent=1)
            os.replace(tmp, self.path / RUN_MARKER)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def finish(self, state: str) -> None:
        """Record how the run ended; never raises (the run's own outcome matters more)."""
        self.state = state
        try:
            self.save()
        except OSError:
            log.exception("could not update the run folder marker")

    def remove(self, keep: Sequence[str]) -> None:
        """Delete the files the previous run wrote (reports first), except `keep`; nothing else is touched."""
        ordered = [n for n in REPORT_FILES if n in self.files] + [n for n in self.files if n not in REPORT_FILES]
        for name in ordered:
            if name in keep:
                continue
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            for partial in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed run
                partial.unlink(missing_ok=True)
            parent = target.parent
            while parent != self.path and self.path in parent.parents and not any(parent.iterdir()):
                parent.rmdir()  # a sub-folder the run created for a file, now empty
                parent = parent.parent
            self.files.remove(name)
            self.save()
        for stale in self.path.glob(f"{RUN_MARKER}.*.tmp"):
            stale.unlink(missing_ok=True)


def check_out_dir(recipe: Recipe, out_dir: Path) -> None:
    """--out may not be the current folder (or hold it), nor the recipe's folder or a folder that holds its inputs."""
    import os

    out = Path(os.path.abspath(out_dir)).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(f"--out {out_dir} is the current folder{'' if out == cwd else ' or holds it'}",
                        "give the run a folder of its own, e.g. --out runs/" + recipe.name)
    inputs: list[tuple[str, str | None]] = [("the recipe's folder", str(recipe.base_dir)),
                                            ("[model] checkpoint", recipe.model.checkpoint),
                                            ("[model] factory", _file_of(recipe.model.factory)),
                                            ("[data] calibration", recipe.data.calibration),
                                            ("[data] validation", recipe.data.validation)]
    if recipe.distill:
        inputs += [("[distill] train", recipe.distill.train), ("[distill] validation", recipe.distill.validation),
                   ("[distill] student_checkpoint", recipe.distill.student_checkpoint),
                   ("[distill] student_factory", _file_of(recipe.distill.student_factory))]
    for key, value in inputs:
        if value is None or (is_callable_source(value) and not recipe.resolve(value).exists()):
            continue
        path = recipe.resolve(value).resolve()
        if out == path or out in path.parents:
            what = key if key.startswith("the ") else f"{key} ({path})"
            raise UserError(f"--out {out_dir} is or holds {what}: a run folder may not contain the run's own inputs",
                            "choose a folder of its own, e.g. --out runs/" + recipe.name)


def _file_of(spec: str | None) -> str | None:
    """The file of a 'path/file.py:callable' spec (None for a module:callable)."""
    if spec is None:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") else None


def prepare_out_dir(out_dir: Path, force: bool) -> tuple[RunFolder, bool, bool]:
    """Lock the run folder and make it ready: (folder, created by this call, held a previous run).

    Only a new or empty folder, or one whose marker says it holds a deploytool run, is used. A finished
    run is replaced only with force, and then only the files its marker lists are deleted (its stage
    cache is kept); an interrupted or failed run is resumed (its cache and run.log are kept). Files
    the marker does not list are never touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to run folder {out_dir}: {exc.strerror or exc}") from None
    folder = RunFolder(out_dir)
    folder.lock()
    try:
        marker = read_marker(out_dir)
        if marker is None and any(out_dir.iterdir()):
            raise UserError(f"{out_dir} is not empty and holds no deploytool run",
                            "a run writes only into a new or empty folder, or one that holds a previous run: choose another --out")
        if marker is not None and marker.get("state") == "finished" and not force:
            raise UserError(f"run folder {out_dir} already holds results",
                            "pass --force to replace them (only the files that run wrote), or choose another --out")
        folder.files = [str(n) for n in marker["files"]] if marker else []
        try:
            folder.save()  # before anything is deleted: a folder that cannot be written is left as it is
        except OSError as exc:
            raise UserError(f"cannot write to run folder {out_dir}: {exc.strerror or exc}") from None
        if marker is not None:
            resume = marker.get("state") != "finished" and not force
            try:
                folder.remove(keep=(CACHE_DIR, "run.log") if resume else (CACHE_DIR,))
            except OSError as exc:
                raise UserError(f"cannot clear the previous run's files in {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        folder.release()
        raise
    return folder, created, marker is not None


def _onnx_params(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type in (1, 10, 11)))


def run_recipe(
    recipe: Recipe, out_dir: Path, force: bool = False, progress: Progress | None = None, use_cache: bool = True,
    junit: Path | None = None,
) -> RunResult:
    """Run every stage the recipe enables and write the report (and JUnit XML to `junit`); gate failures do not raise.

    The run folder is locked for the run. A run that fails or is interrupted (SIGINT, SIGTERM) leaves a
    report that does not pass and a folder that the same call resumes."""
    from contextlib import ExitStack

    from deploytool.artifacts import recording, write_text

    preflight(recipe)
    check_out_dir(recipe, out_dir)
    if junit is not None and junit.is_dir():
        raise UserError(f"--junit {junit} is a folder", "give the path of the XML file to write")
    folder, created, previous = prepare_out_dir(out_dir, force)
    root = logging.getLogger("deploytool")
    handler: logging.Handler | None = None
    run: _Run | None = None

    def close_log() -> None:
        nonlocal handler
        if handler is not None:
            handler.close()
            root.removeHandler(handler)
            handler = None

    with ExitStack() as stack:
        stack.callback(folder.release)
        stack.callback(close_log)
        stack.enter_context(recording(folder.record))
        try:
            if junit is not None and _inside(junit, out_dir) and (junit.exists() or junit.is_symlink()):
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
            run = _Run(recipe, out_dir, progress or Silent(), StageCache(out_dir / CACHE_DIR) if use_cache else None)
            write_text(out_dir / "recipe.resolved.toml", recipe.absolute().to_toml())
            report = _execute(run)
            if junit is not None:
                from deploytool.junit import write_junit

                write_junit(junit, recipe.name, report["gates"], sum(s["seconds"] for s in report["stages"]))
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


def _inside(path: Path, folder: Path) -> bool:
    import os

    return Path(os.path.abspath(folder)) in Path(os.path.abspath(path)).parents


def _base_report(run: _Run) -> dict[str, Any]:
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


def _write_failed_report(run: _Run) -> None:
    from deploytool.stages.report import write_reports

    try:
        write_reports(json_safe(_base_report(run)), run.out_dir)
    except Exception:  # the original error matters more than a report about it
        log.exception("could not write the report of a failed run")


def data_source(recipe: Recipe, value: str) -> Any:
    """A recipe's data entry loaded: a path relative to the recipe, or a module:callable."""
    from deploytool.data import load_dataset

    source: Path | str = value if is_callable_source(value) and not recipe.resolve(value).exists() else recipe.resolve(value)
    return load_dataset(source, recipe.model.inputs, recipe.data.labels, recipe.data.image, recipe.base_dir)


def source_hash(recipe: Recipe, value: str | None) -> str | None:
    """What identifies a data entry for the stage cache: its files' contents, or a callable's source file."""
    if value is None:
        return None
    if is_callable_source(value) and not recipe.resolve(value).exists():
        from deploytool.factory import resolve_factory

        source = inspect.getsourcefile(resolve_factory(value, recipe.base_dir, "data callable"))
        return f"{value}@{sha256(Path(source)) if source else 'unknown'}"
    return content_hash(recipe.resolve(value))


@dataclass
class _Inputs:
    """What the PyTorch-side stages start from, and the hashes cache keys are built on."""

    model: Any
    calibration: Any
    validation: Any
    sample: Any
    hashes: dict[str, str | None]
    notes: list[str] = field(default_factory=list)  # what loading the checkpoint unwrapped or stripped


def _load(recipe: Recipe) -> _Inputs:
    from deploytool.data import random_dataset
    from deploytool.factory import resolve_factory
    from deploytool.stages.load import load_model

    specs = recipe.model.inputs
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    notes: list[str] = []
    model = load_model(recipe.model.factory, checkpoint, recipe.base_dir, recipe.model.trust_checkpoint,
                       recipe.model.factory_args, notes)
    if recipe.model.trust_checkpoint:
        log.warning("trust_checkpoint is set: %s was unpickled without restrictions", checkpoint)
    calibration = validation = None
    if recipe.data.calibration:
        calibration = data_source(recipe, recipe.data.calibration)
    if recipe.data.validation:
        validation = data_source(recipe, recipe.data.validation)
        if recipe.verify and recipe.verify.gates.max_accuracy_drop is not None and validation.labels is None:
            raise UserError(f"{validation.source}: no '{recipe.data.labels}' array, but gate max_accuracy_drop needs labels")
    sample = (validation or calibration or random_dataset(specs, 2)).head(2)
    source = inspect.getsourcefile(resolve_factory(recipe.model.factory, recipe.base_dir))
    hashes = {
        "model": recipe.model.model_dump_json(),
        "checkpoint": sha256(checkpoint) if checkpoint else None,
        "factory_source": sha256(Path(source)) if source and Path(source).is_file() else None,
        "calibration": source_hash(recipe, recipe.data.calibration),
        "validation": source_hash(recipe, recipe.data.validation),
        "image": recipe.data.image.model_dump_json() if recipe.data.image else None,
        "labels": recipe.data.labels,
        "task": recipe.data.task,
    }
    return _Inputs(model, calibration, validation, sample, hashes, notes)


def _prune_and_distill(run: _Run | None, recipe: Recipe, start: _Inputs) -> tuple[Any, dict[str, str | None]]:
    """The PyTorch-side stages: (model to export, hashes that identify it). With run=None nothing is
    written and nothing is cached (a torchrun follower that only takes part in distillation)."""
    from contextlib import AbstractContextManager, nullcontext

    from deploytool.stages.load import load_model

    specs, task = recipe.model.inputs, recipe.data.task

    def no_stage(name: str) -> AbstractContextManager[dict[str, Any]]:
        return nullcontext({})

    stage: Callable[[str], AbstractContextManager[dict[str, Any]]] = run.stage if run else no_stage
    final, identity = start.model, dict(start.hashes)
    prune_cfg = recipe.prune
    if prune_cfg:
        from deploytool.checkpoint import save_model
        from deploytool.stages.prune import LatencyContext, prune_model

        with stage("prune") as record:
            data = start.calibration or start.validation or start.sample
            timing = recipe.verify or VerifyConfig()
            latency = LatencyContext(recipe.model.outputs, recipe.export, timing.latency_batch, timing.threads)
            if run is None:
                final, _ = prune_model(start.model, specs, prune_cfg, data, task, latency=latency)
            else:
                path = run.out_dir / "pruned.safetensors"

                def compute() -> dict[str, Any]:
                    pruned, result = prune_model(start.model, specs, prune_cfg, data, task, run.progress, latency)
                    save_model(pruned, path)
                    return result.as_dict()

                details = run.cached("prune", record, prune_cfg.model_dump(), identity, [path], compute)
                final = load_model(recipe.model.factory, path, recipe.base_dir, factory_args=recipe.model.factory_args)
                identity = {**identity, "pruned": sha256(path)}
                run.models["reference"]["macs"] = details.get("macs_before")
                run.models["pruned"] = {**describe(path), "params": details["params_after"], "macs": details.get("macs_after")}
                run.details["prune"] = details
                run.notes.extend(details.get("notes", []))
    elif run:
        run.skip("prune")
    if recipe.distill:
        from deploytool.checkpoint import save_model
        from deploytool.stages.distill import distill, finish_distributed, world

        cfg = recipe.distill
        with stage("distill") as record:
            train = data_source(recipe, cfg.train) if cfg.train else start.calibration
            val = data_source(recipe, cfg.validation) if cfg.validation else start.validation
            student = final
            student_checkpoint = recipe.resolve(cfg.student_checkpoint) if cfg.student_checkpoint else None
            if cfg.student_factory or student_checkpoint:  # a student of its own (by default the model's factory)
                student = load_model(cfg.student_factory or recipe.model.factory, student_checkpoint, recipe.base_dir,
                                     factory_args=None if cfg.student_factory else recipe.model.factory_args)
            distilled = run.out_dir / "distilled.safetensors" if run else None
            trained: list[Any] = []

            def compute() -> dict[str, Any]:
                try:
                    model, result = distill(start.model, student, specs, train, val or train, task, cfg,
                                            run.progress if run else None)
                finally:
                    finish_distributed()
                trained.append(model)
                if distilled is not None:
                    save_model(model, distilled)
                return result.as_dict()

            if run is None:
                compute()
                return trained[0], identity
            student_source = inspect.getsourcefile(type(student))
            inputs = {**identity, "teacher": start.hashes["checkpoint"], "world_size": str(world()[1]),
                      "student_checkpoint": sha256(student_checkpoint) if student_checkpoint else None,
                      "student_source": sha256(Path(student_source)) if student_source else None,
                      "train": source_hash(recipe, cfg.train) if cfg.train else start.hashes["calibration"],
                      "val": source_hash(recipe, cfg.validation) if cfg.validation else start.hashes["validation"]}
            assert distilled is not None
            # a data-parallel run must not skip training while the other ranks wait for it
            details = compute() if world()[1] > 1 else run.cached("distill", record, cfg.model_dump(), inputs, [distilled], compute)
            final = trained[0] if trained else load_model(
                cfg.student_factory or recipe.model.factory, distilled, recipe.base_dir,
                factory_args=None if cfg.student_factory else recipe.model.factory_args)
            identity = {**identity, "distilled": sha256(distilled)}
            run.models["distilled"] = {**describe(distilled), "params": sum(p.numel() for p in final.parameters())}
            run.details["distill"] = details
    elif run:
        run.skip("distill")
    return final, identity


def follow_recipe(recipe: Recipe) -> None:
    """A non-zero torchrun rank: take part in distillation, write nothing."""
    _prune_and_distill(None, recipe, _load(recipe))


def _execute(run: _Run) -> dict[str, Any]:
    import torch

    from deploytool.stages.prune import count_macs

    recipe, out = run.recipe, run.out_dir
    specs, outputs = recipe.model.inputs, recipe.model.outputs
    with run.stage("load"):
        start = _load(recipe)
        run.notes.extend(start.notes)
        example = tuple(torch.from_numpy(start.sample.feeds[s.name][:1]) for s in specs)
        macs, params = count_macs(start.model, example)
        checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
        reference = describe(checkpoint) if checkpoint else {"path": None, "size_bytes": params * 4, "sha256": None}
        run.models["reference"] = {**reference, "params": params, "macs": macs}

    final, identity = _prune_and_distill(run, recipe, start)
    final_macs = macs if final is start.model else count_macs(final, example)[0]

    from deploytool.stages.export import export_onnx

    simplify = recipe.simplify is not None and recipe.simplify.enabled
    exported = out / "model.exported.onnx" if simplify else out / "model.onnx"
    unpruned = out / "model.unpruned.onnx" if final is not start.model else None
    sample_hash = source_hash(recipe, recipe.data.validation or recipe.data.calibration) or "random"
    with run.stage("export") as record:
        def export(model: Any, path: Path) -> Callable[[], dict[str, Any]]:
            return lambda: export_onnx(model, specs, outputs, recipe.export, start.sample, path).as_dict()

        config = {"export": recipe.export.model_dump(), "outputs": outputs, "sample": sample_hash}
        details = run.cached("export", record, {**config, "file": exported.name}, identity, [exported], export(final, exported))
        if unpruned is not None:  # the original in ONNX too, so pruning's effect on ORT latency is measured
            run.cached("export", {}, {**config, "file": unpruned.name}, start.hashes, [unpruned], export(start.model, unpruned))
        run.notes.extend(details.get("notes", []))
        run.details["export"] = {k: v for k, v in details.items() if k != "notes"}

    fp32 = out / "model.onnx"
    if simplify:
        from deploytool.stages.simplify import simplify_onnx

        assert recipe.simplify is not None
        with run.stage("simplify") as record:
            details = run.cached(
                "simplify", record, recipe.simplify.model_dump(), {"model": sha256(exported), "sample": sample_hash},
                [fp32], lambda: simplify_onnx(exported, fp32, recipe.simplify, start.sample).as_dict(),  # type: ignore[arg-type]
            )
            exported.unlink()
            run.notes.extend(details.get("notes", []))
            run.details["simplify"] = {k: v for k, v in details.items() if k != "notes"}
    else:
        run.skip("simplify")
    run.models["fp32"] = {**describe(fp32), "params": _onnx_params(fp32), "macs": final_macs}

    candidates = [("fp32", fp32)]
    if recipe.quantize and recipe.quantize.mode != "none":
        from deploytool.hardware import cpu_info
        from deploytool.stages.quantize import Targets, quantize_onnx

        int8 = out / "model.int8.onnx"
        with run.stage("quantize") as record:
            batch = 16 if recipe.export.dynamic_batch else 1
            cfg = recipe.quantize
            gates = recipe.verify.gates if recipe.verify else None
            # the searches aim at what the verify stage will gate: for a classifier that includes top-1 agreement
            # with the fp32 model (a default gate), and the SNR gate when one is named
            from deploytool.gates import DEFAULT_MIN_SPEEDUP_VS_FLOAT, DEFAULT_MIN_TOP1_AGREEMENT

            defaults = recipe.verify is not None and recipe.verify.default_gates
            top1 = gates.min_top1_agreement if gates and gates.min_top1_agreement is not None else (
                DEFAULT_MIN_TOP1_AGREEMENT if defaults and recipe.data.task == "classification" else None)
            targets = Targets(
                min_cosine=cfg.min_cosine or (gates.min_cosine if gates and gates.min_cosine else 0.99),
                max_accuracy_drop=cfg.max_accuracy_drop if cfg.max_accuracy_drop is not None
                else (gates.max_accuracy_drop if gates else None),
                min_top1_agreement=top1,
                **({"min_snr_db": gates.min_snr_db} if gates and gates.min_snr_db is not None else {}),
                min_speedup=gates.min_speedup_vs_fp32 if gates and gates.min_speedup_vs_fp32 is not None else (
                    DEFAULT_MIN_SPEEDUP_VS_FLOAT if defaults else None),
            )
            threads = recipe.verify.threads if recipe.verify else 2
            evaluation = start.validation or start.calibration
            inputs = {**start.hashes, "model": sha256(fp32), "isa": ",".join(cpu_info()["isa"]),  # type: ignore[arg-type]
                      "targets": str(targets), "threads": str(threads)}
            details = run.cached(
                "quantize", record, cfg.model_dump(), inputs, [int8],
                lambda: quantize_onnx(fp32, int8, cfg, start.calibration, batch, evaluation, targets, threads, run.progress).as_dict(),
            )
            run.notes.extend(details.get("notes", []))
            run.details["quantization"] = {k: v for k, v in details.items() if k != "notes"}
        run.models["int8"] = describe(int8)
        candidates.append(("int8", int8))
    else:
        run.skip("quantize")

    report = _base_report(run)
    if recipe.verify:
        report.update(_verify(run, start, candidates, unpruned))
    else:
        run.skip("verify")
        report["passed"] = True
        run.notes.append("no [verify] table: nothing was checked beyond export")

    from deploytool.stages.report import write_reports

    report = json_safe(report)
    write_reports(report, out)
    return report


def _verify(run: _Run, start: _Inputs, candidates: list[tuple[str, Path]], unpruned: Path | None) -> dict[str, Any]:
    """The verify stage of a run: metrics and gates, golden outputs, where int8 loses accuracy."""
    from deploytool.data import random_dataset
    from deploytool.runners import TorchRunner
    from deploytool.stages.verify import CandidateFile, verify_and_explain

    recipe = run.recipe
    assert recipe.verify is not None
    specs, outputs = recipe.model.inputs, recipe.model.outputs
    with run.stage("verify"):
        dataset = start.validation or start.calibration or random_dataset(specs, 64)
        if start.validation is None:
            run.notes.append(f"no validation data: verified on {dataset.source}")
        extra = [("unpruned_fp32", unpruned)] if unpruned else []
        for name, path in extra:
            run.models[name] = describe(path)
        reference = TorchRunner("reference", start.model, [s.name for s in specs], outputs)
        sizes = {name: m["size_bytes"] for name, m in run.models.items()}
        changed = recipe.prune is not None or recipe.distill is not None
        files = [CandidateFile(name, path, "quantized" if name == "int8" else ("lossy" if changed else "equivalent"),
                               "fp32" if name == "int8" else None) for name, path in candidates]
        # the int8 model against the fp32 one it was made from: where does quantization hurt most?
        pairs = [("int8", candidates[0][1], candidates[1][1])] if len(candidates) > 1 else []
        golden = run.out_dir / "golden.npz"
        fragment = verify_and_explain(reference, files, dataset, recipe.data.task, recipe.verify, sizes,
                                      run.progress, extra, pairs, always_localize=True, golden=golden,
                                      ort_baseline="unpruned_fp32" if unpruned else "fp32", speed_gate="min_speedup_vs_fp32")
        run.models["golden"] = describe(golden)
        run.notes.extend(fragment.pop("notes"))  # type: ignore[arg-type]
    metrics: dict[str, Any] = fragment["metrics"]  # type: ignore[assignment]
    ratio, interval = metrics.get("int8", {}).get("speedup_vs_fp32"), metrics.get("int8", {}).get("speedup_vs_fp32_ci")
    if ratio is not None and interval and interval[1] < 1.0:
        run.notes.append(f"the int8 model is slower than the fp32 ONNX model on this CPU (speedup {ratio:.3f}x, "
                         f"interval [{interval[0]:.3f}, {interval[1]:.3f}])")
    chosen = recommend(fragment, candidates)
    fragment["recommended"] = chosen
    run.notes.append(f"recommended artifact: {chosen['file']} ({chosen['why']})" if chosen["model"] else
                     f"no artifact to recommend: {chosen['why']}")
    return fragment


def recommend(fragment: dict[str, Any], candidates: list[tuple[str, Path]]) -> dict[str, Any]:
    """The model of a run to ship: among its ONNX models (fp32, int8; pruned or not) whose every gate passed, the
    fastest at the latency batch by the verify stage's measurement. The report's `recommended`."""
    gates: list[dict[str, Any]] = fragment["gates"]  # type: ignore[assignment]
    metrics: dict[str, Any] = fragment["metrics"]  # type: ignore[assignment]
    files = {name: path.name for name, path in candidates}
    passing = [name for name in files if all(g["passed"] for g in gates if g["model"] == name)]
    if not passing:
        failed = sorted({g["model"] for g in gates if not g["passed"]})
        return {"model": None, "file": None, "why": f"every model fails a gate ({', '.join(failed)})"}

    def p50(name: str) -> float:
        latency = metrics.get(name, {}).get("latency_ms") or {}
        return float(latency.get("p50") or math.inf)

    best = min(passing, key=lambda name: (p50(name), name != "fp32"))  # equal or unmeasured: the float model
    others = [f"{name} {p50(name):.3f} ms" for name in passing if name != best and math.isfinite(p50(name))]
    speed = metrics.get(best, {}).get("speedup_vs_ort_fp32")
    why = (f"passes its gates and is the fastest that does: {p50(best):.3f} ms p50" if math.isfinite(p50(best))
           else "passes its gates (not timed)")
    if others:
        why += f" (vs {', '.join(others)})"
    if speed is not None:
        why += f", {float(speed):.2f}x the original's ONNX Runtime fp32 export"
    failing = [name for name in files if name not in passing]
    if failing:
        why += f"; {', '.join(failing)} fail(s) a gate"
    return {"model": best, "file": files[best], "latency_ms": p50(best) if math.isfinite(p50(best)) else None,
            "speedup_vs_ort_fp32": speed, "why": why}
