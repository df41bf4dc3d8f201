"""Option sets several commands share: a model described without a recipe, what a command that writes one file
through the pipeline takes, and checks of option values click does not make itself."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _apply(func: Any, options: list[Callable[[Any], Any]]) -> Any:
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func: Any) -> Any:
    """CHECKPOINT plus --factory, --factory-arg, --input, --output-name and --trust-checkpoint: a model described
    without a recipe, handed to the command as one `model` argument (a deploytool.commands.ModelOptions)."""

    @functools.wraps(func)
    def command(checkpoint: Path | None, factory: str, factory_args: tuple[str, ...], inputs: tuple[str, ...],
                outputs: tuple[str, ...], trust_checkpoint: bool, **kwargs: Any) -> Any:
        from deploytool.commands import ModelOptions

        return func(ModelOptions(checkpoint, factory, factory_args, inputs, outputs, trust_checkpoint), **kwargs)

    return _apply(command, [
        click.argument("checkpoint", required=False, type=click.Path(path_type=Path)),
        click.option("--factory", required=True, help="module:callable or path/to/file.py:callable building the model."),
        click.option("--factory-arg", "factory_args", multiple=True, metavar="KEY=VALUE",
                     help="Keyword argument for the factory, the value in TOML (depth=18, name=\"x\", sizes=[1,2]); repeatable."),
        click.option("--input", "inputs", required=True, multiple=True, metavar="NAME:DIMS[:DTYPE]",
                     help="Model input, e.g. image:batch,1,8,8:float32; repeatable."),
        click.option("--output-name", "outputs", required=True, multiple=True, help="Name of an output, in order; repeatable."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow a checkpoint with pickled objects (a full module). Unpickling can run code: only for files you trust."),
    ])


def command_options(func: Any) -> Any:
    """--run-dir, --force and --dry-run: what every command that writes one file through the pipeline takes."""
    return _apply(func, [
        click.option("--run-dir", type=click.Path(path_type=Path),
                     help="Keep the command's run folder here (run.log, report, resolved recipe, stage cache); "
                          "a rerun with the same folder reuses finished stages."),
        click.option("--force", is_flag=True, help="Overwrite the output file."),
        click.option("--dry-run", is_flag=True, help="Print the recipe this command runs, as TOML, and exit."),
    ])


def seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A click callback: a finite number of seconds, at least 0."""
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a finite number of seconds >= 0")
    return value
