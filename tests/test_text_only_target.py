"""A text-only target (``images: false``) in the eval loop: it gets the dialogue's text alone, and its
replies are cached apart from a multimodal run's. Stub targets and no judge model: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.config import ConfigError, DefenceConfig, EvalConfig, JudgeConfig, TargetConfig, load_config
from eval.loop import EvalRun
from eval.stages.keys import target_sig
from eval.targets import ChatRequest, render_chat_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_EVAL = REPO_ROOT / "configs" / "eval" / "smollm2_cpu.yaml"


class JoiningTemplate:
    """A text-only tokenizer's ``apply_chat_template``: the messages' contents, joined."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class StubChatModel:
    """Renders each request with the real prompt rule (``render_chat_prompt``), so a text-only stub
    refuses an image exactly as ``HFChatModel`` does for a text-only checkpoint."""

    batches_internally = False

    def __init__(self, name: str, multimodal: bool, log: list[ChatRequest]):
        self.name, self.multimodal, self.log = name, multimodal, log

    def generate(self, requests, max_new_tokens):
        self.log.extend(requests)
        for request in requests:
            render_chat_prompt(JoiningTemplate(), request, self.multimodal, self.name)
        return [f"Sure, here is how. ({self.name})" for _ in requests]

    def close(self):
        pass


def _config(safemt_dir: Path, out_dir: Path, images: bool) -> EvalConfig:
    return EvalConfig(
        safemt_dir=str(safemt_dir),
        targets=[TargetConfig(model="stub", name="text-target", images=images)],
        defences=[DefenceConfig(kind="none")],
        judge=JudgeConfig(kind="refusal_match"),
        turns=[1, 2],
        limit=2,
        max_new_tokens=4,
        out_dir=str(out_dir),
        turns_to_detection=False,
    ).validate()


def test_a_text_only_target_with_images_false_gets_no_image_and_a_multimodal_reply_is_never_reused(
    safemt_dir, tmp_path
):
    requests: list[ChatRequest] = []
    loads = []

    def loader(multimodal):
        def load(cfg):
            loads.append(cfg.images)
            return StubChatModel(cfg.label, multimodal, requests)

        return load

    # The SafeMT sample has images: with images true a text-only target refuses them, clearly.
    with pytest.raises(ValueError, match="text-target: a text-only model cannot take .*images: false"):
        EvalRun(_config(safemt_dir, tmp_path / "refused", images=True), target_loader=loader(False)).run()
    assert any(r.image is not None for r in requests)

    out_dir = tmp_path / "eval"
    requests.clear()
    report = EvalRun(_config(safemt_dir, out_dir, images=False), target_loader=loader(False)).run()
    assert requests and all(r.image is None for r in requests)
    n_text_only = len(requests)
    rows = [json.loads(line) for line in (out_dir / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == n_text_only and report["results"]["text-target"]["none"]
    # config.json beside report.json records what the target saw.
    assert json.loads((out_dir / "config.json").read_text())["targets"][0]["images"] is False

    # The same run with images true in the same folder: the text-only replies are not reused; the
    # (now multimodal) target is loaded and asked everything again, with the images.
    requests.clear()
    EvalRun(_config(safemt_dir, out_dir, images=True), target_loader=loader(True)).run()
    assert loads == [True, False, True]
    assert len(requests) == n_text_only and any(r.image is not None for r in requests)


def test_the_reply_cache_key_differs_between_images_true_and_false(safemt_dir, tmp_path):
    run = EvalRun(_config(safemt_dir, tmp_path / "eval", images=True))
    with_images, text_only = TargetConfig(model="m", images=True), TargetConfig(model="m", images=False)
    assert target_sig(run.config, with_images) != target_sig(run.config, text_only)


def test_the_shipped_smollm2_config_sends_its_text_only_target_no_image_and_images_must_be_a_bool(tmp_path):
    config = load_config(SMOLLM2_EVAL)
    assert [t.images for t in config.targets] == [False]
    assert TargetConfig(model="m").images is True  # a VLM target still sees the images by default
    assert load_config(SMOLLM2_EVAL, ["--targets.0.images", "true"]).targets[0].images is True
    with pytest.raises(ConfigError, match=r"targets\.0\.images.*true or false"):
        load_config(SMOLLM2_EVAL, ["--targets.0.images", "'no'"])
