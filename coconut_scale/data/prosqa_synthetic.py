"""A seeded ProsQA-style generator: the project's built-in data set, so nothing needs downloading.

Like ProsQA (Coconut paper, sec. 4.1), each problem is a random DAG over made-up concepts ("wumpus", "rempus"),
stated as shuffled facts "Every X is a Y." and "Tom is a X.", followed by "Is Tom a A or B?": exactly one
option is reachable from Tom. The steps are the shortest proof path ("Tom is a X.", "Every X is a Y.", ...),
the answer "Tom is a A.". Records carry ProsQA's graph keys (idx_to_symbol, edges, root, target, neg_target).

What keeps it honest (no surface shortcut to the answer, as in ProsQA):
- the wrong option (neg_target) is reachable from another person, so "the option some person reaches" does
  not give it away; both options are sinks (no outgoing edge) with the same number of parents, all concepts;
  their order in the question is random. (Counting parents, or picking the option a person is directly
  attached to, scores 50%; only tracing paths from the person helps.)
- every node gets a random "level" and edges only go up a level, so the graph is acyclic by construction;
  extra edges are rejected when they would let the root reach the wrong option.
What keeps it learnable by a small model from a few thousand examples: the graph size (`n_concepts`) and the
proof length (`min_depth`..`max_depth`) are arguments, with defaults well below ProsQA's (~23 nodes, 3-6 steps).
"""

from __future__ import annotations

import argparse
import random
from collections import deque
from pathlib import Path

from coconut_scale.data.converters import finish
from coconut_scale.data.synthetic_splits import disjoint_splits

PEOPLE = ("Tom", "Alex", "Davis", "Sally", "Max", "Polly", "Rex", "Stella", "Bob", "Oliver", "Fae", "Jack",
          "Carol", "Eva", "Sam", "Wren", "Gabriel")
_ONSETS = ("b", "br", "ch", "d", "f", "g", "gr", "gw", "h", "j", "k", "l", "n", "q", "r", "sc", "scr", "sh", "st",
           "t", "v", "w", "y", "z", "zh")
_CORES = ("umpus", "empus", "impus", "ompus", "orpus", "erpus", "elpus", "ilpus")


def concept_names() -> list[str]:
    """The fixed pool of made-up concept words (all start with a consonant, so "a X" reads right)."""
    return [onset + core for onset in _ONSETS for core in _CORES if not (onset == "q" and core[0] != "u")]


def concept_pool(n_names: int | None = None) -> list[str]:
    """The concept words problems draw from: the whole pool, or a fixed subset of `n_names` of them (the same for
    every seed and split). A smaller vocabulary lets a small model trained from scratch see each word often."""
    pool = concept_names()
    if n_names is None:
        return pool
    if not 2 <= n_names <= len(pool):
        raise ValueError(f"n_names={n_names} must be between 2 and the pool size {len(pool)}")
    return random.Random(0).sample(pool, n_names)


def _reachable(adj: dict[int, list[int]], start: int) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        for v in adj[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def _distance(adj: dict[int, list[int]], start: int, goal: int) -> int:
    return len(_shortest_path(adj, start, goal)) - 1


def _shortest_path(adj: dict[int, list[int]], start: int, goal: int) -> list[int]:
    prev, queue = {start: start}, deque([start])
    while queue:
        u = queue.popleft()
        if u == goal:
            break
        for v in adj[u]:
            if v not in prev:
                prev[v] = u
                queue.append(v)
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def generate_one(rng: random.Random, n_concepts: int = 10, min_depth: int = 2, max_depth: int = 4,
                 n_people: int = 2, extra_edges: float = 1.0, names: list[str] | None = None) -> dict:
    """One problem. `extra_edges` edges per concept are added on top of the two proof chains."""
    depth = rng.randint(min_depth, max_depth)
    neg_depth = rng.randint(min_depth, max_depth)
    if n_concepts < depth + neg_depth:
        raise ValueError(f"n_concepts={n_concepts} is too small for two chains of {depth} and {neg_depth} concepts")
    if n_people < 2:
        raise ValueError("n_people must be >= 2 (the asked person and one who reaches the wrong option)")
    people = rng.sample(PEOPLE, n_people)
    concepts = rng.sample(names or concept_names(), n_concepts)
    symbols = people + concepts  # node i is symbols[i]; people first
    root, other = 0, 1
    c_ids = list(range(n_people, n_people + n_concepts))
    rng.shuffle(c_ids)
    chain = c_ids[:depth]  # root -> chain[0] -> ... -> chain[-1] == target
    neg_chain = c_ids[depth:depth + neg_depth]  # other -> ... -> neg_target
    fillers = c_ids[depth + neg_depth:]
    target, neg_target = chain[-1], neg_chain[-1]

    # Levels make the graph a DAG: an edge u -> v needs level[u] < level[v]. People sit at level 0.
    level = {p: 0.0 for p in range(n_people)}
    for k, c in enumerate(chain):
        level[c] = float(k + 1)
    for k, c in enumerate(neg_chain):
        level[c] = float(k + 1) + rng.uniform(-0.4, 0.4)
    for c in fillers:
        level[c] = rng.uniform(0.5, max_depth + 0.5)
    # The options are sinks at the top so that any concept could plausibly lead to them.
    level[target] = level[neg_target] = max_depth + 1.0

    edges: list[tuple[int, int]] = []
    adj: dict[int, list[int]] = {i: [] for i in range(len(symbols))}

    def add(u: int, v: int) -> None:
        edges.append((u, v))
        adj[u].append(v)

    for path in ([root] + chain, [other] + neg_chain):
        for u, v in zip(path, path[1:]):
            add(u, v)

    def acceptable(u: int, v: int) -> bool:
        if u == v or v < n_people or level[u] >= level[v] or v in adj[u] or u in (target, neg_target):
            return False
        if v in (target, neg_target) and not into_options:
            return False
        from_root = _reachable(adj, root)
        # Reject edges that would make the wrong option provable for the asked person...
        if u in from_root and neg_target in _reachable(adj, v):
            return False
        # ... or shorten the proof below `depth` steps (else most problems collapse to 1-2 steps).
        if u in from_root and target in _reachable(adj, v):
            return _distance(adj, root, u) + 1 + _distance(adj, v, target) >= depth
        return True

    into_options = False  # the random edges below avoid the two options; they get their parents afterwards
    n_extra, tries = round(extra_edges * n_concepts), 0
    sources = list(range(len(symbols)))
    while n_extra > 0 and tries < 50 * n_concepts:
        tries += 1
        u, v = rng.choice(sources), rng.choice(c_ids)
        if acceptable(u, v):
            add(u, v)
            n_extra -= 1

    # Parents of the two options are added last, the same number for both: otherwise the rule above (the root
    # must not reach the wrong option) leaves the wrong option fewer parents, and "the option with more
    # parents" becomes a shortcut (about 60% right without reading a single path).
    into_options = True
    # Concepts only: a person may not be an option's parent (the root never can be, the proof would be one
    # step, so allowing the other person would mark the wrong option).
    candidates = {o: [u for u in c_ids if acceptable(u, o)] for o in (target, neg_target)}
    n_parents = min(rng.randint(1, max(1, round(1 + extra_edges * 2))),
                    1 + len(candidates[target]), 1 + len(candidates[neg_target]))
    for o in (target, neg_target):
        for u in rng.sample(candidates[o], n_parents - 1):
            add(u, o)

    path = _shortest_path(adj, root, target)
    steps = [f"{symbols[path[0]]} is a {symbols[path[1]]}."]
    steps += [f"Every {symbols[u]} is a {symbols[v]}." for u, v in zip(path[1:], path[2:])]

    facts = [f"{symbols[u]} is a {symbols[v]}." if u < n_people else f"Every {symbols[u]} is a {symbols[v]}."
             for u, v in edges]
    rng.shuffle(facts)
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {symbols[root]} a {options[0]} or {options[1]}?"
    return {
        "question": question,
        "steps": steps,
        "answer": f"{symbols[root]} is a {symbols[target]}.",
        "idx_to_symbol": symbols,
        "edges": [list(e) for e in edges],
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def generate(n: int, seed: int = 0, n_concepts: int = 10, min_depth: int = 2, max_depth: int = 4,
             n_people: int = 2, extra_edges: float = 1.0, exclude_questions: set[str] | None = None,
             n_names: int | None = None) -> list[dict]:
    """`n` problems, reproducible from `seed`; questions are unique (and not in `exclude_questions`)."""
    if not 1 <= min_depth <= max_depth:
        raise ValueError("need 1 <= min_depth <= max_depth")
    rng = random.Random(seed)
    names = concept_pool(n_names)
    if n_concepts > len(names):
        raise ValueError(f"n_concepts={n_concepts} exceeds the {len(names)} concept words (n_names={n_names})")
    seen = set(exclude_questions or ())
    records, attempts = [], 0
    while len(records) < n:
        attempts += 1
        if attempts > 20 * n + 100:
            raise RuntimeError(f"could not generate {n} distinct problems; enlarge the graphs")
        rec = generate_one(rng, n_concepts, min_depth, max_depth, n_people, extra_edges, names)
        if rec["question"] not in seen:
            seen.add(rec["question"])
            records.append(rec)
    return records


def generate_splits(sizes: dict[str, int], seed: int = 0, exclude_questions: set[str] | None = None,
                    only: list[str] | None = None, **kwargs) -> dict[str, list[dict]]:
    """Disjoint splits of `generate`'s records (data/synthetic_splits.py: seeds, exclusion, `only`)."""
    return disjoint_splits(generate, sizes, seed, exclude_questions, only, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Generate a ProsQA-style synthetic data set (random DAGs of made-up "
                                     "concepts) as Coconut JSON files PREFIX_{train,valid,test}.json.")
    parser.add_argument("prefix", help="output prefix, e.g. data/prosqa_synth")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-valid", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-concepts", type=int, default=10, help="made-up concepts per problem")
    parser.add_argument("--min-depth", type=int, default=2, help="fewest proof steps")
    parser.add_argument("--max-depth", type=int, default=4, help="most proof steps")
    parser.add_argument("--n-people", type=int, default=2, help="people per problem (>= 2)")
    parser.add_argument("--extra-edges", type=float, default=1.0, help="distractor edges per concept")
    parser.add_argument("--n-names", type=int, default=None, help="concept words to draw from (default: all)")
    args = parser.parse_args(argv)
    sizes = {"train": args.n_train, "valid": args.n_valid, "test": args.n_test}
    splits = generate_splits(sizes, seed=args.seed, n_concepts=args.n_concepts, min_depth=args.min_depth,
                             max_depth=args.max_depth, n_people=args.n_people, extra_edges=args.extra_edges,
                             n_names=args.n_names)
    for split, records in splits.items():
        if records:
            finish(records, Path(f"{args.prefix}_{split}.json"), f"prosqa_synthetic:{split}")


if __name__ == "__main__":
    main()
