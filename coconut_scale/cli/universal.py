"""Make a run's checkpoint resumable on a different number of GPUs (DeepSpeed's universal checkpoint).

A ZeRO checkpoint stores each rank's shard of the weights and optimizer states, so it only loads at the world
size that wrote it. DeepSpeed's `ds_to_universal` rewrites the shards as one file per parameter; any world size
can load that. The loop state (epoch, step, sampler position) is world-size invariant already: the sampler
walks one global order, whatever the number of ranks.

    coconut-scale universal runs/llama8b_gsm            # newest checkpoint of the run (= python -m coconut_scale.universal)
    coconut-scale universal runs/llama8b_gsm/checkpoints/step-00001200

then re-run the training command with the new GPU count; it sees that the checkpoint came from another
world size and loads the universal copy (`step-N/ds_universal/`, written next to the original).
"""

from __future__ import annotations

import argparse
import sys

from coconut_scale.errors import run_cli
from coconut_scale.train.checkpoints import CheckpointManager


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="coconut-scale universal", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run's output_dir, its checkpoints/ directory, or one step-NNNNNNNN directory")
    p.add_argument("--workers", type=int, default=2, help="processes ds_to_universal uses to extract and merge")
    args = p.parse_args(argv)
    step_dir = CheckpointManager.step_dir_of(args.path)
    written_by = CheckpointManager.saved_world_size(step_dir)
    out = CheckpointManager.write_universal(step_dir, args.workers)
    print(f"universal checkpoint -> {out} (written by {written_by or '?'} ranks); re-run the training command "
          f"with any GPU count to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
