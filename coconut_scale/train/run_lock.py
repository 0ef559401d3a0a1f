"""One run per output_dir: rank 0 holds an exclusive lock on `<output_dir>/.run.lock` for the run's lifetime.

The lock is `flock` (released by the kernel when its holder dies, kill -9 included); the file records the holder
(host, pid, start time), so a second run stops at once naming it. flock excludes runs on other nodes only where the
shared filesystem makes it cluster-wide (NFS, Lustre mounted with `flock`, CephFS); where locks are node-local
(Lustre's `localflock`, BeeGFS without global locks, some FUSE mounts) two nodes can both take it: give every run
its own output_dir there (README, "One run per output_dir"). A file that still names a holder while nobody
holds the lock is what a killed run leaves behind: it is taken over, with a line saying so. On a filesystem
without flock (some Lustre and NFS mounts refuse it) the recorded pid decides: a live one, or one on another
host that cannot be checked from here, refuses; a dead pid on this host is stale and taken over.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from coconut_scale.errors import UserError

LOCK_FILE = ".run.lock"


class RunLockError(UserError):
    """Another run holds this output_dir."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {when})"


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's pid runs on this host; None when it was on another host (cannot tell from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True  # someone else's live process, or a record we cannot read: not provably stale
    return True


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        self.created = False

    def _holder(self, fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?"}

    def acquire(self, log=print) -> None:
        """Take the lock or raise RunLockError naming its holder. Call before writing anything in output_dir."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()  # a refused run removes only a lock file it created
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                break
            if self._still_the_file(fd):
                break
            os.close(fd)  # its holder removed the file between our open and our flock (a refused run): again
        self._take(fd, log)

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int, log) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held already when we got here: flock is idempotent
            locked = True
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunLockError(f"output_dir {self.path.parent} is in use by another run: {_describe(holder)} holds "
                               f"{self.path}. Wait for it to end, stop it, or use another output_dir") from None
        except OSError:
            locked = False  # no flock on this filesystem: the recorded pid decides below
        previous = self._holder(fd)
        if previous and not locked and _alive_here(previous) is not False:
            os.close(fd)
            raise RunLockError(f"output_dir {self.path.parent} is in use by another run: {_describe(previous)} is "
                               f"recorded in {self.path} (this filesystem has no flock, so only a dead pid on this "
                               f"host counts as stale). Wait for it to end, or delete the file if it is gone")
        if previous:
            log(f"taking over the stale run lock {self.path} of {_describe(previous)}: that run is gone")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)  # also after an error; a kill -9 leaves the record, taken over next time

    def release(self, remove: bool = False) -> None:
        """Release the lock. `remove`: delete the lock file too (a run refused before it wrote anything leaves
        output_dir as it found it); safe while others wait, since a waiter checks that it locked the file that is
        still at the path."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self._fd, 0)  # an empty file: a later run sees a clean end, not a stale lock
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
