"""Manifests: the size and content digest of every file of a directory (a checkpoint, an HF export), written last and
checked before anything in the directory is trusted.

    manifest.json = {"format": 2, "digest": "xxh3_128-256MiB", "coconut_scale": "<version that wrote it>",
                     "files": {"<relative path>": {"size": N, "xxh3_128-256MiB": "<hex>"}, ...}}

The digest is there to catch what storage and crashes do to files: a truncated or torn write, a file rewritten by
another run, flipped bits. xxh3_128 (the xxhash package, already a dependency of `datasets`) streams at about 7 GB/s
per core from the page cache against sha256's 1.4 GB/s (benchmarks/bench_digest.py), and a random change escapes it
with probability 2^-128, as it escapes sha256's. A file's digest is the xxh3_128 of the xxh3_128 digests of its
256 MiB pieces, hashed by a thread each, so one large shard (ZeRO-0/1/2 write the whole model into one file) is
hashed on all the cores the rank has. What neither digest can do is stop a deliberate edit: whoever can rewrite a
file can rewrite the manifest beside it. Manifests of format 1 (sha256) are still verified.

Hashing is split across ranks by size (largest file first, to the least loaded rank), so the busiest rank hashes
about total / world size bytes instead of every other file of a sorted listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coconut_scale.atomic_files import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 2
DIGEST = "xxh3_128-256MiB"
PIECE = 256 << 20  # bytes per independently hashed piece of a file
_CHUNK = 1 << 24  # 16 MiB reads: large enough that the syscalls cost nothing, small enough for any host


def coconut_scale_version() -> str:
    """This package's version (the one in pyproject.toml), as recorded in manifests, checkpoints and exports."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coconut_scale")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        import re

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


def _threads() -> int:
    """Hashing threads for this process: its cores shared with the other ranks of its node, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _hash_range(fd: int, offset: int, length: int, algorithm: str):
    h = _hasher(algorithm)
    buffer = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[: min(len(buffer), end - offset)]], offset)
        if n == 0:  # the file shrank while being read: its size check fails anyway
            break
        h.update(view[:n])
        offset += n
    return h


def file_digest(path: str | Path, algorithm: str = DIGEST) -> str:
    """The hex digest of a file's bytes, read in chunks (never the whole file in memory). DIGEST: pieces hashed in
    parallel threads; other names (sha256, xxh3_128): one stream."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if algorithm != DIGEST:
            return _hash_range(fd, 0, size, algorithm).hexdigest()
        offsets = range(0, max(size, 1), PIECE)
        with ThreadPoolExecutor(min(_threads(), len(offsets))) as pool:
            pieces = list(pool.map(lambda o: _hash_range(fd, o, min(PIECE, size - o), "xxh3_128").digest(), offsets))
    finally:
        os.close(fd)
    top = _hasher("xxh3_128")
    for piece in pieces:
        top.update(piece)
    return top.hexdigest()


def balanced_shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """`n` lists of names whose sizes add up as evenly as greedy allows (largest first, to the least loaded);
    the same on every rank for the same input."""
    shares: list[list[str]] = [[] for _ in range(n)]
    loads = [0] * n
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(n), key=lambda j: (loads[j], j))
        shares[i].append(name)
        loads[i] += sizes[name]
    return shares


def listing(root: Path) -> dict[str, int]:
    """{relative path: size} of every file under `root` but the manifest itself."""
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def entries(root: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (root / n).stat().st_size, DIGEST: file_digest(root / n)} for n in names}


def write_manifest(root: Path, files: dict[str, dict]) -> Path:
    return write_json_atomic(Path(root) / MANIFEST, {"format": FORMAT, "digest": DIGEST,
                                                     "coconut_scale": coconut_scale_version(), "files": files})


def write_manifest_here(root: str | Path) -> Path:
    """One process: hash every file of `root` and write its manifest (exports, universal copies)."""
    root = Path(root)
    return write_manifest(root, entries(root, list(listing(root))))


class ManifestProblem(Exception):
    """The manifest itself is missing or unreadable; the message names it."""


def read_manifest(root: str | Path) -> dict:
    """The manifest of `root`, checked for shape: {"digest": name, "files": {name: {"size", <digest>}}, ...}."""
    path = Path(root) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestProblem(f"{path} is missing (a save that did not finish, or an older coconut_scale)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestProblem(f"{path} cannot be read: {e}") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ManifestProblem(f"{path} cannot be read: 'files' is not a mapping of file entries")
    algorithm = raw.get("digest", "sha256")  # format 1 named no digest: it was sha256
    if algorithm not in (DIGEST, "xxh3_128") and algorithm not in hashlib.algorithms_available:
        raise ManifestProblem(f"{path}: unknown digest {algorithm!r}")
    return {**raw, "digest": algorithm}


def file_problem(root: Path, name: str, entry: dict, algorithm: str) -> str | None:
    """None when `root/name` has the size and digest of its manifest entry, else what is wrong, naming the file."""
    path = Path(root) / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{path} has {size} bytes, its manifest says {entry.get('size')} (truncated or rewritten)"
    if file_digest(path, algorithm) != entry.get(algorithm):
        return f"{path} does not match the {algorithm} digest in its manifest (damaged)"
    return None


def verify_here(root: str | Path) -> str | None:
    """One process: None when every file the manifest of `root` lists is whole, else the first problem."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ManifestProblem as e:
        return str(e)
    for name in sorted(manifest["files"]):
        problem = file_problem(root, name, manifest["files"][name], manifest["digest"])
        if problem:
            return problem
    return None
