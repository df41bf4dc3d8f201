"""Stage cache: a stage's outputs are stored under a key over everything they depend on
(input artifact hashes, the stage's resolved config, data hashes, library versions), so a
run that was killed, or is repeated, reuses the stages that already finished."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from deploytool.artifacts import atomic_path, sha256

log = logging.getLogger(__name__)

_LIBRARIES = ("deploytool", "torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "torch-pruning", "numpy")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents) in sorted order."""
    if path.is_file():
        return sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(sha256(item).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of deploytool's own source files: a change to the code (an upgrade from a source checkout, where the
    version number stays the same) invalidates the cached stages, as a change of library version does."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: Any, inputs: dict[str, str | None]) -> str:
    payload = {"stage": stage, "config": config, "inputs": inputs, "versions": library_versions(), "source": source_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StageCache:
    """Entries live in <folder>/<stage>/<key>/ with the output files and record.json."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def lookup(self, stage: str, key: str, outputs: Sequence[Path]) -> dict[str, Any] | None:
        entry = self.folder / stage / key
        record_path = entry / "record.json"
        if not record_path.is_file() or not all((entry / p.name).is_file() for p in outputs):
            return None
        for path in outputs:
            with atomic_path(path) as tmp:
                shutil.copyfile(entry / path.name, tmp)
        log.info("stage %s: reused cached outputs %s", stage, key)
        return json.loads(record_path.read_text())

    def store(self, stage: str, key: str, outputs: Sequence[Path], record: dict[str, Any]) -> None:
        entry = self.folder / stage / key
        if entry.exists():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        try:
            for path in outputs:
                shutil.copyfile(path, staging / path.name)
            (staging / "record.json").write_text(json.dumps(record, sort_keys=True, default=str))
            os.replace(staging, entry)  # the entry appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def run(
        self, stage: str, key: str, outputs: Sequence[Path], compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """(record, True) from the cache, or (compute(), False) after storing its outputs."""
        cached = self.lookup(stage, key, outputs)
        if cached is not None:
            return cached, True
        record = compute()
        self.store(stage, key, outputs, record)
        return record, False
