"""distill: train a student (the pruned model) to match the teacher (the loaded model).

Classification: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T);
without labels only the teacher's soft targets train (alpha is ignored). Other tasks use
MSE or cosine loss to the teacher's outputs. For transformers (and wherever `hidden_states` asks for
it) the student also matches the teacher's hidden states: the MSE between the outputs of every
LayerNorm the two share by name and shape (the residual stream, which head and feed-forward pruning
leave at full width), averaged over layers and weighted by `hidden_weight`. Under `torchrun` the same call trains
data-parallel (DDP; gloo on CPU, nccl on GPU) and only rank 0 writes anything.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.progress import Progress, Silent
from deploytool.recipe import DistillConfig, InputSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class DistillRecord:
    epochs_run: int
    best_epoch: int
    metric: str
    best_score: float
    initial_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1
    hidden_states: list[str] = field(default_factory=list)  # the LayerNorms whose outputs the student matched

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> bool:
    import torch
    import torch.distributed as dist

    if world()[1] <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _first(out: Any) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return next(iter(out.values())) if isinstance(out, dict) else out[0]


def _loss_kind(cfg: DistillConfig, task: str) -> str:
    if cfg.loss != "auto":
        return cfg.loss
    return {"classification": "kl", "embedding": "cosine"}.get(task, "mse")


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, kind: str, cfg: DistillConfig
) -> torch.Tensor:
    import torch.nn.functional as F

    if kind == "kl":
        t = cfg.temperature
        soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean", log_target=True)
        soft = soft * t * t
        if labels is None:
            return soft
        return cfg.alpha * F.cross_entropy(student, labels) + (1 - cfg.alpha) * soft
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    return F.mse_loss(student, teacher)


class HiddenStates:
    """Forward hooks on the LayerNorms teacher and student share (same name; shapes checked per batch), and the
    hidden-state loss between their outputs."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        from torch import nn

        norms = {n for n, m in teacher.named_modules() if isinstance(m, nn.LayerNorm)}
        self.names = sorted(n for n, m in student.named_modules() if isinstance(m, nn.LayerNorm) and n in norms)
        self.outputs: dict[str, dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self.hooks = []
        for role, model in (("teacher", teacher), ("student", student)):
            modules = dict(model.named_modules())
            for name in self.names:
                def hook(module: Any, args: Any, out: Any, role: str = role, name: str = name) -> None:
                    self.outputs[role][name] = out
                self.hooks.append(modules[name].register_forward_hook(hook))

    def loss(self) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        pairs = [(self.outputs["student"][n], self.outputs["teacher"][n]) for n in self.names
                 if n in self.outputs["student"] and n in self.outputs["teacher"]]
        pairs = [(s, t) for s, t in pairs if s.shape == t.shape]
        self.outputs = {"teacher": {}, "student": {}}
        if not pairs:
            return torch.zeros(())
        return torch.stack([F.mse_loss(s, t.detach()) for s, t in pairs]).mean()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def recalibrate_batchnorm(model: torch.nn.Module, loader: Any, use_labels: bool, limit: int = 4096) -> bool:
    """Re-estimate every BatchNorm's running mean and variance on training inputs (a plain average over up to
    `limit` samples, no gradients, the rest of the model in eval mode). Pruning changes the statistics the layers
    see, and a short distillation with a slow running-average momentum (transformers' MobileNets and EfficientNets
    use TensorFlow's 0.997, i.e. 0.003) leaves them far behind the weights. Returns whether there was any."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            inputs = batch[:-1] if use_labels else batch
            model(*inputs)
            seen += len(inputs[0])
            if seen >= limit:
                break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


def _wants_hidden_states(cfg: DistillConfig, student: torch.nn.Module) -> bool:
    if cfg.hidden_states is not None:
        return cfg.hidden_states
    from deploytool.stages.prune import attention_layers

    found, fused = attention_layers(student)
    return bool(found or fused)


def _evaluate(
    student: torch.nn.Module, teacher_out: np.ndarray, specs: Sequence[InputSpec], data: Dataset, task: str
) -> tuple[str, float]:
    """('accuracy', acc) for labelled classification, else ('cosine', mean cosine to the teacher)."""
    from deploytool.compare import accuracy, compare_arrays
    from deploytool.runners import TorchRunner, infer_dataset

    out = infer_dataset(TorchRunner("student", student, [s.name for s in specs], None), data, 256)[0]
    if task == "classification" and data.labels is not None:
        return "accuracy", accuracy(out, data.labels)
    return "cosine", float(compare_arrays(teacher_out, out)["cosine_mean"])  # type: ignore[arg-type]


def distill(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    specs: Sequence[InputSpec],
    train: Dataset,
    validation: Dataset,
    task: str,
    cfg: DistillConfig,
    progress: Progress | None = None,
) -> tuple[torch.nn.Module, DistillRecord]:
    """Train `student` against `teacher`; returns the best student by validation score and the history."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from deploytool.runners import TorchRunner, infer_dataset, require_positional

    for network in (teacher, student):
        require_positional(network, [s.name for s in specs], "distillation")
    progress = progress or Silent()
    distributed = _init_distributed()
    rank, size = world()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    teacher = teacher.eval()
    student = copy.deepcopy(student)
    names = [s.name for s in specs]
    kind = _loss_kind(cfg, task)
    use_labels = kind == "kl" and train.labels is not None
    if kind == "kl" and train.labels is not None and train.labels.dtype.kind not in "iu":
        raise UserError(f"{train.source}: classification labels must be integers (got {train.labels.dtype})")
    tensors = [torch.from_numpy(np.ascontiguousarray(train.feeds[n])) for n in names]
    if use_labels:
        tensors.append(torch.from_numpy(train.labels.astype(np.int64)))  # type: ignore[union-attr]
    dataset = TensorDataset(*tensors)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler: DistributedSampler[Any] | None = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator)
    model: torch.nn.Module = student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    scheduler = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1)),
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(steps, 1)),
    }[cfg.schedule]()

    hidden = HiddenStates(teacher, student) if _wants_hidden_states(cfg, student) else None
    if hidden is not None and not hidden.names:
        hidden.remove()
        hidden = None
        if cfg.hidden_states:
            log.warning("hidden_states: teacher and student share no LayerNorm; only the outputs are matched")
    teacher_val = infer_dataset(TorchRunner("teacher", teacher, names, None), validation, 256)[0]
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(student, loader, use_labels)
    metric, initial = _evaluate(student, teacher_val, specs, validation, task)
    best_score, best_epoch = initial, 0
    best_state = copy.deepcopy(student.state_dict())
    history: list[dict[str, float]] = []
    epochs_run = 0
    for epoch in progress.track(range(1, cfg.epochs + 1), cfg.epochs, "distilling"):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            inputs, labels = (batch[:-1], batch[-1]) if use_labels else (batch, None)
            with torch.no_grad():
                target = _first(teacher(*inputs))
            loss = distill_loss(_first(model(*inputs)), target, labels, kind, cfg)
            if hidden is not None:
                loss = loss + cfg.hidden_weight * hidden.loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(inputs[0])
            count += len(inputs[0])
        if cfg.recalibrate_bn:
            recalibrate_batchnorm(student, loader, use_labels)
        student.eval()
        _, score = _evaluate(student, teacher_val, specs, validation, task)
        epochs_run = epoch
        history.append({"epoch": epoch, "loss": round(total / max(count, 1), 6), metric: round(score, 6)})
        progress.describe(f"distilling: loss {total / max(count, 1):.4f}, {metric} {score:.4f}")
        log.info("distill epoch %d: loss %.5f, validation %s %.5f", epoch, total / max(count, 1), metric, score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(student.state_dict())
        elif cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            log.info("early stop: no improvement for %d epochs", cfg.patience)
            break
    if hidden is not None:
        hidden.remove()
    student.load_state_dict(best_state)
    record = DistillRecord(epochs_run, best_epoch, metric, best_score, initial, history, size,
                           hidden.names if hidden is not None else [])
    return student.eval(), record


def finish_distributed() -> None:
    """Tear down the process group this module may have started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
