"""CPU detection: the ISA features that decide whether and how int8 pays off."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import cast

# intra-op threads models are timed at unless told otherwise ([verify] threads, the searches, bench)
DEFAULT_THREADS = 2

# /proc/cpuinfo flag -> the name we report
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512",
    "avx512_vnni": "vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """Model name, architecture, ISA flags and core count of this machine."""
    model, flags = "unknown", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    table = _ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else _X86_FLAGS
    isa = sorted({name for flag, name in table.items() if flag in flags})
    if platform.machine().lower() in ("aarch64", "arm64") and "neon" not in isa:
        isa.append("neon")  # NEON is mandatory on AArch64
    return {
        "model": model if model != "unknown" else (platform.processor() or "unknown"),
        "machine": platform.machine(),
        "isa": isa,
        "cores": os.cpu_count(),
    }


def has_int8_dot_product() -> bool:
    """True where u8 x s8 products accumulate without saturation (VNNI/AMX on x86, dot-prod on ARM)."""
    isa = set(cast(list[str], cpu_info()["isa"]))
    return bool(isa & {"vnni", "avx_vnni", "amx", "dotprod"})
