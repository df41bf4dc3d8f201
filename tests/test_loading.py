"""Loading library models and wrapped checkpoints: factory_args (recipe and --factory-arg), DDP's 'module.'
prefix and Lightning's {'state_dict': {'model.…': …}} layout, each noted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_CNN, CliRun, TinyModel, tiny_recipe_text, write_module

from deploytool.errors import UserError
from deploytool.stages.load import load_model

Cli = Callable[..., CliRun]

WIDE_FACTORY = TINY_CNN + '''

def configurable(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN(width=width)
'''


@pytest.fixture
def configurable(tmp_path: Path) -> str:
    return f"{write_module(tmp_path, 'configurable_cnn', WIDE_FACTORY)}:configurable"


def test_factory_args_reach_the_factory(configurable: str, tmp_path: Path) -> None:
    model = load_model(configurable, None, tmp_path, factory_args={"width": 12})
    assert model.conv1.out_channels == 12
    # only the argument the factory has no parameter for is named, with those it has
    with pytest.raises(UserError, match="^model factory '.*' does not take the factory argument\\(s\\) depth; it takes width, seed$"):
        load_model(configurable, None, tmp_path, factory_args={"width": 12, "depth": 3})


def test_factory_args_in_a_recipe_run(cli: Cli, tmp_path: Path, tiny: TinyModel, configurable: str) -> None:
    """[model] factory_args builds the model a checkpoint of another width was saved from; the resolved recipe keeps them."""
    wide = load_model(configurable, None, tmp_path, factory_args={"width": 12, "seed": 3})
    checkpoint = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), checkpoint)
    text = tiny_recipe_text(tiny, **{f'factory = "{tiny.factory}"':
                                     f'factory = "{configurable}"\nfactory_args = {{ width = 12, seed = 3 }}',
                                     f'checkpoint = "{tiny.checkpoint}"': f'checkpoint = "{checkpoint}"',
                                     '[quantize]\nmode = "static"': '[quantize]\nmode = "none"'})
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert "width = 12" in (out / "recipe.resolved.toml").read_text(encoding="utf-8")
    # without the arguments the factory builds width 8, which the checkpoint does not match
    bare = tmp_path / "bare.toml"
    bare.write_text(text.replace("factory_args = { width = 12, seed = 3 }\n", ""), encoding="utf-8")
    result = cli("run", bare, "--out", tmp_path / "bare-run")
    assert result.exit_code == 2 and "does not match the model" in result.stderr, result.output


def test_factory_arg_option_on_export(cli: Cli, tmp_path: Path, configurable: str) -> None:
    import onnx

    out = tmp_path / "wide.onnx"
    result = cli("export", "--factory", configurable, "--factory-arg", "width=16", "--factory-arg", "seed=1",
                 "--input", "image:batch,1,8,8", "--output-name", "logits", "-o", out, "--no-simplify")
    assert result.exit_code == 0, result.output
    weights = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert [16, 1, 3, 3] in weights.values()
    result = cli("export", "--factory", configurable, "--factory-arg", "width", "--input", "image:batch,1,8,8",
                 "--output-name", "logits", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "--factory-arg 'width'" in result.stderr, result.output


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    theirs = reference.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key


def test_ddp_checkpoint_loads_with_a_note(tiny: TinyModel, tmp_path: Path) -> None:
    reference = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    notes: list[str] = []
    model = load_model(tiny.factory, path, tiny.folder, notes=notes)
    _same_weights(model, reference)
    assert len(notes) == 1 and "stripped the prefix 'module.'" in notes[0] and "DistributedDataParallel" in notes[0], notes


def test_lightning_checkpoint_loads_with_notes(tiny: TinyModel, tmp_path: Path) -> None:
    reference = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    state["criterion.weight"] = torch.ones(10)  # another submodule of the LightningModule: not part of the network
    path = tmp_path / "epoch=3-step=100.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": state}, path)
    notes: list[str] = []
    model = load_model(tiny.factory, path, tiny.folder, notes=notes)
    _same_weights(model, reference)
    text = "\n".join(notes)
    assert "weights were taken from its 'state_dict' entry" in text and "epoch" in text, notes
    assert "stripped the prefix 'model.'" in text and "criterion.weight" in text, notes


def test_lightning_checkpoint_notes_reach_the_run_report(cli: Cli, tiny: TinyModel, tmp_path: Path) -> None:
    reference = load_model(tiny.factory, tiny.checkpoint, tiny.folder)
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}}, path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_recipe_text(tiny, **{f'checkpoint = "{tiny.checkpoint}"': f'checkpoint = "{path}"',
                                                '[quantize]\nmode = "static"': '[quantize]\nmode = "none"'}), encoding="utf-8")
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    notes = result.report(out)["notes"]
    assert any("stripped the prefix 'model.'" in n for n in notes), notes


def test_a_model_with_its_own_model_submodule_is_not_stripped(tmp_path: Path) -> None:
    """Keys that already match the model stay as they are, even when they start with 'model.'."""
    source = '''
import torch
from torch import nn

class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 2)

    def forward(self, x):
        return self.model(x)

def build():
    torch.manual_seed(0)
    return Wrapper()
'''
    factory = f"{write_module(tmp_path, 'wrapper_net', source)}:build"
    model = load_model(factory, None, tmp_path)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    notes: list[str] = []
    _same_weights(load_model(factory, path, tmp_path, notes=notes), model)
    assert notes == []
