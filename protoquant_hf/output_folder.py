"""Output folders that never lose a user's files: safety checks, a crash-consistent finish, a safe replace.

Whatever protoquant_hf writes for a user (a trained model, an exported bundle, explanations, a copy with a gallery)
is built in a hidden sibling work folder and published by renaming it into place:

0. `write_lock` is held from the check to the publish, so one process at a time writes a destination: a second
   one started at once gets a clear error instead of sharing the work folder (or replacing the first one's result
   without --overwrite).
1. `check_destination` runs before any expensive work: `refusal_reason` refuses destinations that could only be
   replaced by deleting something that is not ours (the current folder or any folder containing it, the home
   folder, a filesystem root, a folder containing the cache); an occupied destination must be one of ours and
   `--overwrite` given; `check_writable` finds an unwritable one.
2. When the work folder is complete, `mark_complete` writes a marker atomically. From then on a rerun only has to
   `publish`; before it, the interrupted work can be resumed. At every instant one of the two holds.
3. `publish` replaces an existing destination only if it is one of ours (the caller's `replaceable` check): the
   old folder is renamed aside, the new one renamed in, and only then is the old one deleted, so a failure at any
   point leaves a complete model in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .cache import cache_root

COMPLETE_MARKER = ".complete"


def work_folder(destination: Path) -> Path:
    """The hidden sibling a destination is built in."""
    return destination.parent / f".{destination.name}.incomplete"


def _aside_folder(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.replaced"


def refusal_reason(destination: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> str | None:
    """Why `destination` must never be an output folder, or None. `protected`: more folders (e.g. a cache) that
    the destination must not contain."""
    text = str(destination).rstrip("/\\")
    path = Path(destination).expanduser()
    if text in ("", ".", "..") or path.name in ("", ".", ".."):
        return "is the current folder or a parent of it"
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        return "is a filesystem root"
    if resolved == Path.home().resolve():
        return "is your home folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "contains the current working directory"
    for folder in [cache_root(), *protected]:
        folder = Path(folder).expanduser().resolve()
        if resolved == folder or resolved in folder.parents:
            return f"contains the cache folder {folder}"
    return None


@contextlib.contextmanager
def write_lock(destination: str | os.PathLike) -> Iterator[None]:
    """Hold the lock for writing `destination` (or fail at once with a clear error if another process holds it).

    The lock file lives in the protoquant cache (``locks/``), named by the destination's resolved path, so nothing
    is added next to the user's folders and every spelling of one folder shares one lock. The operating system
    releases it when its process ends, also when killed.
    """
    path = Path(destination).expanduser().resolve()
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(
            f"Another protoquant process is writing {destination} right now; wait for it to finish, or choose "
            "another folder."
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_destination(
    destination: str | os.PathLike,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool],
    kind: str,
    existing: str,
    flag: str = "--output_dir",
    protected: Iterable[str | os.PathLike] = (),
) -> Path:
    """The one check before anything is built for `destination`: not an unsafe folder (`refusal_reason`), an
    occupied folder only if it is one of ours (`replaceable`) and `overwrite` is given, and writable.

    Args:
        kind / existing: what our outputs are, for the messages ("a protoquant training run" / "a previous
            training run").
        flag: the option that named the folder, for the messages.
    """
    path = Path(destination).expanduser()
    reason = refusal_reason(destination, protected)
    if reason:
        raise ValueError(
            f"{flag} {destination} {reason}; protoquant never uses such a folder as an output folder, because "
            "finishing renames the result there (and --overwrite would replace what is there). Choose a new folder, "
            f"e.g. {flag} runs/my-model."
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not replaceable(path):
            raise ValueError(
                f"{path} exists and is not {kind}; refusing to write into it or replace it (also with --overwrite, "
                f"which only ever replaces {kind}). Choose another {flag}."
            )
        if not overwrite:
            raise ValueError(
                f"{path} holds {existing} already. Pass --overwrite to replace it (only once the new one is "
                f"complete), or choose another {flag}."
            )
    check_writable(path)
    return path


def check_writable(destination: Path) -> None:
    """Raise a clear error now if the destination's folder cannot be written (a probe file is created and removed
    in its nearest existing ancestor)."""
    ancestor = destination.expanduser().absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        with tempfile.NamedTemporaryFile(prefix=".protoquant-write-test-", dir=ancestor):
            pass
    except OSError as error:
        raise ValueError(
            f"Cannot write the output folder {destination}: {ancestor} is not writable ({error.strerror or error}). "
            "Choose another output folder."
        ) from None


def is_complete(work: Path) -> bool:
    return (work / COMPLETE_MARKER).is_file()


def mark_complete(work: Path) -> None:
    """Atomically mark a work folder as holding the finished output."""
    tmp = work / (COMPLETE_MARKER + ".tmp")
    tmp.write_text("complete\n")
    os.replace(tmp, work / COMPLETE_MARKER)


def publish(work: Path, destination: Path, replaceable: Callable[[Path], bool], leftovers: Iterable[str] = ()) -> None:
    """Rename a complete work folder to `destination`, replacing a previous output only if `replaceable(it)`.

    Args:
        leftovers: names inside the work folder to delete first (e.g. checkpoints a resume no longer needs).
    """
    if not is_complete(work):
        raise RuntimeError(f"{work} is not marked complete; refusing to publish it.")
    for name in leftovers:
        target = work / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    aside = _aside_folder(destination)
    if destination.exists():
        if any(destination.iterdir()):
            if not replaceable(destination):
                raise ValueError(f"{destination} is not a previous output of protoquant_hf; refusing to replace it.")
            shutil.rmtree(aside, ignore_errors=True)  # left by a finish killed right after its swap
            os.rename(destination, aside)
            crash_point("replaced-aside")
        else:
            destination.rmdir()
    os.rename(work, destination)
    crash_point("renamed")
    (destination / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(aside, ignore_errors=True)


def crash_point(name: str) -> None:
    """Fault injection for tests of the sequences above: with ``PROTOQUANT_CRASH_AT=<name>`` in the environment the
    process kills itself here (SIGKILL, as ``kill -9`` would). Does nothing otherwise."""
    if os.environ.get("PROTOQUANT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = [
    "COMPLETE_MARKER",
    "check_destination",
    "check_writable",
    "crash_point",
    "is_complete",
    "mark_complete",
    "publish",
    "refusal_reason",
    "work_folder",
    "write_lock",
]
