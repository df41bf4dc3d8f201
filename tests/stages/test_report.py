"""Reports never break: NaN, infinities, None and empty or missing sections render; report.json comes first."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploytool.report_schema import Report
from deploytool.stages.report import json_safe, render_html, render_markdown, summary_rows, write_reports

numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))


def ascii_text(most: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(max_codepoint=127), max_size=most)


spots = st.one_of(st.none(), st.fixed_dictionaries({"tensor": ascii_text(5), "node": ascii_text(5),
                                                     "op": st.sampled_from(["Conv", "MatMul"]), "cosine_mean": numbers}))
metrics = st.dictionaries(
    st.sampled_from(["accuracy", "top1_agreement", "cosine_mean", "max_abs_error", "speedup", "speedup_vs_ort_fp32",
                     "snr_db"]), numbers
).map(lambda m: {**m, "latency_ms": {"p50": m.get("speedup"), "p90": None}, "speedup_ci": [m.get("speedup"), None]})
reports = st.fixed_dictionaries(
    {
        "name": ascii_text(10),
        "passed": st.booleans(),
        "gates": st.lists(st.fixed_dictionaries({"name": ascii_text(8), "model": ascii_text(4), "value": numbers,
                                                 "threshold": numbers, "passed": st.booleans(), "default": st.booleans()}),
                          max_size=4),
        "models": st.dictionaries(st.sampled_from(["reference", "fp32", "int8"]),
                                  st.fixed_dictionaries({"path": st.none() | ascii_text(8), "sha256": st.none() | ascii_text(8),
                                                         "size_bytes": st.none() | st.integers(0, 2**40)}), max_size=3),
        "metrics": st.dictionaries(st.sampled_from(["reference", "fp32", "int8"]), metrics, max_size=3),
        "stages": st.lists(st.fixed_dictionaries({"name": ascii_text(5), "status": st.sampled_from(["done", "cached", "skipped", "failed"]),
                                                  "seconds": st.floats(0, 1e6)}),
                           max_size=3),
        "environment": st.one_of(st.just({}), st.just({"threads": 2, "cpu": {"model": None, "isa": []}, "versions": {}})),
        "notes": st.lists(ascii_text(20), max_size=2),
        "localization": st.dictionaries(st.sampled_from(["int8", "fp32"]), st.fixed_dictionaries(
            {"tensors": st.lists(st.fixed_dictionaries({"tensor": ascii_text(4), "cosine_mean": numbers}), max_size=4),
             "first": spots, "worst": spots}), max_size=2),
        "latency_samples_ms": st.dictionaries(st.sampled_from(["fp32", "int8"]), st.lists(numbers, max_size=5), max_size=2),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(report=reports)
def test_any_report_renders_and_report_json_is_valid(report: dict[str, Any], tmp_path: Path) -> None:
    typed = Report.model_validate(json_safe(report))
    assert "Verdict" in render_markdown(typed)
    assert render_html(typed).startswith("<!doctype html>")
    assert write_reports(report, tmp_path) == typed
    written = json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN
    assert written["passed"] == report["passed"] and len(written["gates"]) == len(report["gates"])
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "report.md").stat().st_size > 0


def test_nan_and_none_render_as_such() -> None:
    report = Report(name="r", passed=False, gates=[], models={}, stages=[], environment={},
                    metrics={"int8": {"cosine_mean": math.nan, "accuracy": None, "speedup": math.inf}})
    _, rows = summary_rows(report)
    assert rows[0][4] == "nan" and rows[0][2] == "-" and rows[0][8].startswith("inf")


def test_a_broken_section_leaves_a_note_and_the_rest_of_the_report(tmp_path: Path) -> None:
    report = {"name": "r", "passed": False, "gates": [], "metrics": {"fp32": {"cosine_mean": 1.0}}, "models": {},
              "stages": [], "environment": {}, "prune": {"method": "channel"}}  # a pruning record without its fields
    write_reports(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "this section could not be rendered" in markdown and "## Models" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["fp32"]["cosine_mean"] == 1.0


def test_json_safe_handles_numpy_scalars_tuples_and_paths() -> None:
    import numpy as np

    value = json_safe({"a": np.float32(1.5), "b": (1, np.int64(2)), "c": Path("x"), "d": np.float64("nan"), 3: np.bool_(True)})
    assert value == {"a": 1.5, "b": [1, 2], "c": "x", "d": None, "3": True}
    json.dumps(value, allow_nan=False)
