"""The released data files that some data tests read (never committed: they are the data sets' own files), where
they are looked for, and, when one is absent, a skip that says what it is and where to get it."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("COCONUT_SHARED_DATA", REPO.parent / "shared" / "data"))

RELEASED = {
    "gsm8k_icot_valid.txt": (
        "GSM8K's validation split with iCoT's step annotations (500 lines `question||<<step>> ... #### answer`): "
        "data/gsm8k/valid.txt of github.com/da03/Internalize_CoT_Step_by_Step (commit e06a32ee), saved under this "
        "name; the converter coconut_scale/data/converters/gsm_icot.py (data/convert_gsm_icot.py) reads it"),
    "prosqa_valid.json": (
        "ProsQA's validation split as released: data/prosqa_valid.json of github.com/facebookresearch/coconut; the "
        "converter coconut_scale/data/converters/prosqa.py (data/convert_prosqa.py) reads it"),
}


def shared_data(name: str) -> Path:
    """The released file `name`; the test is skipped, saying what the file is and where to get it, when absent."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present: {RELEASED[name]}. Put it in a folder and set COCONUT_SHARED_DATA to that "
                    f"folder (data/README.md, 'Released data sets')")
    return path
