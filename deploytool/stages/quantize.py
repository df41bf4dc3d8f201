"""quantize: ONNX Runtime static (calibrated) or dynamic int8 quantization, with CPU-aware defaults.

Static quantization calibrates once (activation ranges are cached) and can then re-quantize
cheaply, which is what the two searches build on:
- automatic mixed precision: when the int8 model misses the accuracy targets, nodes are ranked
  by how much quantizing each one alone costs, and the fewest most sensitive nodes are kept in
  float (found by bisection) until the targets hold;
- speed search: when the int8 model is slower than the fp32 one on this CPU, cheaper
  configurations are tried and the fastest that still meets the targets is kept.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import CalibrationReader, Dataset
from deploytool.errors import StageError, UserError, first_line
from deploytool.hardware import cpu_info, has_int8_dot_product
from deploytool.logs import quiet
from deploytool.progress import Progress, Silent
from deploytool.recipe import QuantizeConfig

log = logging.getLogger(__name__)

# op types whose int8 kernels do the work; the sensitivity ranking considers these
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose", "Attention")


@dataclass
class Targets:
    """What a quantized model must keep, measured against the fp32 model it is made from."""

    min_cosine: float = 0.99
    max_accuracy_drop: float | None = None


@dataclass
class QuantizeRecord:
    mode: str
    settings: dict[str, object]
    calibration_samples: int = 0
    preprocess: str = "skipped"
    optimize: str = "none"
    float_nodes: list[dict[str, object]] = field(default_factory=list)
    attempts: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """Flat: the settings sit beside mode, preprocess and the sample count."""
        flat = {k: v for k, v in self.__dict__.items() if k != "settings"}
        return {**flat, **self.settings}


def _preprocess(in_path: Path, out_path: Path, notes: list[str]) -> str:
    """quant_pre_process with symbolic shape inference, then without it; the raw model if both fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(in_path), str(out_path))
        return "done"
    except Exception as exc:
        first = first_line(exc)
        log.debug("quant_pre_process failed", exc_info=True)
    try:
        quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=True)
        notes.append(f"pre-processing without symbolic shape inference ({first[:160]})")
        return "done without symbolic shape inference"
    except Exception as exc:
        log.debug("quant_pre_process without symbolic shapes failed", exc_info=True)
        notes.append(f"pre-processing failed, quantized the model as is ({first_line(exc)[:160]})")
        return "failed"


def _optimize_transformer(in_path: Path, out_path: Path, cfg: QuantizeConfig, notes: list[str]) -> str:
    """ONNX Runtime's transformer fusions (LayerNorm, GELU, attention where recognised)."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with quiet(None), quiet("onnxruntime.transformers"):  # it warns that the producer is not "pytorch"
            optimized = optimize_model(str(in_path), model_type="bert", num_heads=cfg.num_heads,
                                       hidden_size=cfg.hidden_size, opt_level=1, only_onnxruntime=False)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(out_path))
    except Exception as exc:
        log.debug("transformer optimization failed", exc_info=True)
        notes.append(f"transformer optimization failed, quantized the unfused model ({first_line(exc)[:160]})")
        return "failed"
    return "transformer: " + (", ".join(f"{k} x{v}" for k, v in sorted(fused.items())) or "nothing fused")


def _fixed_batch(path: Path) -> int | None:
    """The batch size a model with a fixed batch axis accepts; calibration batches must have exactly that size."""
    from deploytool.stages.inspect import input_specs

    first = input_specs(path)[0].shape[0]
    return first if isinstance(first, int) else None


def resolve_reduce_range(cfg: QuantizeConfig) -> tuple[bool, str]:
    """reduce_range and why: on by default where the CPU lacks int8 dot-product instructions."""
    if cfg.reduce_range != "auto":
        return bool(cfg.reduce_range), "set in the recipe"
    if has_int8_dot_product():
        return False, "auto: the CPU has int8 dot-product instructions"
    return True, "auto: no VNNI/dot-product on this CPU, 7-bit weights avoid u8 x s8 saturation"


class _Quantizer:
    """Quantizes one prepared model repeatedly with different node sets; static calibration runs once."""

    def __init__(self, source: Path, cfg: QuantizeConfig, calibration: Dataset | None, batch_size: int,
                 folder: Path, progress: Progress) -> None:
        self.source, self.cfg, self.folder = source, cfg, folder
        self.reduce_range, self.reduce_range_reason = resolve_reduce_range(cfg)
        self.cache = folder / "calibration.json"
        self.calibration = calibration
        self.batch_size = batch_size
        self.progress = progress
        self.count = 0

    def settings(self) -> dict[str, object]:
        cfg = self.cfg
        settings: dict[str, object] = {
            "per_channel": cfg.per_channel, "weight_type": cfg.weight_type, "reduce_range": self.reduce_range,
            "reduce_range_reason": self.reduce_range_reason, "op_types": cfg.op_types, "exclude_nodes": cfg.exclude_nodes,
            "isa": cpu_info()["isa"],
        }
        if cfg.mode == "static":
            settings.update(format=cfg.format, activation_type=cfg.activation_type, calibration_method=cfg.calibration_method,
                            symmetric_activations=cfg.symmetric_activations, symmetric_weights=cfg.symmetric_weights)
        return settings

    def quantize(self, out: Path, exclude: list[str], op_types: list[str] | None = None, weight_type: str | None = None,
                 only: list[str] | None = None) -> None:
        """Quantize the prepared model into `out`, keeping `exclude` in float (or quantizing `only` these nodes)."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        cfg = self.cfg
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        common: dict[str, Any] = {
            "per_channel": cfg.per_channel,
            "reduce_range": self.reduce_range,
            "weight_type": qtype[weight_type or cfg.weight_type],
            "op_types_to_quantize": op_types if op_types is not None else cfg.op_types,
            "nodes_to_exclude": [*cfg.exclude_nodes, *exclude],
            "nodes_to_quantize": only,
        }
        self.count += 1
        with quiet(None):  # the quantizer warns through the root logger, e.g. once per LayerNorm weight
            try:
                if cfg.mode == "dynamic":
                    quantize_dynamic(str(self.source), str(out), **common)
                    return
                assert self.calibration is not None
                fixed = _fixed_batch(self.source)
                reader = None
                if not self.cache.exists():  # the first call calibrates; later ones reuse the cached ranges
                    bar = iter(self.progress.track(range(-(-len(self.calibration) // (fixed or self.batch_size))), None, "calibrating"))
                    reader = CalibrationReader(self.calibration, fixed or self.batch_size, pad=fixed is not None,
                                               on_batch=lambda: next(bar, None))
                extra = {"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": cfg.symmetric_weights}
                if reader is not None:
                    extra["CalibStridedMinMax"] = reader.stride(cfg.calibration_chunk)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
                quantize_static(
                    str(self.source), str(out), reader,
                    quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                    activation_type=qtype[cfg.activation_type], calibrate_method=method, extra_options=extra,
                    calibration_cache_path=str(self.cache), **common,
                )
            except UserError:
                raise
            except Exception as exc:
                raise StageError("quantize", f"onnxruntime {cfg.mode} quantization failed: {first_line(exc)[:300]}") from exc


class _Judge:
    """Scores quantized models against the fp32 model on evaluation data, and times them."""

    def __init__(self, fp32: Path, evaluation: Dataset, targets: Targets, threads: int) -> None:
        from deploytool.runners import OrtRunner, infer_dataset

        self.fp32 = fp32
        self.evaluation = evaluation
        self.targets = targets
        self.threads = threads
        runner = OrtRunner("fp32", fp32, threads)
        self.fixed = runner.batch_dim()  # a model with a fixed batch size takes exactly that many samples
        self.reference = infer_dataset(runner, evaluation, self.fixed or 64, pad=self.fixed is not None)[0]
        self.labels = evaluation.labels
        self.base_accuracy = self._accuracy(self.reference)

    def _accuracy(self, logits: np.ndarray) -> float | None:
        from deploytool.compare import accuracy

        if self.labels is None or self.targets.max_accuracy_drop is None or logits.ndim != 2:
            return None
        return accuracy(logits, self.labels)

    def score(self, path: Path) -> dict[str, Any]:
        from deploytool.compare import compare_arrays
        from deploytool.runners import OrtRunner, infer_dataset

        out = infer_dataset(OrtRunner("candidate", path, self.threads), self.evaluation, self.fixed or 64,
                            pad=self.fixed is not None)[0]
        cosine = float(compare_arrays(self.reference, out)["cosine_mean"])  # type: ignore[arg-type]
        result: dict[str, Any] = {"cosine": round(cosine, 6)}
        ok = cosine >= self.targets.min_cosine
        accuracy = self._accuracy(out)
        if accuracy is not None and self.base_accuracy is not None:
            result["accuracy_drop"] = round(self.base_accuracy - accuracy, 6)
            ok = ok and result["accuracy_drop"] <= self.targets.max_accuracy_drop  # type: ignore[operator]
        result["meets_targets"] = bool(ok)
        return result

    def latency(self, paths: dict[str, Path], runs: int = 60) -> dict[str, float]:
        """Latency (ms, median of block means) of each model at batch 1, by the shared block method."""
        from deploytool.latency import TimingPlan, measure
        from deploytool.runners import OrtRunner

        feeds = next(self.evaluation.batches(self.fixed or 1, pad=self.fixed is not None))
        runners = [OrtRunner(name, path, self.threads) for name, path in paths.items()]
        measurement = measure(runners, feeds, TimingPlan.for_calls(runs, block=10, warmup=5), control=False)
        return {name: timed.center_ms for name, timed in measurement.timed.items()}


def _compute_nodes(path: Path, op_types: list[str] | None) -> list[tuple[str, str]]:
    import onnx

    wanted = set(op_types) if op_types else set(COMPUTE_OPS)
    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node if n.op_type in wanted and n.name]


def _mixed_precision(quantizer: _Quantizer, judge: _Judge, out: Path, record: QuantizeRecord) -> dict[str, Any]:
    """Keep the fewest most sensitive nodes in float so that `out` meets the targets; returns its score.

    Sensitivity of a node = 1 - output cosine when only that node is quantized. With nodes sorted
    by it, "the k most sensitive in float" passes from some k on; bisection finds the smallest k
    with about log2(n) re-quantizations (calibration is not repeated)."""
    nodes = [n for n in _compute_nodes(quantizer.source, quantizer.cfg.op_types) if n[0] not in quantizer.cfg.exclude_nodes]
    trial = quantizer.folder / "trial.onnx"
    sensitivity: list[tuple[float, int, str, str]] = []
    for index, (name, op) in enumerate(quantizer.progress.track(nodes, len(nodes), "ranking node sensitivity")):
        quantizer.quantize(trial, [], only=[name])
        sensitivity.append((round(1.0 - judge.score(trial)["cosine"], 8), index, name, op))
    ranked = sorted(sensitivity, key=lambda s: (-s[0], s[1]))  # ties keep graph order: deterministic

    def attempt(k: int) -> dict[str, Any]:
        quantizer.quantize(trial, [name for _, _, name, _ in ranked[:k]])
        score = judge.score(trial)
        record.attempts.append({"search": "mixed precision", "float_nodes": k, **score})
        return score

    low, high = 0, len(ranked)  # k = 0 is known to fail
    best = attempt(high)
    if not best["meets_targets"]:
        record.notes.append("mixed precision: even with every compute node in float the targets are not met")
        quantizer.quantize(out, [])
        return judge.score(out)
    while high - low > 1:
        mid = (low + high) // 2
        score = attempt(mid)
        if score["meets_targets"]:
            high, best = mid, score
        else:
            low = mid
    quantizer.quantize(out, [name for _, _, name, _ in ranked[:high]])
    record.float_nodes = [
        {"node": name, "op": op, "sensitivity": cost, "why": f"quantized alone, it lowers output cosine to {1 - cost:.5f}"}
        for cost, _, name, op in ranked[:high]
    ]
    drop = f", accuracy drop {best['accuracy_drop']:.4f}" if "accuracy_drop" in best else ""
    record.notes.append(f"mixed precision: {high} of {len(ranked)} compute nodes kept in float (cosine {best['cosine']:.4f}{drop})")
    return best


def _speed_search(quantizer: _Quantizer, judge: _Judge, out: Path, exclude: list[str], record: QuantizeRecord) -> None:
    """If `out` is slower than fp32 on this CPU, try cheaper configurations; keep the fastest that meets the targets.

    The choice depends on measured latency, so unlike everything else it can differ between runs."""
    timings = judge.latency({"fp32": judge.fp32, "chosen": out})
    record.attempts.append({"search": "speed", "variant": "chosen", "p50_ms": round(timings["chosen"], 4),
                            "fp32_p50_ms": round(timings["fp32"], 4)})
    if timings["chosen"] <= timings["fp32"]:
        return
    variants: dict[str, dict[str, Any]] = {
        "uint8 weights": {"weight_type": "uint8"},
        "MatMul/Gemm only": {"op_types": ["MatMul", "Gemm"]},
        "Conv only": {"op_types": ["Conv"]},
    }
    present = {op for _, op in _compute_nodes(quantizer.source, None)}
    candidates = {"chosen": out}
    for label, options in variants.items():
        if "op_types" in options and not present & set(options["op_types"]):
            continue
        path = quantizer.folder / f"variant-{len(candidates)}.onnx"
        quantizer.quantize(path, exclude, **options)
        score = judge.score(path)
        record.attempts.append({"search": "speed", "variant": label, **score})
        if score["meets_targets"]:
            candidates[label] = path
    timings = judge.latency({"fp32": judge.fp32, **candidates})
    for attempt in record.attempts:
        if attempt.get("variant") in timings and attempt.get("search") == "speed" and "p50_ms" not in attempt:
            attempt["p50_ms"] = round(timings[str(attempt["variant"])], 4)
    fastest = min(candidates, key=lambda label: timings[label])
    if fastest != "chosen":
        shutil.copyfile(candidates[fastest], out)
        record.settings["speed_variant"] = fastest
        record.notes.append(f"speed search: '{fastest}' is the fastest accurate int8 variant ({timings[fastest]:.3f} ms "
                            f"vs {timings['chosen']:.3f} ms p50)")
    if timings[fastest] > timings["fp32"]:
        record.notes.append(f"speed search: no accurate int8 variant beats fp32 on this CPU ({timings[fastest]:.3f} vs "
                            f"{timings['fp32']:.3f} ms p50)")


def quantize_onnx(
    in_path: Path,
    out_path: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    batch_size: int = 16,
    evaluation: Dataset | None = None,
    targets: Targets | None = None,
    threads: int = 1,
    progress: Progress | None = None,
) -> QuantizeRecord:
    """Quantize `in_path` into `out_path`; with `evaluation` data, mixed precision and speed search can run."""
    progress = progress or Silent()
    targets = targets or Targets()
    notes: list[str] = []
    if cfg.mode == "static" and calibration is None:
        raise UserError("static quantization needs calibration data", "set [data] calibration, or quantize.mode = \"dynamic\"")
    if cfg.mode == "static" and cfg.calibration_samples is not None:
        calibration = calibration.head(cfg.calibration_samples)  # type: ignore[union-attr]
    if (cfg.auto_mixed_precision or cfg.speed_search) and evaluation is None:
        raise UserError("[quantize] auto_mixed_precision and speed_search need validation or calibration data to score on")
    with tempfile.TemporaryDirectory(prefix="deploytool-quantize-") as tmp:
        folder = Path(tmp)
        source, optimize, preprocess = in_path, "none", "skipped"
        if cfg.optimize == "transformer":
            optimize = _optimize_transformer(source, folder / "optimized.onnx", cfg, notes)
            if optimize != "failed":
                source = folder / "optimized.onnx"
        if cfg.preprocess:
            preprocess = _preprocess(source, folder / "prepared.onnx", notes)
            if preprocess != "failed":
                source = folder / "prepared.onnx"
        quantizer = _Quantizer(source, cfg, calibration, batch_size, folder, progress)
        record = QuantizeRecord(cfg.mode, quantizer.settings(), len(calibration) if cfg.mode == "static" else 0,  # type: ignore[arg-type]
                                preprocess, optimize, notes=notes)
        draft = folder / "int8.onnx"
        quantizer.quantize(draft, [])
        if evaluation is not None and (cfg.auto_mixed_precision or cfg.speed_search):
            judge = _Judge(in_path, evaluation.head(cfg.search_samples), targets, threads)
            score = judge.score(draft)
            record.attempts.append({"search": "default", **score})
            if cfg.auto_mixed_precision and not score["meets_targets"]:
                _mixed_precision(quantizer, judge, draft, record)
            if cfg.speed_search:
                _speed_search(quantizer, judge, draft, [str(n["node"]) for n in record.float_nodes], record)
        record.settings["quantizations"] = quantizer.count
        with atomic_path(out_path) as final:
            shutil.copyfile(draft, final)
    return record
