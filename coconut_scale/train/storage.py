"""Storage faults, named: a failed write of a checkpoint or an export becomes one line that says which file, what the
filesystem said (ENOSPC, EIO, EDQUOT, EROFS ...) and how much space is left, instead of a library's traceback.

The libraries that write for us hide the cause: torch.save's zip writer reports a full disk as `RuntimeError:
[enforce fail at inline_container.cc] . unexpected pos N vs M`, safetensors as `SafetensorError: ... (os error 28)`.
`cause_of` finds the OSError behind such an error (in the exception chain, in an `os error N` of the message, or,
when nothing says it, by a small probe write next to the failed file, which then meets the same filesystem).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from coconut_scale.errors import UserError

PROBE_BYTES = 4 << 20  # a probe write meets a full disk or quota unless nearly this much is left


class StorageError(UserError):
    """A write that the filesystem refused; the message names the file, the errno and the free space."""


def human_bytes(n: float | None) -> str:
    if n is None:
        return "? bytes"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def existing_parent(path: str | Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds `path` (the place the user must free)."""
    path = existing_parent(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the filesystem that holds `path`, or its nearest existing parent."""
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def _probe(directory: Path) -> OSError | None:
    """The error a plain write next to the failed file meets now, if any."""
    directory = existing_parent(directory)
    probe = directory / f".tmp-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def cause_of(error: BaseException, path: str | Path) -> OSError | None:
    """The filesystem error behind `error` (raised while writing `path`), or None when the filesystem is not at
    fault as far as can be told."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"os error (\d+)", str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    if isinstance(error, (RuntimeError, ValueError)):  # a writer that lost the errno (torch.save's zip writer)
        return _probe(Path(path).parent)
    return None


def written_file(error: BaseException | None, default: str | Path) -> str | Path:
    """The file a failed write was writing: a copy's destination (filename2), else the error's file, else
    `default`."""
    return getattr(error, "filename2", None) or getattr(error, "filename", None) or default


def describe(cause: OSError, what: str, path: str | Path) -> str:
    """`<what> failed: ENOSPC (No space left on device) writing <file>; <free> free on <mount point>`."""
    name = errno.errorcode.get(cause.errno, f"errno {cause.errno}")
    target = written_file(cause, path)
    return (f"{what} failed: {name} ({os.strerror(cause.errno)}) writing {target}; "
            f"{human_bytes(free_bytes(path))} free on {mount_point(path)}")


def remove_leftovers(directories: list[Path], log) -> list[Path]:
    """Remove what interrupted writes left in `directories` (`.tmp-*`: partial checkpoints, exports, a setup;
    `.*.tmp`: atomic_files' temporary files), saying so in one line. Only the holder of the run lock may call it:
    a live run's `.tmp-` is its save in progress."""
    found = [p for d in directories if d.is_dir() for p in sorted({*d.glob(".tmp-*"), *d.glob(".*.tmp")})]
    if not found:
        return []
    sizes = []
    for p in found:
        if p.is_symlink():  # a pointer left by atomic_symlink: removed, its target untouched
            sizes.append(f"{p} (link)")
            p.unlink()
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        sizes.append(f"{p} ({human_bytes(size)})")
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    log(f"removed {len(found)} leftover(s) of an interrupted run: " + ", ".join(sizes))
    return found


def agree(error: BaseException | None, what: str, path: str | Path, clean_up) -> None:
    """Collective: every rank tells whether its part of a write failed (`error`, raised while writing `path`); when
    one did, every rank stops with the same line after `clean_up()` (called on every rank; it returns what was
    removed and kept, e.g. "the partial .tmp-step-5 was removed and step-3 is untouched"). A StorageError when the
    filesystem refused the write; otherwise the failing rank re-raises its own error (a bug keeps its traceback)."""
    from coconut_scale import distributed as dist

    where = written_file(error, path)
    cause = cause_of(error, where) if error is not None else None
    report = None
    if error is not None:
        report = ((describe(cause, what, where), True) if cause is not None else
                  (f"{what} failed on rank {dist.rank()}: {type(error).__name__}: {error}", False))
    reports = [r for r in dist.gather_objects(report) if r]
    if not reports:
        return
    (message, named), = reports[:1]
    text = f"{message}; {clean_up()}"
    if named:
        raise StorageError(text)
    if error is not None and cause is None:
        raise error
    raise RuntimeError(text)
