"""`python -m dalle`: the same command as `dalle`."""

import sys

from dalle.cli import main

sys.exit(main())
