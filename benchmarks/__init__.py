"""Benchmarks: deploytool's outputs side by side with what users would use instead.

`make bench` (python -m benchmarks.run) regenerates docs/benchmarks.md.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def relative(path: Path) -> str:
    """A path relative to the repository root where it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
