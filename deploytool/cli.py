"""The deploytool command line: a thin layer over the library, and the only place that exits.

Exit codes: 0 every gate passed, 1 a gate failed, 2 user error, 3 a stage failed otherwise,
130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import click

from deploytool import __version__
from deploytool.errors import DeployError, GateFailure, Terminated, UserError, note_signal, signal_received


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = 140  # logs and CI output: do not squeeze tables into 80 columns
    return console


class DeployGroup(click.Group):
    """Turns library errors into one line (two with a hint) and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployError as exc:
            debug = bool(ctx.meta.get("deploytool.debug"))
            if debug:
                traceback.print_exc()
            if signal_received() and not isinstance(exc, GateFailure):
                self._interrupted(ctx, signal_received() or "SIGINT")
            label = "FAILED" if isinstance(exc, GateFailure) else "error"
            click.echo(f"{label}: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except (KeyboardInterrupt, Terminated) as exc:  # Ctrl-C or SIGTERM: one line, 130 or 143, nothing half-written
            if ctx.meta.get("deploytool.debug"):
                traceback.print_exc()
            self._interrupted(ctx, "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM")
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug or an unexpected failure: still one line and exit 3
            if ctx.meta.get("deploytool.debug"):
                traceback.print_exc()
            if signal_received():  # what a signal broke, e.g. an import it cut short
                self._interrupted(ctx, signal_received() or "SIGINT")
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            click.echo("hint: rerun with --debug for the traceback", err=True)
            ctx.exit(3)

    @staticmethod
    def _interrupted(ctx: click.Context, name: str) -> None:
        """One line, and exit 130 (SIGINT) or 143 (SIGTERM)."""
        resume = "; run the same command again to resume the run" if ctx.invoked_subcommand == "run" else ""
        click.echo(f"interrupted ({name}){resume}", err=True)
        ctx.exit(Terminated.exit_code if name == "SIGTERM" else 130)


@click.group(cls=DeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deploytool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn a PyTorch checkpoint into a smaller, faster ONNX model that is verified against the original.

    Exit codes: 0 all gates passed, 1 a gate failed, 2 user error (bad recipe, file or data),
    3 a stage failed for another reason (details in the run log), 130/143 interrupted (SIGINT/SIGTERM).
    """
    ctx.meta["deploytool.debug"] = debug
    if debug:  # everything the library logs, including what libraries such as torch print, on stderr
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("deploytool")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        ctx.call_on_close(lambda: logger.removeHandler(handler))


def _check_output(path: Path, force: bool, size_hint: int = 0) -> None:
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


def _size_of(path: Path | None) -> int:
    """A file's size, to estimate an output's (0 when there is none)."""
    return path.stat().st_size if path is not None and path.is_file() else 0


def _print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def _exit_on_gates(report: dict[str, Any]) -> None:
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        detail = ", ".join(f"{g['name']} on {g['model']} (value {g['value']}, threshold {g['threshold']})" for g in failed)
        raise GateFailure(f"{len(failed)} gate(s) failed: {detail}")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run folder (default: runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help="Override a recipe value (TOML syntax); repeatable.")
@click.option("--force", is_flag=True, help="Replace the results in an existing run folder.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit without running anything.")
@click.option("--no-cache", is_flag=True, help="Recompute every stage instead of reusing cached stage outputs.")
@click.option("--junit", type=click.Path(path_type=Path), help="Also write the gates as JUnit XML here.")
def run(recipe: Path, out_dir: Path | None, overrides: tuple[str, ...], force: bool, dry_run: bool, no_cache: bool,
        junit: Path | None) -> None:
    """Run a recipe end to end: load, export, simplify, quantize, verify, report."""
    from deploytool.recipe import load_recipe

    resolved = load_recipe(recipe, list(overrides))
    if dry_run:
        click.echo(f"# resolved recipe (relative paths are relative to {resolved.base_dir})")
        click.echo(resolved.to_toml(), nl=False)
        return
    from deploytool.pipeline import follow_recipe, run_recipe
    from deploytool.progress import RichProgress
    from deploytool.stages.distill import world
    from deploytool.stages.report import gate_rows, summary_rows

    if world()[0] != 0:  # a torchrun follower: distill data-parallel, write and print nothing
        follow_recipe(resolved)
        return
    out_dir = out_dir or Path("runs") / resolved.name
    if junit is not None:
        import os

        inside = Path(os.path.abspath(out_dir)) in Path(os.path.abspath(junit)).parents  # the run creates its folder
        if not inside and not junit.parent.is_dir():
            raise UserError(f"--junit: folder {junit.parent} does not exist", "create it first, or write the file into the run folder")
    result = run_recipe(resolved, out_dir, force=force, progress=RichProgress(_console(stderr=True)), use_cache=not no_cache,
                        junit=junit)
    _print_table(*summary_rows(result.report), title=f"{resolved.name}")
    if result.report["gates"]:
        _print_table(*gate_rows(result.report), title="gates")
    for note in result.report.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(f"artifacts and report in {out_dir}")
    _exit_on_gates(result.report)
    click.echo("PASSED")


def _parse_input(text: str) -> dict[str, Any]:
    """'image:batch,1,8,8[:float32]' -> an input spec dict."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UserError(f"--input {text!r}: expected NAME:DIM,DIM,...[:DTYPE]", "example: --input image:batch,1,8,8:float32")
    dims: list[int | str] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in parts[1].split(",")]
    spec: dict[str, Any] = {"name": parts[0], "shape": dims}
    if len(parts) == 3:
        spec["dtype"] = parts[2]
    return spec


def _sample_for(specs: list[Any], data: Path | None, count: int = 2) -> Any:
    from deploytool.data import load_dataset, random_dataset

    return (load_dataset(data, specs) if data else random_dataset(specs, count)).head(count)


def _validated(model_cls: Any, **values: Any) -> Any:
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"invalid option {where}: {err['msg']} (got {err.get('input')!r})") from None


def model_options(func: Any) -> Any:
    """CHECKPOINT plus --factory/--input/--output-name: a model described without a recipe."""
    options = [
        click.argument("checkpoint", required=False, type=click.Path(path_type=Path)),
        click.option("--factory", required=True, help="module:callable or path/to/file.py:callable building the model."),
        click.option("--factory-arg", "factory_args", multiple=True, metavar="KEY=VALUE",
                     help="Keyword argument for the factory, the value in TOML (depth=18, name=\"x\", sizes=[1,2]); repeatable."),
        click.option("--input", "inputs", required=True, multiple=True, metavar="NAME:DIMS[:DTYPE]",
                     help="Model input, e.g. image:batch,1,8,8:float32; repeatable."),
        click.option("--output-name", "outputs", required=True, multiple=True, help="Name of an output, in order; repeatable."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow a checkpoint with pickled objects (a full module). Unpickling can run code: only for files you trust."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _parse_factory_args(pairs: tuple[str, ...]) -> dict[str, Any]:
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


def _model_from_options(checkpoint: Path | None, factory: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
                        trust_checkpoint: bool = False, factory_args: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(ModelConfig, loaded nn.Module) from the model options; what loading unwrapped is printed as notes."""
    from deploytool.recipe import ModelConfig
    from deploytool.stages.load import load_model

    cfg = _validated(ModelConfig, factory=factory, factory_args=_parse_factory_args(factory_args),
                     checkpoint=str(checkpoint) if checkpoint else None,
                     inputs=[_parse_input(t) for t in inputs], outputs=list(outputs), trust_checkpoint=trust_checkpoint)
    notes: list[str] = []
    model = load_model(factory, checkpoint, Path.cwd(), trust_checkpoint, cfg.factory_args, notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    return cfg, model


@cli.command()
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--opset", default=18, show_default=True, type=int)
@click.option("--static-batch", is_flag=True, help="Fix the batch axis instead of making it dynamic.")
@click.option("--data", type=click.Path(path_type=Path), help="Sample inputs (.npz) for tracing and the numeric check.")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Run onnxsim with a numeric check.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def export(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
           trust_checkpoint: bool, out: Path, opset: int, static_batch: bool, data: Path | None, simplify: bool, force: bool) -> None:
    """Export a checkpoint (state_dict, or a pruned .safetensors) to a checked ONNX file."""
    import tempfile

    from deploytool.recipe import ExportConfig, SimplifyConfig
    from deploytool.stages.export import export_onnx

    cfg = _validated(ExportConfig, opset=opset, dynamic_batch=not static_batch)
    _check_output(out, force, _size_of(checkpoint))
    model_cfg, model = _model_from_options(checkpoint, factory, inputs, outputs, trust_checkpoint, factory_args)
    sample = _sample_for(model_cfg.inputs, data)
    if not simplify:
        record = export_onnx(model, model_cfg.inputs, model_cfg.outputs, cfg, sample, out)
    else:
        from deploytool.stages.simplify import simplify_onnx

        with tempfile.TemporaryDirectory(prefix="deploytool-") as tmp:
            raw = Path(tmp) / "exported.onnx"
            record = export_onnx(model, model_cfg.inputs, model_cfg.outputs, cfg, sample, raw)
            simplified = simplify_onnx(raw, out, SimplifyConfig(), sample)
            record.notes.extend(simplified.notes)
    for note in record.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out} ({record.exporter} exporter, opset {record.opset}, max abs error vs PyTorch {record.max_abs_error:.3g})")


@cli.command(name="prune")
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help=".safetensors file to write.")
@click.option("--data", type=click.Path(path_type=Path), help="Samples (.npz) for tracing, Taylor importance and the scan.")
@click.option("--method", type=click.Choice(["channel", "magnitude"]), default="channel", show_default=True)
@click.option("--ratio", default=0.5, show_default=True, type=float)
@click.option("--importance", type=click.Choice(["l1", "l2", "bn_scale", "taylor"]), default="l2", show_default=True)
@click.option("--round-to", default=8, show_default=True, type=int)
@click.option("--steps", "iterative_steps", default=1, show_default=True, type=int, help="Iterative pruning steps.")
@click.option("--ignore", multiple=True, help="Layer name or glob never pruned; repeatable (output heads always are).")
@click.option("--scan", is_flag=True, help="Also scan each layer's sensitivity and print the table.")
@click.option("--task", type=click.Choice(["classification", "embedding", "regression", "generic"]), default="classification",
              show_default=True, help="How the scan scores: accuracy with labels, else output cosine.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def prune_cmd(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
              trust_checkpoint: bool, out: Path,
              data: Path | None, method: str, ratio: float, importance: str, round_to: int, iterative_steps: int,
              ignore: tuple[str, ...], scan: bool, task: str, force: bool) -> None:
    """Prune a checkpoint; writes safetensors that reload with the same factory (no pickle)."""
    from deploytool.checkpoint import save_model
    from deploytool.recipe import PruneConfig
    from deploytool.stages.prune import prune_model
    from deploytool.stages.report import sensitivity_rows

    cfg = _validated(PruneConfig, method=method, ratio=ratio, importance=importance, round_to=round_to,
                     iterative_steps=iterative_steps, ignore=list(ignore), sensitivity=scan)
    _check_output(out, force, _size_of(checkpoint))
    model_cfg, model = _model_from_options(checkpoint, factory, inputs, outputs, trust_checkpoint, factory_args)
    from deploytool.data import load_dataset, random_dataset

    dataset = load_dataset(data, model_cfg.inputs) if data else random_dataset(model_cfg.inputs, 32)
    pruned, record = prune_model(model, model_cfg.inputs, cfg, dataset, task)
    save_model(pruned, out)
    if record.sensitivity:
        _print_table(*sensitivity_rows(record.sensitivity), title="sensitivity (score with only this layer pruned)")
    for note in record.notes:
        click.echo(f"note: {note}")
    macs = f", MACs {record.macs_before:,} -> {record.macs_after:,}" if record.macs_before and record.macs_after else ""
    click.echo(f"wrote {out}: params {record.params_before:,} -> {record.params_after:,}{macs}; "
               f"never pruned: {', '.join(record.ignored) or '-'}")


@cli.command(name="distill")
@model_options
@click.option("--student", "student_checkpoint", type=click.Path(path_type=Path), help="Student weights, e.g. a pruned .safetensors.")
@click.option("--student-factory", help="Factory of the student (default: the teacher's factory).")
@click.option("--train", "train_data", required=True, type=click.Path(path_type=Path), help="Training inputs (.npz; labels optional).")
@click.option("--val", "val_data", type=click.Path(path_type=Path), help="Validation data for early stopping (default: --train).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help=".safetensors file to write.")
@click.option("--task", type=click.Choice(["classification", "embedding", "regression", "generic"]), default="classification",
              show_default=True)
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--temperature", default=4.0, show_default=True, type=float)
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Weight of the hard-label loss when labels exist.")
@click.option("--patience", type=int, help="Stop after this many epochs without improvement.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def distill_cmd(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...],
                outputs: tuple[str, ...], trust_checkpoint: bool, student_checkpoint: Path | None, student_factory: str | None,
                train_data: Path, val_data: Path | None,
                out: Path, task: str, epochs: int, batch_size: int, lr: float, temperature: float, alpha: float,
                patience: int | None, seed: int, force: bool) -> None:
    """Distill the model given by CHECKPOINT (teacher) into a student; runs data-parallel under torchrun."""
    from deploytool.checkpoint import save_model
    from deploytool.data import load_dataset
    from deploytool.progress import RichProgress
    from deploytool.recipe import DistillConfig
    from deploytool.stages.distill import distill, finish_distributed, world
    from deploytool.stages.load import load_model

    cfg = _validated(DistillConfig, epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, alpha=alpha,
                     patience=patience, seed=seed)
    leader = world()[0] == 0
    if leader:
        _check_output(out, force, _size_of(student_checkpoint) or _size_of(checkpoint))
    model_cfg, teacher = _model_from_options(checkpoint, factory, inputs, outputs, trust_checkpoint, factory_args)
    student = load_model(student_factory or factory, student_checkpoint, Path.cwd(),
                         factory_args=None if student_factory else model_cfg.factory_args)
    train = load_dataset(train_data, model_cfg.inputs)
    val = load_dataset(val_data, model_cfg.inputs) if val_data else train
    try:
        trained, record = distill(teacher, student, model_cfg.inputs, train, val, task, cfg,
                                  RichProgress(_console(stderr=True)) if leader else None)
    finally:
        finish_distributed()
    if not leader:
        return
    save_model(trained, out)
    click.echo(f"wrote {out}: best validation {record.metric} {record.best_score:.4f} at epoch {record.best_epoch} "
               f"(before: {record.initial_score:.4f}; {record.epochs_run} epochs, {record.world_size} process(es))")


@cli.command(name="simplify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs (.npz) for the numeric check (default: seeded random).")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def simplify_cmd(model: Path, out: Path, data: Path | None, force: bool) -> None:
    """Simplify an ONNX file with onnxsim, checking that outputs do not change."""
    from deploytool.recipe import SimplifyConfig
    from deploytool.stages.inspect import input_specs
    from deploytool.stages.simplify import simplify_onnx

    specs = input_specs(model)
    _check_output(out, force)
    record = simplify_onnx(model, out, SimplifyConfig(), _sample_for(specs, data))
    for note in record.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out}: {record.nodes_before} -> {record.nodes_after} nodes, max abs error {record.max_abs_error:.3g}")


@cli.command(name="quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration data (.npz keyed by input name, or a folder).")
@click.option("--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True)
@click.option("--weight-type", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True)
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights; auto turns it on for CPUs without int8 dot-product instructions.")
@click.option("--exclude", "exclude_nodes", multiple=True, help="Node name to keep in float; repeatable.")
@click.option("--op-type", "op_types", multiple=True, help="Quantize only these op types; repeatable.")
@click.option("--optimize", type=click.Choice(["none", "transformer"]), default="none", show_default=True,
              help="ONNX Runtime transformer fusions before quantizing.")
@click.option("--auto-mixed-precision", is_flag=True, help="Keep the most sensitive nodes in float until the targets hold (needs --data).")
@click.option("--speed-search", is_flag=True, help="If int8 is slower than fp32 here, try cheaper variants (needs --data).")
@click.option("--data", type=click.Path(path_type=Path), help="Validation data the searches score on (labels enable the accuracy target).")
@click.option("--min-cosine", default=0.99, show_default=True, type=float, help="Search target: output cosine to the fp32 model.")
@click.option("--max-accuracy-drop", type=float, help="Search target: accuracy drop against the fp32 model (needs labels).")
@click.option("--threads", default=2, show_default=True, type=int, help="Threads for the speed search's timings.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
def quantize_cmd(model: Path, out: Path, calibration: Path | None, mode: str, fmt: str, method: str, per_channel: bool,
                 activation_type: str, weight_type: str, reduce_range: str, exclude_nodes: tuple[str, ...],
                 op_types: tuple[str, ...], optimize: str, auto_mixed_precision: bool, speed_search: bool, data: Path | None,
                 min_cosine: float, max_accuracy_drop: float | None, threads: int, force: bool) -> None:
    """Quantize an ONNX file to int8 with ONNX Runtime (static with calibration data, or dynamic)."""
    from deploytool.data import load_dataset
    from deploytool.progress import RichProgress
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.inspect import input_specs
    from deploytool.stages.quantize import Targets, quantize_onnx

    specs = input_specs(model)
    if mode == "static" and calibration is None:
        raise UserError("static quantization needs --calibration data", "or use --mode dynamic")
    if (auto_mixed_precision or speed_search) and data is None:
        raise UserError("--auto-mixed-precision and --speed-search need --data to score on")
    cfg = _validated(QuantizeConfig, mode=mode, format=fmt, calibration_method=method, per_channel=per_channel,
                     activation_type=activation_type, weight_type=weight_type,
                     reduce_range={"auto": "auto", "on": True, "off": False}[reduce_range], exclude_nodes=list(exclude_nodes),
                     op_types=list(op_types) or None, optimize=optimize, auto_mixed_precision=auto_mixed_precision,
                     speed_search=speed_search)
    _check_output(out, force, _size_of(model) // 4)
    calibration_data = load_dataset(calibration, specs) if calibration else None
    evaluation = load_dataset(data, specs) if data else None
    batch = 16 if isinstance(specs[0].shape[0], str) else 1
    record = quantize_onnx(model, out, cfg, calibration_data, batch, evaluation, Targets(min_cosine, max_accuracy_drop), threads,
                           RichProgress(_console(stderr=True)))
    for node in record.float_nodes:
        click.echo(f"kept in float: {node['node']} ({node['op']}): {node['why']}")
    for note in record.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out} ({mode}, reduce_range={record.settings['reduce_range']}: {record.settings['reduce_range_reason']})")


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    import math

    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a finite number of seconds >= 0")
    return value


def _check_report_dir(folder: Path, force: bool) -> None:
    """--report DIR: a new or empty folder, or (with --force) one whose report files may be replaced."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--report {folder} exists and is not a folder")
    existing = [name for name in ("report.json", "report.md", "report.html") if (folder / name).exists()]
    if existing and not force:
        raise UserError(f"--report {folder} already holds {', '.join(existing)}", "pass --force to overwrite them")
    if not folder.exists() and not folder.parent.exists():
        raise UserError(f"--report: folder {folder.parent} does not exist")


@cli.command(name="verify")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Validation data (.npz; may hold labels). Default: seeded random inputs.")
@click.option("--task", type=click.Choice(["classification", "embedding", "regression", "generic"]),
              help="Task metrics to compute (default: the recipe's, else generic).")
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
              help="e.g. min_cosine=0.99, max_accuracy_drop=0.01, atol=1e-3; repeatable; overrides a recipe's gates.")
@click.option("--no-default-gates", is_flag=True, help="Apply only the gates named (by --gate or the recipe), no defaults.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=100, show_default=True, type=click.IntRange(min=1), help="Timed calls per model (in blocks).")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--min-seconds", default=0.0, show_default=True, type=float, callback=_finite, help="Keep timing at least this long.")
@click.option("--max-seconds", default=60.0, show_default=True, type=float, callback=_finite,
              help="Bound on timing when a speed gate needs more rounds to be decided.")
@click.option("--latency-batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--throughput-batch", "throughput_batches", multiple=True, type=click.IntRange(min=1),
              help="Also measure throughput at this batch size; repeatable.")
@click.option("--no-memory", is_flag=True, help="Skip measuring each session's peak memory.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs used without --data.")
@click.option("--samples", default=64, show_default=True, type=click.IntRange(min=1), help="Number of random inputs used without --data.")
@click.option("--save-golden", type=click.Path(path_type=Path), help="Save the inputs and reference outputs here (.npz) for later runs.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path),
              help="Write report.json, report.md and report.html into this folder.")
@click.option("--junit", type=click.Path(path_type=Path), help="Write the gates as JUnit XML here.")
@click.option("--force", is_flag=True, help="Overwrite existing --json, --report, --save-golden and --junit outputs.")
def verify_cmd(reference: Path, candidates: tuple[Path, ...], data: Path | None, task: str | None, gates: tuple[str, ...],
               no_default_gates: bool, threads: int, runs: int, warmup: int, min_seconds: float, max_seconds: float,
               latency_batch: int, throughput_batches: tuple[int, ...], no_memory: bool, seed: int, samples: int,
               save_golden: Path | None, json_out: Path | None, report_dir: Path | None, junit: Path | None, force: bool) -> None:
    """Compare candidate ONNX models with a reference; exit 1 if a gate fails.

    REFERENCE is an ONNX file, golden outputs saved by --save-golden (or a run's golden.npz),
    or a recipe (its PyTorch model, and its validation data and gates unless given here).
    Gates the user does not name get defaults chosen by what is compared (see the README).
    """
    import time

    from deploytool.recipe import GatesConfig, VerifyConfig
    from deploytool.stages.reference import candidate_names, resolve_reference
    from deploytool.stages.report import gate_rows, summary_rows, write_reports
    from deploytool.stages.verify import verify_report

    started = time.perf_counter()
    for path in candidates:
        if not path.is_file():
            raise UserError(f"candidate not found: {path}")
    gate_values: dict[str, Any] = {}
    for text in gates:
        name, _, value = text.partition("=")
        try:
            gate_values[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--gate {text!r}: expected NAME=NUMBER", f"gates: {', '.join(GatesConfig.model_fields)}") from None
    if "min_speedup_vs_fp32" in gate_values:
        raise UserError("gate min_speedup_vs_fp32 compares a run's int8 model with its fp32 one; use min_speedup here",
                        "deploytool verify REFERENCE.onnx CANDIDATE.onnx --gate min_speedup=1.0 times the candidate against the reference")
    for output in (save_golden, json_out, junit):
        if output is not None:
            _check_output(output, force)
    if report_dir is not None:
        _check_report_dir(report_dir, force)
    _validated(GatesConfig, **gate_values)
    ref = resolve_reference(reference, data, task, seed, samples, threads)
    base = ref.gates.model_dump(exclude_none=True) if ref.gates else {}
    run_only = base.pop("min_speedup_vs_fp32", None)
    cfg = _validated(VerifyConfig, threads=threads, runs=runs, warmup=warmup, min_seconds=min_seconds, max_seconds=max_seconds,
                     latency_batch=latency_batch, throughput_batches=list(throughput_batches), memory=not no_memory,
                     default_gates=not no_default_gates, gates=_validated(GatesConfig, **{**base, **gate_values}))
    if "min_speedup" in cfg.gates.model_dump(exclude_none=True) and not getattr(ref.runner, "timeable", True):
        raise UserError("gate min_speedup needs a reference that runs: golden outputs have no latency")
    report: dict[str, Any] = verify_report(ref, reference, candidate_names(reference, candidates), list(candidates), cfg, save_golden)
    report["stages"] = [{"name": "verify", "status": "done", "seconds": round(time.perf_counter() - started, 3)}]
    if run_only is not None:
        report["notes"].append("the recipe's gate min_speedup_vs_fp32 applies to runs (int8 against fp32): not evaluated here")
    _print_table(*summary_rows(report), title="verify")
    if report["gates"]:
        _print_table(*gate_rows(report), title="gates")
    for note in report["notes"]:
        click.echo(f"note: {note}")
    if json_out:
        from deploytool.artifacts import write_text
        from deploytool.report_schema import checked
        from deploytool.stages.report import json_safe

        write_text(json_out, json.dumps(checked(json_safe(report)), indent=2) + "\n")
    if report_dir:
        report_dir.mkdir(exist_ok=True)
        write_reports(report, report_dir)
    if junit:
        from deploytool.junit import write_junit

        write_junit(junit, "verify", report["gates"], time.perf_counter() - started)
    _exit_on_gates(report)
    click.echo("PASSED")


@cli.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs (.npz); default: seeded random inputs.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Batch size; repeatable (default 1).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed calls per model (in blocks).")
@click.option("--block", default=10, show_default=True, type=click.IntRange(min=1), help="Timed calls per block.")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--min-seconds", default=0.0, show_default=True, type=float, callback=_finite)
@click.option("--no-memory", is_flag=True, help="Skip measuring each session's peak memory.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
def bench_cmd(models: tuple[Path, ...], data: Path | None, batches: tuple[int, ...], threads: int, runs: int, block: int,
              warmup: int, min_seconds: float, no_memory: bool, json_out: Path | None, force: bool) -> None:
    """Latency (p50/p90/p99), throughput, speedup over the first model and session peak memory of ONNX models.

    Timed side by side by the block method: blocks of calls per model in shuffled order, spin-waiting off,
    with an A/A control (the first model against itself) that shows the noise floor."""
    from deploytool.data import load_dataset, random_dataset
    from deploytool.latency import TimingPlan
    from deploytool.stages.bench import bench_models
    from deploytool.stages.inspect import input_specs

    for model in models:
        if not model.is_file():
            raise UserError(f"model not found: {model}")
    if json_out is not None:
        _check_output(json_out, force)
    specs = input_specs(models[0])
    sizes = sorted(set(batches or (1,)))
    dataset = load_dataset(data, specs) if data else random_dataset(specs, max(sizes))
    plan = TimingPlan.for_calls(runs, block, warmup, min_seconds, max(60.0, min_seconds))
    results = bench_models(list(models), dataset, sizes, threads, plan, memory=not no_memory)
    rows = []
    for name, res in results["models"].items():
        for b, r in res["batches"].items():
            speedup = f"{r['speedup']:.2f}x [{r['speedup_ci'][0]:.2f}, {r['speedup_ci'][1]:.2f}]" if "speedup" in r else "-"
            memory = res.get("peak_memory_bytes")
            rows.append([name, b, f"{r['p50']:.3f}", f"{r['p90']:.3f}", f"{r['p99']:.3f}", f"{r['throughput_per_s']:.1f}",
                         speedup, f"{memory / 2**20:.1f}" if memory else "-"])
    _print_table(["model", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "speedup vs first", "session MiB"], rows,
                 title=f"latency, {threads} thread(s), blocks of {plan.block} calls, {plan.rounds} rounds, spin-waiting off")
    for batch, how in results["latency"].items():
        aa = how.get("aa") or {}
        if aa:
            click.echo(f"A/A control at batch {batch} ({aa['model']} against itself): {aa['value']:.3f}x "
                       f"[{aa['ci'][0]:.3f}, {aa['ci'][1]:.3f}]: differences below {aa['noise']:.1%} are noise")
    if json_out:
        from deploytool.artifacts import write_text

        write_text(json_out, json.dumps(results, indent=2) + "\n")


@cli.command(name="inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Show an ONNX file's opset, inputs and outputs, operator histogram, parameters and size."""
    from deploytool.stages.inspect import inspect_onnx

    info = inspect_onnx(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['size_bytes'] / 1024:.1f} KB, {info['params']:,} parameters, {info['nodes']} nodes"
               f"{', quantized' if info['quantized'] else ''}")
    click.echo("opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()) + f"; producer: {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            click.echo(f"{kind[:-1]:<7} {v['name']}: {v['dtype']} {v['shape']}")
    _print_table(["op", "count"], [[op, str(n)] for op, n in info["ops"].items()], title="operators")


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT raises KeyboardInterrupt, SIGTERM Terminated: both unwind the program, so that partial work is
    cleaned up and a run stays resumable. A second SIGTERM ends the program at once."""
    import signal

    name = signal.Signals(signum).name
    note_signal(name)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    raise KeyboardInterrupt


def main() -> None:
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    cli(prog_name="deploytool")


if __name__ == "__main__":
    main()
