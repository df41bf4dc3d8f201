"""Run folders: the marker that makes a folder a deploytool run folder (its state and the files the run wrote), the
lock held while a run writes into it, and the checks on --out before anything is written."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploytool.data import is_callable_source
from deploytool.errors import UserError
from deploytool.recipe import Recipe

log = logging.getLogger("deploytool")

# The marker only deploytool writes: what makes a folder a run folder (never common file names such as
# run.log), with the state of the run and every file it wrote, so that --force removes those and nothing else.
RUN_MARKER = ".deploytool-run.json"
MARKER_FORMAT = 1
CACHE_DIR = ".cache"
REPORT_FILES = ("report.json", "report.md", "report.html")


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The run folder's marker, or None when the folder holds none (it is then not a run folder)."""
    path = out_dir / RUN_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"run folder {out_dir}: its marker {RUN_MARKER} is unreadable ({exc})",
                        "delete the folder yourself if it holds nothing you need, or choose another --out") from None
    if not isinstance(marker, dict) or marker.get("tool") != "deploytool" or not isinstance(marker.get("files"), list):
        raise UserError(f"run folder {out_dir}: {RUN_MARKER} is not a deploytool run marker", "choose another --out")
    if not isinstance(marker.get("format"), int) or marker["format"] > MARKER_FORMAT:
        raise UserError(f"run folder {out_dir} was written by a newer deploytool (marker format {marker.get('format')})",
                        "use that version, or choose another --out")
    return marker


class RunFolder:
    """A run folder held by this process: a lock for the run's duration, and the marker listing what the run wrote.

    The marker is updated before each file is written, so that even a killed run leaves a folder whose
    own files are known."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: list[str] = []
        self.state = "running"
        self._lock: int | None = None

    def lock(self) -> None:
        """An exclusive lock on the folder itself (nothing is written for it); a second run gets exit 2."""
        import fcntl
        import os

        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (json.loads((self.path / RUN_MARKER).read_text(encoding="utf-8")) or {}).get("pid")
            except (OSError, ValueError, AttributeError):
                holder = None
            who = f"another deploytool run (pid {holder})" if holder else "another deploytool run"
            raise UserError(f"run folder {self.path} is in use by {who}",
                            "wait for it to finish, or choose another --out") from None
        self._lock = fd

    def release(self) -> None:
        import os

        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def record(self, path: Path) -> None:
        """Note that the run writes `path` (when it lies inside the folder), before it is written."""
        import os

        try:
            name = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return  # outside the run folder, e.g. a --junit file elsewhere
        if name not in (".", RUN_MARKER) and name not in self.files:
            self.files.append(name)
            self.save()

    def save(self) -> None:
        """Write the marker atomically (the first write into a folder, so it doubles as the write check)."""
        import os
        import tempfile

        from deploytool import __version__

        marker = {"tool": "deploytool", "format": MARKER_FORMAT, "version": __version__, "state": self.state,
                  "pid": os.getpid(), "files": self.files}
        fd, tmp = tempfile.mkstemp(prefix=f"{RUN_MARKER}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(marker, fh, indent=1)
            os.replace(tmp, self.path / RUN_MARKER)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def finish(self, state: str) -> None:
        """Record how the run ended; never raises (the run's own outcome matters more)."""
        self.state = state
        try:
            self.save()
        except OSError:
            log.exception("could not update the run folder marker")

    def remove(self, keep: Sequence[str]) -> None:
        """Delete the files the previous run wrote (reports first), except `keep`; nothing else is touched."""
        ordered = [n for n in REPORT_FILES if n in self.files] + [n for n in self.files if n not in REPORT_FILES]
        for name in ordered:
            if name in keep:
                continue
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            for partial in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed run
                partial.unlink(missing_ok=True)
            parent = target.parent
            while parent != self.path and self.path in parent.parents and not any(parent.iterdir()):
                parent.rmdir()  # a sub-folder the run created for a file, now empty
                parent = parent.parent
            self.files.remove(name)
            self.save()
        for stale in self.path.glob(f"{RUN_MARKER}.*.tmp"):
            stale.unlink(missing_ok=True)


def check_out_dir(recipe: Recipe, out_dir: Path) -> None:
    """--out may not be the current folder (or hold it), nor the recipe's folder or a folder that holds its inputs."""
    import os

    out = Path(os.path.abspath(out_dir)).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(f"--out {out_dir} is the current folder{'' if out == cwd else ' or holds it'}",
                        "give the run a folder of its own, e.g. --out runs/" + recipe.name)
    inputs: list[tuple[str, str | None]] = [("the recipe's folder", str(recipe.base_dir)),
                                            ("[model] checkpoint", recipe.model.checkpoint),
                                            ("[model] factory", _file_of(recipe.model.factory)),
                                            ("[data] calibration", recipe.data.calibration),
                                            ("[data] validation", recipe.data.validation)]
    if recipe.distill:
        inputs += [("[distill] train", recipe.distill.train), ("[distill] validation", recipe.distill.validation),
                   ("[distill] student_checkpoint", recipe.distill.student_checkpoint),
                   ("[distill] student_factory", _file_of(recipe.distill.student_factory))]
    for key, value in inputs:
        if value is None or (is_callable_source(value) and not recipe.resolve(value).exists()):
            continue
        path = recipe.resolve(value).resolve()
        if out == path or out in path.parents:
            what = key if key.startswith("the ") else f"{key} ({path})"
            raise UserError(f"--out {out_dir} is or holds {what}: a run folder may not contain the run's own inputs",
                            "choose a folder of its own, e.g. --out runs/" + recipe.name)


def _file_of(spec: str | None) -> str | None:
    """The file of a 'path/file.py:callable' spec (None for a module:callable)."""
    if spec is None:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") else None


def prepare_out_dir(out_dir: Path, force: bool) -> tuple[RunFolder, bool, bool]:
    """Lock the run folder and make it ready: (folder, created by this call, held a previous run).

    Only a new or empty folder, or one whose marker says it holds a deploytool run, is used. A finished
    run is replaced only with force, and then only the files its marker lists are deleted (its stage
    cache is kept); an interrupted or failed run is resumed (its cache and run.log are kept). Files
    the marker does not list are never touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to run folder {out_dir}: {exc.strerror or exc}") from None
    folder = RunFolder(out_dir)
    folder.lock()
    try:
        marker = read_marker(out_dir)
        if marker is None and any(out_dir.iterdir()):
            raise UserError(f"{out_dir} is not empty and holds no deploytool run",
                            "a run writes only into a new or empty folder, or one that holds a previous run: choose another --out")
        if marker is not None and marker.get("state") == "finished" and not force:
            raise UserError(f"run folder {out_dir} already holds results",
                            "pass --force to replace them (only the files that run wrote), or choose another --out")
        folder.files = [str(n) for n in marker["files"]] if marker else []
        try:
            folder.save()  # before anything is deleted: a folder that cannot be written is left as it is
        except OSError as exc:
            raise UserError(f"cannot write to run folder {out_dir}: {exc.strerror or exc}") from None
        if marker is not None:
            resume = marker.get("state") != "finished" and not force
            try:
                folder.remove(keep=(CACHE_DIR, "run.log") if resume else (CACHE_DIR,))
            except OSError as exc:
                raise UserError(f"cannot clear the previous run's files in {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        folder.release()
        raise
    return folder, created, marker is not None


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies inside `folder` (neither needs to exist)."""
    import os

    return Path(os.path.abspath(folder)) in Path(os.path.abspath(path)).parents
