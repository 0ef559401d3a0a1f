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
import os
import pickle
import tempfile
from pathlib import Path

from coconut_scale.data.records import load_records

logger = logging.getLogger(__name__)

# Bump when the cached layout or the tokenization recipe changes, so stale caches are never read.
CACHE_VERSION = 1


def tokenize_record(record: dict, tokenizer) -> dict:
    """One record -> {"question_ids", "steps_ids" (list of lists), "answer_ids"} (official recipe)."""
    return {
        "question_ids": tokenizer.encode(record["question"] + "\n", add_special_tokens=True),
        "steps_ids": [tokenizer.encode(s + "\n", add_special_tokens=False) for s in record["steps"]],
        "answer_ids": tokenizer.encode("### " + record["answer"], add_special_tokens=False)
        + [tokenizer.eos_token_id],
    }


def _batch_encode(tokenizer, texts: list[str], add_special_tokens: bool, chunk: int = 4096) -> list[list[int]]:
    # One batched call per chunk instead of one encode() per text: same ids (encode is a batch of one), but a
    # fast tokenizer then runs in Rust over many texts, an order of magnitude quicker on 400k GSM8K records.
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(texts[i:i + chunk], add_special_tokens=add_special_tokens)["input_ids"]
        out.extend(list(ids) for ids in enc)
    return out


def tokenize_records(records: list[dict], tokenizer) -> list[dict]:
    """All records, batched; each result also keeps "idx" (position in the file) and the answer/steps text,
    which evaluation compares against."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; Coconut answers end with EOS")
    questions = _batch_encode(tokenizer, [r["question"] + "\n" for r in records], True)
    flat_steps = _batch_encode(tokenizer, [s + "\n" for r in records for s in r["steps"]], False)
    answers = _batch_encode(tokenizer, ["### " + r["answer"] for r in records], False)
    out, pos = [], 0
    for idx, (rec, q, a) in enumerate(zip(records, questions, answers)):
        n = len(rec["steps"])
        out.append({
            "idx": idx,
            "question_ids": q,
            "steps_ids": flat_steps[pos:pos + n],
            "answer_ids": a + [tokenizer.eos_token_id],
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


def _write_atomic(obj, target: Path) -> None:
    # Write to a temp file in the same directory, then rename: readers never see a half-written cache, and two
    # writers racing (e.g. two jobs) each replace it with a complete file.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(target: Path) -> list[dict] | None:
    try:
        with open(target, "rb") as f:
            payload = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError):
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return None
    return payload["records"]


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
    target = Path(cache_dir) / f"{path.stem}-{cache_key(path, tokenizer)}.pkl"
    distributed, rank = _dist_info()
    tokenized = None
    if rank == 0:
        tokenized = _read_cache(target)
        if tokenized is None:
            tokenized = _tokenize_file(path, tokenizer)
            _write_atomic({"version": CACHE_VERSION, "source": str(path), "records": tokenized}, target)
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
    step_lens = [len(s) for s in tok_rec["steps_ids"]]
    fixed = len(tok_rec["question_ids"]) + 2 + len(tok_rec["answer_ids"])
    return fixed + max(c_thought * k + sum(step_lens[k:]) for k in range(max_latent_stage + 1))


def load_tokenized(path: str | Path, tokenizer, max_seq_len: int | None = None, cache_dir: str | Path | None = None,
                   c_thought: int = 1, max_latent_stage: int = 0) -> tuple[list[dict], int]:
    """Tokenized records of `path` that fit `max_seq_len` at every stage, and how many were dropped.

    Each kept record has idx (its index in the file, so evaluation can find the gold answer), question_ids,
    steps_ids, answer_ids, answer and steps (text).
    """
    tokenized = get_tokenized(path, tokenizer, cache_dir)
    if max_seq_len is None:
        return tokenized, 0
    kept = [r for r in tokenized if longest_train_length(r, c_thought, max_latent_stage) <= max_seq_len]
    n_dropped = len(tokenized) - len(kept)
    if n_dropped:
        logger.warning("%s: dropped %d of %d records longer than max_seq_len=%d (c_thought=%d, max_latent_stage=%d)",
                       path, n_dropped, len(tokenized), max_seq_len, c_thought, max_latent_stage)
    else:
        logger.info("%s: all %d records fit max_seq_len=%d", path, len(tokenized), max_seq_len)
    return kept, n_dropped
