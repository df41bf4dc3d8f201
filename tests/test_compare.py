"""compare: error statistics between reference and candidate outputs, and classification metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deploytool.compare import accuracy, classification_metrics, compare_arrays, compare_signal
from deploytool.stages.report import json_safe


def logits(n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 10)).astype(np.float32)


def test_identical_outputs() -> None:
    ref = logits()
    result = compare_arrays(ref, ref.copy())
    assert result["shape_match"] is True and result["nonfinite"] == 0
    assert result["cosine_mean"] == pytest.approx(1.0) and result["cosine_min"] == pytest.approx(1.0)
    assert result["max_abs_error"] == 0.0 and result["mean_abs_error"] == 0.0
    assert result["snr_db"] == math.inf
    assert json_safe(result)["snr_db"] is None  # JSON has no Infinity: the report holds null


@pytest.mark.parametrize("shape", [(20, 10), (4, 3, 8, 8), (0, 5)])
def test_compare_signal_agrees_with_compare_arrays(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(shape).astype(np.float32)
    cand = ref + 0.05 * rng.standard_normal(shape).astype(np.float32)
    full, cheap = compare_arrays(ref, cand), compare_signal(ref, cand)
    assert set(cheap) == {"shape_match", "max_abs_error", "cosine_mean", "cosine_min", "snr_db"}
    for key in cheap:
        assert cheap[key] == full[key] or (cheap[key] != cheap[key] and full[key] != full[key]), key
    assert compare_signal(ref, np.zeros(7, np.float32)) == {"shape_match": False}


def test_small_noise_gives_finite_snr_and_cosine_below_one() -> None:
    ref = logits()
    noise = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32) * 1e-2
    result = compare_arrays(ref, ref + noise)
    assert 0.999 < result["cosine_mean"] < 1.0  # type: ignore[operator]
    assert result["cosine_min"] <= result["cosine_mean"]  # type: ignore[operator]
    assert result["max_abs_error"] == pytest.approx(float(np.abs(noise).max()), rel=1e-5)
    expected_snr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / (noise.astype(np.float64) ** 2).sum())
    assert result["snr_db"] == pytest.approx(expected_snr, rel=1e-6)


def test_negated_output_has_cosine_minus_one() -> None:
    ref = logits()
    result = compare_arrays(ref, -ref)
    assert result["cosine_mean"] == pytest.approx(-1.0) and result["cosine_min"] == pytest.approx(-1.0)


def test_shape_mismatch_is_reported_without_statistics() -> None:
    result = compare_arrays(logits(), logits()[:, :5])
    assert result["shape_match"] is False
    assert result["reference_shape"] == [20, 10] and result["candidate_shape"] == [20, 5]
    assert "cosine_mean" not in result and "max_abs_error" not in result


def test_nan_and_inf_in_the_candidate_are_counted() -> None:
    ref = logits()
    cand = ref.copy()
    cand[3, 2] = np.nan
    cand[7, 0] = np.inf
    result = compare_arrays(ref, cand)
    assert result["nonfinite"] == 2
    assert math.isnan(result["cosine_min"])  # type: ignore[arg-type]


def test_all_zero_samples() -> None:
    zeros = np.zeros((2, 4), np.float32)
    assert compare_arrays(zeros, zeros)["cosine_min"] == 1.0  # identical
    one_zero = np.array([[0, 0, 0, 0], [1, 2, 3, 4]], np.float32)
    result = compare_arrays(np.ones((2, 4), np.float32), one_zero)
    assert result["cosine_min"] == 0.0  # a zero vector against a non-zero one: orthogonal


def test_scalar_and_one_dimensional_outputs() -> None:
    assert compare_arrays(np.float32(2.0), np.float32(2.0))["max_abs_error"] == 0.0
    result = compare_arrays(np.arange(1, 5, dtype=np.float32), np.arange(1, 5, dtype=np.float32) * 1.5)
    assert result["cosine_mean"] == pytest.approx(1.0) and result["max_abs_error"] == pytest.approx(2.0)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.int32, (6, 5), elements=st.integers(-1000, 1000)),
    st.sampled_from([0.125, 0.5, 3.0, 10.0]),
    arrays(np.int32, (6, 5), elements=st.integers(-1000, 1000)),
)
def test_cosine_is_bounded_and_scale_invariant(ref: np.ndarray, scale: float, other: np.ndarray) -> None:
    ref = ref.astype(np.float32)
    unrelated = compare_arrays(ref, other.astype(np.float32))
    assert -1.0 - 1e-9 <= unrelated["cosine_min"] <= unrelated["cosine_mean"] <= 1.0 + 1e-9  # type: ignore[operator]
    result = compare_arrays(ref, ref * np.float32(scale))
    assert result["cosine_min"] == pytest.approx(1.0, abs=1e-6)


def test_classification_metrics_and_accuracy() -> None:
    ref = np.eye(4, dtype=np.float32)  # predicts 0, 1, 2, 3
    cand = ref[[0, 1, 3, 3]]  # predicts 0, 1, 3, 3
    labels = np.array([0, 1, 2, 0])
    metrics = classification_metrics(ref, cand, labels)
    assert metrics == {"top1_agreement": 0.75, "top1_answers": 4, "accuracy": 0.5, "answers_lost": 1, "answers_gained": 0}
    assert classification_metrics(ref, cand, None) == {"top1_agreement": 0.75, "top1_answers": 4}
    tokens = np.zeros((2, 5, 4), np.float32)  # one answer per token: 10
    assert classification_metrics(tokens, tokens, None)["top1_answers"] == 10
    assert accuracy(ref, labels.reshape(4, 1)) == 0.75
