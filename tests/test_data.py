"""Datasets from .npz files and folders, checked against the model's input specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS, image_specs, save_npz

from deploytool.data import CalibrationReader, Dataset, load_dataset, random_dataset
from deploytool.errors import UserError
from deploytool.recipe import InputSpec

SPECS = image_specs()


def images(n: int, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1, 8, 8)).astype(dtype)


def user_error(path: Path, specs: list[InputSpec] = SPECS, labels_key: str = "labels") -> UserError:
    with pytest.raises(UserError) as info:
        load_dataset(path, specs, labels_key)
    return info.value


@pytest.mark.parametrize(("split", "count"), [("calib", 256), ("val", 450), ("train", 1347)])
def test_digits_splits(split: str, count: int) -> None:
    data = load_dataset(DIGITS / f"{split}.npz", SPECS)
    assert len(data) == count
    assert data.feeds["image"].dtype == np.float32 and data.feeds["image"].shape == (count, 1, 8, 8)
    assert data.labels is not None and data.labels.dtype == np.int64 and len(data.labels) == count
    assert data.source == str(DIGITS / f"{split}.npz")


def test_npz_without_labels_and_with_a_custom_labels_key(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=images(5), target=np.arange(5))
    assert load_dataset(path, SPECS).labels is None
    data = load_dataset(path, SPECS, labels_key="target")
    assert data.labels is not None and list(data.labels) == [0, 1, 2, 3, 4]


def test_float64_is_cast_to_the_spec_dtype(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=images(3, np.float64))
    assert load_dataset(path, SPECS).feeds["image"].dtype == np.float32


def test_single_npy_file_for_a_single_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", images(4))
    assert len(load_dataset(tmp_path / "x.npy", SPECS)) == 4


def test_folder_of_npy_batches_and_single_samples_in_name_order(tmp_path: Path) -> None:
    first, second = images(3), images(2)
    np.save(tmp_path / "b.npy", second)
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "c.npy", first[0])  # one sample without its batch axis
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_dataset(tmp_path, SPECS)
    assert len(data) == 6
    np.testing.assert_array_equal(data.feeds["image"][:3], first)
    np.testing.assert_array_equal(data.feeds["image"][3:5], second)
    np.testing.assert_array_equal(data.feeds["image"][5], first[0])


def test_folder_of_npz_files_with_labels(tmp_path: Path) -> None:
    save_npz(tmp_path / "0.npz", image=images(3), labels=np.array([1, 2, 3]))
    save_npz(tmp_path / "1.npz", image=images(2), labels=np.array([4, 5]))
    data = load_dataset(tmp_path, SPECS)
    assert len(data) == 5 and data.labels is not None and list(data.labels) == [1, 2, 3, 4, 5]


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no arrays here")
    error = user_error(tmp_path)
    assert str(tmp_path) in error.message and "no .npz or .npy files" in error.message


def test_npy_folder_needs_a_single_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", images(2))
    specs = [*SPECS, InputSpec(name="mask", shape=["batch", 8], dtype="float32")]
    error = user_error(tmp_path, specs)
    assert str(tmp_path / "a.npy") in error.message and "single-input" in error.message
    assert error.hint is not None and "input name" in error.hint


def test_folder_whose_files_hold_different_keys(tmp_path: Path) -> None:
    save_npz(tmp_path / "0.npz", image=images(2), labels=np.array([0, 1]))
    save_npz(tmp_path / "1.npz", image=images(2))
    error = user_error(tmp_path)
    assert str(tmp_path) in error.message and "different numbers of files" in error.message


def test_folder_whose_samples_do_not_stack(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", images(2))
    np.save(tmp_path / "b.npy", np.zeros((2, 1, 7, 7), np.float32))
    error = user_error(tmp_path)
    assert str(tmp_path) in error.message and "do not stack" in error.message


def test_wrong_input_name(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", img=images(2))
    error = user_error(path)
    assert str(path) in error.message
    assert "['image']" in error.message and "['img']" in error.message
    assert error.hint is not None and "image" in error.hint


def test_wrong_shape(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=np.zeros((2, 1, 7, 8), np.float32))
    error = user_error(path)
    assert str(path) in error.message and "'image'" in error.message
    assert "[2, 1, 7, 8]" in error.message and "axis 2 is 7, should be 8" in error.message


def test_wrong_number_of_dimensions(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=np.zeros((2, 8, 8), np.float32))
    error = user_error(path)
    assert str(path) in error.message and "4 dimensions" in error.message and "[2, 8, 8]" in error.message


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 1, 8, 8), np.int64), np.zeros((2, 1, 8, 8), bool), np.full((2, 1, 8, 8), "x")],
    ids=["int64", "bool", "str"],
)
def test_wrong_dtype_kind(tmp_path: Path, array: np.ndarray) -> None:
    path = save_npz(tmp_path / "d.npz", image=array)
    error = user_error(path)
    assert str(path) in error.message and f"dtype {array.dtype}" in error.message and "float32" in error.message


def test_integer_inputs_accept_any_integer_width(tmp_path: Path) -> None:
    specs = [InputSpec(name="ids", shape=["batch", 4], dtype="int64")]
    path = save_npz(tmp_path / "d.npz", ids=np.ones((3, 4), np.int32))
    assert load_dataset(path, specs).feeds["ids"].dtype == np.int64
    error = user_error(save_npz(tmp_path / "f.npz", ids=np.ones((3, 4), np.float32)), specs)
    assert "'ids'" in error.message and "int64" in error.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(tmp_path: Path, bad: float) -> None:
    array = images(5)
    array[3, 0, 2, 2] = bad
    path = save_npz(tmp_path / "d.npz", image=array)
    error = user_error(path)
    assert str(path) in error.message and "NaN or Inf" in error.message
    assert "1 sample(s)" in error.message and "first at index 3" in error.message


def test_zero_samples(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=np.zeros((0, 1, 8, 8), np.float32))
    error = user_error(path)
    assert str(path) in error.message and "zero samples" in error.message


@pytest.mark.parametrize(
    "labels",
    [np.arange(3), np.array(["a", "b", "c", "d", "e"]), np.array(7)],
    ids=["too-few", "strings", "scalar"],
)
def test_bad_labels(tmp_path: Path, labels: np.ndarray) -> None:
    path = save_npz(tmp_path / "d.npz", image=images(5), labels=labels)
    error = user_error(path)
    assert str(path) in error.message and "'labels'" in error.message and "one entry per sample" in error.message


def test_inputs_with_different_sample_counts(tmp_path: Path) -> None:
    specs = [*SPECS, InputSpec(name="mask", shape=["batch", 8], dtype="float32")]
    path = save_npz(tmp_path / "d.npz", image=images(4), mask=np.zeros((3, 8), np.float32))
    error = user_error(path, specs)
    assert str(path) in error.message and "different numbers of samples" in error.message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.npz", b""),
        ("truncated.npz", None),
        ("corrupt.npz", b"PK\x03\x04 this is not really a zip archive"),
        ("text.npz", b"just some text, not numpy at all"),
    ],
)
def test_corrupt_or_empty_npz(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is None:
        whole = (DIGITS / "calib.npz").read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    error = user_error(path)
    assert f"cannot read data file {path}" in error.message


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", image=np.array([{"a": 1}], dtype=object))
    error = user_error(path)
    assert f"cannot read data file {path}" in error.message


def test_missing_and_unsupported_sources(tmp_path: Path) -> None:
    error = user_error(tmp_path / "nothing.npz")
    assert "data not found" in error.message and "nothing.npz" in error.message
    csv = tmp_path / "data.csv"
    csv.write_text("1,2,3\n")
    error = user_error(csv)
    assert "unsupported data source" in error.message and str(csv) in error.message and error.hint


def test_random_dataset_is_seeded_and_matches_the_specs() -> None:
    specs = [
        InputSpec(name="x", shape=["batch", 3], dtype="float32"),
        InputSpec(name="ids", shape=["batch", 5], dtype="int64"),
        InputSpec(name="flag", shape=["batch", 2], dtype="bool"),
    ]
    a, b = random_dataset(specs, 4), random_dataset(specs, 4)
    for name in ("x", "ids", "flag"):
        np.testing.assert_array_equal(a.feeds[name], b.feeds[name])
    assert a.feeds["x"].shape == (4, 3) and a.feeds["x"].dtype == np.float32
    assert a.feeds["ids"].dtype == np.int64 and a.feeds["flag"].dtype == bool
    assert not np.array_equal(random_dataset(specs, 4, seed=1).feeds["x"], a.feeds["x"])


def test_random_dataset_needs_fixed_sizes_after_the_batch_axis() -> None:
    with pytest.raises(UserError) as info:
        random_dataset([InputSpec(name="tokens", shape=["batch", "seq"], dtype="int64")], 2)
    assert "'tokens'" in info.value.message and "['seq']" in info.value.message and info.value.hint


def test_batches_head_and_padding() -> None:
    data = Dataset({"image": images(5)}, np.arange(5))
    assert [len(b["image"]) for b in data.batches(2)] == [2, 2, 1]
    padded = list(data.batches(2, pad=True))
    assert [len(b["image"]) for b in padded] == [2, 2, 2]
    np.testing.assert_array_equal(padded[-1]["image"][1], data.feeds["image"][0])  # wraps around to the start
    head = data.head(3)
    assert len(head) == 3 and head.labels is not None and list(head.labels) == [0, 1, 2]
    assert len(next(data.batches(4, pad=True))["image"]) == 4


def test_calibration_reader_batches_and_rewinds(calib: Dataset) -> None:
    reader = CalibrationReader(calib.head(40), 16)
    assert len(reader) == 3
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(batch["image"]))
    assert sizes == [16, 16, 8]
    reader.rewind()
    first = reader.get_next()
    assert first is not None and set(first) == {"image"}
    fixed = CalibrationReader(calib.head(40), 16, pad=True)
    assert [len(fixed.get_next()["image"]) for _ in range(3)] == [16, 16, 16]  # type: ignore[index]
    assert fixed.get_next() is None


def _embedding_model(dequantized: bool = False) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 4])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 4, 3])
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table_dq" if dequantized else "table", "ids"], ["hidden"], name="embedding")]
    if dequantized:
        table = numpy_helper.from_array(np.zeros((10, 3), np.int8), "table")
        scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
        nodes.insert(0, helper.make_node("DequantizeLinear", ["table", "scale"], ["table_dq"]))
        initializers = [table, scale]
    else:
        initializers = [numpy_helper.from_array(np.zeros((10, 3), np.float32), "table")]
    return helper.make_model(helper.make_graph(nodes, "embedding", [ids], [out], initializers),
                             opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dequantized", [False, True])
def test_token_ids_outside_the_vocabulary_are_a_user_error_naming_the_sample(dequantized: bool) -> None:
    from deploytool.data import check_indices, index_tables

    model = _embedding_model(dequantized)
    assert index_tables(model) == {"input_ids": (10, "embedding")}  # through the Cast, to the table's 10 rows
    ids = np.tile(np.arange(4, dtype=np.int64), (3, 1))
    check_indices(model, Dataset({"input_ids": ids}, None, "val.npz"))
    check_indices(model, Dataset({"input_ids": ids - 10}, None, "val.npz"))  # ONNX Runtime's Gather takes -rows too
    ids[2, 1] = 10
    with pytest.raises(UserError) as info:
        check_indices(model, Dataset({"input_ids": ids}, None, "val.npz"))
    assert info.value.exit_code == 2
    assert "val.npz: input 'input_ids' holds 10 in sample 2" in info.value.message and "0..9" in info.value.message


def test_quantize_refuses_out_of_vocabulary_calibration_before_any_work(tmp_path: Path) -> None:
    from deploytool.recipe import QuantizeConfig
    from deploytool.stages.quantize import quantize_onnx

    onnx.save(_embedding_model(), str(tmp_path / "model.onnx"))
    calibration = Dataset({"input_ids": np.full((4, 4), 12, np.int64)}, None, "calib.npz")
    with pytest.raises(UserError, match="calib.npz: input 'input_ids' holds 12 in sample 0"):
        quantize_onnx(tmp_path / "model.onnx", tmp_path / "int8.onnx", QuantizeConfig(), calibration)
    assert not (tmp_path / "int8.onnx").exists()
