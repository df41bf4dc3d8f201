"""The input-rounding floor: the float model on inputs rounded as the int8 model rounds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


class Chaotic(nn.Module):
    """A classifier whose answer changes with the smallest change of its input (sin of a steep projection): no
    8-bit model of it can agree with it, and the reason is the model, not the quantizer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(16, 64)
        self.last = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.sin(500.0 * self.first(x)))


def _export(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.zeros(1, 16),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def _data(count: int, seed: int) -> object:
    from deploytool.data import Dataset

    return Dataset({"x": np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32)})


@pytest.mark.parametrize("zero_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("per_axis", [False, True])
def test_rounding_is_what_onnx_runtime_does(zero_dtype: type, per_axis: bool, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from deploytool.floor import input_rounding, round_inputs

    channels = 3
    scale = np.array([0.05, 0.02, 0.1], np.float32) if per_axis else np.array(0.03, np.float32)
    zero = (np.array([120, 128, 3], zero_dtype) if zero_dtype == np.uint8 else np.array([-5, 0, 7], zero_dtype)) \
        if per_axis else np.array(128 if zero_dtype == np.uint8 else -3, zero_dtype)
    axis = [helper.make_attribute("axis", 1)] if per_axis else []
    quant = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q")
    dequant = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")
    quant.attribute.extend(axis)
    dequant.attribute.extend(axis)
    graph = helper.make_graph([quant, dequant], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels, 4])],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "qdq.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(32, channels, 4)) * 4).astype(np.float32)  # some values beyond the range saturate
    x[0, :, 0] = 0.5 * (scale if per_axis else np.full(channels, scale))  # exact halves: round half to even
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    rounding = input_rounding(onnx.load(str(path)))
    assert set(rounding) == {"x"}
    np.testing.assert_array_equal(round_inputs({"x": x}, rounding)["x"], expected)


def test_float_and_dynamic_models_round_no_input(tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from deploytool.floor import input_rounding

    fp32 = _export(Chaotic(), tmp_path / "chaotic.onnx")
    quantize_dynamic(str(fp32), str(tmp_path / "dynamic.onnx"))
    assert input_rounding(onnx.load(str(fp32))) == {}
    assert input_rounding(onnx.load(str(tmp_path / "dynamic.onnx"))) == {}


def test_a_model_that_int8_rounding_breaks_by_itself_is_named_and_only_mixed_precision_searches(tmp_path: Path) -> None:
    """The quantize stage measures the floor when the default int8 misses its targets, skips the searches that
    cannot get below it, and says so; verify records the floor of a failing int8 model and explains it."""
    from deploytool.recipe import QuantizeConfig, VerifyConfig
    from deploytool.runners import OrtRunner
    from deploytool.stages.quantize import Targets, quantize_onnx
    from deploytool.stages.verify import CandidateFile, verify_and_explain

    fp32 = _export(Chaotic(), tmp_path / "chaotic.onnx")
    int8 = tmp_path / "chaotic.int8.onnx"
    calibration, evaluation = _data(64, 1), _data(64, 2)
    targets = Targets(min_cosine=0.99, min_top1_agreement=0.99)
    record = quantize_onnx(fp32, int8, QuantizeConfig(auto_mixed_precision=False), calibration, evaluation=evaluation,
                           targets=targets)
    floor = record.input_floor
    assert floor and not floor["meets_targets"] and float(floor["cosine"]) < 0.9  # type: ignore[arg-type]
    assert 30 < float(floor["input_snr_db"]) < 60  # type: ignore[arg-type]  # 8-bit rounding: ~40 dB on normal data
    assert any("already misses the quantization targets" in n and "were not tried" in n for n in record.notes)
    assert [a["search"] for a in record.attempts] == ["default", "input rounding floor"]
    # mixed precision still runs: keeping the nodes that read the input in float removes the rounding (here it
    # takes every node in float, which is no faster than fp32, so the int8 model stays)
    mixed = quantize_onnx(fp32, tmp_path / "mixed.onnx", QuantizeConfig(), calibration, evaluation=evaluation, targets=targets)
    assert not any(a["search"] in ("equalization", "bias correction") for a in mixed.attempts)
    assert any(a["search"] == "mixed precision" for a in mixed.attempts)
    assert any(n.startswith("mixed precision:") for n in mixed.notes)

    fragment = verify_and_explain(OrtRunner("reference", fp32), [CandidateFile("fp32", fp32), CandidateFile("int8", int8, base="fp32")],
                                  evaluation, "classification", VerifyConfig(runs=5, memory=False))
    assert not fragment["passed"]
    metrics = fragment["metrics"]["int8"]  # type: ignore[index]
    assert metrics["input_rounding_floor"]["against"] == "fp32"
    assert metrics["input_rounding_floor"]["cosine"] < 0.9
    assert any(n.startswith("int8: its float model alone, on inputs rounded") for n in fragment["notes"])  # type: ignore[union-attr]


def test_a_well_conditioned_model_keeps_searching(digits_run: tuple[object, Path], calib: object, val: object,
                                                  tmp_path: Path) -> None:
    """On a trained model the rounding of its input costs next to nothing: the floor meets the targets and the
    searches run as before."""
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import Targets, quantize_onnx

    _, out = digits_run
    plain = quantize_onnx(out / "model.onnx", tmp_path / "plain.onnx", QuantizeConfig(), calib, evaluation=val,  # type: ignore[arg-type]
                          targets=Targets(min_cosine=0.0))
    target = Targets(min_cosine=1 - (1 - float(plain.attempts[0]["cosine"])) / 3)  # type: ignore[arg-type]  # missed by int8
    record = quantize_onnx(out / "model.onnx", tmp_path / "int8.onnx", QuantizeConfig(), calib, evaluation=val,  # type: ignore[arg-type]
                           targets=target)
    assert record.input_floor["meets_targets"]
    assert float(record.input_floor["cosine"]) > target.min_cosine  # type: ignore[arg-type]
    assert any(a["search"] not in ("default", "input rounding floor") for a in record.attempts)


def test_an_input_that_a_float_node_also_reads_has_no_floor(tmp_path: Path) -> None:
    """Rounding an input for the float model only says what the quantized model loses when every reader of that
    input reads it rounded."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deploytool.floor import input_rounding

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Relu", ["d"], ["a"]), helper.make_node("Add", ["a", "x"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert input_rounding(model) == {}
    model.graph.node[3].input[1] = "d"  # now only the QuantizeLinear reads x
    assert set(input_rounding(onnx.load_from_string(model.SerializeToString()))) == {"x"}
    model.graph.node.append(helper.make_node("Shape", ["x"], ["shape"]))  # a dynamic batch: reads the shape only
    assert set(input_rounding(model)) == {"x"}
