"""Resource bounds checked before any work starts (pure Python: the runtime uses them too).

A number a user passes (threads, batch size, context) can ask for more than the machine has; these
checks turn that into one line up front instead of a machine swamped by threads or an out-of-memory
kill halfway through.
"""

from __future__ import annotations

import os
from typing import Optional

from edgegpt.errors import ArgumentError


def cpu_count() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: Optional[int], what: str = "threads") -> Optional[int]:
    """None (onnxruntime's default) or a whole number from 1 to the CPU count."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ArgumentError(f"{what} must be a whole number >= 1, got {threads!r}")
    n = cpu_count()
    if threads > n:
        raise ArgumentError(f"{what} {threads} exceeds this machine's {n} CPUs; more threads than CPUs only "
                            f"slow decoding down: use at most {n}")
    return threads


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def release_freed() -> None:
    """Hand memory that Python and onnxruntime have freed back to the system (glibc's malloc_trim; a no-op
    elsewhere). glibc keeps freed blocks in its arenas, so after a phase that held a whole graph the process
    stays that large, and the next phase's peak lands on top of it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_memory(need_bytes: int, what: str, fix: str) -> None:
    """Refuse work that needs more memory than is available, naming how much and the fix."""
    have = available_memory()
    if have is not None and need_bytes > have:
        raise ArgumentError(f"{what} needs about {need_bytes / 1e9:.1f} GB of memory and {have / 1e9:.1f} GB are "
                            f"available; {fix}")


def check_int(value: object, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """A whole number (not a bool, not a float) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"from {low} to {high}" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ArgumentError(f"{name} must be {span}, got {value}")
    return value
