"""Writing artifacts atomically and describing them (size, hash)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# called with each path before it is written (a run records its files in its folder's marker)
_recorders: list[Callable[[Path], None]] = []


@contextlib.contextmanager
def recording(recorder: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, every atomic_path() write is announced to `recorder` before anything is written."""
    _recorders.append(recorder)
    try:
        yield
    finally:
        _recorders.remove(recorder)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    OS errors name `path`, never the temporary file the user has not heard of."""
    for record in list(_recorders):
        record(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get the usual mode
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename in (tmp, str(tmp_path)) or exc.filename2 == str(path):
            raise _naming(exc, path) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _naming(exc: OSError, path: Path) -> OSError:
    """The same OS error, about `path`."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe(path: Path) -> dict[str, object]:
    return {"path": str(path), "size_bytes": path.stat().st_size, "sha256": sha256(path)}
