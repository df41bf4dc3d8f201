"""Recipe validation: unknown keys, wrong types and ranges, --set overrides; every problem is a UserError naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import DIGITS_RECIPE, ROOT

from deploytool.errors import UserError
from deploytool.recipe import Recipe, apply_overrides, load_recipe, parse_override

# A recipe using every table; paths are absolute so it validates from any folder.
FULL: dict[str, Any] = {
    "name": "full",
    "model": {
        "factory": "samples.digits.model:build",
        "checkpoint": str(ROOT / "samples/digits/cnn.pt"),
        "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
        "outputs": ["logits"],
    },
    "data": {"calibration": "calib.npz", "validation": "val.npz", "task": "classification"},
    "export": {"opset": 18, "dynamic_batch": True},
    "simplify": {"enabled": True},
    "quantize": {"mode": "static", "per_channel": True},
    "verify": {"threads": 2, "gates": {"min_cosine": 0.99}},
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def with_key(path: list[str | int], key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(FULL)
    node: Any = data
    for part in path:
        node = node[part]
    node[key] = value
    return data


def error_of(path: Path, overrides: list[str] | None = None) -> UserError:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return info.value


def test_bundled_recipe_loads_and_resolves_paths_against_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    recipe = load_recipe(DIGITS_RECIPE)
    assert recipe.name == "digits-cnn"
    assert recipe.base_dir == DIGITS_RECIPE.parent
    assert recipe.resolve(recipe.model.checkpoint) == ROOT / "samples/digits/cnn.pt"
    assert recipe.resolve("/abs/file.npz") == Path("/abs/file.npz")
    assert recipe.quantize is not None and recipe.quantize.per_channel is True
    assert recipe.verify is not None and recipe.verify.gates.min_cosine == 0.99


def test_full_recipe_is_valid(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, FULL))
    assert recipe.simplify is not None and recipe.quantize is not None and recipe.verify is not None


def test_missing_optional_tables_mean_skipped_stages(tmp_path: Path) -> None:
    data = {"name": "minimal", "model": FULL["model"]}
    recipe = load_recipe(write(tmp_path, data))
    assert recipe.simplify is None and recipe.quantize is None and recipe.verify is None
    assert recipe.export.opset == 18 and recipe.export.dynamic_batch is True


@pytest.mark.parametrize(
    ("path", "where", "suggestion"),
    [
        ([], "the top level", "name"),
        (["model"], "[model]", "factory"),
        (["model", "inputs", 0], "[model.inputs[0]]", "name"),
        (["data"], "[data]", "calibration"),
        (["export"], "[export]", "opset"),
        (["simplify"], "[simplify]", "enabled"),
        (["quantize"], "[quantize]", "per_channel"),
        (["verify"], "[verify]", "threads"),
        (["verify", "gates"], "[verify.gates]", "min_cosine"),
    ],
)
def test_unknown_key_in_every_table_is_named_with_a_suggestion(
    tmp_path: Path, path: list[str | int], where: str, suggestion: str
) -> None:
    typo = suggestion[:-1] + "x" + suggestion[-1]  # one letter too many: close to the real key
    recipe = write(tmp_path, with_key(path, typo, 1))
    error = error_of(recipe)
    assert f"unknown key '{typo}' in {where}" in error.message
    assert str(recipe) in error.message
    assert error.hint == f"did you mean '{suggestion}'?"


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, with_key(["export"], "zzzzzz", 1)))
    assert "unknown key 'zzzzzz' in [export]" in error.message
    assert error.hint is not None and "known keys:" in error.hint and "opset" in error.hint


def test_per_chanel_typo(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.toml"
    recipe.write_text(DIGITS_RECIPE.read_text().replace("per_channel", "per_chanel"))
    error = error_of(recipe)
    assert "unknown key 'per_chanel' in [quantize]" in error.message
    assert error.hint == "did you mean 'per_channel'?"


@pytest.mark.parametrize(
    ("path", "key", "value", "expected"),
    [
        (["export"], "opset", "eighteen", "[export] opset"),
        (["export"], "opset", 5, "[export] opset"),
        (["export"], "opset", 99, "[export] opset"),
        (["export"], "exporter", "onnxscript", "[export] exporter"),
        (["simplify"], "enabled", "maybe", "[simplify] enabled"),
        (["quantize"], "mode", "fast", "[quantize] mode"),
        (["quantize"], "calibration_samples", 0, "[quantize] calibration_samples"),
        (["quantize"], "exclude_nodes", "conv1", "[quantize] exclude_nodes"),
        (["data"], "task", "segmentation", "[data] task"),
        (["verify"], "threads", 0, "[verify] threads"),
        (["verify"], "runs", -3, "[verify] runs"),
        (["verify", "gates"], "max_accuracy_drop", 2.0, "[verify.gates] max_accuracy_drop"),
        (["verify", "gates"], "min_speedup", 0, "[verify.gates] min_speedup"),
        (["model"], "factory", "no_colon_here", "[model] factory"),
        (["model"], "outputs", [], "[model] outputs"),
        (["model", "inputs", 0], "shape", [0, 1, 8, 8], "[model.inputs[0]] shape"),
        (["model", "inputs", 0], "dtype", "float128", "[model.inputs[0]] dtype"),
        ([], "name", "", "the top level name"),
    ],
)
def test_wrong_types_and_out_of_range_values_are_named(
    tmp_path: Path, path: list[str | int], key: str, value: Any, expected: str
) -> None:
    error = error_of(write(tmp_path, with_key(path, key, value)))
    assert expected in error.message
    assert repr(value) in error.message  # the offending value is shown


def test_a_batch_axis_that_is_not_the_first_is_refused(tmp_path: Path) -> None:
    """Samples are stacked along the first axis: a time-major input ([time, batch, features], nn.LSTM's default)
    would be fed time steps as samples, so it is a user error naming the input; a fixed first axis before another
    dynamic axis (a fixed batch of 1 with a dynamic sequence length) is not."""
    error = error_of(write(tmp_path, with_key(["model", "inputs", 0], "shape", [8, "batch", 8])))
    assert "[model.inputs[0]] shape" in error.message and "batch axis 'batch' is at position 1" in error.message
    assert "transpose" in error.message
    spec = load_recipe(write(tmp_path, with_key(["model", "inputs", 0], "shape", [1, "seq", 40]))).model.inputs[0]
    assert spec.shape == [1, "seq", 40]


def test_bad_value_of_a_union_typed_key_names_the_key_in_its_table(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, with_key(["quantize"], "reduce_range", "sometimes")))
    assert "[quantize] reduce_range" in error.message


def test_every_gate_and_timing_option_is_finite_and_in_its_range(tmp_path: Path) -> None:
    from deploytool.recipe import GatesConfig, VerifyConfig

    path = write(tmp_path, FULL)
    for table, model in (("verify.gates", GatesConfig), ("verify", VerifyConfig)):
        floats = [k for k, f in model.model_fields.items() if float in getattr(f.annotation, "__args__", (f.annotation,))]
        assert floats, table
        for key in floats:  # inf would never end a timing loop; nan compares false with every threshold
            for bad in ("inf", "-inf", "nan"):
                error = error_of(path, [f"{table}.{key}={bad}"])
                assert f"[{table}] {key}" in error.message, (key, bad, error.message)
    for key, (low, high) in {"min_cosine": (-1.0, 1.0), "min_top1_agreement": (0.0, 1.0), "max_accuracy_drop": (0.0, 1.0)}.items():
        for bad in (low - 0.5, high + 0.5):
            assert f"[verify.gates] {key}" in error_of(path, [f"verify.gates.{key}={bad}"]).message
        for good in (low, high):
            assert getattr(load_recipe(path, [f"verify.gates.{key}={good}"]).verify.gates, key) == good  # type: ignore[union-attr]
    for key in ("min_speedup", "max_size_ratio", "min_speedup_vs_fp32"):
        assert f"[verify.gates] {key}" in error_of(path, [f"verify.gates.{key}=0"]).message


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff".encode() + tomli_w.dumps(FULL).encode())
    assert load_recipe(path).name == "full"


def test_missing_required_table_and_key(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, {"name": "x"}))
    assert "missing key 'model' in the top level" in error.message
    model = {k: v for k, v in FULL["model"].items() if k != "outputs"}
    error = error_of(write(tmp_path, {"name": "x", "model": model}))
    assert "missing key 'outputs' in [model]" in error.message


def test_base_dir_is_not_a_recipe_key(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, {**FULL, "base_dir": "/elsewhere"}))
    assert "base_dir" in error.message


def test_missing_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    error = error_of(tmp_path / "nope.toml")
    assert "recipe not found" in error.message and "nope.toml" in error.message
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model\n')
    error = error_of(bad)
    assert "invalid TOML" in error.message and str(bad) in error.message
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    error = error_of(binary)
    assert str(binary) in error.message


# --set overrides


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("verify.gates.min_cosine=0.995", ["verify", "gates", "min_cosine"], 0.995),
        ("export.opset=17", ["export", "opset"], 17),
        ("quantize.per_channel=false", ["quantize", "per_channel"], False),
        ('name="quoted name"', ["name"], "quoted name"),
        ("name=bare words", ["name"], "bare words"),  # not TOML: kept as a string
        ("data.calibration=data/calib.npz", ["data", "calibration"], "data/calib.npz"),
        ('quantize.exclude_nodes=["a", "b"]', ["quantize", "exclude_nodes"], ["a", "b"]),
        ("verify.gates={ min_cosine = 0.9 }", ["verify", "gates"], {"min_cosine": 0.9}),
        (" export.opset = 16 ", ["export", "opset"], 16),
        ("name=a=b", ["name"], "a=b"),
    ],
)
def test_parse_override(text: str, keys: list[str], value: Any) -> None:
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["no-equals-sign", "=1", "verify..runs=3", "verify.=3"])
def test_malformed_override_is_a_user_error(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_override(text)
    assert repr(text) in info.value.message and "TABLE.KEY=VALUE" in info.value.message
    assert info.value.hint is not None


def test_apply_overrides_creates_nested_tables() -> None:
    data: dict[str, Any] = {"name": "x"}
    apply_overrides(data, ["verify.gates.min_cosine=0.9", "verify.threads=4", "name=y"])
    assert data == {"name": "y", "verify": {"gates": {"min_cosine": 0.9}, "threads": 4}}


def test_override_through_a_value_is_a_user_error() -> None:
    with pytest.raises(UserError) as info:
        apply_overrides({"name": "x"}, ["name.first=1"])
    assert "'name' is a value, not a table" in info.value.message


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    recipe = load_recipe(path, ["verify.gates.min_cosine=0.995", "quantize.mode=dynamic", "export.opset=17", "verify.runs=7"])
    assert recipe.verify is not None and recipe.verify.gates.min_cosine == 0.995 and recipe.verify.runs == 7
    assert recipe.quantize is not None and recipe.quantize.mode == "dynamic"
    assert recipe.export.opset == 17
    # an override may add a table the file does not have
    recipe = load_recipe(write(tmp_path, {"name": "m", "model": FULL["model"]}), ["simplify.enabled=false"])
    assert recipe.simplify is not None and recipe.simplify.enabled is False
    error = error_of(path, ["quantize.per_chanel=false"])
    assert "unknown key 'per_chanel' in [quantize]" in error.message and error.hint == "did you mean 'per_channel'?"
    error = error_of(path, ["export.opset=lots"])
    assert "[export] opset" in error.message and "'lots'" in error.message


def test_to_toml_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(DIGITS_RECIPE)
    again = tmp_path / "again.toml"
    again.write_text(recipe.to_toml())
    reloaded = load_recipe(again)
    assert reloaded.model_dump() == recipe.model_dump()
    assert "base_dir" not in recipe.to_toml()


def test_schema_forbids_extra_keys_everywhere() -> None:
    schema = Recipe.model_json_schema()
    assert schema.get("additionalProperties") is False
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


def test_quantize_targets_threads_and_calibration_batch_are_resolved_from_the_other_tables_once() -> None:
    """What the quantize stage aims at is resolved in the recipe (so --dry-run shows it): the gates verify applies."""
    base = {"name": "r", "model": {"factory": "m:f", "inputs": [{"name": "x", "shape": ["batch", 4]}], "outputs": ["y"]},
            "quantize": {}}
    defaults = Recipe.model_validate({**base, "verify": {"threads": 3}}).quantize
    assert defaults is not None
    assert (defaults.min_cosine, defaults.min_top1_agreement, defaults.min_snr_db, defaults.min_speedup) == (0.99, 0.99, 15.0, 1.0)
    assert (defaults.max_accuracy_drop, defaults.threads, defaults.calibration_batch) == (None, 3, 16)
    gated = Recipe.model_validate({**base, "data": {"task": "embedding"}, "export": {"dynamic_batch": False},
                                   "verify": {"gates": {"min_cosine": 0.95, "max_accuracy_drop": 0.02, "min_snr_db": 20}}}).quantize
    assert gated is not None
    assert (gated.min_cosine, gated.max_accuracy_drop, gated.min_snr_db, gated.min_top1_agreement) == (0.95, 0.02, 20.0, None)
    assert gated.calibration_batch == 1 and gated.threads == 2
    own = Recipe.model_validate({**base, "quantize": {"min_cosine": 0.999, "threads": 1},
                                 "verify": {"default_gates": False, "gates": {"min_cosine": 0.9}}}).quantize
    assert own is not None and (own.min_cosine, own.threads, own.min_speedup, own.min_top1_agreement) == (0.999, 1, None, None)
    assert Recipe.model_validate({**base, "quantize": {"min_cosine": 0.999}}).to_toml().count("min_cosine = 0.999") == 1
