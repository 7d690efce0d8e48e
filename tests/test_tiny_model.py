import json

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from moderator.contract import render_moderator_messages
from tests.conftest import SAMPLE_DIR
from tiny_models.images import write_placeholder_images
from tiny_models.moderator import IMAGE_SIDE


def test_tiny_checkpoint_is_complete_and_safetensors_only(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= names
    assert not any(n.endswith(".bin") for n in names)


def test_tiny_model_loads_from_disk_and_generates_on_an_image_dialogue(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    assert model.config.model_type == "qwen2_5_vl"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    record = json.loads((SAMPLE_DIR / "2_turn.json").read_text())[0]
    text = processor.apply_chat_template(render_moderator_messages(record["dialogue"]), add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.endswith("<|im_start|>assistant\n")
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (200, 10, 10))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 4
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 6
    # Greedy decoding from the same weights is deterministic.
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)


def test_placeholder_images_are_written_for_every_record(tmp_path):
    for path in SAMPLE_DIR.glob("*_turn.json"):
        (tmp_path / path.name).write_text(path.read_text())
    assert write_placeholder_images(tmp_path) == 52
    record = json.loads((SAMPLE_DIR / "1_turn.json").read_text())[0]
    with Image.open(tmp_path / record["image_path"]) as image:
        image.load()
        assert image.size == (64, 48)
