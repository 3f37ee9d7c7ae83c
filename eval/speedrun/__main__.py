"""`python -m eval.speedrun`: the judge of recipes (eval/speedrun/cli.py)."""

import sys

from eval.speedrun.cli import main

sys.exit(main())
