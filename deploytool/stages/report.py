"""report: report.json (stable keys), report.md and a self-contained report.html."""

from __future__ import annotations

import html
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

from deploytool.artifacts import write_text
from deploytool.hardware import cpu_info


def json_safe(value: Any) -> Any:
    """JSON has no Infinity/NaN: such floats become null (e.g. the SNR of identical outputs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def environment(threads: int | None) -> dict[str, Any]:
    from deploytool.cache import library_versions

    versions = {"python": platform.python_version(), **library_versions()}
    return {"versions": versions, "platform": sys.platform, "cpu": cpu_info(), "threads": threads}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model: the table shown on the terminal and in the Markdown/HTML reports."""
    header = ["model", "size (KB)", "accuracy", "top-1 agree", "cosine mean", "max abs err", "p50 ms", "p90 ms", "speedup"]
    rows = []
    for name, metrics in report["metrics"].items():
        model = report["models"].get(name, {})
        latency = metrics.get("latency_ms", {})
        rows.append(
            [
                name,
                _fmt(model["size_bytes"] / 1024, 1) if "size_bytes" in model else "-",
                _fmt(metrics.get("accuracy")),
                _fmt(metrics.get("top1_agreement")),
                _fmt(metrics.get("cosine_mean"), 5),
                _fmt(metrics.get("max_abs_error"), 5),
                _fmt(latency.get("p50"), 3),
                _fmt(latency.get("p90"), 3),
                _fmt(metrics.get("speedup"), 2) + ("x" if "speedup" in metrics else ""),
            ]
        )
    return header, rows


def gate_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["gate", "model", "value", "threshold", "verdict"]
    rows = [
        [g["name"], g["model"], _fmt(g["value"], 5), _fmt(g["threshold"], 5), "pass" if g["passed"] else "FAIL"]
        for g in report["gates"]
    ]
    return header, rows


def _stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["stage", "status", "seconds"], [[s["name"], s["status"], f"{s['seconds']:.2f}"] for s in report["stages"]]


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


def _prune_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    p = report["prune"]
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


def _distill_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    history = report["distill"]["history"]
    metric = report["distill"]["metric"]
    rows = [[str(h["epoch"]), _fmt(h["loss"]), _fmt(h.get(metric))] for h in history]
    return ["epoch", "loss", f"validation {metric}"], rows


def _localization_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for model, where in report["localization"].items():
        for label in ("first", "worst"):
            spot = where.get(label)
            if spot:
                rows.append([model, label, spot["tensor"], spot["node"], spot["op"], _fmt(spot["cosine_mean"], 5)])
    return ["model", "tensor", "name", "node", "op", "cosine"], rows


def _sections(report: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    sections = [("Models", summary_rows(report)), ("Gates", gate_rows(report)), ("Stages", _stage_rows(report))]
    if report.get("prune"):
        sections.append(("Pruning", _prune_rows(report)))
        if report["prune"].get("sensitivity"):
            sections.append(("Layer sensitivity (score with only that layer pruned)", sensitivity_rows(report["prune"]["sensitivity"])))
    if report.get("distill"):
        sections.append(("Distillation", _distill_rows(report)))
    if any(w.get("first") or w.get("worst") for w in report.get("localization", {}).values()):
        sections.append(("Where outputs diverge", _localization_rows(report)))
    return sections


def render_markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    cpu = report["environment"]["cpu"]
    parts = [
        f"# deploytool report: {report['name']}",
        f"**Verdict: {verdict}**",
        "Speedup is the reference (PyTorch) p50 latency divided by the model's p50; "
        f"latency measured at batch {report.get('latency_batch', 1)} with {report['environment']['threads']} thread(s), "
        "models interleaved.",
    ]
    for title, (header, rows) in _sections(report):
        parts += [f"## {title}", _markdown_table(header, rows)]
    if report.get("notes"):
        parts += ["## Notes", "\n".join(f"- {n}" for n in report["notes"])]
    parts += [
        "## Environment",
        f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores; ISA: {', '.join(cpu['isa']) or 'none detected'})  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["environment"]["versions"].items()),
    ]
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th:first-child,td:first-child{text-align:left}"
    "th{background:#f3f3f3}.fail{color:#b00;font-weight:bold}.verdict-pass{color:#070}.verdict-fail{color:#b00}"
)


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    from deploytool.plots import latency_plot, layer_error_plot, models_plot

    plots = [("Size, quality and latency", models_plot(report)), ("Latency", latency_plot(report.get("latency_samples_ms", {})))]
    for model, where in report.get("localization", {}).items():
        title = f"Per-layer error of {model} (1 - cosine to the model it was made from, in graph order)"
        plots.append((title, layer_error_plot(where.get("tensors", []), where.get("first"), f"{model}: 1 - cosine per tensor")))
    return [(title, uri) for title, uri in plots if uri]


def render_html(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    body = [f"<h1>deploytool report: {html.escape(report['name'])}</h1>"]
    body.append(f'<p class="verdict-{"pass" if report["passed"] else "fail"}"><strong>Verdict: {verdict}</strong></p>')
    for title, (header, rows) in _sections(report):
        body += [f"<h2>{title}</h2>", _html_table(header, rows)]
    for title, uri in _plots(report) if report.get("metrics") else []:
        body.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="{uri}">')
    if report.get("notes"):
        body += ["<h2>Notes</h2><ul>", *(f"<li>{html.escape(n)}</li>" for n in report["notes"]), "</ul>"]
    cpu = report["environment"]["cpu"]
    body.append(f"<h2>Environment</h2><p>{html.escape(str(cpu['model']))}; ISA: {html.escape(', '.join(cpu['isa']))}</p>")
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(report['name'])}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=True) + "\n")
    write_text(out_dir / "report.md", render_markdown(report))
    write_text(out_dir / "report.html", render_html(report))
