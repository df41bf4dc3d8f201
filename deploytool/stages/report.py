"""report: report.json (stable keys), report.md and a self-contained report.html."""

from __future__ import annotations

import html
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any

from deploytool.artifacts import write_text
from deploytool.hardware import cpu_info
from deploytool.report_schema import Report

log = logging.getLogger("deploytool.report")


def json_safe(value: Any) -> Any:
    """JSON has no Infinity/NaN: such floats become null (e.g. the SNR of identical outputs); numpy scalars
    become Python numbers, tuples lists, paths strings."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def environment(threads: int | None) -> dict[str, Any]:
    from deploytool.cache import library_versions

    versions = {"python": platform.python_version(), **library_versions()}
    return {"versions": versions, "platform": sys.platform, "cpu": cpu_info(), "threads": threads}


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: None is '-', NaN and infinities are spelled out, numbers get `digits` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def _get(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]... or None where any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _ratio(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    interval = metrics.get(f"{key}_ci")
    text = _fmt(float(value), 2) + "x"
    if isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval):
        text += f" [{_fmt(float(interval[0]), 2)}, {_fmt(float(interval[1]), 2)}]"
    return text


def summary_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per model: the table shown on the terminal and in the Markdown/HTML reports."""
    header = ["model", "size (KB)", "accuracy", "top-1 agree", "cosine mean", "max abs err", "p50 ms", "p90 ms", "speedup",
              "vs ORT fp32"]
    rows = []
    for name, metrics in report.metrics.items():
        model = report.models.get(name)
        size = model.size_bytes if model is not None else None
        rows.append(
            [
                str(name),
                _fmt(size / 1024, 1) if isinstance(size, (int, float)) else "-",
                _fmt(metrics.get("accuracy")),
                _fmt(metrics.get("top1_agreement")),
                _fmt(metrics.get("cosine_mean"), 5),
                _fmt(metrics.get("max_abs_error"), 5),
                _fmt(_get(metrics, "latency_ms", "p50"), 3),
                _fmt(_get(metrics, "latency_ms", "p90"), 3),
                _ratio(metrics, "speedup"),
                _ratio(metrics, "speedup_vs_ort_fp32"),
            ]
        )
    return header, rows


def gate_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["gate", "model", "value", "threshold", "verdict", "how"]
    rows = []
    for g in report.gates:
        how = ["default" if g.default else "set"]
        if g.against:
            how.append(f"against {g.against}")
        if g.interval is not None and len(g.interval) == 2:
            how.append(f"interval [{_fmt(g.interval[0], 3)}, {_fmt(g.interval[1], 3)}]")
        if not g.binding:
            how.append("not binding")
        verdict = "pass" if g.passed else ("FAIL" if g.binding else "fail")
        rows.append([g.name, g.model, _fmt(g.value, 5), _fmt(g.threshold, 5), verdict, ", ".join(how)])
    return header, rows


def bench_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model and batch of a `bench` result."""
    header = ["model", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "speedup vs first", "session MiB"]
    rows = []
    for name, res in results["models"].items():
        for b, r in res["batches"].items():
            speedup = f"{r['speedup']:.2f}x [{r['speedup_ci'][0]:.2f}, {r['speedup_ci'][1]:.2f}]" if "speedup" in r else "-"
            memory = res.get("peak_memory_bytes")
            rows.append([name, str(b), f"{r['p50']:.3f}", f"{r['p90']:.3f}", f"{r['p99']:.3f}", f"{r['throughput_per_s']:.1f}",
                         speedup, f"{memory / 2**20:.1f}" if memory else "-"])
    return header, rows


def aa_lines(results: dict[str, Any]) -> list[str]:
    """The A/A control of a `bench` result, per batch: the noise floor of its speedups."""
    lines = []
    for batch, how in results["latency"].items():
        aa = how.get("aa") or {}
        if aa:
            lines.append(f"A/A control at batch {batch} ({aa['model']} against itself): {aa['value']:.3f}x "
                         f"[{aa['ci'][0]:.3f}, {aa['ci'][1]:.3f}]: differences below {aa['noise']:.1%} are noise")
    return lines


def _stage_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    return ["stage", "status", "seconds"], [[s.name, s.status, _fmt(s.seconds, 2)] for s in report.stages]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"fail" if c == "FAIL" else ""}">{html.escape(c)}</td>' for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _prune_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    p = report.prune or {}
    macs = [_fmt(p.get("macs_before")), _fmt(p.get("macs_after"))]
    return ["method", "ratio", "params before", "params after", "MACs before", "MACs after", "never pruned"], [
        [p["method"], _fmt(p["ratio"], 2), _fmt(p["params_before"]), _fmt(p["params_after"]), *macs, ", ".join(p["ignored"]) or "-"]
    ]


def sensitivity_rows(table: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """The sensitivity scan as a table: one row per layer pruned alone, one column per ratio."""
    ratios = sorted({r for row in table.values() for r in row if r != "0"}, key=float)
    baseline = table.get("<none>", {}).get("0")
    first = "layer (pruned alone)" + (f"; unpruned score {baseline:.4f}" if baseline is not None else "")
    rows = [[layer, *(_fmt(row.get(r)) for r in ratios)] for layer, row in table.items() if layer != "<none>"]
    return [first, *(f"ratio {r}" for r in ratios)], rows


def _distill_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    distill = report.distill or {}
    history, metric = distill["history"], distill["metric"]
    rows = [[str(h["epoch"]), _fmt(h["loss"]), _fmt(h.get(metric))] for h in history]
    return ["epoch", "loss", f"validation {metric}"], rows


def _localization_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    rows = []
    for model, where in (report.localization or {}).items():
        for label in ("first", "worst"):
            spot = where.get(label) if isinstance(where, dict) else None
            if isinstance(spot, dict):
                rows.append([str(model), label, str(spot.get("tensor")), str(spot.get("node")), str(spot.get("op")),
                             _fmt(spot.get("cosine_mean"), 5)])
    return ["model", "tensor", "name", "node", "op", "cosine"], rows


def _attempt_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    rows = [[str(a.get("search", "")), str(a.get("model", a.get("variant", ""))), _fmt(a.get("cosine"), 5),
             _fmt(a.get("snr_db"), 2), _fmt(a.get("top1_agreement")), _fmt(a.get("accuracy_drop")),
             "-" if "meets_targets" not in a else ("yes" if a["meets_targets"] else "no")]
            for a in (report.quantization or {}).get("attempts") or [] if isinstance(a, dict) and "cosine" in a]
    return ["search", "model", "cosine", "SNR dB", "top-1 agree", "accuracy drop", "meets targets"], rows


def _budget_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    budget = (report.prune or {})["budget"]
    rows = []
    for p in budget.get("points") or []:
        ci = p.get("speedup_ci") or [None, None]
        rows.append([_fmt(p.get("ratio"), 4), str(p.get("macs", "-")), _fmt(p.get("latency_ms"), 4),
                     f"{_fmt(p.get('speedup'), 2)}x [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]", _fmt(p.get("cosine"), 5),
                     _fmt(p.get("top1_agreement")), "yes" if p.get("chosen") else ""])
    ratio = "channels removed" if budget.get("allocation") == "measured" else "ratio"
    return [ratio, "MACs", "latency ms", "speedup vs original (ORT)", "cosine", "top-1 agree", "chosen"], rows


def _layer_time_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    budget = (report.prune or {})["budget"]
    chosen = budget.get("chosen_ratios") or {}
    spent = budget.get("layer_ms") or {}
    total = sum(float(v) for v in spent.values()) or 1.0
    widths = budget.get("widths") or {}
    rows = [[name, _fmt(ms, 4), f"{float(ms) / total:.1%}", _fmt(chosen.get(name, 0.0), 2)] for name, ms in spent.items()]
    header = ["layer", "ms per call (original, ORT profile)", "share", "ratio chosen"]
    if widths:  # round_to = "measured": the allocation's width and the one its measured time chose
        header.append("kept channels (planned -> measured)")
        for row in rows:
            planned_kept = widths.get(row[0])
            row.append(f"{planned_kept[0]} -> {planned_kept[1]}" if planned_kept else "")
    return header, rows


def _float_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    q = report.quantization or {}
    rows = [[str(k.get("node")), "always (kept_float)", str(k.get("why"))] for k in q.get("kept_float") or []]
    rows += [[str(n.get("node")), "search (float_nodes)", str(n.get("why"))] for n in q.get("float_nodes") or []]
    return ["node", "kept in float by", "why"], rows


def _guarded(title: str, build: Any, report: Report) -> tuple[str, tuple[list[str], list[list[str]]]]:
    """A section, or a one-row note when its data is malformed: a report always renders."""
    try:
        return title, build(report)
    except Exception as exc:  # a damaged section must not take the rest of the report with it
        log.warning("report section %s could not be rendered: %s", title, exc)
        return title, (["note"], [[f"this section could not be rendered: {type(exc).__name__}: {exc}"]])


def _sections(report: Report) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    sections = [_guarded("Models", summary_rows, report), _guarded("Gates", gate_rows, report),
                _guarded("Stages", _stage_rows, report)]
    if report.prune:
        sections.append(_guarded("Pruning", _prune_rows, report))
        if report.prune.get("budget"):
            sections.append(_guarded("Latency budget: pruning ratio, measured latency and agreement before distillation",
                                     _budget_rows, report))
        if (report.prune.get("budget") or {}).get("layer_ms"):
            sections.append(_guarded("Latency budget: each layer's ONNX Runtime time and the ratio chosen for it",
                                     _layer_time_rows, report))
        if report.prune.get("sensitivity"):
            sections.append(_guarded("Layer sensitivity (score with only that layer pruned)",
                                     lambda r: sensitivity_rows(r.prune["sensitivity"]), report))
    if report.distill:
        sections.append(_guarded("Distillation", _distill_rows, report))
    quantization = report.quantization or {}
    if quantization.get("attempts"):
        sections.append(_guarded("Quantization attempts (scored against fp32)", _attempt_rows, report))
    if quantization.get("kept_float") or quantization.get("float_nodes"):
        sections.append(_guarded("Nodes kept in float", _float_rows, report))
    if any(isinstance(w, dict) and (w.get("first") or w.get("worst")) for w in (report.localization or {}).values()):
        sections.append(_guarded("Where outputs diverge", _localization_rows, report))
    return sections


def _latency_line(report: Report) -> str:
    latency = report.latency or {}
    threads = report.environment.get("threads")
    text = (f"Latency at batch {report.latency_batch or 1} with {threads} thread(s): blocks of "
            f"{latency.get('block', '?')} calls per model, block order shuffled each round ({latency.get('rounds', '?')} rounds), "
            "ONNX Runtime spin-waiting off; a model's latency is the median of its block means. "
            "Speedup is the reference's latency over the model's (vs ORT fp32: over the original's plain ONNX Runtime "
            "fp32 export), with its bootstrap confidence interval.")
    aa = latency.get("aa")
    if isinstance(aa, dict):
        interval = aa.get("ci") or [None, None]
        text += (f" A/A control ({aa.get('model')} against itself): {_fmt(aa.get('value'), 3)}x "
                 f"[{_fmt(interval[0], 3)}, {_fmt(interval[1], 3)}], noise floor {_fmt(aa.get('noise'), 3)}.")
    return text


def _environment_lines(report: Report) -> list[str]:
    cpu = report.environment.get("cpu") or {}
    versions = report.environment.get("versions") or {}
    isa = cpu.get("isa") or []
    return [
        f"CPU: {cpu.get('model')} ({cpu.get('machine')}, {cpu.get('cores')} cores; ISA: {', '.join(map(str, isa)) or 'none detected'})",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def render_markdown(report: Report) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    parts = [f"# deploytool report: {report.name}", f"**Verdict: {verdict}**", _latency_line(report)]
    for title, (header, rows) in _sections(report):
        parts += [f"## {title}", _markdown_table(header, rows)]
    if report.notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in report.notes)]
    env = _environment_lines(report)
    parts += ["## Environment", env[0] + "  ", env[1]]
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th:first-child,td:first-child{text-align:left}"
    "th{background:#f3f3f3}.fail{color:#b00;font-weight:bold}.verdict-pass{color:#070}.verdict-fail{color:#b00}"
)


def _plots(report: Report) -> list[tuple[str, str]]:
    from deploytool.plots import budget_plot, latency_plot, layer_error_plot, models_plot

    sizes = {name: model.size_bytes for name, model in report.models.items()}
    wanted: list[tuple[str, Any]] = [("Size, quality and latency", lambda: models_plot(report.metrics, sizes)),
                                     ("Latency", lambda: latency_plot(report.latency_samples_ms or {}))]
    budget = (report.prune or {}).get("budget")
    if isinstance(budget, dict):
        wanted.append(("Latency budget: pruning ratio, measured speedup and agreement before distillation",
                       lambda: budget_plot(budget)))
    for model, where in (report.localization or {}).items():
        if not isinstance(where, dict):
            continue
        title = f"Per-layer error of {model} (1 - cosine to the model it was made from, in graph order)"
        wanted.append((title, lambda w=where, m=model: layer_error_plot(w.get("tensors") or [], w.get("first"),
                                                                         f"{m}: 1 - cosine per tensor")))
    plots = []
    for title, draw in wanted:
        try:
            uri = draw()
        except Exception as exc:  # a plot is an extra: the report renders without it
            log.warning("plot %r could not be drawn: %s", title, exc)
            continue
        if uri:
            plots.append((title, uri))
    return plots


def render_html(report: Report) -> str:
    passed = report.passed
    name = html.escape(report.name)
    body = [f"<h1>deploytool report: {name}</h1>"]
    body.append(f'<p class="verdict-{"pass" if passed else "fail"}"><strong>Verdict: {"PASSED" if passed else "FAILED"}</strong></p>')
    body.append(f"<p>{html.escape(_latency_line(report))}</p>")
    for title, (header, rows) in _sections(report):
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    for title, uri in _plots(report) if report.metrics else []:
        body.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="{uri}">')
    if report.notes:
        body += ["<h2>Notes</h2><ul>", *(f"<li>{html.escape(n)}</li>" for n in report.notes), "</ul>"]
    body.append("<h2>Environment</h2>" + "".join(f"<p>{html.escape(line)}</p>" for line in _environment_lines(report)))
    head = f"<head><meta charset=\"utf-8\"><title>{name}</title><style>{_CSS}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> Report:
    """report.json first and whole (NaN/Inf as null), then report.md and report.html; a renderer that fails
    leaves a short page saying so instead of taking report.json or the run with it. The report as written, typed."""
    report = json_safe(report)
    typed = Report.model_validate(report)  # the stable keys checked before anything is written
    write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    for filename, render in (("report.md", render_markdown), ("report.html", render_html)):
        try:
            text = render(typed)
        except Exception as exc:
            log.exception("rendering %s failed", filename)
            message = f"the {filename} renderer failed ({type(exc).__name__}: {exc}); report.json holds every result"
            text = message + "\n" if filename.endswith(".md") else f"<!doctype html><p>{html.escape(message)}</p>\n"
        write_text(out_dir / filename, text)
    return typed
