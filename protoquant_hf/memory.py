"""Handing the heap's free memory back to the operating system, so that long jobs keep a flat footprint.

glibc serves the job's megabyte-sized batch temporaries from its heap once its dynamic mmap threshold has risen,
and freed blocks between live ones stay in the process (measured: +105 MB of own memory after the k-means sample and
the probe over a 100 000-row cache; issue 12). Fixing the threshold low instead makes every such temporary a fresh
mapping whose pages fault in at every use, which halved extraction throughput. `malloc_trim(0)` at natural
boundaries (a cache shard written, a shard's worth of rows read, an epoch, a phase, an evaluation of the probe's
L-BFGS) returns the free pages and costs one walk of the heap. (A 2-process run that aborted at exit with these trims
in place was a gloo teardown race, fixed by destroying the process group: benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc's `malloc_trim(0)`); whether anything could be done."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


__all__ = ["release_free_heap"]
