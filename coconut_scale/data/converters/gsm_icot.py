"""GSM8K in the Internalize-CoT (iCoT) text format -> records.

One problem a line: `question||<<a>> <<b>> #### answer`. This follows the official Coconut preprocessing
(preprocessing/gsm_icot.py) to the character, so the records equal the released gsm_*.json:

- question = everything before the first "||", unstripped;
- steps = the text between "||" and the first "##", stripped and split on single spaces;
- answer = the text after the last "##", stripped.

A line with no calculator annotation (`question|| #### 9`; six in the validation split) therefore yields
steps == [""], one empty step, exactly as the released JSON has it. `drop_empty_steps=True` gives [] instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from coconut_scale.data.converters import finish
from coconut_scale.data.records import DataFormatError


def convert_line(line: str, drop_empty_steps: bool = False) -> dict:
    if "||" not in line:
        raise ValueError("no '||' separating the question from the steps")
    if "##" not in line.split("||", 1)[1]:
        raise ValueError("no '####' before the answer")
    question = line.split("||")[0]
    steps = line.split("||")[1].split("##")[0].strip().split(" ")
    if drop_empty_steps:
        steps = [s for s in steps if s]
    answer = line.split("##")[-1].strip()
    return {"question": question, "steps": steps, "answer": answer}


def convert(lines: Iterable[str], source: str = "<gsm icot>", drop_empty_steps: bool = False) -> list[dict]:
    """Convert iCoT lines (blank lines skipped) to records; a malformed line raises DataFormatError."""
    records = []
    for lineno, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            records.append(convert_line(line, drop_empty_steps))
        except ValueError as e:
            raise DataFormatError(source, len(records), None, f"line {lineno}: {e}") from None
    return records


def convert_file(path: str | Path, drop_empty_steps: bool = False) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return convert(f, source=str(path), drop_empty_steps=drop_empty_steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Convert GSM8K in the iCoT text format (question||steps #### answer) "
                                     "to a Coconut JSON file.")
    parser.add_argument("input", help="iCoT text file, e.g. gsm_valid.txt")
    parser.add_argument("output", help="JSON file to write, e.g. gsm_valid.json")
    parser.add_argument("--drop-empty-steps", action="store_true",
                        help="give [] (not the official [\"\"]) for problems without calculator annotations")
    args = parser.parse_args(argv)
    finish(convert_file(args.input, args.drop_empty_steps), args.output, args.input)


if __name__ == "__main__":
    main()
