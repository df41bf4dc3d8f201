"""Recipes that start from an ONNX file ([model] onnx), and the stand-alone commands run through the pipeline: their
run folder (temporary, or kept with --run-dir and reused), their dry-run recipes, and what a failure leaves."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from conftest import DIGITS, CliRun, TinyModel, assert_user_error, write_module

Cli = Callable[..., CliRun]


def onnx_recipe(folder: Path, model: Path, extra: str = "") -> Path:
    path = folder / "recipe.toml"
    path.write_text(f'''
name = "from-onnx"

[model]
onnx = "{model}"
{extra}

[data]
calibration = "{DIGITS / 'calib.npz'}"
validation = "{DIGITS / 'val.npz'}"
task = "classification"

[simplify]
[quantize]

[verify]
threads = 1
warmup = 1
runs = 5
default_gates = false

[verify.gates]
min_cosine = 0.5
''', encoding="utf-8")
    return path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder where commands make their temporary run folders, so a test sees what they leave behind."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_recipe_starting_from_an_onnx_file_simplifies_quantizes_and_verifies_against_it(
        cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("run", onnx_recipe(tmp_path, tiny.onnx), "--out", out)
    assert result.exit_code == 0, result.output
    report = result.report(out)
    assert report["models"]["reference"]["path"] == str(tiny.onnx)
    assert report["models"]["reference"]["params"] > 0
    assert {s["name"]: s["status"] for s in report["stages"]} == {
        "load": "done", "prune": "skipped", "distill": "skipped", "export": "done", "simplify": "done", "quantize": "done",
        "verify": "done"}
    assert report["export"]["source"] == str(tiny.onnx)
    fp32 = {g["name"]: g for g in report["gates"] if g["model"] == "fp32"}
    assert fp32["min_cosine"]["passed"]
    assert report["metrics"]["fp32"]["cosine_mean"] > 0.9999  # simplifying the file changed nothing
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file() and not (out / "model.exported.onnx").exists()
    assert tiny.onnx.is_file()  # the user's file is copied, never moved or deleted
    resolved = (out / "recipe.resolved.toml").read_text()
    assert 'name = "image"' in resolved and '"logits"' in resolved  # inputs and outputs read from the file


def test_the_dry_run_shows_the_inputs_and_the_calibration_batch_of_the_file(cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.onnx"
    proto = onnx.load(str(tiny.onnx))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(fixed))
    for model, batch in ((tiny.onnx, 16), (fixed, 1)):
        result = cli("run", onnx_recipe(tmp_path, model), "--dry-run")
        assert result.exit_code == 0, result.output
        assert f"calibration_batch = {batch}\n" in result.stdout and 'name = "image"' in result.stdout
        assert "trust_checkpoint" not in result.stdout and "factory_args" not in result.stdout


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ('checkpoint = "x.pt"', ["[model]", "checkpoint", "onnx model has its weights in the file"]),
        ('factory = "m.py:build"', ["[model]", "either factory", "or onnx"]),
        ('inputs = [{ name = "pixels", shape = ["batch", 1, 8, 8] }]', ["[model] inputs ['pixels']", "['image']"]),
        ('outputs = ["scores"]', ["[model] outputs ['scores']", "['logits']"]),
    ],
)
def test_an_onnx_model_with_keys_of_a_pytorch_one_or_other_inputs_is_refused(
        cli: Cli, tiny: TinyModel, tmp_path: Path, extra: str, fragments: list[str]) -> None:
    out = tmp_path / "run"
    assert_user_error(cli("run", onnx_recipe(tmp_path, tiny.onnx, extra), "--out", out), *fragments)
    assert not out.exists()


def test_pruning_an_onnx_model_and_a_missing_file_are_user_errors(cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    recipe = onnx_recipe(tmp_path, tiny.onnx)
    recipe.write_text(recipe.read_text() + "\n[prune]\nratio = 0.5\n")
    assert_user_error(cli("run", recipe, "--out", tmp_path / "run"), "[prune] changes a PyTorch model")
    assert_user_error(cli("run", onnx_recipe(tmp_path, tmp_path / "missing.onnx"), "--out", tmp_path / "run"),
                      "ONNX model not found", "missing.onnx")


def test_verify_takes_a_recipe_of_an_onnx_model_as_its_reference(cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    result = cli("verify", onnx_recipe(tmp_path, tiny.onnx), tiny.onnx, "--runs", "3", "--warmup", "0", "--no-memory",
                 "--json", tmp_path / "verify.json")
    assert result.exit_code == 0, result.output
    assert "from-onnx (tiny.onnx)" in (tmp_path / "verify.json").read_text()


def test_a_command_with_a_run_dir_keeps_its_run_and_reuses_it(cli: Cli, tiny: TinyModel, tmp_path: Path, private_tmp: Path) -> None:
    run_dir, out = tmp_path / "quantize-run", tmp_path / "tiny.int8.onnx"
    args = ("quantize", tiny.onnx, "--calibration", DIGITS / "calib.npz", "-o", out, "--run-dir", run_dir)
    first = cli(*args)
    assert first.exit_code == 0, first.output
    for name in ("run.log", "report.json", "recipe.resolved.toml", "model.int8.onnx"):
        assert (run_dir / name).is_file(), name
    assert out.read_bytes() == (run_dir / "model.int8.onnx").read_bytes()
    second = cli(*args, "--force")
    assert second.exit_code == 0, second.output
    stages = {s["name"]: s["status"] for s in second.report(run_dir)["stages"]}
    assert stages == {"load": "done", "export": "done", "quantize": "cached"}
    assert out.read_bytes() == (run_dir / "model.int8.onnx").read_bytes()
    assert not list(private_tmp.iterdir())  # nothing temporary was made


def test_a_command_without_a_run_dir_leaves_nothing_behind(cli: Cli, tiny: TinyModel, tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "tiny.onnx"
    result = cli("simplify", tiny.onnx, "-o", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and onnx.load(str(out)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system-tmp", "tiny.onnx"]
    assert not list(private_tmp.iterdir())
    # a user error in a stage (data without the model's input): nothing is written, nothing is left
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, pixels=np.zeros((4, 1, 8, 8), np.float32))
    assert_user_error(cli("simplify", tiny.onnx, "-o", tmp_path / "other.onnx", "--data", bad), "image")
    assert not (tmp_path / "other.onnx").exists() and not list(private_tmp.iterdir())


def test_a_stage_failure_in_a_command_keeps_its_run_log_and_names_it(cli: Cli, tmp_path: Path, private_tmp: Path,
                                                                      restore_sys_path: None) -> None:
    source = write_module(tmp_path, "broken_model", '''
import torch


class Broken(torch.nn.Module):
    def forward(self, x):  # runs in PyTorch, fails under every exporter
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            raise RuntimeError("this forward always fails")
        return x * 2


def build():
    return Broken()
''')
    out = tmp_path / "broken.onnx"
    result = cli("export", "--factory", f"{source}:build", "--input", "x:batch,4", "--output-name", "y", "-o", out)
    assert result.exit_code == 3, result.output
    assert not out.exists()
    logs = list(private_tmp.glob("deploytool-export-*/run.log"))
    assert len(logs) == 1 and f"the traceback is in {logs[0]}" in result.stderr
    assert "this forward always fails" in logs[0].read_text()


def test_the_dry_run_of_a_command_on_an_onnx_file_is_a_recipe_run_accepts(cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    shown = cli("quantize", tiny.onnx, "--calibration", DIGITS / "calib.npz", "-o", tmp_path / "q.onnx", "--dry-run")
    assert shown.exit_code == 0, shown.output
    recipe = tmp_path / "quantize.toml"
    recipe.write_text(shown.stdout, encoding="utf-8")
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.int8.onnx").is_file() and not (tmp_path / "q.onnx").exists()
