"""The three ways a run can end badly, each with its documented exit code."""

from __future__ import annotations


class DeployError(Exception):
    """Base class: a message for the user and the exit code it maps to."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserError(DeployError):
    """Bad recipe, missing or malformed file, data that does not match the model (exit 2)."""

    exit_code = 2


class GateFailure(DeployError):
    """A verification gate failed; artifacts and report are still written (exit 1)."""

    exit_code = 1


class StageError(DeployError):
    """A stage failed for a reason other than user input (exit 3); traceback in run.log."""

    exit_code = 3

    def __init__(self, stage: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{stage} stage failed: {message}", hint)
        self.stage = stage


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (SIGINT), so partial work is cleaned up and kept resumable.

    A BaseException, so that handlers for ordinary errors do not swallow it."""

    exit_code = 143


# The signals (SIGINT, SIGTERM) that have arrived, noted by the command line's handlers. A signal can surface
# as another error (Ctrl-C during a C extension's import becomes "ImportError: initialization failed");
# what failed after one is reported as the interruption it was.
_signals: list[str] = []


def note_signal(name: str) -> None:
    _signals.append(name)


def signal_received() -> str | None:
    """The name of the last signal that arrived ('SIGINT', 'SIGTERM'), if any."""
    return _signals[-1] if _signals else None
