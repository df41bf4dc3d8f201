"""The stages as the pipeline calls them: each takes the run's context, reads its own recipe table and the artifacts
earlier stages left in the context, calls its stage module, and leaves its own artifacts and record there. What
every stage needs done (timing, logging, error wrapping, skipping) is the pipeline's loop."""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any

from deploytool.artifacts import describe, sha256
from deploytool.context import Inputs, RunContext
from deploytool.data import data_source, source_hash
from deploytool.errors import UserError, first_line
from deploytool.recipe import Recipe

log = logging.getLogger("deploytool")

UNPRUNED_INT8 = "unpruned_int8"  # the original quantized as it is: an alternative a budget run may ship


def _load_model(recipe: Recipe, notes: list[str]) -> tuple[Any, Path | None, str | None]:
    """The PyTorch model (None for an ONNX one), its checkpoint and the hash of the file that defines it."""
    from deploytool.factory import resolve_factory
    from deploytool.stages.load import load_model

    if recipe.model.onnx is not None:
        return None, None, sha256(recipe.resolve(recipe.model.onnx))
    assert recipe.model.factory is not None
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    model = load_model(recipe.model.factory, checkpoint, recipe.base_dir, recipe.model.trust_checkpoint,
                       recipe.model.factory_args, notes)
    if recipe.model.trust_checkpoint:
        log.warning("trust_checkpoint is set: %s was unpickled without restrictions", checkpoint)
    source = inspect.getsourcefile(resolve_factory(recipe.model.factory, recipe.base_dir))
    return model, checkpoint, sha256(Path(source)) if source and Path(source).is_file() else None


def load_inputs(recipe: Recipe) -> Inputs:
    """The model, its data, a two-sample example and the hashes that identify them."""
    from deploytool.data import random_dataset

    specs = recipe.model.inputs
    notes: list[str] = []
    model, checkpoint, source = _load_model(recipe, notes)
    calibration = validation = None
    if recipe.data.calibration:
        calibration = data_source(recipe, recipe.data.calibration)
    if recipe.data.validation:
        validation = data_source(recipe, recipe.data.validation)
        if recipe.verify and recipe.verify.gates.max_accuracy_drop is not None and validation.labels is None:
            raise UserError(f"{validation.source}: no '{recipe.data.labels}' array, but gate max_accuracy_drop needs labels")
    sample = (validation or calibration or random_dataset(specs, 2)).head(2)
    hashes = {
        "model": recipe.model.model_dump_json(),
        "checkpoint": sha256(checkpoint) if checkpoint else None,
        "factory_source": source,
        "calibration": source_hash(recipe, recipe.data.calibration),
        "validation": source_hash(recipe, recipe.data.validation),
        "image": recipe.data.image.model_dump_json() if recipe.data.image else None,
        "labels": recipe.data.labels,
        "task": recipe.data.task,
    }
    return Inputs(model, calibration, validation, sample, hashes, notes)


def _factory(recipe: Recipe) -> str:
    """The factory of a PyTorch model (the stages that change a model need one; a recipe with onnx has none)."""
    assert recipe.model.factory is not None, "prune and distill need a PyTorch model"
    return recipe.model.factory


def load(ctx: RunContext) -> None:
    ctx.start = start = load_inputs(ctx.recipe)
    ctx.model, ctx.identity = start.model, dict(start.hashes)
    if not ctx.writing:
        return
    import torch

    from deploytool.stages.prune import count_macs

    recipe = ctx.recipe
    ctx.notes.extend(start.notes)
    if recipe.model.onnx is not None:
        source = recipe.resolve(recipe.model.onnx)
        ctx.models["reference"] = {**describe(source), "params": _onnx_params(source), "macs": None}
        if recipe.verify is not None:
            ctx.notes.append(f"the model is the ONNX file {source}: the run starts from it and verifies against it")
        return
    ctx.example = tuple(torch.from_numpy(start.sample.feeds[s.name][:1]) for s in recipe.model.inputs)
    ctx.macs, params = count_macs(start.model, ctx.example)
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    reference = describe(checkpoint) if checkpoint else {"path": None, "size_bytes": params * 4, "sha256": None}
    ctx.models["reference"] = {**reference, "params": params, "macs": ctx.macs}


def prune(ctx: RunContext) -> None:
    from deploytool.checkpoint import save_model
    from deploytool.data import random_dataset
    from deploytool.recipe import VerifyConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import LatencyContext, prune_model

    recipe, start = ctx.recipe, ctx.inputs
    cfg = recipe.prune
    assert cfg is not None
    data = start.calibration or start.validation or random_dataset(recipe.model.inputs, 32)
    timing = recipe.verify or VerifyConfig()
    latency = LatencyContext(recipe.model.outputs, recipe.export, timing.latency_batch, timing.threads)
    specs, task = recipe.model.inputs, recipe.data.task
    if not ctx.writing:
        ctx.model, _ = prune_model(start.model, specs, cfg, data, task, latency=latency)
        return
    path = ctx.folder / "pruned.safetensors"

    def compute() -> dict[str, Any]:
        pruned, result = prune_model(start.model, specs, cfg, data, task, ctx.progress, latency)
        save_model(pruned, path)
        return result.as_dict()

    details = ctx.cached(cfg.model_dump(), ctx.identity, [path], compute)
    ctx.model = load_model(_factory(recipe), path, recipe.base_dir, factory_args=recipe.model.factory_args)
    ctx.identity = {**ctx.identity, "pruned": sha256(path)}
    ctx.models["reference"]["macs"] = details.get("macs_before")
    ctx.models["pruned"] = {**describe(path), "params": details["params_after"], "macs": details.get("macs_after")}
    ctx.details["prune"] = details
    ctx.notes.extend(details.get("notes", []))


def distill(ctx: RunContext) -> None:
    from deploytool.checkpoint import save_model
    from deploytool.stages.distill import distill as distill_model
    from deploytool.stages.distill import finish_distributed, world
    from deploytool.stages.load import load_model

    recipe, start = ctx.recipe, ctx.inputs
    cfg = recipe.distill
    assert cfg is not None
    train = data_source(recipe, cfg.train) if cfg.train else start.calibration
    val = data_source(recipe, cfg.validation) if cfg.validation else start.validation
    student = ctx.model
    student_checkpoint = recipe.resolve(cfg.student_checkpoint) if cfg.student_checkpoint else None
    student_args = recipe.model.factory_args if cfg.student_factory in (None, recipe.model.factory) else None
    if cfg.student_factory or student_checkpoint:  # a student of its own (by default the model's factory)
        student = load_model(cfg.student_factory or _factory(recipe), student_checkpoint, recipe.base_dir,
                             factory_args=student_args)
    distilled = ctx.folder / "distilled.safetensors" if ctx.writing else None
    trained: list[Any] = []

    def compute() -> dict[str, Any]:
        try:
            model, result = distill_model(start.model, student, recipe.model.inputs, train, val or train, recipe.data.task, cfg,
                                          ctx.progress if ctx.writing else None)
        finally:
            finish_distributed()
        trained.append(model)
        if distilled is not None:
            save_model(model, distilled)
        return result.as_dict()

    if distilled is None:
        compute()
        ctx.model = trained[0]
        return
    student_source = inspect.getsourcefile(type(student))
    inputs = {**ctx.identity, "teacher": start.hashes["checkpoint"], "world_size": str(world()[1]),
              "student_checkpoint": sha256(student_checkpoint) if student_checkpoint else None,
              "student_source": sha256(Path(student_source)) if student_source else None,
              "train": source_hash(recipe, cfg.train) if cfg.train else start.hashes["calibration"],
              "val": source_hash(recipe, cfg.validation) if cfg.validation else start.hashes["validation"]}
    # a data-parallel run must not skip training while the other ranks wait for it
    details = compute() if world()[1] > 1 else ctx.cached(cfg.model_dump(), inputs, [distilled], compute)
    ctx.model = trained[0] if trained else load_model(cfg.student_factory or _factory(recipe), distilled, recipe.base_dir,
                                                      factory_args=student_args)
    ctx.identity = {**ctx.identity, "distilled": sha256(distilled)}
    ctx.models["distilled"] = {**describe(distilled), "params": sum(p.numel() for p in ctx.model.parameters())}
    ctx.details["distill"] = details


def _sample_hash(recipe: Recipe) -> str:
    return source_hash(recipe, recipe.data.validation or recipe.data.calibration) or "random"


def export(ctx: RunContext) -> None:
    """model.onnx (model.exported.onnx when simplify follows), and model.unpruned.onnx when the model was changed: the
    original in ONNX too, so that pruning's effect on ONNX Runtime latency is measured. A [model] onnx file is copied."""
    from deploytool.stages.export import export_onnx

    recipe, start, out = ctx.recipe, ctx.inputs, ctx.folder
    simplify = recipe.simplify is not None and recipe.simplify.enabled
    ctx.exported = out / "model.exported.onnx" if simplify else out / "model.onnx"
    if recipe.model.onnx is not None:
        _copy_onnx(recipe.resolve(recipe.model.onnx), ctx.exported)
        ctx.details["export"] = {"exporter": "none (the recipe's ONNX file)", "source": str(recipe.resolve(recipe.model.onnx))}
        return None if simplify else _fp32(ctx)
    ctx.unpruned = out / "model.unpruned.onnx" if ctx.model is not start.model else None
    if ctx.model is not start.model:
        from deploytool.stages.prune import count_macs

        ctx.final_macs = count_macs(ctx.model, ctx.example)[0]
    else:
        ctx.final_macs = ctx.macs

    def run(model: Any, path: Path) -> Any:
        return lambda: export_onnx(model, recipe.model.inputs, recipe.model.outputs, recipe.export, start.sample, path).as_dict()

    config = {"export": recipe.export.model_dump(), "outputs": recipe.model.outputs, "sample": _sample_hash(recipe)}
    details = ctx.cached({**config, "file": ctx.exported.name}, ctx.identity, [ctx.exported], run(ctx.model, ctx.exported))
    if ctx.unpruned is not None:
        ctx.cached({**config, "file": ctx.unpruned.name}, start.hashes, [ctx.unpruned], run(start.model, ctx.unpruned), main=False)
    ctx.notes.extend(details.get("notes", []))
    ctx.details["export"] = {k: v for k, v in details.items() if k != "notes"}
    if not simplify:
        _fp32(ctx)


def simplify(ctx: RunContext) -> None:
    """model.onnx from the exported file, which is then deleted."""
    from deploytool.stages.simplify import simplify_onnx

    cfg, exported, fp32 = ctx.recipe.simplify, ctx.exported, ctx.folder / "model.onnx"
    assert cfg is not None and exported is not None
    details = ctx.cached(cfg.model_dump(), {"model": sha256(exported), "sample": _sample_hash(ctx.recipe)}, [fp32],
                         lambda: simplify_onnx(exported, fp32, cfg, ctx.inputs.sample).as_dict())
    exported.unlink()
    ctx.notes.extend(details.get("notes", []))
    ctx.details["simplify"] = {k: v for k, v in details.items() if k != "notes"}
    _fp32(ctx)


def _copy_onnx(source: Path, target: Path) -> None:
    """An ONNX file copied into the run folder, with any external weights it refers to brought inside."""
    import onnx

    from deploytool.stages.inspect import read_onnx

    model = read_onnx(source)  # loads external data too
    large = model.ByteSize() > 2**31 - 2**26  # protobuf's 2 GB limit: keep the weights beside the graph
    onnx.save_model(model, str(target), save_as_external_data=large, location=f"{target.name}.data")


def _onnx_params(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type in (1, 10, 11)))


def _fp32(ctx: RunContext) -> None:
    """The float ONNX model is final: describe it and make it the first candidate."""
    fp32 = ctx.folder / "model.onnx"
    ctx.models["fp32"] = {**describe(fp32), "params": _onnx_params(fp32), "macs": ctx.final_macs}
    ctx.candidates = [("fp32", fp32)]


def quantize(ctx: RunContext) -> None:
    """model.int8.onnx from model.onnx; its searches aim at the targets the recipe resolved from the gates."""
    from deploytool.hardware import cpu_info
    from deploytool.stages.quantize import Targets, quantize_onnx

    start, cfg = ctx.inputs, ctx.recipe.quantize
    assert cfg is not None and cfg.min_cosine is not None and cfg.threads is not None and cfg.calibration_batch is not None
    fp32, int8 = ctx.candidates[0][1], ctx.folder / "model.int8.onnx"
    targets = Targets(min_cosine=cfg.min_cosine, max_accuracy_drop=cfg.max_accuracy_drop,
                      min_top1_agreement=cfg.min_top1_agreement, min_snr_db=cfg.min_snr_db, min_speedup=cfg.min_speedup)
    batch, threads = cfg.calibration_batch, cfg.threads
    evaluation = start.validation or start.calibration
    isa = ",".join(cpu_info()["isa"])  # type: ignore[arg-type]

    def quantized(source: Path, target: Path, main: bool = True) -> dict[str, Any]:
        """target from source through the stage cache (the targets and threads are part of the [quantize] table, and
        so of its cache key): the quantization record, notes included."""
        return ctx.cached(
            cfg.model_dump(), {**start.hashes, "model": sha256(source), "isa": isa}, [target],
            lambda: quantize_onnx(source, target, cfg, start.calibration, batch, evaluation, targets, threads,
                                  ctx.progress).as_dict(),
            main=main,
        )

    details = quantized(fp32, int8)
    ctx.notes.extend(details.get("notes", []))
    ctx.details["quantization"] = {k: v for k, v in details.items() if k != "notes"}
    ctx.models["int8"] = describe(int8)
    ctx.candidates.append(("int8", int8))
    if cfg.unpruned and ctx.unpruned is not None:
        # the original quantized as it is: would int8 alone have done what pruning was asked to?
        alternative = ctx.folder / "model.unpruned.int8.onnx"
        try:
            side = quantized(ctx.unpruned, alternative, main=False)
        except Exception as exc:  # an alternative to compare with: its failure must not take the run's own models
            log.exception("the unpruned int8 model could not be made")
            alternative.unlink(missing_ok=True)
            ctx.notes.append(f"unpruned int8: not made ({type(exc).__name__}: {first_line(exc)}); the run goes on without it")
            return
        ctx.notes.extend(f"unpruned int8: {note}" for note in side.get("notes", []))
        ctx.details["quantization"]["unpruned"] = {k: v for k, v in side.items() if k != "notes"}
        ctx.models[UNPRUNED_INT8] = describe(alternative)
        ctx.candidates.append((UNPRUNED_INT8, alternative))


def verify(ctx: RunContext) -> None:
    """Metrics and gates, golden outputs, where int8 loses accuracy, and the artifact to ship."""
    from deploytool.data import random_dataset
    from deploytool.runners import TorchRunner
    from deploytool.stages.verify import CandidateFile, verify_and_explain

    recipe, start, candidates, unpruned = ctx.recipe, ctx.inputs, ctx.candidates, ctx.unpruned
    assert recipe.verify is not None
    specs, outputs = recipe.model.inputs, recipe.model.outputs
    dataset = start.validation or start.calibration or random_dataset(specs, 64)
    if start.validation is None:
        ctx.notes.append(f"no validation data: verified on {dataset.source}")
    extra = [("unpruned_fp32", unpruned)] if unpruned else []
    for name, path in extra:
        ctx.models[name] = describe(path)
    if recipe.model.onnx is not None:
        from deploytool.runners import OrtRunner

        reference: Any = OrtRunner("reference", recipe.resolve(recipe.model.onnx), recipe.verify.threads, user_file=True)
    else:
        reference = TorchRunner("reference", start.model, [s.name for s in specs], outputs)
    sizes = {name: m["size_bytes"] for name, m in ctx.models.items()}
    changed = recipe.prune is not None or recipe.distill is not None
    bases = {"int8": "fp32", UNPRUNED_INT8: "unpruned_fp32"}
    files = [CandidateFile(name, path, "quantized" if name in bases else ("lossy" if changed else "equivalent"),
                           bases.get(name)) for name, path in candidates]
    # the int8 model against the fp32 one it was made from: where does quantization hurt most?
    pairs = [("int8", candidates[0][1], candidates[1][1])] if len(candidates) > 1 else []
    golden = ctx.folder / "golden.npz"
    fragment = verify_and_explain(reference, files, dataset, recipe.data.task, recipe.verify, sizes,
                                  ctx.progress, extra, pairs, always_localize=True, golden=golden,
                                  ort_baseline="unpruned_fp32" if unpruned else ("reference" if recipe.model.onnx else "fp32"),
                                  speed_gate="min_speedup_vs_fp32")
    ctx.models["golden"] = describe(golden)
    ctx.notes.extend(fragment.pop("notes"))  # type: ignore[arg-type]
    metrics: dict[str, Any] = fragment["metrics"]  # type: ignore[assignment]
    ratio, interval = metrics.get("int8", {}).get("speedup_vs_fp32"), metrics.get("int8", {}).get("speedup_vs_fp32_ci")
    if ratio is not None and interval and interval[1] < 1.0:
        ctx.notes.append(f"the int8 model is slower than the fp32 ONNX model on this CPU (speedup {ratio:.3f}x, "
                         f"interval [{interval[0]:.3f}, {interval[1]:.3f}])")
    chosen = recommend(fragment, candidates)
    fragment["recommended"] = chosen
    fragment["passed"] = decide(fragment, recipe.verify.verdict or "all", chosen["model"])
    gates: list[dict[str, Any]] = fragment["gates"]  # type: ignore[assignment]
    loose = sorted({g["model"] for g in gates if not g["passed"] and not g["binding"]})
    if loose:
        why = ("the unpruned int8 model is an alternative, not a promise" if loose == [UNPRUNED_INT8] else
               f"[verify] verdict = \"{recipe.verify.verdict}\": the run stands or falls with {chosen['model']}")
        ctx.notes.append(f"gates failed by {', '.join(loose)} are reported, not binding ({why})")
    ctx.notes.append(f"recommended artifact: {chosen['file']} ({chosen['why']})" if chosen["model"] else
                     f"no artifact to recommend: {chosen['why']}")
    ctx.verification = fragment


def decide(fragment: dict[str, Any], verdict: str, recommended: str | None) -> bool:
    """The run's verdict, marking each gate `binding` or not. Under verdict "recommended" the run stands or falls
    with the model it recommends (whichever it is); under "all", or with nothing to recommend, every model the run
    makes is bound by its gates, and the unpruned int8 alternative is not: it is measured so that it can be chosen,
    not promised."""
    gates: list[dict[str, Any]] = fragment["gates"]  # type: ignore[assignment]
    for gate in gates:
        if verdict == "recommended" and recommended is not None:
            gate["binding"] = gate["model"] == recommended
        else:
            gate["binding"] = gate["model"] != UNPRUNED_INT8
    return all(g["passed"] for g in gates if g["binding"])


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
