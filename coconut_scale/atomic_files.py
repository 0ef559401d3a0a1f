"""Atomic writes: written beside the target, then renamed, so a reader (or a run that crashed mid-write) never
sees a half-written file or directory. The one place the harness writes JSON, JSON Lines and text files, and the
one temporary-directory-then-rename writer (`AtomicDir`, `atomic_dir`) of checkpoints and exports, and of the
symbolic link that names one export by another's name (`atomic_symlink`: `hf/best` -> `stageK`). Everything
they leave has the permissions the umask gives a plain `open(path, "w")`, also the files that libraries write
into an `AtomicDir` with mode 0600 (safetensors' writer creates its files that way)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path` (creating its directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created here rather than with mkstemp, whose files are 0600 whatever the umask: exports and run files get
    # the usual permissions (0o666 & ~umask), as a plain open(path, "w") would give them. O_EXCL with a random
    # name keeps mkstemp's guarantee that no existing file is reused.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value):
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | Path, payload) -> Path:
    """Indented, key-sorted JSON; NaN/inf are refused (they are not JSON). fsync'd: loop state must be on disk
    before the checkpoint directory that holds it is renamed into place."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=_jsonable, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse to open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | Path) -> None:
    """Give every file under `root` 0o666 & ~umask (0o777 & ~umask for directories and executables), whatever mode
    its writer chose; links are left alone. Called on a complete directory before it is renamed into place."""
    mask = current_umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        wanted = (0o777 if path.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode != wanted:
            os.chmod(path, wanted)


def atomic_symlink(path: str | Path, target: str) -> Path:
    """Make `path` a symbolic link to `target` (relative to path's folder), replacing a link, a file or a directory
    there. A link or a file is replaced in one rename; a directory is first moved aside to `.tmp-<name>-old` (a
    leftover the next run removes), so a crash never leaves a half-removed directory under the final name."""
    path = Path(path)
    link = path.with_name(f".tmp-{path.name}-link")
    link.unlink(missing_ok=True)
    os.symlink(target, link)
    old = None
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".tmp-{path.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.replace(link, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)
    return path


class AtomicDir:
    """A directory written under `.tmp-<name>` beside its final path and renamed into place when complete.

    `begin()` clears a leftover of the same name and creates the temporary directory; `commit()` replaces the
    final directory (if any) by it; `abort()` removes it. A reader therefore finds either the old directory or the
    new one, never a mix; a crash leaves only the `.tmp-` directory, which the next `begin()` removes. Collective
    writers (every rank writing its shards into `tmp`) call begin and commit on one rank, with barriers between.
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{self.final.name}")

    def begin(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self) -> Path:
        honour_umask(self.tmp)
        fsync_dir(self.tmp)
        if self.final.is_symlink():  # a pointer to another directory (atomic_symlink): the link goes, not its target
            self.final.unlink()
        elif self.final.exists():
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into `tmp`; it becomes `out` when the block ends without an error and
    is removed when it raises (the previous `out`, if any, is untouched then)."""
    target = AtomicDir(final)
    tmp = target.begin()
    try:
        yield tmp
    except BaseException:
        target.abort()
        raise
    target.commit()
