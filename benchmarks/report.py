"""Render a BenchResult as docs/benchmarks.md: setup, tables, and a reading computed from the numbers.

Every speed ratio is printed with its bootstrap confidence interval (deploytool.latency.Ratio)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import relative
from benchmarks.results import BenchResult, Comparison, ToolchainEntry
from benchmarks.variants import run_rows
from deploytool.latency import AA_SUFFIX, Ratio, Timed

# latency ratios within this band of 1.0 are called "about the same"
SAME_BAND = 0.10
# deploytool's own verify speedups and this benchmark's for the same models should agree within this
VERIFY_BAND = 0.10
# an A/A control further than this from 1.00 makes the measurement noisy
AA_BAND = 0.05
# the variant every comparison's A/A control times twice, and the eager PyTorch original
AA_VARIANT = "ort fp32"
TORCH_REFERENCE = "pytorch fp32"


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


def _ci(ratio: Ratio | None) -> str:
    """A ratio with its interval: 1.44x [1.40, 1.48]."""
    return "-" if ratio is None else f"{ratio.value:.2f}x [{ratio.low:.2f}, {ratio.high:.2f}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _signed_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _kb(size: int) -> str:
    return f"{size / 1024:.1f}"


def _header(result: BenchResult) -> list[str]:
    env, lat, bat = result.environment, result.latency_plan, result.batch_plan
    cpu = env["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    counts = sorted({c.threads for c in result.comparisons})
    threads = (str(result.threads) if result.threads else
               "each model at its recipes' `[verify] threads`, the CPU they are meant for (" +
               ", ".join(f"{n}: {', '.join(f'`{c.entries[0].recipe.name}`' for c in result.comparisons if c.threads == n)}"
                         for n in counts) + ")")
    return [
        "# Benchmarks: deploytool against what users would use instead",
        "",
        "Regenerated whole by `make bench` (`python -m benchmarks.run`); do not edit by hand.",
        "",
        f"- **Date:** {result.started:%Y-%m-%d %H:%M} UTC; the whole run took {result.seconds / 60:.1f} min",
        f"- **CPU:** {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores visible), "
        f"ISA flags: {', '.join(cpu['isa']) or 'none detected'}",
        f"- **Threads:** {threads} (ONNX Runtime intra-op threads via `deploytool.runners.session_options`, "
        "spin-waiting off, and `torch.set_num_threads`; the recipe runs trained with 2 torch threads, or `--threads`, "
        "and their verify stage pinned `[verify] threads`)",
        f"- **Versions:** {versions}",
        f"- **Latency:** deploytool's own block method (`deploytool.latency`, as in `deploytool verify`): batch 1: "
        f"up to {lat.rounds} rounds x one block of {lat.block} timed calls per variant within {lat.max_seconds:.0f} s; "
        f"batch {result.batch}: up to {bat.rounds} x {bat.block} within {bat.max_seconds:.0f} s (per checkpoint; "
        "what each got is under its table). Ratios carry 95% bootstrap intervals: `1.44x [1.40, 1.48]`.",
        "- **Also:** [calibration memory](calibration-memory.md) (`make bench-memory`) and "
        "[verify memory](verify-memory.md) on an EfficientNet-B0-sized CNN (`make bench-verify-memory`).",
        "",
    ]


def _method(result: BenchResult) -> list[str]:
    lat, bat, quiet = result.latency_plan, result.batch_plan, result.quiet
    batch = result.batch
    return [
        "- **Toolchain:** each recipe in `recipes/` runs through the library (`load_recipe` + `run_recipe`) "
        "in a fresh process, into a temporary folder. Its artifacts are the deploytool rows, its "
        "`report.json` gives the stage times and its verify stage's own speedups, and that process's RSS "
        "high-water mark (VmHWM) its peak memory.",
        "- **Baselines:** made from the same checkpoint with each library's defaults, as a user following "
        "the libraries' documentation would.",
        f"- **Inputs:** the same for every variant: the first validation sample (batch 1) and the first "
        f"{batch} (throughput). Quality runs over the whole validation set.",
        "- **One latency method:** `deploytool.latency`, the same code `deploytool verify`, runs and "
        "`deploytool bench` time models with. All variants of one checkpoint are timed together in one process. "
        f"Each first gets {lat.warmup} untimed calls ({bat.warmup} at batch {batch}); then, in every round, each "
        f"variant runs {lat.block_warmup} untimed calls, which absorb what the previous variant left behind, and "
        f"one block of {lat.block} timed calls ({bat.block_warmup} and {bat.block} at batch {batch}), back to back "
        "as a model serving requests would. The order of the blocks is shuffled afresh every round (seeded): a "
        "fixed rotation would keep each variant behind the same predecessor.",
        "- **Spinning off:** ONNX Runtime sessions use deploytool's deploy-time options "
        "(`deploytool.runners.session_options`), with intra-op spin-waiting off "
        "(`session.intra_op.allow_spinning = 0`), so idle worker threads do not take the cores from the variant "
        "timed next. Eager PyTorch runs in blocks of its own, like every other variant.",
        "- **Estimate:** a variant's latency is the median of its block means; p90 is over single timed calls. "
        f"Every ratio is the ratio of two such medians with a {100 * lat.confidence:.0f}% bootstrap confidence "
        f"interval ({lat.resamples} resamples over rounds; the blocks of one round are paired, so slow drifts of "
        "the machine cancel). Absolute times on a shared machine move between runs, ratios much less.",
        f"- **A/A control:** `{AA_VARIANT}` is timed a second time, as a second session of the same file "
        f"(`{AA_VARIANT}{AA_SUFFIX}`), like any other variant. Its ratio to itself must be 1.00; its distance from "
        "1.00 is the noise floor of the measurement, and smaller differences are not resolved. At batch 1 "
        f"`{TORCH_REFERENCE}` gets an A/A copy too (a second runner on the same module), to show the noise of "
        "eager PyTorch; deploytool's own verify times its first ONNX model (the run's fp32) twice.",
        f"- **Other processes:** before each timing the benchmark waits (at most {quiet.max_wait:.0f} s) until "
        f"other processes take at most {100 * quiet.max_others:.0f}% of the machine's CPU (from /proc/stat, this "
        "process subtracted), and it records their share while it times; that share is under each table. "
        "Nothing is discarded or re-timed.",
        f"- **Figures:** latency is per call; throughput is {batch} x 1000 / the batch-{batch} latency in ms.",
        "",
    ]


# --- speed, quality, toolchain tables ------------------------------------------------------------


@dataclass
class _Line:
    """One line of the speed table: a variant or an A/A copy."""

    name: str
    at1: Timed | None
    atb: Timed | None


def _speed_lines(comparison: Comparison) -> list[_Line]:
    one = comparison.timings.get(1)
    many = comparison.timings.get(comparison.throughput_batch)
    lines = []
    for row in comparison.rows:
        lines.append(_Line(row.name, row.latency, row.batch_latency))
        copy = row.name + AA_SUFFIX
        at1, atb = one.timed(copy) if one else None, many.timed(copy) if many else None
        if at1 is not None or atb is not None:
            lines.append(_Line(copy, at1, atb))
    return lines


def _speed_table(comparison: Comparison) -> str:
    ref, batch = comparison.reference.name, comparison.throughput_batch
    ort = AA_VARIANT if comparison.row(AA_VARIANT) else None
    header = [
        "variant", "ms", "p90 ms", "speedup vs original", f"vs {AA_VARIANT}",
        f"b{batch} ms", f"b{batch} samples/s", "throughput vs original",
    ]
    rows = []
    for line in _speed_lines(comparison):
        throughput = _div(batch * 1000.0, line.atb.center_ms if line.atb else None)
        rows.append([
            f"`{line.name}`",
            _num(line.at1.center_ms if line.at1 else None, 3),
            _num(line.at1.percentile(90) if line.at1 else None, 3),
            _ci(comparison.speedup(ref, line.name)) if line.name != ref else "1.00x",
            (_ci(comparison.speedup(ort, line.name)) if line.name != ort else "1.00x") if ort else "-",
            _num(line.atb.center_ms if line.atb else None, 2),
            _num(throughput, 0),
            _ci(comparison.speedup(ref, line.name, batch)) if line.name != ref else "1.00x",
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
    header = ["recipe", *[f"{s} s" for s in stages], "stages total s", "process wall s", "peak RSS MiB", "gates"]
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
            "pass" if entry.run.report.get("passed") else "FAIL",
        ])
    floor = [
        "imports only (python + torch, onnx, onnxruntime, onnxsim)",
        *["" for _ in stages], "", "", _num(result.import_floor_rss / 2**20, 0), "",
    ]
    return _table(header, [*rows, floor])


# --- deploytool's own verify against this benchmark ----------------------------------------------


@dataclass
class VerifyCheck:
    """One speed ratio deploytool's verify reported in a run, next to this benchmark's for the same models."""

    recipe: str
    label: str  # what is compared, e.g. "`int8` over `fp32`"
    keys: str  # the report keys it comes from
    reported: Ratio | None
    measured: Ratio | None

    @property
    def difference(self) -> float | None:
        """reported / measured - 1."""
        if self.reported is None or self.measured is None or self.measured.value == 0:
            return None
        return self.reported.value / self.measured.value - 1.0

    @property
    def agrees(self) -> bool | None:
        difference = self.difference
        return None if difference is None else abs(difference) <= VERIFY_BAND

    @property
    def overlap(self) -> bool | None:
        if self.reported is None or self.measured is None:
            return None
        return self.reported.low <= self.measured.high and self.measured.low <= self.reported.high


def _reported(value: Any, interval: Any) -> Ratio | None:
    if not isinstance(value, (int, float)):
        return None
    low, high = interval if isinstance(interval, (list, tuple)) and len(interval) == 2 else (value, value)
    return Ratio(float(value), float(low), float(high))


def _verify_checks(result: BenchResult) -> list[VerifyCheck]:
    checks = []
    for entry in result.toolchain:
        comparison = _comparison_of(result, entry)
        report = entry.run.report
        metrics: dict[str, dict[str, Any]] = report.get("metrics", {})
        if comparison is None or not metrics:
            continue
        rows = run_rows(entry.recipe.name)
        name = entry.recipe.name
        aa = (report.get("latency") or {}).get("aa")
        if isinstance(aa, dict):
            model = aa.get("model", "reference")
            checks.append(VerifyCheck(name, f"A/A: `{model}` over its copy", "`latency.aa`",
                                      _reported(aa.get("value"), aa.get("ci")),
                                      comparison.speedup(rows.get(model), rows.get(model, "") + AA_SUFFIX)))
        ort_base = "unpruned_fp32" if "unpruned_fp32" in metrics else "fp32"
        for model in ("fp32", "unpruned_fp32", "int8", "unpruned_int8"):
            mine = metrics.get(model)
            if mine is None:
                continue
            pairs: dict[str, list[str]] = {"reference": ["speedup"]}
            if model != ort_base:
                pairs.setdefault(ort_base, []).append("speedup_vs_ort_fp32")
            if "speedup_vs_fp32" in mine:
                pairs.setdefault("fp32", []).append("speedup_vs_fp32")
            if "speedup_vs_unpruned_fp32" in mine:
                pairs.setdefault("unpruned_fp32", []).append("speedup_vs_unpruned_fp32")
            for baseline, keys in pairs.items():
                key = keys[0]
                if key not in mine:
                    continue
                checks.append(VerifyCheck(
                    name, f"`{model}` over `{baseline}`", ", ".join(f"`{k}`" for k in keys),
                    _reported(mine.get(key), mine.get(f"{key}_ci")),
                    comparison.speedup(rows[baseline], rows[model]),
                ))
    return checks


def _verify_table(result: BenchResult) -> str:
    def yes(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "**no**")

    rows = [
        [f"`{c.recipe}`", c.label, c.keys, _ci(c.reported), _ci(c.measured), _signed_pct(c.difference),
         yes(c.agrees), yes(c.overlap)]
        for c in _verify_checks(result)
    ]
    header = ["recipe", "ratio (run's names)", "report.json", "run's verify", "benchmark", "difference",
              f"within {100 * VERIFY_BAND:.0f}%", "intervals overlap"]
    return _table(header, rows, "lllrrrrr")


def _verify_section(result: BenchResult) -> list[str]:
    names = ", ".join(f"`{k}` = `{v}`" for k, v in run_rows("NAME").items())
    return [
        "## deploytool's own verify against this benchmark",
        "",
        "Each recipe's verify stage timed its models by the same method, in its own process: eager PyTorch "
        "(the run's `reference`, in blocks of its own), the fp32 and int8 ONNX models (and a pruning recipe's "
        "unpruned export) at batch 1, with its own A/A control (the fp32 model against a second session of itself). Below, "
        "the speedups it wrote into `report.json` (`metrics[*].speedup`, `speedup_vs_ort_fp32` and "
        "`speedup_vs_fp32`, each with its `_ci`), next to this benchmark's ratio for the same model files "
        f"(run names to rows: {names}). Difference = run / benchmark - 1; the target is agreement within "
        f"{100 * VERIFY_BAND:.0f}%. The run times fewer calls in smaller blocks ([verify] `runs`, `block`), so its "
        "intervals are wider.",
        "",
        _verify_table(result),
        "",
    ]


def _comparison_of(result: BenchResult, entry: ToolchainEntry) -> Comparison | None:
    return next((c for c in result.comparisons if entry in c.entries), None)


# --- reading ------------------------------------------------------------------------------------


def _verdict(ratio: Ratio | None) -> str:
    if ratio is None:
        return "not measured"
    if ratio.low <= 1.0 <= ratio.high:
        return f"no difference resolved ({_ci(ratio)})"
    if abs(ratio.value - 1.0) <= SAME_BAND:
        return f"about the same ({_ci(ratio)})"
    if ratio.value > 1:
        return f"{ratio.value:.2f}x faster [{ratio.low:.2f}, {ratio.high:.2f}]"
    return f"{1 / ratio.value:.2f}x slower [{1 / ratio.high:.2f}, {1 / ratio.low:.2f}]"


def _int8_reading(comparison: Comparison, isa: Sequence[str]) -> list[str]:
    lines = []
    not_faster = []
    batch = comparison.throughput_batch
    for row in comparison.rows:
        base = comparison.row(row.variant.fp32_counterpart) if row.variant.fp32_counterpart else None
        if base is None:
            continue
        at1 = comparison.speedup(base.name, row.name)
        atb = comparison.speedup(base.name, row.name, batch)
        lines.append(
            f"- `{row.name}` against `{base.name}`: {_verdict(at1)} at batch 1, {_verdict(atb)} at batch {batch}."
        )
        if at1 is not None and at1.value <= 1 + SAME_BAND:
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


def _products(comparison: Comparison) -> list[Any]:
    """deploytool's own fp32 rows (not int8, not the exports made only for comparison)."""
    return [r for r in comparison.rows if r.variant.source == "deploytool" and r.variant.fp32_counterpart is None
            and not r.variant.for_comparison]


def _naive_reading(comparison: Comparison) -> list[str]:
    """deploytool's int8 of the unpruned network against the naive int8 baselines of the same network."""
    tool = next((r for r in comparison.rows if r.variant.fp32_counterpart and r.variant.source == "deploytool"
                 and not r.variant.pruned), None)
    naive = [r for r in comparison.rows if r.variant.fp32_counterpart == AA_VARIANT]
    if tool is None or tool.quality is None:
        return []
    lines = []
    for row in naive:
        if row.quality is None:
            continue
        lines.append(
            f"- `{tool.name}` against `{row.name}` (the same network): "
            f"{_verdict(comparison.speedup(row.name, tool.name))} at batch 1; accuracy {_pct(tool.quality.accuracy)} "
            f"vs {_pct(row.quality.accuracy)}, logit cosine {tool.quality.cosine_mean:.5f} vs {row.quality.cosine_mean:.5f}."
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


def _speed_reading(comparison: Comparison) -> list[str]:
    timed = [r for r in comparison.rows if r.ms() is not None]
    if not timed:
        return []
    batch = comparison.throughput_batch
    fastest = min(timed, key=lambda r: r.ms() or 0.0)
    ref = comparison.reference
    lines = [
        f"- Fastest at batch 1: `{fastest.name}`, {fastest.ms():.3f} ms, "
        f"{_ci(comparison.speedup(ref.name, fastest.name))} the original's speed ({ref.ms() or 0.0:.3f} ms)."
    ]
    products = _products(comparison)
    ort, tool = comparison.row(AA_VARIANT), next((r for r in products if not r.variant.pruned), None)
    if ort is not None and tool is not None:
        lines.append(
            f"- A plain ONNX export in ONNX Runtime is already {_ci(comparison.speedup(ref.name, ort.name))} the "
            f"original; `{tool.name}` (the same network, simplified) against it: "
            f"{_verdict(comparison.speedup(ort.name, tool.name))}."
        )
    pruned = [r for r in products if r.variant.pruned]
    if pruned and tool is not None:
        best = min(pruned, key=lambda r: r.ms() or float("inf"))
        smaller = _ratio(_div(tool.variant.size_bytes, best.variant.size_bytes))
        lines.append(
            f"- Pruning: `{best.name}` against `{tool.name}`: "
            f"{_verdict(comparison.speedup(tool.name, best.name))} at batch 1, "
            f"{_verdict(comparison.speedup(tool.name, best.name, batch))} at batch {batch}, file {smaller} smaller."
        )
    return lines


def _aa_reading(comparison: Comparison) -> list[str]:
    """A warning where an A/A control is off: then differences of that size are noise."""
    lines = []
    for batch, timing in comparison.timings.items():
        for name in timing.controls:
            aa = timing.aa(name)
            if aa is not None and max(abs(aa.value - 1.0), aa.high - 1.0, 1.0 - aa.low) > AA_BAND:
                lines.append(
                    f"- The A/A control of `{name}` at batch {batch} came out at {_ci(aa)}, not 1.00 within "
                    f"{100 * AA_BAND:.0f}%: at that batch, differences of that size are noise of this measurement."
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
    checks = [c for c in _verify_checks(result) if c.agrees is not None]
    if checks:
        agree = sum(bool(c.agrees) for c in checks)
        worst = max(checks, key=lambda c: abs(c.difference or 0.0))
        lines.append(
            f"- deploytool's own verify and this benchmark agree within {100 * VERIFY_BAND:.0f}% on {agree} of "
            f"{len(checks)} speed ratios (largest difference: {_signed_pct(worst.difference)}, {worst.label} of "
            f"`{worst.recipe}`)."
        )
        apart = [c for c in checks if not c.agrees]
        if apart:
            overlapping = sum(bool(c.overlap) for c in apart)
            lines.append(
                f"- Of the {len(apart)} further apart, {overlapping} have overlapping intervals (the difference is "
                "within the noise of the shorter measurement in the run); "
                + ("the others differ beyond it." if overlapping < len(apart) else "none differs beyond it.")
            )
    return lines


def _timing_line(comparison: Comparison) -> str:
    """How each batch size was sampled: rounds, calls, A/A controls, and what other processes took meanwhile."""
    parts = []
    for batch, timing in comparison.timings.items():
        others = "unknown" if timing.others is None else f"{100 * timing.others:.0f}%"
        if not timing.quiet:
            wait = f"begun while the machine was still busy after {timing.waited:.0f} s of waiting"
        elif timing.waited:
            wait = f"begun after {timing.waited:.0f} s of waiting for a quiet machine"
        else:
            wait = "begun on a quiet machine"
        controls = "; ".join(f"A/A `{name}` {_ci(timing.aa(name))}" for name in timing.controls)
        parts.append(
            f"batch {batch}: {timing.rounds} rounds ({timing.calls} timed calls per variant) in "
            f"{timing.measurement.seconds:.0f} s, {wait}; other processes took {others} of the CPU meanwhile; "
            f"{controls}"
        )
    return "Timing: " + ". ".join(parts) + "."


def _load_reading(comparison: Comparison) -> list[str]:
    noisy = [f"batch {b}" for b, t in comparison.timings.items() if not t.quiet or (t.others or 0.0) > 0.1]
    if not noisy:
        return []
    return [
        f"- Other processes kept the machine busy while {' and '.join(noisy)} were timed: absolute times there, "
        "p90s above all, are noisy, and the intervals wider. PyTorch's two-thread OpenMP region loses the most "
        "when a core is taken away, so the `pytorch` rows, and every ratio relative to them, are the least "
        "reliable numbers; ratios between ONNX Runtime rows hold better."
    ]


def _reading(result: BenchResult) -> list[str]:
    isa = result.environment["cpu"].get("isa", [])
    lines = ["## Reading", ""]
    for comparison in result.comparisons:
        lines += [f"**{comparison.title}**", ""]
        lines += _speed_reading(comparison)
        lines += _int8_reading(comparison, isa)
        lines += _naive_reading(comparison)
        lines += _accuracy_reading(comparison)
        lines += [f"- {note}" for note in comparison.notes]
        lines += [*_aa_reading(comparison), *_load_reading(comparison), ""]
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
            f"Recipes: {recipes}. Quality on `{comparison.dataset}` ({comparison.samples} samples). Timed at "
            f"{comparison.threads} thread(s). Latency in ms is "
            "the median of block means; speedup = original's latency / variant's latency at batch 1, with its 95% "
            f"bootstrap interval. `{AA_VARIANT}{AA_SUFFIX}` is the A/A control: the same file in a second session, "
            "which must come out at 1.00x.",
            "",
            _timing_line(comparison),
            "",
            "### Variants",
            "",
            _legend(comparison),
            "",
            "### Speed",
            "",
            _speed_table(comparison),
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
        "(including imports), its peak RSS and whether its gates passed. The export stage of a pruning recipe also "
        "exports the unpruned model for comparison; verify includes deploytool's own latency measurement.",
        "",
        _toolchain_table(result),
        "",
        *_verify_section(result),
        "## How it is measured",
        "",
        *_method(result),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _legend(comparison: Comparison) -> str:
    rows = [[f"`{r.name}`", r.variant.description] for r in comparison.rows]
    return _table(["variant", "how it was made"], rows, "ll")
