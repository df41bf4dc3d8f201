"""The README's command examples run as written and succeed; every command is documented there."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploytool.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder that sees the repository's recipes and samples, so examples write nowhere else."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("recipes", "samples"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "runs").mkdir()
    return folder


def test_readme_has_examples() -> None:
    commands = readme_commands()
    assert any(c.startswith("deploytool run ") for c in commands)
    assert all(c.startswith(("deploytool ", "torchrun ")) for c in commands), commands


def test_readme_examples_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    for command in readme_commands():
        args = shlex.split(command)
        if args[0] == "torchrun":
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            run = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
            done = subprocess.run(run, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            continue
        result = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.output}"


def test_every_command_is_documented() -> None:
    for name, command in cli.commands.items():
        assert f"`{name}" in README, f"command {name} is not in the README"
        assert command.help, f"command {name} has no help"
