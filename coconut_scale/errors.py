"""User errors: bad input reported as one line that names the file, key or record and the value.

Every wing raises a subclass of `UserError` for what the user can fix (a recipe key, an override, a data record,
a checkpoint path, a flag). Each command's entry point runs through `run_cli`, which prints such an error as a
single `error: ...` line and exits with code 2; anything else is a bug and keeps its traceback.
`COCONUT_DEBUG=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Something the user can fix; the message names where (file, key, record) and the bad value."""


def one_line(message: object) -> str:
    """A message on one line: a list of problems ("...:\\n  - a\\n  - b") becomes "...: a; b"."""
    text = str(message).strip()
    text = re.sub(r":?\s*\n\s*-\s+", lambda m: ": " if m.group(0).startswith(":") else "; ", text, count=1)
    text = re.sub(r"\s*\n\s*-\s+", "; ", text)
    return re.sub(r"\s*\n\s*", " ", text)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's main; a UserError exits with code 2 and one readable line instead of a traceback."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("COCONUT_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
