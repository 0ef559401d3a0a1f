"""The preemption check's cost per optimizer step: one all-reduce (MAX) of a one-element tensor, issued after the
step's micro-batches and read back with the non-finite guard's values (train/preemption.py), so it adds no host
sync. Measured here on gloo between processes on this machine (CPU); on GPUs it is an NCCL all-reduce of 4 bytes.

    python benchmarks/bench_stop_flag.py [--ranks 2] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, calls: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    flag = torch.zeros(1)
    for _ in range(100):  # warm the connections
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    elapsed = time.perf_counter() - start
    if rank == 0:
        queue.put(elapsed / calls)
    dist.barrier()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(args.ranks, port, args.calls, queue), nprocs=args.ranks, start_method="spawn")
    per_call = queue.get()
    print(f"one-element all-reduce (MAX), gloo, {args.ranks} ranks: {per_call * 1e6:.0f} us per call "
          f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
