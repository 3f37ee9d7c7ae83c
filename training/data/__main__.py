"""`python -m training.data prepare | verify` (the CLI lives in prepare.py)."""

import sys

from .prepare import main

sys.exit(main())
