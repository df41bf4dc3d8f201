"""The transformer sample end to end: static int8 with automatic mixed precision keeps its targets."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, invoke


def test_vit_recipe_keeps_sensitive_nodes_in_float_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "vit"
    # speed is shown by the benchmark, not asserted in tests: the fp32 speed gate is relaxed here
    result = invoke("run", ROOT / "recipes" / "digits-vit.toml", "--out", out, "--set", "verify.runs=5",
                    "--set", "verify.memory=false", "--set", "verify.gates.min_speedup_vs_fp32=0.01",
                    "--set", "verify.gates.min_speedup=0.01")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    quantization = report["quantization"]
    default = quantization["attempts"][0]
    assert default["search"] == "default" and not default["meets_targets"]  # plain int8 misses the 0.9999 target
    assert 0 < len(quantization["float_nodes"]) < 25
    assert all(n["op"] in ("MatMul", "Gemm") for n in quantization["float_nodes"])
    int8 = report["metrics"]["int8"]
    assert int8["cosine_mean"] >= 0.999
    assert report["metrics"]["reference"]["accuracy"] - int8["accuracy"] <= 0.01
    assert any("compute nodes kept in float" in note for note in report["notes"])


def test_the_vit_sample_loses_whole_heads_from_its_fused_qkv_in_a_recipe(tmp_path: Path) -> None:
    out = tmp_path / "vit-pruned"
    result = invoke("run", ROOT / "recipes" / "digits-vit-pruned.toml", "--out", out, "--set", "distill.epochs=2",
                    "--set", "verify.runs=5", "--set", "verify.memory=false", "--set", "verify.gates.min_speedup_vs_fp32=0.01",
                    "--set", "verify.gates.min_speedup=0.01", "--set", "verify.gates.max_accuracy_drop=0.05")
    assert result.exit_code == 0, result.output
    assert "Unwrapped parameters" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert "attention heads kept per layer: 3/6, 3/6, 3/6, 3/6 (whole heads removed; the residual width 192 is kept)" \
        in report["prune"]["notes"]
    assert report["prune"]["macs_after"] < 0.55 * report["prune"]["macs_before"]
