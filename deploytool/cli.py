"""The deploytool commands: options in, a library call (deploytool.commands, deploytool.pipeline), its result printed
(deploytool.console). How errors and signals end the program, and its exit codes, is deploytool.exits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deploytool import __version__
from deploytool.console import exit_on_gates, notes, print_recipe, print_table, progress, show_report
from deploytool.errors import UserError
from deploytool.exits import DeployGroup, run_main
from deploytool.gates import DEFAULT_MIN_COSINE
from deploytool.hardware import DEFAULT_THREADS
from deploytool.options import command_options, model_options, seconds

if TYPE_CHECKING:
    from deploytool.commands import ModelOptions


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
        from deploytool.stages.inspect import recipe_io

        found = resolved.model.onnx is not None and resolved.resolve(resolved.model.onnx).is_file()
        click.echo(f"# resolved recipe (relative paths are relative to {resolved.base_dir})")
        click.echo((recipe_io(resolved) if found else resolved).to_toml(), nl=False)
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
    result = run_recipe(resolved, out_dir, force=force, progress=progress(), use_cache=not no_cache, junit=junit)
    show_report(result.report, resolved.name)
    click.echo(f"artifacts and report in {out_dir}")
    exit_on_gates(result.report)
    click.echo("PASSED")


@cli.command()
@model_options
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--opset", default=18, show_default=True, type=int)
@click.option("--static-batch", is_flag=True, help="Fix the batch axis instead of making it dynamic.")
@click.option("--data", type=click.Path(path_type=Path), help="Sample inputs (.npz) for tracing and the numeric check.")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Run onnxsim with a numeric check.")
@command_options
def export(model: ModelOptions, out: Path, opset: int, static_batch: bool, data: Path | None, simplify: bool, run_dir: Path | None,
           force: bool, dry_run: bool) -> None:
    """Export a checkpoint (state_dict, or a pruned .safetensors) to a checked ONNX file."""
    from deploytool.commands import export_file, export_recipe

    recipe = export_recipe(model, opset, static_batch, data, simplify)
    if dry_run:
        return print_recipe(recipe.absolute().to_toml())
    report = export_file(recipe, out, force, run_dir, progress())
    notes(report.notes)
    record = report.export or {}
    click.echo(f"wrote {out} ({record['exporter']} exporter, opset {record['opset']}, "
               f"max abs error vs PyTorch {record['max_abs_error']:.3g})")


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
@command_options
def prune_cmd(model: ModelOptions, out: Path, data: Path | None, ignore: tuple[str, ...], scan: bool, task: str, run_dir: Path | None,
              force: bool, dry_run: bool, **settings: Any) -> None:
    """Prune a checkpoint; writes safetensors that reload with the same factory (no pickle)."""
    from deploytool.commands import prune_file, prune_recipe
    from deploytool.stages.report import sensitivity_rows

    recipe = prune_recipe(model, data, task, **settings, ignore=list(ignore), sensitivity=scan)
    if dry_run:
        return print_recipe(recipe.absolute().to_toml())
    report = prune_file(recipe, out, force, run_dir, progress())
    record = report.prune or {}
    if record.get("sensitivity"):
        print_table(*sensitivity_rows(record["sensitivity"]), title="sensitivity (score with only this layer pruned)")
    notes(report.notes)
    macs = f", MACs {record['macs_before']:,} -> {record['macs_after']:,}" if record.get("macs_before") and record.get("macs_after") else ""
    click.echo(f"wrote {out}: params {record['params_before']:,} -> {record['params_after']:,}{macs}; "
               f"never pruned: {', '.join(record['ignored']) or '-'}")


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
@command_options
def distill_cmd(model: ModelOptions, student_checkpoint: Path | None, student_factory: str | None, train_data: Path,
                val_data: Path | None, out: Path, task: str, run_dir: Path | None, force: bool, dry_run: bool, **settings: Any) -> None:
    """Distill the model given by CHECKPOINT (teacher) into a student; runs data-parallel under torchrun."""
    from deploytool.commands import distill_file, distill_recipe

    recipe = distill_recipe(model, student_checkpoint, student_factory, train_data, val_data, task, **settings)
    if dry_run:
        return print_recipe(recipe.absolute().to_toml())
    report = distill_file(recipe, out, force, run_dir, progress())
    if report is not None:  # None: a torchrun follower, which writes and prints nothing
        record = report.distill or {}
        notes(report.notes)
        click.echo(f"wrote {out}: best validation {record['metric']} {record['best_score']:.4f} at epoch {record['best_epoch']} "
                   f"(before: {record['initial_score']:.4f}; {record['epochs_run']} epochs, {record['world_size']} process(es))")


@cli.command(name="simplify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs (.npz) for the numeric check (default: seeded random).")
@command_options
def simplify_cmd(model: Path, out: Path, data: Path | None, run_dir: Path | None, force: bool, dry_run: bool) -> None:
    """Simplify an ONNX file with onnxsim, checking that outputs do not change."""
    from deploytool.commands import simplify_file, simplify_recipe

    recipe = simplify_recipe(model, data)
    if dry_run:
        return print_recipe(recipe.absolute().to_toml())
    report = simplify_file(recipe, out, force, run_dir, progress())
    record = report.simplify or {}
    notes(report.notes)
    click.echo(f"wrote {out}: {record['nodes_before']} -> {record['nodes_after']} nodes, max abs error {record['max_abs_error']:.3g}")


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
@click.option("--min-cosine", default=DEFAULT_MIN_COSINE, show_default=True, type=float, help="Search target: cosine to the fp32 model.")
@click.option("--max-accuracy-drop", type=float, help="Search target: accuracy drop against the fp32 model (needs labels).")
@click.option("--threads", default=DEFAULT_THREADS, show_default=True, type=int, help="Threads for the speed search's timings.")
@command_options
def quantize_cmd(model: Path, out: Path, calibration: Path | None, fmt: str, reduce_range: str, exclude_nodes: tuple[str, ...],
                 op_types: tuple[str, ...], data: Path | None, run_dir: Path | None, force: bool, dry_run: bool, **settings: Any) -> None:
    """Quantize an ONNX file to int8 with ONNX Runtime (static with calibration data, or dynamic)."""
    from deploytool.commands import quantize_file, quantize_recipe

    recipe = quantize_recipe(model, calibration, data, **settings, format=fmt, exclude_nodes=list(exclude_nodes),
                             reduce_range={"auto": "auto", "on": True, "off": False}[reduce_range], op_types=list(op_types) or None)
    if dry_run:
        return print_recipe(recipe.absolute().to_toml())
    report = quantize_file(recipe, out, force, run_dir, progress())
    record = report.quantization or {}
    for node in record.get("float_nodes", []):
        click.echo(f"kept in float: {node['node']} ({node['op']}): {node['why']}")
    notes(report.notes)
    click.echo(f"wrote {out} ({record['mode']}, reduce_range={record['reduce_range']}: {record['reduce_range_reason']})")


@cli.command(name="verify")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Validation data (.npz; may hold labels). Default: seeded random inputs.")
@click.option("--task", type=click.Choice(["classification", "embedding", "regression", "generic"]),
              help="Task metrics to compute (default: the recipe's, else generic).")
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
              help="e.g. min_cosine=0.99, max_accuracy_drop=0.01, atol=1e-3; repeatable; overrides a recipe's gates.")
@click.option("--no-default-gates", is_flag=True, help="Apply only the gates named (by --gate or the recipe), no defaults.")
@click.option("--threads", default=DEFAULT_THREADS, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=100, show_default=True, type=click.IntRange(min=1), help="Timed calls per model (in blocks).")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--min-seconds", default=0.0, show_default=True, type=float, callback=seconds, help="Keep timing at least this long.")
@click.option("--max-seconds", default=60.0, show_default=True, type=float, callback=seconds,
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
        return print_recipe(table_toml("verify", cfg))
    outputs = {"golden": save_golden, "json": json_out, "report": report_dir, "junit": junit}
    report = verify_files(reference, candidates, cfg, run_only, data, task, seed, samples, outputs, force)
    show_report(report, "verify")
    exit_on_gates(report)
    click.echo("PASSED")


@cli.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Inputs (.npz); default: seeded random inputs.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Batch size; repeatable (default 1).")
@click.option("--threads", default=DEFAULT_THREADS, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed calls per model (in blocks).")
@click.option("--block", default=10, show_default=True, type=click.IntRange(min=1), help="Timed calls per block.")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--min-seconds", default=0.0, show_default=True, type=float, callback=seconds)
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
    print_table(*bench_rows(results),
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
    print_table(["op", "count"], [[op, str(n)] for op, n in info["ops"].items()], title="operators")


def main() -> None:
    run_main(cli)


if __name__ == "__main__":
    main()
