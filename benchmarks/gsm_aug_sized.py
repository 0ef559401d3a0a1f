"""A GSM8K-Aug-sized training file (385,620 problems) for benchmarking the data pipeline at full scale.

GSM8K-Aug, the iCoT training set the Coconut paper trains GPT-2 on, is one problem a line,
`question||<<a=b>> <<c=d>> #### answer`. The real file is not shipped here; this script builds one of the same
shape and size, seeded, from a handful of real lines:

- With a source file (default: shared/data/gsm8k_icot_valid.txt beside the checkout, 500 real GSM8K lines),
  the first lines are the source lines unchanged, and every later line is a source line picked at random in
  which every number is replaced by a random number of as many digits (one mapping per line, applied to
  question, steps and answer alike, so a number that repeats across them still repeats). Lengths, step counts
  and the number/word mix stay those of GSM8K, while nearly every question is new, as in the real set (GSM8K-Aug's
  problems are distinct, and a tokenizer fed repeated text would look faster than it is). The arithmetic no
  longer holds; the pipeline never checks it.
- Without one, a small seeded template generator writes consistent two-to-four-step word problems.

The iCoT text goes through the harness's converter (data/converters/gsm_icot.py) into the records JSON that
recipes name as `data.train_file`.

    python benchmarks/gsm_aug_sized.py data/generated/gsm_aug_sized_train.json      # ~20 s, ~150 MB
    python benchmarks/gsm_aug_sized.py /tmp/small.json --n 5000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coconut_scale.data.converters.gsm_icot import convert  # noqa: E402
from coconut_scale.data.records import write_records  # noqa: E402

GSM8K_AUG_TRAIN_SIZE = 385_620


def default_source() -> Path:
    """The 500 real GSM8K validation lines in iCoT format, where the checkout's shared data lives."""
    shared = Path(os.environ.get("COCONUT_SHARED_DATA", REPO.parent / "shared" / "data"))
    return shared / "gsm8k_icot_valid.txt"


_NUMBER = re.compile(r"\d+")
_REDRAWS = 50  # tries for a new question before a repeat is accepted


def _renumber(line: str, rng: random.Random) -> str:
    """`line` with each distinct digit run replaced by a random one of the same length (no new leading zero)."""
    mapping: dict[str, str] = {}

    def replace(match: re.Match) -> str:
        digits = match.group()
        if digits not in mapping:
            if digits == "0":
                mapping[digits] = "0"
            else:
                mapping[digits] = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in digits[1:])
        return mapping[digits]

    return _NUMBER.sub(replace, line)


def expand_lines(source_lines: list[str], n: int, seed: int) -> list[str]:
    """`n` iCoT lines: the source lines first, then seeded renumbered copies of random source lines, each with a
    question not seen before (a source line with few short numbers has few variants, so a repeat is redrawn)."""
    if not source_lines:
        raise ValueError("no source lines to expand")
    rng = random.Random(seed)
    out = list(source_lines[:n])
    seen = {line.split("||")[0] for line in out}
    while len(out) < n:
        for _ in range(_REDRAWS):
            line = _renumber(source_lines[rng.randrange(len(source_lines))], rng)
            question = line.split("||")[0]
            if question not in seen:
                break
        seen.add(question)
        out.append(line)
    return out


_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Leo")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "plants", "coins")


def template_line(rng: random.Random) -> str:
    """One consistent word problem with 2-4 calculator steps, in iCoT format."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box = rng.randint(2, 40), rng.randint(2, 60)
    total = boxes * per_box
    sentences = [f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box."]
    steps = [f"<<{boxes}*{per_box}={total}>>"]
    if rng.random() < 0.7:
        given = rng.randint(1, total - 1)
        sentences.append(f"{name} gives {given} {item} to a friend.")
        steps.append(f"<<{total}-{given}={total - given}>>")
        total -= given
    if rng.random() < 0.6:
        price = rng.randint(2, 9)
        sentences.append(f"Each of the {item} left sells for ${price}.")
        steps.append(f"<<{total}*{price}={total * price}>>")
        total *= price
        question = "How many dollars does " + name + " make?"
    else:
        question = f"How many {item} does {name} have now?"
    if len(steps) < 2 or rng.random() < 0.3:
        bonus = rng.randint(1, 99)
        sentences.append(f"Then {name} finds {bonus} more.")
        steps.append(f"<<{total}+{bonus}={total + bonus}>>")
        total += bonus
    return " ".join(sentences) + " " + question + "||" + " ".join(steps) + f" #### {total}"


def synthetic_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [template_line(rng) for _ in range(n)]


def build_lines(n: int, seed: int, source: Path | None) -> tuple[list[str], str]:
    """(iCoT lines, a one-line description of where the text came from)."""
    if source is not None and source.is_file():
        source_lines = [ln.rstrip("\r\n") for ln in source.read_text(encoding="utf-8").splitlines() if ln.strip()]
        lines = expand_lines(source_lines, n, seed)
        origin = f"{len(source_lines)} real lines of {source.name}, renumbered copies (seed {seed})"
    else:
        lines = synthetic_lines(n, seed)
        origin = f"template generator (seed {seed}; no source file at {source})"
    return lines, origin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="records JSON to write (under a git-ignored folder, e.g. data/generated/)")
    parser.add_argument("--n", type=int, default=GSM8K_AUG_TRAIN_SIZE, help="problems (default: GSM8K-Aug's 385620)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=None,
                        help="iCoT text file to expand (default: shared/data/gsm8k_icot_valid.txt if present)")
    parser.add_argument("--write-text", action="store_true", help="also write the iCoT text beside the JSON (.txt)")
    args = parser.parse_args(argv)
    source = args.source or default_source()
    if args.source is not None and not args.source.is_file():
        parser.error(f"--source {args.source}: no such file")
    lines, origin = build_lines(args.n, args.seed, source)
    records = convert(lines, source=f"<{origin}>")
    out = Path(args.output)
    write_records(records, out)
    if args.write_text:
        out.with_suffix(".txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(records)} records to {out} ({out.stat().st_size / 1e6:.1f} MB) from {origin}")


if __name__ == "__main__":
    main()
