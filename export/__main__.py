"""Export a trained moderator as a verified, self-contained serving directory.

    python -m export --checkpoint runs/demo/sft --out runs/demo/export [--adapter-only]
        [--eval-report runs/demo/eval/report.json] [--threshold 0.4] [--equivalence-samples 8]
        [--dataset runs/demo/data] [--push-to-hub org/name] [--wandb-artifact name]
    python -m export verify runs/demo/export [--expect-manifest-sha256 HEX]

The threshold shipped is the one the ``--eval-report``'s tables were measured at; a ``--threshold``
that differs from it is refused (without a report: ``--threshold``, else 0.5). Logic in
``export/exporting.py``. Flags follow the project's convention (``moderator.cli.parse_config``:
``--config export.yaml`` sets any of them, ``--eval-report`` = ``--eval_report``); a bad flag is one
``error:`` line and exit code 2 (``SAFEMT_DEBUG=1`` adds the traceback).

The export prints the sha256 of its ``manifest.json`` and writes it into the model card: that digest
pins this export and no other (``--expect-manifest-sha256`` here, in ``serve`` and in eval
configs; ``Moderator.from_pretrained(..., expect_manifest_sha256=...)``).
"""

import sys

from export.exporting import main
from moderator.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
