"""Export a trained moderator as a verified, self-contained serving directory.

    python -m export --checkpoint runs/demo/sft --out runs/demo/export [--adapter-only]
        [--eval-report runs/demo/eval/report.json] [--threshold 0.4] [--equivalence-samples 8]
        [--dataset runs/demo/data] [--push-to-hub org/name] [--wandb-artifact name]
    python -m export verify runs/demo/export

Logic in ``export/exporting.py``.
"""

import sys

from export.exporting import main

if __name__ == "__main__":
    sys.exit(main())
