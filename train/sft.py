"""Fine-tune the SafeMT dialogue moderator with TRL + PEFT.

    accelerate launch --config_file configs/accelerate/zero3.yaml train/sft.py --config configs/sft/qwen2_5_vl_7b_lora.yaml

Any field can be overridden on the command line (``--learning_rate 1e-4``), as W&B sweep agents do
(the project's config convention, ``moderator.cli.parse_config``).
Restarting the same command resumes from the newest complete checkpoint in ``output_dir``
(``--fresh_start`` to start over); SIGTERM saves a checkpoint before exiting. A bad flag, config field
or input is one ``error:`` line and exit code 2 (``SAFEMT_DEBUG=1`` adds the traceback). The Hub token
comes from ``HF_TOKEN``; a ``--hub_token`` is moved there and never saved.
"""

import sys

from trl import ModelConfig, SFTConfig

from moderator.cli import parse_config, run_cli
from moderator.taxonomy import TaxonomyError
from train.config import ModeratorScriptArguments
from train.provenance import redact_argv
from train.run import train


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv[:] = redact_argv(sys.argv)  # W&B records the command line with the run
    script_args, training_args, model_args = parse_config(
        (ModeratorScriptArguments, SFTConfig, ModelConfig),
        argv,
        prog="train/sft.py",
        description="Fine-tune the SafeMT dialogue moderator with TRL + PEFT.",
    )
    return train(script_args, training_args, model_args)


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(TaxonomyError,)))
