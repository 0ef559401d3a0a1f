"""data/generate.py (the recipe's data.generate) and data/bpe.py (the train-bpe:N tokenizer)."""

import pytest

from coconut_scale.config.recipe import RecipeError
from coconut_scale.data.bpe import bpe_corpus, train_bpe_tokenizer
from coconut_scale.data.generate import generate_missing
from coconut_scale.data.prosqa_synthetic import generate_splits
from coconut_scale.data.records import load_records

DEMO = {"kind": "prosqa_synthetic", "n_train": 12, "n_val": 5, "seed": 3, "n_concepts": 4, "min_depth": 1,
        "max_depth": 2, "extra_edges": 0.0, "n_names": 24}


def test_generate_missing_writes_disjoint_splits_once(tmp_path):
    train, val = tmp_path / "gen" / "train.json", tmp_path / "gen" / "val.json"
    logged = []
    assert generate_missing(DEMO, train, val, log=logged.append) is True
    tr, va = load_records(train), load_records(val)
    assert (len(tr), len(va)) == (12, 5)
    assert not {r["question"] for r in tr} & {r["question"] for r in va}
    options = {k: v for k, v in DEMO.items() if k not in ("kind", "n_train", "n_val", "seed")}
    assert tr == generate_splits({"train": 12, "val": 5}, seed=3, **options)["train"]  # what the recipe asks for
    assert logged == [f"generated 12 ProsQA-style records -> {train}", f"generated 5 ProsQA-style records -> {val}"]
    before = train.read_text()
    assert generate_missing({**DEMO, "seed": 4}, train, val, log=logged.append) is False  # both exist: kept
    assert train.read_text() == before and len(logged) == 2


def test_generate_missing_regenerates_both_when_one_is_missing(tmp_path):
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    generate_missing(DEMO, train, val, log=lambda _: None)
    val.unlink()
    train.write_text("[]")
    assert generate_missing(DEMO, train, val, log=lambda _: None) is True
    assert len(load_records(train)) == 12 and len(load_records(val)) == 5


def test_nothing_to_generate_without_a_config(tmp_path):
    assert generate_missing(None, tmp_path / "a.json", tmp_path / "b.json") is False
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("cfg, msg", [
    ({"kind": "gsm8k"}, "data.generate.kind='gsm8k': only prosqa_synthetic can be generated"),
    ({**DEMO, "n_concpets": 4}, "data.generate.n_concpets: not an option of prosqa_synthetic"),
    ({**DEMO, "n_train": 0}, "data.generate.n_train: expected an integer >= 1, got 0"),
    ({**DEMO, "n_val": "5"}, "data.generate.n_val: expected an integer >= 1, got '5'"),
    ({**DEMO, "seed": -1}, "data.generate.seed: expected an integer >= 0, got -1"),
    ({**DEMO, "min_depth": 3, "max_depth": 2}, r"data.generate \(prosqa_synthetic\): need 1 <= min_depth <= max_depth"),
])
def test_bad_generate_settings_name_the_key(tmp_path, cfg, msg):
    with pytest.raises(RecipeError, match=msg):
        generate_missing(cfg, tmp_path / "train.json", tmp_path / "val.json", log=lambda _: None)
    assert not (tmp_path / "train.json").exists()


def test_bpe_corpus_is_the_training_layout():
    recs = [{"question": "Is Tom a wumpus?", "steps": ["Tom is a yumpus.", "Every yumpus is a wumpus."],
             "answer": "Tom is a wumpus."}, {"question": "Q", "steps": [], "answer": "7"}]
    assert bpe_corpus(recs) == ["Is Tom a wumpus?\nTom is a yumpus.\nEvery yumpus is a wumpus.\n### Tom is a wumpus.",
                                "Q\n\n### 7"]


def test_train_bpe_tokenizer_round_trips_any_text():
    corpus = bpe_corpus(generate_splits({"train": 30}, seed=1)["train"])
    tok = train_bpe_tokenizer(corpus, vocab_size=320)
    assert 256 < len(tok) <= 320
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    for text in (corpus[0], "unseen: Ünïcödé 12+30=42 ###"):
        assert tok.decode(tok(text)["input_ids"]) == text
    # Merges were learnt from the corpus: its text takes fewer tokens than bytes.
    assert len(tok(corpus[0])["input_ids"]) < len(corpus[0].encode()) / 2
    with pytest.raises(ValueError, match="corpus is empty"):
        train_bpe_tokenizer([], 300)
