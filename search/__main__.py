"""``python -m search``: see ``search/cli.py``."""

import sys

from .cli import main

sys.exit(main())
