"""Factory resolution: 'package.module:callable' or 'path/to/file.py:callable' to the callable it names (model
factories, data callables)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploytool.errors import UserError


def resolve_factory(spec: str, base_dir: Path, what: str = "model factory") -> Callable[[], Any]:
    """'pkg.module:fn' (imported; the recipe folder and cwd are searched) or 'path/file.py:fn'.

    `what` names the callable in messages (a model factory, a data callable)."""
    target, _, attr = spec.rpartition(":")
    path = None
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else (base_dir / target).resolve()
        if not path.is_file():
            raise UserError(f"{what} file not found: {path}")
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
                f"cannot import {what} module '{target}': {exc}",
                "run from the folder that holds the package, or use path/to/file.py:callable",
            ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        where = str(path) if path is not None else f"module '{target}'"
        defined = sorted(name for name, value in vars(module).items()
                         if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__)
        hint = f"{where} defines: {', '.join(defined)}" if defined else f"{where} defines no callables"
        raise UserError(f"{what} '{spec}': '{attr}' is not a callable in {where}", hint)
    return factory
