"""ProsQA as released with Coconut (data/prosqa_{train,valid,test}.json) -> records.

The released files already are Coconut records (question/steps/answer) with extra graph keys (idx_to_symbol,
edges, root, target, neg_target). Conversion is therefore validation plus a copy: the records come out equal
to the released ones, extra keys included, so an analysis can still use the graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coconut_scale.data.converters import finish
from coconut_scale.data.records import load_records, validate_records

GRAPH_KEYS = ("idx_to_symbol", "edges", "root", "target", "neg_target")


def convert(data: list, source: str = "<prosqa>", keep_graph: bool = True) -> list[dict]:
    records = validate_records(data, source)
    if keep_graph:
        return [dict(r) for r in records]
    return [{"question": r["question"], "steps": list(r["steps"]), "answer": r["answer"]} for r in records]


def convert_file(path: str | Path, keep_graph: bool = True) -> list[dict]:
    return convert(load_records(path, validate=False), str(path), keep_graph)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Validate/convert a released ProsQA JSON file to Coconut records.")
    parser.add_argument("input", help="e.g. prosqa_valid.json")
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--drop-graph", action="store_true", help="keep only question/steps/answer")
    args = parser.parse_args(argv)
    finish(convert_file(args.input, keep_graph=not args.drop_graph), args.output, args.input)


if __name__ == "__main__":
    main()
