"""The manifest digest: xxh3_128 over the digests of fixed-size pieces hashed in parallel. Every piece counts (a
flipped byte in any piece, a truncation, a swap of two pieces change it), threads do not change it, and the
streamed digests of earlier manifests (sha256, plain xxh3_128) are still what verify reads."""

import hashlib
import random

import xxhash

from coconut_scale import file_manifest


def test_every_piece_counts_and_threads_do_not_change_the_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(file_manifest, "PIECE", 4096)
    data = random.Random(0).randbytes(4 * 4096) + b"tail"  # four full pieces and a short one
    path = tmp_path / "blob"
    path.write_bytes(data)
    monkeypatch.setattr(file_manifest, "_threads", lambda: 1)
    one = file_manifest.file_digest(path)
    monkeypatch.setattr(file_manifest, "_threads", lambda: 4)
    assert file_manifest.file_digest(path) == one
    pieces = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    assert one == xxhash.xxh3_128(b"".join(xxhash.xxh3_128(p).digest() for p in pieces)).hexdigest()
    for changed in (data[:5000] + bytes([data[5000] ^ 1]) + data[5001:], data[:-1], data[4096:8192] + data[:4096]
                    + data[8192:]):
        path.write_bytes(changed)
        assert file_manifest.file_digest(path) != one
    path.write_bytes(b"")
    assert file_manifest.file_digest(path) == xxhash.xxh3_128(xxhash.xxh3_128(b"").digest()).hexdigest()


def test_the_streamed_digests_of_earlier_manifests(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100_000)
    assert file_manifest.file_digest(path, "sha256") == hashlib.sha256(b"x" * 100_000).hexdigest()
    assert file_manifest.file_digest(path, "xxh3_128") == xxhash.xxh3_128(b"x" * 100_000).hexdigest()


def test_shares_are_balanced_by_size_and_the_same_on_every_rank():
    sizes = {f"ds/zero_pp_rank_{r}_mp_rank_00_{kind}.pt": (12 if kind == "optim_states" else 1)
             for r in range(8) for kind in ("model_states", "optim_states")}
    shares = file_manifest.balanced_shares(sizes, 8)
    assert sorted(n for s in shares for n in s) == sorted(sizes)
    assert [sum(sizes[n] for n in s) for s in shares] == [13] * 8  # one optimizer shard each
    assert shares == file_manifest.balanced_shares(dict(reversed(list(sizes.items()))), 8)
