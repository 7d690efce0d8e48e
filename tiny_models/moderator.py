"""Write a complete tiny Qwen2.5-VL checkpoint to a directory, fully offline.

Random weights from the real config class (2 text layers, a 2-block vision tower), a byte-level
BPE tokenizer trained locally with Qwen2's pre-tokenizer and special tokens, Qwen2.5-VL's own chat
template (shipped by TRL), and the real image/video processors, all saved with ``save_pretrained``
so that everything else loads it through the same ``from_pretrained`` path as a hub checkpoint.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from assets.bases import qwen2_5_vl_chat_template
from moderator.taxonomy import load_taxonomy

# Qwen2's pre-tokenizer split pattern (from the hub tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_SIDE = 56  # a 56x56 image becomes 4 image-pad tokens with the pixel bounds below
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
VOCAB_SIZE = 1024

_BASE_CORPUS = """
The quick brown fox jumps over the lazy dog. Can you help me with this image? Sure! Here is the details.
How can I, what is, please answer the question, following above samples, tell me about, in this image.
I'm sorry, but I can't help with that. Here are some general tips. Please consult a professional.
User: Assistant: conversation moderate the conversation above. verdict: safe verdict: unsafe
category: intent: The user wants to know how to do something harmful. unsafe safe unknown
0123456789 ! ? . , ; : ' " ( ) [ ] { } - _ / \\ * & % $ # @ + = < > | ~
"""


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the moderator's own vocabulary plus common English."""
    from moderator.contract import system_prompt

    taxonomy = load_taxonomy()
    texts = [_BASE_CORPUS, system_prompt(taxonomy)]
    for scenario in taxonomy.scenarios:
        texts += [scenario.id, scenario.label, scenario.policy, f"category: {scenario.id}"]
    return texts


def train_byte_level_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()):
    """A ``tokenizers`` byte-level BPE with Qwen2's split regex; ``special_tokens`` get ids 0..n-1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE in Qwen2's layout, wrapped in ``Qwen2Tokenizer`` with the Qwen special tokens."""
    from transformers import Qwen2Tokenizer

    # Qwen's special tokens come after the learned vocabulary, as in the real checkpoints.
    tokenizer = train_byte_level_bpe(tokenizer_corpus(), vocab_size - len(SPECIAL_TOKENS))
    # Wrap vocab and merges in the class the real checkpoints load as.
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    qwen = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    qwen.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in qwen.get_vocab()]})
    qwen.chat_template = qwen2_5_vl_chat_template()
    return qwen


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen2.5-VL checkpoint (model, processor, tokenizer) to ``out_dir``."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = out_dir / "_tokenizer"
    build_tiny_tokenizer().save_pretrained(tok_dir)
    # Reload through the class real checkpoints use, so special tokens and template round-trip.
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    hidden, heads = 64, 4
    head_dim = hidden // heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "layer_types": ["full_attention", "full_attention"],
            "tie_word_embeddings": False,
            # mrope sections must sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,  # must equal the text hidden size
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(size=size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tokenizer,
        chat_template=qwen2_5_vl_chat_template(),
    )
    processor.save_pretrained(out_dir)
    for path in tok_dir.iterdir():
        path.unlink()
    tok_dir.rmdir()
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the tiny checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_qwen2_5_vl(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
