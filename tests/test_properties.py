"""Property-based tests over recipe parsing and data validation, and a mutation test on ONNX files:
whatever the input, the outcome is a result or a clean user error, never a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from conftest import DIGITS_RECIPE, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploytool.errors import UserError

KEYS = ["name", "model", "data", "prune", "distill", "export", "simplify", "quantize", "verify", "gates", "factory",
        "checkpoint", "inputs", "outputs", "opset", "ratio", "mode", "per_channel", "threads", "min_cosine", "bogus"]
scalars = st.one_of(st.booleans(), st.integers(-5, 40), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_any_recipe_parses_or_is_a_user_error(tmp_path: Path, data: dict[str, Any]) -> None:
    from deploytool.recipe import Recipe, load_recipe

    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps(data))
    try:
        recipe = load_recipe(path)
    except UserError as exc:
        assert str(path) in exc.message and "\n" not in exc.message
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgmnopqrstuvwxyz._=[]\"0123456789 -", max_size=30), max_size=4))
def test_any_override_applies_or_is_a_user_error(overrides: list[str]) -> None:
    from deploytool.recipe import Recipe, load_recipe

    try:
        recipe = load_recipe(DIGITS_RECIPE, overrides)
    except UserError as exc:
        assert exc.message and "\n" not in exc.message
    else:
        assert isinstance(recipe, Recipe)


dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
    dtype=dtypes,
    name=st.sampled_from(["image", "images", "x"]),
    poison=st.sampled_from([None, np.nan, np.inf]),
    labels=st.one_of(st.none(), st.integers(0, 12)),
)
def test_any_data_loads_matching_the_spec_or_is_a_user_error(tmp_path: Path, specs: Any, shape: list[int], dtype: Any,
                                                             name: str, poison: float | None, labels: int | None) -> None:
    from deploytool.data import load_dataset

    array = np.ones(shape, dtype=dtype)
    if poison is not None and array.size and array.dtype.kind == "f":
        array.reshape(-1)[array.size // 2] = poison
    arrays = {name: array}
    if labels is not None:
        arrays["labels"] = np.zeros(labels, dtype=np.int64)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    try:
        dataset = load_dataset(path, specs)
    except UserError as exc:
        assert str(path) in exc.message
    else:
        feeds = dataset.feeds["image"]
        assert feeds.dtype == np.float32 and feeds.shape[1:] == (1, 8, 8) and len(feeds) > 0
        assert np.isfinite(feeds).all()
        assert dataset.labels is None or len(dataset.labels) == len(feeds)


CHECK = """
import sys
from click.testing import CliRunner
from deploytool.cli import cli
for args in (["inspect", sys.argv[1]], ["verify", sys.argv[2], sys.argv[1], "--runs", "1", "--warmup", "0", "--no-memory"]):
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    unhandled = result.exception is not None and not isinstance(result.exception, SystemExit)
    print(result.exit_code, unhandled, "Traceback" in result.output, repr(result.output[-300:]))
"""


@pytest.mark.parametrize("seed", range(10))
def test_corrupted_onnx_files_always_exit_cleanly(digits_run: tuple[Any, Path], tmp_path: Path, seed: int) -> None:
    _, out = digits_run
    original = (out / "model.onnx").read_bytes()
    rng = np.random.default_rng(seed)
    data = bytearray(original)
    if seed % 3 == 0:  # truncated
        data = data[: int(rng.integers(1, len(data)))]
    else:  # flipped bytes
        for index in rng.integers(0, len(data), size=int(rng.integers(1, 64))):
            data[index] ^= int(rng.integers(1, 256))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-c", CHECK, str(corrupt), str(out / "model.onnx")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"the process died: {done.returncode}\n{done.stderr[-2000:]}"
    for line in done.stdout.splitlines():
        code, unhandled, traceback, output = line.split(" ", 3)
        assert code in {"0", "1", "2", "3"}, line
        assert unhandled == "False" and traceback == "False", line
