"""Fine-tune the SafeMT dialogue moderator with TRL + PEFT.

    accelerate launch --config_file configs/accelerate/zero3.yaml train/sft.py --config configs/sft/qwen2_5_vl_7b_lora.yaml

Any field can be overridden on the command line (``--learning_rate 1e-4``), as W&B sweep agents do.
Restarting the same command resumes from the last checkpoint in ``output_dir`` (``--fresh_start`` to
start over); SIGTERM saves a checkpoint before exiting.
"""

import sys

from trl import ModelConfig, SFTConfig, TrlParser

from train.config import ModeratorScriptArguments
from train.run import train

if __name__ == "__main__":
    parser = TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    sys.exit(train(script_args, training_args, model_args))
