"""simplify: onnxsim with a numeric check; never more nodes, never different outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import TinyModel
from onnx import TensorProto, helper, numpy_helper

from deploytool.data import Dataset
from deploytool.recipe import InputSpec, SimplifyConfig
from deploytool.runners import OrtRunner
from deploytool.stages.simplify import simplify_onnx


def redundant_model(path: Path) -> Path:
    """y = relu(identity(x) * (a * b) + c): the constant product and the Identity are foldable."""
    a = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full((4,), 0.5, np.float32), "b")
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32) - 1.5, "c")
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["x1", "ab"], ["scaled"]),
        helper.make_node("Add", ["scaled", "c"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "redundant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[a, b, c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sample(n: int = 6) -> Dataset:
    return Dataset({"x": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)})


def test_foldable_nodes_are_removed_and_outputs_kept(tmp_path: Path) -> None:
    source = redundant_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    record = simplify_onnx(source, out, SimplifyConfig(), sample())
    assert record.simplified and record.notes == []
    assert record.nodes_before == 5 and record.nodes_after < record.nodes_before
    assert len(onnx.load(str(out)).graph.node) == record.nodes_after
    assert record.max_abs_error <= 1e-6
    feeds = sample(11).feeds
    (want,), (got,) = OrtRunner("in", source).infer(feeds), OrtRunner("out", out).infer(feeds)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_tiny_cnn_never_grows_and_keeps_its_outputs(tmp_path: Path, tiny: TinyModel, calib: Dataset) -> None:
    out = tmp_path / "simplified.onnx"
    record = simplify_onnx(tiny.onnx, out, SimplifyConfig(), calib.head(2))
    assert record.simplified
    assert record.nodes_after <= record.nodes_before == len(onnx.load(str(tiny.onnx)).graph.node)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    feeds = {"image": calib.feeds["image"][:33]}
    (want,), (got,) = OrtRunner("in", tiny.onnx).infer(feeds), OrtRunner("out", out).infer(feeds)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_fixed_batch_model_is_checked_at_its_batch_size(tmp_path: Path) -> None:
    """A model with batch 3 fixed is fed exactly 3 samples, even when the sample holds fewer."""
    source = tmp_path / "fixed.onnx"
    proto = onnx.load(str(redundant_model(tmp_path / "dyn.onnx")))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(proto, str(source))
    record = simplify_onnx(source, tmp_path / "out.onnx", SimplifyConfig(), sample(2))
    assert record.simplified and record.notes == []


def test_a_sample_that_does_not_fit_keeps_the_original(tmp_path: Path) -> None:
    source = redundant_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    wrong = Dataset({"x": np.zeros((2, 5), np.float32)})
    record = simplify_onnx(source, out, SimplifyConfig(), wrong)
    assert not record.simplified and record.nodes_after == record.nodes_before == 5
    assert len(record.notes) == 1 and record.notes[0].startswith("kept the unsimplified model")
    assert "\n" not in record.notes[0]
    assert out.read_bytes() == source.read_bytes()


def test_simplified_model_keeps_its_interface(tmp_path: Path) -> None:
    from deploytool.stages.inspect import input_specs

    source = redundant_model(tmp_path / "in.onnx")
    simplify_onnx(source, tmp_path / "out.onnx", SimplifyConfig(), sample(2))
    specs = input_specs(tmp_path / "out.onnx")
    assert specs == [InputSpec(name="x", shape=["batch", 4], dtype="float32")]


def test_oversized_average_pool_becomes_global_average_pool(tmp_path: Path) -> None:
    """EfficientNet's AvgPool2d(1280, ceil_mode=True) on a 7x7 map: a GlobalAveragePool after simplify, same outputs."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.pool = torch.nn.AvgPool2d(64, ceil_mode=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x)).flatten(1)

    torch.manual_seed(0)
    source = tmp_path / "pooled.onnx"
    torch.onnx.export(Pooled().eval(), (torch.randn(2, 3, 7, 7),), str(source), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False, opset_version=18)
    assert "AveragePool" in [n.op_type for n in onnx.load(str(source)).graph.node]
    sample = Dataset({"x": np.random.default_rng(0).normal(size=(4, 3, 7, 7)).astype(np.float32)}, None, "random")
    out = tmp_path / "simplified.onnx"
    record = simplify_onnx(source, out, SimplifyConfig(), sample)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert record.simplified and "GlobalAveragePool" in ops and "AveragePool" not in ops, (record, ops)
    assert any("GlobalAveragePool" in n for n in record.notes)
    np.testing.assert_allclose(OrtRunner("s", out).infer(sample.feeds)[0], OrtRunner("o", source).infer(sample.feeds)[0], atol=1e-5)
