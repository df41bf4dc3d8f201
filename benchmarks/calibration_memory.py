"""Peak memory of static-quantization calibration with N and 10 x N samples, each in a fresh process.

    python -m benchmarks.calibration_memory [--model samples/vit] [--samples 256] [--out docs/calibration-memory.md]

The fp32 ONNX model is exported once; then, for every calibration method and both sample
counts, a fresh interpreter quantizes it and reports how far its peak resident set (VmHWM)
rose above what it held after loading the libraries and the data. Calibration is chunked
(`calibration_chunk`), so that growth should not follow the sample count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from deploytool.data import Dataset
from deploytool.recipe import QuantizeConfig
from deploytool.stages.quantize import quantize_onnx

def peak_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

model, calib, samples, method, out, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
images = np.load(calib)["image"]
rng = np.random.default_rng(0)
reps = -(-samples // len(images))
data = np.concatenate([images] * reps)[:samples]
data = (data + rng.normal(0, 0.01, data.shape)).astype(np.float32)  # distinct samples, same distribution
import onnx, onnxruntime, onnxruntime.quantization, onnxruntime.quantization.shape_inference  # libraries: not calibration's cost
before = peak_kib()
quantize_onnx(Path(model), Path(out), QuantizeConfig(calibration_method=method, calibration_chunk=chunk),
              Dataset({"image": data}), batch_size=16)
print(json.dumps({"before_kib": before, "peak_kib": peak_kib()}))
"""


def export(model_dir: Path, folder: Path) -> Path:
    """The sample's fp32 ONNX model, exported and simplified by deploytool itself."""
    import importlib

    import torch

    from deploytool.data import load_dataset
    from deploytool.recipe import ExportConfig, InputSpec, SimplifyConfig
    from deploytool.stages.export import export_onnx
    from deploytool.stages.simplify import simplify_onnx

    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"samples.{model_dir.name}.model")
    model = module.build()
    checkpoint = next(model_dir.glob("*.pt"))
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    specs = [InputSpec(name="image", shape=["batch", 1, 8, 8])]
    sample = load_dataset(ROOT / "samples" / "digits" / "val.npz", specs).head(2)
    raw, path = folder / "raw.onnx", folder / "model.onnx"
    export_onnx(model.eval(), specs, ["logits"], ExportConfig(), sample, raw)
    simplify_onnx(raw, path, SimplifyConfig(), sample)
    return path


LIMIT_BYTES = 8 << 30  # a run past this fails in its own process instead of waking the system's OOM killer


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def measure(model: Path, samples: int, method: str, folder: Path, chunk: int = 8) -> int | None:
    """MiB that quantizing with `samples` calibration samples adds to the peak resident set; None if it
    ran out of the memory allowed."""
    env_path = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(ROOT / "samples" / "digits" / "calib.npz"), str(samples), method,
         str(folder / f"q-{method}-{samples}.onnx"), str(chunk)],
        capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, check=False,
        preexec_fn=_limit_memory,
    )
    if done.returncode != 0:
        if "MemoryError" in done.stderr or "bad_alloc" in done.stderr or "Failed to allocate" in done.stderr or done.returncode < 0:
            return None
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return (result["peak_kib"] - result["before_kib"]) // 1024


def _mib(value: int | None) -> str:
    return f"{value} MiB" if value is not None else f"over {LIMIT_BYTES >> 30} GiB (stopped)"


def _ratio(small: int | None, large: int | None) -> str:
    return f"{large / max(small, 1):.2f}x" if small is not None and large is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "vit")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "calibration-memory.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploytool-calib-bench-") as tmp:
        folder = Path(tmp)
        model = export(args.model, folder)
        for method in args.methods:
            small = measure(model, args.samples, method, folder)
            large = measure(model, 10 * args.samples, method, folder)
            whole = measure(model, 10 * args.samples, method, folder, chunk=10**6)
            rows.append((method, _mib(small), _mib(large), _ratio(small, large), _mib(whole)))
            print(f"{method}: {_mib(small)} with {args.samples} samples, {_mib(large)} with {10 * args.samples} "
                  f"({_ratio(small, large)}); in one chunk {_mib(whole)}")
    from deploytool.hardware import cpu_info

    cpu = cpu_info()
    lines = [
        "# Calibration memory",
        "",
        f"Generated by `python -m benchmarks.calibration_memory` on {datetime.now(UTC):%Y-%m-%d}: "
        f"{cpu['model']} ({cpu['cores']} cores; ISA {', '.join(cpu['isa'])}).",
        "",
        f"Model: the `{args.model.name}` sample (fp32 ONNX). Peak resident memory that static quantization adds "
        "(calibration and quantization, in a fresh process, above the loaded libraries and data), "
        f"with {args.samples} and {10 * args.samples} calibration samples, batch 16, default `calibration_chunk` (8 batches).",
        "",
        f"| method | {args.samples} samples | {10 * args.samples} samples | ratio | "
        f"{10 * args.samples} samples in one chunk |",
        "|---|---|---|---|---|",
        *(f"| {m} | {a} | {b} | {r} | {w} |" for m, a, b, r, w in rows),
        "",
        "Calibration runs in chunks and keeps only one chunk's activations (or histograms) in memory, so ten times "
        "the samples costs time, not memory; the last column is the same calibration in a single chunk, for "
        "comparison. The input arrays themselves are held in memory and grow with the sample count; they are "
        "loaded before the baseline is taken. What does not grow is mostly onnxruntime's "
        "quantization tooling itself: pre-processing, the calibration session and, for entropy and percentile, "
        "one chunk of activation histograms.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
