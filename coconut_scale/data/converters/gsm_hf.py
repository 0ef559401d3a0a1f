"""GSM8K as published on the Hugging Face hub (openai/gsm8k, config "main") -> records.

Each solution is natural language with calculator annotations and a final line `#### answer`:

    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n... \\n#### 72"

Like the iCoT data the official Coconut GSM8K runs use, the steps are the calculator annotations, brackets
included ("<<48/2=24>>"), in order; the answer is what follows the last "####", stripped (commas kept, as in
the released data; evaluation strips them). Input: the hub (needs network) or a local JSON Lines / JSON copy
with `question` and `answer` fields.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterable

from coconut_scale.data.converters import finish
from coconut_scale.data.records import DataFormatError, load_records

_ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)
HF_DATASET = ("openai/gsm8k", "main")


def convert_example(question: str, solution: str) -> dict:
    if "####" not in solution:
        raise ValueError("solution has no '#### answer' line")
    body, answer = solution.rsplit("####", 1)
    steps = [f"<<{m}>>" for m in _ANNOTATION.findall(body)]
    return {"question": question, "steps": steps, "answer": answer.strip()}


def convert(examples: Iterable[dict], source: str = "<gsm8k>") -> list[dict]:
    """`examples`: dicts with "question" and "answer" (the full solution text), as in the HF dataset."""
    records = []
    for i, ex in enumerate(examples):
        for field in ("question", "answer"):
            if not isinstance(ex.get(field), str):
                raise DataFormatError(source, i, field, "missing or not a string")
        try:
            records.append(convert_example(ex["question"], ex["answer"]))
        except ValueError as e:
            raise DataFormatError(source, i, "answer", str(e)) from None
    return records


def load_local(path: str | Path) -> list[dict]:
    # The raw GSM8K rows are not Coconut records (no "steps"), so only the JSON/JSONL parsing is reused.
    return load_records(path, validate=False)


def load_hub(split: str) -> list[dict]:
    from datasets import load_dataset  # imported lazily: only this path needs the hub

    return list(load_dataset(*HF_DATASET, split=split))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Convert GSM8K (Hugging Face format: natural-language solutions with "
                                     "<<calc>> annotations and '#### answer') to a Coconut JSON file.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="local copy: JSON Lines (or JSON array) with question/answer fields")
    src.add_argument("--hub-split", help=f"download this split (train/test) of {HF_DATASET[0]} from the hub")
    parser.add_argument("output", help="JSON file to write")
    args = parser.parse_args(argv)
    if args.input:
        examples, source = load_local(args.input), args.input
    else:
        examples, source = load_hub(args.hub_split), f"{HF_DATASET[0]}:{args.hub_split}"
    finish(convert(examples, source), args.output, source)


if __name__ == "__main__":
    main()
