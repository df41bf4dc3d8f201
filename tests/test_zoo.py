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
