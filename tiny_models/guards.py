"""Tiny random-weight checkpoints in the baseline guards' architectures, built fully offline.

Each factory builds the real config class with random weights, a small byte-level BPE tokenizer
trained locally (the moderator's Qwen2 pre-tokenizer split, see ``tiny_models.moderator``) plus the family's
special tokens, the family's real processor, and writes everything with ``save_pretrained``, so the
guard adapters load them through the same ``from_pretrained`` path as the hub checkpoints. The
guards' own chat templates are not available offline; the adapters build their native prompts
themselves, so no chat template is saved here.

Config constraints (see STACK_NOTES "Tiny models of the baseline guards' architectures"):
- Mllama: ``<|image|>`` is the last token and the text ``vocab_size`` equals its id;
  ``vision_output_dim = hidden * (len(intermediate_layers_indices) + 1)``; vision ``image_size`` is
  the processor's tile size; ``max_num_tiles == max_image_tiles``.
- ShieldGemma 2 / Gemma3: tokenizer carries ``boi_token``/``eoi_token``/``image_token``;
  ``image_seq_length == mm_tokens_per_image``, a perfect square dividing the patch grid.
- LLaVA-OneVision: ``num_image_tokens = (image_size / patch)**2`` with
  ``vision_feature_select_strategy="full"``; the same ``image_grid_pinpoints`` on processor and config.
- Llama 4: vision ``intermediate_size = hidden / pixel_shuffle_ratio**2``;
  ``projector_input_dim == projector_output_dim == vision_output_dim``; ``image_token_index`` is
  ``<|patch|>``; processor ``patch_size`` equals the vision ``patch_size``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tiny_models import moderator as moderator_tiny
from tiny_models.moderator import tokenizer_corpus

VOCAB_SIZE = 640


def guard_corpus() -> list[str]:
    """Text the tiny BPEs are trained on: the moderator's corpus plus every guard's native prompt text."""
    from eval.guards.llama_guard_format import LLAMA_GUARD_3_CATEGORIES, LLAMA_GUARD_TASK
    from eval.guards.llavaguard import LLAVAGUARD_POLICY
    from eval.guards.shieldgemma_2 import SHIELDGEMMA2_INSTRUCTION, SHIELDGEMMA2_POLICIES

    texts = list(tokenizer_corpus())
    texts += [LLAMA_GUARD_TASK, LLAVAGUARD_POLICY, SHIELDGEMMA2_INSTRUCTION, *SHIELDGEMMA2_POLICIES.values()]
    texts += [f"{code}: {name}" for code, name in LLAMA_GUARD_3_CATEGORIES.items()]
    # Repeated so the verdict words become single tokens (ShieldGemma 2 reads the Yes/No logits).
    texts += ["Yes", "No", "safe", "unsafe", "Safe", "Unsafe", "S1,S2"] * 50
    texts += ['{"rating": "Unsafe", "category": "O1", "rationale": "x"}']
    return texts


def train_byte_level_bpe(special_tokens: Sequence[str], vocab_size: int = VOCAB_SIZE, corpus: Iterable[str] = ()):
    """The project's tiny byte-level BPE (``tiny_models.moderator``) on the guard corpus, specials at ids 0..n-1."""
    return moderator_tiny.train_byte_level_bpe(list(corpus) or guard_corpus(), vocab_size, special_tokens)


def _fast_tokenizer(tokenizer_object, **special: Any):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, model_max_length=131072, **special)


def _reload_tokenizer(tokenizer, out_dir: Path):
    """Save and reload, so ids and named special tokens are what ``from_pretrained`` will see."""
    from transformers import AutoTokenizer

    tok_dir = out_dir / "_tokenizer"
    tokenizer.save_pretrained(tok_dir)
    reloaded = AutoTokenizer.from_pretrained(tok_dir)
    for path in tok_dir.iterdir():
        path.unlink()
    tok_dir.rmdir()
    return reloaded


def _generation_config(eos_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id, do_sample=False)


# Llama 3 family special tokens (Llama Guard 3 Vision, Llama Guard 3 8B).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
MLLAMA_TILE = 28  # vision image_size == processor tile size; 2x2 patches of 14 px


def build_tiny_mllama(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Mllama (Llama Guard 3 Vision architecture) checkpoint with its real processor."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(LLAMA3_SPECIALS)
    tokenizer = _fast_tokenizer(
        bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    # <|image|> must be the very last id: the text vocab ends just before it (image_token_index == vocab_size).
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tokenizer = _reload_tokenizer(tokenizer, out_dir)
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tokenizer) - 1, "<|image|> must be the last token"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA3_SPECIALS}

    vision_hidden, intermediate_layers = 32, [0]
    config = MllamaConfig(
        vision_config={
            "hidden_size": vision_hidden,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_size": 64,
            "image_size": MLLAMA_TILE,
            "patch_size": 14,
            "max_num_tiles": 4,
            "intermediate_layers_indices": intermediate_layers,
            "vision_output_dim": vision_hidden * (len(intermediate_layers) + 1),
        },
        text_config={
            "vocab_size": image_id,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "cross_attention_layers": [1],
            "max_position_embeddings": 8192,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|eot_id|>"], ids["<|end_of_text|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        image_token_index=image_id,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # cross-attention gates start at 0 (tanh(0) = 0: image ignored); open them
        for name, param in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                param.fill_(1.0)
    model.generation_config = _generation_config(
        [ids["<|eot_id|>"], ids["<|end_of_text|>"]], ids["<|finetune_right_pad_id|>"]
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = MllamaImageProcessor(size={"height": MLLAMA_TILE, "width": MLLAMA_TILE}, max_image_tiles=4)
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


# Gemma 3 family special tokens (ShieldGemma 2).
GEMMA3_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA3_IMAGE_SIDE = 28  # 4x4 patches of 7 px, pooled to 2x2 = 4 image tokens
GEMMA3_IMAGE_TOKENS = 4


def build_tiny_gemma3(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny ShieldGemma 2 checkpoint (a Gemma3 image-text model behind ``ShieldGemma2ForImageClassification``).

    Saved with ``ShieldGemma2Config`` and ``ShieldGemma2Processor`` like ``google/shieldgemma-2-4b-it``;
    ``yes_token_index``/``no_token_index`` point at this tokenizer's ``Yes``/``No`` tokens.
    """
    import torch
    from transformers import (
        Gemma3ImageProcessor,
        ShieldGemma2Config,
        ShieldGemma2ForImageClassification,
        ShieldGemma2Processor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(GEMMA3_SPECIALS)
    tokenizer = _fast_tokenizer(
        bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer = _reload_tokenizer(tokenizer, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    yes_ids = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no_ids = tokenizer("No", add_special_tokens=False)["input_ids"]
    assert len(yes_ids) == 1 and len(no_ids) == 1, "the tiny vocab must hold 'Yes' and 'No' as single tokens"

    hidden, heads = 64, 4
    config = ShieldGemma2Config(
        text_config={
            "model_type": "gemma3_text",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "head_dim": hidden // heads,
            "query_pre_attn_scalar": hidden // heads,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 8192,
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": GEMMA3_IMAGE_SIDE,
            "patch_size": 7,
            "vision_use_head": False,
        },
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    # ShieldGemma2ForImageClassification reads these (defaults are the real Gemma vocab's ids).
    config.yes_token_index = yes_ids[0]
    config.no_token_index = no_ids[0]
    torch.manual_seed(seed)
    model = ShieldGemma2ForImageClassification(config)
    with torch.no_grad():  # the image projection starts at 0 (image ignored); give it random weights
        model.model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = Gemma3ImageProcessor(size={"height": GEMMA3_IMAGE_SIDE, "width": GEMMA3_IMAGE_SIDE})
    ShieldGemma2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=GEMMA3_IMAGE_TOKENS,
        chat_template=None,
    ).save_pretrained(out_dir)
    return out_dir


# Qwen2 ChatML special tokens plus LLaVA's placeholders (LlavaGuard 1.2).
LLAVA_OV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAVA_OV_IMAGE_SIDE = 28  # one 2x2 grid of 14 px patches per crop
LLAVA_OV_PINPOINTS = [[28, 28]]


def build_tiny_llava_onevision(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision (LlavaGuard 1.2 architecture: Qwen2 text, SigLIP vision) checkpoint."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(LLAVA_OV_SPECIALS)
    tokenizer = _fast_tokenizer(bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer = _reload_tokenizer(tokenizer, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_OV_SPECIALS}
    patch = 14
    num_image_tokens = (LLAVA_OV_IMAGE_SIDE // patch) ** 2
    config = LlavaOnevisionConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": LLAVA_OV_IMAGE_SIDE,
            "patch_size": patch,
            "vision_use_head": False,
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=LLAVA_OV_PINPOINTS,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config = _generation_config([ids["<|im_end|>"]], ids["<|endoftext|>"])
    model.save_pretrained(out_dir, safe_serialization=True)
    size = {"height": LLAVA_OV_IMAGE_SIDE, "width": LLAVA_OV_IMAGE_SIDE}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=LLAVA_OV_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        vision_feature_select_strategy="full",
    ).save_pretrained(out_dir)
    return out_dir


# Llama 4 family special tokens (Llama Guard 4).
LLAMA4_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
LLAMA4_TILE = 28  # 2x2 patches of 14 px; pixel shuffle 0.5 leaves one patch token per tile


def build_tiny_llama4(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny dense Llama 4 (Llama Guard 4 architecture) checkpoint with its real processor."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(LLAMA4_SPECIALS)
    tokenizer = _fast_tokenizer(
        bpe, bos_token="<|begin_of_text|>", eos_token="<|eot|>", pad_token="<|finetune_right_pad|>"
    )
    tokenizer = _reload_tokenizer(tokenizer, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA4_SPECIALS}
    patch, shuffle, vision_hidden, projector = 14, 0.5, 32, 64
    config = Llama4Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "intermediate_size_mlp": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "moe_layers": [],  # Llama Guard 4 is dense
            "num_local_experts": 1,
            "max_position_embeddings": 8192,
            "attention_chunk_size": 8192,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|eot|>"], ids["<|end_of_text|>"]],
            "pad_token_id": ids["<|finetune_right_pad|>"],
        },
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": int(vision_hidden / shuffle**2),
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": LLAMA4_TILE,
            "patch_size": patch,
            "pixel_shuffle_ratio": shuffle,
            "vision_output_dim": projector,
            "projector_input_dim": projector,
            "projector_output_dim": projector,
        },
        image_token_index=ids["<|patch|>"],
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
    )
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config)
    model.generation_config = _generation_config(
        [ids["<|eot|>"], ids["<|end_of_text|>"]], ids["<|finetune_right_pad|>"]
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = Llama4ImageProcessor(size={"height": LLAMA4_TILE, "width": LLAMA4_TILE}, max_patches=4)
    Llama4Processor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, pixel_shuffle_ratio=shuffle
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_llama3_text(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Llama 3 causal LM (Llama Guard 3 8B architecture) with a Llama 3 style tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(LLAMA3_SPECIALS)
    tokenizer = _fast_tokenizer(
        bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    tokenizer = _reload_tokenizer(tokenizer, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA3_SPECIALS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = _generation_config(
        [ids["<|eot_id|>"], ids["<|end_of_text|>"]], ids["<|finetune_right_pad_id|>"]
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


FACTORIES = {
    "mllama": build_tiny_mllama,
    "gemma3": build_tiny_gemma3,
    "llava_onevision": build_tiny_llava_onevision,
    "llama4": build_tiny_llama4,
    "llama3_text": build_tiny_llama3_text,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(FACTORIES))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(FACTORIES[args.architecture](args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
