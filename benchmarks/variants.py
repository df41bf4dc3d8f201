"""The models compared: the original checkpoint, what a user would make of it with the usual tools,
and the artifacts deploytool's recipes produced.

Every baseline is made the way a user following the libraries' documentation would make it:
library defaults, nothing tuned. Each ONNX baseline gets its own folder, so its size
includes any external-data file the exporter wrote beside it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploytool.data import CalibrationReader, Dataset
from deploytool.recipe import Recipe
from deploytool.runners import OrtRunner, Runner, TorchRunner

if TYPE_CHECKING:
    import torch

    from benchmarks.toolchain import ToolchainRun


class NotApplicable(Exception):
    """A baseline that does not apply to this model (e.g. no layer the method quantizes)."""


@dataclass
class Variant:
    """One row of the comparison: a runnable model, where it came from, and its size on disk."""

    name: str
    description: str
    runner: Runner
    size_bytes: int
    source: str  # "baseline" or "deploytool"
    fp32_counterpart: str | None = None  # the fp32 row an int8 row is compared with
    pruned: bool = False
    for_comparison: bool = False  # made by a run to compare with (the unpruned export, its int8 alternative), not its product


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation warnings and progress logs the libraries emit while converting."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def folder_size(folder: Path) -> int:
    """Bytes of every file in a folder (an ONNX model plus its external data)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def torch_fp32(recipe: Recipe, model: torch.nn.Module) -> Variant:
    """The original checkpoint in eager PyTorch: the reference every ratio is relative to."""
    checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
    size = checkpoint.stat().st_size if checkpoint else 4 * sum(p.numel() for p in model.parameters())
    runner = TorchRunner("pytorch fp32", model, [s.name for s in recipe.model.inputs], recipe.model.outputs)
    return Variant("pytorch fp32", "the original checkpoint, eager PyTorch", runner, size, "baseline")


def torch_dynamic_int8(recipe: Recipe, model: torch.nn.Module, folder: Path) -> Variant:
    """torch.ao.quantization.quantize_dynamic on nn.Linear (int8 weights, activations quantized on the fly)."""
    import torch

    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if not linear:
        raise NotApplicable("pytorch dynamic int8: the model has no nn.Linear layer")
    with quiet():
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(quantized.state_dict(), folder / "model.pt")
    others = sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())
    description = (
        f"torch.ao.quantization.quantize_dynamic on nn.Linear ({linear} layer(s); {others} conv layer(s) stay fp32)"
    )
    runner = TorchRunner("pytorch dynamic int8", quantized, [s.name for s in recipe.model.inputs], recipe.model.outputs)
    return Variant("pytorch dynamic int8", description, runner, folder_size(folder), "baseline", "pytorch fp32")


def plain_export(recipe: Recipe, model: torch.nn.Module, sample: Dataset, folder: Path) -> Path:
    """torch.onnx.export with the default exporter and a dynamic batch axis, no simplification; when ONNX Runtime
    cannot load that graph (dynamo's can break SSA on some models), the TorchScript exporter, as a user would."""
    import numpy as np
    import torch

    names = [s.name for s in recipe.model.inputs]
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample.feeds[n])) for n in names)
    axes = {n: {0: "batch"} for n in [*names, *recipe.model.outputs]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    for dynamo in (None, False):  # None: torch's default exporter
        options = {} if dynamo is None else {"dynamo": dynamo}
        with quiet():
            torch.onnx.export(
                model, args, str(path), input_names=names, output_names=recipe.model.outputs,
                dynamic_axes=axes, opset_version=recipe.export.opset, verbose=False, **options,
            )
        try:
            import onnxruntime as ort

            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            break
        except Exception:  # the default exporter's graph does not load: the TorchScript one is what a user falls back to
            if dynamo is False:
                raise
    return path


def ort_fp32(path: Path, threads: int) -> Variant:
    """The plain export in ONNX Runtime."""
    runner = OrtRunner("ort fp32", path, threads)
    description = "torch.onnx.export (default exporter), ONNX Runtime"
    return Variant("ort fp32", description, runner, folder_size(path.parent), "baseline")


def ort_static_defaults(fp32: Path, calibration: Dataset, folder: Path, threads: int, batch: int = 16) -> Variant:
    """quantize_static with only a calibration reader: onnxruntime's defaults, what a naive user gets."""
    from onnxruntime.quantization import quantize_static

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with quiet():
        quantize_static(str(fp32), str(path), CalibrationReader(calibration, batch))
    runner = OrtRunner("ort static int8 (defaults)", path, threads)
    description = "onnxruntime quantize_static on the plain export, library defaults, calibration reader only"
    return Variant(runner.name, description, runner, folder_size(folder), "baseline", "ort fp32")


def ort_dynamic_defaults(fp32: Path, folder: Path, threads: int) -> Variant:
    """quantize_dynamic with the library defaults."""
    from onnxruntime.quantization import quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with quiet():
        quantize_dynamic(str(fp32), str(path))
    runner = OrtRunner("ort dynamic int8 (defaults)", path, threads)
    description = "onnxruntime quantize_dynamic on the plain export, library defaults"
    return Variant(runner.name, description, runner, folder_size(folder), "baseline", "ort fp32")


def _recipe_steps(recipe: Recipe, report: dict[str, Any] | None = None) -> list[str]:
    steps = []
    if recipe.prune:
        # the ratio the run used: a latency budget searches it, so the recipe's own ratio is not it
        ratio = (report or {}).get("prune", {}).get("ratio", recipe.prune.ratio)
        searched = " (searched for the latency budget)" if (report or {}).get("prune", {}).get("budget") else ""
        steps.append(f"{recipe.prune.method} pruning {float(ratio):.1%}{searched}")
    if recipe.distill:
        steps.append("distilled")
    steps.append("exported")
    if recipe.simplify and recipe.simplify.enabled:
        steps.append("onnxsim")
    return steps


def _quantization_summary(details: dict[str, Any]) -> str:
    parts = [f"{details.get('mode', '?')} {details.get('format', '')}".strip()]
    if "activation_type" in details:
        parts.append(f"{details['activation_type']} activations")
    parts.append(f"{details.get('weight_type', '?')} weights")
    parts.append("per-channel" if details.get("per_channel") else "per-tensor")
    if details.get("reduce_range"):
        parts.append("reduce_range")
    if "calibration_method" in details:
        parts.append(f"{details['calibration_method']} calibration")
    if details.get("op_types"):
        parts.append("only " + "/".join(details["op_types"]))
    if details.get("float_nodes"):
        parts.append(f"{len(details['float_nodes'])} node(s) kept in float")
    return ", ".join(parts)


def run_rows(recipe_name: str) -> dict[str, str]:
    """The benchmark row of each model a run's report names (report["metrics"] keys)."""
    return {
        "reference": "pytorch fp32",
        "fp32": f"deploytool {recipe_name} fp32",
        "int8": f"deploytool {recipe_name} int8",
        "unpruned_fp32": f"deploytool {recipe_name} unpruned fp32",
        "unpruned_int8": f"deploytool {recipe_name} unpruned int8",
    }


def deploytool_variants(recipe: Recipe, run: ToolchainRun, threads: int) -> list[Variant]:
    """model.onnx and model.int8.onnx of one recipe run, as ONNX Runtime rows; a pruning run's
    model.unpruned.onnx too (the original exported for comparison, the baseline of its verify)."""
    recipe_name = recipe.name
    names = run_rows(recipe_name)
    steps = _recipe_steps(recipe, run.report)
    pruned = recipe.prune is not None
    fp32_name = names["fp32"]
    fp32 = run.out_dir / "model.onnx"
    runner = OrtRunner(fp32_name, fp32, threads)
    variants = [Variant(fp32_name, ", ".join(steps), runner, fp32.stat().st_size, "deploytool", pruned=pruned)]
    int8 = run.out_dir / "model.int8.onnx"
    if int8.exists():
        name = names["int8"]
        description = ", ".join(steps) + f"; {_quantization_summary(run.report.get('quantization', {}))}"
        runner = OrtRunner(name, int8, threads)
        variants.append(Variant(name, description, runner, int8.stat().st_size, "deploytool", fp32_name, pruned))
    unpruned = run.out_dir / "model.unpruned.onnx"
    if unpruned.exists():
        name = names["unpruned_fp32"]
        description = "the original network, exported (no onnxsim) by this pruning recipe to compare with"
        runner = OrtRunner(name, unpruned, threads)
        variants.append(Variant(name, description, runner, unpruned.stat().st_size, "deploytool", for_comparison=True))
    alternative = run.out_dir / "model.unpruned.int8.onnx"
    if alternative.exists():
        name = names["unpruned_int8"]
        quantization = (run.report.get("quantization") or {}).get("unpruned", {})
        description = ("the original network quantized as it is, an alternative of this budget recipe; "
                       f"{_quantization_summary(quantization)}")
        runner = OrtRunner(name, alternative, threads)
        variants.append(Variant(name, description, runner, alternative.stat().st_size, "deploytool", names["unpruned_fp32"],
                                for_comparison=True))
    return variants

