"""Pruning to a latency budget: the channel-pruning ratio is searched by measured ONNX Runtime latency on this
CPU, not by MACs.

Every candidate ratio is pruned (Torch-Pruning, as the prune stage does), exported to ONNX and timed against
the ONNX export of the original by the shared block method (deploytool.latency, with its A/A control), at the
latency batch of the recipe. The search looks for the least pruning whose pruned model is at least
`target_speedup` times faster (or runs within `target_latency_ms`) over its whole confidence interval, as
verify's gate will judge it, by bisection: one ratio for every layer, or per-layer ratios traded off by each
layer's measured time and sensitivity (allocations). The fewest channels removed for the speed asked for, so
the least accuracy lost. Each measured point (ratio, MACs,
latency, speedup with its interval, agreement with the original before any distillation) is recorded: the
trade-off curve of the report.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.hardware import DEFAULT_THREADS
from deploytool.recipe import ExportConfig, InputSpec, PruneConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WARMUP = 5  # profiled calls not counted
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the nodes that multiply by a layer's weight
STEPS = 6  # bisection rounds after the end points: the ratio to within (max_ratio - 0) / 2**6


@dataclass
class BudgetSearch:
    """What the search measured and chose (the record's `budget`)."""

    target_speedup: float | None
    target_latency_ms: float | None
    allocation: str = "uniform"
    baseline_ms: float = 0.0
    needed_speedup: float = 0.0
    chosen_ratio: float = 0.0
    max_effective_ratio: float = 0.0
    met: bool = False
    points: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chosen_ratios: dict[str, float] | None = None  # per layer, when the allocation is measured
    layer_ms: dict[str, float] | None = None  # the original's ONNX Runtime time per layer, when measured
    profiled_share: float | None = None  # the share of ONNX Runtime's node time placed on layers

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "notes"}


def _outputs_quality(reference: list[np.ndarray], outputs: list[np.ndarray], task: str) -> dict[str, float]:
    from deploytool.compare import compare_arrays, top1_agreement

    stats = compare_arrays(reference[0], outputs[0])
    quality = {"cosine": round(float(stats["cosine_mean"]), 6)}  # type: ignore[arg-type]
    if task == "classification" and reference[0].ndim >= 2 and reference[0].shape[-1] > 1:
        quality["top1_agreement"] = round(top1_agreement(reference[0], outputs[0]), 6)
    return quality


def layer_latency(path: Path, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray], threads: int,
                  calls: int = 100) -> tuple[dict[str, float], float]:
    """Where ONNX Runtime spends its time, per PyTorch layer: ({layer: ms per call}, the share of node time placed).

    ONNX Runtime's own profiler times every node it runs, after its graph optimizations (fused activations, NCHWc
    convolutions). Each of those nodes is traced back to the exported graph by name, then to the layer whose weight
    it multiplies by (`weights`: {layer: its weight}; found by the parameter's name, by the module path in a
    TorchScript node name, or by value where the exporter renamed a transposed copy); a node without a weight (an
    activation, an add, a layout reorder) counts for the layer that produced its input, since its cost shrinks
    with that layer's channels."""
    import json
    import re

    import onnx
    import onnx.numpy_helper
    import onnxruntime as ort

    from deploytool.runners import session_options

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    known = set(weights)
    by_value: dict[str, str] = {}  # renamed weights (dynamo's transposed Linear weights "val_12"), matched by value
    shapes: dict[tuple[int, ...], list[str]] = {}
    for layer, weight in weights.items():
        for shape in {weight.shape, weight.T.shape if weight.ndim == 2 else weight.shape}:
            shapes.setdefault(tuple(shape), []).append(layer)
    consumed = {i for n in graph.node if n.op_type in COMPUTE_OPS for i in n.input}
    for init in graph.initializer:
        if init.name in consumed and not init.name.endswith(".weight") and tuple(init.dims) in shapes:
            array = onnx.numpy_helper.to_array(init)
            same = [layer for layer in shapes[tuple(init.dims)]
                    if any(array.shape == w.shape and np.array_equal(array, w) for w in (weights[layer], weights[layer].T))]
            if same:
                by_value[init.name] = same[0]

    def known_suffix(parts: list[str]) -> str | None:
        """The longest tail of a dotted module path that names a layer (wrappers add prefixes)."""
        return next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in known), None)

    def weight_layer(name: str) -> str | None:
        """The layer a weight initializer belongs to: its name is the parameter's, under any wrapper prefix."""
        if name in by_value:
            return by_value[name]
        return known_suffix(name[: -len(".weight")].split(".")) if name.endswith(".weight") else None

    def scope_layer(node: onnx.NodeProto) -> str | None:
        """The layer a TorchScript-exported node names in its scope path ("/layer1/layer1.0/conv1/Conv"), for
        weights it renamed (BatchNorm folded into "onnx::Conv_12")."""
        parts: list[str] = []
        for part in node.name.strip("/").split("/")[:-1]:  # a segment may repeat the tail of the path before it
            tail = next((k for k in range(len(parts), 0, -1) if part.startswith(".".join(parts[-k:]) + ".")), 0)
            parts = parts[: len(parts) - tail] + part.split(".")
        return known_suffix(parts)

    def owner(node: onnx.NodeProto) -> str | None:
        for _ in range(12):  # back through activations, adds and reshapes to the layer that fed them
            if node.op_type in COMPUTE_OPS and (layer := scope_layer(node)):
                return layer
            for name in node.input:
                source = producer.get(name)
                if name in initializers and (layer := weight_layer(name)):
                    return layer
                if source is not None and source.op_type == "Transpose" and (layer := weight_layer(source.input[0])):
                    return layer
            data = next((producer[n] for n in node.input if n in producer), None)
            if data is None:
                return None
            node = data
        return None

    with tempfile.TemporaryDirectory(prefix="deploytool-profile-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(calls + WARMUP):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    warm = runs[WARMUP - 1] if len(runs) >= WARMUP else -1  # the first calls allocate and are slow: not counted
    spent: dict[str, float] = {}
    placed = total = 0.0
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time") or event["ts"] <= warm:
            continue
        name = event["name"][: -len("_kernel_time")]
        total += event["dur"]
        base = re.sub(r"(_nchwc|_token_\d+)+$", "", name)
        node = by_name.get(name) or by_name.get(base) or producer.get(base) or producer.get(name)
        found = owner(node) if node is not None else None
        if found is not None:
            spent[found] = spent.get(found, 0.0) + event["dur"] / 1000.0 / calls
            placed += event["dur"]
    return spent, (placed / total if total else 0.0)


def removed_channels(model: torch.nn.Module, pruned: torch.nn.Module) -> float:
    """The fraction of the prunable layers' output channels (or features) that pruning removed."""
    from deploytool.stages.prune import _prunable

    before, after = _prunable(model), _prunable(pruned)
    widths = [(int(m.weight.shape[0]), int(after[n].weight.shape[0])) for n, m in before.items() if n in after]
    total = sum(b for b, _ in widths)
    return 1.0 - sum(a for _, a in widths) / total if total else 0.0


def _removed_weights(model: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, float]:
    """Per layer, the fraction of its weights pruning removed (its output channels, its input channels or both)."""
    from deploytool.stages.prune import _prunable

    after = _prunable(pruned)
    return {n: 1.0 - after[n].weight.numel() / m.weight.numel() for n, m in _prunable(model).items()
            if n in after and m.weight.numel()}


def allocations(options: dict[str, list[tuple[float, float, float]]]) -> list[dict[str, float]]:
    """Per-layer ratios for every trade-off between time saved and accuracy lost, from the least pruning to the most.

    `options` holds, per layer, (ratio, ms saved, loss) for pruning that layer alone. For an exchange rate lam (ms
    per unit of loss) every layer takes the ratio with the most `saved - lam * loss`; lowering lam from infinity to
    0 walks from no pruning to the most time saved. Only the rates where some layer's choice changes matter, so
    the list has one allocation per change (ties go to the smaller ratio)."""
    table = {layer: [(0.0, 0.0, 0.0), *(o for o in opts if np.isfinite(o[1]) and np.isfinite(o[2]))]
             for layer, opts in options.items()}
    rates = {float("inf"), 0.0}
    for opts in table.values():
        for i, (_, saved_a, loss_a) in enumerate(opts):
            for _, saved_b, loss_b in opts[i + 1:]:
                if loss_a != loss_b and (saved_a - saved_b) / (loss_a - loss_b) > 0:
                    rates.add((saved_a - saved_b) / (loss_a - loss_b))
    found: list[dict[str, float]] = []
    for rate in sorted(rates, reverse=True):
        lam = 1e30 if rate == float("inf") else rate * (1 - 1e-9)  # just past the change
        choice = {layer: max(opts, key=lambda o: (o[1] - lam * o[2], -o[0]))[0] for layer, opts in table.items()}
        choice = {layer: r for layer, r in choice.items() if r > 0}
        if choice and (not found or choice != found[-1]):
            found.append(choice)
    return found


def _measured_allocations(model: torch.nn.Module, specs: Sequence[InputSpec], cfg: PruneConfig, data: Dataset,
                          original: Path, feeds: dict[str, np.ndarray], threads: int, search: BudgetSearch,
                          progress: Any) -> list[dict[str, float]]:
    """Candidate per-layer ratios (see allocations) from the original's measured ONNX Runtime time per layer and
    each layer's sensitivity: every scanned layer is pruned alone at each scan ratio (and max_ratio); the time it
    saves is each affected layer's measured time times the share of that layer's weights removed, and its loss is
    1 - the cosine of the model's outputs to the original's. An empty list (uniform search) when the profile
    cannot be placed on the layers."""
    from deploytool.compare import compare_signal
    from deploytool.runners import TorchRunner, infer_dataset
    from deploytool.stages.prune import _prunable, single_layer_prunes

    weights = {n: m.weight.detach().cpu().numpy() for n, m in _prunable(model).items()}
    layer_ms, share = layer_latency(original, feeds, weights, threads)
    search.profiled_share = round(share, 4)
    if share < 0.5:
        search.allocation = "uniform"
        search.notes.append(f"per-layer allocation not used: only {share:.0%} of ONNX Runtime's node time could be placed "
                            "on the model's layers (weights renamed by the exporter); one ratio for every layer")
        return []
    search.layer_ms = {n: round(v, 4) for n, v in sorted(layer_ms.items(), key=lambda kv: -kv[1])}
    probe = data.head(min(len(data), 128))
    names = [s.name for s in specs]
    reference = infer_dataset(TorchRunner("m", model, names, None), probe, 128)
    ratios = sorted(set(cfg.scan_ratios) | {cfg.max_ratio})
    options: dict[str, list[tuple[float, float, float]]] = {}
    for layer, ratio, pruned in single_layer_prunes(model, specs, cfg, data, ratios, progress,
                                                    "measuring each layer's trade-off"):
        options.setdefault(layer, [])
        if pruned is None:
            continue
        saved = sum(layer_ms.get(n, 0.0) * f for n, f in _removed_weights(model, pruned).items())
        outputs = infer_dataset(TorchRunner("m", pruned, names, None), probe, 128)
        loss = 1.0 - float(compare_signal(reference[0], outputs[0])["cosine_mean"])  # type: ignore[arg-type]
        options[layer].append((ratio, saved, max(loss, 0.0)))
    found = allocations(options)
    if not found:
        search.allocation, search.layer_ms = "uniform", None
        search.notes.append("per-layer allocation not used: pruning no single layer saves measured time; one ratio for "
                            "every layer")
    return found


def search_ratio(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    outputs: Sequence[str],
    cfg: PruneConfig,
    data: Dataset,
    task: str,
    export: ExportConfig,
    latency_batch: int = 1,
    threads: int = DEFAULT_THREADS,
    progress: Any = None,
) -> BudgetSearch:
    """The least pruning (up to cfg.max_ratio) that meets the latency budget, by measurement: one ratio for every
    layer (allocation = "uniform"), or per-layer ratios traded off by measured layer latency against each layer's
    sensitivity (allocation = "measured", see allocations)."""
    import torch

    from deploytool.latency import TimingPlan, measure
    from deploytool.runners import OrtRunner, infer_dataset
    from deploytool.stages.export import export_onnx
    from deploytool.stages.prune import channel_prune, count_macs

    if cfg.target_speedup is None and cfg.target_latency_ms is None:
        raise UserError("[prune] a latency budget needs target_speedup or target_latency_ms")
    search = BudgetSearch(cfg.target_speedup, cfg.target_latency_ms, allocation=cfg.allocation)
    probe = data.head(min(len(data), 256))
    batch = min(latency_batch, len(data))
    feeds = next(data.head(batch).batches(batch))
    example_data = data.head(2)
    example = tuple(torch.from_numpy(np.ascontiguousarray(example_data.feeds[s.name][:1])) for s in specs)
    plan = TimingPlan.for_calls(200, block=10, warmup=5, max_seconds=20.0)
    with tempfile.TemporaryDirectory(prefix="deploytool-budget-") as tmp:
        folder = Path(tmp)
        original = folder / "original.onnx"
        export_onnx(model, specs, outputs, export, example_data, original)
        base = OrtRunner("original", original, threads)
        reference = infer_dataset(base, probe, 64)
        measured: dict[Any, dict[str, Any]] = {}
        architectures: dict[tuple[int | None, int], dict[str, Any]] = {}

        def point(ratio: float, by_layer: dict[str, float] | None = None) -> dict[str, Any]:
            key = (round(ratio, 4), tuple(sorted(by_layer.items())) if by_layer is not None else None)
            if key in measured:
                return measured[key]
            pruned = channel_prune(model, specs, cfg.model_copy(update={"ratio": ratio}), data, ratio_by_layer=by_layer)
            macs, params = count_macs(pruned, example)
            if (macs, params) in architectures:  # round_to gives several ratios the same widths: the same network
                measured[key] = architectures[(macs, params)]
                return measured[key]
            path = folder / f"pruned-{len(measured)}.onnx"
            export_onnx(pruned, specs, outputs, export, example_data, path)
            runner = OrtRunner("pruned", path, threads)
            timing = measure([base, runner], feeds, plan, control=True)
            speedup = timing.speedup("original", "pruned")
            base_ms, pruned_ms = timing.timed["original"].center_ms, timing.timed["pruned"].center_ms
            shown = round(ratio, 4) if by_layer is None else round(removed_channels(model, pruned), 4)
            row: dict[str, Any] = {"ratio": shown, "macs": macs, "latency_ms": round(pruned_ms, 4), "original_ms": round(base_ms, 4),
                   "speedup": round(speedup.value, 4), "speedup_ci": [round(speedup.low, 4), round(speedup.high, 4)],
                   **_outputs_quality(reference, infer_dataset(runner, probe, 64), task)}
            if by_layer is not None:
                row["layers_pruned"] = sum(1 for r in by_layer.values() if r > 0)
            measured[key] = architectures[(macs, params)] = row
            row["_by_layer"] = by_layer
            search.points.append(row)
            log.info("budget search: ratio %.3f -> %.3f ms, %s", shown, pruned_ms, speedup)
            return row

        def needed(row: dict[str, Any]) -> float:
            """The speedup over the original the budget asks for, from this row's own timing of the original."""
            wanted = cfg.target_speedup or 0.0
            if cfg.target_latency_ms is not None:
                wanted = max(wanted, float(row["original_ms"]) / cfg.target_latency_ms)
            return wanted

        def meets(row: dict[str, Any]) -> bool:
            """As verify's gate decides: the whole interval clears the budget. On the point estimate alone, the
            bisection kept lucky timings (a search that measured 2.5x on 2 threads verified at 2.19x [2.09, 2.23])."""
            return float(row["speedup_ci"][0]) >= needed(row)

        candidates: list[tuple[float, dict[str, float] | None]] = []
        if cfg.allocation == "measured":
            candidates = [(0.0, a) for a in _measured_allocations(model, specs, cfg, data, original, feeds, threads, search,
                                                                  progress)]
        if not candidates:
            # Torch-Pruning leaves a layer alone when its ratio would round its width to nothing (round_to), so past
            # some ratio MACs grow again: the search's upper end is the ratio with the fewest MACs on a grid
            grid = np.round(np.arange(0.1, cfg.max_ratio + 1e-9, 0.1), 4).tolist() or [cfg.max_ratio]
            macs = {r: count_macs(channel_prune(model, specs, cfg.model_copy(update={"ratio": r}), data), example)[0]
                    for r in grid}
            known = {r: m for r, m in macs.items() if m is not None}
            top = min(known, key=lambda r: (known[r], r)) if known else cfg.max_ratio
            search.max_effective_ratio = top
            # uniform ratios on a fine grid up to `top`, bisected like the allocations
            candidates = [(round(top * (i + 1) / 2**STEPS, 4), None) for i in range(2**STEPS)]
        widest = point(*candidates[-1])
        if search.allocation == "measured":
            search.max_effective_ratio = float(widest["ratio"])
        if not meets(widest):
            chosen = widest
            search.notes.append(
                f"latency budget not reached by channel pruning: at ratio {widest['ratio']:g} (the most pruning "
                f"searched, up to max_ratio {cfg.max_ratio:g}) the pruned model is {widest['speedup']:.2f}x the "
                f"original's ONNX Runtime speed (needs {needed(widest):.2f}x); kept that pruning")
        else:
            low, high = -1, len(candidates) - 1  # low: known (or presumed, at no pruning) to miss; high: known to meet
            steps = max(STEPS, math.ceil(math.log2(len(candidates) + 1)))  # enough to narrow the list to one
            rounds = range(steps) if progress is None else progress.track(range(steps), steps, "searching the pruning ratio")
            for _ in rounds:
                if high - low <= 1:
                    break
                middle = (low + high) // 2
                if meets(point(*candidates[middle])):
                    high = middle
                else:
                    low = middle
            chosen = point(*candidates[high])
            search.met = True
        chosen["chosen"] = True
        search.chosen_ratio = float(chosen["ratio"])  # the ratio the chosen network was measured at
        search.chosen_ratios = chosen.get("_by_layer")
        search.baseline_ms = float(chosen["original_ms"])
        search.needed_speedup = round(needed(chosen), 4)
    for row in search.points:
        row.pop("_by_layer", None)
    search.points.sort(key=lambda row: float(row["ratio"]))
    return search
