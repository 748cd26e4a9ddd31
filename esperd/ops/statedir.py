"""Whether the state directory can hold what esperd keeps there (checkpoints, the broker's store).

Checked by writing, not by looking at permission bits: root passes every permission check, but
not a path that is a file, a read-only file system or a full disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class StateDirError(Exception):
    """The state directory is unusable; the message says which path and why, on one line."""


def prepare_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state directory if needed and prove it writable; StateDirError if it is not."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise StateDirError(f"state_dir {str(directory)!r} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"state_dir {str(directory)!r} cannot be created: {_reason(exc)}") from None
    _probe(directory, directory)
    return directory


def check_state_dir(path: str | os.PathLike[str]) -> None:
    """Like `prepare_state_dir`, creating nothing: a missing directory must be creatable."""
    directory = Path(path).expanduser().absolute()
    existing = directory
    while not existing.exists():
        if existing.is_symlink() or existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise StateDirError(
            f"state_dir {str(directory)!r} cannot be created: {str(existing)!r} is not a directory"
        )
    _probe(existing, directory)


def _probe(where: Path, state_dir: Path) -> None:
    """Create and remove a file in `where` (the state directory or the ancestor it will be made in)."""
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".esperd-probe-"):
            pass
    except OSError as exc:
        held = "" if where == state_dir else f" (in {str(where)!r}, where it would be created)"
        raise StateDirError(f"state_dir {str(state_dir)!r} is not writable{held}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
