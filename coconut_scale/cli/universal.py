"""Make a run's checkpoint resumable on a different number of GPUs (DeepSpeed's universal checkpoint).

A ZeRO checkpoint stores each rank's shard of the weights and optimizer states, so it only loads at the world
size that wrote it. DeepSpeed's `ds_to_universal` rewrites the shards as one file per parameter; any world size
can load that. The loop state (epoch, step, sampler position) is world-size invariant already: the sampler
walks one global order, whatever the number of ranks.

    python -m coconut_scale.universal runs/llama8b_gsm            # newest checkpoint of the run
    python -m coconut_scale.universal runs/llama8b_gsm/checkpoints/step-00001200

then re-run the training command with the new GPU count; it sees that the checkpoint came from another
world size and loads the universal copy (`step-N/ds_universal/`, written next to the original).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from coconut_scale.train.checkpoints import DS_TAG, STEP_DIR, UNIVERSAL_TAG, CheckpointManager


def step_dir_of(path: str | Path) -> Path:
    """The checkpoint directory named by `path`: a step directory itself, or a run's newest one."""
    path = Path(path)
    if STEP_DIR.match(path.name):
        if not (path / DS_TAG).is_dir():
            raise FileNotFoundError(f"{path} has no DeepSpeed checkpoint ({DS_TAG}/); is it a coconut_scale checkpoint?")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = CheckpointManager(root).latest()
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (step-NNNNNNNN/) under {root}")
    return latest


def convert(step_dir: Path, workers: int = 2) -> Path:
    """Write `step_dir/ds_universal` (atomically: a crash leaves no half-converted copy that looks valid)."""
    final, tmp = step_dir / UNIVERSAL_TAG, step_dir / f".tmp-{UNIVERSAL_TAG}"
    if final.is_dir():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir / DS_TAG),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    # A subprocess: the converter forks its own worker pools and must not inherit a process group of ours.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {step_dir / DS_TAG} (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    os.rename(tmp, final)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run's output_dir, its checkpoints/ directory, or one step-NNNNNNNN directory")
    p.add_argument("--workers", type=int, default=2, help="processes ds_to_universal uses to extract and merge")
    args = p.parse_args(argv)
    step_dir = step_dir_of(args.path)
    written_by = CheckpointManager.saved_world_size(step_dir)
    out = convert(step_dir, args.workers)
    print(f"universal checkpoint -> {out} (written by {written_by or '?'} ranks); re-run the training command "
          f"with any GPU count to resume from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
