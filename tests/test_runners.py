"""The one inference interface: PyTorch and ONNX Runtime runners give the same outputs, batch datasets alike, and
turn bad models and outputs into the documented errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploytool.data import Dataset
from deploytool.errors import StageError, UserError
from deploytool.runners import OrtRunner, TorchRunner, infer_dataset, keyword_inputs, session_options


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x) * scale, x.sum(dim=1, keepdim=True)


def _exported(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "model.onnx"
    args = (torch.randn(2, 4), torch.ones(2, 1))
    torch.onnx.export(model, args, str(path), input_names=["x", "scale"], output_names=["y", "total"],
                      dynamic_axes={"x": {0: "batch"}, "scale": {0: "batch"}}, dynamo=False)
    return path


def _dataset(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset({"x": rng.standard_normal((n, 4), dtype=np.float32), "scale": rng.random((n, 1), dtype=np.float32)})


def test_torch_and_onnx_runtime_runners_agree_over_a_dataset_in_any_batching(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoInputs()
    torch_runner = TorchRunner("reference", model, ["x", "scale"], ["y", "total"])
    ort_runner = OrtRunner("fp32", _exported(tmp_path, model), threads=1)
    assert ort_runner.output_names == ["y", "total"] and ort_runner.batch_dim() is None
    data = _dataset(10)
    expected = infer_dataset(torch_runner, data, 10)
    for batch in (1, 3, 10):
        got = infer_dataset(ort_runner, data, batch)
        assert [g.shape for g in got] == [(10, 3), (10, 1)]
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    padded = infer_dataset(ort_runner, data, 4, pad=True)  # 10 samples in batches of 4: the last one wraps around
    np.testing.assert_allclose(padded[0], expected[0], rtol=1e-5, atol=1e-5)
    twin = ort_runner.twin("fp32 again")
    np.testing.assert_array_equal(twin.infer(data.feeds)[0], ort_runner.infer(data.feeds)[0])


def test_dict_outputs_are_picked_by_name_and_a_wrong_count_is_a_user_error() -> None:
    class Named(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"first": x + 1, "second": x * 2}

    feeds = {"x": np.ones((2, 3), dtype=np.float32)}
    np.testing.assert_array_equal(TorchRunner("r", Named(), ["x"], ["second"]).infer(feeds)[0], feeds["x"] * 2)
    # a name the dict lacks: named with the entries it holds, never another entry picked by position
    with pytest.raises(UserError, match="names 'third', which forward\\(\\) does not return: it returns a dict with 'first', 'second'"):
        TorchRunner("r", Named(), ["x"], ["third"]).infer(feeds)
    with pytest.raises(UserError, match="names 'third'"):  # with one right name beside it too
        TorchRunner("r", Named(), ["x"], ["first", "third"]).infer(feeds)
    both = TorchRunner("r", Named(), ["x"], ["second", "first"]).infer(feeds)
    np.testing.assert_array_equal(both[0], feeds["x"] * 2)
    np.testing.assert_array_equal(both[1], feeds["x"] + 1)


def test_inputs_go_by_keyword_when_forward_takes_them_in_another_order() -> None:
    class Swapped(torch.nn.Module):
        def forward(self, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return ids - mask

    assert keyword_inputs(Swapped(), ["ids", "mask"]) and not keyword_inputs(Swapped(), ["mask", "ids"])
    out = TorchRunner("r", Swapped(), ["ids", "mask"], ["y"]).infer({"ids": np.full((1, 2), 5.0, np.float32),
                                                                   "mask": np.ones((1, 2), np.float32)})
    np.testing.assert_array_equal(out[0], np.full((1, 2), 4.0, np.float32))


def test_a_model_onnx_runtime_cannot_load_is_a_user_error_for_a_user_file_and_a_stage_error_otherwise(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load ONNX model"):
        OrtRunner("candidate", broken, user_file=True)
    with pytest.raises(StageError, match="cannot load broken.onnx"):
        OrtRunner("int8", broken)


def test_sessions_are_pinned_sequential_and_do_not_spin() -> None:
    options = session_options(3)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
