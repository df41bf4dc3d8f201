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

    interrupted = False  # the interruption was reported (and the exit code chosen)

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
        DeployGroup.interrupted = True
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


def _print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def _notes(notes: list[str], err: bool = False) -> None:
    for note in notes:
        click.echo(f"note: {note}", err=err)


def _exit_on_gates(report: dict[str, Any]) -> None:
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        detail = ", ".join(f"{g['name']} on {g['model']} (value {g['value']}, threshold {g['threshold']})" for g in failed)
        raise GateFailure(f"{len(failed)} gate(s) failed: {detail}")


def _show_report(report: dict[str, Any], title: str) -> None:
    from deploytool.stages.report import gate_rows, summary_rows

    _print_table(*summary_rows(report), title=title)
    if report["gates"]:
        _print_table(*gate_rows(report), title="gates")
    _notes(report.get("notes", []))


def _print_recipe(text: str) -> None:
    click.echo("# what this command runs, as recipe TOML")
    click.echo(text, nl=False)


def _progress() -> Any:
    from deploytool.progress import RichProgress

    return RichProgress(_console(stderr=True))


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
    from deploytool.runfolder import inside
    from deploytool.stages.distill import world

    if world()[0] != 0:  # a torchrun follower: distill data-parallel, write and print nothing
        follow_recipe(resolved)
        return
    out_dir = out_dir or Path("runs") / resolved.name
    if junit is not None and not inside(junit, out_dir) and not junit.parent.is_dir():  # the run creates its own folder
        raise UserError(f"--junit: folder {junit.parent} does not exist", "create it first, or write the file into the run folder")
    result = run_recipe(resolved, out_dir, force=force, progress=_progress(), use_cache=not no_cache, junit=junit)
    _show_report(result.report, resolved.name)
    click.echo(f"artifacts and report in {out_dir}")
    _exit_on_gates(result.report)
    click.echo("PASSED")


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


def _model(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...],
           outputs: tuple[str, ...], trust_checkpoint: bool) -> Any:
    from deploytool.commands import ModelOptions

    return ModelOptions(checkpoint, factory, factory_args, inputs, outputs, trust_checkpoint)


@cli.command()
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--opset", default=18, show_default=True, type=int)
@click.option("--static-batch", is_flag=True, help="Fix the batch axis instead of making it dynamic.")
@click.option("--data", type=click.Path(path_type=Path), help="Sample inputs (.npz) for tracing and the numeric check.")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Run onnxsim with a numeric check.")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def export(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
           trust_checkpoint: bool, out: Path, opset: int, static_batch: bool, data: Path | None, simplify: bool, force: bool,
           dry_run: bool) -> None:
    """Export a checkpoint (state_dict, or a pruned .safetensors) to a checked ONNX file."""
    from deploytool.commands import export_file, export_recipe

    options = _model(checkpoint, factory, factory_args, inputs, outputs, trust_checkpoint)
    recipe = export_recipe(options, opset, static_batch, data, simplify)
    if dry_run:
        return _print_recipe(recipe.absolute().to_toml())
    try:
        record = export_file(options, recipe, out, force)
    finally:
        _notes(options.notes, err=True)
    _notes(record.notes)
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
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def prune_cmd(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...], outputs: tuple[str, ...],
              trust_checkpoint: bool, out: Path, data: Path | None, ignore: tuple[str, ...], scan: bool, task: str, force: bool,
              dry_run: bool, **settings: Any) -> None:
    """Prune a checkpoint; writes safetensors that reload with the same factory (no pickle)."""
    from deploytool.commands import prune_file, prune_recipe
    from deploytool.stages.report import sensitivity_rows

    options = _model(checkpoint, factory, factory_args, inputs, outputs, trust_checkpoint)
    recipe = prune_recipe(options, data, task, **settings, ignore=list(ignore), sensitivity=scan)
    if dry_run:
        return _print_recipe(recipe.absolute().to_toml())
    try:
        record = prune_file(options, recipe, out, force)
    finally:
        _notes(options.notes, err=True)
    if record.sensitivity:
        _print_table(*sensitivity_rows(record.sensitivity), title="sensitivity (score with only this layer pruned)")
    _notes(record.notes)
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
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def distill_cmd(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...],
                outputs: tuple[str, ...], trust_checkpoint: bool, student_checkpoint: Path | None, student_factory: str | None,
                train_data: Path, val_data: Path | None, out: Path, task: str, force: bool, dry_run: bool, **settings: Any) -> None:
    """Distill the model given by CHECKPOINT (teacher) into a student; runs data-parallel under torchrun."""
    from deploytool.commands import distill_file, distill_recipe

    options = _model(checkpoint, factory, factory_args, inputs, outputs, trust_checkpoint)
    recipe = distill_recipe(options, student_checkpoint, student_factory, train_data, val_data, task, **settings)
    if dry_run:
        return _print_recipe(recipe.absolute().to_toml())
    try:
        record = distill_file(options, recipe, out, force, _progress())
    finally:
        _notes(options.notes, err=True)
    if record is not None:  # None: a torchrun follower, which writes and prints nothing
        click.echo(f"wrote {out}: best validation {record.metric} {record.best_score:.4f} at epoch {record.best_epoch} "
                   f"(before: {record.initial_score:.4f}; {record.epochs_run} epochs, {record.world_size} process(es))")


@cli.command(name="simplify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs (.npz) for the numeric check (default: seeded random).")
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def simplify_cmd(model: Path, out: Path, data: Path | None, force: bool, dry_run: bool) -> None:
    """Simplify an ONNX file with onnxsim, checking that outputs do not change."""
    from deploytool.commands import simplify_file, table_toml
    from deploytool.recipe import SimplifyConfig

    if dry_run:
        return _print_recipe(table_toml("simplify", SimplifyConfig()))
    record = simplify_file(model, out, data, force)
    _notes(record.notes)
    click.echo(f"wrote {out}: {record.nodes_before} -> {record.nodes_after} nodes, max abs error {record.max_abs_error:.3g}")


@cli.command(name="quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration data (.npz keyed by input name, or a folder).")
@click.option("--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True)
@click.option("--method", "calibration_method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
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
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def quantize_cmd(model: Path, out: Path, calibration: Path | None, fmt: str, reduce_range: str, exclude_nodes: tuple[str, ...],
                 op_types: tuple[str, ...], data: Path | None, force: bool, dry_run: bool, **settings: Any) -> None:
    """Quantize an ONNX file to int8 with ONNX Runtime (static with calibration data, or dynamic)."""
    from deploytool.commands import quantize_config, quantize_file, table_toml

    cfg, specs = quantize_config(model, calibration, data, **settings, format=fmt, exclude_nodes=list(exclude_nodes),
                          reduce_range={"auto": "auto", "on": True, "off": False}[reduce_range], op_types=list(op_types) or None)
    if dry_run:
        return _print_recipe(table_toml("quantize", cfg))
    record = quantize_file(model, specs, out, cfg, calibration, data, force, _progress())
    for node in record.float_nodes:
        click.echo(f"kept in float: {node['node']} ({node['op']}): {node['why']}")
    _notes(record.notes)
    chosen = record.settings
    click.echo(f"wrote {out} ({cfg.mode}, reduce_range={chosen['reduce_range']}: {chosen['reduce_range_reason']})")


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    import math

    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a finite number of seconds >= 0")
    return value


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
@click.option("--dry-run", is_flag=True, help="Print the configuration this command runs, as TOML, and exit.")
def verify_cmd(reference: Path, candidates: tuple[Path, ...], data: Path | None, task: str | None, gates: tuple[str, ...],
               no_default_gates: bool, throughput_batches: tuple[int, ...], no_memory: bool, seed: int, samples: int,
               save_golden: Path | None, json_out: Path | None, report_dir: Path | None, junit: Path | None, force: bool,
               dry_run: bool, **settings: Any) -> None:
    """Compare candidate ONNX models with a reference; exit 1 if a gate fails.

    REFERENCE is an ONNX file, golden outputs saved by --save-golden (or a run's golden.npz),
    or a recipe (its PyTorch model, and its validation data and gates unless given here).
    Gates the user does not name get defaults chosen by what is compared (see the README).
    """
    from deploytool.commands import table_toml, verify_config, verify_files

    cfg, run_only = verify_config(reference, candidates, gates, **settings, throughput_batches=list(throughput_batches),
                                  memory=not no_memory, default_gates=not no_default_gates)
    if dry_run:
        return _print_recipe(table_toml("verify", cfg))
    outputs = {"golden": save_golden, "json": json_out, "report": report_dir, "junit": junit}
    report = verify_files(reference, candidates, cfg, run_only, data, task, seed, samples, outputs, force)
    _show_report(report, "verify")
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
    from deploytool.commands import bench_files
    from deploytool.latency import TimingPlan
    from deploytool.stages.report import aa_lines, bench_rows

    plan = TimingPlan.for_calls(runs, block, warmup, min_seconds, max(60.0, min_seconds))
    results = bench_files(models, data, batches, threads, plan, not no_memory, json_out, force)
    _print_table(*bench_rows(results),
                 title=f"latency, {threads} thread(s), blocks of {plan.block} calls, {plan.rounds} rounds, spin-waiting off")
    for line in aa_lines(results):
        click.echo(line)


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
    try:
        cli(prog_name="deploytool")
    except KeyboardInterrupt:  # one that escaped click, e.g. while it was exiting: still 130, never a traceback
        if not DeployGroup.interrupted:
            click.echo("interrupted (SIGINT)", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
