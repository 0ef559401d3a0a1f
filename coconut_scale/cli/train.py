"""Train Coconut through its whole curriculum with a DeepSpeed engine.

    deepspeed --num_gpus 8 --module coconut_scale.train recipes/llama8b_gsm.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 -m coconut_scale.train recipes/llama8b_gsm.yaml
    coconut-scale train recipes/demo_cpu.yaml          (= python -m coconut_scale.train ...)

Re-running the same command after a crash resumes from the newest complete checkpoint. A signal of
checkpoint.on_signal (SIGTERM, SIGUSR1) stops the run at the next optimizer step with a checkpoint and exit code 75.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from coconut_scale import distributed as dist
from coconut_scale.config.recipe import check_files, load_recipe
from coconut_scale.errors import one_line, run_cli


COLLECTIVE_FAILED_EXIT = 1
# gloo's own messages name neither gloo nor the collective ("Application timeout caused pair closure" is a gather
# that waited past the timeout for a frozen peer), so they are matched by their text.
_COLLECTIVE_ERRORS = re.compile(r"gloo|nccl|Timed out waiting|Connection (reset|closed) by peer|DistBackendError|"
                                r"caused pair closure|Pair is not connected|Socket (Timeout|unexpectedly closed)", re.I)


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer rank is gone or stuck (gloo's timeout or reset, NCCL's errors)."""
    import torch.distributed as torch_dist

    if dist.world_size() <= 1:
        return False
    return isinstance(error, getattr(torch_dist, "DistError", ())) or bool(_COLLECTIVE_ERRORS.search(str(error)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="coconut-scale train", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-5 batch.micro_batch_size=2")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from coconut_scale.train.preemption import PREEMPTED_EXIT, Preempted
    from coconut_scale.train.trainer import RunComplete, Trainer

    # torch.distributed deprecation notices fire on every ZeRO collective; they drown the training log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    check_files(recipe)
    trainer = Trainer(recipe)
    try:
        trainer.setup().fit()
    except RunComplete as complete:  # every rank read the same checkpoint: all exit 0 alike
        if dist.is_main():
            print(complete.line(), flush=True)
        dist.finish()
        return 0
    except Preempted as stopped:  # checkpoint.on_signal: saved at a step boundary, every rank exits alike
        if dist.is_main():
            print(stopped.line(), file=sys.stderr, flush=True)
        dist.finish()
        return PREEMPTED_EXIT
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        print(f"error: rank {dist.rank()}: a collective failed ({one_line(str(e).splitlines()[0])[:300]}): another "
              f"rank died or hung, see its own error; a collective waits at most distributed.timeout_s = "
              f"{recipe.distributed.timeout_s:g} s", file=sys.stderr, flush=True)
        return COLLECTIVE_FAILED_EXIT
    except KeyboardInterrupt:
        # What is on disk, not what the loop last noted: Ctrl-C may land between a checkpoint's rename into place
        # and the loop's record of it.
        on_disk = trainer.ckpts.latest() if trainer.ckpts is not None else None
        where = on_disk or trainer.last_checkpoint or "none yet (the run starts from scratch when re-run)"
        print(f"\ninterrupted at epoch {trainer.state.epoch}, step {trainer.state.step_in_epoch}; last checkpoint: "
              f"{where}. Re-run the same command to resume.", file=sys.stderr, flush=True)
        return 130
    finally:
        trainer.close()  # wandb finished and the run lock released on every exit: error, Ctrl-C, success
    dist.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
