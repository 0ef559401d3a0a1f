"""glibc malloc settings for a CPU training run: keep freed memory in the heap instead of returning it to the OS.

By default glibc serves a large allocation (above a dynamic threshold that starts at 128 KiB and caps at 32 MiB)
with its own mmap and gives it back with munmap when freed, and trims the heap's free top back to the OS. A CPU
train step allocates and frees the same large activations every step, so each fresh tensor faults its pages in
again: a Coconut step, whose one-column latent passes interleave small and large allocations, took ~478k minor
faults and ~2.3 s of system time per GPT-2-small step (benchmarks/fair_floor_faults.py), its floor 0-155k.
With mmap off (`M_MMAP_MAX` 0) and trimming off (`M_TRIM_THRESHOLD` above any heap), freed pages stay mapped and
are reused: ~10 faults a step, the Coconut step 5-12 points closer to its fair floor without checkpointing
(docs/benchmarks.md, "Latent passes at the fair floor"), the peak resident memory unchanged. The cost: resident
memory stays at its high-water mark (it never shrinks), and glibc's aligned allocations can leave freed chunks a
same-size request does not fit (bounded in the measurements there).

Applied once where a training run starts, only when the accelerator is the CPU (a GPU run's host allocations are
not in its step). `COCONUT_SCALE_CPU_MALLOC=0` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, above any heap top a CPU run frees
OPT_OUT = "COCONUT_SCALE_CPU_MALLOC"
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _glibc():
    """The C library when it is glibc (has mallopt), else None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def tune_cpu_malloc(on_cpu: bool, environ=None, libc=None) -> str | None:
    """Apply SETTINGS when `on_cpu` and not opted out; returns the line to log (None: nothing to say, on a GPU)."""
    if not on_cpu:
        return None
    environ = os.environ if environ is None else environ
    value = environ.get(OPT_OUT, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return f"malloc: glibc defaults kept ({OPT_OUT}={environ[OPT_OUT]})"
    if value not in ("1", "on", "true", "yes"):
        raise ValueError(f"{OPT_OUT}={environ[OPT_OUT]!r}: expected 1 (tune glibc malloc on CPU) or 0 (keep defaults)")
    libc = _glibc() if libc is None else libc
    if libc is None:
        return "malloc: not glibc, allocator settings left as they are"
    failed = [option for option, setting in SETTINGS if libc.mallopt(option, setting) != 1]
    if failed:
        return f"malloc: mallopt refused options {failed}; allocator settings partly left as they are"
    return (f"malloc: CPU run, glibc mmap off and heap trim off (freed memory is reused, not faulted in again; "
            f"resident memory stays at its peak); {OPT_OUT}=0 keeps the defaults")
