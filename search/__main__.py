"""``python -m search``: see ``search/cli.py`` (``main`` finds and activates the ComfyUI host)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
