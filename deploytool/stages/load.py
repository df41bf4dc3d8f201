"""load: build the model from its factory and load a state_dict safely."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploytool.errors import UserError, first_line

if TYPE_CHECKING:
    import torch


def resolve_factory(spec: str, base_dir: Path) -> Callable[[], Any]:
    """'pkg.module:fn' (imported; the recipe folder and cwd are searched) or 'path/file.py:fn'."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else (base_dir / target).resolve()
        if not path.is_file():
            raise UserError(f"model factory file not found: {path}")
        # a stable name: it ends up in exported graphs' metadata, which must not change between runs
        module_name = f"deploytool_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        for folder in (str(base_dir), str(Path.cwd())):
            if folder not in sys.path:
                sys.path.append(folder)
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(
                f"cannot import model factory module '{target}': {exc}",
                "run from the folder that holds the package, or use path/to/file.py:callable",
            ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"model factory '{spec}': '{attr}' is not a callable in {module.__name__}")
    return factory


def read_state_dict(path: Path, trust: bool = False) -> Mapping[str, torch.Tensor]:
    """Tensors from .safetensors or a weights_only torch checkpoint; never runs pickled code unless `trust`.

    With `trust`, a pickled full module (its state_dict is taken) or a training checkpoint holding
    other objects beside the weights also loads; unpickling such a file can run code from it."""
    import torch

    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir() or path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty or not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # unpickling errors come in many types
        reason = first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(
                f"checkpoint {path} holds more than tensors (pickled objects); refusing to unpickle it",
                "save model.state_dict() instead or convert it to .safetensors; only if you trust the file, "
                "set [model] trust_checkpoint = true or pass --trust-checkpoint (unpickling can run code from it)",
            ) from None
        raise UserError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {reason}",
            "is it a state_dict written by torch.save, or a .safetensors file? it may be truncated or corrupt",
        ) from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    return state


def read_layer_sizes(path: Path) -> dict[str, Any] | None:
    """The layer widths a pruned .safetensors checkpoint carries in its metadata, if any."""
    import json

    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    from deploytool.stages.prune import METADATA_KEY

    with safe_open(str(path), framework="pt") as fh:
        text = (fh.metadata() or {}).get(METADATA_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise UserError(f"checkpoint {path}: its layer-size metadata is not valid JSON") from None


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with missing, unexpected and mis-shaped keys named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(
            f"checkpoint {source} does not match the model: " + "; ".join(problems),
            "check that the factory builds the same architecture the checkpoint was saved from",
        )
    model.load_state_dict(state, strict=True)


def load_model(factory: str, checkpoint: Path | None, base_dir: Path, trust: bool = False) -> torch.nn.Module:
    import torch

    build = resolve_factory(factory, base_dir)
    try:
        model = build()
    except Exception as exc:
        raise UserError(f"model factory '{factory}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        state = read_state_dict(checkpoint, trust)
        sizes = read_layer_sizes(checkpoint)
        if sizes is not None:  # a pruned model: resize the factory's layers to the saved widths first
            from deploytool.stages.prune import apply_layer_sizes

            apply_layer_sizes(model, sizes, dict(state))
        load_weights(model, state, str(checkpoint))
    return model.eval()
