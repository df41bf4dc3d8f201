"""How long-running steps report progress; the CLI supplies a rich implementation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...

    def describe(self, description: str) -> None:
        """Update the description of the step being tracked (e.g. with a loss)."""


class Silent:
    """The library default: no output."""

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        yield from items

    def describe(self, description: str) -> None:
        pass


class RichProgress:
    """A transient rich progress bar per step, on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._current: tuple[object, object] | None = None

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Bar(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            self._current = (bar, task)
            try:
                for item in items:
                    yield item
                    bar.advance(task)
            finally:
                self._current = None

    def describe(self, description: str) -> None:
        if self._current is not None:
            bar, task = self._current
            bar.update(task, description=description)  # type: ignore[attr-defined]
