"""Plots for the HTML report, rendered by matplotlib to PNG and embedded as data URIs."""

from __future__ import annotations

import base64
import io
import math
from typing import Any


def _figure(width: float = 7.0, height: float = 3.2, columns: int = 1) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), dpi=110)


def _encode(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def latency_plot(samples: dict[str, list[float]]) -> str | None:
    """Latency distribution per model (box plot, log scale when the spread is wide)."""
    samples = {name: [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
               for name, values in samples.items() if isinstance(values, list)}
    samples = {name: values for name, values in samples.items() if values}
    if not samples:
        return None
    fig, ax = _figure()
    names = list(samples)
    ax.boxplot([samples[n] for n in names], vert=False, showfliers=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xlabel("latency per call (ms)")
    values = [v for n in names for v in samples[n]]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_title("Latency distribution (block-timed calls)")
    return _encode(fig)


def layer_error_plot(tensors: list[dict[str, Any]], first: dict[str, Any] | None, title: str) -> str | None:
    """1 - cosine per intermediate tensor, in graph order; the first diverging tensor is marked."""
    tensors = [t for t in tensors if isinstance(t, dict)]
    if not tensors:
        return None
    fig, ax = _figure(7.0, 3.6)

    def error(cosine: object) -> float:  # missing or NaN cosine: drawn as the largest error (2)
        value = float(cosine) if isinstance(cosine, (int, float)) else math.nan
        return max(1.0 - value, 1e-9) if math.isfinite(value) else 2.0

    errors = [error(t.get("cosine_mean")) for t in tensors]
    first_name = first.get("tensor") if isinstance(first, dict) else None
    colours = ["#c0392b" if first_name is not None and t.get("tensor") == first_name else "#2c7fb8" for t in tensors]
    ax.bar(range(len(tensors)), errors, color=colours)
    ax.set_yscale("log")
    ax.set_ylabel("1 - cosine")
    step = max(1, len(tensors) // 30)
    ax.set_xticks(range(0, len(tensors), step), [str(tensors[i].get("tensor"))[:18] for i in range(0, len(tensors), step)],
                  rotation=70, fontsize=7)
    ax.set_title(title)
    return _encode(fig)


def models_plot(metrics: dict[str, dict[str, Any]], sizes: dict[str, int | None]) -> str | None:
    """File size, accuracy (or cosine) and p50 latency of each model, side by side."""
    names = [n for n in metrics if n in sizes and isinstance(metrics[n], dict)]
    if not names:
        return None
    fig, axes = _figure(9.0, 3.0, columns=3)

    def number(value: object) -> float:  # None and NaN are drawn as 0
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0

    kilobytes = [number(sizes[n]) / 1024 for n in names]
    quality_key = "accuracy" if any("accuracy" in metrics[n] for n in names) else "cosine_mean"
    quality = [number(metrics[n].get(quality_key)) for n in names]
    latency = [number((metrics[n].get("latency_ms") or {}).get("p50")) for n in names]
    for ax, values, label in zip(axes, (kilobytes, quality, latency), ("size (KB)", quality_key, "p50 latency (ms)")):
        ax.barh(names, values, color="#2c7fb8")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    if quality_key == "accuracy" and quality:
        low = min(q for q in quality if q) if any(quality) else 0.0
        axes[1].set_xlim(max(0.0, low - 0.05), 1.0)
    return _encode(fig)


def budget_plot(budget: dict[str, Any]) -> str | None:
    """The latency-budget search's trade-off curve: pruning ratio -> measured speedup (with its interval) and the
    pruned model's agreement with the original before distillation; the budget and the chosen ratio marked."""
    points = sorted((p for p in budget.get("points") or [] if isinstance(p.get("speedup"), (int, float))),
                    key=lambda p: float(p["ratio"]))
    if not points:
        return None
    fig, ax = _figure()
    ratios = [float(p["ratio"]) for p in points]
    speedups = [float(p["speedup"]) for p in points]
    low = [s - float((p.get("speedup_ci") or [s, s])[0]) for s, p in zip(speedups, points)]
    high = [float((p.get("speedup_ci") or [s, s])[1]) - s for s, p in zip(speedups, points)]
    ax.errorbar(ratios, speedups, yerr=[low, high], marker="o", capsize=3, label="speedup vs original (ORT fp32)")
    needed = budget.get("needed_speedup")
    if isinstance(needed, (int, float)) and needed > 0:
        ax.axhline(float(needed), color="grey", linestyle="--", linewidth=1, label=f"budget {float(needed):.2f}x")
    chosen = [p for p in points if p.get("chosen")]
    if chosen:
        ax.plot([float(chosen[0]["ratio"])], [float(chosen[0]["speedup"])], marker="*", markersize=14, color="C3",
                linestyle="none", label="chosen")
    ax.set_xlabel("share of channels removed (per-layer ratios)" if budget.get("allocation") == "measured" else "pruning ratio")
    ax.set_ylabel("speedup (x)")
    key = "top1_agreement" if any(isinstance(p.get("top1_agreement"), (int, float)) for p in points) else "cosine"
    quality = [(float(p["ratio"]), float(p[key])) for p in points
               if isinstance(p.get(key), (int, float)) and math.isfinite(float(p[key]))]
    if quality:
        twin = ax.twinx()
        twin.plot([r for r, _ in quality], [q for _, q in quality], marker="s", color="C2", alpha=0.7)
        twin.set_ylabel(f"{key.replace('_', ' ')} before distillation", color="C2")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Latency budget: ratio -> measured speedup")
    return _encode(fig)
