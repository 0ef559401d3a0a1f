"""`python -m coconut_scale COMMAND ...`: the same as the `coconut-scale` console command (coconut_scale/cli/main.py)."""

import sys

from coconut_scale.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
