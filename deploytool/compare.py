"""Error statistics between reference and candidate outputs, and task metrics."""

from __future__ import annotations

import numpy as np


def _per_sample(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    return flat.astype(np.float64)


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | bool | list[int] | None]:
    """max/mean abs error, per-sample cosine (mean and min), SNR in dB, NaN/Inf counts, shape check."""
    result: dict[str, float | bool | list[int] | None] = {
        "shape_match": reference.shape == candidate.shape,
        "reference_shape": list(reference.shape),
        "candidate_shape": list(candidate.shape),
    }
    if reference.shape != candidate.shape:
        return result
    ref, cand = _per_sample(reference), _per_sample(candidate)
    result["nonfinite"] = int((~np.isfinite(cand)).sum())
    diff = np.abs(ref - cand)
    result["max_abs_error"] = float(np.nanmax(diff)) if diff.size else 0.0
    result["mean_abs_error"] = float(np.nanmean(diff)) if diff.size else 0.0
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    dots = (ref * cand).sum(axis=1)
    # two all-zero samples are identical; one zero and one not are orthogonal
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(cand, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))
    result["cosine_mean"] = float(np.nanmean(cosine)) if np.isfinite(cosine).any() else float("nan")
    result["cosine_min"] = float(np.min(cosine))
    noise = float(((ref - cand) ** 2).sum())
    signal = float((ref**2).sum())
    result["snr_db"] = float("inf") if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise))
    return result


def classification_metrics(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    """Top-1 agreement with the reference and, with labels, accuracy of the candidate."""
    metrics = {"top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean())}
    if labels is not None:
        metrics["accuracy"] = accuracy(candidate, labels)
    return metrics


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels.reshape(-1)).mean())
