"""How long-running steps report progress; the CLI supplies a rich implementation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...


class Silent:
    """The library default: no output."""

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        yield from items


class RichProgress:
    """A transient rich progress bar per step, on stderr."""

    def __init__(self, console: object) -> None:
        self.console = console

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Bar(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
