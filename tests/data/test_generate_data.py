"""data/generate.py (the recipe's data.generate) and data/bpe.py (the train-bpe:N tokenizer)."""

import inspect
import json
from pathlib import Path

import pytest

from coconut_scale.config.recipe import ProsQASyntheticCfg, RecipeError, load_recipe
from coconut_scale.data import prosqa_synthetic
from coconut_scale.data.bpe import bpe_corpus, train_bpe_tokenizer
from coconut_scale.data.generate import DataGenerationError, generate_missing
from coconut_scale.data.prosqa_synthetic import generate_splits
from coconut_scale.data.records import load_records

REPO = Path(__file__).resolve().parents[2]

DEMO = {"kind": "prosqa_synthetic", "n_train": 12, "n_val": 5, "seed": 3, "n_concepts": 4, "min_depth": 1,
        "max_depth": 2, "extra_edges": 0.0, "n_names": 24}


def _cfg(**changes) -> ProsQASyntheticCfg:
    return ProsQASyntheticCfg(**{**DEMO, **changes})


def test_generate_missing_writes_disjoint_splits_once(tmp_path):
    train, val = tmp_path / "gen" / "train.json", tmp_path / "gen" / "val.json"
    logged = []
    assert generate_missing(_cfg(), train, val, log=logged.append) == ["train", "val"]
    tr, va = load_records(train), load_records(val)
    assert (len(tr), len(va)) == (12, 5)
    assert not {r["question"] for r in tr} & {r["question"] for r in va}
    options = {k: v for k, v in DEMO.items() if k not in ("kind", "n_train", "n_val", "seed")}
    assert tr == generate_splits({"train": 12, "val": 5}, seed=3, **options)["train"]  # what the recipe asks for
    assert logged == [f"generated 12 ProsQA-style records -> {train}", f"generated 5 ProsQA-style records -> {val}"]
    before = train.read_text()
    assert generate_missing(_cfg(seed=4), train, val, log=logged.append) == []  # both exist: kept
    assert train.read_text() == before and len(logged) == 2


@pytest.mark.parametrize("lost", ["train", "val"])
def test_only_the_missing_split_is_written_and_it_is_the_one_first_generated(tmp_path, lost):
    paths = {"train": tmp_path / "train.json", "val": tmp_path / "val.json"}
    generate_missing(_cfg(), paths["train"], paths["val"], log=lambda _: None)
    first = {split: path.read_text() for split, path in paths.items()}
    paths[lost].unlink()
    kept = "val" if lost == "train" else "train"
    paths[kept].write_text(first[kept])  # untouched from here on: compared byte for byte below
    assert generate_missing(_cfg(), paths["train"], paths["val"], log=lambda _: None) == [lost]
    assert {split: path.read_text() for split, path in paths.items()} == first


def test_a_users_own_file_is_never_overwritten(tmp_path):
    """A recipe with data.generate pointed at the user's training file (its val file missing) keeps the user's file
    and generates a validation split that shares no question with it."""
    mine = [{"question": q["question"], "steps": q["steps"], "answer": q["answer"]}
            for q in generate_splits({"val": 5}, seed=3, **_cfg().generator_options())["val"]]
    train, val = tmp_path / "my_train.json", tmp_path / "val.json"
    train.write_text(json.dumps(mine))
    before = train.read_bytes()
    logged = []
    assert generate_missing(_cfg(), train, val, log=logged.append) == ["val"]
    assert train.read_bytes() == before
    assert not {r["question"] for r in mine} & {r["question"] for r in load_records(val)}
    assert logged == [f"generated 5 ProsQA-style records -> {val} (kept the existing train file {train}; no "
                      f"question of it is reused)"]


def test_nothing_to_generate_without_a_config(tmp_path):
    assert generate_missing(None, tmp_path / "a.json", tmp_path / "b.json") == []
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("override, msg", [
    ("data.generate={kind: gsm8k}", "data.generate.kind = 'gsm8k': expected one of 'prosqa_synthetic'"),
    ("data.generate.n_concpets=4", "unknown key 'data.generate.n_concpets'.*did you mean 'data.generate.n_concepts'"),
    ("data.generate.n_train=0", r"data.generate.n_train = 0: Input should be greater than 0"),
    ("data.generate.n_val=five", r"data.generate.n_val = 'five': Input should be a valid integer"),
    ("data.generate.seed=-1", r"data.generate.seed = -1"),
    ("data.generate.min_depth=5", r"data.generate: min_depth 5 > max_depth 4"),
])
def test_bad_generate_settings_fail_with_the_recipe_naming_the_key(override, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [override])


def test_the_generators_own_refusal_names_the_kind(tmp_path):
    with pytest.raises(DataGenerationError, match=r"data.generate \(prosqa_synthetic\): n_concepts=4 exceeds the 3"):
        generate_missing(_cfg(n_names=3), tmp_path / "train.json", tmp_path / "val.json", log=lambda _: None)
    assert not (tmp_path / "train.json").exists()


def test_the_schema_defaults_are_the_generators_own():
    defaults = {k: p.default for k, p in inspect.signature(prosqa_synthetic.generate).parameters.items()
                if p.default is not inspect.Parameter.empty}
    options = ProsQASyntheticCfg(kind="prosqa_synthetic").generator_options()
    assert options == {k: defaults[k] for k in options}


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
