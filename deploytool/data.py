"""Datasets for calibration and validation, checked against the model's input specs.

A dataset holds one array per model input, all sharing the leading sample axis (the
spec's first, batch, axis), plus optional labels. Sources:
- an .npz file keyed by input name (and optionally the labels key);
- a folder of .npz files (keyed like the above) or .npy files (single-input models), each
  holding one batch of samples, read in sorted name order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploytool.errors import UserError
from deploytool.recipe import InputSpec


@dataclass
class Dataset:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def batches(self, batch_size: int, pad: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches; with pad, a short last batch is filled up by wrapping around to the start
        (for models with a fixed batch size)."""
        for start in range(0, len(self), batch_size):
            if pad and start + batch_size > len(self):
                index = np.arange(start, start + batch_size) % len(self)
                yield {name: array[index] for name, array in self.feeds.items()}
            else:
                yield {name: array[start : start + batch_size] for name, array in self.feeds.items()}

    def head(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.feeds.items()}, labels, self.source)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None


def _read_folder(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
    if not files:
        raise UserError(f"data folder {path} holds no .npz or .npy files")
    parts: dict[str, list[np.ndarray]] = {}
    for file in files:
        if file.suffix == ".npy":
            if len(specs) != 1:
                raise UserError(
                    f"{file}: .npy samples only work for single-input models; this model has "
                    f"{len(specs)} inputs", "use .npz files keyed by input name"
                )
            arrays = {specs[0].name: _read_npy(file)}
        else:
            arrays = _read_npz(file)
        for key, array in arrays.items():
            spec = next((s for s in specs if s.name == key), None)
            if spec is not None and array.ndim == len(spec.shape) - 1:
                array = array[None]  # one sample without its batch axis
            parts.setdefault(key, []).append(array)
    counts = {key: len(chunks) for key, chunks in parts.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"data folder {path}: keys appear in different numbers of files: {counts}")
    try:
        return {key: np.concatenate(chunks) for key, chunks in parts.items()}
    except ValueError as exc:
        raise UserError(f"data folder {path}: samples do not stack: {exc}") from None


_KINDS = {"f": "floating point", "i": "integer", "u": "integer", "b": "boolean"}


def _check_input(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    expected = np.dtype(spec.dtype)
    if array.dtype.kind not in _KINDS or _KINDS[array.dtype.kind] != _KINDS[expected.kind]:
        raise UserError(f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
    if array.ndim != len(spec.shape):
        raise UserError(
            f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
            f"{len(spec.shape)} dimensions {spec.shape} (first axis = samples)"
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and got != want:
            raise UserError(
                f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
                f"{spec.shape} (axis {axis} is {got}, should be {want})"
            )
    if len(array) == 0:
        raise UserError(f"{where}: input '{spec.name}' holds zero samples")
    if expected.kind == "f" and not np.isfinite(array).all():
        bad = np.unique(np.nonzero(~np.isfinite(array.reshape(len(array), -1)))[0])
        raise UserError(
            f"{where}: input '{spec.name}' has NaN or Inf values in {len(bad)} sample(s), first at index {bad[0]}"
        )
    return array.astype(expected, copy=False)


def load_dataset(path: Path, specs: Sequence[InputSpec], labels_key: str = "labels") -> Dataset:
    """Load and check a dataset for a model with the given input specs."""
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir():
        arrays = _read_folder(path, specs)
    elif path.suffix == ".npz":
        arrays = _read_npz(path)
    elif path.suffix == ".npy" and len(specs) == 1:
        arrays = {specs[0].name: _read_npy(path)}
    else:
        raise UserError(f"unsupported data source {path}", "use an .npz file keyed by input name or a folder of them")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(
            f"{path}: no array for model input(s) {missing}; found keys {sorted(arrays)}",
            f"save the arrays under the input names {names}",
        )
    feeds = {s.name: _check_input(arrays[s.name], s, str(path)) for s in specs}
    counts = {n: len(a) for n, a in feeds.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"{path}: inputs hold different numbers of samples: {counts}")
    labels = arrays.get(labels_key)
    if labels is not None:
        if labels.dtype.kind not in "iuf" or labels.ndim == 0 or len(labels) != len(next(iter(feeds.values()))):
            raise UserError(
                f"{path}: '{labels_key}' must be numeric with one entry per sample "
                f"(got {labels.dtype} with shape {list(labels.shape)}, {len(feeds[names[0]])} samples)"
            )
    return Dataset(feeds, labels, str(path))


def random_dataset(specs: Sequence[InputSpec], samples: int, seed: int = 0) -> Dataset:
    """Seeded random feeds matching the specs (for models given without data)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dynamic = [d for d in spec.shape[1:] if isinstance(d, str)]
        if dynamic:
            raise UserError(
                f"input '{spec.name}' has dynamic axes {dynamic}; random inputs need fixed sizes",
                "give validation data in [data] or fixed sizes in [model] inputs",
            )
        shape = (samples, *spec.shape[1:])
        kind = np.dtype(spec.dtype).kind
        if kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return Dataset(feeds, None, f"random(seed={seed})")


class CalibrationReader:
    """onnxruntime CalibrationDataReader over a Dataset, batch by batch."""

    def __init__(self, dataset: Dataset, batch_size: int, pad: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad = pad
        self.rewind()

    def rewind(self) -> None:
        self._batches = self.dataset.batches(self.batch_size, self.pad)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)
