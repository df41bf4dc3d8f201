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


class _Forward(logging.Handler):
    """Passes another library's log records on to a logger of ours, at DEBUG: into run.log, never to the terminal."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # with the traceback, if any

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("deploytool"):
            return  # our own records reach the root through propagation: they are logged already
        with contextlib.suppress(Exception):  # a library's odd record must not break the work it reports on
            self.target.debug("%s", self.format(record))


@contextlib.contextmanager
def captured(target: logging.Logger, prefix: str = "torch") -> Iterator[None]:
    """Keep a library's console output away from the user's terminal for the block, and log it to `target`.

    The loggers under `prefix` (torch gives them handlers of their own that print to stderr) and the
    root logger forward to `target` at DEBUG (so a run's run.log keeps them); whatever is printed to
    stdout or stderr, from Python or from C++ code (the file descriptors themselves), is logged after
    the block."""
    import os
    import sys
    import tempfile

    forward = _Forward(target)
    swapped: list[tuple[logging.Logger, list[logging.Handler]]] = []
    loggers = [logging.getLogger(prefix)] + [
        logger for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name.startswith(prefix + ".") and logger.handlers
    ]
    for logger in loggers:
        swapped.append((logger, logger.handlers[:]))
        logger.handlers = [forward]
    root = logging.getLogger()
    root.addHandler(forward)  # libraries that log without handlers would reach the terminal through logging.lastResort
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    saved_fds: list[tuple[int, int]] = []
    saved_streams = (sys.stdout, sys.stderr)
    text_sink = None
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                try:
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:
                    continue
            text_sink = open(sink.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            sys.stdout = sys.stderr = text_sink
            yield
        finally:
            if text_sink is not None:
                with contextlib.suppress(OSError, ValueError):
                    text_sink.flush()
            sys.stdout, sys.stderr = saved_streams
            for fd, copy in reversed(saved_fds):
                os.dup2(copy, fd)
                os.close(copy)
            root.removeHandler(forward)
            for logger, handlers in swapped:
                logger.handlers = handlers
            sink.seek(0)
            output = sink.read().decode("utf-8", errors="replace").strip()
            if output:
                target.debug("console output of %s:\n%s", prefix, output)
