"""`python -m coconut_scale.check`: the same as `coconut-scale check` (see coconut_scale/cli/check.py)."""

import sys

from coconut_scale.cli.check import main
from coconut_scale.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
