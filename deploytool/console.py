"""What the commands print: rich tables (140 columns wide when the output is not a terminal), notes, a run's report,
a command's recipe for --dry-run, and the progress display."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from deploytool.errors import GateFailure
from deploytool.gates import SPEED_GATES

if TYPE_CHECKING:
    from deploytool.report_schema import Gate, Report


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    shown = Console(stderr=stderr, highlight=False)
    if not shown.is_terminal:
        shown.width = 140  # logs and CI output: do not squeeze tables into 80 columns
    return shown


def print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    console().print(table)


def notes(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(f"note: {line}", err=err)


def exit_on_gates(report: Report) -> None:
    """A GateFailure (exit 1) naming every gate that failed, if any did."""
    failed = report.failed_gates
    if failed:
        detail = ", ".join(f"{g.name} on {g.model} (value {g.value}, threshold {g.threshold}{_interval(g)})" for g in failed)
        raise GateFailure(f"{len(failed)} gate(s) failed: {detail}")


def _interval(gate: Gate) -> str:
    """', interval [a, b]' of a speed or share gate, saying 'undecided' where the interval straddles the threshold (a
    value that fails, but that the measurement could not tell from one that passes: timing or sampling noise)."""
    if not gate.interval or len(gate.interval) != 2 or gate.threshold is None:
        return ""
    low, high = gate.interval
    if low is None or high is None:
        return ""
    undecided = low < gate.threshold <= high
    noise = "the timing noise" if gate.name in SPEED_GATES else "the sampling noise of the validation answers"
    return f", interval [{low:.3f}, {high:.3f}]" + (f": undecided, within {noise}" if undecided else "")


def show_report(report: Report, title: str) -> None:
    """The models, the gates and the notes of a report."""
    from deploytool.stages.report import gate_rows, summary_rows

    print_table(*summary_rows(report), title=title)
    if report.gates:
        print_table(*gate_rows(report), title="gates")
    notes(report.notes)


def print_recipe(text: str) -> None:
    click.echo("# what this command runs, as recipe TOML")
    click.echo(text, nl=False)


def progress() -> Any:
    from deploytool.progress import RichProgress

    return RichProgress(console(stderr=True))
