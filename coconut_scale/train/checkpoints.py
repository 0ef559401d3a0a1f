"""Resumable checkpoints that a crash can never leave looking valid: the one owner of the on-disk layout.

Layout under `<output_dir>/checkpoints/`:
    step-00000120/          complete checkpoint: DeepSpeed tag "ds" (shards), loop_state.json (TrainState),
                            rng_rank<r>.json (every RNG of rank r), the resolved recipe, the batch table
    step-00000120/ds_universal/   written by `coconut_scale.universal`, loadable at any world size
    .tmp-step-00000140/     a save in progress; ignored, removed by the next save
    damaged-step-00000160/  a checkpoint that failed verification on resume, moved aside (never pruned)
A checkpoint is written under its .tmp name by every rank, then renamed by rank 0 once all ranks are done.
The rename is atomic, so any `step-*` directory is complete. Last before the rename, rank 0 writes
manifest.json: every file's size and sha256, read back from disk once every rank's files exist (the hashing is
split across the ranks). Resume verifies the newest checkpoint against it and falls back to the newest intact
one, saying which file failed; a damaged one is moved aside, so that pruning (keep_last) never keeps it in
place of an intact one. Pruning always keeps the checkpoint just written (and verified).

The harness's own files are JSON, so reading them back can never run code. DeepSpeed's shards are its own
pickles: resume only checkpoints you trust, as with every PyTorch tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from coconut_scale import distributed as dist
from coconut_scale.atomic_files import AtomicDir, atomic_dir, write_json_atomic
from coconut_scale.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # written next to DS_TAG by coconut_scale.universal, for another world size
LOOP_STATE = "loop_state.json"
MANIFEST = "manifest.json"
DAMAGED_PREFIX = "damaged-"


class CheckpointError(UserError):
    """A checkpoint on disk that is incomplete or damaged; the message names the file."""


def rng_state() -> dict:
    """Every RNG of this process as plain JSON values (python's, numpy's, torch's CPU and CUDA generators)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(root: Path) -> list[str]:
    """Rank 0's sorted list of the files under `root` (relative paths), the same on every rank (collective)."""
    names = None
    if dist.is_main():
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return dist.gather_objects(names)[0]


def _file_problem(root: Path, name: str, expected: dict) -> str | None:
    path = root / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path} has {size} bytes, its manifest says {expected.get('size')} (truncated or rewritten)"
    if _sha256(path) != expected.get("sha256"):
        return f"{path} does not match the sha256 in its manifest (damaged)"
    return None


def write_manifest(root: Path) -> None:
    """Collective: `root/manifest.json` with every file's size and sha256, each rank hashing a share of them."""
    names = _listing(root)
    mine = {n: {"size": (root / n).stat().st_size, "sha256": _sha256(root / n)}
            for n in names[dist.rank()::dist.world_size()]}
    files = {name: entry for share in dist.gather_objects(mine) for name, entry in share.items()}
    if dist.is_main():
        write_json_atomic(root / MANIFEST, {"format": 1, "files": files})


def verify_manifest(root: Path) -> str | None:
    """Collective: None when every file `root/manifest.json` lists is there with its size and sha256, else the
    first problem, naming the file. Each rank checks a share; every rank gets the same answer."""
    manifest = root / MANIFEST
    problem, files = None, {}
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("'files' is not a mapping of file entries")
    except FileNotFoundError:
        problem = f"{manifest} is missing (a save that did not finish, or an older coconut_scale)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{manifest} cannot be read: {e}"
    names = sorted(files) if problem is None else []
    mine = [p for n in names[dist.rank()::dist.world_size()] if (p := _file_problem(root, n, files[n]))]
    found = [p for share in dist.gather_objects(mine) for p in share]  # every rank joins, whatever it found
    return problem or (found[0] if found else None)


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; a missing or unreadable one is named."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(int(keep_last), 1)
        self._verified: set[Path] = set()  # checked against their manifests by this process

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, strategy, loop_state: dict, side_files: dict[str, str] | None = None) -> Path:
        """Collective: every rank must call it. Returns the final directory."""
        target = AtomicDir(self.root / f"step-{int(loop_state['global_step']):08d}")
        final, tmp = target.final, target.tmp
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # same step saved twice (epoch end right after a periodic save)
                shutil.rmtree(final)
            target.begin()
        dist.barrier()
        strategy.save_checkpoint(tmp, DS_TAG)
        write_json_atomic(tmp / f"rng_rank{dist.rank()}.json", rng_state())
        dist.barrier()
        if dist.is_main():
            write_json_atomic(tmp / LOOP_STATE, {**loop_state, "world_size": dist.world_size()})
            for filename, text in (side_files or {}).items():
                (tmp / filename).write_text(text)
        dist.barrier()
        write_manifest(tmp)  # read back from disk: the new checkpoint is verified before an older one goes
        if dist.is_main():
            target.commit()
            older = [p for p in self.complete() if p != final]
            for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
        self._verified.add(final)
        dist.barrier()
        return final

    def verify(self, path: Path, universal: bool = False) -> str | None:
        """Collective: None when `path` (and with `universal` its universal copy) matches its manifest, else the
        problem, naming the file."""
        path = Path(path)
        problem = None if path in self._verified else verify_manifest(path)
        if problem is None:
            self._verified.add(path)
            if universal:
                problem = verify_manifest(path / UNIVERSAL_TAG)
        return problem

    def resume_point(self, log=print) -> Path | None:
        """Collective: the newest checkpoint that verifies, None when there is none at all. Each newer one that
        fails is reported in one line naming the file, then moved aside (damaged-step-*) so that it is never
        mistaken for the newest again. When checkpoints exist but none verifies, the run stops rather than
        start over from scratch (and overwrite their exports)."""
        names = dist.gather_objects([p.name for p in self.complete()])[0]  # rank 0's view, on every rank
        damaged = []
        for name in reversed(names):
            path = self.root / name
            problem = self.verify(path)
            if problem is None:
                if dist.is_main():
                    for bad in damaged:
                        target = bad.with_name(DAMAGED_PREFIX + bad.name)
                        if target.exists():  # damaged twice at the same step: keep both
                            target = target.with_name(f"{target.name}-{os.getpid()}")
                        os.rename(bad, target)
                dist.barrier()
                return path
            log(f"checkpoint {path} skipped: {problem}; it is moved aside ({DAMAGED_PREFIX}{name}) once an "
                f"older one verifies")
            damaged.append(path)
        if damaged:
            raise CheckpointError(f"no intact checkpoint under {self.root}: all {len(damaged)} failed verification "
                                  f"(see above). Move them away to start this run from scratch.")
        return None

    @staticmethod
    def saved_world_size(path: Path) -> int | None:
        return read_json(Path(path) / LOOP_STATE).get("world_size")

    def needs_universal(self, path: Path, world_size: int) -> bool:
        """True when `path` was written at another world size; then its universal copy must exist."""
        saved = self.saved_world_size(path)
        if saved is None or saved == world_size:
            return False
        if not (path / UNIVERSAL_TAG).is_dir():
            raise UserError(
                f"checkpoint {path} was written by {saved} ranks and this run has {world_size}; ZeRO shards only "
                f"load at the world size that wrote them. Convert it once, then re-run this command: "
                f"python -m coconut_scale.universal {path}")
        return True

    def load(self, strategy, path: Path, universal: bool = False) -> dict:
        """The loop state of `path`, after loading weights, optimizer, schedule and this rank's RNG into place.
        `universal`: the world-size-free copy (the engine must be built with `"checkpoint": {"load_universal": true}`).
        Verified against its manifest first (once per process: resume_point already did it)."""
        path = Path(path)
        problem = self.verify(path, universal)
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
        tag = UNIVERSAL_TAG if universal else DS_TAG
        try:
            strategy.load_checkpoint(path, tag)
        except Exception as e:  # DeepSpeed's own errors (torch.load of a shard) do not say which checkpoint
            raise CheckpointError(f"checkpoint {path / tag} could not be loaded by DeepSpeed: "
                                  f"{type(e).__name__}: {e}") from e
        rng_file = path / f"rng_rank{dist.rank()}.json"
        if rng_file.exists():  # absent when resuming at another world size
            set_rng_state(read_json(rng_file))
        return read_json(path / LOOP_STATE)

    @staticmethod
    def step_dir_of(path: str | Path) -> Path:
        """A checkpoint named by the user: a step directory itself, or a run's (or checkpoints/) newest one."""
        path = Path(path)
        if STEP_DIR.match(path.name):
            if not (path / DS_TAG).is_dir():
                raise UserError(f"{path} has no DeepSpeed checkpoint ({DS_TAG}/); is it a coconut_scale checkpoint?")
            return path
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = CheckpointManager(root).latest()
        if latest is None:
            raise UserError(f"no complete checkpoint (step-NNNNNNNN/) under {root}")
        return latest

    @staticmethod
    def write_universal(step_dir: Path, workers: int = 2) -> Path:
        """`step_dir/ds_universal`, written atomically (a crash leaves no half-converted copy that looks valid)."""
        from coconut_scale.train.strategy import convert_to_universal

        final = step_dir / UNIVERSAL_TAG
        if not final.is_dir():
            with atomic_dir(final) as tmp:
                convert_to_universal(step_dir / DS_TAG, tmp, workers)
                write_manifest(tmp)
        return final
