"""The model zoo's machinery on a 3-model subset with small configs: a transformers BERT (factory_args naming a
library class), an LSTM and a model returning a dict, each through `deploytool run` in a subprocess."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks.zoo.run import ZOO, render, run_zoo, verdict


def _subset() -> list:
    known = {e.name: e for e in ZOO}
    tiny_bert = replace(
        known["bert"], name="bert_tiny", title="BERT sequence classifier (64 wide, 2 layers), seq 16",
        factory_args={"model_class": "BertForSequenceClassification",
                      "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                                 "vocab_size": 1000, "num_labels": 4}},
        inputs=[{"name": "input_ids", "shape": ["batch", 16], "dtype": "int64"},
                {"name": "attention_mask", "shape": ["batch", 16], "dtype": "int64"}],
        data_args={"length": 16, "vocab": 1000, "pad": 0})
    return [tiny_bert, known["lstm"], known["dict_output"]]


def test_zoo_subset_runs_and_reports(tmp_path: Path) -> None:
    results, seconds = run_zoo(_subset(), tmp_path, samples=32, calibration=32, timeout=170)
    for result in results:
        word, reason = verdict(result)
        # a verdict either way, never a crash, a user error or a kill
        assert result.returncode in (0, 1), (result.entry.name, word, reason, result.tail)
        assert result.report is not None and result.report["export"]["exporter"] in ("dynamo", "torchscript")
        assert result.report["simplify"]["nodes_after"] > 0
        assert result.peak_rss < 3 * 10**9
        if result.returncode == 1:
            assert reason, result.entry.name  # a failing model says which gates failed
    names = [r.entry.name for r in results]
    dict_run = results[names.index("dict_output")].report
    assert dict_run is not None and set(dict_run["metrics"]["int8"]["outputs"]) == {"embedding", "scores"}
    text = render(results, {"cpu": "test CPU", "cores": 2, "isa": []}, seconds, 32, 32)
    for name in names:
        assert f"`{name}`" in text
    assert "## Targets" in text and "int8/fp32" in text


def test_the_report_separates_failures_the_measurement_left_undecided() -> None:
    from benchmarks.zoo.run import Result, _undecided_only

    entry = ZOO[0]

    def run(*gates: dict) -> Result:
        return Result(entry, 1, 1.0, 0, {"gates": [{"name": "min_cosine", "passed": True}, *gates]}, "")

    straddles = {"name": "min_top1_agreement", "model": "int8", "passed": False, "value": 0.984, "threshold": 0.99,
                 "interval": [0.917, 0.997]}
    below = {"name": "min_speedup_vs_fp32", "model": "int8", "passed": False, "value": 0.9, "threshold": 1.0,
             "interval": [0.85, 0.95]}
    no_interval = {"name": "min_cosine", "model": "int8", "passed": False, "value": 0.95, "threshold": 0.99}
    assert _undecided_only(run(straddles))
    assert not _undecided_only(run(straddles, below)) and not _undecided_only(run(no_interval))
    assert not _undecided_only(Result(entry, 0, 1.0, 0, {"gates": []}, ""))
    text = render([run(straddles), run(below)], {"cpu": "test CPU", "cores": 2, "isa": []}, 1.0, 64, 64)
    assert "1 fail only gates that their measurement leaves undecided" in text
