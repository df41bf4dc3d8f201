"""Quantization that keeps accuracy: automatic mixed precision, speed awareness, calibration sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIGITS, ROOT, invoke


def test_mixed_precision_keeps_the_fewest_sensitive_nodes_in_float(digits_run: tuple[Any, Path], calib: Any, val: Any,
                                                                  tmp_path: Path) -> None:
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import Targets, quantize_onnx

    _, out = digits_run
    fp32 = out / "model.onnx"
    # the steps before mixed precision (equalization, bias correction, per-layer weights) off: this is about the search
    fixed = {"equalize": False, "bias_correction": False, "layer_weights": "uniform"}
    cfg = QuantizeConfig(auto_mixed_precision=True, **fixed)
    plain = quantize_onnx(fp32, tmp_path / "plain.onnx", QuantizeConfig(**fixed), calib, evaluation=val,
                          targets=Targets(min_cosine=0.0))
    assert plain.float_nodes == []
    # a target the fully quantized model misses: a third of its distance to cosine 1
    target = Targets(min_cosine=1 - (1 - float(plain.attempts[0]["cosine"])) / 3)  # type: ignore[arg-type]
    records = [quantize_onnx(fp32, tmp_path / f"amp{i}.onnx", cfg, calib, evaluation=val, targets=target) for i in range(2)]
    first = records[0]
    assert first.attempts[0]["search"] == "default" and not first.attempts[0]["meets_targets"]
    assert 0 < len(first.float_nodes) < 6
    assert all("lowers output cosine" in str(n["why"]) for n in first.float_nodes)
    sensitivities = [float(n["sensitivity"]) for n in first.float_nodes]  # type: ignore[arg-type]
    assert sensitivities == sorted(sensitivities, reverse=True)
    # the chosen model meets the target, and one fewer float node would not
    chosen = [a for a in first.attempts if a.get("float_nodes") == len(first.float_nodes)]
    assert chosen and chosen[-1]["meets_targets"] and chosen[-1]["cosine"] >= target.min_cosine
    assert not any(a["meets_targets"] for a in first.attempts if a.get("float_nodes") == len(first.float_nodes) - 1)
    # bisection, not one quantization per node count
    assert first.settings["quantizations"] <= 1 + 6 + 1 + 4 + 1
    # deterministic: same nodes, same bytes
    assert records[1].float_nodes == first.float_nodes
    assert (tmp_path / "amp0.onnx").read_bytes() == (tmp_path / "amp1.onnx").read_bytes()
    import onnx

    kept = {str(n["node"]) for n in first.float_nodes}
    model = onnx.load(str(tmp_path / "amp0.onnx"))
    for node in model.graph.node:
        if node.name in kept:  # a node kept in float reads no dequantized weight
            assert not any(i.endswith("_DequantizeLinear_Output") and "weight" in i for i in node.input), node


def test_recipe_mixed_precision_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", ROOT / "recipes" / "digits-cnn.toml", "--out", out, "--set", "quantize.auto_mixed_precision=true",
                    "--set", "quantize.min_cosine=0.99998", "--set", "verify.runs=3", "--set", "verify.memory=false",
                    "--set", "quantize.equalize=false", "--set", "quantize.bias_correction=false",
                    "--set", "verify.default_gates=false")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["float_nodes"]
    assert any("compute nodes kept in float" in n for n in report["notes"])


def test_speed_gate_against_fp32_fails_whenever_int8_is_slower(tmp_path: Path) -> None:
    """The int8 model is never called a success while slower than fp32: the gate's verdict follows the timings."""
    out = tmp_path / "run"
    result = invoke("run", ROOT / "recipes" / "digits-cnn.toml", "--out", out, "--set", "verify.gates.min_speedup_vs_fp32=1.0",
                    "--set", "verify.runs=30", "--set", "verify.memory=false")
    report = json.loads((out / "report.json").read_text())
    gate = next(g for g in report["gates"] if g["name"] == "min_speedup_vs_fp32")
    ratio, interval = report["metrics"]["int8"]["speedup_vs_fp32"], report["metrics"]["int8"]["speedup_vs_fp32_ci"]
    assert gate["value"] == ratio and gate["interval"] == interval
    assert gate["passed"] == (interval[0] >= 1.0)  # passes only when the whole interval clears the threshold
    assert result.exit_code == (0 if all(g["passed"] for g in report["gates"]) else 1)
    if not gate["passed"]:
        assert "min_speedup_vs_fp32 on int8" in result.output
    if interval[1] < 1.0:
        assert any("slower than the fp32" in n for n in report["notes"])


def test_speed_search_records_its_timings(digits_run: tuple[Any, Path], calib: Any, val: Any, tmp_path: Path) -> None:
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import quantize_onnx

    _, out = digits_run
    record = quantize_onnx(out / "model.onnx", tmp_path / "q.onnx", QuantizeConfig(speed_search=True), calib, evaluation=val)
    speed = [a for a in record.attempts if a["search"] == "speed"]
    assert speed[0]["variant"] == "chosen" and speed[0]["p50_ms"] > 0 and speed[0]["fp32_p50_ms"] > 0
    if speed[0]["p50_ms"] > speed[0]["fp32_p50_ms"]:  # slower: the cheaper variants were tried and timed
        assert {a["variant"] for a in speed} >= {"chosen", "uint8 weights"}


def test_a_variant_quantizing_other_op_types_is_calibrated_for_them(digits_run: tuple[Any, Path], calib: Any,
                                                                     tmp_path: Path) -> None:
    """The speed search's 'Conv only' variant of a model calibrated for MatMul/Gemm only (a transformer's default): ONNX
    Runtime calibrates only the op types it quantizes, so the variant needs ranges of its own (it failed for want of
    the input's range)."""
    import onnx

    from deploytool.progress import Silent
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import _Quantizer

    _, out = digits_run
    quantizer = _Quantizer(out / "model.onnx", QuantizeConfig(op_types=["Gemm"]), calib, 16, tmp_path, Silent())
    quantizer.quantize(tmp_path / "gemm.onnx", [])
    quantizer.quantize(tmp_path / "conv.onnx", [], op_types=["Conv"])
    quantized = {n.input[0] for n in onnx.load(str(tmp_path / "conv.onnx")).graph.node if n.op_type == "Conv"}
    assert all(name.endswith("DequantizeLinear_Output") or "_DequantizeLinear" in name for name in quantized), quantized
    assert len(list(tmp_path.glob("calibration*.json"))) == 2  # the first family's cache is kept for its own variants


def test_calibration_from_an_image_folder_and_a_callable(tmp_path: Path, tiny: Any) -> None:
    from PIL import Image

    images = tmp_path / "images"
    data = np.load(DIGITS / "calib.npz")
    for i in range(40):
        folder = images / str(int(data["labels"][i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data["image"][i, 0] * 255).astype(np.uint8)).resize((16, 16)).save(folder / f"{i}.png")
    feeds = tmp_path / "feeds.py"
    feeds.write_text(
        "import numpy as np\n"
        f"def batches():\n    data = np.load({str(DIGITS / 'calib.npz')!r})\n"
        "    for start in range(0, 64, 16):\n        yield {'image': data['image'][start:start + 16]}\n"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
name = "sources"
[model]
factory = "{tiny.factory}"
checkpoint = "{tiny.checkpoint}"
inputs = [{{ name = "image", shape = ["batch", 1, 8, 8] }}]
outputs = ["logits"]
[data]
calibration = "{images}"
validation = "feeds.py:batches"
task = "classification"
[data.image]
resize = [8, 8]
color = "gray"
[export]
exporter = "torchscript"
[quantize]
mode = "static"
[verify]
runs = 2
memory = false
default_gates = false  # a tiny model: its int8 need not be faster, this test is about the data
''')
    result = invoke("run", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["quantization"]["calibration_samples"] == 40
    assert report["metrics"]["int8"]["cosine_mean"] > 0.99


def test_image_folder_errors_name_the_problem(tmp_path: Path, specs: Any) -> None:
    from PIL import Image

    from deploytool.data import load_dataset
    from deploytool.errors import UserError
    from deploytool.recipe import ImageConfig

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (9, 8)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="different sizes"):
        load_dataset(tmp_path, specs, image=ImageConfig(color="gray"))
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*c.png"):
        load_dataset(tmp_path, specs, image=ImageConfig(color="gray", resize=[8, 8]))


def test_strided_calibration_reader_covers_every_sample_once(calib: Any) -> None:
    from deploytool.data import CalibrationReader

    reader = CalibrationReader(calib, 10)  # 256 samples: 26 batches, the last one short
    assert len(reader) == 26 and reader.stride(8) == 2  # the largest divisor of 26 not above 8
    seen = []
    for start in range(0, len(reader), reader.stride(8)):
        reader.set_range(start, start + reader.stride(8))
        while (batch := reader.get_next()) is not None:
            seen.append(batch["image"])
    assert np.array_equal(np.concatenate(seen), calib.feeds["image"])


def test_transformer_optimization_before_quantizing(tiny: Any, calib: Any, tmp_path: Path) -> None:
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import quantize_onnx

    record = quantize_onnx(tiny.onnx, tmp_path / "q.onnx", QuantizeConfig(optimize="transformer"), calib)
    assert record.optimize.startswith("transformer")
    assert (tmp_path / "q.onnx").is_file()


@pytest.mark.parametrize(("int8", "mixed", "kept"), [
    ((1.6, 1.5, 1.7), (1.0, 0.95, 1.05), False),  # mixed precision throws away the speedup the int8 model has
    ((1.6, 1.5, 1.7), (1.06, 1.02, 1.2), False),  # above the gate, but by less than the noise (0.04)
    ((1.6, 1.5, 1.7), (1.3, 1.2, 1.4), True),  # it keeps clear of the speed gate
    ((1.0, 0.9, 1.1), (0.9, 0.8, 1.0), True),  # int8 is no faster either: nothing to lose
    ((1.05, 1.02, 1.1), (0.9, 0.8, 1.0), True),  # int8 clears the gate by less than the noise: not worth the targets
])
def test_mixed_precision_is_not_kept_when_it_loses_the_speed_gate_the_int8_model_clears(
        int8: tuple[float, float, float], mixed: tuple[float, float, float], kept: bool) -> None:
    """The decision rule on measured speedups (the measurement itself is the shared latency method's, tested in
    test_latency.py): a mixed-precision model that meets the targets only by keeping so much in float that it no
    longer clears the speed gate is dropped for the int8 model when that one clears it."""
    from types import SimpleNamespace

    from deploytool.latency import Ratio
    from deploytool.stages.quantize import QuantizeRecord, Targets, _keeps_speed

    ratios = {"int8": Ratio(*int8), "mixed": Ratio(*mixed)}
    timing = SimpleNamespace(speedup=lambda baseline, name: ratios[name], noise=0.04)
    judge = SimpleNamespace(targets=Targets(min_speedup=1.0), fp32=Path("fp32.onnx"), measure=lambda paths, runs, control, decided: timing)
    record = QuantizeRecord("static", {})
    current, candidate = object(), object()
    builder = SimpleNamespace(judge=judge, record=record, path=lambda c: Path(f"{id(c)}.onnx"),
                              scores={current: {"cosine": 0.9995, "snr_db": 30.0, "top1_agreement": 0.95}})
    assert _keeps_speed(builder, current, candidate, 36) is kept  # type: ignore[arg-type]
    assert record.attempts[-1]["search"] == "mixed precision speed" and record.attempts[-1]["float_nodes"] == 36
    assert any("kept the int8 model" in n for n in record.notes) is not kept


def test_a_search_timing_stops_once_its_choice_is_settled(digits_run: tuple[Any, Path], val: Any) -> None:
    """The searches' timings stop once more rounds cannot change what they decide, never later than their plan."""
    from deploytool.latency import TimingPlan
    from deploytool.stages.quantize import EARLY_ROUNDS, Targets, _Judge, _settled

    _, out = digits_run
    judge = _Judge(out / "model.onnx", val.head(8), Targets(), 1)
    paths = {"fp32": out / "model.onnx", "int8": out / "model.int8.onnx"}
    planned = TimingPlan.for_calls(150).rounds
    assert planned > EARLY_ROUNDS
    settled = judge.measure(paths, runs=150, decided=lambda m: True)
    assert settled.rounds == EARLY_ROUNDS
    unsettled = judge.measure(paths, runs=150, decided=lambda m: False)
    assert unsettled.rounds == planned == judge.measure(paths, runs=150).rounds
    assert _settled(True, None) and _settled(False, True) and _settled(False, False)
    assert not _settled(None, True) and not _settled(False, None)


def test_weighted_nodes_tell_weight_products_from_activation_products(tmp_path: Path) -> None:
    """Mixed precision keeps the int8 model when what it would leave in int8 reads no weight (attention's
    activation x activation products): _weighted_nodes tells those apart, weights passed through a Transpose too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deploytool.stages.quantize import _weighted_nodes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 32])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)
    weights = [numpy_helper.from_array(np.ones((32, 32), np.float32), "wq"),
               numpy_helper.from_array(np.ones((32, 32), np.float32), "wk"),
               numpy_helper.from_array(np.ones((4, 4), np.float32), "small")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
             helper.make_node("Transpose", ["wk"], ["wk_t"], name="wk_transposed", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wk_t"], ["k"], name="key"),
             helper.make_node("Transpose", ["k"], ["k_t"], name="k_transposed", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "k_t"], ["attention"], name="scores_product"),
             helper.make_node("MatMul", ["attention", "small"], ["scores"], name="tiny")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "attention", [x], [y], weights)), str(tmp_path / "a.onnx"))
    assert _weighted_nodes(tmp_path / "a.onnx") == {"query", "key"}
