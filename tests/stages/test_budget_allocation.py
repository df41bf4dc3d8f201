"""Per-layer pruning ratios for a latency budget: where ONNX Runtime spends its time, per layer (its own profiler,
traced back to the PyTorch layers), and the trade-off of time saved against accuracy lost that picks the ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIGITS, ROOT, tiny_hf_vit


def _digits_cnn() -> Any:
    from deploytool.stages.load import load_model

    return load_model(f"{DIGITS / 'model.py'}:build", DIGITS / "cnn.pt", ROOT)


def test_onnx_runtime_time_is_placed_on_the_pytorch_layers(tmp_path: Path, specs: list[Any], calib: Any) -> None:
    from deploytool.recipe import ExportConfig
    from deploytool.stages.budget import layer_latency
    from deploytool.stages.export import export_onnx
    from deploytool.stages.prune import _prunable

    model = _digits_cnn()
    weights = {n: m.weight.detach().numpy() for n, m in _prunable(model).items()}
    layers = list(weights)
    for exporter in ("dynamo", "torchscript"):
        path = tmp_path / f"{exporter}.onnx"
        export_onnx(model, specs, ["logits"], ExportConfig(exporter=exporter), calib.head(2), path)
        spent, share = layer_latency(path, next(calib.head(1).batches(1)), weights, threads=1, calls=20)
        # dynamo keeps the parameter names (renaming only transposed Linear weights, found by value); TorchScript
        # folds BatchNorm into renamed weights, and its node names carry the module path ("/block/conv1/conv1.0/Conv")
        assert set(spent) == set(layers) and all(ms > 0 for ms in spent.values()), (exporter, spent)
        assert 0.8 <= share <= 1.0, (exporter, share)


def test_allocations_walk_from_the_cheapest_trade_to_the_most_time_saved() -> None:
    from deploytool.stages.budget import allocations

    options = {  # (ratio, ms saved, loss) of pruning each layer alone
        "a": [(0.25, 1.0, 0.01), (0.5, 2.0, 0.04), (0.75, 2.5, 0.30)],  # slow and robust
        "b": [(0.25, 0.2, 0.05), (0.5, 0.4, 0.20), (0.75, 0.5, 0.60)],  # fast and sensitive
        "c": [(0.25, 0.0, 0.00), (0.5, 0.0, 0.01), (0.75, float("nan"), 0.1)],  # saves nothing measurable
    }
    found = allocations(options)
    assert found[0] == {"a": 0.25}  # 100 ms per unit of loss: the best trade comes first
    assert found[-1] == {"a": 0.75, "b": 0.75}  # at no price on accuracy: every layer's most time saved
    assert all("c" not in a for a in found)  # a layer that saves no time is never pruned, whatever it costs
    saved = [sum(dict((r, s) for r, s, _ in options[k])[v] for k, v in a.items()) for a in found]
    assert saved == sorted(saved) and len(set(map(str, found))) == len(found)  # more time saved at every step
    for earlier, later in zip(found, found[1:]):
        assert all(later.get(k, 0) >= v for k, v in earlier.items())  # no layer's ratio goes back down


def test_a_measured_allocation_prunes_layers_by_their_time_and_sensitivity(specs: list[Any], calib: Any) -> None:
    from deploytool.recipe import ExportConfig, PruneConfig
    from deploytool.stages.prune import LatencyContext, _prunable, prune_model

    model = _digits_cnn()
    cfg = PruneConfig(target_speedup=1.3, allocation="measured", scan_ratios=[0.5], round_to=None)
    pruned, record = prune_model(model, specs, cfg, calib, "classification",
                                 latency=LatencyContext(["logits"], ExportConfig(), 1, 1))
    budget = record.budget
    assert budget is not None and budget["allocation"] == "measured"
    assert budget["profiled_share"] >= 0.8 and set(budget["layer_ms"]) <= set(_prunable(model))
    assert all("layers_pruned" in p for p in budget["points"]) and [p for p in budget["points"] if p.get("chosen")]
    if budget["met"]:
        by_layer = budget["chosen_ratios"]
        assert by_layer and set(by_layer) <= set(_prunable(model)) and set(by_layer.values()) <= {0.5, 0.9}
        assert any(n.startswith("latency budget: per-layer ratios") for n in record.notes)
        before, after = _prunable(model), _prunable(pruned)
        for name, ratio in by_layer.items():  # the chosen layers lost that share of their output channels
            assert after[name].weight.shape[0] == pytest.approx(before[name].weight.shape[0] * (1 - ratio), abs=1)
    assert record.ratio == budget["chosen_ratio"]
    assert np.isfinite(budget["chosen_ratio"])


def test_a_transformers_renamed_linear_weights_are_found_by_value(tmp_path: Path) -> None:
    """The dynamo exporter stores a Linear's weight transposed under a new name ("val_28"): the profile is still
    placed on the attention and feed-forward layers of a transformer we did not write."""
    pytest.importorskip("transformers")
    from deploytool.stages.budget import layer_latency
    from deploytool.stages.prune import _prunable

    model, _, data, path = tiny_hf_vit(tmp_path, 4, exporter="dynamo", hidden_size=48, num_hidden_layers=2,
                                       num_attention_heads=3, intermediate_size=96)
    weights = {n: m.weight.detach().numpy() for n, m in _prunable(model).items()}
    spent, share = layer_latency(path, next(data.head(1).batches(1)), weights, threads=1, calls=20)
    assert share >= 0.6, share
    assert len(spent) >= len(weights) - 1, sorted(set(weights) - set(spent))  # every Linear, the patch-embedding Conv


def test_measured_widths_keep_channels_that_cost_no_time(tmp_path: Path) -> None:
    """round_to = "measured": each pruned layer is profiled alone at its planned width and the multiples of 4 above
    it; the widest within 2% of the planned width's time is kept, and pruning keeps exactly that many channels (a
    depthwise Conv moves with its input; a grouped Conv cannot be timed alone and keeps a multiple of 8)."""
    import torch

    from deploytool.data import Dataset
    from deploytool.recipe import InputSpec, PruneConfig
    from deploytool.stages.budget import WIDTH_TOLERANCE, WidthChooser
    from deploytool.stages.prune import _prunable, channel_prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(48, 48, 3, padding=1, groups=48), torch.nn.ReLU(),  # depthwise: pruned with the layer before
        torch.nn.Conv2d(48, 40, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(40, 40, 3, padding=1, groups=4), torch.nn.ReLU(),  # grouped: not timed alone
        torch.nn.Flatten(), torch.nn.Linear(40 * 16 * 16, 36), torch.nn.ReLU(), torch.nn.Linear(36, 10),
    ).eval()
    example = (torch.randn(1, 3, 16, 16),)
    chooser = WidthChooser(model, example, threads=1, folder=tmp_path)
    ratios = {"0": 0.6, "2": 0.6, "4": 0.5, "6": 0.5, "9": 0.5}
    exact, widths = chooser.exact(ratios)
    layers = _prunable(model)
    for name, (planned, chosen) in widths.items():
        total = int(layers[name].weight.shape[0])
        assert planned == int(total * (1 - ratios[name])), (name, planned)
        if (name, planned) in chooser.timings:  # the widest width within the tolerance of the planned one's time
            spent = chooser.timings[(name, planned)]
            assert planned <= chosen <= total and chosen in spent, (name, planned, chosen)
            assert max(w for w in spent if spent[w] <= spent[planned] * (1 + WIDTH_TOLERANCE) + 1e-5) == chosen
    assert ("6", 20) not in chooser.timings and widths["6"] == [20, 16]  # grouped: a multiple of 8, not timed
    assert {("0", 19), ("2", 19), ("4", 20), ("9", 18)} <= set(chooser.timings)  # depthwise and Linear are timed
    data = Dataset({"x": np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)})
    pruned = channel_prune(model, [InputSpec(name="x", shape=["batch", 3, 16, 16])],
                           PruneConfig(target_speedup=2.0, round_to="measured"), data,
                           ratio_by_layer={"0": exact["0"], "9": exact["9"]})
    after = _prunable(pruned)
    assert after["0"].weight.shape[0] == widths["0"][1] and after["9"].weight.shape[0] == widths["9"][1]


def test_measured_widths_need_a_latency_budget() -> None:
    from pydantic import ValidationError

    from deploytool.recipe import PruneConfig

    assert PruneConfig(target_speedup=2.0).round_to == 8 == PruneConfig().round_to
    assert PruneConfig(target_latency_ms=1.0, round_to="measured").round_to == "measured"
    with pytest.raises(ValidationError, match="inside a latency-budget search"):
        PruneConfig(round_to="measured")


def test_measured_widths_that_slow_the_whole_network_are_not_kept(specs: list[Any], calib: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer's width is measured alone, so the whole network is timed too, against the same allocation with
    its planned widths rounded down to multiples of 8: widths that make it slower are not kept (here every width is
    held to be slower: a tolerance below -100 %)."""
    from deploytool.recipe import ExportConfig, PruneConfig
    from deploytool.stages import budget as budget_module
    from deploytool.stages.prune import LatencyContext, prune_model

    monkeypatch.setattr(budget_module, "WIDTH_TOLERANCE", -1.5)
    cfg = PruneConfig(target_speedup=1.3, scan_ratios=[0.5], round_to="measured")
    assert cfg.allocation == "measured"
    _, record = prune_model(_digits_cnn(), specs, cfg, calib, "classification",
                            latency=LatencyContext(["logits"], ExportConfig(), 1, 1))
    budget = record.budget
    assert budget is not None and budget["allocation"] == "measured"
    timed = [p for p in budget["points"] if "widths" in p]
    assert timed and all(p["widths"] == "rounded" and set(p["widths_ms"]) == {"measured", "rounded"} for p in timed)
    chosen = next(p for p in budget["points"] if p.get("chosen"))
    if chosen.get("widths") == "rounded":
        assert all(kept % 8 == 0 or kept >= planned for planned, kept in budget["widths"].values())
        assert any("not kept" in n for n in record.notes)
