"""Files the harness reads back cannot run code, and the files it writes get the usual permissions.

The token cache is the harness's own file here (the trainer's RNG/loop state are tested with the trainer): a
pickle payload planted where the cache lives must be neither executed nor trusted.
"""

import json
import logging
import os
import stat

import pytest

from coconut_scale.atomic_files import atomic_write, write_json_atomic, write_jsonl_atomic, write_text_atomic
from coconut_scale.data import prosqa_synthetic
from coconut_scale.data import tokenized as tr
from coconut_scale.data.records import write_records
from coconut_scale.testing import tiny_tokenizer


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears only if the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _records_file(tmp_path):
    path = tmp_path / "train.json"
    write_records(prosqa_synthetic.generate(8, seed=1), path)
    return path


def test_planted_pickle_in_the_token_cache_is_not_executed_and_the_cache_is_rebuilt(tmp_path, caplog):
    import pickle

    tok = tiny_tokenizer()
    path = _records_file(tmp_path)
    cache = tmp_path / "cache"
    good, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    (target,) = cache.iterdir()  # wherever the cache lives, under whatever name
    marker = tmp_path / "payload-ran"
    target.write_bytes(pickle.dumps(_Payload(marker)))

    with caplog.at_level(logging.WARNING, logger="coconut_scale.data.tokenized"):
        again, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    assert not marker.exists(), "the planted pickle in the token cache was executed"
    assert again == good
    # one line naming the file, then a fresh cache in its place
    assert [r.getMessage() for r in caplog.records if str(target) in r.getMessage()], caplog.text
    assert json.loads(target.read_text())["version"] == tr.CACHE_VERSION


def test_token_cache_of_the_wrong_shape_is_replaced_not_used(tmp_path, caplog):
    tok = tiny_tokenizer()
    path = _records_file(tmp_path)
    cache = tmp_path / "cache"
    good, _ = tr.load_tokenized(path, tok, cache_dir=cache)
    target = tr.cache_file(path, tok, cache)
    payload = json.loads(target.read_text())
    payload["records"][0] = {"question_ids": "not a record"}
    target.write_text(json.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="coconut_scale.data.tokenized"):
        assert tr.load_tokenized(path, tok, cache_dir=cache)[0] == good
    assert f"{target}: not a version-{tr.CACHE_VERSION} token cache" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Permissions: 0o666 & ~umask, like any file a program opens for writing (mkstemp alone would give 0600).


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=oct)
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_create_files_with_the_umask_permissions(tmp_path, umask):
    expected = 0o666 & ~umask
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_jsonl_atomic(tmp_path / "b.jsonl", [{"x": 1}])
    write_text_atomic(tmp_path / "c.txt", "text")
    atomic_write(tmp_path / "d.bin", lambda tmp: open(tmp, "wb").close())
    for name in ("a.json", "b.jsonl", "c.txt", "d.bin"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)), oct(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl", "c.txt", "d.bin"]  # no temp left


def test_token_cache_is_created_with_the_umask_permissions(tmp_path, umask):
    tok = tiny_tokenizer()
    path = _records_file(tmp_path)
    tr.load_tokenized(path, tok, cache_dir=tmp_path / "cache")
    assert _mode(tr.cache_file(path, tok, tmp_path / "cache")) == 0o666 & ~umask


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "x.json", fail)
    assert list(tmp_path.iterdir()) == []
