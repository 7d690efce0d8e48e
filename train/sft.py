"""Fine-tune the SafeMT dialogue moderator with TRL + PEFT.

    accelerate launch --config_file configs/accelerate/zero3.yaml train/sft.py --config configs/sft/qwen2_5_vl_7b_lora.yaml

Any field can be overridden on the command line (``--learning_rate 1e-4``), as W&B sweep agents do.
Restarting the same command resumes from the newest complete checkpoint in ``output_dir``
(``--fresh_start`` to start over); SIGTERM saves a checkpoint before exiting. A bad flag, config field
or input is one ``error:`` line and exit code 2 (``SAFEMT_DEBUG=1`` adds the traceback). The Hub token
comes from ``HF_TOKEN``; a ``--hub_token`` is moved there and never saved.
"""

import sys

from trl import ModelConfig, SFTConfig, TrlParser

from moderator.cli import MissingInputError, UsageError, one_line, one_line_parser_errors, run_cli
from moderator.taxonomy import TaxonomyError
from train.config import ModeratorScriptArguments
from train.provenance import redact_argv
from train.run import train


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv[:] = redact_argv(sys.argv)  # W&B records the command line with the run
    parser = one_line_parser_errors(TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig), prog="train/sft.py"))
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except FileNotFoundError as exc:  # --config names no file
        raise MissingInputError(f"{exc.filename}: config file not found") from exc
    except ValueError as exc:  # unknown flag or config field, a value TrainingArguments refuses
        raise UsageError(one_line(exc)) from exc
    return train(script_args, training_args, model_args)


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(TaxonomyError,)))
