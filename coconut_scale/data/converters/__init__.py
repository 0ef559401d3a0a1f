"""Converters from released data sets to Coconut records, and the synthetic ProsQA-style generator.

Each module has a pure `convert(...)` (or `generate(...)`) returning a list of records
`{"question", "steps", "answer", ...}` and a `main(argv=None)` CLI that writes them as a JSON array (the format
`coconut_scale.data.records.load_records` reads). The scripts in `data/` only call these `main`s.
"""

from __future__ import annotations

from pathlib import Path

from coconut_scale.data.records import validate_records, write_records


def finish(records: list[dict], output: str | Path, source: str) -> None:
    """Validate (so a converter bug cannot write a file training would later reject) and write."""
    validate_records(records, source)
    write_records(records, output)
    print(f"wrote {len(records)} records to {output}")
