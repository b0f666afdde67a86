"""`python -m components.cli` (as `accelerate launch -m components.cli <stage>` runs it)."""

import sys

from components.cli import main

sys.exit(main())
