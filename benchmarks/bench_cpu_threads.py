"""Torch threads on a shared CPU: one demo-shaped training micro-step with 1 and with 2 intra-op threads.

The demo model's shape (SmolLM2-135M: 30 layers, hidden 576, vocabulary 49152; random weights, nothing
downloaded), one forward + backward of a 4 x 80 batch, the two thread counts interleaved in one process so that
both see the same load. On cores that other jobs keep busy, a 2-thread op waits at every barrier for whichever
thread the scheduler set aside: the figure to look at is the ratio, with the load printed beside it.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_threads.py [--repeats 3] [--out benchmarks/results/cpu_threads.json]

Target (issue 23): the README's demo command uses the thread count that is fastest at load >= the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/results/cpu_threads.json")
    args = parser.parse_args(argv)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 80))

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    load_before = os.getloadavg()
    for n in args.threads:  # warm-up
        torch.set_num_threads(n)
        step()
    times: dict[int, list[float]] = {n: [] for n in args.threads}
    for rep in range(args.repeats):
        for n in args.threads if rep % 2 == 0 else reversed(args.threads):
            torch.set_num_threads(n)
            times[n].append(step())
    load_after = os.getloadavg()
    base = statistics.median(times[args.threads[0]])
    print(f"{os.cpu_count()} cores, load {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| threads | s per micro-step (median) | vs {} thread(s) |".format(args.threads[0]))
    print("| --- | --- | --- |")
    for n in args.threads:
        print(f"| {n} | {statistics.median(times[n]):.2f} | {statistics.median(times[n]) / base:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": os.cpu_count(), "load_before": load_before, "load_after": load_after,
                               "seconds": {str(n): t for n, t in times.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
