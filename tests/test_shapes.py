"""Tensor size estimates for the memory budgets: free axes count at the size the inputs are fed with."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from deploytool.shapes import per_sample_bytes, tensor_bytes


def attention_like(batch: int | str = "batch") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "sequence", 16])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [16, 16], [0.0] * 256)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]),
                               helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 1]),
                               helper.make_node("MatMul", ["y", "t"], ["z"])], "attention-like", [x], [z], [weight])
    return helper.make_model(graph)


def test_tensors_are_sized_by_the_free_axes_the_inputs_are_fed_with() -> None:
    model = onnx.shape_inference.infer_shapes(attention_like())
    feeds = {"x": np.zeros((8, 50, 16), np.float32)}
    sizes = tensor_bytes(model, ["y", "t", "z"], 1, feeds)
    assert sizes["y"] == sizes["t"] == 4 * 50 * 16  # one sample of a 50-long sequence, not a 1-long one
    assert sizes["z"] == 4 * 50 * 50
    assert tensor_bytes(model, ["z"], 8, feeds)["z"] == 4 * 8 * 50 * 50
    assert tensor_bytes(model, ["x"], 1, feeds)["x"] == 4 * 50 * 16  # graph inputs count too


def test_per_sample_bytes_of_calibration_and_statistics_follow_the_fed_sequence_length() -> None:
    feeds = {"x": np.zeros((8, 200, 16), np.float32)}
    # the stages pass the model before inference: per_sample_bytes infers the shapes itself
    assert per_sample_bytes(attention_like(), ["y", "z"], feeds) == 4 * 200 * 16 + 4 * 200 * 200
    # a model with a fixed batch of 4: a sample's share of the batch's tensors
    assert per_sample_bytes(attention_like(4), ["y", "z"], feeds) == 4 * 200 * 16 + 4 * 200 * 200
