"""Loading and validating question/steps/answer records.

A record is `{"question": str, "steps": [str, ...], "answer": str}`; extra keys (ProsQA's graph, an id, ...)
are kept and ignored. Files are a JSON array (the official Coconut format) or JSON Lines.

Every record is validated here, up front, so that a bad file fails with one message naming the file, the record
index and the field, instead of a stack trace from deep inside tokenization or batching.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from coconut_scale.data.gc_pause import gc_paused
from coconut_scale.errors import UserError
from coconut_scale.model.tokens import SPECIAL_TOKENS

REQUIRED_FIELDS = ("question", "steps", "answer")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_TEXT_CHUNK = 4096  # records whose text is checked in one go (bounds the joined copy to a few MB)


class DataFormatError(UserError):
    """A data file or one of its records is malformed.

    `path` is the file, `index` the 0-based record index (None when the file as a whole is bad, e.g. it is not
    JSON), `field` the offending field (e.g. "steps[2]"; None when the record itself is not an object).
    """

    def __init__(self, path: str | Path | None, index: int | None, field: str | None, message: str):
        self.path = None if path is None else str(path)
        self.index = index
        self.field = field
        self.reason = message
        where = [self.path or "<records>"]
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where) + ": " + message)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(text: str, path: str | Path | None, index: int | None, field: str) -> None:
    """Refuse text the pipeline would mistrain on or fail on later, far from the record."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON allows "\\ud800"; Python decodes it to a lone surrogate, which no tokenizer can encode.
        raise DataFormatError(path, index, field, f"cannot be encoded as UTF-8: U+{ord(text[e.start]):04X} at "
                              f"character {e.start} (a lone surrogate)") from None
    for token in SPECIAL_TOKENS:
        at = text.find(token)
        if at >= 0:
            # The tokenizer maps the literal to the real special token: in a question it would become a latent
            # position (or a marker the curriculum does not expect), so it is refused rather than trained on.
            raise DataFormatError(path, index, field, f"holds the Coconut special token {token!r} at character "
                                  f"{at}; the harness inserts these tokens itself, remove or rewrite it")


def validate_record(rec: Any, path: str | Path | None = None, index: int | None = None) -> dict:
    """Check one record; returns it unchanged or raises DataFormatError naming path/index/field."""
    if not isinstance(rec, dict):
        raise DataFormatError(path, index, None, f"a record must be a JSON object, got {_type_name(rec)}")
    for field in REQUIRED_FIELDS:
        if field not in rec:
            raise DataFormatError(path, index, field, "missing required field")

    question = rec["question"]
    if not isinstance(question, str):
        raise DataFormatError(path, index, "question", f"must be a string, got {_type_name(question)}")
    if not question.strip():
        raise DataFormatError(path, index, "question", "must not be empty")
    _check_text(question, path, index, "question")

    steps = rec["steps"]
    if not isinstance(steps, list):
        raise DataFormatError(path, index, "steps", f"must be a list of strings, got {_type_name(steps)}")
    for j, step in enumerate(steps):
        # An empty step string is allowed on purpose: the official GSM8K (iCoT) preprocessing produces [""] for
        # the few problems whose solution has no calculator annotation, and we reproduce that data exactly.
        if not isinstance(step, str):
            raise DataFormatError(path, index, f"steps[{j}]", f"must be a string, got {_type_name(step)}")
        _check_text(step, path, index, f"steps[{j}]")

    answer = rec["answer"]
    if not isinstance(answer, str):
        raise DataFormatError(path, index, "answer", f"must be a string, got {_type_name(answer)}")
    if not answer.strip():
        raise DataFormatError(path, index, "answer", "must not be empty")
    _check_text(answer, path, index, "answer")
    return rec


def _has_valid_fields(rec: Any) -> bool:
    """validate_record's checks of a record's shape and types, without those of its text."""
    if not isinstance(rec, dict) or not all(field in rec for field in REQUIRED_FIELDS):
        return False
    question, steps, answer = rec["question"], rec["steps"], rec["answer"]
    return (isinstance(question, str) and bool(question.strip()) and isinstance(answer, str) and bool(answer.strip())
            and isinstance(steps, list) and all(isinstance(step, str) for step in steps))


def _texts_are_clean(records: list[dict]) -> bool:
    """Whether no question, step or answer holds a lone surrogate or a Coconut token, checked over many records'
    text at once. A newline joins the texts: no Coconut token contains one, so a token found in the joined text
    lies inside one of them, and a lone surrogate fails UTF-8 encoding wherever it stands."""
    for start in range(0, len(records), _TEXT_CHUNK):
        joined = "\n".join(text for rec in records[start:start + _TEXT_CHUNK]
                           for text in (rec["question"], *rec["steps"], rec["answer"]))
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError:
            return False
        if any(token in joined for token in SPECIAL_TOKENS):
            return False
    return True


def validate_records(records: Iterable[Any], path: str | Path | None = None) -> list[dict]:
    """validate_record over every record, with its error for the first bad one.

    One record at a time is slow at GSM8K-Aug's 385k records (2M strings), so the records are first checked
    in bulk: field types per record, then the text of many records at once. Only when that finds a problem are
    they validated one by one, which names the first bad record and field exactly as validating one by one
    from the start always does.
    """
    records = list(records)
    if all(_has_valid_fields(rec) for rec in records) and _texts_are_clean(records):
        return records
    return [validate_record(rec, path, i) for i, rec in enumerate(records)]


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    with gc_paused():
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    path, len(records), None, f"invalid JSON on line {lineno} (column {e.colno}): {e.msg}"
                ) from None
    return records


def _parse_json_array(text: str, path: Path) -> list[Any]:
    try:
        with gc_paused():
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, None, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise DataFormatError(
            path, None, None, f"top level must be a JSON array of records (or JSON Lines), got {_type_name(data)}"
        )
    return data


def load_records(path: str | Path, validate: bool = True) -> list[dict]:
    """Read a JSON array or JSON Lines file of records, validating each one.

    The format is chosen by extension (.jsonl/.ndjson are JSON Lines) and otherwise by content: a file whose
    first non-blank character is "[" is a JSON array, one starting with "{" is JSON Lines. (A pretty-printed
    single object is reported as "not an array", not as a confusing line-1 parse error.)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFormatError(path, None, None, f"cannot read file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM, which json.loads rejects
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, None, f"not UTF-8 text (byte {e.start})") from None

    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(path, None, None, "file is empty")
    if path.suffix.lower() in _JSONL_SUFFIXES:
        records = _parse_jsonl(text, path)
    elif stripped[0] == "[":
        records = _parse_json_array(text, path)
    elif stripped[0] == "{":
        try:
            records = _parse_jsonl(text, path)
        except DataFormatError as jsonl_error:
            # Maybe one pretty-printed object: say that clearly if the whole document parses.
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                raise jsonl_error from None
            raise DataFormatError(
                path, None, None, f"top level must be a JSON array of records (or JSON Lines), got {_type_name(whole)}"
            ) from None
    else:
        raise DataFormatError(path, None, None, "neither a JSON array nor JSON Lines (first character "
                              f"{stripped[0]!r})")
    if validate:
        validate_records(records, path)
    return records


def write_records(records: list[dict], path: str | Path) -> None:
    """Write records as a JSON array (the official format), or JSON Lines when the suffix says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix.lower() in _JSONL_SUFFIXES:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False)
