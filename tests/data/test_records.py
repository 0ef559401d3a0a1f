"""Record loading and validation: precise errors naming file, record index and field."""

import json

import pytest

from coconut_scale.data.records import DataFormatError, load_records, validate_record, write_records

GOOD = {"question": "Is Tom a wumpus?", "steps": ["Tom is a wumpus."], "answer": "Tom is a wumpus.", "extra": 1}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_json_array_and_jsonl_load_the_same(tmp_path):
    recs = [GOOD, {"question": "q", "steps": [], "answer": "a"}]
    arr = write(tmp_path, "d.json", json.dumps(recs))
    lines = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    sniffed = write(tmp_path, "d.txt", "\n".join(json.dumps(r) for r in recs))  # JSONL by content
    assert load_records(arr) == load_records(lines) == load_records(sniffed) == recs
    assert load_records(arr)[0]["extra"] == 1  # extra keys kept


def test_write_then_load_roundtrip(tmp_path):
    for name in ("out.json", "out.jsonl"):
        write_records([GOOD], tmp_path / name)
        assert load_records(tmp_path / name) == [GOOD]


def test_empty_steps_valid():
    validate_record({"question": "q", "steps": [], "answer": "a"}, "f", 0)


@pytest.mark.parametrize(
    "record, field, reason",
    [
        ({"steps": [], "answer": "a"}, "question", "missing required field"),
        ({"question": "q", "answer": "a"}, "steps", "missing required field"),
        ({"question": "q", "steps": []}, "answer", "missing required field"),
        ({"question": "  \n", "steps": [], "answer": "a"}, "question", "must not be empty"),
        ({"question": 3, "steps": [], "answer": "a"}, "question", "must be a string, got int"),
        ({"question": "q", "steps": "s1 s2", "answer": "a"}, "steps", "must be a list of strings, got str"),
        ({"question": "q", "steps": ["a", None], "answer": "a"}, "steps[1]", "must be a string, got null"),
        ({"question": "q", "steps": [], "answer": 42}, "answer", "must be a string, got int"),
        ({"question": "q", "steps": [], "answer": ""}, "answer", "must not be empty"),
    ],
)
def test_bad_record_in_file_names_file_index_field(tmp_path, record, field, reason):
    path = write(tmp_path, "bad.json", json.dumps([GOOD, GOOD, record]))
    with pytest.raises(DataFormatError) as exc:
        load_records(path)
    err = exc.value
    assert (err.path, err.index, err.field, err.reason) == (str(path), 2, field, reason)
    assert str(err) == f"{path}: record 2: field {field!r}: {reason}"


def test_record_not_an_object(tmp_path):
    path = write(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n" + json.dumps(["q", [], "a"]) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl: record 1: a record must be a JSON object, got list"):
        load_records(path)


def test_bad_json_array(tmp_path):
    path = write(tmp_path, "broken.json", '[{"question": "q", "steps": [], "answer": "a"},\n {"question": }]')
    with pytest.raises(DataFormatError) as exc:
        load_records(path)
    assert exc.value.index is None and exc.value.field is None
    assert str(exc.value).startswith(f"{path}: invalid JSON at line 2 column 15")


def test_bad_jsonl_line_names_record_and_line(tmp_path):
    path = write(tmp_path, "broken.jsonl", json.dumps(GOOD) + "\n\n" + '{"question": "q", "steps": [}\n')
    with pytest.raises(DataFormatError) as exc:
        load_records(path)
    assert exc.value.index == 1
    assert "invalid JSON on line 3" in str(exc.value)


@pytest.mark.parametrize("text, msg", [
    ("", "file is empty"),
    ('{"question": "q",\n "steps": [], "answer": "a"}', "top level must be a JSON array"),
    ('{"records": []}', "top level must be a JSON array"),  # a single object line: JSONL record, not an object error
    ("hello", "neither a JSON array nor JSON Lines"),
])
def test_bad_top_level(tmp_path, text, msg):
    path = write(tmp_path, "x.json", text)
    with pytest.raises(DataFormatError) as exc:
        load_records(path)
    if "records" in text:  # parses as one JSONL record missing its fields
        assert exc.value.index == 0 and exc.value.field == "question"
    else:
        assert msg in str(exc.value) and exc.value.index is None


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="cannot read file"):
        load_records(tmp_path / "nope.json")
