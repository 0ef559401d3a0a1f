"""`python -m coconut_scale.eval`: the same as `coconut-scale eval` (see coconut_scale/cli/eval.py)."""

import sys

from coconut_scale.cli.eval import main
from coconut_scale.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
