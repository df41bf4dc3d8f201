"""verify: candidates against a reference on real data, timed, with gates that fail loudly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TinyModel, damage, image_specs
from onnx import TensorProto, helper, numpy_helper

from deploytool.data import Dataset
from deploytool.recipe import ExportConfig, GatesConfig, VerifyConfig
from deploytool.runners import OrtRunner, TorchRunner
from deploytool.stages.export import export_onnx
from deploytool.stages.load import load_model
from deploytool.stages.report import json_safe
from deploytool.stages.verify import verify_models


def config(**gates: float) -> VerifyConfig:
    return VerifyConfig(threads=1, warmup=1, runs=5, gates=GatesConfig(**gates))


def linear_model(path: Path, classes: int, bias: float = 0.0) -> Path:
    """image (batch, 1, 8, 8) -> flatten -> matmul to `classes` logits (+ bias, which may be NaN)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, classes)).astype(np.float32), "w")
    shift = numpy_helper.from_array(np.full((classes,), bias, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[weight, shift],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_identical_candidate(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny.onnx, copy)
    reference, candidate = OrtRunner("reference", tiny.onnx), OrtRunner("copy", copy)
    result = verify_models(reference, [candidate], val.head(100), "generic", config(min_cosine=0.99))
    metrics = result.metrics["copy"]
    assert metrics["outputs_valid"] is True
    assert metrics["cosine_mean"] == pytest.approx(1.0) and metrics["cosine_min"] == pytest.approx(1.0)
    assert metrics["max_abs_error"] == 0.0 and metrics["snr_db"] == math.inf
    assert json_safe(metrics)["snr_db"] is None
    assert set(metrics["latency_ms"]) >= {"p50", "p90", "p99"}  # type: ignore[arg-type]
    assert metrics["speedup"] > 0 and result.metrics["reference"]["speedup"] == 1.0  # type: ignore[operator]
    assert "top1_agreement" not in metrics  # generic task: no classification metrics
    assert [(g.name, g.passed, g.default) for g in result.gates] == [
        ("outputs_valid", True, False), ("min_cosine", True, False), ("within_tolerance", True, True)]
    assert result.passed and result.failed == []


def test_torch_reference_with_labels_and_accuracy_gates(tiny: TinyModel, val: Dataset) -> None:
    model = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    reference = TorchRunner("reference", model, ["image"], ["logits"])
    candidate = OrtRunner("fp32", tiny.onnx)
    cfg = config(max_accuracy_drop=0.01, min_top1_agreement=0.99, min_cosine=0.999)
    result = verify_models(reference, [candidate], val, "classification", cfg, sizes={"reference": 100, "fp32": 80})
    ref, fp32 = result.metrics["reference"], result.metrics["fp32"]
    assert 0.0 <= ref["accuracy"] <= 1.0  # type: ignore[operator]
    assert fp32["accuracy"] == pytest.approx(ref["accuracy"], abs=0.01)
    assert fp32["top1_agreement"] >= 0.99 and fp32["size_ratio"] == 0.8  # type: ignore[operator]
    gates = {g.name: g for g in result.gates}
    assert set(gates) == {"outputs_valid", "max_accuracy_drop", "min_top1_agreement", "min_cosine", "within_tolerance"}
    assert all(g.passed and g.model == "fp32" for g in gates.values())
    assert set(gates["min_cosine"].as_dict()) == {"name", "model", "value", "threshold", "passed", "default"}
    assert gates["within_tolerance"].default and not gates["min_cosine"].default


def test_damaged_candidate_fails_min_cosine(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    damaged = tmp_path / "damaged.onnx"
    damage(tiny.onnx, damaged)
    result = verify_models(OrtRunner("reference", tiny.onnx), [OrtRunner("damaged", damaged)], val.head(200), "generic",
                           config(min_cosine=0.99))
    assert not result.passed
    failed = next(g for g in result.failed if g.name == "min_cosine")
    assert {g.name for g in result.failed} == {"min_cosine", "within_tolerance"}  # the second a default gate
    assert failed.model == "damaged"
    assert failed.value is not None and failed.value < 0.99 and failed.threshold == 0.99


def test_shape_mismatch_fails_outputs_valid(tmp_path: Path, val: Dataset) -> None:
    reference = OrtRunner("reference", linear_model(tmp_path / "ten.onnx", 10))
    candidate = OrtRunner("five", linear_model(tmp_path / "five.onnx", 5))
    result = verify_models(reference, [candidate], val.head(20), "classification", config(min_cosine=0.5))
    metrics = result.metrics["five"]
    assert metrics["outputs_valid"] is False
    assert metrics["outputs"]["logits"]["candidate_shape"] == [20, 5]  # type: ignore[index]
    gates = {g.name: g for g in result.gates}
    assert not gates["outputs_valid"].passed
    assert not gates["min_cosine"].passed and gates["min_cosine"].value is None  # no number can pass a gate


def test_nan_in_the_candidate_fails(tmp_path: Path, val: Dataset) -> None:
    reference = OrtRunner("reference", linear_model(tmp_path / "ok.onnx", 10))
    candidate = OrtRunner("nan", linear_model(tmp_path / "nan.onnx", 10, bias=float("nan")))
    result = verify_models(reference, [candidate], val.head(20), "generic", config())
    assert result.metrics["nan"]["outputs_valid"] is False
    assert result.metrics["nan"]["outputs"]["logits"]["nonfinite"] == 200  # type: ignore[index]
    assert [g.name for g in result.failed] == ["outputs_valid", "within_tolerance"]


def test_speed_and_size_gates(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(tiny.onnx, copy)
    result = verify_models(OrtRunner("reference", tiny.onnx), [OrtRunner("copy", copy)], val.head(10), "generic",
                           config(min_speedup=1000.0, max_size_ratio=0.5), sizes={"reference": 1000, "copy": 900})
    failed = {g.name: g for g in result.failed}
    assert set(failed) == {"min_speedup", "max_size_ratio"}
    assert failed["max_size_ratio"].value == 0.9


def test_accuracy_gate_without_labels_fails_instead_of_passing(tiny: TinyModel, val: Dataset) -> None:
    unlabelled = Dataset(val.head(30).feeds)
    result = verify_models(OrtRunner("reference", tiny.onnx), [OrtRunner("fp32", tiny.onnx)], unlabelled,
                           "classification", config(max_accuracy_drop=0.01))
    gate = next(g for g in result.gates if g.name == "max_accuracy_drop")
    assert gate.value is None and not gate.passed


def test_fixed_batch_candidate_with_a_short_last_batch(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    model = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    fixed = tmp_path / "batch4.onnx"
    with torch.no_grad():
        export_onnx(model, image_specs(batch=4), ["logits"], ExportConfig(exporter="torchscript", dynamic_batch=False),
                    val.head(4), fixed)
    reference = TorchRunner("reference", model, ["image"], ["logits"])
    result = verify_models(reference, [OrtRunner("fixed", fixed)], val.head(10), "classification",
                           config(min_cosine=0.999))
    metrics = result.metrics["fixed"]
    assert metrics["outputs"]["logits"]["candidate_shape"] == [10, 10]  # type: ignore[index]
    assert result.passed
    assert "latency_ms" not in metrics and any("fixed" in note for note in result.notes)  # batch 4 is not timed at 1


def test_labels_that_do_not_match_the_outputs_are_a_user_error(tmp_path: Path) -> None:
    from conftest import DIGITS, invoke

    data = np.load(DIGITS / "val.npz")
    bad = tmp_path / "bad_labels.npz"
    np.savez(bad, image=data["image"], labels=data["labels"] + 10)  # class indices past the 10 logits
    recipe = tmp_path / "r.toml"
    from conftest import digits_recipe_text

    recipe.write_text(digits_recipe_text().replace(f'validation = "{DIGITS}/val.npz"', f'validation = "{bad}"'))
    out = tmp_path / "run"
    result = invoke("run", recipe, "--out", out, "--set", "verify.runs=2", "--set", "verify.memory=false")
    assert result.exit_code == 2, result.output
    assert "labels do not match the model's output" in result.output and "bad_labels.npz" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # a user error leaves no half-made run folder behind


def test_unwritable_output_folder_is_a_user_error(tmp_path: Path) -> None:
    from conftest import DIGITS_RECIPE, invoke

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("run", DIGITS_RECIPE, "--out", blocker / "run")
    assert result.exit_code == 2 and "cannot write to run folder" in result.output and "Traceback" not in result.output
    result = invoke("run", DIGITS_RECIPE, "--out", "/proc/deploytool-run")
    assert result.exit_code == 2 and "/proc/deploytool-run" in result.output


def test_scaled_outputs_pass_cosine_but_fail_the_default_scale_sensitive_gates(tmp_path: Path, val: Dataset) -> None:
    from deploytool.stages.verify import Candidate

    reference = OrtRunner("reference", linear_model(tmp_path / "ref.onnx", 10))
    model = onnx.load(str(tmp_path / "ref.onnx"))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(10), weight.name))
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    float_copy = OrtRunner("scaled", tmp_path / "scaled.onnx")
    as_int8 = Candidate("as_int8", OrtRunner("as_int8", tmp_path / "scaled.onnx"), "quantized")
    result = verify_models(reference, [float_copy, as_int8], val.head(50), "generic", config(min_cosine=0.99))
    gates = {(g.model, g.name): g for g in result.gates}
    assert gates[("scaled", "min_cosine")].passed and gates[("as_int8", "min_cosine")].passed  # cosine is blind to scale
    assert not gates[("scaled", "within_tolerance")].passed and gates[("scaled", "within_tolerance")].default
    assert not gates[("as_int8", "min_snr_db")].passed and gates[("as_int8", "min_snr_db")].default
    assert ("as_int8", "within_tolerance") not in gates


def test_no_default_gates_and_user_tolerance_replace_the_defaults(tmp_path: Path, val: Dataset) -> None:
    reference = OrtRunner("reference", linear_model(tmp_path / "ref.onnx", 10))
    candidate = OrtRunner("copy", linear_model(tmp_path / "copy.onnx", 10))
    names = lambda cfg: [g.name for g in verify_models(reference, [candidate], val.head(20), "generic", cfg).gates]  # noqa: E731
    off = VerifyConfig(threads=1, warmup=1, runs=5, default_gates=False)
    assert names(off) == ["outputs_valid"]
    result = verify_models(reference, [candidate], val.head(20), "generic", config(atol=0.5))
    gate = next(g for g in result.gates if g.name == "within_tolerance")
    assert not gate.default and result.metrics["copy"]["outputs"]["logits"]["atol"] == 0.5  # type: ignore[index]


def test_localisation_in_groups_gives_the_same_rows_with_bounded_memory(tmp_path: Path, tiny: TinyModel, val: Dataset) -> None:
    from deploytool.localize import localize

    damaged = tmp_path / "damaged.onnx"
    damage(tiny.onnx, damaged)
    feeds = next(val.batches(8))
    whole = localize(tiny.onnx, damaged, feeds)
    # every tensor in a group of its own, and the samples run one at a time through each group's two sessions
    grouped = localize(tiny.onnx, damaged, feeds, budget_bytes=1)
    assert whole["groups"] == 1 and whole["samples_per_run"] == 8
    assert grouped["groups"] == len(grouped["tensors"]) > 1 and grouped["samples_per_run"] == 1
    assert [r["tensor"] for r in grouped["tensors"]] == [r["tensor"] for r in whole["tensors"]]
    for one, other in zip(grouped["tensors"], whole["tensors"], strict=True):
        for key in ("cosine_mean", "max_abs_error", "snr_db"):
            assert one[key] == pytest.approx(other[key], rel=1e-5, abs=1e-7), (one["tensor"], key)
    assert grouped["first"]["tensor"] == whole["first"]["tensor"]
    # a model with a fixed batch size takes its batch whole, whatever the budget
    fixed = onnx.load(str(tiny.onnx))
    for value in fixed.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 8
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    assert localize(tmp_path / "fixed.onnx", damaged, feeds, budget_bytes=1)["samples_per_run"] == 8


def test_nan_in_localisation_still_gives_full_metrics_and_reports(tmp_path: Path, val: Dataset) -> None:
    from deploytool.stages.report import write_reports
    from deploytool.stages.verify import CandidateFile, verify_and_explain

    ref_path, nan_path = linear_model(tmp_path / "ok.onnx", 10), linear_model(tmp_path / "nan.onnx", 10, bias=float("nan"))
    fragment = verify_and_explain(OrtRunner("reference", ref_path), [CandidateFile("nan", nan_path)], val.head(20),
                                  "generic", config(), localize_pairs=[("nan", ref_path, nan_path)], always_localize=True)
    rows = fragment["localization"]["nan"]["tensors"]  # type: ignore[index]
    assert any(r["cosine_mean"] != r["cosine_mean"] for r in rows)  # NaN cosines reached the report
    report = {"name": "nan", "passed": fragment["passed"], "gates": fragment["gates"], "models": {}, "stages": [],
              "metrics": fragment["metrics"], "environment": {},
              **{k: v for k, v in fragment.items() if k not in ("passed", "gates", "metrics")}}
    write_reports(report, tmp_path)
    import json

    written = json.loads((tmp_path / "report.json").read_text())
    assert written["metrics"]["nan"]["outputs_valid"] is False and written["gates"]
    assert "Verdict: FAILED" in (tmp_path / "report.html").read_text()
    assert "nan" in (tmp_path / "report.md").read_text()


def two_class_model(path: Path, shift: float) -> Path:
    """x (batch, 2) -> x + [shift, 0]: two logits, the first raised by `shift`."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["logits"])], "shifted",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(np.array([shift, 0.0], np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("close", [1, 12])
def test_a_failed_agreement_gate_says_whether_the_sample_count_decides_it(tmp_path: Path, close: int) -> None:
    """One changed answer in 64 fails top-1 agreement 0.99 (and, lost against the labels, an accuracy drop of 0.01), but
    the intervals hold the thresholds: the gates say they are undecided and how many answers would decide top-1
    agreement; 12 changed answers in 64 are decided."""
    import json

    from conftest import invoke

    from deploytool.gates import drop_interval, share_interval

    x = np.tile(np.array([[0.0, 1.0]], np.float32), (64, 1))
    x[:close] = [0.95, 1.0]  # these samples change class when the first logit is raised by 0.1
    np.savez(tmp_path / "val.npz", x=x, labels=np.ones(64, np.int64))  # the reference answers every sample right
    reference, candidate = two_class_model(tmp_path / "ref.onnx", 0.0), two_class_model(tmp_path / "cand.onnx", 0.1)
    result = invoke("verify", reference, candidate, "--data", tmp_path / "val.npz", "--task", "classification",
                    "--no-default-gates", "--gate", "min_top1_agreement=0.99", "--gate", "max_accuracy_drop=0.01",
                    "--runs", "2", "--no-memory", "--json", tmp_path / "v.json")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    gate, drop = (next(g for g in report["gates"] if g["name"] == name) for name in ("min_top1_agreement", "max_accuracy_drop"))
    assert gate["value"] == pytest.approx(1 - close / 64) and gate["interval"] == share_interval(1 - close / 64, 64)
    assert report["metrics"]["cand"]["answers_lost"] == close and report["metrics"]["cand"]["answers_gained"] == 0
    assert drop["value"] == pytest.approx(close / 64) and drop["interval"] == drop_interval(close, 0, 64)
    undecided = gate["interval"][1] >= 0.99
    assert undecided == (close == 1) == (drop["interval"][0] < 0.01)
    assert result.stderr.count("undecided, within the sampling noise") == (2 if undecided else 0)
    assert ("answers at this share would decide it" in result.output) == undecided


def test_share_and_drop_intervals() -> None:
    from deploytool.gates import drop_interval, share_interval

    assert share_interval(63 / 64, 64) == pytest.approx([0.9167, 0.9972], abs=1e-4)
    assert share_interval(1.0, 64)[1] == 1.0 and share_interval(0.0, 10)[0] == 0.0
    low, high = share_interval(0.99, 10_000)
    assert 0.987 < low < 0.99 < high < 0.993
    assert drop_interval(0, 0, 64) == [0.0, 0.0]
    low, high = drop_interval(3, 1, 100)  # 2 of 100 net lost, of 4 that changed
    assert low < 0.0 < 0.02 < high <= 0.04
