"""What a run's setup writes into output_dir (the BPE tokenizer, the token cache), held under
`output_dir/.tmp-setup/` until the whole setup succeeded, then moved into place; a refused or failed setup removes
it, and the run lock's file too, so output_dir is left as the run found it (or absent, when the run created it).

A refusal can come late in setup (every record dropped by data.max_seq_len, no full global batch, a changed data
file, a model that does not load); before this, such a run left a tokenizer trained on data it refused, which the
next run would have reused. Rank 0 writes; every rank reads the paths it gives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from coconut_scale import distributed as dist

STAGING = ".tmp-setup"


class StagedSetup:
    def __init__(self, output_dir: str | Path):
        self.out = Path(output_dir)
        self.root = self.out / STAGING
        self.existed = self.out.exists()  # decided before the run lock creates the directory

    def path(self, name: str) -> Path:
        """Where setup reads and writes `name`: the committed one when an earlier run left it, else the staged."""
        final = self.out / name
        return final if final.exists() else self.root / name

    def token_cache_dir(self, cache_dir: str | None, cache_file) -> Path:
        """The recipe's data.cache_dir as given (outside output_dir, shared by runs); else output_dir/token_cache
        when it already holds this file's cache (`cache_file(dir)` -> its path), else the staged one."""
        if cache_dir:
            return Path(cache_dir)
        final = self.out / "token_cache"
        return final if cache_file(final).exists() else self.root / "token_cache"

    def commit(self) -> None:
        """Rank 0: move what setup wrote into output_dir."""
        if not dist.is_main() or not self.root.is_dir():
            return
        for staged in sorted(self.root.iterdir()):
            final = self.out / staged.name
            if staged.is_dir() and final.is_dir():  # token_cache/: add the new files beside the others
                for f in staged.iterdir():
                    os.replace(f, final / f.name)
            elif not final.exists():
                os.rename(staged, final)
        shutil.rmtree(self.root, ignore_errors=True)

    def roll_back(self, lock) -> None:
        """Rank 0: remove what setup wrote, release the lock (removing its file when this run created it), and
        output_dir when this run created it and nothing else is left there."""
        if not dist.is_main():
            return
        shutil.rmtree(self.root, ignore_errors=True)
        if lock is not None:
            lock.release(remove=lock.created)
        if not self.existed:
            try:
                self.out.rmdir()
            except OSError:
                pass  # something else is there: left alone
