"""Edge CNNs (depthwise convolutions, folded BatchNorm, ReLU6): cross-layer equalization, bias correction,
8-bit weights per layer, the label-free top-1 target, and histogram calibration with any sample count."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, TinyModel
from onnx import TensorProto, helper, numpy_helper

from deploytool.data import Dataset
from deploytool.equalize import (
    bias_correct,
    collect_statistics,
    conv_inputs,
    dequantized_weights,
    equalize,
    find_pairs,
)
from deploytool.recipe import QuantizeConfig
from deploytool.runners import OrtRunner, infer_dataset
from deploytool.stages.quantize import Targets, calibration_batching, quantize_onnx

CHANNELS = 8


def chain(activation: str, seed: int = 0, pad: bool = False) -> onnx.ModelProto:
    """conv 3x3 (3 -> 8, per-channel scales 1000x apart, as BatchNorm folding leaves them) -> activation ->
    depthwise 3x3 -> ReLU -> conv 1x1 (8 -> 4): two equalizable pairs. `pad`: the depthwise convolution's
    padding is a Pad node of its own, as TF-style "same" padding exports."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(-2, 1, CHANNELS)
    w1 = (rng.normal(size=(CHANNELS, 3, 3, 3)) * spread[:, None, None, None] / 3).astype(np.float32)
    b1 = (rng.normal(size=CHANNELS) * 0.2 * spread).astype(np.float32)
    w2 = rng.normal(size=(CHANNELS, 1, 3, 3)).astype(np.float32)
    b2 = rng.normal(size=CHANNELS).astype(np.float32) * 0.1
    w3 = rng.normal(size=(4, CHANNELS, 1, 1)).astype(np.float32)
    b3 = np.zeros(4, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"),
              (np.array(0.0, np.float32), "zero"), (np.array(6.0, np.float32), "six"),
              (np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1])]
    if activation == "Relu6":
        nodes.append(helper.make_node("Clip", ["y1", "zero", "six"], ["a1"], name="act1"))
    elif activation == "Relu":
        nodes.append(helper.make_node("Relu", ["y1"], ["a1"], name="act1"))
    else:
        nodes.append(helper.make_node("Identity", ["y1"], ["a1"], name="act1"))
    first = "a1" if activation != "identity" else "y1"
    if activation == "identity":
        nodes.pop()
    if pad:
        nodes.append(helper.make_node("Pad", [first, "pads"], ["padded"], name="pad"))
    dw = (helper.make_node("Conv", ["padded", "w2", "b2"], ["y2"], name="dw", group=CHANNELS) if pad else
          helper.make_node("Conv", [first, "w2", "b2"], ["y2"], name="dw", pads=[1, 1, 1, 1], group=CHANNELS))
    nodes += [dw,
              helper.make_node("Relu", ["y2"], ["a2"], name="act2"),
              helper.make_node("Conv", ["a2", "w3", "b3"], ["out"], name="project")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def inputs(samples: int, seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset({"x": rng.uniform(-1, 1, (samples, 3, 8, 8)).astype(np.float32)})


def run(model: onnx.ModelProto, data: Dataset, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    return infer_dataset(OrtRunner(name, path), data, 64)[0]


def channel_ranges(model: onnx.ModelProto, tensor: str, data: Dataset) -> np.ndarray:
    return collect_statistics(model, data, [tensor], [], 64, False).absmax[tensor]


@pytest.mark.parametrize(("activation", "pad"), [("Relu6", False), ("Relu", False), ("identity", False), ("Relu6", True)])
def test_equalization_keeps_the_function_and_evens_out_channel_ranges(activation: str, pad: bool, tmp_path: Path) -> None:
    model = chain(activation, pad=pad)
    pairs = find_pairs(model)
    assert [(p.names, p.bound) for p in pairs] == [
        (("conv1", "dw"), 6.0 if activation == "Relu6" else None), (("dw", "project"), None)]
    calibration, fresh = inputs(64), inputs(64, seed=2)
    tensor = pairs[0].tensor
    stats = collect_statistics(model, calibration, [p.tensor for p in pairs], [], 64, False)
    result = equalize(model, pairs, copy.deepcopy(stats), per_channel=True)
    assert result.scaled_channels > 0 and result.pairs
    for data in (calibration, fresh):  # the same function, also on data the scales were not chosen on
        want, got = run(model, data, tmp_path, "original"), run(result.model, data, tmp_path, "equalized")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    before, after = channel_ranges(model, tensor, calibration), channel_ranges(result.model, tensor, calibration)
    live = before > 0
    # the channels share one activation scale: after equalization the smallest ones use far more of it
    assert np.median(after[live]) / after.max() > 2 * np.median(before[live]) / before.max()
    assert after.max() <= before.max() * (1 + 1e-6)
    if activation == "Relu6":  # channels that reached the bound are left alone; no channel is pushed past it
        assert after.max() <= 6.0 + 1e-5


def test_data_free_equalization_evens_out_weight_ranges(tmp_path: Path) -> None:
    """Per-tensor weights: Nagel's rule balances conv1's output-channel ranges against conv2's input-channel ranges."""
    model = chain("Relu")
    pairs = find_pairs(model)
    data = inputs(64)
    result = equalize(model, pairs, collect_statistics(model, data, [p.tensor for p in pairs], [], 64, False),
                      per_channel=False)
    np.testing.assert_allclose(run(result.model, data, tmp_path, "eq"), run(model, data, tmp_path, "orig"), rtol=1e-4, atol=1e-4)

    def spread(m: onnx.ModelProto) -> float:
        w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
        ranges = np.abs(w1).max(axis=(1, 2, 3))
        return float(ranges.max() / ranges.min())

    assert spread(result.model) < spread(model) / 10


def test_bias_correction_removes_the_mean_shift_of_quantized_weights(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_static

    from deploytool.data import CalibrationReader

    model = chain("Relu")
    data = Dataset({"x": inputs(64).feeds["x"] * 0.5 + 0.5})  # inputs with a non-zero mean
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    quantize_static(str(path), str(tmp_path / "q.onnx"), CalibrationReader(data, 16), per_channel=False, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    stats = collect_statistics(model, data, [], conv_inputs(model), 64, False)
    corrected, records = bias_correct(model, quantized, stats)
    assert {r["node"] for r in records} == {"conv1", "dw", "project"}

    def conv1_output(m: onnx.ModelProto, name: str, quantized_weights: bool) -> np.ndarray:
        """conv1's output with the quantized weights and float inputs: only the weight error remains."""
        m = copy.deepcopy(m)
        if quantized_weights:
            weights = dequantized_weights(quantized)
            for node in m.graph.node:
                if node.name in weights:
                    init = next(t for t in m.graph.initializer if t.name == node.input[1])
                    init.CopyFrom(numpy_helper.from_array(weights[node.name].astype(np.float32), init.name))
        m.graph.output.append(helper.make_tensor_value_info("y1", TensorProto.FLOAT, None))
        p = tmp_path / f"{name}.onnx"
        onnx.save(m, str(p))
        return OrtRunner(name, p).infer(data.feeds)[1]

    want = conv1_output(model, "float", False)
    plain, fixed = conv1_output(model, "plain", True), conv1_output(corrected, "corrected", True)
    shift_before = np.abs((plain - want).mean(axis=(0, 2, 3)))
    shift_after = np.abs((fixed - want).mean(axis=(0, 2, 3)))
    assert shift_after.max() < 1e-4 * np.abs(want).max()
    assert shift_before.max() > 20 * max(shift_after.max(), 1e-9)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_with_a_sample_count_that_is_no_multiple_of_the_batch(
        method: str, tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    # 37 samples, batches of 16: onnxruntime's calibrator alone fails ("inhomogeneous shape")
    record = quantize_onnx(tiny.onnx, tmp_path / "q.onnx", QuantizeConfig(calibration_method=method, calibration_samples=37,
                                                                           equalize=False, bias_correction=False), calib, 16)
    assert record.calibration_samples == 37
    assert any("filled up" in n for n in record.notes)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    # 30 samples: batches of 15 divide them, nothing is filled up
    record = quantize_onnx(tiny.onnx, tmp_path / "q30.onnx", QuantizeConfig(calibration_method=method, calibration_samples=30,
                                                                             equalize=False, bias_correction=False), calib, 16)
    assert not any("filled up" in n for n in record.notes)


def test_calibration_batching() -> None:
    assert calibration_batching(256, 16, "minmax", None) == (16, False)
    assert calibration_batching(250, 16, "minmax", None) == (16, False)  # min/max reduce each batch alone
    assert calibration_batching(250, 16, "entropy", None) == (10, False)
    assert calibration_batching(37, 16, "percentile", None) == (16, True)
    assert calibration_batching(5, 16, "percentile", None) == (5, False)
    assert calibration_batching(37, 16, "minmax", 4) == (4, True)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, Dataset]:
    """The MobileNet sample exported (TorchScript, simplified), with 32 calibration samples and the 64 validation
    samples closest to a decision boundary of the fp32 model (where quantization flips answers first)."""
    from deploytool.recipe import ExportConfig, InputSpec, SimplifyConfig
    from deploytool.stages.export import export_onnx
    from deploytool.stages.load import load_model
    from deploytool.stages.simplify import simplify_onnx
    from samples.mobilenet.data import load

    folder = tmp_path_factory.mktemp("mobilenet")
    model = load_model("samples/mobilenet/model.py:build", ROOT / "samples" / "mobilenet" / "mobilenet.pt", ROOT)
    images, labels = load("calib")
    calibration = Dataset({"image": images[:32]}, labels[:32])
    specs = [InputSpec(name="image", shape=["batch", 1, 32, 32], dtype="float32")]
    export_onnx(model, specs, ["logits"], ExportConfig(exporter="torchscript"), calibration.head(4), folder / "exported.onnx")
    simplify_onnx(folder / "exported.onnx", folder / "model.onnx", SimplifyConfig(), calibration.head(4))
    images, _ = load("val")
    logits = infer_dataset(OrtRunner("fp32", folder / "model.onnx"), Dataset({"image": images}), 64)[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    closest = np.sort(np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:64])
    validation = Dataset({"image": images[closest]}, None)  # no labels: the top-1 target needs none
    return folder / "model.onnx", calibration, validation


def agreement_and_snr(fp32: Path, int8: Path, data: Dataset) -> tuple[float, float]:
    from deploytool.compare import compare_arrays

    want, got = (infer_dataset(OrtRunner(p.stem, p), data, 64)[0] for p in (fp32, int8))
    return float((want.argmax(1) == got.argmax(1)).mean()), float(compare_arrays(want, got)["snr_db"])  # type: ignore[arg-type]


def weight_ranges(path: Path) -> dict[str, tuple[str, int]]:
    """{Conv node: (weight dtype, largest |quantized value|)} of a QDQ model."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            q = inits[dq.input[0]].astype(np.int64)
            zero = inits[dq.input[2]].astype(np.int64).reshape(-1, *[1] * (q.ndim - 1)) if len(dq.input) > 2 else 0
            found[node.name] = (str(inits[dq.input[0]].dtype), int(np.abs(q - zero).max()))
    return found


def test_eight_bit_weights_on_the_layers_that_need_them(mobilenet: tuple[Path, Dataset, Dataset], tmp_path: Path) -> None:
    from deploytool.hardware import has_int8_dot_product

    if not has_int8_dot_product():
        # without VNNI, ONNX Runtime's u8 x s8 kernels saturate on 8-bit weights: they score worse than 7-bit ones
        # there, so the premise (8 bits beat 7 on the layers that need them) does not hold on this CPU
        pytest.skip("8-bit weights saturate on a CPU without int8 dot-product instructions")
    fp32, calibration, validation = mobilenet
    fixed = {"equalize": False, "bias_correction": False}
    quantize_onnx(fp32, tmp_path / "7.onnx", QuantizeConfig(reduce_range=True, layer_weights="uniform", **fixed), calibration)
    quantize_onnx(fp32, tmp_path / "8.onnx", QuantizeConfig(reduce_range=False, layer_weights="uniform", **fixed), calibration)
    seven, eight = agreement_and_snr(fp32, tmp_path / "7.onnx", validation)[1], agreement_and_snr(fp32, tmp_path / "8.onnx", validation)[1]
    assert eight > seven + 1.0
    target = Targets(min_cosine=0.0, min_snr_db=(seven + eight) / 2)  # 7-bit weights miss it, 8-bit ones meet it
    record = quantize_onnx(fp32, tmp_path / "mixed.onnx", QuantizeConfig(reduce_range=True, **fixed), calibration, 16,
                           validation, target)
    assert record.attempts[0]["search"] == "default" and not record.attempts[0]["meets_targets"]
    chosen = record.layer_weights
    if not chosen:  # timed slower than fp32 on this machine at this moment: 7-bit weights kept, as the search should
        assert any(n.startswith("8-bit weights on some layers made int8 slower") for n in record.notes), record.notes
        return
    assert all(set(c) == {"node", "weight_type", "reduce_range", "why"} and c["reduce_range"] is False for c in chosen)
    assert any(a["search"] == "layer weights speed" for a in record.attempts)
    ranges = weight_ranges(tmp_path / "mixed.onnx")
    wide = {str(c["node"]) for c in chosen}
    for node, (dtype, largest) in ranges.items():
        if node in wide:  # 8 bits: int8 up to 127, or uint8 around a zero point of 128
            assert (dtype == "int8" and largest > 64) or dtype == "uint8", (node, dtype, largest)
        else:  # 7 bits
            assert dtype == "int8" and largest <= 64, (node, dtype, largest)
    assert len(wide) < len(ranges) or record.notes[-1].startswith("the int8 model misses")
    assert agreement_and_snr(fp32, tmp_path / "mixed.onnx", validation)[1] >= target.min_snr_db  # type: ignore[operator]


def test_top1_agreement_is_a_label_free_target_on_all_the_samples(mobilenet: tuple[Path, Dataset, Dataset],
                                                                  tmp_path: Path) -> None:
    fp32, calibration, validation = mobilenet
    assert validation.labels is None
    cfg = QuantizeConfig(per_channel=False, auto_mixed_precision=True, equalize=False, bias_correction=False)
    # per-tensor weights lose some answers; the target: half of the answers they lose
    plain = quantize_onnx(fp32, tmp_path / "plain.onnx", cfg, calibration, 16, validation, Targets(min_cosine=0.0, min_snr_db=None))
    agreement = float(plain.attempts[0]["top1_agreement"])  # type: ignore[arg-type]
    assert agreement < 1.0
    goal = 1.0 - (1.0 - agreement) / 2
    target = Targets(min_cosine=0.0, min_snr_db=None, min_top1_agreement=goal)
    record = quantize_onnx(fp32, tmp_path / "q.onnx", cfg, calibration, 16, validation, target)
    default = record.attempts[0]
    assert default["search"] == "default" and default["top1_agreement"] < goal and not default["meets_targets"]
    assert record.settings["scored_samples"] == len(validation)  # every sample the verify stage would gate on
    assert record.float_nodes and all("one-pass ranking" in str(n["why"]) for n in record.float_nodes)
    assert agreement_and_snr(fp32, tmp_path / "q.onnx", validation)[0] >= goal
    # one-pass ranking and bisection: a handful of quantizations, not one per node (plus the 8-bit weights
    # attempt, made where 7-bit weights are the default: on a CPU without int8 dot-product instructions)
    nodes = sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(fp32)).graph.node)
    wider = sum(a["search"] == "layer weights" for a in record.attempts)
    assert record.settings["quantizations"] <= 2 + math.ceil(math.log2(nodes)) + wider


def test_the_edge_cnn_sample_keeps_the_answers_onnxruntime_defaults_lose(mobilenet: tuple[Path, Dataset, Dataset],
                                                                         tmp_path: Path) -> None:
    """The MobileNet sample has dead channels whose BatchNorm folds into weights ~1000x the others' range: ONNX
    Runtime's quantize_static defaults (per-tensor weights) lose most answers; the defaults here keep them, on all
    450 validation samples, with the gates' own targets."""
    from onnxruntime.quantization import quantize_static

    from deploytool.compare import compare_arrays
    from deploytool.data import CalibrationReader
    from deploytool.gates import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1_AGREEMENT
    from samples.mobilenet.data import load

    fp32, _, _ = mobilenet
    images, labels = load("calib")
    calibration = Dataset({"image": images}, labels)
    validation = Dataset({"image": load("val")[0]}, None)
    quantize_static(str(fp32), str(tmp_path / "ort.onnx"), CalibrationReader(calibration, 16))
    assert agreement_and_snr(fp32, tmp_path / "ort.onnx", validation)[0] < 0.5
    targets = Targets(min_top1_agreement=DEFAULT_MIN_TOP1_AGREEMENT)
    record = quantize_onnx(fp32, tmp_path / "q.onnx", QuantizeConfig(), calibration, 16, validation, targets)
    assert "the int8 model misses" not in " ".join(record.notes)
    agreement, snr = agreement_and_snr(fp32, tmp_path / "q.onnx", validation)
    assert agreement >= DEFAULT_MIN_TOP1_AGREEMENT and snr >= targets.min_snr_db  # type: ignore[operator]
    want, got = (infer_dataset(OrtRunner(p.stem, p), validation, 64)[0] for p in (fp32, tmp_path / "q.onnx"))
    assert compare_arrays(want, got)["cosine_mean"] >= DEFAULT_MIN_COSINE  # type: ignore[operator]  # what the gate reads


def test_scoring_on_fewer_samples_than_the_gates_tightens_the_targets() -> None:
    full = Targets(min_top1_agreement=0.99, max_accuracy_drop=0.01)
    assert full.with_margin(450, 450) == full
    subset = full.with_margin(100, 450)
    assert subset.min_top1_agreement is not None and 0.99 < subset.min_top1_agreement <= 1.0
    assert subset.max_accuracy_drop is not None and subset.max_accuracy_drop < 0.01
    assert subset.min_cosine == full.min_cosine


def test_measured_bias_correction_also_removes_the_shift_of_input_rounding(tmp_path: Path) -> None:
    """Shifts measured by the one-pass probe (weights and input rounding together) leave the quantized convolutions
    with a smaller mean error at their outputs than the analytic, weights-only correction."""
    from onnxruntime.quantization import QuantType, quantize_static

    from deploytool.data import CalibrationReader
    from deploytool.sensitivity import local_errors

    model = chain("Relu6")
    data = Dataset({"x": inputs(64).feeds["x"] * 0.5 + 0.5})

    def quantized(m: onnx.ModelProto, name: str) -> onnx.ModelProto:
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        quantize_static(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.q.onnx"), CalibrationReader(data, 16),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(str(tmp_path / f"{name}.q.onnx"))

    def mean_shift(m: onnx.ModelProto, q: onnx.ModelProto) -> float:
        errors = local_errors(m, q, data, 64, False, op_types=("Conv",))
        return max(float(np.abs(e.shift).max() / np.sqrt(e.signal / e.positions / len(e.shift))) for e in errors.values())  # type: ignore[arg-type]

    q = quantized(model, "plain")
    shifts = {name: e.shift for name, e in local_errors(model, q, data, 64, False, op_types=("Conv",)).items()}
    measured, records = bias_correct(model, q, None, shifts=shifts)  # type: ignore[arg-type]
    assert {r["node"] for r in records} == {"conv1", "dw", "project"}
    analytic, _ = bias_correct(model, q, collect_statistics(model, data, [], conv_inputs(model), 64, False))
    # each quantized convolution (its inputs fake-quantized, its weights and corrected bias as quantized) against the
    # original float one
    before, after_measured = mean_shift(model, q), mean_shift(model, quantized(measured, "measured"))
    after_analytic = mean_shift(model, quantized(analytic, "analytic"))
    assert after_measured < before / 3 and after_measured <= after_analytic


def test_local_errors_without_the_weights_twin_rank_the_nodes_the_same(tmp_path: Path) -> None:
    """Mixed precision ranks by the whole local error only: leaving out each node's weights-only twin changes
    neither the errors nor their order, and leaves the weights' own error unmeasured."""
    from onnxruntime.quantization import QuantType, quantize_static

    from deploytool.data import CalibrationReader
    from deploytool.sensitivity import local_errors

    model = chain("Relu6")
    data = Dataset({"x": inputs(64).feeds["x"] * 0.5 + 0.5})
    onnx.save(model, str(tmp_path / "f.onnx"))
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), CalibrationReader(data, 16), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    both, whole_only = local_errors(model, q, data, 64, False), local_errors(model, q, data, 64, False, weights=False)
    assert set(both) == set(whole_only) == {"conv1", "dw", "project"}
    for name, error in both.items():
        assert whole_only[name].noise == pytest.approx(error.noise, rel=1e-6) and whole_only[name].weights == 0.0
        assert error.weights > 0.0
    assert sorted(both, key=lambda n: both[n].noise) == sorted(whole_only, key=lambda n: whole_only[n].noise)


def test_a_nodes_local_error_does_not_depend_on_which_other_nodes_are_quantized(tmp_path: Path) -> None:
    """Bias correction reuses each node's measured shift across candidates that keep other nodes in float: that holds
    because the twins compute from float inputs with the node's own scales. `nodes` measures only those asked for."""
    from onnxruntime.quantization import QuantType, quantize_static

    from deploytool.data import CalibrationReader
    from deploytool.sensitivity import local_errors

    model = chain("Relu6")
    data = Dataset({"x": inputs(64).feeds["x"] * 0.5 + 0.5})
    onnx.save(model, str(tmp_path / "f.onnx"))

    def quantized(name: str, exclude: list[str]) -> onnx.ModelProto:
        quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / f"{name}.onnx"), CalibrationReader(data, 16),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude)
        return onnx.load(str(tmp_path / f"{name}.onnx"))

    every, partly = quantized("every", []), quantized("partly", ["dw"])
    full = local_errors(model, every, data, 64, False, op_types=("Conv",), weights=False)
    part = local_errors(model, partly, data, 64, False, op_types=("Conv",), weights=False)
    assert set(full) == set(part) == {"conv1", "dw", "project"}  # dw in float still reads a rounded input here
    for name in ("conv1", "project"):
        error = part[name]
        assert error.noise == pytest.approx(full[name].noise, rel=1e-5)
        np.testing.assert_allclose(error.shift, full[name].shift, rtol=1e-5, atol=1e-7)  # type: ignore[arg-type]
    assert set(local_errors(model, every, data, 64, False, op_types=("Conv",), nodes={"project"})) == {"project"}
    assert local_errors(model, partly, data, 64, False, op_types=("Conv",), nodes={"absent"}) == {}
