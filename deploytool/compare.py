"""Error statistics between reference and candidate outputs, and task metrics."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def _per_sample(array: np.ndarray) -> np.ndarray:
    # explicit width: reshape(0, -1) is ambiguous, and a detector may well return zero boxes
    flat = array.reshape(len(array), int(np.prod(array.shape[1:]))) if array.ndim else array.reshape(1, 1)
    return flat.astype(np.float64)


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | bool | list[int] | None]:
    """max/mean abs error, per-sample cosine (mean and min), SNR in dB, NaN/Inf counts, shape check."""
    result: dict[str, float | bool | list[int] | None] = {
        "shape_match": reference.shape == candidate.shape,
        "reference_shape": list(reference.shape),
        "candidate_shape": list(candidate.shape),
    }
    return _compared(reference, candidate, result, _statistics)


Statistics = Callable[[np.ndarray, np.ndarray, dict[str, float | bool | list[int] | None]],
                      dict[str, float | bool | list[int] | None]]


def _compared(reference: np.ndarray, candidate: np.ndarray, result: dict[str, float | bool | list[int] | None],
              statistics: Statistics) -> dict[str, float | bool | list[int] | None]:
    """`statistics` of the two arrays flattened per sample, into `result`; nothing more where their shapes differ."""
    if reference.shape != candidate.shape:
        return result
    # NaN/Inf in a candidate is an expected outcome (counted, failing outputs_valid), not a warning
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return statistics(_per_sample(reference), _per_sample(candidate), result)


def _statistics(
    ref: np.ndarray, cand: np.ndarray, result: dict[str, float | bool | list[int] | None]
) -> dict[str, float | bool | list[int] | None]:
    result["nonfinite"] = int((~np.isfinite(cand)).sum())
    diff = np.abs(ref - cand)
    result["max_abs_error"] = float(np.nanmax(diff)) if diff.size else 0.0
    result["mean_abs_error"] = float(np.nanmean(diff)) if diff.size else 0.0
    result["median_abs_error"] = float(np.nanmedian(diff)) if diff.size else 0.0
    result["p99_abs_error"] = float(np.nanpercentile(diff, 99)) if diff.size else 0.0
    magnitude = np.abs(ref)
    relative = np.where(magnitude > 0, diff / np.where(magnitude > 0, magnitude, 1.0), np.where(diff > 0, np.inf, 0.0))
    result["max_rel_error"] = float(np.nanmax(relative)) if diff.size else 0.0
    result["mean_rel_error"] = float(np.nanmean(relative[np.isfinite(relative)])) if np.isfinite(relative).any() else 0.0
    # the smallest tolerance that would have passed every element, with the other tolerance at zero
    result["min_atol"] = result["max_abs_error"]
    result["min_rtol"] = result["max_rel_error"]
    _cosine_and_snr(ref, cand, result)
    return result


def _cosine_and_snr(ref: np.ndarray, cand: np.ndarray, result: dict[str, float | bool | list[int] | None]) -> None:
    """cosine_mean and cosine_min over samples (rows), and snr_db over every element, into `result`."""
    _summarize(_cosines(ref, cand), float((ref**2).sum()), float(((ref - cand) ** 2).sum()), result)


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """The cosine of each sample (row); two all-zero samples are identical, one zero and one not are orthogonal."""
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    dots = (ref * cand).sum(axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(cand, axis=1) == 0)
    return np.asarray(np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms)))


def _summarize(cosine: np.ndarray, signal: float, noise: float, result: dict[str, float | bool | list[int] | None]) -> None:
    """cosine_mean and cosine_min of the samples' cosines, and snr_db of the summed signal and error energies."""
    if not cosine.size:  # two empty outputs (no samples, or a detector's zero boxes) agree
        cosine = np.ones(1)
    result["cosine_mean"] = float(np.nanmean(cosine)) if np.isfinite(cosine).any() else float("nan")
    result["cosine_min"] = float(np.min(cosine))
    if noise == 0:
        result["snr_db"] = float("inf")
    elif signal == 0:
        result["snr_db"] = float("-inf")  # any error on an all-zero reference is all noise
    else:  # a ratio of the two, whatever their magnitude (outputs of 1e-30 are as sensitive as outputs of 1)
        result["snr_db"] = float(10 * (np.log10(signal) - np.log10(noise)))


def compare_signal(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | bool | list[int] | None]:
    """The cheap part of compare_arrays (shape check, max abs error, cosine, SNR) with the same values: for the
    hundreds of intermediate tensors localisation compares, where medians and percentiles would cost the most."""
    signal = Signal()
    signal.add(reference, candidate)
    return signal.result()


class Signal:
    """compare_signal over outputs that come in chunks of samples (a model run on a few samples at a time): the
    values compare_signal gives on the chunks concatenated along the sample axis, without holding them all."""

    def __init__(self) -> None:
        self.shape_match: bool | None = None
        self.cosines: list[np.ndarray] = []
        self.max_abs_error = 0.0
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if self.shape_match is not False:
            self.shape_match = reference.shape == candidate.shape
            _compared(reference, candidate, {}, self._accumulate)

    def _accumulate(self, ref: np.ndarray, cand: np.ndarray,
                    result: dict[str, float | bool | list[int] | None]) -> dict[str, float | bool | list[int] | None]:
        diff = np.abs(ref - cand)
        if diff.size:
            self.max_abs_error = float(np.fmax(self.max_abs_error, np.nanmax(diff)))
        self.cosines.append(_cosines(ref, cand))
        self.noise += float(((ref - cand) ** 2).sum())
        self.signal += float((ref**2).sum())
        return result

    def result(self) -> dict[str, float | bool | list[int] | None]:
        result: dict[str, float | bool | list[int] | None] = {"shape_match": bool(self.shape_match)}
        if self.shape_match:
            result["max_abs_error"] = self.max_abs_error
            with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                _summarize(np.concatenate(self.cosines), self.signal, self.noise, result)
        return result


def within_tolerance(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> float:
    """Share of elements that pass: |candidate - reference| <= atol, or <= rtol * |reference|."""
    if reference.shape != candidate.shape or reference.size == 0:
        return 0.0 if reference.shape != candidate.shape else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        ok = (diff <= atol) | (diff <= rtol * np.abs(reference.astype(np.float64)))
    return float(ok.mean())


def classification_metrics(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, k: int = 5
) -> dict[str, float]:
    """Top-1 (and top-k) agreement with the reference and, with labels, accuracy of the candidate."""
    answers = int(reference.size // reference.shape[-1]) if reference.ndim and reference.shape[-1] else 0
    metrics: dict[str, float] = {"top1_agreement": top1_agreement(reference, candidate), "top1_answers": answers}
    if reference.ndim >= 1 and reference.shape[-1] > k:
        # the reference's top-1 class is among the candidate's top k
        top_k = np.argsort(-candidate, axis=-1)[..., :k]
        metrics[f"top{k}_agreement"] = float((top_k == reference.argmax(-1)[..., None]).any(-1).mean())
    if labels is not None:
        metrics["accuracy"] = accuracy(candidate, labels)
        truth, mine, theirs = labels.reshape(-1), candidate.argmax(-1).reshape(-1), reference.argmax(-1).reshape(-1)
        if mine.shape == truth.shape == theirs.shape:  # the paired counts behind an accuracy drop against the reference
            metrics["answers_lost"] = int(((theirs == truth) & (mine != truth)).sum())
            metrics["answers_gained"] = int(((theirs != truth) & (mine == truth)).sum())
    return metrics


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of answers (argmax over the last axis: per sample, or per token or position) the candidate shares with
    the reference."""
    return float((reference.argmax(-1) == candidate.argmax(-1)).mean())


def regression_metrics(candidate: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean absolute and root-mean-square error of the candidate against regression targets."""
    target = labels.reshape(candidate.shape) if labels.size == candidate.size else labels.reshape(len(labels), -1)
    diff = candidate.reshape(target.shape).astype(np.float64) - target.astype(np.float64)
    return {"mae": float(np.abs(diff).mean()), "rmse": float(np.sqrt((diff**2).mean()))}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels.reshape(-1)).mean())
