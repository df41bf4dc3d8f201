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


def test_readme_recipe_example_is_a_valid_recipe_naming_every_key() -> None:
    """The README's recipe reference validates as a recipe, and names every key of every table (as a key or in a
    comment), so a key added to the schema cannot go undocumented."""
    import tomllib

    from pydantic import BaseModel

    from deploytool.recipe import Recipe

    block = re.findall(r"```toml\n(.*?)```", README, flags=re.S)[0]
    recipe = Recipe.model_validate({**tomllib.loads(block), "base_dir": ROOT / "recipes"})
    assert recipe.quantize is not None and recipe.verify is not None and recipe.prune is not None and recipe.distill is not None

    def keys(model: type[BaseModel], prefix: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if name == "base_dir":
                continue
            found.append(prefix + name)
            kinds = (field.annotation, *getattr(field.annotation, "__args__", ()))
            if getattr(field.annotation, "__origin__", None) is list:
                continue  # a list of tables, e.g. [model] inputs: written inline
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    found += keys(kind, f"{prefix}{name}.")
        return found

    headers = re.findall(r"^\[([\w.]+)\]", block, flags=re.M)
    sections = dict(zip(["", *headers], re.split(r"^\[[\w.]+\]", block, flags=re.M)))
    missing = []
    for key in keys(Recipe, ""):
        table, _, name = key.rpartition(".")
        if table in sections and re.search(rf"\b{name}\b", sections[table]):
            continue
        if table == "" and f"[{name}]" in block:
            continue  # a table of its own
        missing.append(key)
    assert not missing, f"recipe keys not in their table of the README's recipe example: {missing}"
