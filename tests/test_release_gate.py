"""Verification a release job can rely on: damaged candidates fail and are localised, verdicts are
reproducible, golden outputs gate an ONNX file without PyTorch, and reports are machine- and human-readable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from conftest import DIGITS, ROOT, damage, invoke


@pytest.fixture(scope="module")
def fp32(digits_run: tuple[Any, Path]) -> Path:
    result, out = digits_run
    assert result.exit_code == 0, result.output
    return out / "model.onnx"


def test_damaged_candidate_fails_and_names_the_diverging_node(fp32: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.onnx"
    weight = damage(fp32, damaged, factor=-3.0)
    report_dir = tmp_path / "report"
    result = invoke("verify", fp32, damaged, "--data", DIGITS / "val.npz", "--task", "classification",
                    "--gate", "min_cosine=0.99", "--runs", "5", "--no-memory", "--report", report_dir)
    assert result.exit_code == 1, result.output
    assert "min_cosine on damaged" in result.output
    report = json.loads((report_dir / "report.json").read_text())
    first = report["localization"]["damaged"]["first"]
    # the first tensor that diverges is produced by the node that consumes the damaged weight
    import onnx

    consumer = next(n for n in onnx.load(str(fp32)).graph.node if weight in n.input)
    assert first["node"] == consumer.name
    assert f"first diverges at tensor '{first['tensor']}' (node '{consumer.name}'" in result.output
    assert "Where outputs diverge" in (report_dir / "report.md").read_text()


def test_verify_twice_gives_identical_non_timing_metrics(fp32: Path, tmp_path: Path) -> None:
    int8 = fp32.with_name("model.int8.onnx")
    reports = []
    for i in range(2):
        path = tmp_path / f"verify{i}.json"
        result = invoke("verify", fp32, int8, "--data", DIGITS / "val.npz", "--task", "classification",
                        "--runs", "3", "--no-memory", "--json", path)
        assert result.exit_code == 0, result.output
        reports.append(json.loads(path.read_text()))
    timing = {"latency_ms", "speedup", "throughput_per_s", "throughput", "peak_memory_bytes"}
    strip = [{n: {k: v for k, v in m.items() if k not in timing} for n, m in r["metrics"].items()} for r in reports]
    assert strip[0] == strip[1]
    assert reports[0]["gates"] == reports[1]["gates"]


def test_golden_outputs_gate_an_onnx_file_without_pytorch(digits_run: tuple[Any, Path], tmp_path: Path) -> None:
    _, out = digits_run
    golden = out / "golden.npz"
    assert golden.is_file()
    code = (
        "import sys; from click.testing import CliRunner; from deploytool.cli import cli; "
        f"r = CliRunner().invoke(cli, ['verify', {str(golden)!r}, {str(out / 'model.int8.onnx')!r}, '--task', "
        "'classification', '--gate', 'min_cosine=0.99', '--gate', 'min_top1_agreement=0.98', '--runs', '3', '--no-memory']); "
        "print(r.exit_code, 'torch' in sys.modules); print(r.output)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    first = done.stdout.splitlines()[0]
    assert first == "0 False", done.stdout + done.stderr
    # a speed gate needs a reference that runs
    result = invoke("verify", golden, out / "model.int8.onnx", "--gate", "min_speedup=1")
    assert result.exit_code == 2 and "golden outputs have no latency" in result.output


def test_save_golden_then_verify_against_it(fp32: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.npz"
    result = invoke("verify", fp32, fp32, "--data", DIGITS / "val.npz", "--runs", "2", "--no-memory", "--save-golden", golden)
    assert result.exit_code == 0, result.output
    damaged = tmp_path / "damaged.onnx"
    damage(fp32, damaged)
    result = invoke("verify", golden, damaged, "--gate", "min_cosine=0.99", "--runs", "2", "--no-memory")
    assert result.exit_code == 1 and "min_cosine on damaged" in result.output


def test_junit_xml_names_failing_gates(digits_run: tuple[Any, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    junit = tmp_path / "gates.xml"
    result = invoke("run", ROOT / "recipes" / "digits-cnn.toml", "--out", out, "--set", "verify.gates.min_cosine=1.01",
                    "--set", "verify.runs=3", "--set", "verify.memory=false", "--junit", junit)
    assert result.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures", "0")) == 2
    failed = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase") if c.find("failure") is not None}
    assert failed == {("digits-cnn.fp32", "min_cosine"), ("digits-cnn.int8", "min_cosine")}


def test_tolerance_gate_reports_the_smallest_passing_tolerance(fp32: Path) -> None:
    int8 = fp32.with_name("model.int8.onnx")
    result = invoke("verify", fp32, int8, "--data", DIGITS / "val.npz", "--gate", "atol=1e-6", "--runs", "2", "--no-memory")
    assert result.exit_code == 1
    assert "within_tolerance" in result.output
    assert "smallest atol that passes" in result.output and "smallest rtol" in result.output


def test_verify_against_a_recipe_uses_its_pytorch_model_data_and_gates(fp32: Path) -> None:
    result = invoke("verify", ROOT / "recipes" / "digits-cnn.toml", fp32.with_name("model.int8.onnx"), "--runs", "3", "--no-memory")
    assert result.exit_code == 0, result.output
    for gate in ("max_accuracy_drop", "min_cosine", "min_speedup"):
        assert gate in result.output


def test_verify_reports_shape_mismatch_as_invalid_outputs(fp32: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    # a candidate whose logits come out with one class too few
    model = onnx.load(str(fp32))
    last = model.graph.output[0].name
    model.graph.node[-1].output[0] = "full"
    model.graph.initializer.extend([onnx.numpy_helper.from_array(__import__("numpy").array([0], "int64"), "s"),
                                    onnx.numpy_helper.from_array(__import__("numpy").array([9], "int64"), "e"),
                                    onnx.numpy_helper.from_array(__import__("numpy").array([1], "int64"), "a")])
    model.graph.node.append(helper.make_node("Slice", ["full", "s", "e", "a"], [last]))
    del model.graph.output[0].type.tensor_type.shape.dim[1:]
    broken = tmp_path / "short.onnx"
    onnx.save(model, str(broken))
    result = invoke("verify", fp32, broken, "--data", DIGITS / "val.npz", "--runs", "2", "--no-memory")
    assert result.exit_code == 1 and "outputs_valid on short" in result.output


def test_bench_prints_latency_throughput_and_memory(fp32: Path, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    result = invoke("bench", fp32, fp32.with_name("model.int8.onnx"), "--batch", "1", "--batch", "8", "--runs", "5", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert set(data) == {str(fp32), str(fp32.with_name("model.int8.onnx"))}
    for entry in data.values():
        assert set(entry["batches"]) == {"1", "8"}
        assert entry["batches"]["8"]["throughput_per_s"] > 0 and entry["peak_memory_bytes"] > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(digits_run: tuple[Any, Path], tmp_path: Path) -> None:
    _, out = digits_run
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # models, latency, per-layer error plots are embedded
    assert "http://" not in html and "https://" not in html  # self-contained
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    done = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
