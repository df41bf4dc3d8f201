"""quantize: ONNX Runtime static (calibrated) or dynamic int8 quantization, with CPU-aware defaults."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deploytool.artifacts import atomic_path
from deploytool.data import CalibrationReader, Dataset
from deploytool.errors import StageError, UserError
from deploytool.hardware import cpu_info, has_int8_dot_product
from deploytool.recipe import QuantizeConfig

log = logging.getLogger(__name__)


@dataclass
class QuantizeRecord:
    mode: str
    settings: dict[str, object]
    calibration_samples: int = 0
    preprocess: str = "skipped"
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.debug("quant_pre_process failed", exc_info=True)
    try:
        quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=True)
        notes.append(f"pre-processing without symbolic shape inference ({first[:160]})")
        return "done without symbolic shape inference"
    except Exception as exc:
        log.debug("quant_pre_process without symbolic shapes failed", exc_info=True)
        notes.append(f"pre-processing failed, quantized the model as is ({str(exc)[:160]})")
        return "failed"


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


def quantize_onnx(
    in_path: Path, out_path: Path, cfg: QuantizeConfig, calibration: Dataset | None, batch_size: int = 16
) -> QuantizeRecord:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    reduce_range, why = resolve_reduce_range(cfg)
    notes: list[str] = []
    settings: dict[str, object] = {
        "per_channel": cfg.per_channel,
        "weight_type": cfg.weight_type,
        "reduce_range": reduce_range,
        "reduce_range_reason": why,
        "op_types": cfg.op_types,
        "exclude_nodes": cfg.exclude_nodes,
        "isa": cpu_info()["isa"],
    }
    with tempfile.TemporaryDirectory(prefix="deploytool-quantize-") as folder:
        source = in_path
        preprocess = "skipped"
        if cfg.preprocess:
            prepared = Path(folder) / "prepared.onnx"
            preprocess = _preprocess(in_path, prepared, notes)
            if preprocess != "failed":
                source = prepared
        with atomic_path(out_path) as tmp:
            try:
                if cfg.mode == "dynamic":
                    quantize_dynamic(
                        str(source),
                        str(tmp),
                        per_channel=cfg.per_channel,
                        reduce_range=reduce_range,
                        weight_type=qtype[cfg.weight_type],
                        op_types_to_quantize=cfg.op_types,
                        nodes_to_exclude=cfg.exclude_nodes,
                    )
                    samples = 0
                else:
                    if calibration is None:
                        raise UserError("static quantization needs calibration data", "set [data] calibration, or quantize.mode = \"dynamic\"")
                    if cfg.calibration_samples is not None:
                        calibration = calibration.head(cfg.calibration_samples)
                    samples = len(calibration)
                    settings.update(
                        format=cfg.format,
                        activation_type=cfg.activation_type,
                        calibration_method=cfg.calibration_method,
                    )
                    method = {
                        "minmax": CalibrationMethod.MinMax,
                        "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile,
                    }[cfg.calibration_method]
                    fixed = _fixed_batch(source)
                    quantize_static(
                        str(source),
                        str(tmp),
                        CalibrationReader(calibration, fixed or batch_size, pad=fixed is not None),
                        quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                        per_channel=cfg.per_channel,
                        reduce_range=reduce_range,
                        activation_type=qtype[cfg.activation_type],
                        weight_type=qtype[cfg.weight_type],
                        op_types_to_quantize=cfg.op_types,
                        nodes_to_exclude=cfg.exclude_nodes,
                        calibrate_method=method,
                    )
            except UserError:
                raise
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StageError("quantize", f"onnxruntime {cfg.mode} quantization failed: {reason[:300]}") from exc
    return QuantizeRecord(cfg.mode, settings, samples, preprocess, notes)
