"""`coconut-scale COMMAND ...`: one console command for every tool of the package (also `python -m coconut_scale`).

    coconut-scale train recipes/demo_cpu.yaml optim.lr=1e-4
    coconut-scale check recipes/*.yaml --world-sizes 8 16
    deepspeed --num_gpus 8 --module coconut_scale train recipes/llama8b_gsm.yaml
    coconut-scale COMMAND --help

Each command is a module whose `main(argv)` does the work; the rest of the command line goes to it unchanged.
A user error (a recipe key, a file, a flag) ends as one `error: ...` line and exit code 2
(coconut_scale.errors.run_cli); COCONUT_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from coconut_scale.errors import run_cli


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("coconut_scale.cli.train", "train a recipe through its curriculum (resumes after a crash)"),
    "check": Command("coconut_scale.cli.check", "check recipes without a GPU: batch table, DeepSpeed config, memory"),
    "eval": Command("coconut_scale.cli.eval", "generation accuracy of an exported checkpoint on a data file"),
    "universal": Command("coconut_scale.cli.universal", "make a checkpoint resumable on another number of GPUs"),
    "noise-sweep": Command("coconut_scale.evaluate.noise_sweep", "accuracy when the continuous thoughts are perturbed"),
    "ablations": Command("coconut_scale.evaluate.ablations", "feedback off and fewer latents than trained, side by side"),
    "probing": Command("coconut_scale.evaluate.probing", "what each continuous thought decodes to under the LM head"),
    "decode-latents": Command("coconut_scale.evaluate.decode_latents",
                              "decode each latent step back into text with the step decoder (SIM-CoT)"),
    "curves": Command("coconut_scale.evaluate.curves", "training curves from a run's metrics.jsonl"),
}


def _command_list() -> str:
    width = max(map(len, COMMANDS))
    return "commands:\n" + "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coconut-scale", description=__doc__, epilog=_command_list(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     help="a command below (`coconut-scale COMMAND --help`: its options)")
    for name in COMMANDS:
        commands.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the command name is parsed here (--help, a missing or unknown command: argparse's own message and
    # exit); its module's parser reads everything after it, --help included.
    name = _parser().parse_args(argv[:1]).command
    command = importlib.import_module(COMMANDS[name].module)
    return run_cli(command.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
