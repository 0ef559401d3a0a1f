"""`python -m coconut_scale.train`, `torchrun -m coconut_scale.train`, `deepspeed --module coconut_scale.train`."""

import sys

from coconut_scale.cli.train import main
from coconut_scale.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
