"""`python -m coconut_scale.eval`: the same as `coconut-scale eval` (see coconut_scale/cli/eval.py)."""

import sys

from coconut_scale.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
