"""Global batch = micro batch x world size x gradient accumulation, checked before any GPU is touched.

A recipe fixes the global batch (it is what the optimizer sees, so results must not depend on how many GPUs
ran them) and the micro batch (what fits in memory); the accumulation follows. When the numbers do not
divide, the error names every one of them and the micro batch sizes that would work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from coconut_scale.errors import UserError


class BatchMathError(UserError):
    pass


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int  # per GPU, per forward/backward
    grad_accum: int  # micro steps per optimizer step
    global_batch_size: int  # samples per optimizer step = micro x world x accum
    tokens_per_step: int  # upper bound: global_batch_size x max_seq_len (batches are padded to their longest)

    def to_dict(self) -> dict:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def micro_batch_for(batch_cfg, world_size: int) -> tuple[int, str]:
    """The micro batch at this world size and the recipe field it comes from."""
    per_ws = batch_cfg.micro_batch_per_world_size
    if world_size in per_ws:
        return per_ws[world_size], f"batch.micro_batch_per_world_size[{world_size}]"
    return batch_cfg.micro_batch_size, "batch.micro_batch_size"


def resolve_batch(batch_cfg, world_size: int, max_seq_len: int) -> BatchPlan:
    """The plan for `world_size` GPUs, or BatchMathError naming every number and what would work."""
    if world_size < 1:
        raise BatchMathError(f"world_size must be at least 1, got {world_size}")
    global_bs = batch_cfg.global_batch_size
    micro, field = micro_batch_for(batch_cfg, world_size)
    per_step = micro * world_size
    if global_bs % per_step:
        what = f"micro_batch_size {micro}" + ("" if field == "batch.micro_batch_size" else f" (from {field})")
        msg = f"global_batch_size {global_bs} is not divisible by {what} x world_size {world_size} = {per_step}; "
        if global_bs % world_size == 0:
            options = ", ".join(map(str, _divisors(global_bs // world_size)))
            msg += (f"pick micro_batch_size in {{{options}}} for world_size {world_size} "
                    f"(set batch.micro_batch_per_world_size.{world_size}=N)")
        else:
            fitting = ", ".join(map(str, _divisors(global_bs)))
            msg += (f"no micro_batch_size works because global_batch_size {global_bs} is not a multiple of "
                    f"world_size {world_size}: change batch.global_batch_size to a multiple of {world_size} "
                    f"or run on a world size in {{{fitting}}}")
        raise BatchMathError(msg)
    return BatchPlan(
        world_size=world_size,
        micro_batch_size=micro,
        grad_accum=global_bs // per_step,
        global_batch_size=global_bs,
        tokens_per_step=global_bs * max_seq_len,
    )


def batch_table(recipe, world_sizes: list[int] | None = None) -> list[BatchPlan]:
    """Plans for every world size of the recipe (or `world_sizes`); one BatchMathError lists all failures."""
    plans, problems = [], []
    for ws in world_sizes or recipe.batch.world_sizes:
        try:
            plans.append(resolve_batch(recipe.batch, ws, recipe.data.max_seq_len))
        except BatchMathError as e:
            problems.append(f"world_size {ws}: {e}")
    if problems:
        raise BatchMathError(f"recipe {getattr(recipe, 'source', '<recipe>')}: batch table has "
                             f"{len(problems)} impossible row(s):\n  - " + "\n  - ".join(problems))
    return plans


def format_batch_table(plans: list[BatchPlan]) -> str:
    """Aligned text table, one row per world size."""
    header = ("GPUs", "micro/GPU", "grad_accum", "global", "tokens/step<=")
    rows = [
        (str(p.world_size), str(p.micro_batch_size), str(p.grad_accum), str(p.global_batch_size),
         f"{p.tokens_per_step:,}")
        for p in plans
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
