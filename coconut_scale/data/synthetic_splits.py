"""Disjoint train/val splits from a seeded record generator (data/prosqa_synthetic.py, data/arithmetic_synthetic.py)."""

from __future__ import annotations

from collections.abc import Callable


def disjoint_splits(generate: Callable[..., list[dict]], sizes: dict[str, int], seed: int = 0,
                    exclude_questions: set[str] | None = None, only: list[str] | None = None,
                    **kwargs) -> dict[str, list[dict]]:
    """Disjoint splits (no question shared), each from its own derived seed so one split's size does not change
    another's contents. `only`: generate just these splits, with `exclude_questions` holding the questions of the
    ones that already exist; a split regenerated beside the other generated split is then the one a full call
    writes (each split excludes the questions of the splits before it, which never held its own).
    `generate(n, seed=, exclude_questions=, **kwargs)` makes one split."""
    out: dict[str, list[dict]] = {}
    seen: set[str] = set(exclude_questions or ())
    for k, (split, n) in enumerate(sizes.items()):
        if only is not None and split not in only:
            continue
        out[split] = generate(n, seed=seed * 1000 + k, exclude_questions=seen, **kwargs)
        seen.update(r["question"] for r in out[split])
    return out
