"""``python -m serve EXPORT_DIR``: the moderation service (see the package docstring, serve/__init__.py)."""

import sys

from moderator.cli import run_cli
from serve.app import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
