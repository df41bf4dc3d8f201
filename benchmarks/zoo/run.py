"""The model zoo: architectures deploytool did not write, each through `deploytool run` with a plain recipe.

    python -m benchmarks.zoo.run [--only NAME ...] [--out docs/zoo.md] [--keep DIR] [--timeout 900]

Every model is built from Hugging Face transformers' model classes and a small config (no download, random
init, seeded), or from a network in benchmarks/zoo/models.py; `[model] factory_args` selects it. Seeded,
generated data (64 validation and 64 calibration samples: 224x224 images, token ids with attention masks,
feature frames) is written next to a plain recipe: static int8, `[verify]` with its default gates.
`python -m deploytool run RECIPE --out DIR` then runs in a subprocess whose process tree's resident memory
is sampled from /proc. The Markdown report (docs/zoo.md) is regenerated whole from the run reports.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "benchmarks.zoo.models"
IMAGE = [{"name": "pixel_values", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]


def _tokens(length: int) -> list[dict[str, Any]]:
    return [{"name": "input_ids", "shape": ["batch", length], "dtype": "int64"},
            {"name": "attention_mask", "shape": ["batch", length], "dtype": "int64"}]


@dataclass
class Entry:
    """One zoo model: what builds it, its inputs and outputs, its task, and how its data is generated."""

    name: str
    title: str  # what it is, for the report
    factory: str
    factory_args: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[str]
    task: str
    data: str  # images | tokens | frames | mel | image_meta
    family: str  # vision | text | audio | other
    data_args: dict[str, Any] = field(default_factory=dict)


def _hf(model_class: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model_class": model_class, "config": config, **extra}


TEXT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}

ZOO: list[Entry] = [
    Entry("resnet18", "ResNet-18 (basic blocks 2-2-2-2, 64-512 wide)", f"{FACTORY}:hf",
          _hf("ResNetForImageClassification", {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
                                                "layer_type": "basic", "num_labels": 1000}, image_size=224),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("mobilenet_v2", "MobileNetV2 1.0", f"{FACTORY}:hf",
          _hf("MobileNetV2ForImageClassification", {"num_labels": 1000}, image_size=224),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("efficientnet_b0", "EfficientNet-B0 (width 1.0, depth 1.0)", f"{FACTORY}:hf",
          _hf("EfficientNetForImageClassification", {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224,
                                                      "hidden_dim": 1280,
                                                      "num_labels": 1000}, image_size=224, unit_norm_scales=True),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("convnext_nano", "ConvNeXt (depths 2-2-6-2, 64-512 wide)", f"{FACTORY}:hf",
          _hf("ConvNextForImageClassification", {"depths": [2, 2, 6, 2], "hidden_sizes": [64, 128, 256, 512], "num_labels": 1000}),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("regnetx_400mf", "RegNetX-400MF", f"{FACTORY}:hf",
          _hf("RegNetForImageClassification", {"embedding_size": 32, "hidden_sizes": [32, 64, 160, 384], "depths": [1, 2, 7, 12],
                                                "groups_width": 16, "layer_type": "x", "num_labels": 1000}, image_size=224),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("vit_s16", "ViT-S/16 (384 wide, 12 layers, 6 heads)", f"{FACTORY}:hf",
          _hf("ViTForImageClassification", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                                             "intermediate_size": 1536, "num_labels": 1000}),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("deit_tiny", "DeiT-Tiny/16 (192 wide, 12 layers, 3 heads)", f"{FACTORY}:hf",
          _hf("DeiTForImageClassification", {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                                              "intermediate_size": 768, "num_labels": 1000}),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("swin_mini", "Swin (embed 48, depths 2-2-2-2, window 7)", f"{FACTORY}:hf",
          _hf("SwinForImageClassification", {"embed_dim": 48, "depths": [2, 2, 2, 2], "num_heads": [2, 4, 8, 16], "num_labels": 1000}),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("mobilevit_xs", "MobileViT-XS", f"{FACTORY}:hf",
          _hf("MobileViTForImageClassification", {"hidden_sizes": [96, 120, 144], "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384],
                                                   "image_size": 224, "num_labels": 1000}, image_size=224, unit_norm_scales=True),
          IMAGE, ["logits"], "classification", "images", "vision"),
    Entry("bert", "BERT encoder, sequence classifier (256 wide, 4 layers), seq 64", f"{FACTORY}:hf",
          _hf("BertForSequenceClassification", {**TEXT, "num_labels": 4}),
          _tokens(64), ["logits"], "classification", "tokens", "text", {"length": 64, "vocab": 30522, "pad": 0}),
    Entry("distilbert", "DistilBERT encoder (256 wide, 4 layers), hidden states, seq 64", f"{FACTORY}:hf",
          _hf("DistilBertModel", {"dim": 256, "n_layers": 4, "n_heads": 4, "hidden_dim": 1024}),
          _tokens(64), ["last_hidden_state"], "embedding", "tokens", "text", {"length": 64, "vocab": 30522, "pad": 0}),
    Entry("roberta", "RoBERTa sequence classifier (256 wide, 4 layers), seq 64", f"{FACTORY}:hf",
          _hf("RobertaForSequenceClassification", {**TEXT, "num_labels": 4}),
          _tokens(64), ["logits"], "classification", "tokens", "text", {"length": 64, "vocab": 50265, "pad": 1}),
    Entry("albert", "ALBERT encoder (embedding 128, 256 wide, 4 layers), pooled output, seq 64", f"{FACTORY}:hf",
          _hf("AlbertModel", {**TEXT, "embedding_size": 128}),
          _tokens(64), ["last_hidden_state", "pooler_output"], "embedding", "tokens", "text", {"length": 64, "vocab": 30000, "pad": 0}),
    Entry("gpt2", "GPT-2-style decoder with LM head, no cache (256 wide, 4 layers, vocab 8192), seq 32", f"{FACTORY}:hf",
          _hf("GPT2LMHeadModel", {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8192, "n_positions": 128,
                                  "bos_token_id": 1, "eos_token_id": 2,
                                  "use_cache": False}),
          [{"name": "input_ids", "shape": ["batch", 32], "dtype": "int64"}], ["logits"], "classification", "tokens", "text",
          {"length": 32, "vocab": 8192, "pad": None}),
    Entry("whisper_encoder", "Whisper-style audio encoder (256 wide, 4 layers), 80 mel bins x 500 frames", f"{FACTORY}:hf",
          _hf("WhisperEncoder", {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024,
                                 "num_mel_bins": 80, "max_source_positions": 250},
              module="transformers.models.whisper.modeling_whisper"),
          [{"name": "input_features", "shape": ["batch", 80, 500], "dtype": "float32"}], ["last_hidden_state"], "embedding",
          "mel", "audio"),
    Entry("lstm", "LSTM classifier (2 layers, 128 hidden) over 50 frames x 40 features", f"{FACTORY}:recurrent",
          {"kind": "lstm"}, [{"name": "frames", "shape": ["batch", 50, 40], "dtype": "float32"}], ["logits"], "classification",
          "frames", "other"),
    Entry("gru", "bidirectional GRU classifier (2 layers, 128 hidden) over 50 frames x 40 features", f"{FACTORY}:recurrent",
          {"kind": "gru", "bidirectional": True}, [{"name": "frames", "shape": ["batch", 50, 40], "dtype": "float32"}], ["logits"],
          "classification", "frames", "other"),
    Entry("multi_io", "two inputs (96x96 image, 16 metadata values), two outputs (class logits, box)", f"{FACTORY}:image_and_metadata",
          {}, [{"name": "image", "shape": ["batch", 3, 96, 96], "dtype": "float32"},
               {"name": "metadata", "shape": ["batch", 16], "dtype": "float32"}], ["logits", "box"], "classification",
          "image_meta", "other"),
    Entry("dict_output", "transformer encoder over 32 feature vectors returning a dict {embedding, scores}",
          f"{FACTORY}:dict_output", {}, [{"name": "tokens", "shape": ["batch", 32, 32], "dtype": "float32"}],
          ["embedding", "scores"], "embedding", "frames", "other", {"length": 32, "features": 32}),
]


def generate(entry: Entry, count: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for an entry, keyed by input name."""
    from benchmarks.zoo.models import generated_images, token_batch

    rng = np.random.default_rng(seed)
    if entry.data == "images":
        return {"pixel_values": generated_images(count, seed)}
    if entry.data == "tokens":
        args = entry.data_args
        batch = token_batch(count, seed, args["length"], args["vocab"], args["pad"] if args["pad"] is not None else 0)
        if args["pad"] is None:  # a decoder fed whole windows of text: no padding, no mask
            return {"input_ids": np.where(batch["attention_mask"] == 1, batch["input_ids"], rng.integers(3, 200, batch["input_ids"].shape))}
        return batch
    if entry.data == "mel":  # log-mel-like: smooth over time and frequency, in Whisper's [-1, 1] range
        base = rng.normal(size=(count, 80, 50)).astype(np.float32)
        frames = np.repeat(base, 10, axis=2) + 0.3 * rng.normal(size=(count, 80, 500)).astype(np.float32)
        return {"input_features": np.tanh(frames * 0.5).astype(np.float32)}
    if entry.data == "frames":
        length, features = entry.data_args.get("length", 50), entry.data_args.get("features", 40)
        walk = np.cumsum(rng.normal(size=(count, length, features)), axis=1) / np.sqrt(np.arange(1, length + 1))[None, :, None]
        return {entry.inputs[0]["name"]: walk.astype(np.float32)}
    if entry.data == "image_meta":
        return {"image": generated_images(count, seed, 96), "metadata": rng.normal(size=(count, 16)).astype(np.float32)}
    raise ValueError(entry.data)


def recipe_text(entry: Entry) -> str:
    """A plain recipe: static int8, [verify] with default gates; everything else at its default."""
    import tomli_w

    recipe = {
        "name": f"zoo-{entry.name}",
        "model": {"factory": entry.factory, "factory_args": entry.factory_args, "inputs": entry.inputs, "outputs": entry.outputs},
        "data": {"calibration": "calib.npz", "validation": "val.npz", "task": entry.task},
        "simplify": {"enabled": True},
        "quantize": {"mode": "static"},
        "verify": {},
    }
    return tomli_w.dumps(recipe)


@dataclass
class Result:
    entry: Entry
    returncode: int | None  # None: killed by the driver's timeout
    seconds: float
    peak_rss: int
    report: dict[str, Any] | None
    tail: str
    others: float | None = None  # share of the machine's CPU other processes took while it ran
    stage_peaks: dict[str, int] = field(default_factory=dict)  # stage -> peak RSS of the tree while it ran

    @property
    def peak_stage(self) -> str | None:
        return max(self.stage_peaks, key=self.stage_peaks.__getitem__) if self.stage_peaks else None

    def save(self, path: Path) -> None:
        fields = {"returncode": self.returncode, "seconds": self.seconds, "peak_rss": self.peak_rss, "tail": self.tail,
                  "others": self.others, "stage_peaks": self.stage_peaks}
        path.write_text(json.dumps(fields, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, entry: Entry, folder: Path) -> Result | None:
        """A finished model's result from its folder (zoo.json and the run's report.json), if there is one."""
        if not (folder / "zoo.json").exists():
            return None
        fields = json.loads((folder / "zoo.json").read_text(encoding="utf-8"))
        report_path = folder / "run" / "report.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
        return cls(entry, fields["returncode"], fields["seconds"], fields["peak_rss"], report, fields["tail"], fields.get("others"),
                   fields.get("stage_peaks") or {})


def run_entry(entry: Entry, folder: Path, samples: int, calibration: int, seed: int, timeout: float) -> Result:
    from benchmarks.verify_memory import run_watched, stage_windows

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "val.npz", **generate(entry, samples, seed))
    np.savez(folder / "calib.npz", **generate(entry, calibration, seed + 1))
    (folder / "recipe.toml").write_text(recipe_text(entry), encoding="utf-8")
    out = folder / "run"
    command = [sys.executable, "-m", "deploytool", "run", str(folder / "recipe.toml"), "--out", str(out), "--force"]
    cost = run_watched(command, ROOT, interval=0.1, timeout=timeout)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    tail = "\n".join(cost.output.strip().splitlines()[-6:])
    code = None if cost.returncode in (-signal.SIGKILL, -signal.SIGTERM) and cost.seconds >= timeout else cost.returncode
    peaks = {name: cost.watch.peak_between(start, end) for name, (start, end) in stage_windows(out / "run.log").items()}
    result = Result(entry, code, cost.seconds, cost.peak, report, tail, cost.others,
                    {name: peak for name, peak in peaks.items() if peak is not None})
    result.save(folder / "zoo.json")
    return result


# --- the report -----------------------------------------------------------------------------------------------


def _stage_seconds(report: dict[str, Any] | None, name: str) -> float | None:
    for stage in (report or {}).get("stages", []):
        if stage["name"] == name and stage["status"] in ("done", "cached", "failed"):
            return float(stage["seconds"])
    return None


def _int8(report: dict[str, Any] | None) -> dict[str, Any]:
    return ((report or {}).get("metrics") or {}).get("int8") or {}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(result: Result) -> tuple[str, str]:
    """(verdict, reason): PASSED, FAILED (gates), ERROR (exit 2/3), KILLED."""
    if result.returncode is None or result.returncode < 0:
        how = "timeout" if result.returncode is None else f"signal {-result.returncode}"
        return "KILLED", f"killed ({how}) after {result.seconds:.0f} s"
    if result.returncode == 0:
        return "PASSED", ""
    if result.returncode == 1 and result.report:
        failed = [g for g in result.report["gates"] if not g["passed"]]
        reasons = []
        for gate in failed:
            value, threshold = gate.get("value"), gate.get("threshold")
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
            ci = gate.get("interval") or gate.get("ci")
            interval = ""
            if isinstance(ci, list) and len(ci) == 2 and None not in ci and isinstance(threshold, (int, float)):
                undecided = ci[0] < threshold <= ci[1]
                interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" + (", undecided within the noise" if undecided else "")
            reasons.append(f"{gate['model']} {gate['name']} {shown}{interval} (needs {threshold})")
        floor = _int8(result.report).get("input_rounding_floor")
        if isinstance(floor, dict):
            from deploytool.floor import describe

            reasons.append(f"the fp32 model alone on int8-rounded inputs: {describe(floor)}")
        return "FAILED", "; ".join(reasons)
    line = next((ln for ln in result.tail.splitlines() if ln.startswith("error")), result.tail.splitlines()[-1] if result.tail else "")
    return f"ERROR (exit {result.returncode})", line.replace("|", "\\|")[:300]


def render(results: Sequence[Result], machine: dict[str, Any], seconds: float, samples: int, calibration: int) -> str:
    lines = [
        "# Model zoo: deploytool on architectures it did not write",
        "",
        f"Generated by `make zoo` (`python -m benchmarks.zoo.run`) on {datetime.now(UTC):%Y-%m-%d}: {machine['cpu']} "
        f"({machine['cores']} cores; ISA {', '.join(machine['isa']) or '-'}). Regenerated whole; do not edit by hand.",
        "",
        "- **Models:** Hugging Face `transformers` model classes built from small configs (no download), and networks "
        "written in `benchmarks/zoo/models.py`; random init, seeded; CNN BatchNorm statistics set from generated images. "
        "Each is named by `[model] factory = \"benchmarks.zoo.models:...\"` with `factory_args`: no wrapper file.",
        f"- **Data:** seeded, generated: {samples} validation and {calibration} calibration samples "
        "(224x224 images with smooth colour fields and edges; Zipf-distributed token ids with padding and attention masks; "
        "log-mel-like features; random-walk feature frames).",
        "- **Recipe:** plain: `[quantize] mode = \"static\"` and `[verify]` with its default gates (int8 against the fp32 "
        "model: cosine >= 0.99, SNR >= 15 dB, top-1 agreement >= 0.99 for classifiers, not slower than fp32 decided on the "
        "interval), everything else at its default.",
        "- **Measured:** `python -m deploytool run RECIPE --out DIR` in a subprocess, one model at a time; peak RSS of its "
        "whole process tree sampled from /proc every 100 ms; metrics and stage times from its `report.json`. "
        "int8/fp32 is `metrics.int8.speedup_vs_fp32` (fp32 latency / int8 latency at batch 1, block-timed) with its "
        "95 % interval.",
        "- **fp32 on int8-rounded input:** for an int8 model that fails a quality gate, the fp32 model run on inputs rounded "
        "as the int8 model rounds them (`metrics.int8.input_rounding_floor`): where it is below the gates, the model itself "
        "is that sensitive to 8-bit rounding, whatever the quantizer does.",
        "",
    ]
    passed = [r for r in results if verdict(r)[0] == "PASSED"]
    rate = len(passed) / len(results) if results else 0.0
    shares = [r.others for r in results if r.others is not None]
    load = (f" Other processes took {100 * sum(shares) / len(shares):.0f} % of the machine's CPU on average while the "
            "models ran (this machine is shared): wall times grow with that share, memory and accuracy do not.") if shares else ""
    lines += [f"**{len(passed)} of {len(results)} models pass ({rate:.0%})**; the zoo took {seconds / 60:.1f} minutes.{load}", ""]
    undecided = [r.entry.name for r in results if _undecided_only(r)]
    if undecided:
        lines += [f"Of those that fail, {len(undecided)} fail only gates that their measurement leaves undecided (the "
                  f"interval of the speedup, or of the top-1 agreement over the {samples} samples, holds the threshold): "
                  f"{', '.join(f'`{n}`' for n in undecided)}. They fail as the gates say; more runs or samples decide them.", ""]
    header = ["model", "architecture", "exporter", "nodes exported → simplified", "int8 cosine", "int8 top-1",
              "fp32 on int8-rounded input: cosine / top-1", "int8/fp32 [95 % CI]", "peak RSS (during)",
              "load / export / simplify / quantize / verify (s)", "exit", "verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        report, int8 = result.report or {}, _int8(result.report)
        against = int8.get("vs_fp32") or int8
        export, simplify = report.get("export") or {}, report.get("simplify") or {}
        nodes = f"{simplify.get('nodes_before', '-')} → {simplify.get('nodes_after', '-')}" if simplify else "-"
        ratio, ci = int8.get("speedup_vs_fp32"), int8.get("speedup_vs_fp32_ci")
        speed = f"{ratio:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]" if ratio is not None and ci else _fmt(ratio, 2)
        stages = " / ".join(_fmt(_stage_seconds(report, s), 1) for s in ("load", "export", "simplify", "quantize", "verify"))
        top1 = _fmt(against.get("top1_agreement")) if result.entry.task == "classification" else "n/a"
        code = "killed" if result.returncode is None else str(result.returncode)
        floor = int8.get("input_rounding_floor")
        rounded = "-" if not isinstance(floor, dict) else \
            f"{_fmt(floor.get('cosine'))} / {_fmt(floor.get('top1_agreement')) if result.entry.task == 'classification' else 'n/a'}"
        lines.append(" | ".join(["", f"`{result.entry.name}`", result.entry.title, export.get("exporter", "-"), nodes,
                                 _fmt(against.get("cosine_mean")), top1, rounded, speed,
                                 f"{result.peak_rss / 2**30:.2f} GB" + (f" ({result.peak_stage})" if result.peak_stage else ""), stages,
                                 code, verdict(result)[0], ""]).strip())
    failing = [(r, *verdict(r)) for r in results if verdict(r)[0] != "PASSED"]
    if failing:
        lines += ["", "## Why the others do not pass", ""]
        lines += [f"- `{r.entry.name}` ({word}): {reason}" for r, word, reason in failing]
    lines += ["", "## Targets", ""] + _targets(results, seconds)
    notes = [(r.entry.name, n) for r in results for n in (r.report or {}).get("notes", [])]
    if notes:
        lines += ["", "## Notes of the runs", ""] + [f"- `{name}`: {note}" for name, note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _undecided_only(result: Result) -> bool:
    """Whether every gate the run failed has an interval that holds its threshold."""
    if result.returncode != 1 or not result.report:
        return False
    failed = [g for g in result.report["gates"] if not g["passed"]]

    def undecided(gate: dict[str, Any]) -> bool:
        ci, threshold = gate.get("interval"), gate.get("threshold")
        return (isinstance(ci, list) and len(ci) == 2 and None not in ci and isinstance(threshold, (int, float))
                and ci[0] < threshold <= ci[1])

    return bool(failed) and all(undecided(g) for g in failed)


def _targets(results: Sequence[Result], seconds: float) -> list[str]:
    def check(ok: bool) -> str:
        return "met" if ok else "**NOT met**"

    passing = [r for r in results if verdict(r)[0] == "PASSED"]
    good = [r for r in passing if (_int8(r.report).get("vs_fp32") or {}).get("cosine_mean", 0) >= 0.99
            and (_int8(r.report).get("speedup_vs_fp32") or 0) > 1.0]
    crashed = [r.entry.name for r in results if r.returncode is None or r.returncode < 0 or r.returncode == 3]
    heavy = [f"{r.entry.name} {r.peak_rss / 2**30:.2f} GB" for r in results if r.peak_rss >= 3 * 10**9]
    vision = [r for r in results if r.entry.family == "vision"]
    slow_q = [f"{r.entry.name} {_fmt(_stage_seconds(r.report, 'quantize'), 1)} s" for r in vision
              if (_stage_seconds(r.report, "quantize") or 0) >= 30]
    slow_v = [f"{r.entry.name} {_fmt(_stage_seconds(r.report, 'verify'), 1)} s" for r in vision
              if (_stage_seconds(r.report, "verify") or 0) >= 60]
    share = len(good) / len(results) if results else 0.0
    return [
        "| target | result | status |", "|---|---|---|",
        f"| whole zoo < 30 minutes | {seconds / 60:.1f} minutes | {check(seconds < 1800)} |",
        f"| >= 90 % pass (exit 0) with int8 cosine >= 0.99 and int8 faster than fp32 | {len(good)} of {len(results)} ({share:.0%}) "
        f"| {check(share >= 0.9)} |",
        f"| no model ends with exit 3 or is killed | {', '.join(crashed) or 'none'} | {check(not crashed)} |",
        f"| peak RSS < 3 GB for every model | {', '.join(heavy) or 'all below'} | {check(not heavy)} |",
        f"| quantize < 30 s for every vision model | {', '.join(slow_q) or 'all below'} | {check(not slow_q)} |",
        f"| verify < 60 s for every vision model | {', '.join(slow_v) or 'all below'} | {check(not slow_v)} |",
    ]


def machine_info() -> dict[str, Any]:
    import os

    from deploytool.hardware import cpu_info

    info = cpu_info()
    return {"cpu": info.get("model") or info.get("cpu") or "unknown CPU", "cores": os.cpu_count(), "isa": info.get("isa", [])}


def select(names: Sequence[str] | None) -> list[Entry]:
    if not names:
        return list(ZOO)
    known = {e.name: e for e in ZOO}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown zoo model(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def run_zoo(entries: Sequence[Entry], folder: Path, samples: int = 64, calibration: int = 64, seed: int = 0,
            timeout: float = 900.0) -> tuple[list[Result], float]:
    results, start = [], time.perf_counter()
    for index, entry in enumerate(entries, 1):
        print(f"[zoo] {index}/{len(entries)} {entry.name}: {entry.title}", flush=True)
        result = run_entry(entry, folder / entry.name, samples, calibration, seed, timeout)
        word, reason = verdict(result)
        print(f"[zoo]   {word} in {result.seconds:.0f} s, peak RSS {result.peak_rss / 2**30:.2f} GB"
              + (f": {reason}" if reason else ""), flush=True)
        results.append(result)
    seconds = time.perf_counter() - start
    (folder / "total.json").write_text(json.dumps({"seconds": seconds}), encoding="utf-8")
    return results, seconds


def main(argv: Sequence[str] | None = None) -> int:
    from deploytool.artifacts import write_text

    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run only these zoo models")
    parser.add_argument("--samples", type=int, default=64, help="validation samples per model")
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a model's run is killed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md", help="Markdown file to write")
    parser.add_argument("--keep", type=Path, help="write data, recipes and run folders here (default: a temporary folder)")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the report from the results kept in --keep")
    args = parser.parse_args(argv)
    entries = select(args.only)
    if args.render_only:
        if not args.keep:
            parser.error("--render-only needs --keep")
        kept = [Result.load(e, args.keep / e.name) for e in entries]
        results = [r for r in kept if r is not None]
        total = args.keep / "total.json"
        seconds = json.loads(total.read_text())["seconds"] if total.exists() else sum(r.seconds for r in results)
    elif args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results, seconds = run_zoo(entries, args.keep.resolve(), args.samples, args.calibration, args.seed, args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="deploytool-zoo-") as folder:
            results, seconds = run_zoo(entries, Path(folder), args.samples, args.calibration, args.seed, args.timeout)
    write_text(args.out, render(results, machine_info(), seconds, args.samples, args.calibration))
    print(f"[zoo] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
