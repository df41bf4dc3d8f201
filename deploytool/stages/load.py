"""load: build the model from its factory and load a state_dict safely."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploytool.checkpoint import (
    apply_layer_sizes,
    load_weights,
    read_layer_sizes,
    read_state_dict,
    strip_wrapper_prefixes,
)
from deploytool.errors import UserError
from deploytool.factory import resolve_factory

log = logging.getLogger("deploytool")

if TYPE_CHECKING:
    import torch


def _unknown_arguments(build: Any, args: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(keyword arguments `build` has no parameter for, the parameters it has); none unknown where it takes
    **kwargs or its signature cannot be read."""
    import inspect

    try:
        parameters = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        return [], []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return [], []
    takes = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return [name for name in args if name not in takes], takes


def load_model(factory: str, checkpoint: Path | None, base_dir: Path, trust: bool = False,
               factory_args: Mapping[str, Any] | None = None, notes: list[str] | None = None) -> torch.nn.Module:
    """The factory's model (called with `factory_args` as keyword arguments) with the checkpoint's weights.

    Checkpoints saved from wrappers (DDP's 'module.' prefix, a Lightning 'state_dict' with 'model.' keys)
    load too; what was unwrapped or stripped is appended to `notes`."""
    import torch

    build = resolve_factory(factory, base_dir)
    args = dict(factory_args or {})
    unknown, takes = _unknown_arguments(build, args)
    if unknown:
        raise UserError(f"model factory '{factory}' does not take the factory argument(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(takes) or 'no arguments'}", "check [model] factory_args / --factory-arg")
    try:
        model = build(**args)
    except TypeError as exc:
        given = f" (called with {', '.join(sorted(args))})" if args else ""
        raise UserError(f"model factory '{factory}' raised TypeError{given}: {exc}",
                        "check [model] factory_args / --factory-arg" if args else None) from None
    except Exception as exc:
        raise UserError(f"model factory '{factory}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        found: list[str] = []
        state = read_state_dict(checkpoint, trust, found)
        state = strip_wrapper_prefixes(state, set(model.state_dict()), checkpoint.name, found)
        for note in found:
            log.info("%s", note)
        if notes is not None:
            notes.extend(found)
        sizes = read_layer_sizes(checkpoint)
        if sizes is not None:  # a pruned model: resize the factory's layers to the saved widths first
            apply_layer_sizes(model, sizes, dict(state))
        load_weights(model, state, str(checkpoint))
    return model.eval()
