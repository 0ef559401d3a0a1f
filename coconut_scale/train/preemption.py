"""Preemption: the signals of `checkpoint.on_signal` (SIGTERM, SIGUSR1 by default) stop the run at the next optimizer
step with a checkpoint, instead of killing it and losing every step since the last save.

SLURM (`--signal=USR1@T`, a preemption, `scancel`), Kubernetes and torchrun's agent send SIGTERM or SIGUSR1 some
time before SIGKILL; often only some ranks get it (one node, or the launcher's children). So a handler on every rank
only notes the signal, and the ranks agree at each optimizer-step boundary: one all-reduce (MAX) of a one-element
tensor, read back with the step's other values in the non-finite guard's single read-back, so the loop gains no
host sync. The run then saves a verified checkpoint, prints one line naming it and exits with PREEMPTED_EXIT, which
launch/slurm.sbatch requeues.
"""

from __future__ import annotations

import signal
import threading
import time

import torch

from coconut_scale import distributed as dist

# EX_TEMPFAIL of sysexits.h, "try again later": the run stopped on request with a checkpoint, re-run to resume.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run stopped on a signal after saving `checkpoint`."""

    def __init__(self, signal_name: str, checkpoint, state, save_s: float | None):
        """`save_s`: how long the save took; None when nothing was trained since `checkpoint` (a signal in setup)."""
        self.signal_name, self.checkpoint, self.state, self.save_s = signal_name, checkpoint, state, save_s
        super().__init__(self.line())

    def line(self) -> str:
        s = self.state
        where = f"global step {s.global_step} (epoch {s.epoch}, step {s.step_in_epoch})"
        if self.save_s is None:
            saved = (f"nothing trained since checkpoint {self.checkpoint}" if self.checkpoint
                     else "nothing trained yet, no checkpoint")
        else:
            saved = f"checkpoint {self.checkpoint} saved and verified in {self.save_s:.1f} s"
        return (f"stopped by {self.signal_name} at {where}: {saved}; re-run the same command to resume "
                f"(exit code {PREEMPTED_EXIT})")


class StopSignals:
    """Notes the first of `names` this process receives; `agreed*` tells every rank whether any rank has."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        """Handlers for `names`; none outside the main thread, where Python allows no handler (a trainer driven
        from another thread then ends on these signals as before)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._note)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def flag(self, device: torch.device) -> torch.Tensor | None:
        """Collective: a one-element tensor, non-zero on every rank once any rank received a signal, reduced on the
        device without a read-back (the caller reads it with its own). None in a single process: nothing to agree."""
        if dist.world_size() == 1:
            return None
        t = torch.tensor([1.0 if self.received else 0.0], device=device)
        return dist.all_reduce_max_tensor(t)

    def agreed(self) -> bool:
        """Collective: whether any rank received a signal (the epoch boundary's check, with its own read-back)."""
        return dist.all_reduce_max(1 if self.received else 0) > 0

    def name(self) -> str:
        """The signal this rank received, or the one another rank did (told apart in the line only)."""
        return self.received or "a signal to another rank"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
