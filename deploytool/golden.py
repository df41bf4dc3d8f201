"""Golden outputs: inputs and reference outputs saved together (plain .npz, no pickle), so a
release job can verify an ONNX file later without PyTorch or the original model."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.artifacts import atomic_path
from deploytool.data import Dataset
from deploytool.errors import UserError

FORMAT = "deploytool-golden/1"


def save_golden(path: Path, dataset: Dataset, output_names: Sequence[str], outputs: Sequence[np.ndarray], source: str) -> None:
    arrays: dict[str, np.ndarray] = {f"input/{k}": v for k, v in dataset.feeds.items()}
    arrays.update({f"output/{n}": o for n, o in zip(output_names, outputs)})
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    meta = {"format": FORMAT, "inputs": list(dataset.feeds), "outputs": list(output_names), "source": source}
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]


def is_golden(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "meta" in archive.files and FORMAT in str(archive["meta"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


class GoldenRunner:
    """Replays stored reference outputs; `infer` takes batches of the stored inputs in order."""

    timeable = False  # replayed outputs have no latency of their own

    def __init__(self, path: Path, name: str = "reference") -> None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"cannot read golden outputs {path}: {exc}") from None
        meta: dict[str, Any] = json.loads(str(arrays["meta"]))
        self.name = name
        self.path = path
        self.output_names: list[str] = meta["outputs"]
        self.source = meta.get("source", "")
        self.dataset = Dataset({k: arrays[f"input/{k}"] for k in meta["inputs"]}, arrays.get("labels"), str(path))
        self.outputs = [arrays[f"output/{n}"] for n in self.output_names]
        self._cursor = 0

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        first = next(iter(self.dataset.feeds))
        count = len(feeds[first])
        start = self._cursor if self._cursor + count <= len(self.dataset) else 0
        if not np.array_equal(feeds[first], self.dataset.feeds[first][start : start + count]):
            raise UserError(f"golden outputs {self.path} only cover their own stored inputs")
        self._cursor = (start + count) % len(self.dataset)
        return [o[start : start + count] for o in self.outputs]
