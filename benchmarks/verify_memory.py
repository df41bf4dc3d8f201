"""Peak memory and stage times of a whole run, verification included, on an EfficientNet-B0-sized CNN.

    python -m benchmarks.verify_memory [--samples 64] [--out docs/verify-memory.md] [--keep DIR]

The network is built here, in code: an EfficientNet-B0-style stack of 16 MBConv blocks
(depthwise-separable convolutions with squeeze-excitation, BatchNorm, SiLU) on 224x224x3
images. Its BatchNorm statistics are set from generated images (no training, no download),
and seeded, generated images form the calibration and validation data. A static int8 recipe
with `[verify] memory = true` then runs as `python -m deploytool run RECIPE --out DIR` in a
subprocess. While it runs, the resident set of that process and all its children is sampled
from /proc; the report gives its peak, the stage times from report.json, and the int8
model's localisation (how many tensor groups, how many tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

LIMIT_BYTES = 3 * 10**9  # the target: the whole run below 3 GB of resident memory
IMAGE = 224
CLASSES = 1000

# EfficientNet-B0's stages: (expansion, output channels, blocks, first stride, kernel)
STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
          (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))


# --- the network ---------------------------------------------------------------------------------


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU() if act else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, squeeze-excitation, 1x1 projection (+ skip)."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int, kernel: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [ConvBNAct(cin, hidden)] if expansion != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden),
            SqueezeExcite(hidden, max(1, cin // 4)),
            ConvBNAct(hidden, cout, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.skip else y


class EfficientNetB0Like(nn.Module):
    """(N, 3, 224, 224) normalized images -> (N, 1000) logits; EfficientNet-B0's layout (about 5.3 M parameters)."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvBNAct(3, 32, 3, 2)]
        cin = 32
        for expansion, cout, repeats, stride, kernel in STAGES:
            for index in range(repeats):
                blocks.append(MBConv(cin, cout, expansion, stride if index == 0 else 1, kernel))
                cin = cout
        blocks.append(ConvBNAct(cin, 1280))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build() -> nn.Module:
    """The recipe's model factory."""
    return EfficientNetB0Like()


def mbconv_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, MBConv) for m in model.modules())


# --- inputs --------------------------------------------------------------------------------------


def images(count: int, seed: int) -> np.ndarray:
    """Seeded (count, 3, 224, 224) float32 images: smooth blobs and gratings plus noise, normalized like ImageNet."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, IMAGE, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    out = np.empty((count, 3, IMAGE, IMAGE), dtype=np.float32)
    for i in range(count):
        picture = np.zeros((3, IMAGE, IMAGE), dtype=np.float32)
        for _ in range(int(rng.integers(2, 6))):  # coloured blobs
            cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            picture += rng.uniform(0, 1, (3, 1, 1)).astype(np.float32) * blob
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(2, 20)  # a grating
        grating = np.sin(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy))
        picture += 0.2 * rng.uniform(0, 1, (3, 1, 1)).astype(np.float32) * grating
        picture += rng.normal(0, 0.05, picture.shape).astype(np.float32)
        picture = np.clip(picture / max(float(picture.max()), 1e-6), 0.0, 1.0)
        out[i] = (picture - mean) / std
    return out


def set_batchnorm_statistics(model: nn.Module, data: np.ndarray, batch: int = 16) -> None:
    """BatchNorm running statistics from `data` (cumulative averages), so activations stay well scaled."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(data), batch):
            model(torch.from_numpy(data[start:start + batch]))
    model.eval()


RECIPE = """\
name = "efficientnet-b0-like"
description = "EfficientNet-B0-style CNN (16 MBConv blocks with squeeze-excitation), 224x224: static int8, verified"

[model]
factory = "{factory}"
checkpoint = "model.pt"
inputs = [{{ name = "image", shape = ["batch", 3, 224, 224], dtype = "float32" }}]
outputs = ["logits"]

[data]
calibration = "calib.npz"
validation = "val.npz"
task = "classification"

[export]
opset = 18

[simplify]
enabled = true

[quantize]
mode = "static"
per_channel = true

[verify]
threads = {threads}
memory = true
"""


def write_inputs(folder: Path, samples: int, calibration: int, threads: int, seed: int) -> tuple[Path, int]:
    """Checkpoint, data and recipe in `folder`; returns the recipe and the model's parameter count."""
    torch.manual_seed(seed)
    model = build()
    set_batchnorm_statistics(model, images(32, seed + 2))
    torch.save(model.state_dict(), folder / "model.pt")
    np.savez(folder / "calib.npz", image=images(calibration, seed))
    np.savez(folder / "val.npz", image=images(samples, seed + 1))
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.format(factory=f"{SCRIPT}:build", threads=threads), encoding="utf-8")
    return recipe, sum(p.numel() for p in model.parameters())


# --- watching the run ----------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += tree.get(current, [])
    return found


@dataclass
class Watch:
    """Resident memory of a process tree, sampled while it runs."""

    interval: float = 0.05
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (wall clock, tree RSS bytes, processes)
    hwm: dict[int, int] = field(default_factory=dict)  # pid -> its own VmHWM, bytes (last seen)

    def poll(self, pid: int) -> None:
        total, pids = 0, process_tree(pid)
        for member in pids:
            total += _status_kib(member, "VmRSS:") * 1024
            peak = _status_kib(member, "VmHWM:") * 1024
            if peak:
                self.hwm[member] = max(self.hwm.get(member, 0), peak)
        self.samples.append((time.time(), total, len(pids)))

    @property
    def peak(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    @property
    def peak_at(self) -> float | None:
        return max(self.samples, key=lambda s: s[1])[0] if self.samples else None

    def peak_between(self, start: float, end: float) -> int | None:
        inside = [s[1] for s in self.samples if start <= s[0] <= end]
        return max(inside) if inside else None

    def at(self, moment: float) -> int | None:
        """The tree's RSS in the first sample at or after `moment` (the last sample if none is)."""
        after = [s[1] for s in self.samples if s[0] >= moment]
        return after[0] if after else (self.samples[-1][1] if self.samples else None)


@dataclass
class RunCost:
    returncode: int
    seconds: float
    watch: Watch
    main_pid: int
    children_maxrss: int  # RUSAGE_CHILDREN ru_maxrss after the wait: the largest single process, bytes
    output: str
    others: float | None = None  # share of the machine's CPU other processes (not this tree) took meanwhile

    @property
    def main_hwm(self) -> int:
        return self.watch.hwm.get(self.main_pid, 0)

    @property
    def peak(self) -> int:
        """The larger of the sampled peak of the whole tree and the main process's own high-water mark."""
        return max(self.watch.peak, self.main_hwm)


def run_watched(command: Sequence[str], cwd: Path, interval: float = 0.05, timeout: float | None = None) -> RunCost:
    """Run `command`, sampling its process tree's RSS every `interval` seconds until it exits (or, after
    `timeout` seconds, is killed with its process group)."""
    from benchmarks.machine import machine_cpu_seconds

    watch = Watch(interval)
    output: list[str] = []
    machine, own, start = machine_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=timeout is not None)
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while process.poll() is None:
        watch.poll(process.pid)
        if timeout is not None and time.perf_counter() - start > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(interval)
    seconds = time.perf_counter() - start
    after = machine_cpu_seconds()
    reader.join(timeout=10)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    others = None
    if machine is not None and after is not None and seconds > 0:
        ours = usage.ru_utime + usage.ru_stime + own_cpu_seconds() - own  # the run's tree and this process
        others = max(0.0, (after - machine - ours) / (seconds * (os.cpu_count() or 1)))
    return RunCost(process.returncode, seconds, watch, process.pid, usage.ru_maxrss * 1024, "".join(output), others)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- what the run did ----------------------------------------------------------------------------

_STAGE_LINE = re.compile(r"^(\S+ \S+) \w+ deploytool: stage (\w+): (start|done|skipped|failed)")


def stage_windows(log: Path) -> dict[str, tuple[float, float]]:
    """Stage name -> (start, end) wall clock, from run.log's 'stage X: start/done' lines."""
    windows: dict[str, tuple[float, float]] = {}
    opened: dict[str, float] = {}
    if not log.exists():
        return windows
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _STAGE_LINE.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if match.group(3) == "start":
            opened[match.group(2)] = stamp
        elif match.group(2) in opened:
            windows[match.group(2)] = (opened.pop(match.group(2)), stamp)
    return windows


def _mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _share(value: float | None) -> str:
    return "an unknown share" if value is None else f"{100 * value:.0f}%"


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    rule = ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |", *("| " + " | ".join(r) + " |" for r in rows)]


def render(cost: RunCost, report: dict[str, Any] | None, out_dir: Path, params: int, blocks: int,
           samples: int, calibration: int, threads: int) -> str:
    from deploytool.hardware import cpu_info

    cpu = cpu_info()
    isa = ", ".join(cpu.get("isa", [])) or "none detected"
    windows = stage_windows(out_dir / "run.log")
    lines = [
        "# Verify memory: a whole run on an EfficientNet-B0-sized CNN",
        "",
        f"Generated by `make bench-verify-memory` (`python -m benchmarks.verify_memory`) on "
        f"{datetime.now(UTC):%Y-%m-%d}: {cpu.get('model', 'unknown CPU')} ({os.cpu_count()} cores; ISA {isa}). "
        "Regenerated whole; do not edit by hand.",
        "",
        f"- **Model:** an EfficientNet-B0-style CNN written in `benchmarks/verify_memory.py`: {blocks} MBConv blocks "
        "(1x1 expansion, depthwise 3x3/5x5, squeeze-excitation, 1x1 projection, skip connections), BatchNorm, SiLU, "
        f"224x224x3 input, {CLASSES} classes, {params / 1e6:.2f} M parameters. BatchNorm statistics come from "
        "generated images; the weights are untrained (memory and time do not depend on them).",
        f"- **Data:** seeded, generated 224x224 images: {calibration} for calibration, {samples} for validation.",
        f"- **Recipe:** export, onnxsim, static int8 (QDQ, per-channel), `[verify]` with `memory = true` and "
        f"{threads} threads; the int8 model is always localised against the fp32 one.",
        f"- **Measured:** `python -m deploytool run RECIPE --out DIR` in a subprocess; the resident set of that process "
        f"and all its children (the session-memory probes) sampled from /proc every {cost.watch.interval * 1000:.0f} ms "
        "and summed, and the run process's own high-water mark (VmHWM).",
        f"- **Machine load:** other processes took {_share(cost.others)} of the CPU while the run ran; wall times "
        "grow with that share, memory does not.",
        "",
        "## Result",
        "",
    ]
    verdict = "-" if report is None else ("PASSED" if report.get("passed") else "FAILED")
    under = cost.peak < LIMIT_BYTES
    rows = [
        ["peak RSS, whole process tree (sampled)", f"{_mib(cost.watch.peak)} ({_gb(cost.watch.peak)})"],
        ["peak RSS, run process alone (VmHWM)", f"{_mib(cost.main_hwm)} ({_gb(cost.main_hwm)})"],
        ["largest single process (ru_maxrss of children)", _mib(cost.children_maxrss)],
        ["target", f"< {_gb(LIMIT_BYTES)}: {'met' if under else 'NOT met'}"],
        ["process wall time", f"{cost.seconds:.1f} s"],
        ["exit status", str(cost.returncode)],
        ["verdict", verdict],
    ]
    loc = (report or {}).get("localization", {}).get("int8") or {}
    if loc:
        rows.append(["localisation groups (int8 against fp32)", str(loc.get("groups", "-"))])
        rows.append(["localised tensors", str(len(loc.get("tensors") or []))])
        first, worst = loc.get("first"), loc.get("worst")
        if isinstance(worst, dict):
            rows.append(["worst tensor", f"`{worst['tensor']}` ({worst['op']}, cosine {worst['cosine_mean']:.4f})"])
        rows.append(["first tensor below cosine " + str(loc.get("threshold", "")),
                     "none" if first is None else f"`{first['tensor']}` ({first['op']})"])
    lines += _table(["", "value"], rows)
    if cost.watch.peak_at is not None:
        at = next((name for name, (s, e) in windows.items() if s <= cost.watch.peak_at <= e), "outside the stages")
        lines += ["", f"The tree's peak came during: **{at}**."]
    if report is not None:
        lines += ["", "## Stages", "",
                  "Wall time from `report.json`; the process tree's RSS when the stage started (what earlier "
                  "stages left behind), its peak while the stage ran, and when it ended (times from `run.log`).", ""]
        stage_rows = []
        for stage in report.get("stages", []):
            window = windows.get(stage["name"])
            start, peak, end = ((cost.watch.at(window[0]), cost.watch.peak_between(*window), cost.watch.at(window[1]))
                                if window else (None, None, None))
            seconds = "skipped" if stage.get("status") == "skipped" else f"{float(stage['seconds']):.1f}"
            stage_rows.append([stage["name"], seconds, _mib(start), _mib(peak), _mib(end)])
        total = sum(float(s["seconds"]) for s in report.get("stages", []) if s.get("status") != "skipped")
        stage_rows.append(["all stages", f"{total:.1f}", "", _mib(cost.watch.peak), ""])
        lines += _table(["stage", "seconds", "RSS at start", "peak RSS", "RSS at end"], stage_rows)
        latency = report.get("latency") or {}
        verify = next((s for s in report.get("stages", []) if s["name"] == "verify"), None)
        if latency.get("seconds") is not None and verify is not None:
            lines += ["", f"Of verify's {float(verify['seconds']):.0f} s, {float(latency['seconds']):.0f} s went to "
                      f"latency timing ({latency.get('rounds')} rounds of one block per model, eager PyTorch included, "
                      f"plus the A/A control's second session of `{(latency.get('aa') or {}).get('model')}`); "
                      "the rest ran the validation data through "
                      "every model, measured session memory and localised the int8 model."]
        metrics = report.get("metrics", {})
        sessions = [[f"`{name}`", _mib(m.get("peak_memory_bytes"))] for name, m in metrics.items()
                    if m.get("peak_memory_bytes") is not None]
        if sessions:
            lines += ["", "Inference-session peak memory of each ONNX model, as verify reports it "
                      "(`metrics[*].peak_memory_bytes`: growth over the loaded runtime, batch "
                      f"{report.get('latency_batch', 1)}):", ""]
            lines += _table(["model", "session peak"], sessions)
        gates = report.get("gates", [])
        if gates:
            lines += ["", "Gates:", ""]
            lines += _table(["gate", "model", "value", "threshold", "result"], [
                [g["name"], g.get("model", ""), "-" if g.get("value") is None else f"{g['value']:.4g}",
                 f"{g.get('threshold', '-')}", "pass" if g.get("passed") else "FAIL"] for g in gates], left=2)
        notes = report.get("notes", [])
        if notes:
            lines += ["", "Notes of the run:", "", *(f"- {n}" for n in notes)]
    else:
        tail = "\n".join(cost.output.strip().splitlines()[-15:])
        lines += ["", "The run wrote no report.json. The end of its output:", "", "```", tail, "```"]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="validation images (at least 64)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration images")
    parser.add_argument("--threads", type=int, default=2, help="[verify] threads of the recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "verify-memory.md", help="Markdown file to write")
    parser.add_argument("--keep", type=Path, help="write the inputs and the run folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.samples < 64:
        parser.error("--samples must be at least 64")
    return args


def measure(args: argparse.Namespace, folder: Path) -> str:
    print("[verify-memory] building the model, its checkpoint and the images", flush=True)
    recipe, params = write_inputs(folder, args.samples, args.calibration, args.threads, args.seed)
    blocks = mbconv_blocks(build())
    out_dir = folder / "run"
    command = [sys.executable, "-m", "deploytool", "run", str(recipe), "--out", str(out_dir), "--force"]
    print(f"[verify-memory] running {' '.join(command[1:])}", flush=True)
    cost = run_watched(command, folder)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    print(f"[verify-memory] exit {cost.returncode} after {cost.seconds:.0f} s, peak RSS {_mib(cost.peak)}", flush=True)
    return render(cost, report, out_dir, params, blocks, args.samples, args.calibration, args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    from deploytool.artifacts import write_text

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        text = measure(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="deploytool-verify-memory-") as folder:
            text = measure(args, Path(folder))
    write_text(args.out, text)
    print(f"[verify-memory] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
