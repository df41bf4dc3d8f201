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


def load_model(factory: str, checkpoint: Path | None, base_dir: Path, trust: bool = False,
               factory_args: Mapping[str, Any] | None = None, notes: list[str] | None = None) -> torch.nn.Module:
    """The factory's model (called with `factory_args` as keyword arguments) with the checkpoint's weights.

    Checkpoints saved from wrappers (DDP's 'module.' prefix, a Lightning 'state_dict' with 'model.' keys)
    load too; what was unwrapped or stripped is appended to `notes`."""
    import torch

    build = resolve_factory(factory, base_dir)
    args = dict(factory_args or {})
    try:
        model = build(**args)
    except TypeError as exc:
        if args:
            raise UserError(f"model factory '{factory}' does not accept the factory arguments "
                            f"{', '.join(sorted(args))}: {exc}", "check [model] factory_args / --factory-arg") from None
        raise UserError(f"model factory '{factory}' raised TypeError: {exc}") from None
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
