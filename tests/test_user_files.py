"""The user's files are never lost or overwritten, and every bad input ends cleanly.

Data-loss cases first: a folder that is not a run folder (whatever names its files have) is
never touched, --force deletes only what the previous run wrote, --out may not hold the
current folder or the run's inputs, a run folder is locked, output files of the stage
commands are checked before any work. Each of these asserts that the user's files are
byte-identical afterwards. Then: interrupts (exit 130/143, resumable), docs/ci.md run as
written, range checks, clear messages, and torch's own log lines kept out of the terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, ROOT, TINY_CNN, CliRun, TinyModel, assert_user_error, tiny_recipe_text, write_module

Cli = Callable[..., CliRun]
MARKER = ".deploytool-run.json"
# a fast run of the tiny recipe: no int8 model, no memory measurement
FAST = ("--set", "quantize.mode=none", "--set", "verify.memory=false")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder`: its sha256 (files) or 'folder'."""
    from deploytool.artifacts import sha256

    return {p.relative_to(folder).as_posix(): sha256(p) if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def assert_finished(result: CliRun) -> None:
    """The run went through to its verdict (0 passed, 1 a gate failed): no error, no crash."""
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None and "error:" not in result.stderr, result.output


def marker(out: Path) -> dict:
    return json.loads((out / MARKER).read_text(encoding="utf-8"))


@pytest.fixture
def recipe(tmp_path: Path, tiny: TinyModel) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_recipe_text(tiny), encoding="utf-8")
    return path


def fill(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return snapshot(folder)


# data loss: folders that are not run folders are never touched


def test_out_is_never_the_current_folder_nor_one_that_holds_the_inputs(
    cli: Cli, tmp_path: Path, tiny: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's worst case: `--out .` in a project folder that holds its own run.log."""
    project = tmp_path / "project"
    files = {"run.log": b"epoch 1 loss 0.3\n", "NOTES.md": b"# what I tried\n", "samples/calib.npz": (DIGITS / "calib.npz").read_bytes(),
             "samples/val.npz": (DIGITS / "val.npz").read_bytes(), "samples/tiny.pt": tiny.checkpoint.read_bytes()}
    fill(project, files)
    text = tiny_recipe_text(tiny, **{str(DIGITS / "calib.npz"): "../samples/calib.npz", str(DIGITS / "val.npz"): "../samples/val.npz",
                                     str(tiny.checkpoint): "../samples/tiny.pt"})
    (project / "recipes").mkdir()
    (project / "recipes" / "tiny.toml").write_text(text, encoding="utf-8")
    before = snapshot(tmp_path)
    monkeypatch.chdir(project)
    for force in ((), ("--force",)):
        assert_user_error(cli("run", "recipes/tiny.toml", "--out", ".", *force), "--out . is the current folder")
        assert_user_error(cli("run", "recipes/tiny.toml", "--out", "..", *force), "--out .. is the current folder or holds it")
        assert_user_error(cli("run", "recipes/tiny.toml", "--out", "recipes", *force), "--out recipes is or holds the recipe's folder")
        assert_user_error(cli("run", "recipes/tiny.toml", "--out", "samples", *force), "--out samples is or holds [model] checkpoint")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("results", {"run.log": b"python train.py output\n", "experiment.csv": b"lr,acc\n0.1,0.9\n", "best.pt": b"\x80\x02weights"}),
        ("analysis", {"report.json": b'{"passed": true, "from": "another tool"}', "data.parquet": b"PAR1 columns PAR1"}),
        ("notes", {"recipe.resolved.toml": b"name = 'mine'\n", ".cache/keep.txt": b"not deploytool's cache"}),
    ],
)
def test_a_folder_without_the_marker_is_refused_with_or_without_force(
    cli: Cli, tmp_path: Path, recipe: Path, name: str, files: dict[str, bytes]
) -> None:
    """Files named like a run's (run.log, report.json, ...) do not make a run folder: only the marker does."""
    out = tmp_path / name
    before = fill(out, files)
    for force in ((), ("--force",)):
        assert_user_error(cli("run", recipe, "--out", out, *force, *FAST), f"{out} is not empty and holds no deploytool run")
        assert snapshot(out) == before


def test_force_deletes_only_what_the_previous_run_wrote_and_a_failed_attempt_resumes(
    cli: Cli, tmp_path: Path, recipe: Path
) -> None:
    out = tmp_path / "run"
    assert_finished(cli("run", recipe, "--out", out, *FAST))
    first = marker(out)
    assert first["tool"] == "deploytool" and first["format"] == 1 and first["state"] == "finished"
    assert {"model.onnx", "report.json", "report.md", "report.html", "golden.npz", "run.log", "recipe.resolved.toml",
            ".cache"} <= set(first["files"])
    mine = fill(out, {"notes.txt": b"the user's own notes", "mine/data.csv": b"1,2,3\n"})
    mine = {k: v for k, v in mine.items() if k in ("notes.txt", "mine", "mine/data.csv")}

    # a finished run is not replaced without --force: nothing changes
    before = snapshot(out)
    assert_user_error(cli("run", recipe, "--out", out, *FAST), "already holds results", "--force")
    assert snapshot(out) == before

    # --force with a problem found mid-run: the old results are gone (no stale passing report), the user's files stay
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(2000))
    failed = cli("run", recipe, "--out", out, "--force", "--set", f"data.validation={json.dumps(str(garbage))}", *FAST)
    assert_user_error(failed, f"cannot read data file {garbage}: it is not a valid .npz file")
    assert "allow_pickle" not in failed.output
    assert not (out / "report.json").exists() and not (out / "model.onnx").exists()
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    assert marker(out)["state"] == "failed" and "notes.txt" not in marker(out)["files"]

    # the failed attempt is resumed by the same command, without --force, from the kept stage cache
    resumed = cli("run", recipe, "--out", out, *FAST)
    assert_finished(resumed)
    stages = {s["name"]: s["status"] for s in resumed.report(out)["stages"]}
    assert stages["export"] == "cached" and stages["simplify"] == "cached"
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    assert marker(out)["state"] == "finished" and not list(out.rglob("*.partial"))


def _without_dac_override() -> list[str]:
    """A command prefix under which root, too, is bound by file permissions (or [] when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_read_only_folders_are_refused_before_anything_is_deleted_or_computed(
    cli: Cli, tmp_path: Path, recipe: Path, tiny: TinyModel
) -> None:
    out = tmp_path / "run"
    assert_finished(cli("run", recipe, "--out", out, *FAST))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    prefix = _without_dac_override()
    before = snapshot(tmp_path)
    out.chmod(0o555)
    readonly.chmod(0o555)
    try:
        forced = subprocess.run([*prefix, sys.executable, "-m", "deploytool", "run", str(recipe), "--out", str(out), "--force", *FAST],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
        quantized = subprocess.run([*prefix, sys.executable, "-m", "deploytool", "quantize", str(tiny.onnx), "--calibration",
                                    str(DIGITS / "calib.npz"), "-o", str(readonly / "x.int8.onnx")],
                                   capture_output=True, text=True, cwd=tmp_path, timeout=300)
    finally:
        out.chmod(0o755)
        readonly.chmod(0o755)
    assert forced.returncode == 2, forced.stderr
    assert f"error: cannot write to run folder {out}" in forced.stderr and "Traceback" not in forced.stderr
    assert quantized.returncode == 2, quantized.stderr
    assert f"error: cannot write to output folder {readonly}" in quantized.stderr
    assert ".partial" not in quantized.stderr + forced.stderr
    assert snapshot(tmp_path) == before  # the finished run, its passing report included, is as it was


@pytest.mark.parametrize("command", ["export", "prune", "distill", "quantize"])
def test_stage_commands_check_their_output_before_any_work(cli: Cli, tmp_path: Path, tiny: TinyModel, command: str) -> None:
    model = ["--factory", tiny.factory, "--input", "image:batch,1,8,8", "--output-name", "logits"]
    args = {
        "export": ["export", tiny.checkpoint, *model],
        "prune": ["prune", tiny.checkpoint, *model, "--data", DIGITS / "calib.npz"],
        "distill": ["distill", tiny.checkpoint, *model, "--train", DIGITS / "calib.npz", "--epochs", "1"],
        "quantize": ["quantize", tiny.onnx, "--calibration", DIGITS / "calib.npz"],
    }[command]
    folder = tmp_path / "outputs"
    before = fill(folder, {"existing.bin": b"keep me", "sub/other.bin": b"me too"})
    assert_user_error(cli(*args, "-o", folder / "sub"), f"{folder / 'sub'} is a folder")
    assert_user_error(cli(*args, "-o", folder / "sub", "--force"), f"{folder / 'sub'} is a folder")
    assert_user_error(cli(*args, "-o", folder / "existing.bin"), f"{folder / 'existing.bin'} already exists", "--force")
    assert_user_error(cli(*args, "-o", folder / "missing" / "x.bin"), f"output folder {folder / 'missing'} does not exist")
    assert_user_error(cli(*args, "-o", folder / "existing.bin" / "x.bin"), f"output folder {folder / 'existing.bin'} is not a folder")
    assert snapshot(folder) == before


def test_output_check_needs_free_space(tmp_path: Path) -> None:
    from deploytool.commands import check_output
    from deploytool.errors import UserError

    with pytest.raises(UserError) as info:
        check_output(tmp_path / "huge.onnx", False, size_hint=1 << 62)
    assert f"not enough free space in {tmp_path}" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_write_names_the_file_not_its_temporary(tmp_path: Path) -> None:
    from deploytool.artifacts import write_text

    target = tmp_path / "model.onnx"
    target.mkdir()  # os.replace onto a folder fails
    with pytest.raises(OSError) as info:
        write_text(target, "x")
    assert str(target) in str(info.value) and ".partial" not in str(info.value)
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


# interrupts and concurrent runs


def _start(args: list[str], cwd: Path, busy: Path) -> subprocess.Popen:
    """A run in a process of its own, slow in its verify stage (it writes `busy` as its slow forward begins); SIGINT is
    not ignored in it, whatever the parent does."""
    return subprocess.Popen([sys.executable, "-m", "deploytool", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SLOW_FORWARD": "60", "SLOW_BUSY": str(busy)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(busy: Path, process: subprocess.Popen) -> None:
    """Until the run is inside its verify stage's slow forward (a signal that lands while a stage still imports its
    modules tests the import, not the verification)."""
    deadline = time.monotonic() + 180
    while not busy.is_file():
        assert process.poll() is None, f"the run ended before it could be interrupted: {process.communicate()}"
        assert time.monotonic() < deadline, f"the run never reached its slow verify forward ({busy})"
        time.sleep(0.05)


# the tiny CNN, slowed down on the batches the verify stage runs when SLOW_FORWARD is set: a run that is
# certain to be busy in its verify stage (the case: Ctrl-C during verification)
SLOW_CNN = TINY_CNN + """
import os
import time


class SlowCNN(TinyCNN):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if os.environ.get("SLOW_FORWARD") and image.shape[0] > 2 and not torch.jit.is_tracing():
            if os.environ.get("SLOW_BUSY"):
                open(os.environ["SLOW_BUSY"], "w").close()
            time.sleep(float(os.environ["SLOW_FORWARD"]))
        return super().forward(image)


def slow() -> nn.Module:
    torch.manual_seed(0)
    return SlowCNN()
"""


def test_sigterm_and_sigint_exit_143_and_130_and_the_run_resumes(cli: Cli, tmp_path: Path, tiny: TinyModel) -> None:
    slow = write_module(tmp_path, "slow_cnn", SLOW_CNN)
    recipe = tmp_path / "slow.toml"
    recipe.write_text(tiny_recipe_text(tiny, **{tiny.factory: f"{slow}:slow"}), encoding="utf-8")
    out = tmp_path / "run"
    args = ["run", str(recipe), "--out", str(out), *FAST]

    first = _start(args, tmp_path, tmp_path / "busy-1")
    _wait_for(tmp_path / "busy-1", first)
    assert (out / "run.log").read_text().count("stage verify: start") == 1
    # meanwhile, a second run into the same folder is refused and names the holder; it changes nothing
    before = snapshot(out)
    assert_user_error(cli(*args), f"run folder {out} is in use by another deploytool run (pid {first.pid})")
    assert snapshot(out) == before
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM)") and "Traceback" not in stderr
    assert marker(out)["state"] == "interrupted"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and any("interrupted" in note for note in report["notes"])

    (out / "notes.txt").write_text("written while the run was stopped")  # kept by the resumed runs

    second = _start(args, tmp_path, tmp_path / "busy-2")  # the same command resumes it
    _wait_for(tmp_path / "busy-2", second)
    assert (out / "run.log").read_text().count("stage verify: start") == 2
    second.send_signal(signal.SIGINT)
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGINT)") and "Aborted" not in stderr
    assert "Traceback" not in stderr and marker(out)["state"] == "interrupted"
    assert json.loads((out / "report.json").read_text())["passed"] is False

    third = subprocess.run([sys.executable, "-m", "deploytool", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "SLOW_FORWARD"})
    assert third.returncode in (0, 1), third.stderr
    stages = {s["name"]: s["status"] for s in json.loads((out / "report.json").read_text())["stages"]}
    assert stages["export"] == "cached" and stages["simplify"] == "cached" and stages["verify"] == "done"
    assert marker(out)["state"] == "finished" and "notes.txt" not in marker(out)["files"]
    assert (out / "notes.txt").read_text() == "written while the run was stopped"


# docs/ci.md, run as written


def ci_commands() -> list[str]:
    """The deploytool commands of docs/ci.md's workflow steps (`run:` lines, folded `run: >` blocks too)."""
    commands: list[str] = []
    for block in re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "ci.md").read_text(encoding="utf-8"), flags=re.S):
        lines = block.splitlines()
        index = 0
        while index < len(lines):
            match = re.match(r"^(\s*)(?:- )?run:\s*(.*)$", lines[index])
            index += 1
            if not match:
                continue
            indent, value = len(match.group(1)), match.group(2).strip()
            if value in (">", ">-", "|", "|-"):
                body = []
                while index < len(lines) and (not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent):
                    body.append(lines[index].strip())
                    index += 1
                parts = [" ".join(b for b in body if b)] if value.startswith(">") else [b for b in body if b]
            else:
                parts = [value]
            commands += [c for c in parts if c.startswith("deploytool ")]
    return commands


def test_docs_ci_example_runs_as_written(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone: recipes/ and samples/ but no runs/ folder; the run's --junit lies inside its --out."""
    commands = ci_commands()
    assert [c.split()[1] for c in commands] == ["run", "verify"], commands
    for name in ("recipes", "samples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)

    result = cli(*shlex.split(commands[0])[1:])
    assert_finished(result)
    junit = shlex.split(commands[0])[shlex.split(commands[0]).index("--junit") + 1]
    assert Path(junit).is_file() and "<testsuite" in Path(junit).read_text()
    for name in ("report.html", "report.md", "report.json"):  # what the workflow uploads
        assert (Path("runs/pr") / name).is_file(), name
    assert junit.removeprefix("runs/pr/") in marker(Path("runs/pr"))["files"]

    # the second example gates a committed golden.npz and the shipped int8 model
    for name in ("golden.npz", "model.int8.onnx"):
        shutil.copy(Path("runs/pr") / name, name)
    gated = cli(*shlex.split(commands[1])[1:])
    assert gated.exit_code in (0, 1) and "error:" not in gated.stderr, gated.output
    assert Path("gates.xml").is_file()


def test_junit_outside_the_run_folder_needs_an_existing_folder(cli: Cli, tmp_path: Path, recipe: Path) -> None:
    result = cli("run", recipe, "--out", tmp_path / "run", "--junit", tmp_path / "ci" / "gates.xml", *FAST)
    assert_user_error(result, f"--junit: folder {tmp_path / 'ci'} does not exist")
    assert not (tmp_path / "run").exists()


# range checks


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("verify.gates.min_cosine=1.5", "[verify.gates] min_cosine: Input should be less than or equal to 1"),
        ("verify.gates.min_cosine=-1.5", "[verify.gates] min_cosine: Input should be greater than or equal to -1"),
        ("verify.gates.min_top1_agreement=1.2", "[verify.gates] min_top1_agreement"),
        ("verify.gates.max_accuracy_drop=-0.1", "[verify.gates] max_accuracy_drop"),
        ("verify.gates.max_accuracy_drop=nan", "[verify.gates] max_accuracy_drop"),
        ("verify.gates.min_speedup=0", "[verify.gates] min_speedup"),
        ("verify.gates.min_speedup=inf", "[verify.gates] min_speedup: Input should be a finite number"),
        ("verify.gates.max_size_ratio=inf", "[verify.gates] max_size_ratio: Input should be a finite number"),
        ("verify.gates.min_speedup_vs_fp32=-1", "[verify.gates] min_speedup_vs_fp32"),
        ("verify.gates.atol=-1e-3", "[verify.gates] atol"),
        ("verify.gates.rtol=nan", "[verify.gates] rtol: Input should be a finite number"),
        ("verify.min_seconds=inf", "[verify] min_seconds: Input should be a finite number"),
        ("verify.min_seconds=-1", "[verify] min_seconds"),
        ("quantize.min_cosine=2", "[quantize] min_cosine"),
    ],
)
def test_gates_and_timings_out_of_range_are_user_errors(cli: Cli, tmp_path: Path, recipe: Path, setting: str, fragment: str) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    assert_user_error(cli("run", recipe, "--out", out, "--set", setting), fragment)
    assert time.monotonic() - started < 30 and not out.exists()


# clear, true messages


def test_random_bytes_as_a_checkpoint_is_called_corrupt_not_unsafe(cli: Cli, tmp_path: Path, tiny: TinyModel) -> None:
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_recipe_text(tiny, **{str(tiny.checkpoint): str(garbage)}), encoding="utf-8")
    result = cli("run", recipe, "--out", tmp_path / "run", *FAST)
    assert_user_error(result, f"cannot read checkpoint {garbage}: it is not a valid PyTorch checkpoint", "torch.save")
    assert "trust_checkpoint" not in result.output and "pickled objects" not in result.output
    assert not (tmp_path / "run").exists()


def test_random_bytes_as_data_is_called_an_invalid_npz(cli: Cli, tmp_path: Path, tiny: TinyModel) -> None:
    garbage = tmp_path / "calib.npz"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    result = cli("quantize", tiny.onnx, "--calibration", garbage, "-o", tmp_path / "x.onnx")
    assert_user_error(result, f"cannot read data file {garbage}: it is not a valid .npz file")
    assert "allow_pickle" not in result.output and not (tmp_path / "x.onnx").exists()


def test_a_missing_callable_names_the_file_and_what_it_defines(cli: Cli, tmp_path: Path, tiny: TinyModel) -> None:
    factory_file = tiny.factory.rpartition(":")[0]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_recipe_text(tiny, **{tiny.factory: f"{factory_file}:biuld"}), encoding="utf-8")
    result = cli("run", recipe, "--out", tmp_path / "run", *FAST)
    assert_user_error(result, f"'biuld' is not a callable in {factory_file}", "defines: TinyCNN, build, wide")
    assert "deploytool_user_" not in result.output


def test_a_recipe_with_a_byte_order_mark_is_read(cli: Cli, tmp_path: Path, tiny: TinyModel) -> None:
    recipe = tmp_path / "bom.toml"
    recipe.write_bytes("\ufeff".encode() + tiny_recipe_text(tiny).encode())
    result = cli("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert 'name = "tiny"' in result.stdout


FAILS_TO_EXPORT = """
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, image):
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return self.fc(image)  # what the exporters see has the wrong shape: both of them fail
        return self.fc(image.flatten(1))


def build():
    return M()
"""


def test_torch_log_lines_of_a_failed_export_go_to_run_log(cli: Cli, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write_module(tmp_path, "fails_to_export", FAILS_TO_EXPORT)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'name = "broken"\n[model]\nfactory = "{path}:build"\n'
                      'inputs = [{ name = "image", shape = ["batch", 1, 8, 8], dtype = "float32" }]\noutputs = ["logits"]\n',
                      encoding="utf-8")
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    terminal = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 3, result.output
    assert "error: export stage failed" in result.stderr and "hint: the details are in run.log" in result.stderr
    assert "always_classified" not in terminal and not re.search(r"^[EWI]\d{4} ", terminal, flags=re.M), terminal
    log = (out / "run.log").read_text(encoding="utf-8")
    assert "always_classified is unsupported" in log and "torchscript" in log
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    failed = [s for s in report["stages"] if s["status"] == "failed"]
    assert report["passed"] is False and [s["name"] for s in failed] == ["export"]
    assert failed[0]["error"].startswith("export stage failed: the dynamo exporter failed")  # why, without run.log
    assert json.loads((out / "report.json").read_text())["passed"] is False

    # each exporter on its own (through the library), then the stage command (both, one after the other)
    from conftest import image_specs

    from deploytool.data import random_dataset
    from deploytool.errors import StageError
    from deploytool.recipe import ExportConfig
    from deploytool.stages.export import export_onnx
    from deploytool.stages.load import load_model

    model = load_model(f"{path}:build", None, tmp_path)
    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(StageError):
            export_onnx(model, image_specs(), ["logits"], ExportConfig(exporter=exporter), random_dataset(image_specs(), 2),
                        tmp_path / f"{exporter}.onnx")
        captured = "".join(capfd.readouterr())
        assert "always_classified" not in captured and "Traceback" not in captured, captured
        assert not re.search(r"^[EWI]\d{4} ", captured, flags=re.M), captured
    result = cli("export", "--factory", f"{path}:build", "--input", "image:batch,1,8,8", "--output-name", "logits",
                 "-o", tmp_path / "x.onnx")
    terminal = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 3 and result.stderr.count("error:") == 1, result.output
    assert "always_classified" not in terminal and not re.search(r"^[EWI]\d{4} ", terminal, flags=re.M), terminal
