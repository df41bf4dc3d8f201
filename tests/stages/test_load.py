"""load: factories (module:callable, file.py:callable) and state_dicts read without running pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, ROOT, TINY_CNN, CreatesMarker, TinyModel, write_module

from deploytool.checkpoint import read_state_dict
from deploytool.errors import UserError
from deploytool.factory import resolve_factory
from deploytool.stages.load import load_model


def user_error(factory: str, checkpoint: Path | None, base_dir: Path) -> UserError:
    with pytest.raises(UserError) as info:
        load_model(factory, checkpoint, base_dir)
    return info.value


def test_digits_sample_from_module_callable(restore_sys_path: None, val: object) -> None:
    model = load_model("samples.digits.model:build", DIGITS / "cnn.pt", ROOT)
    assert not model.training
    data = val.head(64)  # type: ignore[attr-defined]
    with torch.no_grad():
        logits = model(torch.from_numpy(data.feeds["image"]))
    assert logits.shape == (64, 10)
    assert (logits.argmax(1).numpy() == data.labels).mean() > 0.9  # the trained weights were loaded


def test_module_callable_found_in_the_recipe_folder(tmp_path: Path, restore_sys_path: None) -> None:
    write_module(tmp_path, "tiny_model_in_recipe_folder", TINY_CNN)
    model = load_model("tiny_model_in_recipe_folder:build", None, tmp_path)
    assert type(model).__name__ == "TinyCNN"


def test_file_callable_relative_to_base_dir(tmp_path: Path) -> None:
    write_module(tmp_path / "models", "net", TINY_CNN)
    model = load_model("models/net.py:wide", None, tmp_path)
    assert model.conv1.out_channels == 12


def test_file_factory_with_a_checkpoint_reproduces_the_weights(tiny: TinyModel) -> None:
    model = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    saved = torch.load(tiny.checkpoint, weights_only=True)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key


def test_wrapped_state_dict_is_accepted(tmp_path: Path, tiny: TinyModel) -> None:
    state = torch.load(tiny.checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    assert set(read_state_dict(path)) == set(state)


def test_safetensors_checkpoint(tmp_path: Path, tiny: TinyModel, calib: object) -> None:
    from safetensors.torch import save_file

    state = torch.load(tiny.checkpoint, weights_only=True)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    from_pt = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    from_st = load_model(tiny.factory, path, tiny.folder)
    x = torch.from_numpy(calib.head(8).feeds["image"])  # type: ignore[attr-defined]
    with torch.no_grad():
        torch.testing.assert_close(from_st(x), from_pt(x))


def test_missing_factory_file(tmp_path: Path) -> None:
    error = user_error("nowhere/model.py:build", None, tmp_path)
    assert "model factory file not found" in error.message and str(tmp_path / "nowhere/model.py") in error.message


def test_missing_factory_module(tmp_path: Path, restore_sys_path: None) -> None:
    error = user_error("no_such_package_xyz.models:build", None, tmp_path)
    assert "'no_such_package_xyz.models'" in error.message and error.hint is not None


def test_factory_attribute_missing_or_not_callable(tmp_path: Path) -> None:
    path = write_module(tmp_path, "m", TINY_CNN + "\nNOT_CALLABLE = 3\n")
    for attr in ("missing", "NOT_CALLABLE"):
        with pytest.raises(UserError) as info:
            resolve_factory(f"{path}:{attr}", tmp_path)
        assert f"'{attr}' is not a callable" in info.value.message and str(path) in info.value.message


def test_factory_module_that_fails_to_import(tmp_path: Path) -> None:
    path = write_module(tmp_path, "broken", "import torch\nraise RuntimeError('no GPU here')\n")
    error = user_error(f"{path}:build", None, tmp_path)
    assert f"importing {path} failed" in error.message and "no GPU here" in error.message


def test_factory_that_raises_or_returns_something_else(tmp_path: Path) -> None:
    path = write_module(tmp_path, "odd", "def boom():\n    raise ValueError('width must be even')\n\ndef number():\n    return 3\n")
    error = user_error(f"{path}:boom", None, tmp_path)
    assert f"'{path}:boom'" in error.message and "ValueError: width must be even" in error.message
    error = user_error(f"{path}:number", None, tmp_path)
    assert f"'{path}:number'" in error.message and "returned int, not a torch.nn.Module" in error.message


def test_missing_unexpected_and_mis_shaped_keys_are_named(tmp_path: Path, tiny: TinyModel) -> None:
    state = dict(torch.load(tiny.checkpoint, weights_only=True))
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["conv1.weight"] = torch.zeros(3, 1, 3, 3)
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    error = user_error(tiny.factory, path, tiny.folder)
    assert f"checkpoint {path} does not match the model" in error.message
    assert "missing keys: head.bias" in error.message
    assert "unexpected keys: extra.weight" in error.message
    assert "shape mismatches: conv1.weight [3, 1, 3, 3] vs [8, 1, 3, 3]" in error.message
    assert error.hint is not None and "architecture" in error.hint


def test_checkpoint_of_a_different_width(tiny: TinyModel) -> None:
    error = user_error(tiny.factory.replace(":build", ":wide"), tiny.checkpoint, tiny.folder)
    assert "shape mismatches" in error.message and "conv1.weight [8, 1, 3, 3] vs [12, 1, 3, 3]" in error.message


def test_missing_checkpoint(tmp_path: Path, tiny: TinyModel) -> None:
    error = user_error(tiny.factory, tmp_path / "missing.pt", tiny.folder)
    assert error.message == f"checkpoint not found: {tmp_path / 'missing.pt'}"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_empty_checkpoint(tmp_path: Path, tiny: TinyModel, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    error = user_error(tiny.factory, path, tiny.folder)
    assert str(path) in error.message and "empty" in error.message


def test_truncated_checkpoints(tmp_path: Path, tiny: TinyModel) -> None:
    from safetensors.torch import save_file

    whole = tiny.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    error = user_error(tiny.factory, truncated, tiny.folder)
    assert f"cannot read checkpoint {truncated}" in error.message and error.hint

    st = tmp_path / "whole.safetensors"
    save_file(dict(torch.load(tiny.checkpoint, weights_only=True)), str(st))
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(st.read_bytes()[:-100])
    error = user_error(tiny.factory, cut, tiny.folder)
    assert f"cannot read checkpoint {cut}" in error.message


def test_garbage_checkpoint_gets_a_readable_message(tmp_path: Path, tiny: TinyModel) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"hello, this is not a checkpoint")
    error = user_error(tiny.factory, path, tiny.folder)
    assert f"cannot read checkpoint {path}" in error.message
    assert error.hint is not None and "torch.save" in error.hint


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path, tiny: TinyModel) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    error = user_error(tiny.factory, path, tiny.folder)
    assert f"checkpoint {path} is not a state_dict" in error.message


def test_the_marker_payload_is_live(tmp_path: Path) -> None:
    """Plain unpickling does run it, so the next test's 'marker not created' means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CreatesMarker(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_never_run(tmp_path: Path, tiny: TinyModel, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh)
    error = user_error(tiny.factory, path, tiny.folder)
    assert f"checkpoint {path} holds more than tensors" in error.message
    assert error.hint is not None and "safetensors" in error.hint
    assert not marker.exists()


def test_a_checkpoint_with_numpy_arrays_is_refused_too(tmp_path: Path, tiny: TinyModel) -> None:
    path = tmp_path / "numpy.pt"
    torch.save({"conv1.weight": np.zeros(3)}, path)
    error = user_error(tiny.factory, path, tiny.folder)
    assert str(path) in error.message
