"""Peak memory of an ONNX Runtime inference session, measured in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Runs in a fresh interpreter: the peak resident set grows from loading the runtime to creating
# the session and running it; only the second part is the model's own cost.
_CHILD = """
import sys
import numpy as np
import onnxruntime
from deploytool.runners import OrtRunner
from pathlib import Path
model, feeds, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with np.load(feeds, allow_pickle=False) as archive:
    inputs = {k: archive[k] for k in archive.files}
def peak_kib():  # VmHWM belongs to this process image (ru_maxrss would carry the parent's peak across exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
before = peak_kib()
runner = OrtRunner("memory", Path(model), threads)
for _ in range(runs):
    runner.infer(inputs)
print((peak_kib() - before) * 1024)
"""


def session_peak_bytes(path: Path, feeds: Mapping[str, np.ndarray], threads: int = 1, runs: int = 3) -> int | None:
    """Bytes the peak resident set grows by when a session for `path` is created and run, over the
    loaded runtime. None where it cannot be measured (non-Linux platforms, or the child failed)."""
    if not sys.platform.startswith("linux"):
        return None
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="deploytool-memory-") as folder:
        data = Path(folder) / "feeds.npz"
        np.savez(data, **dict(feeds))  # type: ignore[arg-type]
        command = [sys.executable, "-c", _CHILD, str(path), str(data), str(threads), str(runs)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        except (OSError, subprocess.TimeoutExpired):
            return None
    try:
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (ValueError, IndexError):
        return None
