"""Where protoquant_hf keeps what it builds on first use, and how it writes it safely.

Everything built lazily (converted bundled backbones, converted bundled datasets, cached feature
maps) lives under one root so users can find and delete it, and every artifact is written into a
temporary sibling first and renamed into place, so a killed process never leaves something that a
later run would mistake for a finished artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The protoquant_hf cache folder.

    Resolution order: ``$PROTOQUANT_CACHE``, then ``$HF_HOME/protoquant``, then
    ``$XDG_CACHE_HOME/huggingface/protoquant``, then ``~/.cache/huggingface/protoquant``
    (read at call time, so tests and users can redirect it per process).
    """
    if os.environ.get("PROTOQUANT_CACHE"):
        return Path(os.environ["PROTOQUANT_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "protoquant"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "protoquant"


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``final`` only if the block succeeds.

    The temporary folder is a sibling of ``final`` (same file system, so the rename is atomic).
    On any exception it is deleted and ``final`` is left untouched. If ``final`` already exists
    when the block ends (another process finished first), the existing one is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["atomic_file", "atomic_folder", "cache_root"]
