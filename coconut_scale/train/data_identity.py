"""The data's identity in every checkpoint (data_identity.json): each data file's size, content digest and record
count, and the token cache key it was read through. A resume compares them with the files now on disk, as
recipe_guard compares the recipe's math keys: a changed file (a record edited, records appended) would otherwise be
mixed into the run silently, the sampler shuffling a different set from the resumed step on.

A change is refused naming the file and the old and new record counts, unless `checkpoint.allow_changes` names the
file's key (`data.train_file`, `data.val_file`, or the whole `data` section); then it is recorded like any allowed
recipe change (metrics.jsonl and recipe_changes.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from coconut_scale import file_manifest
from coconut_scale.errors import UserError

DATA_FILE = "data_identity.json"
FIELDS = ("train_file", "val_file")  # the files that decide what is trained and which export is best


class DataChangeError(UserError):
    """A data file differs from the one the checkpoint was trained on."""


def file_identity(path: str | Path) -> dict:
    """{"path", "size", "<digest>", "records"} of one data file (streamed digest; records parsed and validated)."""
    from coconut_scale.data.records import load_records

    path = Path(path)
    return {"path": str(path), "size": path.stat().st_size,
            file_manifest.DIGEST: file_manifest.file_digest(path), "records": len(load_records(path))}


def data_identity(recipe) -> dict:
    return {field: file_identity(getattr(recipe.data, field)) for field in FIELDS}


def _same(old: dict, new: dict) -> bool:
    digest = file_manifest.DIGEST
    return old.get("size") == new["size"] and old.get(digest) == new[digest]


def _summary(entry: dict) -> str:
    return f"{entry.get('path')}: {entry.get('records')} records, {entry.get('size')} bytes"


def check_data(recipe, checkpoint: Path, identity: dict) -> dict[str, list]:
    """The accepted changes ({"data.<field>": [old, new]}); a DataChangeError for the first change that
    checkpoint.allow_changes does not name. A checkpoint without data_identity.json has nothing to compare."""
    from coconut_scale.train.recipe_guard import allowed

    path = Path(checkpoint) / DATA_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None
    accepted = {}
    for field in FIELDS:
        old, new = saved.get(field), identity[field]
        if not isinstance(old, dict) or _same(old, new):
            continue
        key = f"data.{field}"
        if allowed(recipe, key):
            accepted[key] = [_summary(old), _summary(new)]
            continue
        raise DataChangeError(
            f"{key} {new['path']} changed since checkpoint {checkpoint} was written: it had {old.get('records')} "
            f"records ({old.get('size')} bytes), it has {new['records']} ({new['size']} bytes). Resume with the data "
            f"it was trained on, start a new output_dir, or accept the change with checkpoint.allow_changes: [{key}]")
    return accepted


def token_identity(recipe, tokenizer) -> dict:
    """The token cache key of each data file (its name in the cache) and the tokenizer's own fingerprint, the part
    of the key that does not depend on where the tokenizer was loaded from (a moved output_dir keeps it)."""
    from coconut_scale.data.tokenized import cache_key, tokenizer_fingerprint

    return {"token_cache_keys": {field: cache_key(getattr(recipe.data, field), tokenizer) for field in FIELDS},
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def check_tokenizer(checkpoint: Path | None, identity: dict, recipe) -> None:
    """The same data files through a different tokenizer (a model directory or hub revision changed under the same
    name) tokenize differently: refused unless checkpoint.allow_changes names the model or the data file."""
    from coconut_scale.train.recipe_guard import allowed

    path = Path(checkpoint) / DATA_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return
    old, new = json.loads(path.read_text()).get("tokenizer"), identity["tokenizer"]
    if old is None or old == new or allowed(recipe, "model") or allowed(recipe, "data.train_file"):
        return
    raise DataChangeError(
        f"the tokenizer differs from the one checkpoint {checkpoint} was trained with (fingerprint {old[:16]} -> "
        f"{new[:16]}; the data files unchanged, so their token cache keys change): a model directory or hub "
        f"revision changed under the same name. Resume with that tokenizer, or accept it with "
        f"checkpoint.allow_changes: [model]")
