"""How the command line ends: a library error becomes one line (two with a hint) and its documented exit code, and
SIGINT/SIGTERM become exceptions that unwind the program, so that partial work is cleaned up and a run stays resumable.

Exit codes: 0 every gate passed, 1 a gate failed, 2 user error, 3 a stage failed otherwise, 130/143 interrupted by
SIGINT/SIGTERM.
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from deploytool.errors import DeployError, GateFailure, Terminated, note_signal, signal_received


class DeployGroup(click.Group):
    """Turns library errors into one line (two with a hint) and the documented exit code."""

    interrupted = False  # the interruption was reported (and the exit code chosen)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployError as exc:
            debug = bool(ctx.meta.get("deploytool.debug"))
            if debug:
                traceback.print_exc()
            if signal_received() and not isinstance(exc, GateFailure):
                self._interrupted(ctx, signal_received() or "SIGINT")
            label = "FAILED" if isinstance(exc, GateFailure) else "error"
            click.echo(f"{label}: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except (KeyboardInterrupt, Terminated) as exc:  # Ctrl-C or SIGTERM: one line, 130 or 143, nothing half-written
            if ctx.meta.get("deploytool.debug"):
                traceback.print_exc()
            self._interrupted(ctx, "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM")
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug or an unexpected failure: still one line and exit 3
            if ctx.meta.get("deploytool.debug"):
                traceback.print_exc()
            if signal_received():  # what a signal broke, e.g. an import it cut short
                self._interrupted(ctx, signal_received() or "SIGINT")
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            click.echo("hint: rerun with --debug for the traceback", err=True)
            ctx.exit(3)

    @staticmethod
    def _interrupted(ctx: click.Context, name: str) -> None:
        """One line, and exit 130 (SIGINT) or 143 (SIGTERM)."""
        resume = "; run the same command again to resume the run" if ctx.invoked_subcommand == "run" else ""
        click.echo(f"interrupted ({name}){resume}", err=True)
        DeployGroup.interrupted = True
        ctx.exit(Terminated.exit_code if name == "SIGTERM" else 130)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT raises KeyboardInterrupt, SIGTERM Terminated: both unwind the program, so that partial work is
    cleaned up and a run stays resumable. A second SIGTERM ends the program at once."""
    import signal

    name = signal.Signals(signum).name
    note_signal(name)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    raise KeyboardInterrupt


def run_main(group: click.Group) -> None:
    """The program: `group` with the signal handlers installed; an interrupt that escapes click still exits 130."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        group(prog_name="deploytool")
    except KeyboardInterrupt:  # one that escaped click, e.g. while it was exiting: still 130, never a traceback
        if not DeployGroup.interrupted:
            click.echo("interrupted (SIGINT)", err=True)
        raise SystemExit(130) from None
