"""The stable keys of report.json (deploytool.report_schema): what a report must hold, checked where it is made."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deploytool.report_schema import Report, checked
from deploytool.stages.report import write_reports

REPORT: dict[str, Any] = {
    "name": "r", "passed": False,
    "gates": [{"name": "min_cosine", "model": "int8", "value": 0.95, "threshold": 0.99, "passed": False, "default": True},
              {"name": "min_speedup_vs_fp32", "model": "int8", "value": 1.4, "threshold": 1.0, "passed": True, "default": True,
               "ci": [1.2, 1.6]}],
    "models": {"reference": {"path": None, "size_bytes": 400, "sha256": None, "params": 100, "macs": None},
               "int8": {"path": "model.int8.onnx", "size_bytes": 200, "sha256": "ab"}},
    "metrics": {"int8": {"cosine_mean": 0.95}}, "stages": [{"name": "load", "status": "done", "seconds": 0.5}],
    "environment": {"threads": 2}, "notes": [], "quantization": {"mode": "static"},
}


def test_a_report_with_the_stable_keys_is_kept_unchanged_and_reads_typed() -> None:
    report = copy.deepcopy(REPORT)
    assert checked(report) is report and report == REPORT
    typed = Report.model_validate(report)
    assert [g.name for g in typed.failed_gates] == ["min_cosine"]
    assert typed.models["int8"].params is None and typed.stages[0].status == "done"
    assert typed.model_dump()["quantization"] == {"mode": "static"}  # other keys are carried


@pytest.mark.parametrize("path, value", [(("passed",), None), (("stages", 0, "status"), "half-done"),
                                         (("gates", 0, "default"), None), (("models", "int8", "size_bytes"), "big")])
def test_a_report_breaking_the_contract_is_refused_before_it_is_written(tmp_path: Path, path: tuple[Any, ...], value: Any) -> None:
    report = copy.deepcopy(REPORT)
    node = report
    for key in path[:-1]:
        node = node[key]
    if value is None and path[-1] in ("passed", "default"):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(ValidationError):
        write_reports(report, tmp_path)
    assert not (tmp_path / "report.json").exists()


def test_a_written_report_reads_back_as_the_typed_model(tmp_path: Path) -> None:
    write_reports(copy.deepcopy(REPORT), tmp_path)
    assert Report.model_validate(json.loads((tmp_path / "report.json").read_text())).name == "r"


def test_a_failed_speed_gate_whose_value_clears_the_threshold_says_undecided() -> None:
    """'value 1.04, threshold 1.0' alone reads as a contradiction: the line gives the interval and says why."""
    from deploytool.console import exit_on_gates
    from deploytool.errors import GateFailure
    from deploytool.report_schema import Gate, Report

    gates = [Gate(name="min_speedup_vs_fp32", model="int8", value=1.04, threshold=1.0, passed=False, default=True,
                  interval=[0.97, 1.10]),
             Gate(name="min_speedup_vs_fp32", model="int4", value=0.8, threshold=1.0, passed=False, default=True,
                  interval=[0.75, 0.85]),
             Gate(name="min_cosine", model="int8", value=0.98, threshold=0.99, passed=False, default=True)]
    report = Report(name="r", passed=False, gates=gates, models={}, metrics={}, stages=[], environment={})
    with pytest.raises(GateFailure) as info:
        exit_on_gates(report)
    message = info.value.message
    assert "min_speedup_vs_fp32 on int8 (value 1.04, threshold 1.0, interval [0.970, 1.100]: undecided, within the timing noise)" \
        in message
    assert "on int4 (value 0.8, threshold 1.0, interval [0.750, 0.850])" in message
    assert "min_cosine on int8 (value 0.98, threshold 0.99)" in message
