"""Kernel-friendly widths: does a layer's measured time pick better channel counts than rounding to multiples of 8?

    python -m benchmarks.widths [--out docs/widths.md] [--ratios 0.5 0.75]

Two measurements, both on this CPU and ONNX Runtime, at each recipe's threads:

1. Single layers: a Conv alone in ONNX (3x3 with 64 inputs at 8x8, 1x1 with 32 inputs at 16x16, depthwise 3x3 at
   16x16) profiled by ONNX Runtime at output widths 8 to 64, as `round_to = "measured"` profiles a pruned layer
   (deploytool.stages.budget.node_times: kernel time, median per node over 3 x 50 calls).
2. Whole networks: the recipes' models (the digits CNN and Hugging Face's MobileNetV2 sample) pruned with the same
   ratio on every layer a scan covers, three ways: Torch-Pruning's round_to = 8, the planned widths exactly, and the
   widths `round_to = "measured"` picks for each layer alone (without the search's guard). Each is exported and
   block-timed against the original's export by the shared method (deploytool.latency, A/A control), with the
   channels kept and the output cosine to the original before any distillation.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("recipes/digits-cnn-budget.toml", "recipes/digits-hfmobilenet-budget.toml")
LAYERS = (("3x3 Conv, 64 inputs, 8x8", 64, 3, 8, False), ("1x1 Conv, 32 inputs, 16x16", 32, 1, 16, False),
          ("depthwise 3x3 Conv, 16x16", 64, 3, 16, True))
WIDTHS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)


def layer_curves(threads: int, folder: Path) -> list[tuple[str, dict[int, float]]]:
    import torch

    from deploytool.stages.budget import _layer_onnx, profile_widths

    curves = []
    for label, cin, kernel, size, depthwise in LAYERS:
        module = torch.nn.Conv2d(cin, cin if depthwise else 64, kernel, padding=kernel // 2, groups=cin if depthwise else 1)
        shape = (1, cin, size, size)
        paths = {w: folder / f"{w}.onnx" for w in WIDTHS}
        for w, path in paths.items():
            _layer_onnx(module, shape, w, path)
        curves.append((label, {w: ms * 1000.0 for w, ms in profile_widths(paths, shape, threads).items()}))  # µs
    return curves


def networks(recipe_path: Path, ratios: list[float], folder: Path) -> tuple[Any, list[dict[str, Any]]]:
    import torch

    from deploytool.compare import compare_signal
    from deploytool.data import is_callable_source, load_dataset
    from deploytool.latency import TimingPlan, measure
    from deploytool.recipe import load_recipe
    from deploytool.runners import OrtRunner, infer_dataset
    from deploytool.stages.budget import WidthChooser
    from deploytool.stages.export import export_onnx
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import _prunable, channel_prune, scan_layers

    recipe = load_recipe(recipe_path)
    assert recipe.prune is not None and recipe.verify is not None and recipe.data.calibration is not None
    specs, outputs, threads = recipe.model.inputs, recipe.model.outputs, recipe.verify.threads
    source = recipe.data.calibration
    data = (load_dataset(source, specs, base_dir=recipe.base_dir) if is_callable_source(source)
            else load_dataset(recipe.resolve(source), specs))
    assert recipe.model.factory is not None
    model = load_model(recipe.model.factory, recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None,
                       recipe.base_dir, factory_args=recipe.model.factory_args)
    cfg = recipe.prune.model_copy(update={"target_speedup": None, "target_latency_ms": None})
    feeds = next(data.head(1).batches(1))
    example = tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in specs)
    original = folder / "original.onnx"
    export_onnx(model, specs, outputs, recipe.export, data.head(2), original)
    base = OrtRunner("original", original, threads)
    probe = data.head(min(len(data), 128))
    reference = infer_dataset(base, probe, 64)
    chooser = WidthChooser(model, example, threads, folder)
    layers = scan_layers(model, specs, cfg, data)
    rows = []
    for ratio in ratios:
        planned = {layer: ratio for layer in layers}
        measured_ratios, widths = chooser.exact(planned)
        variants = {
            "round_to = 8": channel_prune(model, specs, cfg.model_copy(update={"round_to": 8}), data, ratio_by_layer=planned),
            "planned widths": channel_prune(model, specs, cfg.model_copy(update={"round_to": None}), data, ratio_by_layer=planned),
            "measured widths": channel_prune(model, specs, cfg.model_copy(update={"round_to": None}), data,
                                             ratio_by_layer=measured_ratios),
        }
        runners = [base]
        for i, (name, net) in enumerate(variants.items()):
            path = folder / f"{recipe.name}-{ratio}-{i}.onnx"
            export_onnx(net, specs, outputs, recipe.export, data.head(2), path)
            runners.append(OrtRunner(name, path, threads))
        timing = measure(runners, feeds, TimingPlan.for_calls(300, block=10), control=True)
        for runner in runners[1:]:
            kept = sum(int(m.weight.shape[0]) for m in _prunable(variants[runner.name]).values())
            cosine = float(compare_signal(reference[0], infer_dataset(runner, probe, 64)[0])["cosine_mean"])  # type: ignore[arg-type]
            rows.append({"ratio": ratio, "variant": runner.name, "channels": kept, "ms": timing.timed[runner.name].center_ms,
                         "speedup": timing.speedup("original", runner.name), "cosine": cosine,
                         "widened": sum(1 for p, c in widths.values() if c > p), "layers": len(widths)})
        rows.append({"ratio": ratio, "aa": timing.aa})
    return recipe, rows


def main() -> None:
    from deploytool.hardware import cpu_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "widths.md")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    args = parser.parse_args()
    info = cpu_info()
    isa = ", ".join(cast(list[str], info.get("isa", [])))
    lines = ["# Kernel-friendly widths: measured per layer or rounded to multiples of 8", "",
             f"Generated by `python -m benchmarks.widths` on {datetime.now(UTC):%Y-%m-%d}: {info.get('model')} "
             f"({info.get('cores')} cores; ISA {isa}). Regenerated whole; do not edit by hand.", "",
             (__doc__ or "").split("\n\n", 1)[1].strip(), "", "## Single layers (µs per call, ONNX Runtime kernel time, 1 thread)", ""]
    with tempfile.TemporaryDirectory(prefix="widths-") as tmp:
        curves = layer_curves(1, Path(tmp))
        lines += ["| layer | " + " | ".join(str(w) for w in WIDTHS) + " |", "|---|" + "---|" * len(WIDTHS)]
        lines += [f"| {label} | " + " | ".join(f"{curve[w]:.1f}" for w in WIDTHS) + " |" for label, curve in curves]
        for recipe_path in RECIPES:
            recipe, rows = networks(ROOT / recipe_path, args.ratios, Path(tmp))
            lines += ["", f"## `{recipe.name}`: every scanned layer at one ratio, before distillation "
                      f"({recipe.verify.threads if recipe.verify else 1} thread(s), batch 1)", "",
                      "| ratio | widths | channels kept | ms | speedup vs original (ORT) | output cosine |", "|---|---|---|---|---|---|"]
            for row in rows:
                if "aa" in row:
                    aa = row["aa"]
                    lines.append(f"| {row['ratio']:g} | A/A control (the original against its copy) | | | {aa} | |")
                    continue
                widened = f" ({row['widened']} of {row['layers']} layers wider)" if row["variant"] == "measured widths" else ""
                lines.append(f"| {row['ratio']:g} | {row['variant']}{widened} | {row['channels']} | {row['ms']:.4f} | "
                             f"{row['speedup']} | {row['cosine']:.4f} |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
