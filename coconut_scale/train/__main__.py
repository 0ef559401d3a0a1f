"""`python -m coconut_scale.train`, `torchrun -m coconut_scale.train`, `deepspeed --module coconut_scale.train`."""

import sys

from coconut_scale.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
