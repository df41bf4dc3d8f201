"""verify: compare candidates with the reference on validation data, time them, apply the gates.

In steps, each a function of its own: collect every runner's outputs, compare them with the
reference's, time the models (deploytool.latency, the one block method), decide the gates, and
explain a failure (where the candidate diverges, session memory, golden outputs).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from deploytool.compare import (
    accuracy,
    classification_metrics,
    compare_arrays,
    regression_metrics,
    within_tolerance,
)
from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.gates import (
    ATOL_OF_RMS,
    DEFAULT_MIN_COSINE,
    HIGHER_IS_BETTER,
    SPEED_GATES,
    Gate,
    Kind,
    drop_interval,
    effective,
    is_quantized,
    judge,
    share_interval,
)
from deploytool.latency import Measurement, Ratio, Timer, TimingPlan
from deploytool.progress import Progress, Silent
from deploytool.recipe import VerifyConfig
from deploytool.runners import OrtRunner, Runner, infer_dataset


@dataclass
class Candidate:
    """A model to verify: its runner, what kind of change made it, and the model it was made from (if verified too)."""

    name: str
    runner: Runner
    kind: Kind = "equivalent"
    base: str | None = None  # e.g. int8 -> "fp32": default quality gates and speedup_vs_<base> compare with it


@dataclass
class VerifyResult:
    metrics: dict[str, dict[str, object]]
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    measurement: Measurement | None = field(default=None, repr=False)
    latency: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    @property
    def latency_samples_ms(self) -> dict[str, list[float]]:
        if self.measurement is None:
            return {}
        return {name: t.samples_ms for name, t in self.measurement.timed.items()}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin PyTorch's intra-op threads for the block; a no-op where PyTorch is not in use (e.g. golden outputs)."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fixed_batch(runner: Runner) -> int | None:
    return runner.batch_dim() if isinstance(runner, OrtRunner) else None


def _batch_size(runner: Runner, wanted: int) -> int:
    return _fixed_batch(runner) or wanted


def _timeable(runner: Runner) -> bool:
    return bool(getattr(runner, "timeable", True))


def as_candidate(item: Runner | Candidate) -> Candidate:
    """A bare runner as a candidate: an ONNX model with quantized operators is 'quantized', anything else 'equivalent'."""
    if isinstance(item, Candidate):
        return item
    kind: Kind = "quantized" if isinstance(item, OrtRunner) and is_quantized(item.path) else "equivalent"
    return Candidate(item.name, item, kind)


# --- step 1: outputs ---------------------------------------------------------------------------


def collect_outputs(runners: Sequence[Runner], dataset: Dataset, batch_size: int, progress: Progress) -> dict[str, list[np.ndarray]]:
    """Every runner's outputs over the whole dataset. An ONNX Runtime session is reopened after its pass: its
    memory arena grew to the batch and would keep that memory through timing and localisation."""
    outputs = {}
    for runner in progress.track(runners, len(runners), "running validation data"):
        outputs[runner.name] = infer_dataset(runner, dataset, _batch_size(runner, batch_size), pad=_fixed_batch(runner) is not None)
        if isinstance(runner, OrtRunner):
            runner.reopen()
    return outputs


def check_labels(dataset: Dataset, logits: np.ndarray, task: str) -> None:
    """Labels must fit the model's first output: class indices within its width, or one target per output value."""
    labels = dataset.labels
    if labels is None:
        return
    if task == "classification":
        classes = logits.shape[-1] if logits.ndim >= 2 else 0
        whole = labels.dtype.kind in "iu" or bool(np.all(np.mod(labels, 1) == 0))
        if not whole or labels.size != len(logits) or labels.min() < 0 or labels.max() >= classes:
            raise UserError(
                f"{dataset.source}: labels do not match the model's output: classification needs one class index "
                f"in 0..{classes - 1} per sample (got {labels.dtype} values {labels.min()}..{labels.max()}, "
                f"shape {list(labels.shape)}, for output shape {list(logits.shape)})"
            )
    elif task == "regression" and labels.size not in (logits.size, len(logits)):
        raise UserError(
            f"{dataset.source}: labels do not match the model's output: regression needs one target per output "
            f"value (got shape {list(labels.shape)} for output shape {list(logits.shape)})"
        )


# --- step 2: comparison ------------------------------------------------------------------------


def _rms(array: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.sqrt(np.mean(np.square(array.astype(np.float64))))) if array.size else 0.0
    return value if math.isfinite(value) else 0.0


def compare_outputs(
    names: Sequence[str],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    task: str,
    labels: np.ndarray | None,
    tolerance: tuple[float, float] | None = None,
) -> dict[str, object]:
    """Per-output statistics and the task metrics of a candidate's outputs against the reference's.

    tolerance (atol, rtol): also the share of elements within it; an atol of NaN means automatic,
    ATOL_OF_RMS x the RMS of that reference output."""
    per_output = {name: compare_arrays(r, c) for name, r, c in zip(names, reference, candidate)}
    for name, r, c in zip(names, reference, candidate):
        stats = per_output[name]
        stats["dtype_match"] = r.dtype == c.dtype
        if tolerance is not None and r.shape == c.shape:
            atol = tolerance[0] if not math.isnan(tolerance[0]) else max(ATOL_OF_RMS * _rms(r), 1e-12)
            stats["within_tolerance"] = within_tolerance(r, c, atol, tolerance[1])
            stats["atol"], stats["rtol"] = atol, tolerance[1]
    valid = all(o["shape_match"] and o["dtype_match"] and not o.get("nonfinite") for o in per_output.values())
    metrics: dict[str, object] = {"outputs": per_output, "outputs_valid": valid}
    if tolerance is not None:
        metrics["within_tolerance"] = min(float(o.get("within_tolerance", 0.0)) for o in per_output.values())  # type: ignore[arg-type]
    if not valid:  # the stable keys stay present, as null
        metrics.update(cosine_mean=None, cosine_min=None, max_abs_error=None, snr_db=None)
        return metrics
    metrics["cosine_mean"] = min(float(o["cosine_mean"]) for o in per_output.values())  # type: ignore[arg-type]
    metrics["cosine_min"] = min(float(o["cosine_min"]) for o in per_output.values())  # type: ignore[arg-type]
    metrics["max_abs_error"] = max(float(o["max_abs_error"]) for o in per_output.values())  # type: ignore[arg-type]
    metrics["snr_db"] = min(float(o["snr_db"]) for o in per_output.values())  # type: ignore[arg-type]
    if task == "classification":
        metrics.update(classification_metrics(reference[0], candidate[0], labels))
    elif task == "regression" and labels is not None:
        metrics.update(regression_metrics(candidate[0], labels))
    return metrics


def _tolerance(gates: Mapping[str, float]) -> tuple[float, float] | None:
    if "atol" not in gates and "rtol" not in gates:
        return None
    return gates.get("atol", 0.0), gates.get("rtol", 0.0)


# --- step 3: timing ----------------------------------------------------------------------------


def plan_of(cfg: VerifyConfig) -> TimingPlan:
    return TimingPlan.for_calls(cfg.runs, cfg.block, cfg.warmup, cfg.min_seconds, cfg.max_seconds)


def time_models(runners: Sequence[Runner], dataset: Dataset, cfg: VerifyConfig, progress: Progress,
                notes: list[str]) -> tuple[Timer | None, int]:
    """A timer over the runners that run at the latency batch. The A/A control copies the first ONNX model
    (the one speed gates between ONNX models are decided against; PyTorch, often the slowest, is timed once),
    else the first runner."""
    latency_batch = min(cfg.latency_batch, len(dataset))
    timeable = [r for r in runners if _timeable(r)]
    timed = [r for r in timeable if _batch_size(r, latency_batch) == latency_batch]
    for r in timeable:
        if r not in timed:
            notes.append(f"{r.name}: fixed batch size differs from latency_batch {latency_batch}; not timed")
    if not timed:
        return None, latency_batch
    feeds = next(dataset.head(latency_batch).batches(latency_batch))
    control = next((r.name for r in timed if isinstance(r, OrtRunner)), timed[0].name)
    timer = Timer(timed, feeds, plan_of(cfg), control=control, progress=progress)
    timer.run()
    return timer, latency_batch


def _throughput(runners: Sequence[Runner], dataset: Dataset, cfg: VerifyConfig, result: VerifyResult) -> None:
    for batch in cfg.throughput_batches:
        if batch > len(dataset):
            result.notes.append(f"throughput at batch {batch} skipped: only {len(dataset)} samples")
            continue
        feeds = next(dataset.batches(batch))
        batched = [r for r in runners if _timeable(r) and _batch_size(r, batch) == batch]
        if not batched:
            continue
        plan = TimingPlan.for_calls(max(10, cfg.runs // 5), max(2, cfg.block // 2), 2, 0.0, cfg.max_seconds)
        timer = Timer(batched, feeds, plan, control=False)
        for name, timed in timer.run().timed.items():
            throughput = result.metrics[name].setdefault("throughput", {})
            throughput[str(batch)] = round(batch * 1000.0 / timed.center_ms, 2)  # type: ignore[index]


# --- step 4: gates -----------------------------------------------------------------------------


@dataclass
class _SpeedCheck:
    gate: str
    model: str
    baseline: str
    threshold: float
    default: bool

    def ratio(self, measurement: Measurement | None) -> Ratio | None:
        if measurement is None or self.baseline not in measurement or self.model not in measurement:
            return None
        return measurement.speedup(self.baseline, self.model)


def _quality_gates(candidate: Candidate, gates: Mapping[str, float], added: set[str], metrics: Mapping[str, dict[str, object]],
                   reference: str) -> list[Gate]:
    mine = metrics[candidate.name]
    result = [judge("outputs_valid", candidate.name, float(bool(mine["outputs_valid"])), 1.0)]
    for name, key in (("min_top1_agreement", "top1_agreement"), ("min_cosine", "cosine_mean"), ("min_snr_db", "snr_db")):
        if name not in gates:
            continue
        against = candidate.base if name in added and candidate.base else None
        source = cast(dict[str, Any], mine.get(f"vs_{against}", {})) if against else mine
        gate = judge(name, candidate.name, source.get(key), gates[name], name in added, against)
        answers = source.get("top1_answers") if name == "min_top1_agreement" else None
        if gate.value is not None and isinstance(answers, int) and answers > 0:
            gate.interval = share_interval(gate.value, answers)
        result.append(gate)
    if "max_accuracy_drop" in gates:
        drop = None
        if "accuracy" in mine and "accuracy" in metrics[reference]:
            drop = float(metrics[reference]["accuracy"]) - float(mine["accuracy"])  # type: ignore[arg-type]
        gate = judge("max_accuracy_drop", candidate.name, drop, gates["max_accuracy_drop"], "max_accuracy_drop" in added)
        lost, gained, answers = mine.get("answers_lost"), mine.get("answers_gained"), mine.get("top1_answers")
        if gate.value is not None and isinstance(lost, int) and isinstance(gained, int) and isinstance(answers, int):
            gate.interval = drop_interval(lost, gained, answers)
        result.append(gate)
    if "max_size_ratio" in gates:
        result.append(judge("max_size_ratio", candidate.name, mine.get("size_ratio"), gates["max_size_ratio"]))
    if "atol" in gates or "rtol" in gates:
        result.append(judge("within_tolerance", candidate.name, mine.get("within_tolerance"), 1.0, "atol" in added))
    return result


def _undecided_shares(gates: Sequence[Gate]) -> list[str]:
    """A note for each failed share gate whose interval still holds its threshold: too few answers to tell."""
    notes = []
    for gate in gates:
        if gate.passed or gate.name in SPEED_GATES or not gate.interval or gate.value is None:
            continue
        low, high = gate.interval
        if (high < gate.threshold) if HIGHER_IS_BETTER.get(gate.name, True) else (low > gate.threshold):
            continue  # decided against the model
        more = "more answers would decide it"
        if gate.name == "min_top1_agreement":  # the answer count that ends the interval of this share below the threshold
            needed = next((n for n in (2**k * 100 for k in range(15)) if share_interval(gate.value, n)[1] < gate.threshold), None)
            more = f"about {needed} answers at this share would decide it" if needed else "far more answers would decide it"
        notes.append(f"gate {gate.name} on {gate.model}: {gate.value:.4f} misses {gate.threshold} but is undecided: its 95 % "
                     f"interval [{low:.3f}, {high:.3f}] over the validation answers holds the threshold, so the sample count "
                     f"cannot tell it from a model that meets the gate ({more}); give more validation samples")
    return notes


def _speed_checks(candidate: Candidate, gates: Mapping[str, float], added: set[str], reference: str,
                  ort_baseline: str | None) -> list[_SpeedCheck]:
    checks = []
    if "min_speedup_vs_ort_fp32" in gates and ort_baseline is not None and ort_baseline != candidate.name:
        checks.append(_SpeedCheck("min_speedup_vs_ort_fp32", candidate.name, ort_baseline, gates["min_speedup_vs_ort_fp32"],
                                  "min_speedup_vs_ort_fp32" in added))
    if "min_speedup" in gates:
        checks.append(_SpeedCheck("min_speedup", candidate.name, reference, gates["min_speedup"], "min_speedup" in added))
    if "min_speedup_vs_fp32" in gates and candidate.base is not None:
        checks.append(_SpeedCheck("min_speedup_vs_fp32", candidate.name, candidate.base, gates["min_speedup_vs_fp32"],
                                  "min_speedup_vs_fp32" in added))
    return checks


SETTLED = 0.01  # an undecided speed interval this close to its threshold stops the timing


def decide_speed(checks: Sequence[_SpeedCheck], timer: Timer | None, notes: list[str]) -> list[Gate]:
    """Speed gates on the confidence interval: pass when it clears the threshold, fail when it misses it;
    undecided gates get more rounds (within the plan's bounds), then fail as 'within noise'. Timing stops early
    once every undecided interval lies within SETTLED (1%) of its threshold, or within the A/A control's own offset
    from 1.0 when that is larger: a difference that small is not a speed difference a gate should rest on."""
    settled: set[tuple[str, str]] = set()

    def band(measurement: Measurement | None) -> float:
        aa = measurement.aa if measurement else None
        return max(SETTLED, abs(aa.value - 1.0)) if aa is not None else SETTLED

    def undecided() -> list[_SpeedCheck]:
        measurement = timer.measurement() if timer else None
        width = band(measurement)
        open_checks = []
        for c in checks:
            r = c.ratio(measurement)
            if r is None or r.decide(c.threshold) is not None:
                continue
            if c.threshold * (1 - width) <= r.low and r.high <= c.threshold * (1 + width):
                settled.add((c.model, c.gate))
                continue
            open_checks.append(c)
        return open_checks

    while timer is not None and undecided() and not timer.exhausted:
        timer.run(rounds=max(timer.rounds, 5))
    measurement = timer.measurement() if timer else None
    gates = []
    for check in checks:
        ratio = check.ratio(measurement)
        if ratio is None:
            notes.append(f"gate {check.gate} on {check.model}: not measured ({check.baseline} or {check.model} was not timed)")
            gates.append(Gate(check.gate, check.model, None, check.threshold, False, check.default, check.baseline))
            continue
        verdict = ratio.decide(check.threshold)
        if verdict is None and (check.model, check.gate) in settled:
            notes.append(
                f"gate {check.gate} on {check.model}: undecided, the speedup {ratio} over {check.baseline} lies within "
                f"{band(measurement):.1%} of the threshold {check.threshold}: no speed difference worth gating on "
                "(timing stopped there)"
            )
        elif verdict is None:
            noise = measurement.noise if measurement else None
            notes.append(
                f"gate {check.gate} on {check.model}: undecided, the speedup {ratio} over {check.baseline} straddles the "
                f"threshold {check.threshold} (A/A noise floor {noise if noise is not None else 'unknown'}); the difference is "
                "within the noise of this measurement: time longer ([verify] runs, --runs) or on a quieter machine"
            )
        gates.append(Gate(check.gate, check.model, round(ratio.value, 4), check.threshold, verdict is True, check.default,
                          check.baseline if check.gate != "min_speedup" else None, [round(ratio.low, 4), round(ratio.high, 4)]))
    return gates


# --- the whole verification ---------------------------------------------------------------------


def verify_models(
    reference: Runner,
    candidates: Sequence[Runner | Candidate],
    dataset: Dataset,
    task: str,
    cfg: VerifyConfig,
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    extra: Sequence[Runner] = (),
    ort_baseline: str | None = None,
    speed_gate: str | None = None,
) -> VerifyResult:
    """Outputs, task metrics, block-timed latency and gates for each candidate against the reference.

    `extra` runners are measured like candidates but not gated (e.g. the unpruned model, for comparison);
    `ort_baseline` names the runner of the original's plain ONNX Runtime fp32 export (speedup_vs_ort_fp32);
    `speed_gate` is the default speed gate of quantized candidates (see gates.defaults)."""
    progress = progress or Silent()
    sizes = sizes or {}
    names = reference.output_names
    chosen = [as_candidate(c) for c in candidates]
    result = VerifyResult(metrics={})
    labels = dataset.labels
    user = cfg.gates.model_dump(exclude_none=True)
    plans = {}
    for c in chosen:
        gate_speed = speed_gate if speed_gate != "min_speedup_vs_fp32" or c.base else None
        plans[c.name] = effective(user, c.kind, task, labels is not None, gate_speed, cfg.default_gates)
    with torch_threads(cfg.threads):
        runners = [reference, *(c.runner for c in chosen), *extra]
        outputs = collect_outputs(runners, dataset, cfg.batch_size, progress)
        result.outputs = outputs
        check_labels(dataset, outputs[reference.name][0], task)
        ref_metrics: dict[str, object] = {}
        if task == "classification" and labels is not None:
            ref_metrics["accuracy"] = accuracy(outputs[reference.name][0], labels)
        if task == "regression" and labels is not None:
            ref_metrics.update(regression_metrics(outputs[reference.name][0], labels))
        result.metrics[reference.name] = ref_metrics
        for c in chosen:
            result.metrics[c.name] = compare_outputs(names, outputs[reference.name], outputs[c.name], task, labels,
                                                     _tolerance(plans[c.name][0]))
        for runner in extra:
            result.metrics[runner.name] = compare_outputs(names, outputs[reference.name], outputs[runner.name], task, labels)
        for c in chosen:
            if c.base is not None and c.base in outputs:
                against = compare_outputs(names, outputs[c.base], outputs[c.name], task, None)
                keep = ("cosine_mean", "cosine_min", "snr_db", "max_abs_error", "top1_agreement", "top1_answers")
                result.metrics[c.name][f"vs_{c.base}"] = {k: against.get(k) for k in keep if k in against}
        timer, latency_batch = time_models(runners, dataset, cfg, progress, result.notes)
        checks = [s for c in chosen for s in _speed_checks(c, *plans[c.name], reference.name, ort_baseline)]
        speed = decide_speed(checks, timer, result.notes)
        _throughput(runners, dataset, cfg, result)
    measurement = timer.measurement() if timer else None
    result.measurement = measurement
    _latency_metrics(result, runners, chosen, measurement, latency_batch, reference.name, ort_baseline, sizes)
    if measurement is not None:
        result.latency = {**measurement.describe(cfg.threads), "batch": latency_batch}
        noise = measurement.noise
        if noise is not None and noise > 0.05:
            result.notes.append(f"latency is noisy on this machine now: the A/A control (a model against itself) is off "
                                f"by up to {noise:.1%}; speed differences below that are not resolved")
    for c in chosen:
        result.gates.extend(_quality_gates(c, *plans[c.name], result.metrics, reference.name))
        result.gates.extend(g for g in speed if g.model == c.name)
    result.notes.extend(_undecided_shares(result.gates))
    if "min_speedup_vs_ort_fp32" in user and (ort_baseline is None or all(c.name == ort_baseline for c in chosen)):
        result.notes.append("gate min_speedup_vs_ort_fp32 not evaluated: the original's plain ONNX Runtime fp32 export was "
                            "not timed next to another model")
    if "min_speedup_vs_fp32" in user and not any(c.base for c in chosen):
        result.notes.append("gate min_speedup_vs_fp32 not evaluated: no quantized model made from a float one was verified")
    return result


def _latency_metrics(result: VerifyResult, runners: Sequence[Runner], chosen: Sequence[Candidate], measurement: Measurement | None,
                     latency_batch: int, reference: str, ort_baseline: str | None, sizes: Mapping[str, int]) -> None:
    bases = {c.name: c.base for c in chosen}
    for runner in runners:
        metrics = result.metrics[runner.name]
        if measurement is not None and runner.name in measurement:
            timed = measurement.timed[runner.name]
            metrics["latency_ms"] = timed.summary()
            metrics["throughput_per_s"] = round(latency_batch * 1000.0 / timed.center_ms, 2)
            comparisons = [("speedup", reference), ("speedup_vs_ort_fp32", ort_baseline)]
            base = bases.get(runner.name)
            if base is not None:
                comparisons.append((f"speedup_vs_{base}", base))
            for key, baseline in comparisons:
                if baseline is not None and baseline in measurement:
                    ratio = measurement.speedup(baseline, runner.name)
                    metrics[key] = round(ratio.value, 4)
                    metrics[f"{key}_ci"] = [round(ratio.low, 4), round(ratio.high, 4)]
        if runner.name in sizes and reference in sizes:
            metrics["size_ratio"] = round(sizes[runner.name] / sizes[reference], 4)


def _probe_batch(runner: Runner | None, dataset: Dataset, size: int = 8) -> dict[str, np.ndarray]:
    """Up to `size` samples, or exactly the runner's fixed batch size (wrapping around if needed)."""
    fixed = _fixed_batch(runner) if runner is not None else None
    return next(dataset.batches(fixed or min(size, len(dataset)), pad=fixed is not None))


@dataclass
class CandidateFile:
    """An ONNX candidate of verify_and_explain: name, file, kind of change, and the model it was made from."""

    name: str
    path: Path
    kind: Kind | None = None  # None: 'quantized' if its graph holds quantized operators, else 'equivalent'
    base: str | None = None


def verify_and_explain(
    reference: Runner,
    candidates: Sequence[CandidateFile],
    dataset: Dataset,
    task: str,
    cfg: VerifyConfig,
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    extra: Sequence[tuple[str, Path]] = (),
    localize_pairs: Sequence[tuple[str, Path, Path]] = (),
    always_localize: bool = False,
    golden: Path | None = None,
    user_files: bool = False,
    ort_baseline: str | None = None,
    speed_gate: str | None = None,
) -> dict[str, object]:
    """verify_models on ONNX files, plus what explains the verdict: session memory, where failing
    candidates diverge (pairs of name, base model, candidate model), golden outputs. A report fragment."""
    import onnx

    from deploytool.data import check_indices
    from deploytool.golden import save_golden
    from deploytool.localize import localize
    from deploytool.memory import session_peak_bytes

    runners = {c.name: OrtRunner(c.name, c.path, cfg.threads, user_files) for c in candidates}
    chosen = [Candidate(c.name, runners[c.name], c.kind or ("quantized" if is_quantized(c.path) else "equivalent"), c.base)
              for c in candidates]
    extras = [OrtRunner(name, path, cfg.threads, user_files) for name, path in extra]
    expected = sorted(getattr(reference, "input_names", dataset.feeds))
    for runner in [*runners.values(), *extras]:
        if sorted(runner.input_names) != expected:
            raise UserError(f"{runner.path}: inputs {sorted(runner.input_names)} differ from the reference's {expected}")
    for path in dict.fromkeys([*(c.path for c in candidates), *(p for _, p in extra)]):
        check_indices(onnx.load(str(path), load_external_data=False), dataset)  # token ids out of vocabulary
    result = verify_models(reference, chosen, dataset, task, cfg, sizes, progress, extras, ort_baseline, speed_gate)
    if golden is not None:
        save_golden(golden, dataset, reference.output_names, result.outputs[reference.name], reference.name)
    failed = {g.model for g in result.failed if g.name not in SPEED_GATES}  # a slow model has nothing to localise
    notes = list(result.notes)
    for c in chosen:
        if c.name in failed and c.kind == "quantized":
            try:
                notes.extend(_input_floor(c, runners, reference, result, dataset, task, cfg))
            except UserError:
                raise
            except Exception as exc:  # a diagnostic of the verdict: it must not take the verdict with it
                notes.append(f"{c.name}: the input-rounding floor could not be measured ({type(exc).__name__}: {exc})")
    result.outputs = {}  # the comparison is done: free the outputs before localisation needs memory
    first = next(iter(runners.values()), None)
    feeds = _probe_batch(first, dataset, cfg.latency_batch)
    if cfg.memory:
        for name, path in [*((c.name, c.path) for c in candidates), *extra]:
            result.metrics[name]["peak_memory_bytes"] = session_peak_bytes(path, feeds, cfg.threads)
    threshold = cfg.gates.min_cosine or DEFAULT_MIN_COSINE
    localization: dict[str, dict[str, object]] = {}
    for name, base, path in localize_pairs:
        if always_localize or name in failed:
            try:
                localization[name] = localize(base, path, _probe_batch(runners.get(name), dataset), threshold)
            except UserError:
                raise
            except Exception as exc:  # localisation explains a verdict; it must not take the verdict with it
                notes.append(f"{name}: could not localise where it diverges ({type(exc).__name__}: {exc})")
    notes.extend(_explain(result, localization, failed))
    return {
        "metrics": result.metrics,
        "gates": [g.as_dict() for g in result.gates],
        "passed": result.passed,
        "latency_batch": min(cfg.latency_batch, len(dataset)),
        "latency": result.latency,
        "latency_samples_ms": {k: [round(v, 4) for v in vals] for k, vals in result.latency_samples_ms.items()},
        "localization": localization,
        "notes": notes,
    }


def _input_floor(candidate: Candidate, runners: Mapping[str, OrtRunner], reference: Runner, result: VerifyResult,
                 dataset: Dataset, task: str, cfg: VerifyConfig) -> list[str]:
    """For a quantized candidate that failed a quality gate: its float base model (or the reference) run on inputs
    rounded as the candidate rounds them (deploytool.floor), scored like the candidate; recorded in its metrics
    as `input_rounding_floor`, with a note when that rounding alone already costs what the gates allow."""
    from deploytool.floor import describe, run_rounded

    assert isinstance(candidate.runner, OrtRunner)
    base = runners.get(candidate.base or "") or reference
    if base.name not in result.outputs:
        return []
    with torch_threads(cfg.threads):
        measured = run_rounded(base, candidate.runner.path, dataset, _batch_size(base, cfg.batch_size),
                               pad=_fixed_batch(base) is not None)
    if measured is None:
        return []
    rounded, snr = measured
    compared = compare_outputs(base.output_names, result.outputs[base.name], rounded, task, None)
    floor: dict[str, object] = {"against": base.name, "cosine": compared.get("cosine_mean"), "snr_db": compared.get("snr_db")}
    if "top1_agreement" in compared:
        floor["top1_agreement"] = compared["top1_agreement"]
    if snr is not None:
        floor["input_snr_db"] = snr
    result.metrics[candidate.name]["input_rounding_floor"] = floor
    gates = {g.name: g.threshold for g in result.gates if g.model == candidate.name}
    misses = [label for key, gate, label in (("cosine", "min_cosine", "cosine"),
                                             ("top1_agreement", "min_top1_agreement", "top-1 agreement"),
                                            ("snr_db", "min_snr_db", "SNR"))
              if gate in gates and isinstance(value := floor.get(key), float) and value < gates[gate]]
    if not misses:
        return []
    return [f"{candidate.name}: its float model alone, on inputs rounded to {candidate.name}'s input step, already scores "
            f"{describe(floor)} against {base.name}: below the gates on {', '.join(misses)}. The model is this sensitive to "
            "8-bit rounding of its input (random or barely trained weights, near-tied classes), not only to the quantizer"]


def _number(value: object, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return f"{float(value):.{digits}f}"
    return "nan" if isinstance(value, float) else "n/a"


def _explain(result: VerifyResult, localization: Mapping[str, dict[str, object]], failed: set[str]) -> list[str]:
    """Notes that name where a failing candidate diverges and which tolerance would have passed."""
    notes = []
    for name, where in localization.items():
        spot = where.get("first") if name in failed else None
        if isinstance(spot, dict):
            worst = where.get("worst") or spot
            assert isinstance(worst, dict)
            notes.append(
                f"{name} first diverges at tensor '{spot['tensor']}' (node '{spot['node']}', {spot['op']}, cosine "
                f"{_number(spot.get('cosine_mean'))}); worst at '{worst['tensor']}' (node '{worst['node']}', "
                f"cosine {_number(worst.get('cosine_mean'))})"
            )
        elif name in failed and where.get("tensors"):
            notes.append(f"{name}: no intermediate tensor diverges below the cosine threshold; the failure is in the outputs")
    for gate in result.failed:
        if gate.name == "within_tolerance":
            for output, stats in cast(dict[str, Any], result.metrics[gate.model]["outputs"]).items():
                if "min_atol" in stats:
                    notes.append(
                        f"{gate.model} output '{output}': smallest atol that passes {stats['min_atol']:.3g} (rtol 0), "
                        f"smallest rtol {stats['min_rtol']:.3g} (atol 0)"
                    )
    return notes


def verify_report(ref: object, reference_path: Path, names: Sequence[str], paths: Sequence[Path], cfg: VerifyConfig,
                  golden: Path | None = None) -> dict[str, object]:
    """The whole `verify` command as a report: candidates against a resolved reference (stages.reference)."""
    from deploytool.artifacts import describe
    from deploytool.stages.reference import Reference
    from deploytool.stages.report import environment

    assert isinstance(ref, Reference)
    onnx_reference = reference_path.suffix == ".onnx"
    pairs = [(n, reference_path, p) for n, p in zip(names, paths)] if onnx_reference else []
    sizes = {n: p.stat().st_size for n, p in zip(names, paths)}
    if onnx_reference:
        sizes["reference"] = reference_path.stat().st_size
    fragment = verify_and_explain(
        ref.runner, [CandidateFile(n, p) for n, p in zip(names, paths)], ref.dataset, ref.task, cfg, sizes,
        localize_pairs=pairs, golden=golden, user_files=True,
        ort_baseline="reference" if ref.onnx_float else None, speed_gate="min_speedup" if ref.onnx_float else None)
    return {
        "name": f"verify against {ref.label}", "passed": fragment["passed"], "gates": fragment["gates"],
        "models": {"reference": describe(reference_path), **{n: describe(p) for n, p in zip(names, paths)}},
        "metrics": fragment["metrics"], "stages": [], "environment": environment(cfg.threads), "data": ref.dataset.source,
        **{k: v for k, v in fragment.items() if k not in ("passed", "gates", "metrics")},
    }
