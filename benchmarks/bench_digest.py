"""Manifest hashing at scale: the throughput of each candidate digest on this machine (GB/s on one core, streamed
from a page-cached file as file_manifest.file_digest reads it), and what it means per save of each shipped recipe
at its declared world sizes (train/save_cost.py: checkpoint size, write time at an assumed bandwidth per node,
hashing split evenly across ranks).

    python benchmarks/bench_digest.py [--size-gb 1] [--out benchmarks/results/digest.json]

Candidates: hashlib's sha256 (the format-1 manifests), sha1, blake2b, md5; PyPI's xxhash (xxh3_128, xxh64; already
installed as a dependency of `datasets`) and blake3 when importable; then the manifest's own reader
(file_manifest.file_digest: xxh3_128 of 256 MiB pieces, one thread and this process's share of the cores). The
table gives each digest's share of the expected save time (write + hashing; the goal is under 5%).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coconut_scale import file_manifest  # noqa: E402


def _candidates() -> dict:
    out = {name: (lambda n=name: hashlib.new(n)) for name in ("sha256", "sha1", "blake2b", "md5")}
    try:
        import xxhash

        out["xxh3_128"], out["xxh64"] = xxhash.xxh3_128, xxhash.xxh64
    except ImportError:
        pass
    try:
        import blake3

        out["blake3 (1 thread)"] = blake3.blake3
        out["blake3 (all cores)"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    except ImportError:
        pass
    return out


def _throughput(path: Path, make, repeats: int = 3) -> float:
    best = float("inf")
    size = path.stat().st_size
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    for _ in range(repeats):
        h = make()
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                h.update(view[:n])
        h.hexdigest()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def recipe_table(gbps: dict[str, float]) -> list[dict]:
    from coconut_scale.config.recipe import load_recipe
    from coconut_scale.train.save_cost import checkpoint_bytes, save_seconds

    rows = []
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        size = checkpoint_bytes(recipe)
        for world in sorted(set(recipe.batch.world_sizes)):
            cost = save_seconds(recipe, world)
            per_rank = size / world
            rows.append({"recipe": path.stem, "world_size": world, "checkpoint_gb": size / 1e9,
                         "write_s": cost["write_s"],
                         **{f"hash_s_{d}": per_rank / (gbps[d] * 1e9) for d in ("sha256", "xxh3_128") if d in gbps}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "digest.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            for _ in range(int(args.size_gb * 1024 / 64)):
                f.write(os.urandom(64 << 20))
        gbps = {name: _throughput(path, make) for name, make in _candidates().items()}
        for threads in sorted({1, file_manifest._threads()}):  # the manifest's own reader
            file_manifest._threads = lambda n=threads: n
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                reference = file_manifest.file_digest(path)
                best = min(best, time.perf_counter() - start)
            gbps[f"{file_manifest.DIGEST} ({threads} thread{'s' if threads > 1 else ''})"] = \
                path.stat().st_size / best / 1e9
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores; {args.size_gb:g} GB page-cached file")
    for name, rate in sorted(gbps.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {rate:6.2f} GB/s")
    rows = recipe_table(gbps)
    print("\n| recipe | world size | checkpoint | write | sha256 per rank | xxh3_128 per rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = {d: r[f"hash_s_{d}"] / (r["write_s"] + r[f"hash_s_{d}"]) for d in ("sha256", "xxh3_128")}
        print(f"| {r['recipe']} | {r['world_size']} | {r['checkpoint_gb']:.1f} GB | {r['write_s']:.1f} s | "
              f"{r['hash_s_sha256']:.1f} s ({share['sha256']:.0%}) | {r['hash_s_xxh3_128']:.2f} s "
              f"({share['xxh3_128']:.0%}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gbps": gbps, "load_average": os.getloadavg(), "digest_of_blob": reference,
                                          "recipes": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
