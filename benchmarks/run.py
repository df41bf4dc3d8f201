"""`make bench`: run every sample recipe, build the baselines, measure them all side by side,
and regenerate docs/benchmarks.md.

Latency is deploytool's own block method (deploytool.latency), with an A/A control; next to it,
what each run's verify stage reported for the same models (report.json).

    python -m benchmarks.run [--recipes recipes/a.toml ...] [--out docs/benchmarks.md] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import ROOT, relative
from benchmarks.measure import Quiet, Timing, accepts_batch, block_latency, first_output, quality
from benchmarks.report import AA_VARIANT, TORCH_REFERENCE
from benchmarks.results import BenchResult, Comparison, Row, ToolchainEntry
from benchmarks.toolchain import import_floor_rss, run_recipe_process
from benchmarks.variants import (
    NotApplicable,
    Variant,
    deploytool_variants,
    ort_dynamic_defaults,
    ort_fp32,
    ort_static_defaults,
    plain_export,
    torch_dynamic_int8,
    torch_fp32,
)
from deploytool.data import Dataset
from deploytool.errors import DeployError
from deploytool.latency import TimingPlan
from deploytool.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    import torch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", type=Path, help="recipes to benchmark (default: recipes/*.toml)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown file to write")
    parser.add_argument("--work-dir", type=Path, help="keep the artifacts here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for ONNX Runtime and PyTorch "
                        "(default: each recipe's [verify] threads, the CPU it is meant for; 2 without [verify])")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the throughput row")
    parser.add_argument("--rounds", type=int, default=30, help="most rounds at batch 1 (one block per variant each)")
    parser.add_argument("--block", type=int, default=40, help="timed calls per variant per round at batch 1")
    parser.add_argument("--block-warmup", type=int, default=10, help="untimed calls before each block at batch 1")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up calls per variant before timing at batch 1")
    parser.add_argument("--seconds", type=float, default=25.0, help="time budget at batch 1, per checkpoint")
    parser.add_argument("--batch-rounds", type=int, default=20, help="most rounds at the throughput batch")
    parser.add_argument("--batch-block", type=int, default=3, help="timed calls per variant per round (throughput)")
    parser.add_argument("--batch-block-warmup", type=int, default=4, help="untimed calls before each throughput block")
    parser.add_argument("--batch-seconds", type=float, default=40.0, help="time budget at the throughput batch")
    parser.add_argument("--max-others", type=float, default=0.15,
                        help="before timing, wait while other processes take more than this share of the CPU")
    parser.add_argument("--max-wait", type=float, default=45.0, help="wait at most this long (s) per timing")
    return parser.parse_args(argv)


def step(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def versions() -> dict[str, str | None]:
    """Library versions: deploytool's environment record plus the packages only the benchmark uses."""
    from deploytool.stages.report import environment

    found: dict[str, str | None] = dict(environment(None)["versions"])
    for package in ("onnxscript", "torch-pruning"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def original_key(recipe: Recipe) -> tuple[str, str]:
    """Recipes sharing a factory and checkpoint share one original model, hence one comparison."""
    target, _, attr = recipe.model.factory.rpartition(":")
    factory = str(recipe.resolve(target)) + ":" + attr if target.endswith(".py") else recipe.model.factory
    checkpoint = str(recipe.resolve(recipe.model.checkpoint)) if recipe.model.checkpoint else ""
    return factory, checkpoint


def group_recipes(entries: Sequence[ToolchainEntry]) -> list[list[ToolchainEntry]]:
    groups: dict[tuple[str, str], list[ToolchainEntry]] = {}
    for entry in entries:
        groups.setdefault(original_key(entry.recipe), []).append(entry)
    return list(groups.values())


DEFAULT_THREADS = 2


def recipe_threads(recipe: Recipe, threads: int | None) -> int:
    """The threads a recipe's models are timed at: --threads, else the recipe's own [verify] threads."""
    return threads or (recipe.verify.threads if recipe.verify else DEFAULT_THREADS)


def group_threads(group: Sequence[ToolchainEntry], threads: int | None) -> int:
    """One thread count for all variants of a model (they are timed side by side): its recipes', the most of them."""
    return max(recipe_threads(entry.recipe, threads) for entry in group)


def run_toolchain(paths: Sequence[Path], work: Path, threads: int | None) -> tuple[list[ToolchainEntry], dict[str, str]]:
    """Run each recipe through deploytool; returns the runs and, by recipe path, the recipes that failed."""
    entries, failed = [], {}
    for path in paths:
        step(f"running recipe {path.name} through deploytool")
        try:
            recipe = load_recipe(path)
            # torch's threads for the run's training; its verify pins [verify] threads for every timing itself
            run = run_recipe_process(path.resolve(), work / "runs" / recipe.name, threads or DEFAULT_THREADS, ROOT)
        except (DeployError, RuntimeError) as exc:
            failed[relative(path)] = str(exc).strip().splitlines()[0][:300]
            step(f"  failed: {failed[relative(path)]}")
            continue
        step(f"  {recipe.name}: {run.process_seconds:.0f} s, peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB")
        entries.append(ToolchainEntry(recipe, run))
    return entries, failed


def datasets(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """(evaluation data, calibration data) of a recipe: [data] validation, else calibration; loaded as a run
    loads them (files relative to the recipe, image folders, module:callable sources)."""
    from deploytool.data import data_source

    data = recipe.data
    calibration = data_source(recipe, data.calibration) if data.calibration else None
    validation = data_source(recipe, data.validation) if data.validation else None
    evaluation = validation or calibration
    if evaluation is None:
        raise SystemExit(f"recipe {recipe.name}: benchmarking needs [data] validation or calibration")
    return evaluation, calibration


def build_baselines(
    recipe: Recipe, model: torch.nn.Module, sample: Dataset, calibration: Dataset | None, work: Path, threads: int
) -> tuple[list[Variant], list[str]]:
    """The original, and what a user would make of it with each library's defaults; notes on those that failed."""
    variants = [torch_fp32(recipe, model)]
    notes: list[str] = []

    def attempt(what: str, build: Callable[[], Variant]) -> None:
        try:
            variants.append(build())
        except NotApplicable as exc:
            notes.append(f"not applicable: {exc}")
        except Exception as exc:  # a baseline that breaks is a finding to report, not a reason to stop
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{what} failed: {type(exc).__name__}: {reason}")

    attempt("pytorch dynamic int8", lambda: torch_dynamic_int8(recipe, model, work / "torch-dynamic"))
    try:
        exported = plain_export(recipe, model, sample, work / "ort-fp32")
    except Exception as exc:
        notes.append(f"plain torch.onnx.export failed, no ONNX baselines: {type(exc).__name__}: {exc}")
        return variants, notes
    attempt("ort fp32", lambda: ort_fp32(exported, threads))
    if calibration is not None:
        attempt("ort static int8", lambda: ort_static_defaults(exported, calibration, work / "ort-static", threads))
    else:
        notes.append("not applicable: ort static int8 needs calibration data")
    attempt("ort dynamic int8", lambda: ort_dynamic_defaults(exported, work / "ort-dynamic", threads))
    return variants, notes


def measure_quality(rows: list[Row], evaluation: Dataset, task: str, batch: int) -> None:
    """Fill in every row's quality against the first row (the original), in place."""
    reference = first_output(rows[0].variant.runner, evaluation, batch)
    for row in rows:
        output = reference if row is rows[0] else first_output(row.variant.runner, evaluation, batch)
        row.quality = quality(reference, output, evaluation.labels, task)


def measure_speed(rows: list[Row], evaluation: Dataset, args: argparse.Namespace) -> tuple[dict[int, Timing], int]:
    """Fill in batch-1 and throughput-batch latency of every row, in place, by deploytool.latency's block
    method; returns how each batch size was sampled, and the throughput batch size.

    The A/A control is `ort fp32` (else the first row): timed a second time as a variant of its own.
    At batch 1 the eager original gets an A/A copy too, as in deploytool's own verify."""
    timings: dict[int, Timing] = {}
    throughput = min(args.batch, len(evaluation))
    sizes = [(1, latency_plan(args), "latency", (TORCH_REFERENCE,))]
    if throughput != 1:
        sizes.append((throughput, batch_plan(args), "batch_latency", ()))
    for batch, plan, attr, controls in sizes:
        timed = [r for r in rows if accepts_batch(r.variant.runner, batch)]
        if not timed:
            continue
        control = next((r for r in timed if r.name == AA_VARIANT), timed[0])
        ordered = [control, *(r for r in timed if r is not control)]
        feeds = next(evaluation.head(batch).batches(batch))
        step(f"  timing {len(timed)} variants at batch {batch}: up to {plan.rounds} rounds in {plan.max_seconds:.0f} s")
        timing = block_latency([r.variant.runner for r in ordered], feeds, plan, batch, quiet(args), controls)
        others = "unknown" if timing.others is None else f"{100 * timing.others:.0f}%"
        waited = f", waited {timing.waited:.0f} s for a quiet machine" if timing.waited else ""
        busy = "" if timing.quiet else " (still busy)"
        aa = ", ".join(f"A/A {name} {timing.aa(name)}" for name in timing.controls)
        step(f"    {timing.rounds} rounds in {timing.measurement.seconds:.0f} s{waited}{busy}; "
             f"others took {others} of the CPU; {aa}")
        for row in timed:
            setattr(row, attr, timing.timed(row.name))
        timings[batch] = timing
    return timings, throughput


def latency_plan(args: argparse.Namespace) -> TimingPlan:
    return TimingPlan(
        rounds=args.rounds, block=args.block, block_warmup=args.block_warmup, warmup=args.warmup,
        max_rounds=args.rounds, max_seconds=args.seconds,
    )


def batch_plan(args: argparse.Namespace) -> TimingPlan:
    return TimingPlan(
        rounds=args.batch_rounds, block=args.batch_block, block_warmup=args.batch_block_warmup, warmup=2,
        max_rounds=args.batch_rounds, max_seconds=args.batch_seconds,
    )


def quiet(args: argparse.Namespace) -> Quiet:
    return Quiet(max_others=args.max_others, max_wait=args.max_wait)


def compare(group: list[ToolchainEntry], work: Path, args: argparse.Namespace) -> Comparison:
    """Baselines and deploytool rows of one original model, measured together."""
    import torch

    from deploytool.stages.load import load_model

    recipe = group[0].recipe
    evaluation, calibration = datasets(recipe)
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    model = load_model(recipe.model.factory, checkpoint, recipe.base_dir, factory_args=recipe.model.factory_args)
    step(f"building baselines for {checkpoint.name if checkpoint else recipe.model.factory}")
    folder = work / "baselines" / recipe.name
    threads = group_threads(group, args.threads)
    torch.set_num_threads(threads)
    baselines, notes = build_baselines(recipe, model, evaluation.head(2), calibration, folder, threads)
    variants = [*baselines]
    for entry in group:
        variants += deploytool_variants(entry.recipe, entry.run, threads)
    rows = [Row(v) for v in variants]
    measure_quality(rows, evaluation, recipe.data.task, args.batch)
    timings, throughput = measure_speed(rows, evaluation, args)
    title = f"{type(model).__name__} from `{relative(checkpoint)}`" if checkpoint else type(model).__name__
    source = relative(Path(evaluation.source)) if Path(evaluation.source).exists() else evaluation.source
    return Comparison(title, source, len(evaluation), recipe.data.task, group, rows, notes, timings, throughput, threads)


def benchmark(args: argparse.Namespace, work: Path) -> BenchResult:
    from deploytool.hardware import cpu_info

    started = datetime.now(UTC)
    paths = args.recipes or sorted((ROOT / "recipes").glob("*.toml"), key=lambda p: p.stem)
    entries, failed = run_toolchain(paths, work, args.threads)
    floor = import_floor_rss(ROOT)
    comparisons = [compare(group, work, args) for group in group_recipes(entries)]
    environment: dict[str, Any] = {"cpu": cpu_info(), "versions": versions()}
    return BenchResult(
        started, environment, args.threads, args.batch, latency_plan(args), batch_plan(args), quiet(args),
        comparisons, entries, floor, failed,
    )


def summary(result: BenchResult) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for comparison in result.comparisons:
        ref = comparison.reference.name
        for row in comparison.rows:
            ms = row.ms()
            ratio = comparison.speedup(ref, row.name)
            speedup = "-" if ratio is None else str(ratio)
            acc = row.quality.accuracy if row.quality else None
            accuracy = f"{100 * acc:6.2f}%" if acc is not None else "      -"
            size = row.variant.size_bytes / 1024
            lines.append(f"  {row.name:<40} {ms or 0:8.3f} ms  {speedup:<26} acc {accuracy}  {size:7.1f} KB")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.report import render
    from deploytool.artifacts import write_text

    args = parse_args(argv)
    start = time.perf_counter()
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, args.work_dir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="deploytool-bench-") as folder:
            result = benchmark(args, Path(folder))
    result.seconds = time.perf_counter() - start
    write_text(args.out, render(result))
    print("\n".join(summary(result)))
    step(f"wrote {relative(args.out)} in {result.seconds / 60:.1f} min")
    for path, reason in result.failed.items():
        step(f"recipe {path} failed and is missing from the tables: {reason}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
