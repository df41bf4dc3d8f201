"""inspect: what an ONNX file holds, as a dict, a table (`deploytool inspect`) or JSON (`--json`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CliRun, TinyModel
from onnx import TensorProto, helper, numpy_helper

from deploytool.errors import UserError
from deploytool.recipe import InputSpec
from deploytool.stages.inspect import input_specs, inspect_onnx, read_onnx


def test_inspect_fp32(tiny: TinyModel) -> None:
    info = inspect_onnx(tiny.onnx)
    proto = onnx.load(str(tiny.onnx))
    assert info["path"] == str(tiny.onnx) and info["size_bytes"] == tiny.onnx.stat().st_size
    assert info["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert info["opsets"]["ai.onnx"] == 18 and info["producer"].startswith("deploytool")
    assert info["nodes"] == len(proto.graph.node) == sum(info["ops"].values())
    assert info["ops"]["Conv"] == 2 and info["quantized"] is False
    n_params = 8 * 9 + 8 + 8 * 8 * 9 + 8 + 8 * 10 + 10  # convolutions (BatchNorm folded into conv1) and the head
    assert info["params"] == n_params


def test_ops_are_sorted_by_count(tiny: TinyModel) -> None:
    counts = list(inspect_onnx(tiny.onnx)["ops"].values())
    assert counts == sorted(counts, reverse=True)


def test_input_specs(tiny: TinyModel) -> None:
    assert input_specs(tiny.onnx) == [InputSpec(name="image", shape=["batch", 1, 8, 8], dtype="float32")]


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path: Path) -> None:
    """Older exporters list weights among the graph inputs; they are not inputs a user must feed."""
    weight = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "old-style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2])],
        initializer=[weight],
    )
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert input_specs(path) == [InputSpec(name="x", shape=[5, 3], dtype="float32")]
    info = inspect_onnx(path)
    assert [i["name"] for i in info["inputs"]] == ["x"] and info["params"] == 6


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.onnx", None, "ONNX file not found"),
        ("empty.onnx", b"", "is empty"),
        ("garbage.onnx", b"\xff\x00 definitely not protobuf \x00\xff" * 4, "is not a readable ONNX model"),
        ("no_graph.onnx", b"\x08\x07", "holds no graph"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_onnx(path)
    assert expected in info.value.message and str(path) in info.value.message


def test_inspect_command_table(cli: Callable[..., CliRun], tiny: TinyModel) -> None:
    result = cli("inspect", tiny.onnx)
    assert result.exit_code == 0, result.output
    assert str(tiny.onnx) in result.output and "parameters" in result.output
    assert "input   image: float32 ['batch', 1, 8, 8]" in result.output
    assert "output  logits: float32 ['batch', 10]" in result.output
    assert "Conv" in result.output and "quantized" not in result.output


def test_inspect_command_json(cli: Callable[..., CliRun], tiny: TinyModel) -> None:
    result = cli("inspect", tiny.onnx, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info == json.loads(json.dumps(inspect_onnx(tiny.onnx)))


def test_inspect_command_on_a_quantized_model(cli: Callable[..., CliRun], digits_run: tuple[CliRun, Path]) -> None:
    _, out = digits_run
    result = cli("inspect", out / "model.int8.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["quantized"] is True and info["ops"]["QuantizeLinear"] > 0
    result = cli("inspect", out / "model.int8.onnx")
    assert result.exit_code == 0 and "quantized" in result.output


def test_inspect_command_on_a_bad_file(cli: Callable[..., CliRun], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not a model \x00\xff" * 4)
    result = cli("inspect", bad)
    assert result.exit_code == 2
    assert f"error: {bad} is not a readable ONNX model" in result.output and "Traceback" not in result.output
    result = cli("inspect", tmp_path / "absent.onnx")
    assert result.exit_code == 2 and f"ONNX file not found: {tmp_path / 'absent.onnx'}" in result.output
