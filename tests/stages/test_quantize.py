"""quantize: ONNX Runtime static (QDQ, calibrated) and dynamic int8, with reduce_range chosen and explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TinyModel
from onnx import numpy_helper

from deploytool.compare import compare_arrays
from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.hardware import has_int8_dot_product
from deploytool.recipe import QuantizeConfig
from deploytool.runners import OrtRunner
from deploytool.stages.inspect import inspect_onnx
from deploytool.stages.quantize import quantize_onnx, resolve_reduce_range


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def weight_scales(path: Path) -> dict[str, np.ndarray]:
    """Scale initializers of the DequantizeLinear nodes that dequantize int8 conv weights, by weight name."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scales = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim == 4:
            assert inits[node.input[0]].dtype == np.int8
            scales[node.input[0]] = inits[node.input[1]]
    return scales


def cosine_to_fp32(fp32: Path, int8: Path, data: Dataset) -> float:
    feeds = {"image": data.feeds["image"]}
    (want,), (got,) = OrtRunner("fp32", fp32).infer(feeds), OrtRunner("int8", int8).infer(feeds)
    return float(compare_arrays(want, got)["cosine_mean"])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def static_int8(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModel, calib: Dataset) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("quantize") / "tiny.int8.onnx"
    record = quantize_onnx(tiny.onnx, out, QuantizeConfig(mode="static", per_channel=True), calib, batch_size=16)
    return out, record


def test_static_qdq_per_channel(static_int8: tuple[Path, object], tiny: TinyModel, val: Dataset) -> None:
    out, record = static_int8
    found = ops(out)
    assert found.count("QuantizeLinear") >= 2 and "DequantizeLinear" in found
    assert "Conv" in found  # QDQ format: float ops wrapped in (De)QuantizeLinear pairs
    scales = weight_scales(out)
    assert len(scales) == 2  # both convolutions have int8 weights...
    assert sorted(s.shape for s in scales.values()) == [(8,), (8,)]  # ...with one scale per output channel
    assert inspect_onnx(out)["quantized"] is True
    assert cosine_to_fp32(tiny.onnx, out, val.head(128)) > 0.98
    onnx.checker.check_model(onnx.load(str(out)))


def test_static_record(static_int8: tuple[Path, object]) -> None:
    _, record = static_int8
    assert record.mode == "static"  # type: ignore[attr-defined]
    assert record.calibration_samples == 256  # type: ignore[attr-defined]
    assert record.preprocess.startswith("done")  # type: ignore[attr-defined]
    settings = record.settings  # type: ignore[attr-defined]
    assert settings["per_channel"] is True and settings["format"] == "qdq"
    assert settings["calibration_method"] == "minmax" and settings["activation_type"] == "uint8"
    assert settings["reduce_range"] is (not has_int8_dot_product())
    reason = settings["reduce_range_reason"]
    assert isinstance(reason, str) and reason.startswith("auto:")
    assert isinstance(settings["isa"], list)


def test_per_tensor_has_one_weight_scale(tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    out = tmp_path / "per_tensor.onnx"
    quantize_onnx(tiny.onnx, out, QuantizeConfig(per_channel=False, calibration_samples=32), calib, 16)
    assert all(s.size == 1 for s in weight_scales(out).values()) and weight_scales(out)


@pytest.mark.parametrize(("setting", "expected"), [(True, True), (False, False)])
def test_reduce_range_set_in_the_recipe(setting: bool, expected: bool) -> None:
    assert resolve_reduce_range(QuantizeConfig(reduce_range=setting)) == (expected, "set in the recipe")


def test_reduce_range_auto_follows_the_cpu() -> None:
    on, reason = resolve_reduce_range(QuantizeConfig())
    assert on is (not has_int8_dot_product())
    assert reason.startswith("auto:") and ("dot-product" in reason)


def test_calibration_samples_limit(tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    out = tmp_path / "limited.onnx"
    record = quantize_onnx(tiny.onnx, out, QuantizeConfig(calibration_samples=40, reduce_range=False), calib, 16)
    assert record.calibration_samples == 40
    assert record.settings["reduce_range"] is False and record.settings["reduce_range_reason"] == "set in the recipe"


def test_fixed_batch_model_is_calibrated_at_its_batch_size(tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    import torch
    from conftest import image_specs

    from deploytool.recipe import ExportConfig
    from deploytool.stages.export import export_onnx
    from deploytool.stages.load import load_model

    fixed = tmp_path / "batch4.onnx"
    model = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    with torch.no_grad():
        export_onnx(model, image_specs(batch=4), ["logits"], ExportConfig(exporter="torchscript", dynamic_batch=False),
                    calib.head(4), fixed)
    out = tmp_path / "batch4.int8.onnx"
    # 30 samples: the last batch of 4 is short and must be filled up; batch_size=1 is what callers pass for fixed batches
    record = quantize_onnx(fixed, out, QuantizeConfig(calibration_samples=30), calib, batch_size=1)
    assert record.calibration_samples == 30 and "QuantizeLinear" in ops(out)


def test_dynamic_mode(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    out = tmp_path / "dynamic.onnx"
    record = quantize_onnx(tiny.onnx, out, QuantizeConfig(mode="dynamic"), None)
    assert record.mode == "dynamic" and record.calibration_samples == 0
    found = ops(out)
    assert "QuantizeLinear" not in found
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} & set(found)
    assert inspect_onnx(out)["quantized"] is True
    assert "reduce_range_reason" in record.settings
    assert cosine_to_fp32(tiny.onnx, out, val.head(64)) > 0.98


def test_static_without_calibration_is_a_user_error(tmp_path: Path, tiny: TinyModel) -> None:
    out = tmp_path / "never.onnx"
    with pytest.raises(UserError) as info:
        quantize_onnx(tiny.onnx, out, QuantizeConfig(mode="static"), None)
    assert "calibration data" in info.value.message and info.value.hint is not None
    assert not out.exists()


def test_without_preprocessing(tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    out = tmp_path / "raw.onnx"
    record = quantize_onnx(tiny.onnx, out, QuantizeConfig(preprocess=False, calibration_samples=32), calib, 16)
    assert record.preprocess == "skipped" and "QuantizeLinear" in ops(out)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_a_convolution_kept_in_float_reads_its_input_through_the_activation(tmp_path: Path, activation: str) -> None:
    """ONNX Runtime folds a Relu/Clip into the QuantizeLinear after it; a convolution kept in float reads the float
    tensor, so the activation must be put back on that path (without it, the negatives went through unclamped)."""
    import torch

    from deploytool.progress import Silent
    from deploytool.stages.quantize import _Quantizer

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.act = torch.nn.ReLU() if activation == "relu" else torch.nn.ReLU6()
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.act(self.conv1(x))) + x.mean(dim=1, keepdim=True)

    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(Block().eval(), (torch.randn(1, 3, 12, 12),), str(fp32), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    rng = np.random.default_rng(0)
    data = Dataset({"x": (rng.standard_normal((32, 3, 12, 12)) * 3).astype(np.float32)})
    second = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv" and n.input[0] != "x")
    quantizer = _Quantizer(fp32, QuantizeConfig(preprocess=False), data, 16, tmp_path, Silent())
    quantizer.quantize(tmp_path / "all.onnx", [])
    quantizer.quantize(tmp_path / "float_conv2.onnx", [second])

    def cosine(path: Path) -> float:
        (want,), (got,) = OrtRunner("fp32", fp32).infer(data.feeds), OrtRunner("int8", path).infer(data.feeds)
        return float(compare_arrays(want, got)["cosine_mean"])  # type: ignore[arg-type]

    everything, kept = cosine(tmp_path / "all.onnx"), cosine(tmp_path / "float_conv2.onnx")
    assert kept >= everything - 1e-3 and kept > 0.999, (everything, kept)
    restored = [n for n in onnx.load(str(tmp_path / "float_conv2.onnx")).graph.node if n.name.endswith("_float_copy")]
    assert [n.op_type for n in restored] == ["Relu" if activation == "relu" else "Clip"]
