"""Runs a recipe's stages in order into a run folder: timings, logging, errors, the report."""

from __future__ import annotations

import logging
import math
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool.artifacts import describe, write_text
from deploytool.errors import DeployError, StageError, UserError
from deploytool.progress import Progress, Silent
from deploytool.recipe import Recipe

log = logging.getLogger("deploytool")

# files that mark a folder as a run folder, so --force never empties anything else
RUN_MARKERS = ("report.json", "run.log", "recipe.resolved.toml")


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
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s: start", name)
        start = time.perf_counter()
        record = {"name": name, "status": "done", "seconds": 0.0}
        self.stages.append(record)
        try:
            yield
        except BaseException as exc:
            record["status"] = "failed"
            record["seconds"] = round(time.perf_counter() - start, 3)
            log.error("stage %s failed:\n%s", name, traceback.format_exc())
            if isinstance(exc, DeployError) or not isinstance(exc, Exception):
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(name, f"{type(exc).__name__}: {reason[:300]}", "the traceback is in run.log") from exc
        record["seconds"] = round(time.perf_counter() - start, 3)
        log.info("stage %s: done in %.2fs", name, record["seconds"])

    def skip(self, name: str) -> None:
        self.stages.append({"name": name, "status": "skipped", "seconds": 0.0})


def preflight(recipe: Recipe) -> None:
    """Cheap checks that need no heavy imports, so obvious mistakes fail before any work."""
    model = recipe.model
    if model.checkpoint is not None and not recipe.resolve(model.checkpoint).exists():
        raise UserError(f"checkpoint not found: {recipe.resolve(model.checkpoint)}", "check [model] checkpoint")
    for key in ("calibration", "validation"):
        value = getattr(recipe.data, key)
        if value is not None and not recipe.resolve(value).exists():
            raise UserError(f"{key} data not found: {recipe.resolve(value)}", f"check [data] {key}")
    if recipe.quantize is not None and recipe.quantize.mode == "static" and recipe.data.calibration is None:
        raise UserError("[quantize] mode = \"static\" needs [data] calibration", "add calibration data or use mode = \"dynamic\"")
    gates = recipe.verify.gates if recipe.verify else None
    if gates is not None and (gates.max_accuracy_drop is not None or gates.min_top1_agreement is not None):
        if recipe.data.task != "classification":
            raise UserError(f"accuracy and top-1 gates need [data] task = \"classification\" (it is \"{recipe.data.task}\")")
        if gates.max_accuracy_drop is not None and recipe.data.validation is None:
            raise UserError("gate max_accuracy_drop needs labelled [data] validation")


def prepare_out_dir(out_dir: Path, force: bool) -> bool:
    """Create the run folder; an existing non-empty one only with force, and only if it is a run folder.

    Returns True when this call created the folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise UserError(f"run folder {out_dir} already holds results", "pass --force to replace them, or choose another --out")
        if not any((out_dir / m).exists() for m in RUN_MARKERS):
            raise UserError(f"--force refused: {out_dir} is not a deploytool run folder", "choose an empty or new --out")
        shutil.rmtree(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to run folder {out_dir}: {exc.strerror or exc}") from None
    return created


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: such floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _onnx_params(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type in (1, 10, 11)))


def run_recipe(recipe: Recipe, out_dir: Path, force: bool = False, progress: Progress | None = None) -> RunResult:
    """Run every stage the recipe enables and write the report; gate failures do not raise."""
    preflight(recipe)
    created = prepare_out_dir(out_dir, force)
    handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("deploytool")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    run = _Run(recipe, out_dir, progress or Silent())
    try:
        write_text(out_dir / "recipe.resolved.toml", recipe.to_toml())
        report = _execute(run)
        return RunResult(out_dir, report)
    except UserError:
        handler.close()
        root.removeHandler(handler)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except DeployError:
        _write_failed_report(run)
        raise
    finally:
        handler.close()
        root.removeHandler(handler)


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
        write_reports(_finite(_base_report(run)), run.out_dir)
    except Exception:  # the original error matters more than a report about it
        log.exception("could not write the report of a failed run")


def _prune_and_distill(
    run: _Run | None, model: Any, calibration: Any, validation: Any, sample: Any, recipe: Recipe | None = None
) -> Any:
    """The PyTorch-side stages; returns the model to export. With run=None nothing is written (torchrun followers)."""
    from contextlib import nullcontext

    from deploytool.data import load_dataset

    recipe = run.recipe if run else recipe
    assert recipe is not None
    specs = recipe.model.inputs
    task = recipe.data.task
    stage = run.stage if run else (lambda name: nullcontext())
    final = model
    if recipe.prune:
        from deploytool.stages.prune import prune_model, save_model

        with stage("prune"):
            final, record = prune_model(model, specs, recipe.prune, calibration or validation or sample, task,
                                        run.progress if run else None)
            if run:
                save_model(final, run.out_dir / "pruned.safetensors")
                run.models["reference"]["macs"] = record.macs_before
                run.models["pruned"] = {**describe(run.out_dir / "pruned.safetensors"), "params": record.params_after,
                                        "macs": record.macs_after}
                run.details["prune"] = record.as_dict()
                run.notes.extend(record.notes)
    elif run:
        run.skip("prune")
    if recipe.distill:
        from deploytool.stages.distill import distill, finish_distributed
        from deploytool.stages.load import load_model

        cfg = recipe.distill
        with stage("distill"):
            train = load_dataset(recipe.resolve(cfg.train), specs, recipe.data.labels) if cfg.train else calibration
            val = load_dataset(recipe.resolve(cfg.validation), specs, recipe.data.labels) if cfg.validation else validation
            if train is None:
                raise UserError("[distill] needs training data", "set [distill] train or [data] calibration")
            student = final
            if cfg.student_factory:
                ckpt = recipe.resolve(cfg.student_checkpoint) if cfg.student_checkpoint else None
                student = load_model(cfg.student_factory, ckpt, recipe.base_dir)
            try:
                final, drecord = distill(model, student, specs, train, val or train, task, cfg, run.progress if run else None)
            finally:
                finish_distributed()
            if run:
                save_model(final, run.out_dir / "distilled.safetensors")
                run.models["distilled"] = {**describe(run.out_dir / "distilled.safetensors"),
                                           "params": sum(p.numel() for p in final.parameters())}
                run.details["distill"] = drecord.as_dict()
    elif run:
        run.skip("distill")
    return final


def follow_recipe(recipe: Recipe) -> None:
    """A non-zero torchrun rank: take part in distillation, write nothing."""
    from deploytool.data import load_dataset, random_dataset
    from deploytool.stages.load import load_model

    specs = recipe.model.inputs
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    model = load_model(recipe.model.factory, checkpoint, recipe.base_dir)
    calibration = load_dataset(recipe.resolve(recipe.data.calibration), specs, recipe.data.labels) if recipe.data.calibration else None
    validation = load_dataset(recipe.resolve(recipe.data.validation), specs, recipe.data.labels) if recipe.data.validation else None
    sample = (validation or calibration or random_dataset(specs, 2)).head(2)
    _prune_and_distill(None, model, calibration, validation, sample, recipe)


def _execute(run: _Run) -> dict[str, Any]:
    import torch

    from deploytool.data import Dataset, load_dataset, random_dataset
    from deploytool.stages.load import load_model

    recipe, out = run.recipe, run.out_dir
    specs, outputs = recipe.model.inputs, recipe.model.outputs
    with run.stage("load"):
        checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
        model = load_model(recipe.model.factory, checkpoint, recipe.base_dir)
        calibration = validation = None
        if recipe.data.calibration:
            calibration = load_dataset(recipe.resolve(recipe.data.calibration), specs, recipe.data.labels)
        if recipe.data.validation:
            validation = load_dataset(recipe.resolve(recipe.data.validation), specs, recipe.data.labels)
            if recipe.verify and recipe.verify.gates.max_accuracy_drop is not None and validation.labels is None:
                raise UserError(
                    f"{validation.source}: no '{recipe.data.labels}' array, but gate max_accuracy_drop needs labels"
                )
        from deploytool.stages.prune import count_macs

        example = tuple(torch.from_numpy(a[:1]) for a in (validation or calibration or random_dataset(specs, 1)).feeds.values())
        macs, params = count_macs(model, example)
        if checkpoint is not None:
            run.models["reference"] = {**describe(checkpoint), "params": params, "macs": macs}
        else:
            run.models["reference"] = {"path": None, "size_bytes": params * 4, "sha256": None, "params": params, "macs": macs}
    sample: Dataset = (validation or calibration or random_dataset(specs, 2)).head(2)
    final = _prune_and_distill(run, model, calibration, validation, sample)
    final_macs = macs if final is model else count_macs(final, example)[0]

    from deploytool.stages.export import export_onnx

    exported = out / "model.exported.onnx" if recipe.simplify and recipe.simplify.enabled else out / "model.onnx"
    with run.stage("export"):
        record = export_onnx(final, specs, outputs, recipe.export, sample, exported)
        unpruned = None
        if final is not model:  # the original in ONNX too, so pruning's effect on ORT latency is measured
            unpruned = out / "model.unpruned.onnx"
            export_onnx(model, specs, outputs, recipe.export, sample, unpruned)
        run.notes.extend(record.notes)
        run.details["export"] = {"exporter": record.exporter, "opset": record.opset, "max_abs_error": record.max_abs_error}

    fp32 = out / "model.onnx"
    if recipe.simplify and recipe.simplify.enabled:
        from deploytool.stages.simplify import simplify_onnx

        with run.stage("simplify"):
            simplified = simplify_onnx(exported, fp32, recipe.simplify, sample)
            exported.unlink()
            run.notes.extend(simplified.notes)
            run.details["simplify"] = {
                "simplified": simplified.simplified,
                "nodes_before": simplified.nodes_before,
                "nodes_after": simplified.nodes_after,
                "max_abs_error": simplified.max_abs_error,
            }
    else:
        run.skip("simplify")
    run.models["fp32"] = {**describe(fp32), "params": _onnx_params(fp32), "macs": final_macs}

    candidates = [("fp32", fp32)]
    if recipe.quantize and recipe.quantize.mode != "none":
        from deploytool.stages.quantize import quantize_onnx

        int8 = out / "model.int8.onnx"
        with run.stage("quantize"):
            batch = 16 if recipe.export.dynamic_batch else 1
            quantized = quantize_onnx(fp32, int8, recipe.quantize, calibration, batch)
            run.notes.extend(quantized.notes)
            run.details["quantization"] = {
                "mode": quantized.mode,
                "preprocess": quantized.preprocess,
                "calibration_samples": quantized.calibration_samples,
                **quantized.settings,
            }
        run.models["int8"] = describe(int8)
        candidates.append(("int8", int8))
    else:
        run.skip("quantize")

    report = _base_report(run)
    if recipe.verify:
        from deploytool.runners import OrtRunner, TorchRunner
        from deploytool.stages.verify import verify_models

        with run.stage("verify"):
            dataset = validation or calibration or random_dataset(specs, 64)
            if validation is None:
                run.notes.append(f"no validation data: verified on {dataset.source}")
            reference = TorchRunner("reference", model, [s.name for s in specs], outputs)
            runners = [OrtRunner(name, path, recipe.verify.threads) for name, path in candidates]
            extra = [OrtRunner("unpruned_fp32", unpruned, recipe.verify.threads)] if unpruned else []
            if unpruned:
                run.models["unpruned_fp32"] = describe(unpruned)
            sizes = {name: m["size_bytes"] for name, m in run.models.items()}
            result = verify_models(
                reference, runners, dataset, recipe.data.task, recipe.verify, sizes, run.progress, extra=extra
            )
            run.notes.extend(result.notes)
        fp32_p50 = result.metrics["fp32"].get("latency_ms", {}).get("p50")
        int8_p50 = result.metrics.get("int8", {}).get("latency_ms", {}).get("p50")
        if fp32_p50 and int8_p50:
            result.metrics["int8"]["speedup_vs_fp32"] = round(fp32_p50 / int8_p50, 4)
            if int8_p50 > fp32_p50:
                run.notes.append(
                    f"the int8 model is slower than the fp32 ONNX model on this CPU ({int8_p50:.3f} vs {fp32_p50:.3f} ms p50)"
                )
        report.update(
            metrics=result.metrics,
            gates=[g.as_dict() for g in result.gates],
            passed=result.passed,
            latency_batch=recipe.verify.latency_batch,
        )
    else:
        run.skip("verify")
        report["passed"] = True
        run.notes.append("no [verify] table: nothing was checked beyond export")

    from deploytool.stages.report import write_reports

    report = _finite(report)
    write_reports(report, out)
    return report
