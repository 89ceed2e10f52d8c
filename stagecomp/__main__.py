"""``python -m stagecomp``."""

import sys

from stagecomp.cli import main

sys.exit(main())
