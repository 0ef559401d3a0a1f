"""Bad data is refused up front with one line naming the file, the record and the field (issue 11, item 7):
literal Coconut special tokens, text no tokenizer can encode, and sets emptied by max_seq_len."""

import json

import pytest

from coconut_scale.data import prosqa_synthetic
from coconut_scale.data import tokenized as tr
from coconut_scale.data.records import DataFormatError, load_records, write_records
from coconut_scale.model.tokens import SPECIAL_TOKENS
from coconut_scale.testing import tiny_tokenizer

GOOD = {"question": "Is Tom a wumpus?", "steps": ["Tom is a yumpus.", "Every yumpus is a wumpus."],
        "answer": "Tom is a wumpus."}


def _write_json(tmp_path, records, name="data.json"):
    # json.dumps escapes non-ASCII (a lone surrogate becomes the JSON text "\ud800", as a careless export writes it)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _with(field: str, text: str) -> dict:
    rec = json.loads(json.dumps(GOOD))
    if field.startswith("steps["):
        rec["steps"][int(field[6:-1])] = text
    else:
        rec[field] = text
    return rec


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
@pytest.mark.parametrize("field, template", [
    ("question", "Is Tom a {t} wumpus?"),
    ("question", "{t}Is Tom a wumpus?"),  # at the very start: used to crash mid-epoch
    ("steps[1]", "Every yumpus {t} is a wumpus."),
    ("answer", "Tom is a wumpus.{t}"),
])
def test_literal_special_token_is_refused_naming_file_record_and_field(tmp_path, token, field, template):
    path = _write_json(tmp_path, [GOOD, GOOD, _with(field, template.format(t=token))])
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}: record 2: field {field!r}: holds the Coconut special token {token!r}")
    assert "\n" not in message
    assert (err.value.index, err.value.field) == (2, field)


def test_literal_special_token_is_refused_on_the_training_path(tmp_path):
    """What the trainer calls: the record is refused before anything is tokenized or cached."""
    path = _write_json(tmp_path, [_with("question", "Is Tom a <|latent|> wumpus?")])
    with pytest.raises(DataFormatError, match=r"record 0: field 'question': holds the Coconut special token"):
        tr.load_tokenized(path, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("field", ["question", "steps[0]", "answer"])
def test_text_that_cannot_be_encoded_is_refused_naming_record_and_field(tmp_path, field):
    path = _write_json(tmp_path, [GOOD, _with(field, "Tom \ud800 is")])
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    assert str(err.value) == (f"{path}: record 1: field {field!r}: cannot be encoded as UTF-8: U+D800 at "
                              "character 4 (a lone surrogate)")


def test_ordinary_unicode_is_still_accepted(tmp_path):
    rec = _with("answer", "Tom est un wumpus \u00e9\u4e2d \U0001F600.")  # a real astral character, not a surrogate
    assert load_records(_write_json(tmp_path, [rec])) == [rec]


# ---------------------------------------------------------------------------------------------------------
# Sets emptied by max_seq_len (load_tokenized with role=...).


def _records_file(tmp_path, n=6):
    path = tmp_path / "val.json"
    write_records(prosqa_synthetic.generate(n, seed=2), path)
    return path


def test_validation_set_emptied_by_max_seq_len_is_refused(tmp_path):
    tok = tiny_tokenizer()
    path = _records_file(tmp_path)
    lengths = [tr.longest_train_length(r, 2, 3) for r in tr.load_tokenized(path, tok)[0]]
    with pytest.raises(DataFormatError) as err:
        tr.load_tokenized(path, tok, max_seq_len=min(lengths) - 1, c_thought=2, max_latent_stage=3,
                          role="validation")
    assert str(err.value) == (
        f"{path}: the validation set is empty: all 6 records were dropped by data.max_seq_len={min(lengths) - 1} "
        f"(their longest sequence over stages 0..3 with c_thought=2 is {min(lengths)}..{max(lengths)} tokens); "
        f"raise data.max_seq_len to at least {min(lengths)}")


def test_empty_training_set_says_how_many_were_dropped_and_how_long_they_are(tmp_path):
    tok = tiny_tokenizer()
    path = _records_file(tmp_path, n=5)
    with pytest.raises(DataFormatError, match=r"the train set is empty: all 5 records were dropped by "
                                              r"data.max_seq_len=8 \(.* is \d+\.\.\d+ tokens\)"):
        tr.load_tokenized(path, tok, max_seq_len=8, role="train")


def test_a_file_without_records_is_refused_for_a_role(tmp_path):
    path = _write_json(tmp_path, [])
    with pytest.raises(DataFormatError, match=r"data.json: the train set has no records$"):
        tr.load_tokenized(path, tiny_tokenizer(), max_seq_len=256, role="train")


def test_a_set_that_keeps_records_passes_and_without_role_nothing_is_refused(tmp_path):
    tok = tiny_tokenizer()
    path = _records_file(tmp_path)
    kept, dropped = tr.load_tokenized(path, tok, max_seq_len=10_000, role="validation")
    assert len(kept) == 6 and dropped == 0
    assert tr.load_tokenized(path, tok, max_seq_len=8) == ([], 6)  # the old contract, for callers without a role
