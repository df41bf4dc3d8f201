"""How busy the machine is with other work: timings on shared cores are only as good as this.

The benchmark waits for a quiet machine before it times anything, and reports what other processes
took of the CPU while it timed; the timing itself is deploytool.latency's."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def machine_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class OtherLoad:
    """Share of the machine's CPU capacity that other processes used over a measured span."""

    share: float | None = None


@contextmanager
def other_load() -> Iterator[OtherLoad]:
    """Measure what other processes took of the machine while the block ran (ours subtracted)."""
    result = OtherLoad()
    machine, own, start = machine_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    try:
        yield result
    finally:
        after = machine_cpu_seconds()
        wall = time.perf_counter() - start
        if machine is not None and after is not None and wall > 0:
            others = (after - machine) - (own_cpu_seconds() - own)
            result.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def others_share(seconds: float = 1.0) -> float | None:
    """What other processes take of the machine's CPU over `seconds` of this process sleeping."""
    with other_load() as load:
        time.sleep(seconds)
    return load.share



def wait_for_quiet(max_others: float, max_wait: float, step: float = 1.0) -> tuple[float, bool]:
    """Wait until other processes take at most `max_others` of the machine's CPU, for at most `max_wait`
    seconds; returns (seconds waited, whether the machine was quiet). Unknown load counts as quiet."""
    waited = 0.0
    while True:
        share = others_share(step)
        if share is None or share <= max_others:
            return waited, True
        waited += step
        if waited >= max_wait:
            return waited, False
