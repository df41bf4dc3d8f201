"""prune: structured channel pruning (physically smaller, faster in ORT) or unstructured magnitude pruning.

Channel pruning uses Torch-Pruning's dependency graph, which keeps coupled layers
(residual adds, concatenations, BatchNorm, depthwise/grouped convs) consistent. The
pruned model is saved as safetensors plus JSON metadata with the new layer sizes, so it
reloads from the original factory without pickles and without re-running pruning.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.data import Dataset
from deploytool.errors import StageError, UserError, first_line
from deploytool.hardware import DEFAULT_THREADS
from deploytool.recipe import ExportConfig, InputSpec, PruneConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# attention layers whose heads can be removed whole: separate query/key/value projections (Hugging Face
# BERT/RoBERTa/ViT/DeiT, Whisper/CLIP/BART, DistilBERT naming) and an integer head count
PROJECTION_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")


@dataclass
class PruneRecord:
    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    ignored: list[str]
    sparsity: float | None = None
    sensitivity: dict[str, dict[str, float]] | None = None
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None  # the latency-budget search (deploytool.stages.budget), when asked for

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _example(specs: Sequence[InputSpec], data: Dataset) -> tuple[torch.Tensor, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(data.feeds[s.name][:2])) for s in specs)


def count_macs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int | None, int]:
    """(MACs per sample, parameters); MACs None where the counter cannot trace the model."""
    import torch_pruning as tp

    params = sum(p.numel() for p in model.parameters())
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example)
    except Exception:
        log.debug("MAC counting failed", exc_info=True)
        return None, params
    return int(macs), params  # the counter already averages over the batch


def _prunable(model: torch.nn.Module) -> dict[str, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Linear]:
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}


def output_heads(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """Layers whose output is a model output (or the last prunable layer run): pruning them would change output shapes."""
    import torch

    layers = _prunable(model)
    # by id, with a weak reference: a freed intermediate's id can be reused by a model output
    produced: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
    order: list[str] = []
    hooks = []
    for name, module in layers.items():
        def hook(mod: Any, args: Any, out: Any, name: str = name) -> None:
            order.append(name)
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, weakref.ref(out))
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = model(*example)
    finally:
        for h in hooks:
            h.remove()
    outputs = result if isinstance(result, (tuple, list)) else list(result.values()) if isinstance(result, dict) else [result]
    heads = {produced[id(o)][0] for o in outputs if id(o) in produced and produced[id(o)][1]() is o}
    if order:
        heads.add(order[-1])
    return sorted(heads)


@dataclass
class AttentionLayer:
    """An attention module whose heads channel pruning removes whole: its projections and head-count attribute."""

    name: str
    module: Any
    projections: list[Any]
    heads_attribute: str

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.heads_attribute))

    def projection_names(self) -> list[str]:
        children = {id(m): n for n, m in self.module.named_children()}
        return [f"{self.name}.{children[id(p)]}" if self.name else children[id(p)] for p in self.projections]


def attention_layers(model: torch.nn.Module) -> tuple[list[AttentionLayer], list[str]]:
    """(attention layers with separate q/k/v projections, names of attention layers with one fused qkv projection).

    Heads are found by structure, not by class: a module with an integer head count (num_attention_heads,
    num_heads, n_heads, n_head or heads) and Linear children query/key/value, q_proj/k_proj/v_proj or
    q_lin/k_lin/v_lin."""
    from torch import nn

    found: list[AttentionLayer] = []
    fused: list[str] = []
    for name, module in model.named_modules():
        attribute = next((a for a in HEAD_COUNT_ATTRIBUTES
                          if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)), None)
        if attribute is None:
            continue
        children = dict(module.named_children())
        for names in PROJECTION_NAMES:
            projections = [children.get(n) for n in names]
            if all(isinstance(p, nn.Linear) for p in projections):
                found.append(AttentionLayer(name, module, projections, attribute))
                break
        else:
            if isinstance(children.get("qkv"), nn.Linear) or isinstance(children.get("in_proj"), nn.Linear):
                fused.append(name)
    return found, fused


def residual_width_layers(model: torch.nn.Module, attention: Sequence[AttentionLayer], fused: Sequence[str]) -> list[str]:
    """Layers that write the transformer's residual stream (output width = the attention input width), which channel
    pruning leaves at full width: pruning the hidden size touches every layer, embedding and LayerNorm at once, and
    costs far more accuracy per millisecond than removing heads and feed-forward units."""
    from torch import nn

    modules = dict(model.named_modules())
    widths = {a.projections[0].in_features for a in attention}
    widths |= {modules[n].qkv.in_features if hasattr(modules[n], "qkv") else modules[n].in_proj.in_features for n in fused}
    projections = {id(p) for a in attention for p in a.projections}
    chosen = []
    for name, module in _prunable(model).items():
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        if width in widths and id(module) not in projections:
            chosen.append(name)
    # Torch-Pruning leaves a fused qkv projection whole; its heads are removed by remove_fused_heads
    chosen += [".".join(filter(None, [n, "qkv" if hasattr(modules[n], "qkv") else "in_proj"])) for n in fused]
    return chosen


@dataclass
class FusedAttention:
    """An attention module with one fused q/k/v projection (timm and many hand-written ViTs): `qkv` (or `in_proj`)
    maps the residual width to [q | k | v], each `heads` blocks of head_dim, and one output projection reads the
    heads back. Its heads are removed by deploytool itself, then checked against the unpruned model."""

    name: str
    module: Any
    qkv_attribute: str
    out_attribute: str
    heads_attribute: str

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.heads_attribute))

    @property
    def qkv_name(self) -> str:
        return f"{self.name}.{self.qkv_attribute}" if self.name else self.qkv_attribute


def fused_attention(model: torch.nn.Module) -> tuple[list[FusedAttention], dict[str, str]]:
    """(fused-qkv attention layers whose heads can be removed, {name: why not} for the other fused ones)."""
    from torch import nn

    modules = dict(model.named_modules())
    found: list[FusedAttention] = []
    refused: dict[str, str] = {}
    for name in attention_layers(model)[1]:
        module = modules[name]
        heads_attribute = next(a for a in HEAD_COUNT_ATTRIBUTES
                               if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool))
        qkv_attribute = "qkv" if isinstance(getattr(module, "qkv", None), nn.Linear) else "in_proj"
        qkv, heads = getattr(module, qkv_attribute), int(getattr(module, heads_attribute))
        width = qkv.out_features // 3
        if qkv.out_features % 3 or heads < 2 or width % heads:
            refused[name] = f"{qkv.out_features} qkv outputs are not 3 x {heads} heads of equal size"
            continue
        outs = [n for n, c in module.named_children()
                if isinstance(c, nn.Linear) and c is not qkv and c.in_features == width]
        if len(outs) != 1:
            refused[name] = f"no single output projection reading its {width} attention outputs"
            continue
        found.append(FusedAttention(name, module, qkv_attribute, outs[0], heads_attribute))
    return found, refused


def _tensors(out: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def remove_fused_heads(model: torch.nn.Module, ratios: dict[str, float], p: int, example: tuple[torch.Tensor, ...]) -> list[str]:
    """Remove whole heads (the lowest L`p` norm of their q, k, v rows and output-projection columns) from the fused-qkv
    attention layers named in `ratios` ({layer name: fraction of heads}), in place; at least one head is kept.

    The layout [q | k | v] x heads x head_dim is what the weights cannot show, so each layer is checked: the pruned
    model must compute what the unpruned one does with the removed heads' values set to zero. A layer that fails the
    check (another layout, or a forward() that derives sizes from the residual width) is restored whole; the returned
    notes say which and why."""
    import math

    import torch
    from torch import nn

    notes: list[str] = []
    layers, refused = fused_attention(model)
    notes += [f"attention layer {n} keeps every head: {why}" for n, why in refused.items() if ratios.get(n, 0) > 0]
    for layer in layers:
        removed = min(math.ceil(ratios.get(layer.name, 0.0) * layer.heads - 1e-9), layer.heads - 1)
        if removed <= 0:
            continue
        qkv, out = getattr(layer.module, layer.qkv_attribute), getattr(layer.module, layer.out_attribute)
        heads, width = layer.heads, qkv.out_features // 3
        size = width // heads
        with torch.no_grad():
            rows = qkv.weight.reshape(3, heads, size, -1).transpose(0, 1).reshape(heads, -1)
            columns = out.weight.reshape(out.out_features, heads, size).transpose(0, 1).reshape(heads, -1)
            score = torch.cat([rows, columns], 1).norm(p=p, dim=1)
            keep = torch.sort(torch.argsort(score, descending=True)[: heads - removed]).values
            row_index = (torch.arange(3)[:, None, None] * width + keep[None, :, None] * size
                         + torch.arange(size)[None, None, :]).reshape(-1)
            column_index = (keep[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
            # what the pruned layer must compute: the unpruned one with the removed heads' values zeroed
            zeroed = copy.deepcopy(qkv)
            gone = torch.ones(heads, dtype=torch.bool)
            gone[keep] = False
            value_rows = (2 * width + torch.nonzero(gone)[:, 0, None] * size + torch.arange(size)[None, :]).reshape(-1)
            zeroed.weight[value_rows] = 0
            if zeroed.bias is not None:
                zeroed.bias[value_rows] = 0
            setattr(layer.module, layer.qkv_attribute, zeroed)
            expected = _tensors(model(*example))
            like = {"dtype": qkv.weight.dtype, "device": qkv.weight.device}
            new_qkv = nn.Linear(qkv.in_features, len(row_index), bias=qkv.bias is not None, **like)
            new_qkv.weight.copy_(qkv.weight[row_index])
            if qkv.bias is not None:
                new_qkv.bias.copy_(qkv.bias[row_index])
            new_out = nn.Linear(len(column_index), out.out_features, bias=out.bias is not None, **like)
            new_out.weight.copy_(out.weight[:, column_index])
            if out.bias is not None:
                new_out.bias.copy_(out.bias)
            setattr(layer.module, layer.qkv_attribute, new_qkv)
            setattr(layer.module, layer.out_attribute, new_out)
            setattr(layer.module, layer.heads_attribute, heads - removed)
            try:
                got = _tensors(model(*example))
                why = "" if len(got) == len(expected) and all(
                    g.shape == e.shape and torch.allclose(g, e, rtol=1e-3, atol=1e-4 * (1.0 + float(e.abs().max())))
                    for g, e in zip(got, expected)) else "the model without those heads does not compute what the " \
                    "unpruned one does with their values zeroed (its qkv layout is not [q | k | v] x heads x head_dim)"
            except Exception as exc:
                why = f"its forward() fails without them ({type(exc).__name__}: {first_line(exc)[:120]}); " \
                      "compute the head size from tensor shapes (reshape(..., heads, -1)) to let heads be removed"
        if why:
            setattr(layer.module, layer.qkv_attribute, qkv)
            setattr(layer.module, layer.out_attribute, out)
            setattr(layer.module, layer.heads_attribute, heads)
            notes.append(f"attention layer {layer.name} keeps every head: {why}")
    return notes


def _resolve_ignored(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise UserError(
                f"[prune] ignore: no layer matches '{pattern}'",
                "layer names look like " + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""),
            )
        chosen += matched
    return chosen


def check_forward(model: torch.nn.Module, example: tuple[torch.Tensor, ...], what: str) -> None:
    """Run a forward pass; on failure name the layer where it broke (and the last one that ran)."""
    import torch

    stack: list[str] = []
    last_done: list[str] = [""]
    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))

        def post(m: Any, a: Any, o: Any, name: str = name) -> None:
            stack.pop()
            last_done[0] = name

        hooks.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*example)
    except Exception as exc:
        where = stack[-1] if stack else ""
        after = last_done[0]
        reason = first_line(exc)
        raise UserError(
            f"{what}: the model's forward() fails in layer '{where or '<top>'}' after layer '{after or '-'}' ran: "
            f"{type(exc).__name__}: {reason[:200]}",
            f"forward() code with hard-coded sizes cannot follow pruned widths; add '{after}' (the layer feeding it) "
            "to [prune] ignore, or compute sizes from tensor shapes",
        ) from None
    finally:
        for h in hooks:
            h.remove()


def _importance(name: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[name]()


def _taylor_gradients(model: torch.nn.Module, specs: Sequence[InputSpec], data: Dataset, teacher: torch.nn.Module) -> None:
    """Accumulate gradients of a loss for Taylor importance: labels when present, else the teacher's argmax."""
    import torch

    model.zero_grad()
    for batch in list(data.batches(32))[:8]:
        inputs = [torch.from_numpy(np.ascontiguousarray(batch[s.name])) for s in specs]
        out = model(*inputs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        with torch.no_grad():
            target = teacher(*inputs)
            target = target if isinstance(target, torch.Tensor) else target[0]
        if out.ndim == 2:
            loss = torch.nn.functional.cross_entropy(out, target.argmax(-1))
        else:
            loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()


ROUND_TO_FALLBACK = 8  # round_to = "measured" where no width was measured (one ratio for every layer)


def rounding(cfg: PruneConfig, per_layer: bool) -> int | None:
    """Torch-Pruning's round_to: the recipe's number; with round_to = "measured" the per-layer ratios already give
    exact widths (deploytool.stages.budget.WidthChooser), and one ratio for every layer keeps multiples of 8."""
    if cfg.round_to == "measured":
        return None if per_layer else ROUND_TO_FALLBACK
    return cfg.round_to


def channel_prune(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    cfg: PruneConfig,
    data: Dataset,
    ratio_by_layer: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> torch.nn.Module:
    """Remove channels from a copy of `model` with Torch-Pruning (and whole heads from fused-qkv attention layers,
    remove_fused_heads); returns the pruned copy. What could not be pruned as asked is added to `notes`."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    example = _example(specs, data)
    heads_ratio = cfg.ratio if cfg.heads_ratio is None else cfg.heads_ratio
    user_ignored = set(output_heads(pruned, example)) | set(_resolve_ignored(pruned, cfg.ignore))
    fused_ratios = {}
    for fused_layer in fused_attention(pruned)[0]:
        if not {fused_layer.name, fused_layer.qkv_name} & user_ignored:
            fused_ratios[fused_layer.name] = (heads_ratio if ratio_by_layer is None
                                              else ratio_by_layer.get(fused_layer.qkv_name, 0.0))
    found_notes = remove_fused_heads(pruned, fused_ratios, 1 if cfg.importance == "l1" else 2, example)
    if notes is not None:
        notes.extend(found_notes)
    attention, fused = attention_layers(pruned)
    ignored_names = sorted(user_ignored | set(residual_width_layers(pruned, attention, fused)))
    modules = dict(pruned.named_modules())
    kwargs: dict[str, Any] = {}
    # an attention layer (or one of its projections) that is ignored keeps its heads; so does a single-head one
    attention = [a for a in attention
                 if a.heads > 1 and a.name not in ignored_names and not set(a.projection_names()) & set(ignored_names)]
    head_ratios: dict[Any, float] = {}
    for layer in attention:
        names = layer.projection_names()
        ratio = heads_ratio if ratio_by_layer is None else max((ratio_by_layer.get(n, 0.0) for n in names), default=0.0)
        if ratio > 0:  # whole heads, at least one kept (Torch-Pruning rounds the number removed up)
            head_ratios.update(dict.fromkeys(layer.projections, min(ratio, (layer.heads - 1) / layer.heads) - 1e-9))
        else:
            ignored_names = sorted(set(ignored_names) | set(names))
    attention = [a for a in attention if a.projections[0] in head_ratios]
    if attention:
        kwargs.update(num_heads={p: a.heads for a in attention for p in a.projections}, prune_num_heads=True,
                      prune_head_dims=False, head_pruning_ratio_dict=head_ratios)
    if ratio_by_layer is not None:  # a fused qkv projection's heads were removed above; Torch-Pruning leaves it whole
        kwargs["pruning_ratio_dict"] = {modules[n]: r for n, r in ratio_by_layer.items() if n not in ignored_names}
    try:
        with warnings.catch_warnings():
            # parameters outside any layer (position embeddings, layer scales) are pruned along their last axis, as
            # Torch-Pruning warns on every call; check_forward below catches a wrong guess
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
            pruner = tp.pruner.MetaPruner(
                pruned,
                example,
                importance=_importance(cfg.importance),
                pruning_ratio=cfg.ratio if ratio_by_layer is None else 0.0,
                iterative_steps=cfg.iterative_steps,
                ignored_layers=[modules[n] for n in ignored_names],
                round_to=rounding(cfg, ratio_by_layer is not None),
                global_pruning=cfg.global_pruning,
                **kwargs,
            )
        for _ in range(cfg.iterative_steps):
            if cfg.importance == "taylor":
                _taylor_gradients(pruned, specs, data, model)
            pruner.step()
        for layer in attention:
            heads = int(pruner.num_heads[layer.projections[0]])
            setattr(layer.module, layer.heads_attribute, heads)
            if isinstance(getattr(layer.module, "all_head_size", None), int):
                layer.module.all_head_size = layer.projections[0].out_features
    except UserError:
        raise
    except Exception as exc:
        reason = first_line(exc)
        raise StageError(
            "prune",
            f"Torch-Pruning could not build or apply the dependency graph: {type(exc).__name__}: {reason[:200]}",
            "add the layers it cannot handle to [prune] ignore, or use method = \"magnitude\"",
        ) from exc
    pruned.zero_grad(set_to_none=True)
    check_forward(pruned, example, "after channel pruning")
    return pruned.eval()


def magnitude_prune(model: torch.nn.Module, cfg: PruneConfig) -> tuple[torch.nn.Module, float]:
    """Zero the smallest weights (global or per layer) and bake the zeros in; returns (model, sparsity)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model).eval()
    ignored = set(_resolve_ignored(pruned, cfg.ignore))
    targets = [(m, "weight") for n, m in _prunable(pruned).items() if n not in ignored]
    if cfg.scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=cfg.ratio)
    else:
        for module, attr in targets:
            prune.l1_unstructured(module, attr, amount=cfg.ratio)
    for module, attr in targets:
        prune.remove(module, attr)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return pruned, zeros / max(total, 1)


def nm_prune(model: torch.nn.Module, cfg: PruneConfig) -> tuple[torch.nn.Module, float]:
    """N:M sparsity: in every group of m consecutive input weights keep the n largest; returns (model, sparsity)."""
    import torch

    if cfg.n >= cfg.m:
        raise UserError(f"[prune] nm needs n < m (got n = {cfg.n}, m = {cfg.m})")
    pruned = copy.deepcopy(model).eval()
    ignored = set(_resolve_ignored(pruned, cfg.ignore))
    zeros = total = 0
    with torch.no_grad():
        for name, module in _prunable(pruned).items():
            weight = module.weight
            # group along the input dimension: (out, in, *kernel) -> rows of m input weights
            rows = weight.transpose(0, 1).reshape(weight.shape[1], -1).t() if weight.dim() > 2 else weight
            if name in ignored or rows.shape[-1] % cfg.m:
                continue
            groups = rows.reshape(-1, cfg.m)
            drop = groups.abs().argsort(dim=1)[:, : cfg.m - cfg.n]
            mask = torch.ones_like(groups).scatter_(1, drop, 0.0).reshape(rows.shape)
            if weight.dim() > 2:
                mask = mask.t().reshape(weight.shape[1], weight.shape[0], *weight.shape[2:]).transpose(0, 1)
            weight.mul_(mask)
            zeros += int((mask == 0).sum())
            total += mask.numel()
    return pruned, zeros / max(total, 1)


def _score(model: torch.nn.Module, specs: Sequence[InputSpec], data: Dataset, reference: list[np.ndarray], task: str) -> float:
    """Accuracy with labels for classifiers, else mean output cosine to the unpruned model."""
    from deploytool.compare import accuracy, compare_arrays
    from deploytool.runners import TorchRunner, infer_dataset

    outputs = infer_dataset(TorchRunner("m", model, [s.name for s in specs], None), data, 256)
    if task == "classification" and data.labels is not None:
        return accuracy(outputs[0], data.labels)
    return float(compare_arrays(reference[0], outputs[0])["cosine_mean"])  # type: ignore[arg-type]


def scan_layers(model: torch.nn.Module, specs: Sequence[InputSpec], cfg: PruneConfig, data: Dataset) -> list[str]:
    """The layers a scan prunes one at a time: not the output layers, the ignored ones or the residual stream; an
    attention layer's heads under its first projection (its fused qkv projection when it has one)."""
    example = _example(specs, data)
    attention, fused = attention_layers(model)
    user_ignored = set(output_heads(model, example)) | set(_resolve_ignored(model, cfg.ignore))
    skip = (user_ignored | set(residual_width_layers(model, attention, fused)) - {a.qkv_name for a in fused_attention(model)[0]}
            | {n for a in attention for n in a.projection_names()[1:]})
    return [n for n in _prunable(model) if n not in skip]


def single_layer_prunes(model: torch.nn.Module, specs: Sequence[InputSpec], cfg: PruneConfig, data: Dataset,
                        ratios: Sequence[float], progress: Any = None,
                        what: str = "sensitivity scan") -> Iterator[tuple[str, float, torch.nn.Module | None]]:
    """(layer, ratio, the model with only that layer pruned at that ratio, or None where it cannot be) for every
    layer of scan_layers and every ratio: what a sensitivity scan and the latency budget's allocation score."""
    layers = scan_layers(model, specs, cfg, data)
    for layer in layers if progress is None else progress.track(layers, len(layers), what):
        for ratio in ratios:
            try:
                yield layer, ratio, channel_prune(model, specs, cfg, data, ratio_by_layer={layer: ratio})
            except (UserError, StageError) as exc:
                log.info("%s: %s at %g not prunable: %s", what, layer, ratio, exc.message)
                yield layer, ratio, None


def sensitivity_scan(
    model: torch.nn.Module, specs: Sequence[InputSpec], cfg: PruneConfig, data: Dataset, task: str, progress: Any = None
) -> dict[str, dict[str, float]]:
    """Score after pruning each layer alone at each ratio: {layer: {ratio: score}}, plus the unpruned baseline."""
    from deploytool.runners import TorchRunner, infer_dataset

    reference = infer_dataset(TorchRunner("m", model, [s.name for s in specs], None), data, 256)
    baseline = _score(model, specs, data, reference, task)
    table: dict[str, dict[str, float]] = {"<none>": {"0": baseline}}
    for layer, ratio, pruned in single_layer_prunes(model, specs, cfg, data, cfg.scan_ratios, progress):
        score = float("nan") if pruned is None else round(_score(pruned, specs, data, reference, task), 5)
        table.setdefault(layer, {})[f"{ratio:g}"] = score
    return table


@dataclass
class LatencyContext:
    """What a latency-budget search needs beyond the prune settings: how the model is exported and timed."""

    outputs: Sequence[str]
    export: ExportConfig
    batch: int = 1
    threads: int = DEFAULT_THREADS


def prune_model(
    model: torch.nn.Module, specs: Sequence[InputSpec], cfg: PruneConfig, data: Dataset, task: str, progress: Any = None,
    latency: LatencyContext | None = None,
) -> tuple[torch.nn.Module, PruneRecord]:
    """Prune a copy of `model`. With a latency budget (target_speedup / target_latency_ms) the ratio is searched by
    measured ONNX Runtime latency (deploytool.stages.budget) and `latency` says how to export and time it."""
    from deploytool.runners import require_positional

    require_positional(model, [s.name for s in specs], "pruning")
    example = _example(specs, data)
    macs_before, params_before = count_macs(model, example)
    sensitivity = sensitivity_scan(model, specs, cfg, data, task, progress) if cfg.sensitivity else None
    ignored = sorted(set(output_heads(model, example)) | set(_resolve_ignored(model, cfg.ignore)))
    notes: list[str] = []
    sparsity = None
    budget = None
    by_layer: dict[str, float] | None = None
    if cfg.budget:
        from deploytool.stages.budget import search_ratio

        context = latency or LatencyContext(["output"], ExportConfig())
        search = search_ratio(model, specs, context.outputs, cfg, data, task, context.export, context.batch, context.threads,
                              progress)
        cfg = cfg.model_copy(update={"ratio": search.chosen_ratio})
        by_layer = search.chosen_ratios
        budget = search.as_dict()
        notes.extend(search.notes)
        chosen = next(p for p in search.points if p.get("chosen"))
        if search.met and by_layer:
            notes.append(f"latency budget: per-layer ratios ({len(by_layer)} layers, {search.chosen_ratio:.0%} of the channels "
                         f"removed) are the least pruning of {len(search.points)} measured that makes the model "
                         f"{chosen['speedup']:.2f}x [{chosen['speedup_ci'][0]:.2f}, {chosen['speedup_ci'][1]:.2f}] faster than the "
                         f"original's ONNX Runtime export ({chosen['latency_ms']:.3f} vs {chosen['original_ms']:.3f} ms; "
                         f"needs {search.needed_speedup:.2f}x)")
        elif search.met:
            notes.append(f"latency budget: ratio {search.chosen_ratio:g} is the smallest of {len(search.points)} measured that "
                         f"makes the model {chosen['speedup']:.2f}x [{chosen['speedup_ci'][0]:.2f}, {chosen['speedup_ci'][1]:.2f}] "
                         f"faster than the original's ONNX Runtime export ({chosen['latency_ms']:.3f} vs "
                         f"{chosen['original_ms']:.3f} ms; needs {search.needed_speedup:.2f}x)")
    if cfg.method == "channel":
        pruned = channel_prune(model, specs, cfg, data, ratio_by_layer=by_layer, notes=notes)
        notes.extend(_attention_notes(model, pruned))
    else:
        pruned, sparsity = magnitude_prune(model, cfg) if cfg.method == "magnitude" else nm_prune(model, cfg)
        ignored = sorted(set(_resolve_ignored(model, cfg.ignore)))
        notes.append(
            f"{cfg.method} pruning zeroed {sparsity:.0%} of the prunable weights: the file compresses better, "
            "but ONNX Runtime runs dense kernels, so it is not faster"
        )
    macs_after, params_after = count_macs(pruned, example)
    record = PruneRecord(cfg.method, cfg.ratio, params_before, params_after, macs_before, macs_after, ignored, sparsity, sensitivity, notes,
                         budget)
    return pruned, record


def _attention_notes(model: torch.nn.Module, pruned: torch.nn.Module) -> list[str]:
    """What pruning did to the attention layers: heads kept per layer (separate or fused q/k/v projections)."""
    separate, fused = attention_layers(model)[0], fused_attention(model)[0]
    if not separate and not fused:
        return []
    after = {a.name: a.heads for a in attention_layers(pruned)[0]} | {a.name: a.heads for a in fused_attention(pruned)[0]}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = sorted([(a.name, a.heads) for a in separate] + [(a.name, a.heads) for a in fused], key=lambda n: order[n[0]])
    width = separate[0].projections[0].in_features if separate else getattr(fused[0].module, fused[0].qkv_attribute).in_features
    kept = ", ".join(f"{after.get(name, heads)}/{heads}" for name, heads in layers)
    if all(after.get(name, heads) == heads for name, heads in layers):
        return [f"attention heads kept per layer: {kept} (none removed)"]
    return [f"attention heads kept per layer: {kept} (whole heads removed; the residual width {width} is kept)"]
