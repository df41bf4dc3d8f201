"""The checkpoint format: reading state_dicts safely (.safetensors, weights-only torch.save), the layer widths a
pruned checkpoint carries in its metadata, and unwrapping the key prefixes of training wrappers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from deploytool.artifacts import atomic_path
from deploytool.errors import UserError, first_line

log = logging.getLogger("deploytool")

if TYPE_CHECKING:
    import torch

# integer attributes of torch.nn layers that encode their width
SIZE_ATTRIBUTES = (
    "in_channels", "out_channels", "in_features", "out_features", "num_features", "groups",
    "embed_dim", "kdim", "vdim", "num_heads", "head_dim", "hidden_size", "normalized_shape", "num_channels",
    "num_attention_heads", "all_head_size", "n_heads", "n_head", "heads",
)
METADATA_KEY = "deploytool.layer_sizes"


def _pickled_globals(path: Path) -> list[str] | None:
    """The 'module.name' globals that a checkpoint's pickle refers to, read without unpickling anything.

    None when the file is neither a torch.save archive nor a pickle (random bytes, a truncated
    archive, another format): such a file is corrupt, not unsafe."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not pickles:
                    return None
                streams: list[IO[bytes]] = [io.BytesIO(archive.read(pickles[0]))]
                count = 1
        else:
            streams = [path.open("rb")]
            count = 4  # the legacy torch.save format: magic number, protocol, system info, then the objects
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    found: list[str] = []
    with streams[0] as stream:
        if stream.read(1) != b"\x80":  # every pickle since protocol 2 (all torch.save files) starts with PROTO
            return None
        stream.seek(0)
        for index in range(count):
            strings: list[str] = []
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
                if index == 0:
                    return None  # not even one whole pickle
                break
    return list(dict.fromkeys(found))


def _unsafe_globals(names: list[str]) -> list[str]:
    """The globals that torch's weights-only loader refuses."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # another torch version: a rougher rule
        return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict", "builtins.", "_codecs."))]
    return [n for n in names if n not in allowed and n.replace("__builtin__.", "builtins.", 1) not in allowed]


def read_state_dict(path: Path, trust: bool = False, notes: list[str] | None = None) -> Mapping[str, torch.Tensor]:
    """Tensors from .safetensors or a weights_only torch checkpoint; never runs pickled code unless `trust`.

    With `trust`, a pickled full module (its state_dict is taken) or a training checkpoint holding
    other objects beside the weights also loads; unpickling such a file can run code from it.
    A training checkpoint's weights are taken from its 'state_dict' (or 'model_state_dict', 'model')
    entry; `notes` gets a line saying so."""
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
            raise UserError(f"cannot read checkpoint {path}: not a valid .safetensors file ({first_line(exc)})",
                            "it may be truncated or corrupt") from None
    corrupt_hint = "a checkpoint is a state_dict written by torch.save, or a .safetensors file; this one may be truncated or corrupt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # unpickling errors come in many types
        found = _pickled_globals(path)
        if found is None:  # random bytes, a cut-off archive, another format: corrupt, not unsafe
            raise UserError(f"cannot read checkpoint {path}: it is not a valid PyTorch checkpoint "
                            "(neither a torch.save archive nor a pickle)", corrupt_hint) from None
        unsafe = _unsafe_globals(found)
        if not trust and unsafe:  # a real pickle that refers to objects the safe loader refuses
            shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
            raise UserError(
                f"checkpoint {path} holds more than tensors (pickled objects: {shown}); refusing to unpickle it",
                "save model.state_dict() instead or convert it to .safetensors; only if you trust the file, "
                "set [model] trust_checkpoint = true or pass --trust-checkpoint (unpickling can run code from it)",
            ) from None
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        if "Weights only load failed" in reason:  # torch's own text goes on to suggest weights_only=False
            raise UserError(f"cannot read checkpoint {path}: it is a pickle that torch's weights-only loader cannot read",
                            "re-save the weights with torch.save(model.state_dict(), path), or as .safetensors") from None
        raise UserError(f"cannot read checkpoint {path}: {reason}", corrupt_hint) from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            others = sorted(str(k) for k in state if k != key)
            if notes is not None:
                beside = f"; ignored beside it: {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}" if others else ""
                notes.append(f"checkpoint {path.name}: a training checkpoint (such as PyTorch Lightning's); "
                             f"the weights were taken from its '{key}' entry{beside}")
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    return state


def read_layer_sizes(path: Path) -> dict[str, Any] | None:
    """The layer widths a pruned .safetensors checkpoint carries in its metadata, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

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


# prefixes that wrappers add to every key: DistributedDataParallel / DataParallel ('module.'), a
# LightningModule holding the network as self.model ('model.'), torch.compile ('_orig_mod.')
WRAPPER_PREFIXES = {"module.": "a DistributedDataParallel or DataParallel wrapper",
                    "model.": "a training wrapper such as a LightningModule",
                    "_orig_mod.": "torch.compile"}


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], own: set[str], source: str,
                           notes: list[str] | None = None) -> Mapping[str, torch.Tensor]:
    """The state_dict with wrapper prefixes ('module.', 'model.', '_orig_mod.') removed where that makes its
    keys match the model's own keys better; each strip is noted (with the keys outside the prefix that were dropped)."""
    for _ in range(len(WRAPPER_PREFIXES) + 1):  # nested wrappers, e.g. DDP around a LightningModule
        matched = len(own.intersection(state))
        if matched == len(own) and len(state) == len(own):
            break
        best: tuple[int, str, dict[str, Any]] | None = None
        for prefix in WRAPPER_PREFIXES:
            inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            score = len(own.intersection(inside))
            if inside and score > matched and (best is None or score > best[0]):
                best = (score, prefix, inside)
        if best is None:
            break
        _, prefix, inside = best
        dropped = sorted(k for k in state if not k.startswith(prefix))
        if notes is not None:
            extra = (f"; {len(dropped)} keys outside it were not loaded: {', '.join(dropped[:4])}"
                     f"{' ...' if len(dropped) > 4 else ''}") if dropped else ""
            notes.append(f"checkpoint {source}: stripped the prefix '{prefix}' from {len(inside)} keys "
                         f"(saved from {WRAPPER_PREFIXES[prefix]}){extra}")
        log.info("checkpoint %s: stripped the key prefix '%s'", source, prefix)
        state = inside
    return state


def layer_sizes(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The width attributes of every layer, to rebuild a pruned architecture from the original factory."""
    sizes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {a: getattr(module, a) for a in SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), (int, tuple))}
        if attrs:
            sizes[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in attrs.items()}
    return sizes


def save_model(model: torch.nn.Module, path: Path) -> None:
    """safetensors with the layer sizes as metadata: reloadable with the original factory, no pickle."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(layer_sizes(model), sort_keys=True)})


def apply_layer_sizes(model: torch.nn.Module, sizes: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    """Resize `model` (built by the original factory) in place to the saved widths, ready for load_state_dict."""
    import torch

    modules = dict(model.named_modules())
    for name, attrs in sizes.items():
        module = modules.get(name)
        if module is None:
            raise UserError(f"pruned checkpoint names layer '{name}', which the model factory does not build")
        for attr, value in attrs.items():
            if hasattr(module, attr):
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        if attr in owner._parameters and owner._parameters[attr] is not None:
            if owner._parameters[attr].shape != tensor.shape:
                owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(tensor), requires_grad=owner._parameters[attr].requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None and owner._buffers[attr].shape != tensor.shape:
            owner._buffers[attr] = torch.empty_like(tensor)
