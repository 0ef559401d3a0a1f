"""A seeded GSM8k-Aug-style arithmetic generator: small word problems whose steps are iCoT expressions.

Each record: a question stating a start amount and `n_steps` changes ("Ann has 3 apples. She gets 4 more. Then she
doubles them. How many apples does Ann have?"), the steps as GSM8k-Aug writes them ("<<3+4=7>>", "<<7*2=14>>"),
the answer the final number. Every intermediate value stays a non-negative integer below `max_value`, so the
answer starts with a digit (CODI drops other records). Enough for a CPU smoke test of `method: codi`, and for a
small CODI-vs-Coconut comparison; not a benchmark.
"""

from __future__ import annotations

import random

from coconut_scale.data.synthetic_splits import disjoint_splits

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June")
THINGS = ("apples", "coins", "books", "stamps", "shells", "pens")


def _step(value: int, rng: random.Random, max_value: int) -> tuple[str, str, int]:
    """(sentence, expression, new value) of one change that keeps the value in [0, max_value)."""
    while True:
        kind = rng.choice(("add", "sub", "mul"))
        if kind == "add":
            k = rng.randint(1, 9)
            new, text, expr = value + k, f"She gets {k} more.", f"{value}+{k}"
        elif kind == "sub" and value > 1:
            k = rng.randint(1, value - 1)
            new, text, expr = value - k, f"She gives away {k}.", f"{value}-{k}"
        elif kind == "mul":
            k = rng.randint(2, 3)
            new, text, expr = value * k, f"Then she has {k} times as many.", f"{value}*{k}"
        else:
            continue
        if new < max_value:
            return text, f"<<{expr}={new}>>", new


def generate(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3, max_value: int = 100,
             exclude_questions: set[str] | None = None) -> list[dict]:
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    seen = set(exclude_questions or ())
    out: list[dict] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        value = rng.randint(1, 9)
        sentences, steps = [f"{name} has {value} {thing}."], []
        for _ in range(rng.randint(min_steps, max_steps)):
            text, expr, value = _step(value, rng, max_value)
            sentences.append(text)
            steps.append(expr)
        question = " ".join(sentences) + f" How many {thing} does {name} have?"
        if question in seen:
            continue
        seen.add(question)
        out.append({"question": question, "steps": steps, "answer": str(value)})
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct problems found for n={n}; widen max_steps or max_value")
    return out


def generate_splits(sizes: dict[str, int], seed: int = 0, exclude_questions: set[str] | None = None,
                    only: list[str] | None = None, **kwargs) -> dict[str, list[dict]]:
    """Disjoint splits of `generate`'s records (data/synthetic_splits.py: seeds, exclusion, `only`)."""
    return disjoint_splits(generate, sizes, seed, exclude_questions, only, **kwargs)
