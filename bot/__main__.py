"""`python -m bot ...` is the same as `chime ...`."""

import sys

from bot.cli import main

sys.exit(main())
