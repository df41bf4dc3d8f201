"""quantize: ONNX Runtime static (calibrated) or dynamic int8 quantization, with CPU-aware defaults.

Static quantization calibrates once per float graph (activation ranges are cached) and then
re-quantizes cheaply. With data to score on (the validation data of a run, else the calibration
data) every choice below is measured against the fp32 model, on all the samples the verify stage
gates on, with the targets the gates use (output cosine, SNR, top-1 agreement for classifiers,
accuracy drop with labels):
- cross-layer equalization and bias correction of Conv chains (deploytool.equalize), each kept only
  when the quantized model scores better with it;
- 8-bit weights layer by layer where 7-bit weights (reduce_range, the default on CPUs without int8
  dot-product instructions) miss the targets: layers ranked by how much 8-bit weights lower their own
  error, measured in one pass (deploytool.sensitivity); the fewest found by bisection; the speed of
  the result checked against fp32;
- automatic mixed precision (opt-in): the fewest most sensitive nodes kept in float until the targets
  hold; nodes ranked by one pass of local errors, the count found by bisection (about log2(n) rounds);
- speed search (opt-in): when the int8 model is slower than the fp32 one on this CPU, cheaper
  configurations are tried and the fastest that still meets the targets is kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import CalibrationReader, Dataset
from deploytool.errors import StageError, UserError, first_line
from deploytool.gates import DEFAULT_MIN_COSINE, DEFAULT_MIN_SNR_DB
from deploytool.hardware import cpu_info, has_int8_dot_product
from deploytool.logs import quiet
from deploytool.progress import Progress, Silent
from deploytool.recipe import QuantizeConfig

log = logging.getLogger(__name__)

# op types whose int8 kernels do the work; the sensitivity ranking considers these
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose", "Attention")
HISTOGRAM_METHODS = ("entropy", "percentile")
# what a transformer graph quantizes when the recipe names no op types
TRANSFORMER_OPS = ("MatMul", "Gemm", "Conv")
# activations held at once while calibrating (one chunk of batches): bounds calibration memory on large models
CALIBRATION_BYTES = 512 * 2**20
# what the dynamic candidate quantizes: ONNX Runtime's dynamic int8 kernels (MatMulInteger, DynamicQuantizeLSTM);
# static int8 has no LSTM kernel, so on a recurrent model only this candidate quantizes the recurrent layers
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM")
# SmoothQuant migration strengths tried when the recipe sets none
SMOOTH_ALPHAS = (0.5, 0.65, 0.8)
# rounds a search's timing runs before it may stop because its choice is settled (the plan's own rounds otherwise)
EARLY_ROUNDS = 8


@dataclass
class Targets:
    """What a quantized model must keep, measured against the fp32 model it is made from.

    The verify stage's default gates for a quantized model are the same quantities: cosine, SNR and,
    for classifiers, top-1 agreement with the fp32 model (no labels needed)."""

    min_cosine: float = DEFAULT_MIN_COSINE
    max_accuracy_drop: float | None = None
    min_top1_agreement: float | None = None
    min_snr_db: float | None = DEFAULT_MIN_SNR_DB
    # the speed gate the int8 model will face (int8 latency / fp32 latency >= this), or None: not gated on speed.
    # Mixed precision that keeps so much in float that it loses a speedup the int8 model has is not kept.
    min_speedup: float | None = None

    def with_margin(self, scored: int, total: int) -> Targets:
        """Targets for scoring on `scored` of the `total` samples the gates use: shares of samples (top-1
        agreement, accuracy) get a margin of two binomial standard errors, so that a subset that meets
        them is unlikely to be followed by a full set that does not."""
        if scored >= total:
            return self

        def margin(share: float) -> float:
            return 2.0 * math.sqrt(max(share * (1.0 - share), 1.0 / scored) / scored)

        top1 = self.min_top1_agreement
        drop = self.max_accuracy_drop
        return replace(self, min_top1_agreement=None if top1 is None else min(1.0, top1 + margin(top1)),
                       max_accuracy_drop=None if drop is None else max(0.0, drop - margin(0.05)))

    def describe(self) -> str:
        parts = [f"cosine >= {self.min_cosine}"]
        if self.min_snr_db is not None:
            parts.append(f"SNR >= {self.min_snr_db} dB")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_top1_agreement:.4f}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:.4f}")
        return ", ".join(parts)


@dataclass
class QuantizeRecord:
    mode: str
    settings: dict[str, object]
    calibration_samples: int = 0
    preprocess: str = "skipped"
    optimize: str = "none"
    float_nodes: list[dict[str, object]] = field(default_factory=list)
    layer_weights: list[dict[str, object]] = field(default_factory=list)
    equalization: dict[str, object] = field(default_factory=dict)
    bias_correction: dict[str, object] = field(default_factory=dict)
    smoothing: dict[str, object] = field(default_factory=dict)
    kept_float: list[dict[str, str]] = field(default_factory=list)  # protected nodes: side paths, extreme ranges
    input_floor: dict[str, object] = field(default_factory=dict)  # the fp32 model on int8-rounded inputs (deploytool.floor)
    attempts: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """Flat: the settings sit beside mode, preprocess and the sample count."""
        flat = {k: v for k, v in self.__dict__.items() if k != "settings"}
        return {**flat, **self.settings}


def _preprocess(in_path: Path, out_path: Path, notes: list[str]) -> str:
    """quant_pre_process with symbolic shape inference, then without it; the raw model if both fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's symbolic shape inference saves its partial result into the working directory when it gives up
    # (sym_shape_infer_temp.onnx and an external-data file): run it from the stage's temporary folder
    in_path, out_path = in_path.resolve(), out_path.resolve()
    try:
        with contextlib.chdir(out_path.parent):
            quant_pre_process(str(in_path), str(out_path))
        return "done"
    except Exception as exc:
        first = first_line(exc)
        log.debug("quant_pre_process failed", exc_info=True)
    try:
        with contextlib.chdir(out_path.parent):
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


def _activation_bytes(path: Path, feeds: Mapping[str, np.ndarray]) -> int:
    """Estimated bytes of every float activation of one sample (what calibration collects), from inferred shapes."""
    import onnx

    from deploytool.shapes import per_sample_bytes

    model = onnx.load(str(path), load_external_data=False)
    names = [o for n in model.graph.node for o in n.output]
    return per_sample_bytes(model, names, feeds)


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


def calibration_batching(samples: int, batch_size: int, method: str, fixed: int | None) -> tuple[int, bool]:
    """(batch size, pad) for the calibration reader.

    ONNX Runtime's entropy and percentile calibrators stack the batches of a chunk into one array, so
    every batch must have the same size: the batch size becomes the largest divisor of the sample count
    not above `batch_size` (when it is at least half of it), else the last batch is filled up by wrapping
    around to the first samples (a few samples then count twice). A fixed batch axis always pads."""
    if fixed is not None:
        return fixed, True
    if method not in HISTOGRAM_METHODS or samples % batch_size == 0:
        return batch_size, False
    divisor = max(d for d in range(1, min(batch_size, samples) + 1) if samples % d == 0)
    if divisor * 2 >= min(batch_size, samples):
        return divisor, False
    return batch_size, True


@dataclass(frozen=True)
class _Float:
    """A float graph to quantize and the calibration cache of its activation ranges."""

    path: Path
    cache: Path


class _Quantizer:
    """Quantizes prepared float models repeatedly with different node sets; each graph family is calibrated once."""

    def __init__(self, source: Path, cfg: QuantizeConfig, calibration: Dataset | None, batch_size: int,
                 folder: Path, progress: Progress) -> None:
        self.source, self.cfg, self.folder = source, cfg, folder
        self.reduce_range, self.reduce_range_reason = resolve_reduce_range(cfg)
        self.base = _Float(source, folder / "calibration.json")
        self.cache = self.base.cache
        self.calibration = calibration
        self.batch_size = batch_size
        self.progress = progress
        self.count = 0
        self.calibration_batch: tuple[int, bool] | None = None
        self.calibration_plan: dict[str, object] = {}
        # nodes that stay in float whatever the search does, and why (side paths, extreme calibrated ranges)
        self.protected: dict[str, str] = {}
        self.op_types: list[str] | None = cfg.op_types  # what is quantized: the recipe's, or the transformer default
        self.float_outputs: list[str] = []  # op types whose outputs stay float (int8 in, float out: MatMulIntegerToFloat)
        self.raw = source  # the float graph before quant_pre_process

    def excluded(self, extra: list[str]) -> list[str]:
        return list(dict.fromkeys([*self.cfg.exclude_nodes, *self.protected, *extra]))

    def settings(self) -> dict[str, object]:
        cfg = self.cfg
        settings: dict[str, object] = {
            "per_channel": cfg.per_channel, "weight_type": cfg.weight_type, "reduce_range": self.reduce_range,
            "reduce_range_reason": self.reduce_range_reason, "op_types": self.op_types, "float_outputs": self.float_outputs,
            "exclude_nodes": cfg.exclude_nodes,
            "isa": cpu_info()["isa"],
        }
        if cfg.mode == "static":
            settings.update(format=cfg.format, activation_type=cfg.activation_type, calibration_method=cfg.calibration_method,
                            symmetric_activations=cfg.symmetric_activations, symmetric_weights=cfg.symmetric_weights)
        return settings

    def _overrides(self, overrides: dict[str, dict[str, Any]] | None) -> dict[str, list[dict[str, Any]]]:
        """ONNX Runtime's TensorQuantOverrides for per-weight quant_type/reduce_range (per-channel: axis 0, Conv)."""
        from onnxruntime.quantization import QuantType

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        result: dict[str, list[dict[str, Any]]] = {}
        for name, options in (overrides or {}).items():
            entry: dict[str, Any] = {"quant_type": qtype[options["weight_type"]], "reduce_range": options["reduce_range"]}
            if self.cfg.per_channel:
                entry["axis"] = 0
            result[name] = [entry]
        return result

    def quantize(self, out: Path, exclude: list[str], op_types: list[str] | None = None, weight_type: str | None = None,
                 only: list[str] | None = None, model: _Float | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, mode: str | None = None) -> None:
        """Quantize a prepared model (the base one unless `model` is given) into `out`, keeping `exclude` in float
        (or quantizing `only` these nodes); `overrides`: {weight initializer: {weight_type, reduce_range}}."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        cfg = self.cfg
        model = model or self.base
        if op_types is not None and self.op_types is not None and not set(op_types) <= set(self.op_types):
            # ONNX Runtime calibrates only the tensors of the op types it quantizes: other op types (a speed-search
            # variant) need ranges of their own, in a cache of their own
            model = _Float(model.path, model.cache.with_name(f"{model.cache.stem}-{'-'.join(sorted(op_types))}.json"))
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        common: dict[str, Any] = {
            "per_channel": cfg.per_channel,
            "reduce_range": self.reduce_range,
            "weight_type": qtype[weight_type or cfg.weight_type],
            "op_types_to_quantize": op_types if op_types is not None else self.op_types,
            "nodes_to_exclude": self.excluded(exclude),
            "nodes_to_quantize": only,
        }
        self.count += 1
        with quiet(None):  # the quantizer warns through the root logger, e.g. once per LayerNorm weight
            try:
                if (mode or cfg.mode) == "dynamic":
                    if mode == "dynamic":  # a candidate of the static search: ONNX Runtime's dynamic defaults elsewhere
                        common.update(per_channel=False, op_types_to_quantize=list(DYNAMIC_OPS))
                    quantize_dynamic(str(model.path), str(out), **common)
                    return
                assert self.calibration is not None
                reader = None
                extra: dict[str, Any] = {"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": cfg.symmetric_weights}
                if not model.cache.exists():  # the first call calibrates; later ones reuse the cached ranges
                    fixed = _fixed_batch(model.path)
                    per_sample = _activation_bytes(model.path, self.calibration.feeds)
                    wanted = self.batch_size if fixed else max(1, min(self.batch_size, CALIBRATION_BYTES // per_sample))
                    batch, pad = calibration_batching(len(self.calibration), wanted, cfg.calibration_method, fixed)
                    self.calibration_batch = (batch, pad)
                    bar = iter(self.progress.track(range(-(-len(self.calibration) // batch)), None, "calibrating"))
                    reader = CalibrationReader(self.calibration, batch, pad=pad, on_batch=lambda: next(bar, None))
                    # a chunk's activations are held until its ranges are merged: as many batches as fit the budget
                    chunk = max(1, min(cfg.calibration_chunk, CALIBRATION_BYTES // max(per_sample * batch, 1)))
                    extra["CalibStridedMinMax"] = reader.stride(chunk)
                    self.calibration_plan = {"batch": batch, "batches_per_chunk": extra["CalibStridedMinMax"],
                                             "activation_mib_per_sample": round(per_sample / 2**20, 2)}
                if overrides:
                    extra["TensorQuantOverrides"] = self._overrides(overrides)
                if self.float_outputs:
                    extra["OpTypesToExcludeOutputQuantization"] = list(self.float_outputs)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]

                def run() -> None:
                    quantize_static(
                        str(model.path), str(out), reader,
                        quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                        activation_type=qtype[cfg.activation_type], calibrate_method=method, extra_options=extra,
                        calibration_cache_path=str(model.cache), **common,
                    )

                run()
                if reader is not None and self._protect_extremes(model):  # ranges that 8 bits cannot hold
                    common["nodes_to_exclude"] = self.excluded(exclude)
                    run()
                if cfg.format == "qdq":
                    self._bypass(out, common["op_types_to_quantize"], common["nodes_to_exclude"], model.path)
            except UserError:
                raise
            except Exception as exc:
                raise StageError("quantize", f"onnxruntime {cfg.mode} quantization failed: {first_line(exc)[:300]}") from exc


    @staticmethod
    def _bypass(path: Path, op_types: list[str] | None, excluded: list[str], source: Path) -> None:
        """Nodes that are not quantized read float tensors, not 8-bit copies (deploytool.transformer.float_bypass),
        with the activations the quantizer folded into a QuantizeLinear restored on their float path."""
        import onnx

        from deploytool.transformer import drop_dead_qdq, float_bypass, restore_activations

        skip = set(excluded)
        types = set(op_types) if op_types is not None else None
        model = onnx.load(str(path))
        if float_bypass(model, lambda node: node.name not in skip and (types is None or node.op_type in types)):
            drop_dead_qdq(model)
            restore_activations(model, onnx.load(str(source), load_external_data=False))
            onnx.save(model, str(path))

    def _protect_extremes(self, model: _Float) -> bool:
        """Keep in float every node that reads or writes a tensor whose calibrated range is not finite or extreme
        (see deploytool.transformer); True when that adds nodes."""
        import onnx

        from deploytool.transformer import EXTREME, calibrated_ranges, extreme_tensors, nodes_touching

        extremes = extreme_tensors(calibrated_ranges(model.cache))
        if not extremes:
            return False
        graph = onnx.load(str(model.path), load_external_data=False)
        added = False
        for node, tensor in nodes_touching(graph, extremes).items():
            if node not in self.protected:
                low, high = extremes[tensor]
                self.protected[node] = f"{tensor} has a calibrated range [{low:.3g}, {high:.3g}] (|x| >= {EXTREME:g} or not finite)"
                added = True
        return added


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
        self.references = infer_dataset(runner, evaluation, self.fixed or 64, pad=self.fixed is not None)
        self.reference = self.references[0]
        self.labels = evaluation.labels
        self.base_accuracy = self._accuracy(self.reference)
        self.scores = 0

    def _accuracy(self, logits: np.ndarray) -> float | None:
        from deploytool.compare import accuracy

        if self.labels is None or self.targets.max_accuracy_drop is None or logits.ndim < 2 \
                or self.labels.size != logits.size // logits.shape[-1]:
            return None
        return accuracy(logits, self.labels)

    def score(self, path: Path) -> dict[str, Any]:
        """cosine and SNR (the worst output), top-1 agreement (first output, classes on its last axis), accuracy drop;
        whether the targets hold."""
        from deploytool.runners import OrtRunner, infer_dataset

        self.scores += 1
        return self.grade(infer_dataset(OrtRunner("candidate", path, self.threads), self.evaluation, self.fixed or 64,
                                        pad=self.fixed is not None))

    def floor(self, path: Path) -> dict[str, Any] | None:
        """The fp32 model scored on inputs rounded as the quantized model at `path` rounds them (deploytool.floor);
        None when that model rounds no float input (dynamic, QOperator, integer inputs)."""
        from deploytool.floor import run_rounded
        from deploytool.runners import OrtRunner

        measured = run_rounded(OrtRunner("fp32", self.fp32, self.threads), path, self.evaluation, self.fixed or 64,
                               pad=self.fixed is not None)
        if measured is None:
            return None
        outputs, snr = measured
        result = self.grade(outputs)
        if snr is not None:
            result["input_snr_db"] = snr
        return result

    def grade(self, outs: list[np.ndarray]) -> dict[str, Any]:
        """The scores of outputs against the fp32 model's."""
        from deploytool.compare import compare_arrays, top1_agreement

        compared = [compare_arrays(ref, out) for ref, out in zip(self.references, outs, strict=True)]
        cosine = min(float(c.get("cosine_mean", float("nan"))) for c in compared)  # type: ignore[arg-type]
        snr = min(float(c.get("snr_db", float("nan"))) for c in compared)  # type: ignore[arg-type]
        result: dict[str, Any] = {"cosine": round(cosine, 6), "snr_db": round(snr, 3) if math.isfinite(snr) else snr}
        targets = self.targets
        ok = cosine >= targets.min_cosine
        if targets.min_snr_db is not None:
            ok = ok and snr >= targets.min_snr_db
        out = outs[0]
        if out.ndim >= 2 and out.shape[-1] > 1 and out.shape == self.reference.shape:
            # the class axis is the last, as the verify stage reads it: (batch, classes), or a class per token or
            # position (batch, tokens, vocabulary) where each position's answer counts
            result["top1_agreement"] = round(top1_agreement(self.reference, out), 6)
            if targets.min_top1_agreement is not None:
                ok = ok and result["top1_agreement"] >= targets.min_top1_agreement
        elif targets.min_top1_agreement is not None:
            ok = False
        accuracy = self._accuracy(out)
        if accuracy is not None and self.base_accuracy is not None:
            result["accuracy_drop"] = round(self.base_accuracy - accuracy, 6)
            ok = ok and result["accuracy_drop"] <= targets.max_accuracy_drop  # type: ignore[operator]
        result["meets_targets"] = bool(ok and math.isfinite(cosine))
        return result

    def rank(self, score: dict[str, Any], by_snr: bool = False) -> tuple[float, ...]:
        """Orders scores: meeting the targets first; among models that miss them, top-1 agreement (when it is a
        target, unless `by_snr`) first; then SNR, which measures every output value, not just a few answers near a
        boundary."""
        meets = bool(score["meets_targets"])
        top1 = float(score.get("top1_agreement", 0.0)) \
            if self.targets.min_top1_agreement is not None and not meets and not by_snr else 0.0
        snr = float(score.get("snr_db", -math.inf))
        return (float(meets), top1, snr if math.isfinite(snr) or snr > 0 else -math.inf)

    def latency(self, paths: dict[str, Path], runs: int = 60) -> dict[str, float]:
        """Latency (ms, median of block means) of each model at batch 1, by the shared block method."""
        return {name: timed.center_ms for name, timed in self.measure(paths, runs).timed.items()}

    def measure(self, paths: dict[str, Path], runs: int = 60, control: bool = False,
                decided: Callable[[Any], bool] | None = None) -> Any:
        """The shared block method (deploytool.latency) over `paths`, at batch 1 (or the fixed batch); `control`: with
        the A/A control (an extra session of the first model), whose distance from 1.0 is the noise of the measurement.
        `decided`: what the measurement is for; timing then stops once it holds (after EARLY_ROUNDS rounds, checked
        every second round), and never runs longer than without it."""
        from deploytool.latency import Timer, TimingPlan
        from deploytool.runners import OrtRunner

        feeds = next(self.evaluation.batches(self.fixed or 1, pad=self.fixed is not None))
        runners = [OrtRunner(name, path, self.threads) for name, path in paths.items()]
        plan = TimingPlan.for_calls(runs, block=10, warmup=5)
        timer = Timer(runners, feeds, plan, control=control)
        if decided is None:
            return timer.run()
        measurement = timer.run(rounds=min(EARLY_ROUNDS, plan.rounds))
        while timer.rounds < plan.rounds and not timer.exhausted and not decided(measurement):
            measurement = timer.run(rounds=min(2, plan.rounds - timer.rounds))
        return measurement


def _compute_nodes(path: Path, op_types: list[str] | None) -> list[tuple[str, str]]:
    import onnx

    wanted = set(op_types) if op_types else set(COMPUTE_OPS)
    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node if n.op_type in wanted and n.name]


@dataclass(frozen=True)
class _Candidate:
    """How one quantized model is made: which float graph, bias correction, 8-bit layers, float nodes."""

    graph: str = "exported"  # the float graph: "exported", "raw" (not pre-processed), "equalized" or "smoothed-<alpha>"
    mode: str = "static"  # or "dynamic": activation ranges computed at run time (transformer MatMuls)
    corrected: bool = False
    wide: tuple[str, ...] = ()  # Conv nodes whose weights get 8 bits where the rest get 7 (reduce_range)
    float_nodes: tuple[str, ...] = ()

    @property
    def equalized(self) -> bool:
        return self.graph == "equalized"

    def label(self) -> str:
        names = {"exported": "as exported", "raw": "as exported, not pre-processed"}
        parts = [names.get(self.graph, self.graph.replace("-", " alpha "))]
        if self.mode == "dynamic":
            parts.append("dynamic")
        if self.corrected:
            parts.append("bias corrected")
        if self.wide:
            parts.append(f"{len(self.wide)} layer(s) with 8-bit weights")
        if self.float_nodes:
            parts.append(f"{len(self.float_nodes)} node(s) in float")
        return ", ".join(parts)


class _Builder:
    """Makes, scores and remembers candidates; the float graphs (as exported, equalized) and their statistics."""

    def __init__(self, quantizer: _Quantizer, judge: _Judge, record: QuantizeRecord, threads: int) -> None:
        import onnx

        self.quantizer = quantizer
        self.judge = judge
        self.record = record
        self.threads = threads
        self.folder = quantizer.folder
        self.models: dict[str, Any] = {"exported": onnx.load(str(quantizer.source))}
        self.floats: dict[str, _Float] = {"exported": quantizer.base}
        self.wide_options: dict[str, dict[str, Any]] = {}  # Conv node -> its 8-bit weight override
        self.weight_of: dict[str, str] = {}  # Conv node -> weight initializer
        self.scores: dict[_Candidate, dict[str, Any]] = {}
        self.paths: dict[_Candidate, Path] = {}
        self.corrections: dict[_Candidate, list[dict[str, object]]] = {}
        # (graph, mode, Conv node, 8-bit weights) -> the expected shift of the node's quantized output. It is local
        # (its twin computes from float inputs, with the calibrated input scale and the node's own weights), so a
        # candidate that differs only in which other nodes stay float or get 8 bits reuses it
        self.shifts: dict[tuple[str, str, str, bool], np.ndarray | None] = {}

    def quantized_convs(self) -> list[str]:
        """Conv nodes the configuration quantizes (their weights are constants)."""
        op_types = self.quantizer.op_types
        if op_types is not None and "Conv" not in op_types:
            return []
        model = self.models["exported"]
        constants = {t.name for t in model.graph.initializer}
        excluded = set(self.quantizer.excluded([]))
        return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name and n.name not in excluded
                and len(n.input) > 1 and n.input[1] in constants]

    def path(self, candidate: _Candidate) -> Path:
        """The quantized model of `candidate`, made once."""
        if candidate in self.paths:
            return self.paths[candidate]
        import onnx

        from deploytool.equalize import bias_correct, save

        out = self.folder / f"candidate-{len(self.paths)}.onnx"
        source = self.floats[candidate.graph]
        overrides = {self.weight_of[n]: self.wide_options[n] for n in candidate.wide}
        self.quantizer.quantize(out, list(candidate.float_nodes), model=source, overrides=overrides,
                                mode="dynamic" if candidate.mode == "dynamic" else None)
        if candidate.corrected:
            # the expected shift of each quantized convolution's output, measured in one pass over the calibration
            # data: the part its weights cause (W_q - W) E[x], and the part the rounding of its input causes
            from deploytool.sensitivity import local_errors

            model, quantized = self.models[candidate.graph], onnx.load(str(out))
            assert self.quantizer.calibration is not None
            fixed = _fixed_batch(self.quantizer.source)

            def key(node: str) -> tuple[str, str, str, bool]:
                return candidate.graph, candidate.mode, node, node in candidate.wide

            convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name]
            errors = local_errors(model, quantized, self.quantizer.calibration, fixed or 64, fixed is not None,
                                  self.threads, op_types=("Conv",), weights=False,
                                  nodes={n for n in convs if key(n) not in self.shifts})
            self.shifts.update({key(name): error.shift for name, error in errors.items()})
            dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
            quantized_convs = {n.name for n in quantized.graph.node if n.op_type == "Conv" and dequantized & set(n.input)
                               and n.name not in candidate.float_nodes}
            shifts = {n: shift for n in convs if n in quantized_convs and (shift := self.shifts.get(key(n))) is not None}
            corrected, records = bias_correct(model, quantized, None, self.threads, shifts)
            float_path = save(corrected, self.folder / f"corrected-{len(self.paths)}.onnx")
            self.quantizer.quantize(out, list(candidate.float_nodes), model=_Float(float_path, source.cache),
                                    overrides=overrides)
            self.corrections[candidate] = records
        self.paths[candidate] = out
        return out

    def score(self, candidate: _Candidate, search: str, **details: object) -> dict[str, Any]:
        if candidate not in self.scores:
            import time

            started = time.perf_counter()
            self.scores[candidate] = self.judge.score(self.path(candidate))
            self.record.attempts.append({"search": search, **details, "model": candidate.label(), **self.scores[candidate],
                                         "seconds": round(time.perf_counter() - started, 2)})
        return self.scores[candidate]

    def best(self, candidates: list[_Candidate]) -> _Candidate:
        """The best-scoring candidate; the earliest (simplest) one wins ties."""
        return max(candidates, key=lambda c: self.judge.rank(self.scores[c]))


def _improve(builder: _Builder, default: _Candidate, transformer: bool = False) -> _Candidate:
    """Cross-layer equalization and bias correction, each kept only where the scores say it helps."""
    from deploytool.equalize import collect_statistics, equalize, find_pairs, save

    quantizer, record = builder.quantizer, builder.record
    cfg = quantizer.cfg
    assert quantizer.calibration is not None
    model = builder.models[default.graph]
    convs = set(builder.quantized_convs())
    pairs = [p for p in find_pairs(model) if {p.names[0], p.names[1]} <= convs] if cfg.equalize is not False else []
    correct = cfg.bias_correction is not False and bool(convs)
    if correct and transformer and len(convs) == 1 and cfg.bias_correction == "auto":
        # a ViT's patch embedding, one Conv under a stack of MatMuls: on DeiT-Tiny scoring its correction took 12 s
        # for a cosine change of 0.0002, not kept
        correct = False
        record.bias_correction = {"applied": False, "why": "transformer graph whose only quantized Conv is its patch "
                                  "embedding: not scored"}
    if not pairs and not correct:
        if cfg.equalize is not False:
            record.equalization = {"applied": False, "why": "no Conv -> activation -> Conv chain to equalize"}
        return default
    candidates = [default]
    equalized = None
    if pairs:
        fixed = _fixed_batch(quantizer.source)
        stats = collect_statistics(model, quantizer.calibration, [p.tensor for p in pairs], [], fixed or 64,
                                   fixed is not None, builder.threads)
        equalized = equalize(model, pairs, stats, per_channel=cfg.per_channel)
        builder.models["equalized"] = equalized.model
        builder.floats["equalized"] = _Float(save(equalized.model, quantizer.folder / "equalized.onnx"),
                                      quantizer.folder / "calibration-equalized.json")
        candidate = _Candidate(graph="equalized")
        builder.score(candidate, "equalization", pairs=len(pairs), channels_scaled=equalized.scaled_channels)
        candidates.append(candidate)
    if correct:  # on the better of the two graphs (equalization first, then bias correction, as Quark applies them)
        bases = [c for c in candidates if cfg.equalize != True or c.equalized or not pairs]  # noqa: E712
        candidate = replace(builder.best(bases or candidates), corrected=True)
        builder.score(candidate, "bias correction")
        candidates.append(candidate)
    allowed = [c for c in candidates if (cfg.equalize != True or c.equalized or not pairs)  # noqa: E712
               and (cfg.bias_correction != True or c.corrected)]  # noqa: E712
    chosen = builder.best(allowed or candidates)
    if pairs and equalized is not None:
        how = "set in the recipe" if cfg.equalize is True else (
            "scored better than without" if chosen.equalized else "did not score better, not used")
        record.equalization = {"applied": chosen.equalized, "why": how, "pairs": equalized.pairs,
                               "channels_scaled": equalized.scaled_channels,
                               "method": "activation ranges" if cfg.per_channel else "weight ranges (data-free)"}
    elif cfg.equalize is not False:
        record.equalization = {"applied": False, "why": "no Conv -> activation -> Conv chain to equalize"}
    if correct:
        how = "set in the recipe" if cfg.bias_correction is True else (
            "scored better than without" if chosen.corrected else "did not score better, not used")
        layers = builder.corrections.get(replace(chosen, corrected=True), [])
        record.bias_correction = {"applied": chosen.corrected, "why": how, "layers": len(layers),
                                  "max_shift": max((float(r["max_shift"]) for r in layers), default=0.0)}  # type: ignore[arg-type]
    applied = [name for name, used in (("cross-layer equalization", chosen.equalized), ("bias correction", chosen.corrected)) if used]
    if applied:
        record.notes.append(f"{' and '.join(applied)} kept: {_summary(builder.scores[default])} -> {_summary(builder.scores[chosen])}")
    return chosen


def _smooth_quant(builder: _Builder, current: _Candidate) -> _Candidate:
    """SmoothQuant (deploytool.transformer) on the activations with outlier channels that quantized MatMul/Gemm
    nodes read; alpha from the recipe or searched, each smoothed graph calibrated and scored; kept when it scores
    better (or when the recipe sets smooth_quant = true)."""
    from deploytool.equalize import save
    from deploytool.transformer import OUTLIER_RATIO, channel_absmax, outlier_ratio, smooth, smooth_targets

    quantizer, record = builder.quantizer, builder.record
    cfg = quantizer.cfg
    model = builder.models[current.graph]
    op_types = set(quantizer.op_types or COMPUTE_OPS)
    excluded = set(quantizer.excluded(list(current.float_nodes)))
    targets = []
    for target in smooth_targets(model):
        readers = [model.graph.node[i] for i in target.readers]
        if any(r.op_type in op_types and r.name not in excluded for r in readers):
            targets.append(target)
    if not targets:
        record.smoothing = {"applied": False, "why": "no quantized MatMul/Gemm reads an activation with constant weights"}
        return current
    data = quantizer.calibration if quantizer.calibration is not None else builder.judge.evaluation
    fixed = _fixed_batch(quantizer.source)
    absmax = channel_absmax(model, [t.tensor for t in targets], data, fixed or 64, fixed is not None, builder.threads)
    ratios = {t.tensor: outlier_ratio(absmax[t.tensor]) for t in targets if t.tensor in absmax}
    outliers = [t for t in targets if ratios.get(t.tensor, 1.0) >= OUTLIER_RATIO]
    worst = max(ratios.values(), default=1.0)
    if cfg.smooth_quant == "auto":
        if not outliers:
            record.smoothing = {"applied": False, "why": f"no outlier channels (largest channel / median channel at most "
                                f"{worst:.1f}, below {OUTLIER_RATIO:g})"}
            return current
        if builder.scores[current]["meets_targets"]:
            record.smoothing = {"applied": False, "why": "outlier channels found, but the int8 model already meets the targets"}
            return current
    chosen_targets = outliers if cfg.smooth_quant == "auto" else targets
    alphas = [cfg.smooth_alpha] if cfg.smooth_alpha is not None else list(SMOOTH_ALPHAS)
    candidates = [current]
    details: dict[str, list[dict[str, object]]] = {}
    for alpha in alphas:
        smoothed = smooth(model, chosen_targets, absmax, alpha)
        graph = f"smoothed-{alpha:g}"
        builder.models[graph] = smoothed.model
        builder.floats[graph] = _Float(save(smoothed.model, quantizer.folder / f"{graph}.onnx"),
                                       quantizer.folder / f"calibration-{graph}.json")
        candidate = replace(current, graph=graph)
        builder.score(candidate, "smoothquant", alpha=alpha, tensors=len(smoothed.tensors))
        details[graph] = smoothed.tensors
        candidates.append(candidate)
    allowed = candidates[1:] if cfg.smooth_quant is True else candidates
    # the float graph is chosen by what meets the targets, then by SNR, which measures every output value
    # (a few top-1 answers near a decision boundary flip either way with any change)
    chosen = max(allowed, key=lambda c: builder.judge.rank(builder.scores[c], by_snr=True))
    applied = chosen.graph != current.graph
    why = "set in the recipe" if cfg.smooth_quant is True else (
        "scored better than without" if applied else "did not score better, not used")
    record.smoothing = {"applied": applied, "why": why, "alpha": float(chosen.graph.split("-")[1]) if applied else None,
                        "alphas_tried": alphas, "largest_outlier_ratio": round(worst, 2),
                        "tensors": details.get(chosen.graph, [])}
    if applied:
        record.notes.append(f"SmoothQuant (alpha {record.smoothing['alpha']:g}) on {len(details[chosen.graph])} activation(s) "
                            f"with outlier channels kept: {_summary(builder.scores[current])} -> {_summary(builder.scores[chosen])}")
    return chosen


def _static_or_dynamic(builder: _Builder, current: _Candidate) -> _Candidate:
    """On a transformer, ONNX Runtime's dynamic int8 MatMuls (ranges measured per call, one fused kernel) can be
    both more accurate and faster than static ones; on a model with LSTM nodes, dynamic int8 is the only way ONNX
    Runtime quantizes them (DynamicQuantizeLSTM). Score it on the same float graph; when both meet the targets,
    keep the faster by the shared latency method; otherwise the better scoring one."""
    record, judge = builder.record, builder.judge
    # quant_pre_process serves static quantization; on the BERT sample it made the dynamic model 10% slower
    if "raw" not in builder.models and builder.quantizer.raw != builder.quantizer.source:
        import onnx

        builder.models["raw"] = onnx.load(str(builder.quantizer.raw))
        builder.floats["raw"] = _Float(builder.quantizer.raw, builder.folder / "calibration-raw.json")
    graph = "raw" if current.graph == "exported" and "raw" in builder.models else current.graph
    dynamic = replace(current, mode="dynamic", graph=graph)
    kernels = _dynamic_kernels(builder.models[graph])
    score = builder.score(dynamic, f"dynamic {kernels}")
    static_score = builder.scores[current]
    if score["meets_targets"] and static_score["meets_targets"]:
        timing = judge.measure({"static": builder.path(current), "dynamic": builder.path(dynamic)},
                               decided=lambda m: m.speedup("static", "dynamic").decide(1.0) is not None)
        speedup = timing.speedup("static", "dynamic")
        record.attempts.append({"search": "static or dynamic speed", "dynamic_vs_static": speedup.as_dict()})
        faster = speedup.decide(1.0)  # True: dynamic faster on the interval; False: slower; None: not resolved
        chosen = dynamic if faster is True else current if faster is False else builder.best([current, dynamic])
        why = f"both meet the targets; dynamic runs {speedup} the static model's speed" + (
            "" if faster is not None else ", not resolved: the better scoring one")
    else:
        chosen = builder.best([current, dynamic])
        why = "scored better" if chosen is dynamic else "static scored better"
    record.settings["activation_ranges"] = {"chosen": chosen.mode, "why": why}
    if chosen is dynamic:
        record.notes.append(f"dynamic int8 {kernels} chosen ({why}): "
                            f"{_summary(static_score)} -> {_summary(score)}")
    return chosen


def _dynamic_kernels(model: Any) -> str:
    """What the dynamic candidate quantizes in `model`, in words: "MatMuls", or "MatMuls and LSTMs"."""
    return "MatMuls and LSTMs" if _has_lstm(model) else "MatMuls"


def _has_lstm(model: Any) -> bool:
    return any(node.op_type == "LSTM" for node in model.graph.node)


def _input_floor_misses(builder: _Builder, default: _Candidate) -> bool:
    """Whether the fp32 model itself, on inputs rounded as the int8 model rounds them, misses the cosine or SNR
    target. Then a model that quantizes its input is not expected to meet it: the improvements that leave the input
    rounded (SmoothQuant, equalization, bias correction, per-layer weights) are skipped; mixed precision still
    runs, since keeping the nodes that read the input in float removes that rounding."""
    try:
        floor = builder.judge.floor(builder.path(default))
    except (UserError, StageError):
        raise
    except Exception as exc:  # a diagnostic: it must not fail the stage
        log.debug("input-rounding floor failed", exc_info=True)
        builder.record.notes.append(f"the input-rounding floor could not be measured: {first_line(exc)[:200]}")
        return False
    if floor is None:
        return False
    builder.record.input_floor = floor
    builder.record.attempts.append({"search": "input rounding floor", "model": "fp32 on int8-rounded inputs", **floor})
    # a near-tied answer flips either way: the floor's top-1 agreement says how fragile the answers are, not what
    # every int8 model must lose; only its cosine and SNR (every output value) bound the searches
    bounded = floor["cosine"] < builder.judge.targets.min_cosine or (
        builder.judge.targets.min_snr_db is not None and floor["snr_db"] < builder.judge.targets.min_snr_db)
    if floor["meets_targets"] or not bounded:
        if not floor["meets_targets"]:
            builder.record.notes.append(
                f"the fp32 model alone, on its inputs rounded to the int8 model's input step, already changes some "
                f"answers ({_summary(floor)}): near-tied classes; the searches still run")
        return False
    snr = f" (input SNR {floor['input_snr_db']:.1f} dB)" if "input_snr_db" in floor else ""
    builder.record.notes.append(
        f"the fp32 model alone, on its inputs rounded to the int8 model's input step{snr}, already misses the "
        f"quantization targets: {_summary(floor)} (int8: {_summary(builder.scores[default])}). The model is this "
        "sensitive to 8-bit rounding (random or barely trained weights, near-tied classes); what keeps the input "
        "rounded cannot get below that, so SmoothQuant, equalization, bias correction and per-layer weights were "
        "not tried (mixed precision, which can keep the input in float, still is)")
    return True


def _summary(score: dict[str, Any]) -> str:
    parts = [f"cosine {score['cosine']:.4f}"]
    if "top1_agreement" in score:
        parts.append(f"top-1 agreement {score['top1_agreement']:.4f}")
    if "snr_db" in score and math.isfinite(score["snr_db"]):
        parts.append(f"SNR {score['snr_db']:.2f} dB")
    return ", ".join(parts)


def _layer_weights(builder: _Builder, current: _Candidate) -> _Candidate:
    """Where 7-bit weights miss the targets: 8-bit weights on the fewest layers that gain most.

    Depthwise convolutions get int8 weights without reduce_range (their kernels widen products to 16 bits
    before adding, so full-range weights cannot saturate); other convolutions get uint8 weights (u8 x u8
    kernels do not saturate either, but can be slower: the speed is checked)."""
    import onnx

    from deploytool.equalize import Graph, attribute, dequantized_weights
    from deploytool.sensitivity import local_errors

    quantizer, record = builder.quantizer, builder.record
    model = builder.models[current.graph]
    graph = Graph(model)
    convs = [n for n in model.graph.node if n.name in set(builder.quantized_convs()) and n.name not in current.float_nodes]
    for node in convs:
        weight = graph.initializers.get(node.input[1])
        depthwise = weight is not None and weight.dims[1] == 1 and int(attribute(node, "group", 1)) > 1
        builder.weight_of[node.name] = node.input[1]
        builder.wide_options[node.name] = ({"weight_type": "int8", "reduce_range": False} if depthwise
                                           else {"weight_type": "uint8", "reduce_range": False})
    names = tuple(n.name for n in convs)
    if not names:
        return current
    widest = replace(current, wide=names)
    score = builder.score(widest, "layer weights", layers=len(names))
    assert quantizer.calibration is not None
    fixed = _fixed_batch(quantizer.source)
    errors = local_errors(model, onnx.load(str(builder.path(current))), quantizer.calibration, fixed or 64, fixed is not None,
                          builder.threads, alternative=dequantized_weights(onnx.load(str(builder.path(widest)))), op_types=("Conv",))
    gains = {name: (e.weights - (e.alternative or 0.0)) / e.signal for name, e in errors.items()
             if name in names and e.signal > 0 and e.alternative is not None}
    order = {name: i for i, name in enumerate(names)}
    ranked = sorted((n for n in names if gains.get(n, 0.0) > 0), key=lambda n: (-gains[n], order[n]))
    if not score["meets_targets"]:  # 8 bits everywhere does not reach the targets: keep it only if it scores better
        chosen = builder.best([current, widest])
        if chosen == current:
            record.notes.append("8-bit weights on every convolution did not score better than 7-bit weights: not used")
            return current
    elif ranked and builder.score(replace(current, wide=tuple(ranked)), "layer weights", layers=len(ranked))["meets_targets"]:
        low, high = 0, len(ranked)  # k = 0 is known to fail, k = len(ranked) to pass
        chosen = replace(current, wide=tuple(ranked))
        while high - low > 1:
            mid = (low + high) // 2
            candidate = replace(current, wide=tuple(ranked[:mid]))
            if builder.score(candidate, "layer weights", layers=mid)["meets_targets"]:
                high, chosen = mid, candidate
            else:
                low = mid
    else:  # the layers that gain by themselves are not enough: keep every layer at 8 bits
        chosen = widest
    chosen = _check_layer_speed(builder, current, chosen)
    if chosen.wide:
        why = {n: f"8-bit weights lower its own output error {_db(errors[n].weight_snr_db)} -> "
                  f"{_db(errors[n].alternative_snr_db)} SNR" for n in chosen.wide if n in errors}
        record.layer_weights = [{"node": n, **builder.wide_options[n], "why": why.get(n, "needed to meet the targets")}
                                for n in chosen.wide]
        elsewhere = " (7-bit elsewhere)" if len(chosen.wide) < len(names) else ""
        record.notes.append(f"8-bit weights on {len(chosen.wide)} of {len(names)} convolutions{elsewhere}: "
                            f"{_summary(builder.scores[current])} -> {_summary(builder.scores[chosen])}")
    return chosen


def _db(value: float | None) -> str:
    return "n/a" if value is None else ("inf dB" if math.isinf(value) else f"{value:.1f} dB")


def _settled(candidate: bool | None, fallback: bool | None) -> bool:
    """Whether "drop the candidate when it is decided below the bar and the fallback is not" is final: the candidate
    clears the bar, or it misses it and the fallback is decided either way."""
    return candidate is True or (candidate is False and fallback is not None)


def _check_layer_speed(builder: _Builder, uniform: _Candidate, chosen: _Candidate) -> _Candidate:
    """Time fp32, the uniform 7-bit model and the chosen one by the shared block method; an int8 model decided
    slower than fp32 where the uniform one is not is not kept."""
    if not chosen.wide or chosen == uniform:
        return chosen
    judge = builder.judge
    measurement = judge.measure({"fp32": judge.fp32, "7-bit weights": builder.path(uniform), "chosen": builder.path(chosen)},
                                decided=lambda m: _settled(m.speedup("fp32", "chosen").decide(1.0),
                                                           m.speedup("fp32", "7-bit weights").decide(1.0)))
    mixed, flat = measurement.speedup("fp32", "chosen"), measurement.speedup("fp32", "7-bit weights")
    builder.record.attempts.append({"search": "layer weights speed", "model": chosen.label(),
                                    "speedup_vs_fp32": mixed.as_dict(), "uniform_speedup_vs_fp32": flat.as_dict()})
    if mixed.decide(1.0) is False and flat.decide(1.0) is not False:
        builder.record.notes.append(f"8-bit weights on some layers made int8 slower than fp32 here ({mixed}); kept 7-bit weights")
        return uniform
    return chosen


def _keeps_speed(builder: _Builder, current: _Candidate, mixed: _Candidate, kept: int) -> bool:
    """Whether the mixed-precision model still clears the speed gate, or the int8 model does not clear it either
    (then nothing is lost). Measured together by the shared latency method: fp32, the int8 model, the mixed one, and
    the A/A control; "clears" means by more than the control's noise, so a model at the gate is not kept or dropped on
    a coin flip of the measurement."""
    judge, record = builder.judge, builder.record
    gate = judge.targets.min_speedup
    assert gate is not None

    def clear(timing: Any) -> bool:  # the choice below no longer depends on more rounds
        margin = timing.noise or 0.0
        return _settled(timing.speedup("fp32", "mixed").decide(gate + margin), timing.speedup("fp32", "int8").decide(gate + margin))

    timing = judge.measure({"fp32": judge.fp32, "int8": builder.path(current), "mixed": builder.path(mixed)}, runs=150,
                           control=True, decided=clear)
    int8, mixed_speed = timing.speedup("fp32", "int8"), timing.speedup("fp32", "mixed")
    margin = timing.noise or 0.0
    record.attempts.append({"search": "mixed precision speed", "float_nodes": kept, "speedup_vs_fp32": mixed_speed.as_dict(),
                            "int8_speedup_vs_fp32": int8.as_dict(), "noise": margin})
    if mixed_speed.decide(gate + margin) is True or int8.decide(gate + margin) is not True:
        return True
    record.notes.append(
        f"mixed precision: the targets hold with {kept} compute nodes in float, but that model runs {mixed_speed} the "
        f"fp32 model's speed, not clear of the speed gate ({gate}x, noise {margin:.2f}), where the int8 model runs {int8}: "
        "kept the int8 model, "
        f"which misses the targets ({_summary(builder.scores[current])}); the verify stage gates it on both")
    return False


def _mixed_precision(builder: _Builder, current: _Candidate) -> _Candidate:
    """Keep the fewest most sensitive nodes in float so that the model meets the targets.

    Sensitivity of a node = the error its quantization adds at its own output (error over signal energy),
    from one pass of local errors over the calibration data; with nodes sorted by it, "the k most
    sensitive in float" passes from some k on, and bisection finds the smallest k in about log2(n) rounds."""
    import onnx

    from deploytool.sensitivity import local_errors

    quantizer, record = builder.quantizer, builder.record
    excluded = set(quantizer.excluded([]))
    nodes = [n for n in _compute_nodes(builder.floats[current.graph].path, quantizer.op_types) if n[0] not in excluded
             and n[0] not in current.float_nodes]
    # every compute node in float first: when even that misses the targets, no ranking can help. What is left in
    # int8 then (residual adds, pooling) does no compute a float model could be slower than: floating it too gives
    # back a float model with Q/DQ pairs, never one faster than fp32
    everything = replace(current, float_nodes=current.float_nodes + tuple(n for n, _ in nodes))
    if not builder.score(everything, "mixed precision", float_nodes=len(nodes))["meets_targets"]:
        record.notes.append("mixed precision: even with every compute node in float the targets are not met "
                            "(the error is not in what int8 can speed up): kept the int8 model")
        return current
    data = quantizer.calibration if quantizer.calibration is not None else builder.judge.evaluation
    fixed = _fixed_batch(quantizer.source)
    with quiet(None):
        probe = replace(current, mode="static")  # a dynamic model has no Q/DQ to probe: its static twin ranks the nodes
        errors = local_errors(builder.models[current.graph], onnx.load(str(builder.path(probe))), data, fixed or 64,
                              fixed is not None, builder.threads, weights=False)  # the ranking reads the whole error only
    order = {name: i for i, (name, _) in enumerate(nodes)}
    if any(n in errors for n, _ in nodes):
        costs = {n: errors[n].noise if n in errors else 0.0 for n, _ in nodes}
    else:  # no QDQ compute nodes to probe (dynamic or QOperator format): quantize one node at a time
        costs = {}
        trial = quantizer.folder / "trial.onnx"
        for name, _ in quantizer.progress.track(nodes, len(nodes), "ranking node sensitivity"):
            quantizer.quantize(trial, [], only=[name], model=builder.floats[current.graph])
            costs[name] = round(1.0 - builder.judge.score(trial)["cosine"], 8)
    ranked = sorted(((costs[n], order[n], n, op) for n, op in nodes), key=lambda s: (-s[0], s[1]))

    def attempt(k: int) -> tuple[_Candidate, dict[str, Any]]:
        candidate = replace(current, float_nodes=current.float_nodes + tuple(n for _, _, n, _ in ranked[:k]))
        return candidate, builder.score(candidate, "mixed precision", float_nodes=k)

    low, high = 0, len(ranked)  # k = 0 is known to fail, k = all to pass
    best, computed = everything, len(ranked)
    while high - low > 1:
        mid = (low + high) // 2
        candidate, score = attempt(mid)
        if score["meets_targets"]:
            high, best = mid, candidate
        else:
            low = mid
    if high == computed and computed > 0:  # no compute node left in int8: Q/DQ pairs around a float model
        record.notes.append(f"mixed precision: the targets hold only with every one of the {computed} compute nodes in "
                            "float, which leaves no int8 compute to make the model faster: kept the int8 model")
        return current
    weighted = _weighted_nodes(builder.floats[current.graph].path)
    if 0 < high < computed and not any(n in weighted for _, _, n, _ in ranked[high:]):
        # what is left in int8 multiplies activations only (attention scores and context): no weight gets smaller, and
        # the Q/DQ pairs around those products cost about what int8 saves on them
        record.notes.append(f"mixed precision: the targets hold only with every compute node that has weights in float "
                            f"({high} of {computed}; what is left in int8 multiplies activations only), which "
                            "leaves no weight in int8: kept the int8 model")
        return current
    if 0 < high < computed and builder.judge.targets.min_speedup is not None and not _keeps_speed(builder, current, best, high):
        return current
    record.float_nodes = []
    for cost, _, name, op in ranked[:high]:
        error = errors.get(name)
        why = (f"quantized alone, it lowers output cosine to {1 - cost:.5f}" if error is None else
               f"quantized, it lowers output cosine to {error.cosine:.5f} at its own output (local SNR {_db(error.snr_db)}; "
               "one-pass ranking)")
        record.float_nodes.append({"node": name, "op": op, "sensitivity": round(cost, 8), "why": why})
    final = builder.scores[best]
    drop = f", accuracy drop {final['accuracy_drop']:.4f}" if "accuracy_drop" in final else ""
    record.notes.append(f"mixed precision: {high} of {computed} compute nodes kept in float ({_summary(final)}{drop})")
    return best


def _weighted_nodes(path: Path) -> set[str]:
    """Names of the nodes that read a weight (_is_weight, as _float_weights counts them), or what constant nodes make
    of one (a Transpose or Reshape of it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constant = {t.name for t in model.graph.initializer} | {"", *(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)}
    weights = {t.name for t in model.graph.initializer if _is_weight(t)}
    found: set[str] = set()
    for node in model.graph.node:  # topological order: a weight's constant-only consumers make weights too
        if not any(i in weights for i in node.input):
            continue
        if all(i in constant for i in node.input):
            constant.update(node.output)
            weights.update(node.output)
        else:
            found.add(node.name)
    return found


def _speed_search(builder: _Builder, current: _Candidate, out: Path) -> None:
    """If `out` is slower than fp32 on this CPU, try cheaper configurations; keep the fastest that meets the targets.

    The choice depends on measured latency, so unlike everything else it can differ between runs."""
    quantizer, judge, record = builder.quantizer, builder.judge, builder.record
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
    source = builder.floats[current.graph]
    for label, options in variants.items():
        if "op_types" in options and not present & set(options["op_types"]):
            continue
        path = quantizer.folder / f"variant-{len(candidates)}.onnx"
        quantizer.quantize(path, list(current.float_nodes), model=source, **options)
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


def _analyse(quantizer: _Quantizer, notes: list[str]) -> bool:
    """Protect the side paths (attention mask, positions) from quantization and, for a transformer graph whose
    recipe names no op types, quantize only the compute (MatMul/Gemm/Conv). True for a transformer graph."""
    import onnx

    from deploytool.transformer import is_transformer, side_paths

    model = onnx.load(str(quantizer.source), load_external_data=False)
    sides = side_paths(model)
    protected = sides.excluded()
    quantizer.protected.update(protected)
    transformer = is_transformer(model)
    if transformer and quantizer.cfg.op_types is None:
        # int8 inputs and weights, float outputs: no second rounding of the outlier-heavy MatMul outputs (FFN, attention
        # projections), and ONNX Runtime runs each as one integer MatMul that writes float
        quantizer.op_types = list(TRANSFORMER_OPS)
        quantizer.float_outputs = ["MatMul", "Gemm"]
        notes.append(f"transformer graph: quantized the inputs of {', '.join(TRANSFORMER_OPS)} only, MatMul/Gemm outputs "
                     "kept in float (elsewhere int8 only adds Q/DQ pairs)")
    if protected:
        notes.append(f"{len(protected)} node(s) on or reading the side paths of {', '.join(sorted(sides.inputs))} "
                     "kept in float (quantization.kept_float)")
    return transformer


def _improvements(cfg: QuantizeConfig) -> bool:
    """Whether the static path measures equalization, bias correction or per-layer weights."""
    return cfg.mode == "static" and (cfg.equalize is not False or cfg.bias_correction is not False
                                     or cfg.layer_weights == "auto")


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
    """Quantize `in_path` into `out_path`.

    Every measured choice scores against the fp32 model on `evaluation` (all of it unless
    `search_samples` caps it; the calibration data when there is no evaluation data)."""
    progress = progress or Silent()
    targets = targets or Targets()
    notes: list[str] = []
    if cfg.mode == "static" and calibration is None:
        raise UserError("static quantization needs calibration data", "set [data] calibration, or quantize.mode = \"dynamic\"")
    if cfg.mode == "static" and cfg.calibration_samples is not None:
        calibration = calibration.head(cfg.calibration_samples)  # type: ignore[union-attr]
    asked = cfg.speed_search or (cfg.auto_mixed_precision and "auto_mixed_precision" in cfg.model_fields_set)
    if asked and evaluation is None and calibration is None:
        raise UserError("[quantize] auto_mixed_precision and speed_search need validation or calibration data to score on")
    _check_data(in_path, [calibration, evaluation])
    with tempfile.TemporaryDirectory(prefix="deploytool-quantize-") as tmp:
        folder = Path(tmp)
        source, optimize, preprocess = in_path, "none", "skipped"
        if cfg.optimize == "transformer":
            optimize = _optimize_transformer(source, folder / "optimized.onnx", cfg, notes)
            if optimize != "failed":
                source = folder / "optimized.onnx"
        source = _unambiguous_initializers(source, folder / "renamed.onnx")
        raw = source  # before quant_pre_process, which static quantization wants and dynamic does not
        if cfg.preprocess:
            preprocess = _preprocess(source, folder / "prepared.onnx", notes)
            if preprocess != "failed":
                source = folder / "prepared.onnx"
        quantizer = _Quantizer(source, cfg, calibration, batch_size, folder, progress)
        quantizer.raw = raw
        transformer = _analyse(quantizer, notes)
        record = QuantizeRecord(cfg.mode, quantizer.settings(), len(calibration) if cfg.mode == "static" else 0,  # type: ignore[arg-type]
                                preprocess, optimize, notes=notes)
        draft = folder / "int8.onnx"
        data = evaluation if evaluation is not None else calibration
        if data is None or not (_improvements(cfg) or cfg.auto_mixed_precision or cfg.speed_search):
            quantizer.quantize(draft, [])
        else:
            _search(quantizer, record, data, in_path, targets, threads, draft, evaluation is None, transformer)
        record.kept_float = [{"node": node, "why": why} for node, why in quantizer.protected.items()]
        if record.float_nodes:
            names = ", ".join(f'"{n["node"]}"' for n in record.float_nodes)
            record.notes.append(f"to keep the same nodes in float without searching: [quantize] exclude_nodes = [{names}]")
        if quantizer.calibration_batch is not None and quantizer.calibration_batch[1] and cfg.calibration_method in HISTOGRAM_METHODS:
            record.notes.append(f"{cfg.calibration_method} calibration: the last batch of {quantizer.calibration_batch[0]} was "
                                "filled up with the first samples (the calibrator needs batches of one size)")
        record.settings["quantizations"] = quantizer.count
        record.settings["op_types"] = quantizer.op_types
        _weight_share(in_path, draft, record)
        if quantizer.calibration_plan:
            record.settings["calibration_plan"] = quantizer.calibration_plan
        with atomic_path(out_path) as final:
            shutil.copyfile(draft, final)
    return record


def _check_data(path: Path, datasets: list[Dataset | None]) -> None:
    """A user error, before any work, for data that indexes past a table of the model (token ids out of vocabulary)."""
    import onnx

    from deploytool.data import check_indices

    model = onnx.load(str(path), load_external_data=False)
    for dataset in datasets:
        if dataset is not None:
            check_indices(model, dataset)


def _unambiguous_initializers(path: Path, out: Path) -> Path:
    """ONNX Runtime's QDQ quantizer copies a shared initializer X as X1, X2, ... taking the next numeric suffix free
    among the *initializers* only: with the dynamo exporter's names (an initializer val_11 beside a tensor val_117)
    a copy takes an existing tensor's name and the quantized graph does not load ("Duplicate definition of name").
    Initializers whose name followed by digits names another tensor are renamed first (`out`); else `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        return path  # subgraphs may read an initializer by its outer name: leave the graph alone
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    names = {*initializers, *(v.name for v in (*graph.input, *graph.output, *graph.value_info)),
             *(t for n in graph.node for t in (*n.input, *n.output) if t)}
    clashing = set()
    for name in names - initializers:  # ONNX Runtime skips suffixes other initializers have taken
        stem = name.rstrip("0123456789")
        for cut in range(len(stem), len(name)):  # every prefix that leaves at least one trailing digit
            if name[:cut] in initializers:
                clashing.add(name[:cut])
    if not clashing:
        return path
    model = onnx.load(str(path))
    graph = model.graph
    renamed = {}
    for name in sorted(clashing):
        new = f"{name}_w"
        while new in names or any(n.startswith(new) and n[len(new):].isdigit() for n in names):
            new += "_"
        renamed[name] = new
        names.add(new)
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for value in (*graph.input, *graph.output, *graph.value_info):  # e.g. an initializer that is also a graph input
        value.name = renamed.get(value.name, value.name)
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > 2**31 - 2**26)
    log.debug("renamed %d initializers whose numbered copies would clash with tensor names", len(renamed))
    return out


def _size(tensor: Any) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _is_weight(tensor: Any) -> bool:
    """A float32 initializer of at least 256 elements: a weight, not a shape or a scale."""
    return bool(tensor.data_type == 1 and _size(tensor) >= 256)


def _float_weights(model: Any) -> dict[str, int]:
    """{op type: float32 weight elements it reads} over the weights (_is_weight); a weight read by several node
    types counts for the first."""
    readers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, node.op_type)
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if _is_weight(tensor) and tensor.name in readers:
            op = readers[tensor.name]
            counts[op] = counts.get(op, 0) + _size(tensor)
    return counts


def _weight_share(fp32: Path, int8: Path, record: QuantizeRecord) -> None:
    """The share of the fp32 model's weights the int8 model holds in 8 bits (`quantization.int8_weight_share`), and a
    note when most of them stay float: int8 cannot speed up what it does not quantize (LSTM/GRU nodes, excluded
    or unsupported ops)."""
    import onnx

    before = sum(_float_weights(onnx.load(str(fp32), load_external_data=False)).values())
    remaining = _float_weights(onnx.load(str(int8), load_external_data=False))
    remaining.pop("DequantizeLinear", None)  # a float weight behind a DequantizeLinear is quantized data
    after = sum(remaining.values())
    if before == 0:
        return
    share = max(0.0, 1.0 - after / before)
    record.settings["int8_weight_share"] = round(share, 4)
    if share < 0.5:
        where = ", ".join(f"{op} {count / before:.0%}" for op, count in sorted(remaining.items(), key=lambda kv: -kv[1])[:4])
        record.notes.append(f"only {share:.0%} of the model's weights are int8; the rest stay float ({where} of them): "
                            "int8 can only speed up the part it quantizes (static int8 in ONNX Runtime covers Conv, MatMul "
                            "and Gemm, dynamic int8 also LSTM, neither GRU or RNN nodes; op_types, exclude_nodes and "
                            "mixed precision also keep nodes float)")


def _search(quantizer: _Quantizer, record: QuantizeRecord, data: Dataset, fp32: Path, targets: Targets, threads: int,
            out: Path, on_calibration: bool, transformer: bool = False) -> None:
    """The measured path: score the default, then improve it step by step, and write the chosen model to `out`."""
    cfg = quantizer.cfg
    scored = data if cfg.search_samples is None else data.head(cfg.search_samples)
    effective = targets.with_margin(len(scored), len(data))
    if len(scored) < len(data):
        record.notes.append(f"the searches scored on {len(scored)} of {len(data)} samples, with targets tightened "
                            f"accordingly ({effective.describe()})")
    if on_calibration:
        record.notes.append("no evaluation data: choices were scored on the calibration data")
    judge = _Judge(fp32, scored, effective, threads)
    record.settings["targets"] = effective.describe()
    record.settings["scored_samples"] = len(scored)
    builder = _Builder(quantizer, judge, record, threads)
    current = _Candidate()
    builder.score(current, "default")
    futile = not builder.scores[current]["meets_targets"] and _input_floor_misses(builder, current)
    recurrent = _has_lstm(builder.models[current.graph])
    if (transformer or recurrent) and cfg.mode == "static" and cfg.dynamic_candidate and cfg.op_types is None:
        current = _static_or_dynamic(builder, current)
    if transformer and cfg.mode == "static" and cfg.smooth_quant is not False and not futile:
        current = _smooth_quant(builder, current)
    if _improvements(cfg) and current.mode == "static" and not futile:
        try:
            if cfg.equalize is not False or cfg.bias_correction is not False:
                current = _improve(builder, current, transformer)
            if cfg.layer_weights == "auto" and quantizer.reduce_range and cfg.mode == "static" \
                    and not builder.scores[current]["meets_targets"]:
                current = _layer_weights(builder, current)
        except (UserError, StageError):
            raise
        except Exception as exc:  # an optional improvement never fails the stage
            log.debug("quantization improvements failed", exc_info=True)
            record.notes.append(f"equalization/bias correction/per-layer weights skipped: {first_line(exc)[:200]}")
    if cfg.auto_mixed_precision and not builder.scores[current]["meets_targets"]:
        current = _mixed_precision(builder, current)
    shutil.copyfile(builder.path(current), out)
    if cfg.speed_search:
        _speed_search(builder, current, out)
    final = builder.scores[current]
    record.settings["chosen"] = current.label()
    if not final["meets_targets"]:
        record.notes.append(f"the int8 model misses the quantization targets ({effective.describe()}): {_summary(final)}")
