"""Atomic file writes: written beside the target, then renamed, so a reader (or a run that crashed mid-write)
never sees a half-written file. The one place the harness writes JSON, JSON Lines and text files."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


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
