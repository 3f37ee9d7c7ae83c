"""`python -m eval.quality`: the quality suite (eval/quality/suite.py)."""

import sys

from eval.quality.suite import main

sys.exit(main())
