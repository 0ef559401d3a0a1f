"""The token cache's layout on disk: JSON whose token ids are packed, so that a cached load stays quick at
GSM8K-Aug size (385k records, 34M token ids).

    {"version": 3,
     "source": "<the records file>",
     "records": [{"idx": 0, "answer": "...", "steps": ["...", ...]}, ...],      # file order
     "piece_lengths": "<base64>",   # per record: len(question_ids), len(ids) of each step, len(answer_ids)
     "token_ids": "<base64>"}       # every piece's ids back to back, in the same order

Both base64 strings hold little-endian int32. As JSON numbers, parsing the ids is most of a cached load
(json.loads of a GSM8K-Aug cache: ~4-6 s on 2 cores, against ~1 s to decode and slice the packed ids). The file
is still JSON of strings and numbers, which can only ever yield data: reading it runs no code, and whatever is
malformed in it (a truncated write, a planted file, another version's layout, lengths that do not add up) makes
`unpack` return None, so the caller tokenizes again.
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from itertools import accumulate, chain

from coconut_scale.data.gc_pause import gc_paused

# Bump when the cached layout or the tokenization recipe changes, so stale caches are never read.
CACHE_VERSION = 3
_INT32 = "i"  # a C int: 4 bytes on every platform CPython and torch build for
_RECORD_KEYS = frozenset({"idx", "answer", "steps"})


def _pack_ints(values: array) -> str:
    if sys.byteorder == "big":
        values = array(_INT32, values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def _unpack_ints(text) -> list[int] | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 4:
        return None
    values = array(_INT32)
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def pack(records: list[dict], source: str) -> dict:
    """The cache payload of tokenized records (tokenize_records' output)."""
    ids, lengths = array(_INT32), array(_INT32)
    texts = []
    for rec in records:
        if len(rec["steps_ids"]) != len(rec["steps"]):
            raise ValueError(f"record {rec['idx']}: {len(rec['steps_ids'])} tokenized steps for "
                             f"{len(rec['steps'])} step texts")
        for piece in (rec["question_ids"], *rec["steps_ids"], rec["answer_ids"]):
            ids.fromlist(piece)  # twice as fast as extend() on a list
            lengths.append(len(piece))
        texts.append({"idx": rec["idx"], "answer": rec["answer"], "steps": rec["steps"]})
    return {"version": CACHE_VERSION, "source": source, "records": texts,
            "piece_lengths": _pack_ints(lengths), "token_ids": _pack_ints(ids)}


def _records_if_valid(payload) -> list[dict] | None:
    if not (isinstance(payload, dict) and payload.get("version") == CACHE_VERSION):
        return None
    records = payload.get("records")
    if not isinstance(records, list):
        return None
    if not all(isinstance(r, dict) and r.keys() == _RECORD_KEYS and isinstance(r["steps"], list) for r in records):
        return None
    return records


def unpack(payload) -> list[dict] | None:
    """The tokenized records of a cache payload (equal to what tokenize_records returned when it was written),
    or None when the payload is not a complete cache of this version."""
    records = _records_if_valid(payload)
    if records is None:
        return None
    with gc_paused():  # millions of lists, all kept
        lengths = _unpack_ints(payload.get("piece_lengths"))
        ids = _unpack_ints(payload.get("token_ids"))
        if lengths is None or ids is None or len(lengths) != sum(len(r["steps"]) + 2 for r in records):
            return None
        if (lengths and min(lengths) < 0) or sum(lengths) != len(ids):
            return None
        ends = list(accumulate(lengths))
        pieces = [ids[start:end] for start, end in zip(chain((0,), ends), ends)]
        del ids, ends
        out, p = [], 0
        for rec in records:
            n = len(rec["steps"])
            out.append({
                "idx": rec["idx"],
                "question_ids": pieces[p],
                "steps_ids": pieces[p + 1:p + 1 + n],
                "answer_ids": pieces[p + 1 + n],
                "answer": rec["answer"],
                "steps": rec["steps"],
            })
            p += n + 2
    return out
