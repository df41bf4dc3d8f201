"""Logging helpers shared by the stages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(name: str | None, level: int = logging.ERROR) -> Iterator[None]:
    """Raise a logger's level for the block: libraries that log progress or harmless warnings
    (the exporter, onnxruntime's quantizer through the root logger) stay out of the user's terminal."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
