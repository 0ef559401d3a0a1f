"""Tokenizing records exactly as the official Coconut code does, with an on-disk cache shared across ranks.

Pieces (official `get_dataset`):
    question_ids = encode(question + "\\n", add_special_tokens=True)      # BOS etc. if the tokenizer adds them
    steps_ids[i] = encode(steps[i] + "\\n", add_special_tokens=False)
    answer_ids   = encode("### " + answer, add_special_tokens=False) + [eos_token_id]
Tokenizing the pieces separately is what lets the curriculum drop steps by index; it is only faithful when the
concatenation equals tokenizing the whole text, which `check_concatenation` verifies (BPE merges across "\\n"
would break it; GPT-2-style pre-tokenizers never merge a newline with the next word).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from coconut_scale.atomic_files import atomic_write
from coconut_scale.data.gc_pause import gc_paused
from coconut_scale.data.records import DataFormatError, load_records
from coconut_scale.data.token_cache import CACHE_VERSION, pack, unpack

logger = logging.getLogger(__name__)



def tokenize_record(record: dict, tokenizer) -> dict:
    """One record -> {"question_ids", "steps_ids" (list of lists), "answer_ids"} (official recipe)."""
    return {
        "question_ids": tokenizer.encode(record["question"] + "\n", add_special_tokens=True),
        "steps_ids": [tokenizer.encode(s + "\n", add_special_tokens=False) for s in record["steps"]],
        "answer_ids": tokenizer.encode("### " + record["answer"], add_special_tokens=False)
        + [tokenizer.eos_token_id],
    }


def _direct_backend(tokenizer):
    """The Rust tokenizer behind `tokenizer` when encoding with it directly gives exactly
    `tokenizer(texts)["input_ids"]`, else None.

    A fast tokenizer's __call__ is the backend's encode_batch plus a Python object per text, a third of the time
    over GSM8K-Aug's 2.8M pieces. Before encoding, that __call__ switches the backend's truncation and padding off
    and sets its encode_special_tokens from split_special_tokens; the backend is used directly only when it is
    already in that state, and only under the stock batch-encoding code (a tokenizer class that overrides it may
    encode differently).
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    for method in ("__call__", "_call_one", "_encode_plus", "_batch_encode_plus"):
        if getattr(type(tokenizer), method, None) is not getattr(PreTrainedTokenizerFast, method, None):
            return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if getattr(backend, "encode_special_tokens", False) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _batch_encode(tokenizer, texts: list[str], add_special_tokens: bool, chunk: int = 4096) -> list[list[int]]:
    # One batched call per chunk instead of one encode() per text: same ids (encode is a batch of one), but a
    # fast tokenizer then runs in Rust over many texts, an order of magnitude quicker on 400k GSM8K records.
    backend = _direct_backend(tokenizer)
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        batch = texts[i:i + chunk]
        via_call = None
        if backend is None or i == 0:
            via_call = [list(ids) for ids in tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]]
        if backend is not None:
            direct = [e.ids for e in backend.encode_batch(batch, add_special_tokens=add_special_tokens)]
            if via_call is not None and direct != via_call:
                # The checks above make this unreachable for the stock classes; should a tokenizer still
                # differ, the ids of its own __call__ are the ones to train on.
                logger.warning("%s: encoding with its Rust backend differs from calling it; using the call",
                               getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
                backend = None
            else:
                via_call = direct
        out.extend(via_call)
    return out


def _encode_each(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """_batch_encode of every distinct text once (GSM8K-Aug's 385k answers have ~20k distinct values), each
    result a list of its own, so that no two records share a list."""
    distinct = list(dict.fromkeys(texts))
    ids_of = dict(zip(distinct, _batch_encode(tokenizer, distinct, add_special_tokens)))
    return [list(ids_of[t]) for t in texts]


def tokenize_records(records: list[dict], tokenizer) -> list[dict]:
    """All records, batched; each result also keeps "idx" (position in the file) and the answer/steps text,
    which evaluation compares against."""
    eos = tokenizer.eos_token_id  # a property that looks the token up on every access: read once
    if eos is None:
        raise ValueError("tokenizer has no eos_token; Coconut answers end with EOS")
    with gc_paused():
        questions = _encode_each(tokenizer, [r["question"] + "\n" for r in records], True)
        flat_steps = _encode_each(tokenizer, [s + "\n" for r in records for s in r["steps"]], False)
        answers = _encode_each(tokenizer, ["### " + r["answer"] for r in records], False)
        out, pos = [], 0
        for idx, (rec, q, a) in enumerate(zip(records, questions, answers)):
            n = len(rec["steps"])
            a.append(eos)
            out.append({
                "idx": idx,
                "question_ids": q,
                "steps_ids": flat_steps[pos:pos + n],
                "answer_ids": a,
                "answer": rec["answer"],
                "steps": list(rec["steps"]),
            })
            pos += n
    return out


def full_text_ids(record: dict, tokenizer) -> list[int]:
    """Tokenizing the whole training text at once (the reference the pieces must equal).

    Official check: question + "\\n" + "\\n".join(steps) + "\\n### " + answer. Written as "".join(s + "\\n")
    it is the same string when there are steps, and also right when there are none (the official form would
    then have a spurious blank line).
    """
    text = record["question"] + "\n" + "".join(s + "\n" for s in record["steps"]) + "### " + record["answer"]
    return tokenizer.encode(text, add_special_tokens=True) + [tokenizer.eos_token_id]


def check_concatenation(record: dict, tok_rec: dict, tokenizer) -> bool:
    pieces = tok_rec["question_ids"] + [t for s in tok_rec["steps_ids"] for t in s] + tok_rec["answer_ids"]
    return pieces == full_text_ids(record, tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer for the cache key: name, size, and a hash of vocabulary and special tokens
    (so adding the Coconut tokens, or a different pad/eos, gives a different key)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full serialized tokenizer covers merges, normalizer and post-processor (BOS insertion) too.
        h.update(backend.to_str().encode())
    return h.hexdigest()


def cache_key(path: str | Path, tokenizer) -> str:
    file_hash = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    h = hashlib.sha256()
    for part in (f"v{CACHE_VERSION}", file_hash, str(getattr(tokenizer, "name_or_path", "")),
                 str(len(tokenizer)), tokenizer_fingerprint(tokenizer)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cache_file(path: str | Path, tokenizer, cache_dir: str | Path) -> Path:
    """Where the tokenized records of `path` are cached for this tokenizer."""
    path = Path(path)
    return Path(cache_dir) / f"{path.stem}-{cache_key(path, tokenizer)}.json"


def _write_cache(payload: dict, target: Path) -> None:
    # Atomic: readers never see half a cache, and two racing writers each put a complete one in place.
    # json.dumps, not json.dump: dump streams through the pure-Python encoder, many times slower.
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(target, write)


def _read_cache(target: Path) -> list[dict] | None:
    """The cached records, or None when there is no usable cache; the caller then tokenizes again.

    The cache is JSON (layout: data/token_cache.py), which can only ever yield data: a planted or corrupted
    file (a pickle payload, a truncated write, another version's layout) is reported in one line naming it,
    and replaced.
    """
    if not target.exists():
        return None
    try:
        text = target.read_text(encoding="utf-8")
        with gc_paused():
            payload = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("%s: not a readable token cache (%s); tokenizing again", target, e)
        return None
    del text
    records = unpack(payload)
    if records is None:
        logger.warning("%s: not a version-%d token cache; tokenizing again", target, CACHE_VERSION)
    return records


def _dist_info() -> tuple[bool, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return False, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank()
    return False, 0


def _tokenize_file(path: Path, tokenizer) -> list[dict]:
    records = load_records(path)  # validates: a bad record fails here, naming file/record/field
    tokenized = tokenize_records(records, tokenizer)
    if records and not check_concatenation(records[0], tokenized[0], tokenizer):
        # The official code asserts this on the first record. We warn: the pieces are still what the official
        # code would train on, but the curriculum then differs subtly from tokenizing the full text.
        logger.warning("%s: tokenizing question/steps/answer separately differs from tokenizing the full text "
                       "(record 0) with tokenizer %s", path, getattr(tokenizer, "name_or_path", "?"))
    return tokenized


def get_tokenized(path: str | Path, tokenizer, cache_dir: str | Path | None = None) -> list[dict]:
    """All records of `path`, tokenized, through the cache when `cache_dir` is given.

    Under torch.distributed (initialized, world > 1) rank 0 tokenizes and writes the cache; the other ranks wait
    at a barrier and read it. A rank that cannot see the file afterwards (a cache dir that is not shared across
    nodes) tokenizes for itself: slower, never wrong.
    """
    path = Path(path)
    if cache_dir is None:
        return _tokenize_file(path, tokenizer)
    target = cache_file(path, tokenizer, cache_dir)
    distributed, rank = _dist_info()
    tokenized = None
    if rank == 0:
        tokenized = _read_cache(target)
        if tokenized is None:
            tokenized = _tokenize_file(path, tokenizer)
            _write_cache(pack(tokenized, str(path)), target)
            logger.info("tokenized %d records of %s into %s", len(tokenized), path, target)
        else:
            logger.info("read %d tokenized records of %s from cache %s", len(tokenized), path, target)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            tokenized = _read_cache(target)
            if tokenized is None:
                logger.warning("rank %d cannot read the tokenized cache %s; tokenizing locally", rank, target)
                tokenized = _tokenize_file(path, tokenizer)
    return tokenized


def longest_train_length(tok_rec: dict, c_thought: int, max_latent_stage: int) -> int:
    """Length of the longest training sequence any stage can build for this record.

    Stage k <= max_latent_stage has question + 2 markers + c_thought*k latents + steps[k:] + answer (the official
    code gives k latents even to records with fewer than k steps); later stages are no longer than stage
    max_latent_stage. Counting the markers and pad-to-max latents always makes this an upper bound for every
    mode and pad setting.
    """
    steps = tok_rec["steps_ids"]
    remaining = sum(map(len, steps))  # tokens of steps[k:], from k = 0 on
    longest = remaining
    for k in range(1, max_latent_stage + 1):
        if k <= len(steps):
            remaining -= len(steps[k - 1])
        longest = max(longest, c_thought * k + remaining)
    return len(tok_rec["question_ids"]) + 2 + len(tok_rec["answer_ids"]) + longest


def load_tokenized(path: str | Path, tokenizer, max_seq_len: int | None = None, cache_dir: str | Path | None = None,
                   c_thought: int = 1, max_latent_stage: int = 0, *, role: str | None = None) -> tuple[list[dict], int]:
    """Tokenized records of `path` that fit `max_seq_len` at every stage, and how many were dropped.

    Each kept record has idx (its index in the file, so evaluation can find the gold answer), question_ids,
    steps_ids, answer_ids, answer and steps (text). With `role` (e.g. "train", "validation"), a set left with
    no records is refused (DataFormatError naming the file, how many were dropped and their lengths): an empty
    training set has nothing to learn from, and an empty validation set would report a loss of 0.
    """
    tokenized = get_tokenized(path, tokenizer, cache_dir)
    if max_seq_len is None:
        kept, lengths = tokenized, []
    else:
        lengths = [longest_train_length(r, c_thought, max_latent_stage) for r in tokenized]
        kept = [r for r, n in zip(tokenized, lengths) if n <= max_seq_len]
    n_dropped = len(tokenized) - len(kept)
    if role is not None and not kept:
        raise DataFormatError(path, None, None, _empty_set_message(role, lengths, max_seq_len, c_thought,
                                                                   max_latent_stage))
    if n_dropped:
        logger.warning("%s: dropped %d of %d records longer than max_seq_len=%d (longest %d tokens; c_thought=%d, "
                       "max_latent_stage=%d)", path, n_dropped, len(tokenized), max_seq_len, max(lengths),
                       c_thought, max_latent_stage)
    elif max_seq_len is not None:
        logger.info("%s: all %d records fit max_seq_len=%d", path, len(tokenized), max_seq_len)
    return kept, n_dropped


def _empty_set_message(role: str, lengths: list[int], max_seq_len: int | None, c_thought: int,
                       max_latent_stage: int) -> str:
    if not lengths:
        return f"the {role} set has no records"
    return (f"the {role} set is empty: all {len(lengths)} records were dropped by data.max_seq_len={max_seq_len} "
            f"(their longest sequence over stages 0..{max_latent_stage} with c_thought={c_thought} is "
            f"{min(lengths)}..{max(lengths)} tokens); raise data.max_seq_len to at least {min(lengths)}")
