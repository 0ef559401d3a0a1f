"""Process-group helpers. Everything works unchanged in a single process (no process group).

The training process group is started by train/strategy.py (DeepSpeed's init); evaluation joins a plain torch
group here (init_for_inference): it needs no DeepSpeed. Both give every collective the timeout of
`distributed.timeout_s` (DEFAULT_TIMEOUT_S for evaluation): a rank that died or hangs makes the others fail within
it, under any launcher, instead of after torch's default of 10 (NCCL) or 30 (gloo) minutes. NCCL enforces it
through its watchdog, which ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default); gloo raises in the
waiting collective.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300  # recipes: distributed.timeout_s


def timeout(seconds: float | None = None) -> timedelta:
    return timedelta(seconds=float(seconds if seconds is not None else DEFAULT_TIMEOUT_S))


def init_for_inference(timeout_s: float | None = None) -> None:
    """Join the launcher's process group when there is one (torchrun sets WORLD_SIZE); else stay single.
    Evaluation needs no DeepSpeed: every rank holds the whole model, a plain torch group sums the results."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout(timeout_s))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def env_world_size() -> int:
    """The world size the launcher asked for (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def finish() -> None:
    """Leave the process group at the end of a successful run, once every rank got here.

    NCCL is destroyed explicitly: left to process exit it warns of leaked communicators and can hang.
    Gloo is left to process exit on purpose: destroying a gloo context right after the last collective
    races with the peer's side of it (pytorch/gloo#155) and aborted a rank at exit in CI with
    "terminate called without an active exception", after its work was done and written.
    """
    if not dist.is_initialized():
        return
    barrier()
    if dist.get_backend() == "nccl":
        dist.destroy_process_group()


def all_reduce_max(value: int) -> int:
    if not dist.is_initialized() or world_size() == 1:
        return int(value)
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` reduced (MAX) over ranks, in place, with no read-back to the host."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_done(local_done: bool) -> bool:
    """True once every rank is done (used to keep generation loops in step)."""
    return all_reduce_max(0 if local_done else 1) == 0


def refuse_together(check) -> None:
    """Collective: run `check` (rank 0 does the work, the others pass a no-op); a UserError it raises on rank 0 stops
    every rank with the same message, so no rank is left waiting in a collective the others never reach."""
    from coconut_scale.errors import UserError

    refusal = None
    try:
        check()
    except UserError as e:
        refusal = e
    message = gather_objects(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if message is not None:
        raise UserError(message)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
