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

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from coconut_scale import distributed as dist
from coconut_scale import file_manifest as manifest
from coconut_scale.atomic_files import AtomicDir, atomic_dir, write_json_atomic, write_text_atomic
from coconut_scale.errors import UserError
from coconut_scale.train import storage

STEP_DIR = re.compile(r"^step-(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # written next to DS_TAG by coconut_scale.universal, for another world size
LOOP_STATE = "loop_state.json"
MANIFEST = manifest.MANIFEST
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


def _sizes(root: Path) -> dict[str, int]:
    """Rank 0's {file: size} under `root` (the manifest left out), the same on every rank (collective)."""
    return dist.gather_objects(manifest.listing(root) if dist.is_main() else None)[0]


def write_manifest(root: Path) -> None:
    """Collective: `root/manifest.json` with every file's size and digest, read back from disk, each rank hashing a
    share of equal size (file_manifest.balanced_shares)."""
    mine = manifest.entries(root, manifest.balanced_shares(_sizes(root), dist.world_size())[dist.rank()])
    files = {name: entry for share in dist.gather_objects(mine) for name, entry in share.items()}
    if dist.is_main():
        manifest.write_manifest(root, dict(sorted(files.items())))


def verify_manifest(root: Path) -> str | None:
    """Collective: None when every file `root/manifest.json` lists is there with its size and digest, else the
    first problem, naming the file. Each rank checks a share; every rank gets the same answer."""
    problem, listed = None, {"files": {}, "digest": manifest.DIGEST}
    try:
        listed = manifest.read_manifest(root)
    except manifest.ManifestProblem as e:
        problem = str(e)
    files = listed["files"]
    sizes = {n: e.get("size") if isinstance(e.get("size"), int) else 0 for n, e in files.items()}
    share = manifest.balanced_shares(sizes, dist.world_size())[dist.rank()]
    mine = [p for n in sorted(share) if (p := manifest.file_problem(root, n, files[n], listed["digest"]))]
    found = sorted(p for share in dist.gather_objects(mine) for p in share)  # every rank joins, whatever it found
    return problem or (found[0] if found else None)


def _raise_first(failures: list[tuple[str, BaseException]]) -> None:
    if failures:
        raise failures[0][1]


def checkpoint_bytes(path: Path) -> int | None:
    """What a checkpoint takes on disk, from its manifest (None when it cannot be read)."""
    try:
        return sum(int(e.get("size", 0)) for e in manifest.read_manifest(path)["files"].values())
    except (manifest.ManifestProblem, TypeError, ValueError):
        return None


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; a missing or unreadable one is named."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2, expected_bytes: int | None = None):
        self.root = Path(root)
        self.keep_last = max(int(keep_last), 1)
        self.expected_bytes = expected_bytes  # of a checkpoint before the first exists (train/save_cost.py)
        self._verified: set[Path] = set()  # checked against their manifests by this process

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, strategy, loop_state: dict, side_files: dict[str, str] | None = None, log=print) -> Path:
        """Collective: every rank must call it. Returns the final directory.

        A write the filesystem refuses, on any rank, stops every rank with one StorageError naming the file, the
        errno and the free space; the partial directory is removed and the previous checkpoint is untouched (older
        ones are pruned only after the new one is complete and verified)."""
        target = AtomicDir(self.root / f"step-{int(loop_state['global_step']):08d}")
        final, tmp = target.final, target.tmp
        previous = dist.gather_objects(self.latest() if dist.is_main() else None)[0]  # rank 0's, for the messages

        def begin():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # the run holds the lock: no other save is in progress
                shutil.rmtree(stale, ignore_errors=True)
            self._warn_when_short_of_space(previous, log)
            target.begin()

        self._together(begin if dist.is_main() else None, target, previous, self.root)
        failures = strategy.save_checkpoint(tmp, DS_TAG) or []  # (file, error) of each shard write that failed
        self._together(lambda: _raise_first(failures), target, previous, failures[0][0] if failures else tmp)

        def own_files():
            write_json_atomic(tmp / f"rng_rank{dist.rank()}.json", rng_state())
            if dist.is_main():
                write_json_atomic(tmp / LOOP_STATE, {**loop_state, "world_size": dist.world_size()})
                for filename, text in (side_files or {}).items():
                    write_text_atomic(tmp / filename, text)

        self._together(own_files, target, previous, tmp)
        # Read back from disk: the new checkpoint is verified before an older one goes.
        share, mine = manifest.balanced_shares(_sizes(tmp), dist.world_size())[dist.rank()], {}
        self._together(lambda: mine.update(manifest.entries(tmp, share)), target, previous, tmp)
        files = dict(sorted((n, e) for part in dist.gather_objects(mine) for n, e in part.items()))
        self._together((lambda: manifest.write_manifest(tmp, files)) if dist.is_main() else None, target, previous,
                       tmp / MANIFEST)
        self._together(target.commit if dist.is_main() else None, target, previous, final)
        if dist.is_main():
            older = [p for p in self.complete() if p != final]
            for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
        self._verified.add(final)
        dist.barrier()
        return final

    def _together(self, write, target: AtomicDir, previous: Path | None, path: Path) -> None:
        """Collective: run `write` (None: nothing on this rank; never a collective itself), then agree across ranks
        on whether a write failed (storage.agree): then every rank stops with the same line, after rank 0 removed
        the partial directory."""
        error = None
        try:
            if write is not None:
                write()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            error = e

        def clean_up() -> str:
            if dist.is_main():
                target.abort()
            dist.barrier()
            kept = f"the previous checkpoint {previous} is untouched" if previous else "there is no earlier checkpoint"
            return f"the partial {target.tmp.name} was removed and {kept}"

        storage.agree(error, "checkpoint save", path, clean_up)

    def _warn_when_short_of_space(self, previous: Path | None, log) -> None:
        """A line when the filesystem has less free space than the last checkpoint took (or, for the first one,
        the estimate given to the manager)."""
        expected = checkpoint_bytes(previous) if previous is not None else self.expected_bytes
        free = storage.free_bytes(self.root)
        if expected and free is not None and free < expected:
            log(f"warning: {storage.human_bytes(free)} free under {self.root}, less than the "
                f"{storage.human_bytes(expected)} a checkpoint is expected to take "
                f"({'the size of ' + previous.name if previous else 'estimated from the model'}): this save may fail")

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
