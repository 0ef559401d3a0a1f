"""What a checkpoint of a recipe weighs and how long saving it takes: the figure a preemption grace must exceed
(SLURM's `--signal` lead and KillWait, Kubernetes' terminationGracePeriodSeconds), and the free space a save needs.

DeepSpeed's shards hold, for every trainable parameter, the fp32 master copy and Adam's two moments (12 bytes);
below ZeRO-3 the model states also hold every parameter at the model's dtype (rank 0 writes them). Under ZeRO-3 the
model states are placeholders. The write is shared by the nodes, each at WRITE_GBPS_PER_NODE (an assumption: a
parallel filesystem's client typically writes 1-5 GB/s; measure yours with `dd` or fio). The manifest's read-back
hashes each rank's share (file_manifest.balanced_shares) at the measured speed of file_manifest.DIGEST.
"""

from __future__ import annotations

import math

from coconut_scale.config.memory import step_decoder_is_separate, trainable_params
from coconut_scale.config.model_shape import recipe_shape
from coconut_scale.model.shapes import param_count

WRITE_GBPS_PER_NODE = 2.0
GPUS_PER_NODE = 8
# Digests of a page-cached file, GB/s on one core (benchmarks/bench_digest.py; 2 cores shared, load 4-13: sha256
# 0.7-1.6, xxh3_128 7-16). The lower figures of a quiet core: hashing is not made to look cheaper than it is.
DIGEST_GBPS = {"sha256": 1.4, "xxh3_128": 7.0}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def checkpoint_bytes(recipe, shape: dict | None = None) -> int:
    """Expected size of one checkpoint of `recipe` (all ranks together)."""
    shape = shape or recipe_shape(recipe)
    models = 2 if step_decoder_is_separate(recipe) else 1
    optimizer = 12 * trainable_params(recipe, shape) * models
    stage = _zero_stage(recipe)
    module = 0 if stage == 3 else _DTYPE_BYTES[recipe.model.dtype] * param_count(shape) * models
    return optimizer + module


def _zero_stage(recipe) -> int:
    from coconut_scale.config.ds_config import build_ds_config
    from coconut_scale.config.batch_plan import resolve_batch
    from coconut_scale.config.model_shape import hidden_size

    plan = resolve_batch(recipe.batch, recipe.gpus_assumed, recipe.data.max_seq_len)
    return int(build_ds_config(recipe, plan, hidden_size(recipe)).get("zero_optimization", {}).get("stage", 0))


def save_seconds(recipe, world_size: int, shape: dict | None = None, digest: str = "xxh3_128") -> dict:
    # The manifest's digest is xxh3_128 over 256 MiB pieces (file_manifest.DIGEST): one core's speed is assumed.
    """{"bytes", "write_s", "hash_s", "total_s"} of one save at `world_size` ranks (GPUS_PER_NODE per node)."""
    total = checkpoint_bytes(recipe, shape)
    nodes = max(1, math.ceil(world_size / GPUS_PER_NODE))
    # Below ZeRO-3 rank 0 writes the whole model states alone; the optimizer shards are split across ranks.
    write_s = total / (nodes * WRITE_GBPS_PER_NODE * 1e9)
    hash_s = total / world_size / (DIGEST_GBPS[digest] * 1e9)
    return {"bytes": total, "write_s": write_s, "hash_s": hash_s, "total_s": write_s + hash_s}


def save_line(recipe, world_size: int) -> str:
    """The start-of-run line that tells the user how much grace a preemption needs."""
    from coconut_scale.train.storage import human_bytes

    try:
        cost = save_seconds(recipe, world_size)
    except (ValueError, KeyError):  # a model whose shape is unknown here: nothing to estimate
        return "checkpoint: size unknown (model shape unknown); time a save and give preemption more grace than that"
    signals = ", ".join(recipe.checkpoint.on_signal)
    grace = (f"a preemption signal ({signals}) needs at least that much grace before SIGKILL" if signals else
             "checkpoint.on_signal is empty: a preemption signal ends the run without a checkpoint")
    return (f"checkpoint: ~{human_bytes(cost['bytes'])} per save, ~{cost['total_s']:.1f} s at "
            f"{WRITE_GBPS_PER_NODE:g} GB/s per node; {grace}")
