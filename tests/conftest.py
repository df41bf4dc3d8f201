"""Shared fixtures: the digits sample, tiny models written to files, and one full digits run."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
DIGITS_RECIPE = ROOT / "recipes" / "digits-cnn.toml"

# A small conv net on the digits' 1x8x8 images: two convolutions (so per-channel quantization has
# something to do), global pooling and a linear head. Seeded, so its weights are the same every time.
TINY_CNN = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def wide() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(width=12)
'''


@dataclass
class TinyModel:
    """A tiny model on disk: its factory spec ('file.py:build'), a state_dict checkpoint and an fp32 ONNX export."""

    folder: Path
    factory: str
    checkpoint: Path
    onnx: Path


def write_module(folder: Path, name: str, source: str) -> Path:
    """Write Python source to folder/name.py and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def image_specs(batch: int | str = "batch") -> list[Any]:
    from deploytool.recipe import InputSpec

    return [InputSpec(name="image", shape=[batch, 1, 8, 8], dtype="float32")]


@pytest.fixture(scope="session")
def specs() -> list[Any]:
    """Input specs of the digits models: image (batch, 1, 8, 8) float32."""
    return image_specs()


@pytest.fixture(scope="session")
def calib(specs: list[Any]) -> Any:
    """The digits calibration split as a Dataset (256 samples, with labels)."""
    from deploytool.data import load_dataset

    return load_dataset(DIGITS / "calib.npz", specs)


@pytest.fixture(scope="session")
def val(specs: list[Any]) -> Any:
    """The digits validation split as a Dataset (450 samples, with labels)."""
    from deploytool.data import load_dataset

    return load_dataset(DIGITS / "val.npz", specs)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, specs: list[Any], calib: Any) -> TinyModel:
    """The tiny CNN as a factory file, a saved state_dict and a (TorchScript-exported, unsimplified) ONNX file."""
    import torch

    from deploytool.recipe import ExportConfig
    from deploytool.stages.export import export_onnx
    from deploytool.stages.load import load_model

    folder = tmp_path_factory.mktemp("tiny")
    path = write_module(folder, "tiny_cnn", TINY_CNN)
    factory = f"{path}:build"
    model = load_model(factory, None, folder)
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    onnx_path = folder / "tiny.onnx"
    export_onnx(model, specs, ["logits"], ExportConfig(exporter="torchscript"), calib.head(2), onnx_path)
    return TinyModel(folder, factory, checkpoint, onnx_path)


@pytest.fixture
def restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Factories given as module:callable add folders to sys.path; undo that after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def damage(source: Path, target: Path, factor: float = -1.0) -> str:
    """Copy an ONNX model with its largest 4-D (conv) weight initializer multiplied by factor; returns its name."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(source))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4 and t.data_type == TensorProto.FLOAT]
    victim = max(weights, key=lambda t: int(np.prod(t.dims)))
    victim.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(victim) * np.float32(factor), victim.name))
    onnx.save(proto, str(target))
    return victim.name


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def digits_recipe_text(**replace: str) -> str:
    """The bundled digits recipe with absolute sample paths (so it can live in a tmp folder) and text replaced."""
    text = DIGITS_RECIPE.read_text(encoding="utf-8").replace('"../samples/', f'"{ROOT}/samples/')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def tiny_recipe_text(tiny: TinyModel, **replace: str) -> str:
    """A fast recipe for the tiny CNN (TorchScript export, static int8, few timed runs, one loose gate and no default
    gates: its int8 model is too small to be reliably faster), text replaced."""
    text = f'''
name = "tiny"

[model]
factory = "{tiny.factory}"
checkpoint = "{tiny.checkpoint}"
inputs = [{{ name = "image", shape = ["batch", 1, 8, 8], dtype = "float32" }}]
outputs = ["logits"]

[data]
calibration = "{DIGITS / 'calib.npz'}"
validation = "{DIGITS / 'val.npz'}"
task = "classification"

[export]
exporter = "torchscript"

[simplify]
enabled = true

[quantize]
mode = "static"

[verify]
threads = 1
warmup = 1
runs = 5
default_gates = false

[verify.gates]
min_cosine = 0.5
'''
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@dataclass
class CliRun:
    """The outcome of one `deploytool` invocation through click's CliRunner."""

    exit_code: int
    output: str  # stdout and stderr together
    stdout: str
    stderr: str
    exception: BaseException | None

    def report(self, out_dir: Path) -> dict[str, Any]:
        return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))


def assert_user_error(result: CliRun, *fragments: str) -> None:
    """Exit 2, an 'error:' line naming each fragment, no traceback, no uncaught exception."""
    assert result.exit_code == 2, result.output
    assert result.exception is None, repr(result.exception)
    assert "error: " in result.stderr and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def invoke(*args: str | Path) -> CliRun:
    """Run the CLI in-process; exceptions are caught (and show up as a non-zero exit code)."""
    from click.testing import CliRunner

    from deploytool.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="deploytool", catch_exceptions=True)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliRun(result.exit_code, result.output, result.stdout, result.stderr, exception)


@pytest.fixture
def cli() -> Callable[..., CliRun]:
    return invoke


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[CliRun, Path]:
    """`deploytool run recipes/digits-cnn.toml --out DIR`, once per test session (about 15 s)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    return invoke("run", DIGITS_RECIPE, "--out", out), out


class CreatesMarker:
    """Unpickling this object runs `touch <marker>`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def tiny_hf_vit(folder: Path, samples: int, exporter: str = "auto", **config: int) -> tuple[Any, list[Any], Any, Path]:
    """Hugging Face's ViTForImageClassification from a small config (1x16x16 images, 4x4 patches, 5 classes; `config`
    overrides hidden_size, num_hidden_layers, num_attention_heads, intermediate_size), wrapped to return its logits,
    with `samples` seeded random images and its ONNX export: (model, specs, data, onnx path)."""
    import torch
    from torch import nn
    from transformers import ViTConfig, ViTForImageClassification

    from deploytool.data import Dataset
    from deploytool.recipe import ExportConfig, InputSpec
    from deploytool.stages.export import export_onnx

    torch.manual_seed(0)
    settings = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, **config}
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, num_labels=5, **settings)).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.vit(pixel_values=image).logits

    model = Logits().eval()
    specs = [InputSpec(name="image", shape=["batch", 1, 16, 16], dtype="float32")]
    data = Dataset({"image": np.random.default_rng(0).random((samples, 1, 16, 16), dtype=np.float32)})
    path = folder / "vit.onnx"
    export_onnx(model, specs, ["logits"], ExportConfig(exporter=exporter), data.head(2), path)
    return model, specs, data, path
