"""Render a BenchResult as docs/benchmarks.md: setup, tables, and a reading computed from the numbers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks import relative
from benchmarks.results import BenchResult, Comparison, ToolchainEntry

# latency ratios within this band of 1.0 are called "about the same"
SAME_BAND = 0.10
# deploytool verify's speedups further than this factor from the benchmark's are pointed out
VERIFY_BAND = 1.25


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A Markdown table; `align` has one letter per column (l/r), default left for the first, right for the rest."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _kb(size: int) -> str:
    return f"{size / 1024:.1f}"


def _header(result: BenchResult) -> list[str]:
    env, lat, bat = result.environment, result.latency_plan, result.batch_plan
    cpu = env["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return [
        "# Benchmarks: deploytool against what users would use instead",
        "",
        "Regenerated whole by `make bench` (`python -m benchmarks.run`); do not edit by hand.",
        "",
        f"- **Date:** {result.started:%Y-%m-%d %H:%M} UTC; the whole run took {result.seconds / 60:.1f} min",
        f"- **CPU:** {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores visible), "
        f"ISA flags: {', '.join(cpu['isa']) or 'none detected'}",
        f"- **Threads:** {result.threads} (ONNX Runtime intra-op threads via `deploytool.runners.session_options`, "
        f"`torch.set_num_threads({result.threads})`; the recipes ran with the same torch setting)",
        f"- **Versions:** {versions}",
        f"- **Runs:** batch 1: up to {lat.rounds} rounds x {lat.block} timed calls per variant within "
        f"{lat.max_seconds:.0f} s; batch {result.batch}: up to {bat.rounds} x {bat.block} within "
        f"{bat.max_seconds:.0f} s (per checkpoint; what each got is under its table)",
        "",
    ]


def _method(result: BenchResult) -> list[str]:
    lat, bat = result.latency_plan, result.batch_plan
    return [
        "- **Toolchain:** each recipe in `recipes/` runs through the library (`load_recipe` + `run_recipe`) "
        "in a fresh process, into a temporary folder. Its artifacts are the deploytool rows, its "
        "`report.json` gives the stage times, and that process's RSS high-water mark (VmHWM) its peak memory.",
        "- **Baselines:** made from the same checkpoint with each library's defaults, as a user following "
        "the libraries' documentation would.",
        f"- **Inputs:** the same for every variant: the first validation sample (batch 1) and the first "
        f"{result.batch} (throughput). Quality runs over the whole validation set.",
        "- **Interleaving:** all variants of one checkpoint are timed in one process; each round times every "
        "variant once, so drift in machine load hits all variants alike. The order is shuffled (seeded) every "
        "round: a rotation would keep each variant behind the same predecessor, whose leftovers (busy worker "
        "threads, evicted caches) then bias it.",
        f"- **Warm-up:** every variant first gets {lat.warmup} untimed calls ({bat.warmup} at batch "
        f"{result.batch}). In each round a variant then runs {lat.block_warmup} untimed and {lat.block} timed "
        f"calls in a row ({bat.block_warmup} and {bat.block} at batch {result.batch}), as a model serving "
        "requests back to back would. Timing single alternating calls instead measures a model whose caches "
        "hold the previous variant's weights, and whose cores the previous runtime's worker threads may still "
        "be spin-waiting on. That adds latency unevenly across variants (on a busy 2-core machine PyTorch's "
        "OpenMP region suffers most), which is why deploytool's verify figures can differ from these.",
        f"- **Other processes:** rounds are grouped in segments of about {lat.segment_seconds:.0f} s. A segment "
        f"during which other processes took more than {100 * lat.max_others:.0f}% of the machine's CPU (from "
        "/proc/stat, this process subtracted) is discarded; timing then pauses until the machine is quiet "
        f"again (at most {lat.max_wait:.0f} s per timing) and goes on while its time budget lasts. If fewer "
        f"than {lat.min_rounds} quiet rounds come, all rounds are used and the table says so.",
        f"- **Figures:** latency is per call; throughput is {result.batch} / p50 of the batch-{result.batch} "
        "call. Ratios compare medians measured in the same run: absolute times on a shared machine move "
        "between runs, ratios much less.",
        "",
    ]


def _legend(comparison: Comparison) -> str:
    rows = [[f"`{r.name}`", r.variant.description] for r in comparison.rows]
    return _table(["variant", "how it was made"], rows, "ll")


def _speed_table(comparison: Comparison, batch: int) -> str:
    ref = comparison.reference
    ort = comparison.row("ort fp32")
    header = [
        "variant", "p50 ms", "p90 ms", "speedup", "vs ort fp32",
        f"b{batch} p50 ms", f"b{batch} samples/s", "throughput vs original",
    ]
    rows = []
    for row in comparison.rows:
        throughput = _div(batch * 1000.0, row.batch_p50())
        rows.append([
            f"`{row.name}`",
            _num(row.p50(), 3),
            _num(None if row.latency is None else row.latency.percentile(90), 3),
            _ratio(_div(ref.p50(), row.p50())),
            _ratio(_div(ort.p50(), row.p50()) if ort else None),
            _num(row.batch_p50(), 2),
            _num(throughput, 0),
            _ratio(_div(ref.batch_p50(), row.batch_p50())),
        ])
    return _table(header, rows)


def _quality_table(comparison: Comparison) -> str:
    ref = comparison.reference
    header = ["variant", "accuracy", "top-1 agreement", "cosine mean", "cosine min", "size KB", "size vs original"]
    rows = []
    for row in comparison.rows:
        q = row.quality
        rows.append([
            f"`{row.name}`",
            _pct(q.accuracy if q else None),
            _pct(q.top1_agreement if q else None),
            _num(q.cosine_mean if q else None, 5),
            _num(q.cosine_min if q else None, 5),
            _kb(row.variant.size_bytes),
            _ratio(_div(row.variant.size_bytes, ref.variant.size_bytes)),
        ])
    return _table(header, rows)


def _stage_names(entries: Sequence[ToolchainEntry]) -> list[str]:
    names: list[str] = []
    for entry in entries:
        names += [s for s in entry.run.stage_seconds if s not in names]
    return names


def _toolchain_table(result: BenchResult) -> str:
    stages = _stage_names(result.toolchain)
    header = ["recipe", *[f"{s} s" for s in stages], "stages total s", "process wall s", "peak RSS MiB"]
    rows = []
    for entry in result.toolchain:
        times = entry.run.stage_seconds
        total = sum(t for t in times.values() if t is not None)
        rows.append([
            f"`{entry.recipe.name}`",
            *[_num(times.get(s), 2) for s in stages],
            _num(total, 1),
            _num(entry.run.process_seconds, 1),
            _num(entry.run.peak_rss_bytes / 2**20, 0),
        ])
    floor = [
        "imports only (python + torch, onnx, onnxruntime, onnxsim)",
        *["" for _ in stages], "", "", _num(result.import_floor_rss / 2**20, 0),
    ]
    return _table(header, [*rows, floor])


@dataclass
class VerifyCheck:
    """deploytool verify's own figures for one artifact, next to this benchmark's."""

    name: str
    reported_speedup: float | None
    measured_speedup: float | None
    reported_accuracy: float | None
    passed: bool


def _verify_checks(result: BenchResult) -> list[VerifyCheck]:
    checks = []
    for entry in result.toolchain:
        report = entry.run.report
        comparison = _comparison_of(result, entry)
        for model in ("fp32", "int8"):
            metrics = report.get("metrics", {}).get(model)
            row = comparison.row(f"deploytool {entry.recipe.name} {model}") if comparison else None
            if metrics is None or row is None or comparison is None:
                continue
            measured = _div(comparison.reference.p50(), row.p50())
            passed = bool(report.get("passed"))
            checks.append(VerifyCheck(row.name, metrics.get("speedup"), measured, metrics.get("accuracy"), passed))
    return checks


def _verify_table(result: BenchResult) -> str:
    rows = [
        [
            f"`{c.name}`", _ratio(c.reported_speedup), _ratio(c.measured_speedup),
            _pct(c.reported_accuracy), "pass" if c.passed else "FAIL",
        ]
        for c in _verify_checks(result)
    ]
    return _table(["model", "verify speedup", "benchmark speedup", "verify accuracy", "gates"], rows)


def _comparison_of(result: BenchResult, entry: ToolchainEntry) -> Comparison | None:
    return next((c for c in result.comparisons if entry in c.entries), None)


def _verdict(ratio: float | None) -> str:
    if ratio is None:
        return "not measured"
    if abs(ratio - 1.0) <= SAME_BAND:
        return f"about the same ({ratio:.2f}x)"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def _int8_reading(comparison: Comparison, batch: int, isa: Sequence[str]) -> list[str]:
    lines = []
    not_faster = []
    for row in comparison.rows:
        base = comparison.row(row.variant.fp32_counterpart) if row.variant.fp32_counterpart else None
        if base is None:
            continue
        at1 = _div(base.p50(), row.p50())
        atb = _div(base.batch_p50(), row.batch_p50())
        lines.append(
            f"- `{row.name}` against `{base.name}`: {_verdict(at1)} at batch 1, {_verdict(atb)} at batch {batch}."
        )
        if at1 is not None and at1 <= 1 + SAME_BAND:
            not_faster.append(row.name)
    if not_faster:
        vnni = bool(set(isa) & {"vnni", "avx_vnni", "amx", "dotprod"})
        cpu = "this CPU" + ("" if vnni else " (no VNNI or other int8 dot-product instructions)")
        lines.append(
            f"- So int8 is **not** a latency win at batch 1 on {cpu} for: "
            + ", ".join(f"`{n}`" for n in not_faster)
            + "."
        )
    return lines


def _naive_reading(comparison: Comparison) -> list[str]:
    """deploytool's int8 of the unpruned network against the naive int8 baselines of the same network."""
    tool = next((r for r in comparison.rows if r.variant.fp32_counterpart and r.variant.source == "deploytool"
                 and not r.variant.pruned), None)
    naive = [r for r in comparison.rows if r.variant.fp32_counterpart == "ort fp32"]
    if tool is None or tool.quality is None:
        return []
    lines = []
    for row in naive:
        if row.quality is None:
            continue
        lines.append(
            f"- `{tool.name}` against `{row.name}` (the same network): {_verdict(_div(row.p50(), tool.p50()))} "
            f"at batch 1; accuracy {_pct(tool.quality.accuracy)} vs {_pct(row.quality.accuracy)}, logit cosine "
            f"{tool.quality.cosine_mean:.5f} vs {row.quality.cosine_mean:.5f}."
        )
    return lines


def _accuracy_reading(comparison: Comparison) -> list[str]:
    ref_q = comparison.reference.quality
    if ref_q is None or ref_q.accuracy is None:
        return []
    lines = [f"- The original scores {_pct(ref_q.accuracy)} on {comparison.samples} validation samples."]
    drops = []
    for row in comparison.rows[1:]:
        if row.quality is None or row.quality.accuracy is None:
            continue
        drop = ref_q.accuracy - row.quality.accuracy
        if abs(drop) >= 0.5 / comparison.samples:
            word = "loses" if drop > 0 else "gains"
            drops.append(f"`{row.name}` {word} {100 * abs(drop):.2f} points")
    if drops:
        lines.append("- Accuracy against the original: " + "; ".join(drops) + "; every other variant matches it.")
    else:
        lines.append("- Every variant matches the original's accuracy.")
    low = [r for r in comparison.rows[1:] if r.quality and r.quality.cosine_mean < 0.99]
    for pruned, why in (
        (True, "expected for a pruned, distilled network: it learns the original's decisions, not its raw logits"),
        (False, "quantization error of a copy of the original network"),
    ):
        named = [f"`{r.name}` ({r.quality.cosine_mean:.4f})" for r in low if r.quality and r.variant.pruned == pruned]
        if named:
            lines.append(f"- Logit cosine to the original below 0.99: {', '.join(named)}; {why}.")
    for recipe in (e.recipe for e in comparison.entries):
        cfg = recipe.distill
        if cfg is not None and (cfg.validation is None or cfg.validation == recipe.data.validation):
            lines.append(
                f"- `{recipe.name}` chose its best distillation epoch by accuracy on this same validation set, "
                "so its accuracy here is an optimistic estimate."
            )
    return lines


def _speed_reading(comparison: Comparison, batch: int) -> list[str]:
    timed = [r for r in comparison.rows if r.p50() is not None]
    if not timed:
        return []
    fastest = min(timed, key=lambda r: r.p50() or 0.0)
    ref = comparison.reference
    lines = [
        f"- Fastest at batch 1: `{fastest.name}`, p50 {fastest.p50():.3f} ms, "
        f"{_ratio(_div(ref.p50(), fastest.p50()))} the original's speed ({ref.p50():.3f} ms)."
    ]
    deploytool = [r for r in comparison.rows if r.variant.source == "deploytool" and r.variant.fp32_counterpart is None]
    ort, tool = comparison.row("ort fp32"), next((r for r in deploytool if not r.variant.pruned), None)
    if ort is not None and tool is not None:
        lines.append(
            f"- A plain ONNX export in ONNX Runtime is already {_ratio(_div(ref.p50(), ort.p50()))} the original; "
            f"`{tool.name}` (the same network, simplified) against it: {_verdict(_div(ort.p50(), tool.p50()))}."
        )
    pruned = [r for r in deploytool if r.variant.pruned]
    if pruned and tool is not None:
        best = min(pruned, key=lambda r: r.p50() or float("inf"))
        smaller = _ratio(_div(tool.variant.size_bytes, best.variant.size_bytes))
        lines.append(
            f"- Pruning: `{best.name}` against `{tool.name}`: "
            f"{_verdict(_div(tool.p50(), best.p50()))} at batch 1, "
            f"{_verdict(_div(tool.batch_p50(), best.batch_p50()))} at batch {batch}, file {smaller} smaller."
        )
    return lines


def _toolchain_reading(result: BenchResult) -> list[str]:
    lines = []
    for entry in result.toolchain:
        times = {k: v for k, v in entry.run.stage_seconds.items() if v is not None}
        if not times:
            continue
        slowest = max(times, key=lambda k: times[k])
        lines.append(
            f"- `{entry.recipe.name}`: {sum(times.values()):.0f} s of stages ({slowest} {times[slowest]:.0f} s), "
            f"peak RSS {entry.run.peak_rss_bytes / 2**20:.0f} MiB, of which "
            f"{result.import_floor_rss / 2**20:.0f} MiB is importing the libraries."
        )
    differ = [
        f"{c.reported_speedup:.1f}x for `{c.name}` (here: {c.measured_speedup:.1f}x)"
        for c in _verify_checks(result)
        if c.reported_speedup is not None and c.measured_speedup is not None
        and not 1 / VERIFY_BAND <= c.reported_speedup / c.measured_speedup <= VERIFY_BAND
    ]
    if differ:
        lines.append(
            f"- deploytool's own verify stage reported speedups over PyTorch that differ from this benchmark's by "
            f"more than {VERIFY_BAND:.2f}x: " + "; ".join(differ) + ". Verify times single alternating calls "
            "(see How it is measured), so its `speedup` and its `min_speedup` gate depend on which model ran "
            "just before and on what else the machine was doing."
        )
    return lines


def _timing_line(comparison: Comparison) -> str:
    """How each batch size was sampled: rounds kept and discarded, and what other processes took meanwhile."""
    parts = []
    for batch, timing in comparison.timings.items():
        if timing.filtered:
            others = "unknown" if timing.others_kept is None else f"{100 * timing.others_kept:.0f}%"
            parts.append(
                f"batch {batch}: {timing.kept} quiet rounds kept ({timing.calls} timed calls per variant), "
                f"{timing.dropped} discarded, {timing.waited:.0f} s paused for other processes (their CPU share "
                f"in the kept rounds: {others})"
            )
        else:
            parts.append(
                f"batch {batch}: only {timing.kept} of {timing.kept + timing.dropped} rounds were quiet when the "
                f"time budget ran out (after {timing.waited:.0f} s paused for other processes), so all are used "
                f"({timing.calls} timed calls per variant; noisy)"
            )
    return "Timing: " + "; ".join(parts) + "."


def _load_reading(comparison: Comparison) -> list[str]:
    noisy = [f"batch {b}" for b, t in comparison.timings.items() if not t.filtered or (t.others_kept or 0.0) > 0.1]
    if not noisy:
        return []
    return [
        f"- Other processes kept the machine busy while {' and '.join(noisy)} were timed: absolute times there, "
        "p90s above all, are noisy. PyTorch's two-thread OpenMP region loses the most when a core is taken away, "
        "so the `pytorch` rows, and every ratio relative to them, are the least reliable numbers; ratios between "
        "ONNX Runtime rows hold better."
    ]


def _reading(result: BenchResult) -> list[str]:
    isa = result.environment["cpu"].get("isa", [])
    lines = ["## Reading", ""]
    for comparison in result.comparisons:
        lines += [f"**{comparison.title}**", ""]
        lines += _speed_reading(comparison, result.batch)
        lines += _int8_reading(comparison, result.batch, isa)
        lines += _naive_reading(comparison)
        lines += _accuracy_reading(comparison)
        lines += [f"- {note}" for note in comparison.notes]
        lines += [*_load_reading(comparison), ""]
    lines += ["**Toolchain**", "", *_toolchain_reading(result)]
    lines += [
        f"- **Recipe `{path}` failed** and is missing from the tables: {why}" for path, why in result.failed.items()
    ]
    return [*lines, ""]


def render(result: BenchResult) -> str:
    """The whole docs/benchmarks.md."""
    lines = _header(result)
    lines += _reading(result)
    for comparison in result.comparisons:
        recipes = ", ".join(f"`{relative(e.run.recipe_path)}`" for e in comparison.entries)
        lines += [
            f"## {comparison.title}",
            "",
            f"Recipes: {recipes}. Quality on `{comparison.dataset}` ({comparison.samples} samples); "
            "speedup = original p50 / variant p50 at batch 1.",
            "",
            _timing_line(comparison),
            "",
            "### Variants",
            "",
            _legend(comparison),
            "",
            "### Speed",
            "",
            _speed_table(comparison, result.batch),
            "",
            "### Quality and size",
            "",
            "Accuracy against the labels; top-1 agreement and cosine against the original's logits.",
            "",
            _quality_table(comparison),
            "",
        ]
    lines += [
        "## Toolchain cost",
        "",
        "Wall time of each deploytool stage (from `report.json`), the recipe process's wall time "
        "(including imports) and its peak RSS. The export stage of a pruning recipe also exports the "
        "unpruned model for comparison; verify includes deploytool's own latency measurement.",
        "",
        _toolchain_table(result),
        "",
        "What deploytool's verify stage reported in the same run, next to this benchmark's measurement:",
        "",
        _verify_table(result),
        "",
        "## How it is measured",
        "",
        *_method(result),
    ]
    return "\n".join(lines).rstrip() + "\n"
