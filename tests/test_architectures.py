"""Architectures this project did not write (Hugging Face transformers classes from a config, PyTorch's LSTM):
the quantize stage's fallbacks and explanations on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploytool.data import Dataset
from deploytool.recipe import ExportConfig, InputSpec, QuantizeConfig
from deploytool.stages.export import export_onnx
from deploytool.stages.quantize import quantize_onnx

ROOT = Path(__file__).resolve().parents[1]


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _images(count: int, seed: int) -> Dataset:
    return Dataset({"pixel_values": np.random.default_rng(seed).normal(size=(count, 3, 32, 32)).astype(np.float32)})


def test_poolformer_quantizes_although_onnx_runtime_would_copy_a_weight_onto_a_tensor_name(tmp_path: Path) -> None:
    """ONNX Runtime's QDQ quantizer copies a weight shared by several nodes as X1, X2, ... (numbered among the
    initializers only). In the dynamo export of PoolFormer the shared GroupNorm bias is 'val_11' and a Reshape
    writes 'val_117': quantized as it is, the graph fails ("Quantization parameter shared mode is not supported
    for weight yet", or a graph that does not load: "Duplicate definition of name"). The stage renames such
    initializers first."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from transformers import PoolFormerConfig, PoolFormerForImageClassification

    torch.manual_seed(0)
    model = _Logits(PoolFormerForImageClassification(PoolFormerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_labels=4, image_size=32)).eval())
    fp32 = tmp_path / "poolformer.onnx"
    specs = [InputSpec(name="pixel_values", shape=["batch", 3, 32, 32], dtype="float32")]
    export_onnx(model, specs, ["logits"], ExportConfig(exporter="dynamo"), _images(2, 0), fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([_images(4, 1).feeds])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    try:  # the failure this guards against, as ONNX Runtime 1.32 has it (a later release may fix it)
        quantize_static(str(fp32), str(tmp_path / "plain.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, per_channel=True)
        ort.InferenceSession(str(tmp_path / "plain.onnx"))
    except Exception as exc:
        assert "shared mode" in str(exc) or "Duplicate definition" in str(exc), exc

    int8 = tmp_path / "poolformer.int8.onnx"
    record = quantize_onnx(fp32, int8, QuantizeConfig(), _images(16, 1), evaluation=_images(16, 2))
    assert record.settings["op_types"] is None  # every op type ONNX Runtime quantizes, nothing dropped
    quantized = onnx.load(str(int8))
    assert sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node) > 10
    onnx.checker.check_model(quantized, full_check=True)
    out = ort.InferenceSession(str(int8)).run(None, _images(4, 3).feeds)[0]
    assert out.shape == (4, 4) and np.isfinite(out).all()


class _Recurrent(nn.Module):
    """A two-layer recurrent classifier over frames: the digits read row by row (8 frames of 8 pixels)."""

    def __init__(self, cell: type[nn.Module], features: int = 8, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

        self.per_step = False  # True: logits at every frame (batch, frames, classes), as a tagger or an LM returns

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        states = self.rnn(frames)[0]
        return self.head(states if self.per_step else states[:, -1])


def _digit_rows(split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ROOT / "samples" / "digits" / f"{split}.npz") as data:
        return data["image"][:, 0].astype(np.float32), data["labels"].astype(np.int64)


def _trained_recurrent(cell: type[nn.Module], folder: Path, per_step: bool = False) -> tuple[Path, Dataset, Dataset]:
    """A recurrent classifier trained on the digits rows (seconds), exported (with logits at every frame when
    `per_step`); its calibration and validation data."""
    torch.manual_seed(0)
    model = _Recurrent(cell)
    frames, labels = _digit_rows("train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        for batch in torch.randperm(len(labels)).split(64):
            loss = nn.functional.cross_entropy(model(torch.from_numpy(frames[batch])), torch.from_numpy(labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    calibration = Dataset({"frames": _digit_rows("calib")[0][:64]})
    images, val_labels = _digit_rows("val")
    validation = Dataset({"frames": images[:128]}, val_labels[:128])
    with torch.no_grad():
        assert (model(torch.from_numpy(images)).argmax(1).numpy() == val_labels).mean() > 0.8  # it learned the task
    model.per_step = per_step
    fp32 = folder / "recurrent.onnx"
    export_onnx(model, [InputSpec(name="frames", shape=["batch", 8, 8], dtype="float32")], ["logits"],
                ExportConfig(exporter="torchscript"), calibration.head(2), fp32)
    return fp32, calibration, validation


def test_int8_that_leaves_the_recurrent_weights_float_says_so(tmp_path: Path) -> None:
    """ONNX Runtime has no int8 GRU kernel, static or dynamic: almost every weight stays float, and the record says
    why int8 cannot make such a model faster."""
    fp32, calibration, validation = _trained_recurrent(nn.GRU, tmp_path)
    record = quantize_onnx(fp32, tmp_path / "gru.int8.onnx", QuantizeConfig(), calibration, 16, validation)
    assert float(record.settings["int8_weight_share"]) < 0.1  # type: ignore[arg-type]
    assert any(n.startswith("only ") and "GRU" in n and "neither GRU or RNN" in n for n in record.notes), record.notes
    assert not any("dynamic" in str(a["search"]) for a in record.attempts)  # no LSTM, no transformer: no dynamic candidate


def test_lstm_layers_are_quantized_by_the_dynamic_candidate(tmp_path: Path) -> None:
    """Static int8 has no LSTM kernel, ONNX Runtime's dynamic int8 has one (DynamicQuantizeLSTM): at defaults the
    quantize stage scores the dynamic candidate on a model with LSTM nodes and keeps it when it meets the targets
    faster (the benchmark, docs/zoo.md, shows the speed)."""
    fp32, calibration, validation = _trained_recurrent(nn.LSTM, tmp_path)
    out = tmp_path / "lstm.int8.onnx"
    record = quantize_onnx(fp32, out, QuantizeConfig(), calibration, 16, validation)
    dynamic = next(a for a in record.attempts if a["search"] == "dynamic MatMuls and LSTMs")
    assert dynamic["meets_targets"] and float(dynamic["top1_agreement"]) >= 0.99  # type: ignore[arg-type]
    ranges = record.settings["activation_ranges"]
    assert isinstance(ranges, dict) and ranges["chosen"] in ("static", "dynamic") and ranges["why"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    if ranges["chosen"] == "dynamic":
        assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
        assert float(record.settings["int8_weight_share"]) > 0.9  # type: ignore[arg-type]
        assert any(n.startswith("dynamic int8 MatMuls and LSTMs chosen") for n in record.notes), record.notes
    else:  # kept static only because the dynamic model was measured no faster
        assert "LSTM" in ops and "dynamic runs" in str(ranges["why"])


def test_top1_agreement_of_logits_per_position_is_scored_on_the_last_axis(tmp_path: Path) -> None:
    """A model with a class per position (batch, frames, classes), like a token classifier or an LM head: the quantize
    stage scores top-1 agreement over the last axis, as the verify gate does, so a default int8 model that agrees
    meets the target instead of sending the search on to keep every node in float."""
    from deploytool.stages.quantize import Targets

    fp32, calibration, validation = _trained_recurrent(nn.LSTM, tmp_path, per_step=True)
    validation = Dataset(validation.feeds, None)
    targets = Targets(min_cosine=0.99, min_top1_agreement=0.95)
    record = quantize_onnx(fp32, tmp_path / "tagger.int8.onnx", QuantizeConfig(dynamic_candidate=False), calibration, 16,
                           validation, targets)
    default = record.attempts[0]
    assert default["search"] == "default" and "top1_agreement" in default
    assert default["meets_targets"] and not record.float_nodes, record.attempts


def test_a_fully_quantized_cnn_holds_its_weights_in_eight_bits(digits_run: tuple[object, Path], calib: Dataset,
                                                              tmp_path: Path) -> None:
    _, out = digits_run
    record = quantize_onnx(out / "model.onnx", tmp_path / "int8.onnx", QuantizeConfig(), calib)
    assert float(record.settings["int8_weight_share"]) > 0.95  # type: ignore[arg-type]
    assert not any(n.startswith("only ") for n in record.notes)


def test_a_named_subset_of_a_model_output_dict_is_exported_by_name(tmp_path: Path) -> None:
    """transformers models return a ModelOutput dict; exporters flatten it by order. Naming only `pooler_output`
    (the second entry) must export that tensor under that name, not the first entry."""
    import onnxruntime as ort
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=14)).eval()
    data = Dataset({"pixel_values": np.random.default_rng(0).normal(size=(3, 3, 28, 28)).astype(np.float32)})
    path = tmp_path / "dinov2.onnx"
    for exporter in ("dynamo", "torchscript"):
        export_onnx(model, [InputSpec(name="pixel_values", shape=["batch", 3, 28, 28], dtype="float32")], ["pooler_output"],
                    ExportConfig(exporter=exporter), data, path)
        session = ort.InferenceSession(str(path))
        assert [o.name for o in session.get_outputs()] == ["pooler_output"]
        got = session.run(None, data.feeds)[0]
        with torch.inference_mode():
            want = model(pixel_values=torch.from_numpy(data.feeds["pixel_values"])).pooler_output.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
        path.unlink()


def test_inputs_bind_by_name_when_forward_takes_them_in_another_order(tmp_path: Path) -> None:
    """BloomForCausalLM.forward(input_ids, past_key_values, attention_mask, ...): a recipe's inputs
    [input_ids, attention_mask] passed by position would feed the mask in as the cache. They are passed by name, in
    export and in the PyTorch runner alike."""
    import onnxruntime as ort
    from transformers import BloomConfig, BloomForCausalLM

    from deploytool.runners import TorchRunner, keyword_inputs

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=100, use_cache=False)).eval()
    names = ["input_ids", "attention_mask"]
    assert keyword_inputs(model, names) and not keyword_inputs(model, ["input_ids"])
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None, :] < np.array([[12], [7], [4]])).astype(np.int64)
    data = Dataset({"input_ids": rng.integers(3, 100, size=(3, 12)).astype(np.int64), "attention_mask": mask})
    specs = [InputSpec(name=n, shape=["batch", 12], dtype="int64") for n in names]
    path = tmp_path / "bloom.onnx"
    assert export_onnx(model, specs, ["logits"], ExportConfig(exporter="dynamo"), data, path).exporter == "dynamo"
    got = ort.InferenceSession(str(path)).run(None, data.feeds)[0]
    want = TorchRunner("torch", model, names, ["logits"]).infer(data.feeds)[0]
    with torch.inference_mode():
        direct = model(input_ids=torch.from_numpy(data.feeds["input_ids"]), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(want, direct, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_keyword_binding_only_where_forward_names_every_input_in_another_order() -> None:
    from deploytool.runners import keyword_inputs

    class Ordered(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    class Reordered(nn.Module):
        def forward(self, b: torch.Tensor, cache: object = None, a: torch.Tensor | None = None) -> torch.Tensor:
            return b

    class Anything(nn.Module):
        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            return args[0]

    class PositionalOnly(nn.Module):
        def forward(self, b: torch.Tensor, a: torch.Tensor, /) -> torch.Tensor:
            return a

    assert not keyword_inputs(Ordered(), ["a", "b"])
    assert keyword_inputs(Ordered(), ["b", "a"])
    assert keyword_inputs(Reordered(), ["b", "a"])  # b first, but a is not the second parameter
    assert not keyword_inputs(Reordered(), ["b", "cache"])
    assert not keyword_inputs(Anything(), ["a", "b"])  # no names to bind to
    assert not keyword_inputs(PositionalOnly(), ["a", "b"])  # cannot be passed by keyword
    assert not keyword_inputs(Ordered(), ["a", "c"])  # a name forward() does not have: by position, as before


def test_initializers_whose_numbered_copies_would_take_a_tensor_name_are_renamed(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from deploytool.stages.quantize import _unambiguous_initializers

    weight = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "val_1")
    default = numpy_helper.from_array(np.ones((4,), np.float32), "bias")  # an initializer that is also a graph input
    nodes = [helper.make_node("Mul", ["x", "val_1"], ["val_12"]), helper.make_node("Mul", ["val_12", "val_1"], ["val_13"]),
             helper.make_node("Add", ["val_13", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
                                           helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [weight, default])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    out = _unambiguous_initializers(path, tmp_path / "renamed.onnx")
    assert out == tmp_path / "renamed.onnx"
    renamed = onnx.load(str(out))
    names = {i.name for i in renamed.graph.initializer}
    assert "val_1" not in names and "bias" in names  # val_1 + "2" would be val_12, a tensor; bias clashes with nothing
    produced = {o for n in renamed.graph.node for o in n.output}
    assert not any(p.startswith(n) and p[len(n):].isdigit() for n in names for p in produced)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, {"x": x})[0], before)
    # nothing to rename: the same file back; a graph with subgraphs is left alone
    assert _unambiguous_initializers(out, tmp_path / "again.onnx") == out
    branch = helper.make_graph([helper.make_node("Identity", ["val_1"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])])
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch))
    onnx.save(model, str(tmp_path / "if.onnx"))
    assert _unambiguous_initializers(tmp_path / "if.onnx", tmp_path / "if2.onnx") == tmp_path / "if.onnx"


def test_pruning_refuses_a_model_whose_inputs_would_land_in_the_wrong_parameters() -> None:
    from deploytool.errors import UserError
    from deploytool.recipe import PruneConfig
    from deploytool.stages.prune import prune_model

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 50)

        def forward(self, input_ids: torch.Tensor, cache: object = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
            return self.out(hidden)

    specs = [InputSpec(name="input_ids", shape=["batch", 8], dtype="int64"),
             InputSpec(name="attention_mask", shape=["batch", 8], dtype="int64")]
    data = Dataset({"input_ids": np.ones((4, 8), np.int64), "attention_mask": np.ones((4, 8), np.int64)})
    with pytest.raises(UserError, match="in another order"):
        prune_model(Decoder(), specs, PruneConfig(), data, "generic")
