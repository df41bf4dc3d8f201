"""The stand-alone commands as library functions: each checks where its outputs go, builds its stage's typed config
from the command's options, runs the stage and returns its record. The CLI parses options and prints; nothing here
prints or exits."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploytool.errors import UserError
from deploytool.recipe import GatesConfig, ModelConfig, Recipe, VerifyConfig
from deploytool.report_schema import Report


def check_output(path: Path, force: bool, size_hint: int = 0) -> None:
    """Check where an output file goes before any long work: never a folder or a special file, an existing
    file only with --force, a folder that exists and can be written, and about `size_hint` bytes free there."""
    import shutil
    import tempfile

    if path.is_dir():
        raise UserError(f"{path} is a folder", "give the path of the file to write")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"{path} exists and is not a regular file", "give the path of the file to write")
        if not force:
            raise UserError(f"{path} already exists", "pass --force to overwrite it")
    folder = path.parent
    if not folder.exists():
        raise UserError(f"output folder {folder} does not exist", "create it first")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):  # the real test: can a file be created there?
            pass
    except OSError as exc:
        raise UserError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    if free < size_hint:
        raise UserError(f"not enough free space in {folder}: {free / 2**20:.1f} MiB free, "
                        f"the output needs about {size_hint / 2**20:.1f} MiB")


def size_of(path: Path | None) -> int:
    """A file's size, to estimate an output's (0 when there is none)."""
    return path.stat().st_size if path is not None and path.is_file() else 0


def check_report_dir(folder: Path, force: bool) -> None:
    """--report DIR: a new or empty folder, or (with --force) one whose report files may be replaced."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--report {folder} exists and is not a folder")
    existing = [name for name in ("report.json", "report.md", "report.html") if (folder / name).exists()]
    if existing and not force:
        raise UserError(f"--report {folder} already holds {', '.join(existing)}", "pass --force to overwrite them")
    if not folder.exists() and not folder.parent.exists():
        raise UserError(f"--report: folder {folder.parent} does not exist")


def validated(model_cls: Any, **values: Any) -> Any:
    """A config model from command options; a bad value is a user error naming the option."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"invalid option {where}: {err['msg']} (got {err.get('input')!r})") from None


def parse_input(text: str) -> dict[str, Any]:
    """'image:batch,1,8,8[:float32]' -> an input spec dict."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UserError(f"--input {text!r}: expected NAME:DIM,DIM,...[:DTYPE]", "example: --input image:batch,1,8,8:float32")
    dims: list[int | str] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in parts[1].split(",")]
    spec: dict[str, Any] = {"name": parts[0], "shape": dims}
    if len(parts) == 3:
        spec["dtype"] = parts[2]
    return spec


def parse_factory_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """('depth=18', 'name=x') -> {'depth': 18, 'name': 'x'}; values are TOML, anything else is a string."""
    from deploytool.recipe import parse_override

    args: dict[str, Any] = {}
    for text in pairs:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip() or not key.strip().isidentifier():
            raise UserError(f"--factory-arg {text!r}: expected KEY=VALUE with KEY a Python identifier",
                            "example: --factory-arg num_classes=10")
        args[key.strip()] = parse_override(text)[1]
    return args


@dataclass
class ModelOptions:
    """A model described by command options instead of a recipe: CHECKPOINT, --factory, --factory-arg, --input,
    --output-name, --trust-checkpoint."""

    checkpoint: Path | None
    factory: str
    factory_args: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    trust_checkpoint: bool = False

    def config(self) -> ModelConfig:
        return validated(ModelConfig, factory=self.factory, factory_args=parse_factory_args(self.factory_args),
                         checkpoint=str(self.checkpoint) if self.checkpoint else None,
                         inputs=[parse_input(t) for t in self.inputs], outputs=list(self.outputs),
                         trust_checkpoint=self.trust_checkpoint)


def one_stage_recipe(command: str, model: dict[str, Any], data: dict[str, Any], **tables: Any) -> Recipe:
    """The recipe a command runs: its [model], [data] and its stage's table (paths relative to the current folder).
    Its absolute() form is what `--dry-run` prints: a recipe `deploytool run` accepts (which then also runs the stages
    the command leaves out, such as export, and verifies where asked)."""
    from deploytool.stages.inspect import recipe_io

    values = {"name": command, "model": model, "data": {k: v for k, v in data.items() if v is not None},
              **{k: v for k, v in tables.items() if v is not None}}
    recipe: Recipe = validated(Recipe, **values, base_dir=Path.cwd())
    return recipe_io(recipe)  # an ONNX model's inputs and outputs, read from the file


def table_toml(name: str, config: Any) -> str:
    """One recipe table as TOML: what verify runs, for its --dry-run."""
    import tomli_w

    return str(tomli_w.dumps({name: config.model_dump(mode="json", exclude_none=True)}))


def run_command(recipe: Recipe, stages: tuple[str, ...], artifact: str, out: Path, force: bool, run_dir: Path | None,
                progress: Any = None, size_hint: int = 0) -> Report:
    """A command's recipe run through the pipeline (load, then `stages`) and its artifact copied to `out`: the report.

    The run folder is `run_dir` (kept: run.log, report, resolved recipe and the stage cache, which a rerun with the same
    folder reuses), else a temporary folder, removed after the command unless a stage failed (its run.log is kept)."""
    import shutil
    import tempfile

    from deploytool.errors import StageError
    from deploytool.pipeline import run_recipe, stages_named

    check_output(out, force, size_hint)
    folder = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix=f"deploytool-{recipe.name}-"))
    try:
        # a kept run folder holds this command's previous run: its results are replaced, its stage cache reused
        result = run_recipe(recipe, folder, force=run_dir is not None, progress=progress, use_cache=run_dir is not None,
                            stages=stages_named("load", *stages))
        publish(folder / artifact, out)
    except StageError as exc:
        if run_dir is None and (folder / "run.log").is_file():
            exc.hint = f"the traceback is in {folder / 'run.log'}"
        elif run_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    except BaseException:
        if run_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if run_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return result.report


def publish(artifact: Path, out: Path) -> None:
    """A run's artifact copied to `out` whole or not at all: written under a temporary name beside it, then renamed."""
    import os
    import shutil

    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if artifact.with_name(artifact.name + ".data").exists():  # an ONNX model with its weights beside it
            import onnx

            model = onnx.load(str(artifact))
            onnx.save_model(model, str(temporary), save_as_external_data=True, location=f"{out.name}.data")
        else:
            shutil.copyfile(artifact, temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)


def export_recipe(options: ModelOptions, opset: int, static_batch: bool, data: Path | None, simplify: bool) -> Recipe:
    return one_stage_recipe("export", options.config().model_dump(exclude_defaults=True), {"calibration": str(data) if data else None},
                            export={"opset": opset, "dynamic_batch": not static_batch}, simplify={"enabled": simplify})


def export_file(recipe: Recipe, out: Path, force: bool, run_dir: Path | None, progress: Any) -> Report:
    """Export (and unless the recipe turns simplify off, simplify with its numeric check) a checkpoint to one ONNX file."""
    checkpoint = recipe.model.checkpoint
    return run_command(recipe, ("export", "simplify"), "model.onnx", out, force, run_dir, progress,
                       size_of(Path(checkpoint) if checkpoint else None))


def prune_recipe(options: ModelOptions, data: Path | None, task: str, **settings: Any) -> Recipe:
    return one_stage_recipe("prune", options.config().model_dump(exclude_defaults=True),
                            {"calibration": str(data) if data else None, "task": task}, prune=settings)


def prune_file(recipe: Recipe, out: Path, force: bool, run_dir: Path | None, progress: Any) -> Report:
    """Prune a checkpoint into safetensors that reload with the same factory."""
    checkpoint = recipe.model.checkpoint
    return run_command(recipe, ("prune",), "pruned.safetensors", out, force, run_dir, progress,
                       size_of(Path(checkpoint) if checkpoint else None))


def distill_recipe(options: ModelOptions, student_checkpoint: Path | None, student_factory: str | None, train_data: Path,
                   val_data: Path | None, task: str, **settings: Any) -> Recipe:
    """Without --student and --student-factory the student is a fresh model of the teacher's factory."""
    return one_stage_recipe("distill", options.config().model_dump(exclude_defaults=True), {"calibration": str(train_data), "task": task},
                            distill={**settings, "train": str(train_data), "validation": str(val_data) if val_data else None,
                                     "student_factory": student_factory or options.factory,
                                     "student_checkpoint": str(student_checkpoint) if student_checkpoint else None})


def distill_file(recipe: Recipe, out: Path, force: bool, run_dir: Path | None, progress: Any) -> Report | None:
    """Distill the model (teacher) into a student, data-parallel under torchrun: the report, or None on a follower
    rank (which takes part in training and writes nothing)."""
    from deploytool.pipeline import follow_recipe, stages_named
    from deploytool.stages.distill import world

    if world()[0] != 0:
        follow_recipe(recipe, stages_named("load", "distill"))
        return None
    assert recipe.distill is not None
    student = recipe.distill.student_checkpoint
    checkpoint = recipe.model.checkpoint
    return run_command(recipe, ("distill",), "distilled.safetensors", out, force, run_dir, progress,
                       size_of(Path(student) if student else None) or size_of(Path(checkpoint) if checkpoint else None))


def simplify_recipe(model: Path, data: Path | None) -> Recipe:
    return one_stage_recipe("simplify", {"onnx": str(model)}, {"calibration": str(data) if data else None}, simplify={"enabled": True})


def simplify_file(recipe: Recipe, out: Path, force: bool, run_dir: Path | None, progress: Any) -> Report:
    """onnxsim on one ONNX file, checked on sample inputs."""
    return run_command(recipe, ("export", "simplify"), "model.onnx", out, force, run_dir, progress)


def quantize_recipe(model: Path, calibration: Path | None, data: Path | None, **settings: Any) -> Recipe:
    """The command's recipe: the model, its calibration data, the data the searches score on and the [quantize] table."""
    if settings["mode"] == "static" and calibration is None:
        raise UserError("static quantization needs --calibration data", "or use --mode dynamic")
    if (settings["auto_mixed_precision"] or settings["speed_search"]) and data is None:
        raise UserError("--auto-mixed-precision and --speed-search need --data to score on")
    return one_stage_recipe("quantize", {"onnx": str(model)},
                            {"calibration": str(calibration) if calibration else None, "validation": str(data) if data else None},
                            quantize=settings)


def quantize_file(recipe: Recipe, out: Path, force: bool, run_dir: Path | None, progress: Any) -> Report:
    """int8 with ONNX Runtime (static with calibration data, or dynamic), searches scored on the recipe's validation data."""
    assert recipe.model.onnx is not None
    return run_command(recipe, ("export", "quantize"), "model.int8.onnx", out, force, run_dir, progress,
                       size_of(Path(recipe.model.onnx)) // 4)


def parse_gates(texts: tuple[str, ...]) -> dict[str, float]:
    """('min_cosine=0.99', ...) -> {'min_cosine': 0.99}, checked against the gate names and ranges."""
    values: dict[str, Any] = {}
    for text in texts:
        name, _, value = text.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--gate {text!r}: expected NAME=NUMBER", f"gates: {', '.join(GatesConfig.model_fields)}") from None
    if "min_speedup_vs_fp32" in values:
        raise UserError("gate min_speedup_vs_fp32 compares a run's int8 model with its fp32 one; use min_speedup here",
                        "deploytool verify REFERENCE.onnx CANDIDATE.onnx --gate min_speedup=1.0 times the candidate against the reference")
    validated(GatesConfig, **values)
    return values


def verify_config(reference: Path, candidates: tuple[Path, ...], gates: tuple[str, ...], **settings: Any) -> tuple[VerifyConfig, list[str]]:
    """The [verify] table of the command: the gates named here over a reference recipe's own; and the run-only gates
    that recipe names (min_speedup_vs_fp32, min_speedup_vs_ort_fp32), which are left out."""
    for path in candidates:
        if not path.is_file():
            raise UserError(f"candidate not found: {path}")
    named = parse_gates(gates)
    base: dict[str, Any] = {}
    if reference.suffix == ".toml" and reference.is_file():
        from deploytool.recipe import load_recipe

        recipe = load_recipe(reference)
        base = recipe.verify.gates.model_dump(exclude_none=True) if recipe.verify else {}
    # gates only a run can evaluate: its int8 model against its fp32 one, its models against the original's export
    run_only = [name for name in ("min_speedup_vs_fp32", "min_speedup_vs_ort_fp32") if base.pop(name, None) is not None]
    cfg: VerifyConfig = validated(VerifyConfig, **settings, gates=validated(GatesConfig, **{**base, **named}))
    return cfg, run_only


def verify_files(reference: Path, candidates: tuple[Path, ...], cfg: VerifyConfig, run_only: list[str], data: Path | None,
                 task: str | None, seed: int, samples: int, outputs: dict[str, Path | None], force: bool) -> Report:
    """The candidates against the reference (an ONNX file, golden outputs or a recipe) under `cfg`; writes the outputs
    asked for (json, report folder, junit, golden) and returns the report."""
    from deploytool.stages.reference import candidate_names, resolve_reference
    from deploytool.stages.verify import verify_report

    started = time.perf_counter()
    for key in ("golden", "json", "junit"):
        if outputs.get(key) is not None:
            check_output(outputs[key], force)  # type: ignore[arg-type]
    if outputs.get("report") is not None:
        check_report_dir(outputs["report"], force)  # type: ignore[arg-type]
    ref = resolve_reference(reference, data, task, seed, samples, cfg.threads)
    if "min_speedup" in cfg.gates.model_dump(exclude_none=True) and not getattr(ref.runner, "timeable", True):
        raise UserError("gate min_speedup needs a reference that runs: golden outputs have no latency")
    report: dict[str, Any] = verify_report(ref, reference, candidate_names(reference, candidates), list(candidates), cfg,
                                           outputs.get("golden"))
    report["stages"] = [{"name": "verify", "status": "done", "seconds": round(time.perf_counter() - started, 3)}]
    for name in run_only:
        against = "int8 against fp32" if name == "min_speedup_vs_fp32" else "the run's models against the original's export"
        report["notes"].append(f"the recipe's gate {name} applies to runs ({against}): not evaluated here")
    return write_verify_outputs(report, outputs, time.perf_counter() - started)


def write_verify_outputs(report: dict[str, Any], outputs: dict[str, Path | None], seconds: float) -> Report:
    """The report checked against the schema, then written where asked: the report, typed."""
    from deploytool.artifacts import write_text
    from deploytool.stages.report import json_safe, write_reports

    report = json_safe(report)
    typed = Report.model_validate(report)
    if outputs.get("json") is not None:
        write_text(outputs["json"], json.dumps(report, indent=2) + "\n")  # type: ignore[arg-type]
    folder = outputs.get("report")
    if folder is not None:
        folder.mkdir(exist_ok=True)
        write_reports(report, folder)
    if outputs.get("junit") is not None:
        from deploytool.junit import write_junit

        write_junit(outputs["junit"], "verify", report["gates"], seconds)  # type: ignore[arg-type]
    return typed


def bench_files(models: tuple[Path, ...], data: Path | None, batches: tuple[int, ...], threads: int, plan: Any, memory: bool,
                json_out: Path | None, force: bool) -> dict[str, Any]:
    """Latency, throughput, speedup over the first model and session memory of ONNX models, by the block method."""
    from deploytool.data import load_dataset, random_dataset
    from deploytool.stages.bench import bench_models
    from deploytool.stages.inspect import input_specs

    for model in models:
        if not model.is_file():
            raise UserError(f"model not found: {model}")
    if json_out is not None:
        check_output(json_out, force)
    specs = input_specs(models[0])
    sizes = sorted(set(batches or (1,)))
    dataset = load_dataset(data, specs) if data else random_dataset(specs, max(sizes))
    results = bench_models(list(models), dataset, sizes, threads, plan, memory=memory)
    if json_out is not None:
        from deploytool.artifacts import write_text

        write_text(json_out, json.dumps(results, indent=2) + "\n")
    return results
