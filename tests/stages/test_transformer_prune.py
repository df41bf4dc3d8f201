"""Head and feed-forward pruning of transformer encoders we did not write (Hugging Face BERT and ViT built from a
config), the reload of the pruned architecture, and hidden-state distillation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, write_module

MODELS = '''
import torch
from torch import nn


class Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=16, type_vocab_size=1)
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


class Vit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=96, num_labels=5)
        self.vit = ViTForImageClassification(config).eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=image).logits


class Distil(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel

        torch.manual_seed(0)
        config = DistilBertConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=16)
        self.model = DistilBertModel(config).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


class Fused(nn.Module):
    """One fused qkv projection, as timm and many hand-written ViTs have it."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class FusedWidth(Fused):
    """Head size taken from the residual width: a forward() that cannot run with fewer heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, dim))


class FusedHeadsFirst(Fused):
    """A [heads x (q | k | v)] layout: removing the rows of [q | k | v] x heads would mix heads up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, self.heads, 3, -1).permute(3, 0, 2, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class FusedNet(nn.Module):
    def __init__(self, attention: type = Fused) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 32)
        self.norm = nn.LayerNorm(32)
        self.attn = attention()
        self.mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.attn(self.norm(x))
        return self.head((x + self.mlp(x)).mean(1))


def bert():
    return Bert()


def vit():
    return Vit()


def distil():
    return Distil()


def fused():
    return FusedNet()


def fused_width():
    return FusedNet(FusedWidth)


def fused_heads_first():
    return FusedNet(FusedHeadsFirst)
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return write_module(tmp_path_factory.mktemp("transformers"), "tmodels", MODELS)


def _bert_data() -> tuple[list[Any], Any]:
    from deploytool.data import Dataset
    from deploytool.recipe import InputSpec

    rng = np.random.default_rng(0)
    mask = np.ones((48, 16), np.int64)
    mask[::3, 12:] = 0
    feeds = {"input_ids": rng.integers(0, 32, (48, 16)).astype(np.int64), "attention_mask": mask}
    specs = [InputSpec(name=n, shape=["batch", 16], dtype="int64") for n in feeds]
    return specs, Dataset(feeds)


def test_bert_heads_and_feed_forward_units_are_removed_whole_and_reload(models: Path, tmp_path: Path) -> None:
    import torch

    from deploytool.checkpoint import save_model
    from deploytool.recipe import PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import attention_layers, prune_model

    specs, data = _bert_data()
    model = load_model(f"{models}:bert", None, models.parent)
    pruned, record = prune_model(model, specs, PruneConfig(ratio=0.5), data, "embedding")
    layers, fused = attention_layers(pruned)
    assert not fused and [a.heads for a in layers] == [2, 2]  # half the heads, whole
    for layer in pruned.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.attention_head_size == 16  # heads keep their width
        assert attention.query.out_features == attention.key.out_features == attention.value.out_features == 32
        assert attention.all_head_size == 32
        assert layer.intermediate.dense.out_features == 64  # feed-forward units halved
        assert layer.output.dense.out_features == 64 and layer.output.LayerNorm.normalized_shape == (64,)  # residual kept
    assert record.params_after < record.params_before
    assert "attention heads kept per layer: 2/4, 2/4 (whole heads removed; the residual width 64 is kept)" in record.notes
    feeds = [torch.from_numpy(data.feeds[s.name][:6]) for s in specs]
    with torch.no_grad():
        out = pruned(*feeds)
    assert out.shape == (6, 64) and torch.isfinite(out).all()
    path = tmp_path / "pruned.safetensors"
    save_model(pruned, path)
    reloaded = load_model(f"{models}:bert", path, models.parent)  # the factory's model, resized from the metadata
    assert reloaded.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(reloaded(*feeds), out)


def test_vit_with_q_proj_layout_keeps_at_least_one_head_and_exports(models: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from deploytool.data import Dataset
    from deploytool.recipe import InputSpec, PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import attention_layers, prune_model

    specs = [InputSpec(name="image", shape=["batch", 1, 16, 16], dtype="float32")]
    data = Dataset({"image": np.random.default_rng(1).random((32, 1, 16, 16), dtype=np.float32)})
    model = load_model(f"{models}:vit", None, models.parent)
    pruned, _ = prune_model(model, specs, PruneConfig(ratio=0.9, round_to=None), data, "classification")
    assert [a.heads for a in attention_layers(pruned)[0]] == [1, 1]  # 90% of 3 heads: one is always kept
    onnx_path = tmp_path / "vit.onnx"
    x = torch.from_numpy(data.feeds["image"][:4])
    torch.onnx.export(pruned, (x,), str(onnx_path), input_names=["image"], output_names=["logits"], dynamo=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], pruned(x).numpy(), atol=1e-4)


def test_distilbert_naming_is_found_and_reloads(models: Path, tmp_path: Path) -> None:
    import torch

    from deploytool.checkpoint import save_model
    from deploytool.recipe import PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import attention_layers, prune_model

    specs, data = _bert_data()
    model = load_model(f"{models}:distil", None, models.parent)
    pruned, _ = prune_model(model, specs, PruneConfig(ratio=0.25), data, "embedding")
    assert [a.heads for a in attention_layers(pruned)[0]] == [3, 3]
    feeds = [torch.from_numpy(data.feeds[s.name][:4]) for s in specs]
    path = tmp_path / "distil.safetensors"
    save_model(pruned, path)
    with torch.no_grad():
        assert torch.equal(load_model(f"{models}:distil", path, models.parent)(*feeds), pruned(*feeds))


def test_heads_ratio_zero_keeps_every_head_and_prunes_the_feed_forward(models: Path) -> None:
    from deploytool.recipe import PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import attention_layers, prune_model

    specs, data = _bert_data()
    model = load_model(f"{models}:bert", None, models.parent)
    pruned, _ = prune_model(model, specs, PruneConfig(ratio=0.5, heads_ratio=0.0), data, "embedding")
    assert [a.heads for a in attention_layers(pruned)[0]] == [4, 4]
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 64
    ignored = PruneConfig(ratio=0.5, ignore=["bert.encoder.layer.0.attention.self.query"])
    pruned, _ = prune_model(model, specs, ignored, data, "embedding")
    assert [a.heads for a in attention_layers(pruned)[0]] == [4, 2]  # an ignored projection keeps its layer's heads
    assert pruned.bert.encoder.layer[0].attention.self.key.out_features == 64


def _tokens() -> tuple[list[Any], Any]:
    from deploytool.data import Dataset
    from deploytool.recipe import InputSpec

    specs = [InputSpec(name="tokens", shape=["batch", 8, 4], dtype="float32")]
    return specs, Dataset({"tokens": np.random.default_rng(2).random((16, 8, 4), dtype=np.float32)})


def test_a_fused_qkv_projection_loses_whole_heads_and_reloads(models: Path, tmp_path: Path) -> None:
    import torch

    from deploytool.checkpoint import save_model
    from deploytool.recipe import PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import attention_layers, fused_attention, prune_model

    specs, data = _tokens()
    model = load_model(f"{models}:fused", None, models.parent)
    assert attention_layers(model) == ([], ["attn"]) and [a.heads for a in fused_attention(model)[0]] == [4]
    pruned, record = prune_model(model, specs, PruneConfig(ratio=0.5, sensitivity=True), data, "classification")
    assert "attention heads kept per layer: 2/4 (whole heads removed; the residual width 32 is kept)" in record.notes
    assert record.sensitivity is not None and "attn.qkv" in record.sensitivity  # the scan removes its heads too
    assert pruned.attn.heads == 2 and pruned.attn.qkv.out_features == 48 and pruned.attn.proj.in_features == 16
    assert pruned.embed.out_features == 32 and pruned.mlp[0].out_features == 64
    feeds = torch.from_numpy(data.feeds["tokens"][:4])
    path = tmp_path / "fused.safetensors"
    save_model(pruned, path)
    with torch.no_grad():
        assert torch.equal(load_model(f"{models}:fused", path, models.parent)(feeds), pruned(feeds))


@pytest.mark.parametrize(("factory", "why"), [
    ("fused_width", "its forward() fails without them"),
    ("fused_heads_first", "does not compute what the unpruned one does"),
])
def test_a_fused_layer_that_cannot_lose_heads_keeps_them_all_and_says_why(models: Path, factory: str, why: str) -> None:
    import torch

    from deploytool.recipe import PruneConfig
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import prune_model

    specs, data = _tokens()
    model = load_model(f"{models}:{factory}", None, models.parent)
    pruned, record = prune_model(model, specs, PruneConfig(ratio=0.5), data, "classification")
    assert any(n.startswith("attention layer attn keeps every head: ") and why in n for n in record.notes), record.notes
    assert pruned.attn.heads == 4 and pruned.attn.qkv.out_features == 96 and pruned.mlp[0].out_features == 64
    feeds = torch.from_numpy(data.feeds["tokens"][:4])
    with torch.no_grad():
        assert pruned(feeds).shape == (4, 3)


def test_removing_fused_heads_matches_zeroing_their_values(models: Path) -> None:
    """The check remove_fused_heads relies on, done by hand: the pruned model equals the original with the
    removed heads' value rows zeroed."""
    import copy

    import torch

    from deploytool.stages.load import load_model
    from deploytool.stages.prune import remove_fused_heads

    specs, data = _tokens()
    model = load_model(f"{models}:fused", None, models.parent)
    feeds = (torch.from_numpy(data.feeds["tokens"][:4]),)
    pruned = copy.deepcopy(model)
    assert remove_fused_heads(pruned, {"attn": 0.5}, 2, feeds) == []
    rows = model.attn.qkv.weight.reshape(3, 4, 8, 32)
    kept = [h for h in range(4) if any(torch.equal(pruned.attn.qkv.weight[8 * i:8 * i + 8], rows[0, h]) for i in range(2))]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for head in sorted(set(range(4)) - set(kept)):
            zeroed.attn.qkv.weight[64 + 8 * head:64 + 8 * head + 8] = 0
            zeroed.attn.qkv.bias[64 + 8 * head:64 + 8 * head + 8] = 0
        assert len(kept) == 2 and torch.allclose(pruned(*feeds), zeroed(*feeds), atol=1e-6)


def test_hidden_state_distillation_matches_the_teachers_layer_norms(models: Path) -> None:
    from deploytool.recipe import DistillConfig, PruneConfig
    from deploytool.stages.distill import distill
    from deploytool.stages.load import load_model
    from deploytool.stages.prune import prune_model

    specs, data = _bert_data()
    teacher = load_model(f"{models}:bert", None, models.parent)
    student, _ = prune_model(teacher, specs, PruneConfig(ratio=0.5), data, "embedding")
    cfg = DistillConfig(epochs=3, lr=3e-3, batch_size=16)
    _, record = distill(teacher, student, specs, data, data, "embedding", cfg)
    assert "bert.encoder.layer.1.output.LayerNorm" in record.hidden_states  # on by default for transformers
    assert record.history[-1]["loss"] < record.history[0]["loss"]
    _, off = distill(teacher, student, specs, data, data, "embedding", cfg.model_copy(update={"hidden_states": False}))
    assert off.hidden_states == []


def test_the_bert_sample_prunes_heads_in_a_recipe() -> None:
    from deploytool.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "digits-bert-pruned.toml")
    assert recipe.prune is not None and recipe.prune.method == "channel" and recipe.distill is not None


def test_output_layers_are_found_by_identity_not_by_a_reused_id() -> None:
    """A freed intermediate's id can come back as a model output's: Hugging Face MgpStr had its first attention's
    qkv or feed-forward layer taken for an output layer (and left unpruned) in some runs."""
    transformers = pytest.importorskip("transformers")
    import torch

    from deploytool.stages.prune import output_heads

    torch.manual_seed(0)
    config = transformers.MgpstrConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[32, 128],
                                       patch_size=4, max_token_length=8)
    encoder = transformers.MgpstrModel(config).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = encoder

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.m(pixel_values=image)[0]

    image = torch.from_numpy(np.random.default_rng(0).random((2, 3, 32, 128), dtype=np.float32))
    found = {tuple(output_heads(Wrapped().eval(), (image,))) for _ in range(8)}
    assert found == {("m.encoder.blocks.1.mlp.fc2",)}
