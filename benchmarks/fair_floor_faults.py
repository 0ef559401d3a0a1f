"""Page faults and user/system CPU time of single train steps of bench_fair_floor's variants (CPU).

    python benchmarks/fair_floor_faults.py --shape 0 --variants floor,before,coconut --rounds 2 --compare-rev REV
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 python ...   # same
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fair_floor import SHAPES, Steps  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, default=0, help="index into bench_fair_floor.SHAPES")
    p.add_argument("--variants", default="floor,coconut")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compare-rev", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = Steps(SHAPES[args.shape], args.compare_rev)
    variants = args.variants.split(",")
    for v in variants:  # warm-up
        steps.run(v)
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            a, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            steps.run(v)
            b = resource.getrusage(resource.RUSAGE_SELF)
            print(f"{v:14s} wall {time.perf_counter() - t0:6.2f} s  user {b.ru_utime - a.ru_utime:6.2f} s  "
                  f"sys {b.ru_stime - a.ru_stime:5.2f} s  minor faults {b.ru_minflt - a.ru_minflt:8d}", flush=True)


if __name__ == "__main__":
    main()
