"""Datasets for calibration and validation, checked against the model's input specs.

A dataset holds one array per model input, all sharing the leading sample axis (the
spec's first, batch, axis), plus optional labels. Sources:
- an .npz file keyed by input name (and optionally the labels key);
- a folder of .npz files (keyed like the above) or .npy files (single-input models), each
  holding one batch of samples, read in sorted name order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.errors import UserError
from deploytool.recipe import ImageConfig, InputSpec, Recipe


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
    # checked first: given anything else, numpy tries it as a pickle and advises allow_pickle=
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read data file {path}: it is not a valid .npz file (not a zip archive); "
                        "it may be empty, truncated or in another format", "write it with numpy.savez(path, NAME=array, ...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise _unreadable(path, exc, ".npz") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY":
        raise UserError(f"cannot read data file {path}: it is not a valid .npy file; it may be empty, truncated or in another format",
                        "write it with numpy.save(path, array)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _unreadable(path, exc, ".npy") from None


def _unreadable(path: Path, exc: BaseException, kind: str) -> UserError:
    """A data file numpy could not read, said plainly (numpy's own text may advise unsafe loading)."""
    if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
        return UserError(f"cannot read data file {path}: it holds Python objects (object arrays), which are never unpickled",
                         "save plain numeric arrays")
    return UserError(f"cannot read data file {path}: it is not a valid {kind} file ({type(exc).__name__}: {exc})",
                     "it may be truncated or corrupt")


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_callable_source(text: str) -> bool:
    """'package.module:callable' or 'path/file.py:callable' (as opposed to a file or folder path)."""
    target, sep, attr = text.rpartition(":")
    return bool(sep and target and attr.isidentifier() and (target.endswith(".py") or "/" not in target))


def _read_images(path: Path, specs: Sequence[InputSpec], image: ImageConfig) -> dict[str, np.ndarray]:
    """Decode, resize, centre-crop and normalise every image under `path`; sub-folder names are class labels."""
    from PIL import Image, UnidentifiedImageError

    if len(specs) != 1:
        raise UserError(f"image folder {path}: image data only works for single-input models")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({p.parent.relative_to(path).parts[0] for p in files if p.parent != path})
    arrays = []
    for file in files:
        try:
            with Image.open(file) as opened:
                img = opened.convert("L" if image.color == "gray" else "RGB")
                if image.resize:
                    img = img.resize((image.resize[1], image.resize[0]), Image.Resampling.BILINEAR)
                if image.crop:
                    left, top = (img.width - image.crop[1]) // 2, (img.height - image.crop[0]) // 2
                    img = img.crop((left, top, left + image.crop[1], top + image.crop[0]))
                array: np.ndarray = np.asarray(img, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UserError(f"cannot read image {file}: {exc}") from None
        array = array[:, :, None] if array.ndim == 2 else array
        array = array * image.scale
        array = (array - np.asarray(image.mean, np.float32)) / np.asarray(image.std, np.float32)
        arrays.append(array.transpose(2, 0, 1) if image.layout == "nchw" else array)
    if not arrays:
        raise UserError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"image folder {path}: images have different sizes {sorted(shapes)[:3]}",
                        "set [data.image] resize and/or crop so that every image ends up the same size")
    result = {specs[0].name: np.stack(arrays)}
    if classes and all(p.parent != path for p in files):
        result["labels"] = np.array([classes.index(p.relative_to(path).parts[0]) for p in files], dtype=np.int64)
    return result


def _read_callable(source: str, specs: Sequence[InputSpec], base_dir: Path) -> dict[str, np.ndarray]:
    """Call a user function and stack what it yields: dicts of arrays keyed by input name (one batch each),
    or plain arrays for single-input models."""
    from deploytool.factory import resolve_factory

    function = resolve_factory(source, base_dir, "data callable")
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for item in function():
            batch = item if isinstance(item, dict) else {specs[0].name: item}
            for key, value in batch.items():
                parts.setdefault(key, []).append(np.asarray(value))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"data callable '{source}' raised {type(exc).__name__}: {exc}") from None
    if not parts:
        raise UserError(f"data callable '{source}' yielded nothing")
    try:
        return {key: np.concatenate(chunks) for key, chunks in parts.items()}
    except ValueError as exc:
        raise UserError(f"data callable '{source}': batches do not stack: {exc}") from None


def load_dataset(
    path: Path | str,
    specs: Sequence[InputSpec],
    labels_key: str = "labels",
    image: ImageConfig | None = None,
    base_dir: Path | None = None,
) -> Dataset:
    """Load and check a dataset for a model with the given input specs.

    `path` is an .npz/.npy file, a folder of them, an image folder (with `image` preprocessing),
    or a 'module:callable' / 'file.py:callable' yielding batches."""
    if is_callable_source(str(path)) and not Path(path).exists():
        arrays = _read_callable(str(path), specs, base_dir or Path.cwd())
        return _checked(arrays, specs, labels_key, str(path))
    path = Path(path)
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        arrays = _read_images(path, specs, image or ImageConfig())
    elif path.is_dir():
        arrays = _read_folder(path, specs)
    elif path.suffix == ".npz":
        arrays = _read_npz(path)
    elif path.suffix == ".npy" and len(specs) == 1:
        arrays = {specs[0].name: _read_npy(path)}
    else:
        raise UserError(f"unsupported data source {path}", "use an .npz file keyed by input name or a folder of them")
    return _checked(arrays, specs, labels_key, str(path))


def _checked(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec], labels_key: str, path: str) -> Dataset:
    """A Dataset from raw arrays, after checking names, shapes, dtypes, values and labels against the specs."""
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
    if labels is not None and (labels.dtype.kind not in "iuf" or labels.ndim == 0 or len(labels) != len(next(iter(feeds.values())))):
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
        shape = (samples, *(int(d) for d in spec.shape[1:]))  # fixed sizes: checked above
        kind = np.dtype(spec.dtype).kind
        if kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return Dataset(feeds, None, f"random(seed={seed})")


class CalibrationReader:
    """onnxruntime CalibrationDataReader over a Dataset, batch by batch.

    Supports onnxruntime's strided calibration (`set_range` over batch indices), which keeps
    only one chunk of activations in memory at a time; `on_batch` reports progress."""

    def __init__(self, dataset: Dataset, batch_size: int, pad: bool = False, on_batch: Callable[[], object] | None = None) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad = pad
        self.on_batch = on_batch
        self.set_range(0, len(self))

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def set_range(self, start_index: int, end_index: int) -> None:
        self._index, self._end = start_index, min(end_index, len(self))

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= self._end:
            return None
        start = self._index * self.batch_size
        self._index += 1
        if self.on_batch is not None:
            self.on_batch()
        index = np.arange(start, start + self.batch_size)
        if not self.pad:  # a fixed batch size wraps around to the first samples; a dynamic one ends short
            index = index[index < len(self.dataset)]
        return {k: v[index % len(self.dataset)] for k, v in self.dataset.feeds.items()}

    def stride(self, most: int) -> int:
        """The largest number of batches per chunk, at most `most`, that divides the batch count
        (onnxruntime requires chunks of equal size)."""
        count = len(self)
        return max(d for d in range(1, min(most, count) + 1) if count % d == 0)


def data_source(recipe: Recipe, value: str) -> Dataset:
    """A recipe's data entry loaded: a path relative to the recipe, or a module:callable."""
    source: Path | str = value if is_callable_source(value) and not recipe.resolve(value).exists() else recipe.resolve(value)
    return load_dataset(source, recipe.model.inputs, recipe.data.labels, recipe.data.image, recipe.base_dir)


def source_hash(recipe: Recipe, value: str | None) -> str | None:
    """What identifies a recipe's data entry for the stage cache: its files' contents, or a callable's source file."""
    import inspect

    from deploytool.artifacts import sha256
    from deploytool.cache import content_hash

    if value is None:
        return None
    if is_callable_source(value) and not recipe.resolve(value).exists():
        from deploytool.factory import resolve_factory

        source = inspect.getsourcefile(resolve_factory(value, recipe.base_dir, "data callable"))
        return f"{value}@{sha256(Path(source)) if source else 'unknown'}"
    return content_hash(recipe.resolve(value))


_INDEX_PASS_THROUGH = frozenset({"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def index_tables(model: Any) -> dict[str, tuple[int, str]]:
    """{integer graph input: (rows, node)} for the inputs that index a constant table (token ids into an embedding):
    a Gather whose indices the input is, directly or through shape-only ops, and whose data is an initializer (or
    its dequantized form). The fewest rows where an input indexes several tables."""
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))

    def table_dims(name: str) -> list[int] | None:
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            name = node.input[0]
        return initializers.get(name)

    found: dict[str, tuple[int, str]] = {}
    integer = (2, 3, 4, 5, 6, 7, 12, 13)  # uint8, int8, uint16, int16, int32, int64, uint32, uint64
    for graph_input in model.graph.input:
        if graph_input.name in initializers or graph_input.type.tensor_type.elem_type not in integer:
            continue
        frontier, seen = [graph_input.name], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node, position in consumers.get(tensor, []):
                if node.op_type == "Gather" and position == 1:
                    dims = table_dims(node.input[0])
                    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        rows = int(dims[axis])
                        if graph_input.name not in found or rows < found[graph_input.name][0]:
                            found[graph_input.name] = (rows, node.name or node.output[0])
                elif node.op_type in _INDEX_PASS_THROUGH and position == 0:
                    frontier.extend(node.output)
    return found


def check_indices(model: Any, dataset: Dataset) -> None:
    """A user error when data indexes past a table of the model (a token id outside its vocabulary), where ONNX
    Runtime would fail deep inside a stage; ids from -rows to rows - 1 are what ONNX Runtime's Gather takes."""
    for name, (rows, node) in index_tables(model).items():
        array = dataset.feeds.get(name)
        if array is None or array.dtype.kind not in "iu" or array.size == 0:
            continue
        bad = (array >= rows) | (array < -rows)
        if bad.any():
            sample = int(np.nonzero(bad.reshape(len(array), -1).any(axis=1))[0][0])
            values = array[sample][bad[sample]]
            raise UserError(
                f"{dataset.source}: input '{name}' holds {int(values[0])} in sample {sample} "
                f"({int(bad.sum())} value(s) out of range in all), but it indexes a table of {rows} rows "
                f"(node '{node}'): values must lie in 0..{rows - 1}",
                "token ids must come from the model's own vocabulary (its tokenizer)")
