#!/usr/bin/env python
"""Thin wrapper: see coconut_scale/data/converters/prontoqa.py (`python data/convert_prontoqa.py --help`)."""

import sys
from pathlib import Path

try:
    from coconut_scale.data.converters.prontoqa import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from coconut_scale.data.converters.prontoqa import main

if __name__ == "__main__":
    main()
