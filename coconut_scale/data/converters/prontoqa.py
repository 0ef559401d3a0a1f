"""ProntoQA (the generator's JSON output) -> records, as the official Coconut preprocessing does it.

The generator (github.com/asaparov/prontoqa, `run_experiment.py --model-name json ... --ontology fictional
--min-hops 5 --max-hops 5`) writes `5hop_0shot_random.json`:

    {"example1": {"in_context_examples": [...],
                  "test_example": {"question": "<context>", "query": "True or false: ...",
                                   "chain_of_thought": ["Max is a wumpus.", "Every wumpus is a yumpus.", ...],
                                   "answer": "True"}}, ...}

Record: question = context + " " + query; answer = "True"/"False"; steps = the chain-of-thought sentences
grouped two by two ("Max is a wumpus. Every wumpus is a yumpus."), which is what the official code does: one
step (one latent stage) is one application of a rule, i.e. the rule and the fact it produces.
`sentences_per_step=1` gives one sentence a step instead. The official split is the first 9000 examples for
training, the next 200 for validation, the rest for test (`split_official`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coconut_scale.data.converters import finish
from coconut_scale.data.records import DataFormatError

OFFICIAL_SPLITS = {"train": (0, 9000), "valid": (9000, 9200), "test": (9200, None)}


def convert_example(example: dict, sentences_per_step: int = 2) -> dict:
    for field in ("question", "query", "chain_of_thought", "answer"):
        if field not in example:
            raise KeyError(field)
    cot = example["chain_of_thought"]
    if not isinstance(cot, list) or not all(isinstance(s, str) for s in cot):
        raise TypeError("chain_of_thought")
    answer = example["answer"]
    if isinstance(answer, bool):  # tolerate generators that emit JSON booleans
        answer = "True" if answer else "False"
    if not isinstance(answer, str):
        raise TypeError("answer")
    steps = [" ".join(cot[i:i + sentences_per_step]) for i in range(0, len(cot), sentences_per_step)]
    return {"question": example["question"] + " " + example["query"], "steps": steps, "answer": answer}


def convert(raw: dict, source: str = "<prontoqa>", sentences_per_step: int = 2) -> list[dict]:
    """`raw`: the generator's top-level object; examples are kept in its (insertion) order, like the official
    preprocessing, so that the official index-based split is reproduced."""
    if not isinstance(raw, dict):
        raise DataFormatError(source, None, None, "expected the ProntoQA generator's JSON object of examples")
    records = []
    for i, (key, value) in enumerate(raw.items()):
        example = value.get("test_example") if isinstance(value, dict) else None
        if not isinstance(example, dict):
            raise DataFormatError(source, i, f"{key}.test_example", "missing or not an object")
        try:
            records.append(convert_example(example, sentences_per_step))
        except KeyError as e:
            raise DataFormatError(source, i, f"{key}.test_example.{e.args[0]}", "missing required field") from None
        except TypeError as e:
            raise DataFormatError(source, i, f"{key}.test_example.{e.args[0]}", "wrong type") from None
    return records


def split_official(records: list[dict], split: str) -> list[dict]:
    start, stop = OFFICIAL_SPLITS[split]
    return records[start:stop]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Convert ProntoQA generator output (e.g. 5hop_0shot_random.json) "
                                     "to Coconut JSON files.")
    parser.add_argument("input", help="the generator's JSON file")
    parser.add_argument("output", help="JSON file to write; with --official-splits, a prefix: PREFIX_{train,valid,"
                        "test}.json")
    parser.add_argument("--official-splits", action="store_true",
                        help="write the official 9000/200/rest train/valid/test split")
    parser.add_argument("--sentences-per-step", type=int, default=2, help="chain-of-thought sentences per step "
                        "(official: 2)")
    args = parser.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(args.input, None, None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
    records = convert(raw, args.input, args.sentences_per_step)
    if args.official_splits:
        for split in OFFICIAL_SPLITS:
            finish(split_official(records, split), Path(f"{args.output}_{split}.json"), args.input)
    else:
        finish(records, args.output, args.input)


if __name__ == "__main__":
    main()
