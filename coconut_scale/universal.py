"""`python -m coconut_scale.universal`: the same as `coconut-scale universal` (see coconut_scale/cli/universal.py)."""

import sys

from coconut_scale.cli.universal import main
from coconut_scale.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
