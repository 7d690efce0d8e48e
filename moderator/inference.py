"""Run a moderator checkpoint: ``Moderator.from_pretrained(dir).moderate(dialogue, images)``.

This is what eval, export's equivalence check and the serving stack import. P(unsafe) is read
from the logits at the verdict position (a calibrated score for thresholds and AUPRC); the
category and intent come from greedy generation parsed by the shared, fail-closed parser.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moderator.contract import (
    MODERATOR_CONFIG_FILE,
    PROMPT_FORMAT_VERSION,
    TAXONOMY_FILE,
    parse_verdict,
    render_moderator_messages,
    verdict_choice_token_ids,
)
from moderator.schema import SAFEMT_IMAGE_TURNS
from moderator.taxonomy import UNKNOWN_CATEGORY, Taxonomy, load_taxonomy


@dataclass(frozen=True)
class Verdict:
    verdict: str
    category: str | None
    intent: str | None
    p_unsafe: float
    policy: str | None
    parse_error: bool = False
    raw: str = ""

    @property
    def flagged(self) -> bool:
        return self.verdict == "unsafe"


def load_model_and_processor(path: str | Path, trust_remote_code: bool = False, dtype: Any = "auto"):
    """Load a merged checkpoint or a PEFT adapter directory (its base is read from the adapter config)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        # AutoPeftModelForCausalLM does not map VLMs: load the base as image-text-to-text, then the adapter.
        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        base_model = AutoModelForImageTextToText.from_pretrained(
            base, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        model = PeftModel.from_pretrained(base_model, path)
        processor_source = path if (path / "processor_config.json").exists() else base
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        processor_source = path
    processor = AutoProcessor.from_pretrained(processor_source, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return model.eval(), processor


class ModeratorConfigError(ValueError):
    """A checkpoint was trained with another prompt format or taxonomy than the one it would be served with."""


def serving_contract(path: str | Path, taxonomy: Taxonomy | None = None) -> tuple[Taxonomy, float | None]:
    """The taxonomy and decision threshold a checkpoint must be served with.

    An export ships ``moderator_config.json`` and its own ``taxonomy.yaml``; a training output
    records its taxonomy in ``moderator_run.json``. The prompt-format version and the category ids
    must match what it was trained on, or the moderator would be shown another prompt, or parse its
    categories against another list (all flagged as ``unknown``, silently). Policy texts may differ:
    the moderator never sees them, so they can be edited without retraining.
    """
    path = Path(path)
    config_file, run_file = path / MODERATOR_CONFIG_FILE, path / "moderator_run.json"
    source = config_file if config_file.is_file() else run_file if run_file.is_file() else None
    if source is None:
        return taxonomy or load_taxonomy(), None
    recorded = json.loads(source.read_text())
    threshold = None
    if source == config_file:
        shipped = load_taxonomy(path / recorded.get("taxonomy_file", TAXONOMY_FILE))
        recorded = {**recorded, **shipped.provenance()}
        threshold = recorded.get("decision_threshold")
        taxonomy = taxonomy or shipped
    taxonomy = taxonomy or load_taxonomy()
    version = recorded.get("prompt_format_version")
    if version is not None and str(version) != PROMPT_FORMAT_VERSION:
        raise ModeratorConfigError(
            f"{source}: trained with prompt format {version}, this code renders format {PROMPT_FORMAT_VERSION}"
        )
    if not taxonomy.matches(recorded):
        raise ModeratorConfigError(
            f"{source}: trained with other taxonomy categories than {taxonomy.path}; serve it with the "
            "taxonomy it was trained on (policy texts may differ, category ids may not)"
        )
    return taxonomy, threshold


def resolve_threshold(path: str | Path, threshold: float | None = None) -> float:
    """Explicit threshold, else the one the checkpoint ships (moderator_config.json, manifest.json), else 0.5."""
    if threshold is not None:
        return float(threshold)
    path = Path(path)
    for name in (MODERATOR_CONFIG_FILE, "manifest.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("decision_threshold")
            if value is not None:
                return float(value)
    return 0.5


class Moderator:
    def __init__(self, model: Any, processor: Any, taxonomy: Taxonomy | None = None, threshold: float = 0.5):
        self.model = model
        self.processor = processor
        # Batched scoring reads the last position and generation appends there: padding must be left.
        processor.tokenizer.padding_side = "left"
        self.taxonomy = taxonomy or load_taxonomy()
        self.threshold = threshold
        self._prefix, self._safe_id, self._unsafe_id = verdict_choice_token_ids(processor.tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        threshold: float | None = None,
        trust_remote_code: bool = False,
        taxonomy: Taxonomy | None = None,
    ) -> Moderator:
        """Load a checkpoint with the taxonomy and threshold it ships (an explicit one must match it)."""
        taxonomy, _ = serving_contract(path, taxonomy)
        model, processor = load_model_and_processor(path, trust_remote_code=trust_remote_code)
        return cls(model, processor, taxonomy=taxonomy, threshold=resolve_threshold(path, threshold))

    def prompt_texts(
        self, dialogues: Sequence[Sequence[Mapping[str, Any]]], image_turns: Sequence[Sequence[int]]
    ) -> list[str]:
        return [
            self.processor.apply_chat_template(
                render_moderator_messages(d, turns, self.taxonomy), add_generation_prompt=True, tokenize=False
            )
            for d, turns in zip(dialogues, image_turns, strict=True)
        ]

    def _inputs(self, texts: list[str], images: Sequence[Sequence[Any]]):
        flat = [image for per_dialogue in images for image in per_dialogue]
        inputs = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        return inputs.to(self.model.device)

    @torch.no_grad()
    def p_unsafe(self, texts: list[str], images: Sequence[Sequence[Any]]) -> list[float]:
        """P(unsafe) from the two verdict tokens' logits after the shared ``verdict: `` prefix."""
        prefix = self.processor.tokenizer.decode(self._prefix)
        inputs = self._inputs([t + prefix for t in texts], images)
        # Left padding: the last position is real. Only its logits are needed (not vocab x length).
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        pair = torch.stack([logits[:, self._safe_id], logits[:, self._unsafe_id]], dim=-1).float()
        return pair.softmax(dim=-1)[:, 1].tolist()

    @torch.no_grad()
    def generate(self, texts: list[str], images: Sequence[Sequence[Any]], max_new_tokens: int = 64) -> list[str]:
        inputs = self._inputs(texts, images)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def moderate_batch(
        self,
        dialogues: Sequence[Sequence[Mapping[str, Any]]],
        images: Sequence[Sequence[Any]],
        image_turns: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = 64,
    ) -> list[Verdict]:
        if image_turns is None:
            image_turns = [SAFEMT_IMAGE_TURNS[: len(imgs)] for imgs in images]
        return self.moderate_texts(self.prompt_texts(dialogues, image_turns), images, max_new_tokens)

    def moderate_rendered(
        self, prompts: Sequence[Sequence[Mapping[str, Any]]], images: Sequence[Sequence[Any]], max_new_tokens: int = 64
    ) -> list[Verdict]:
        """Moderate prompts already rendered by the contract (e.g. a prepared dataset's messages minus the target)."""
        texts = [
            self.processor.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts
        ]
        return self.moderate_texts(texts, images, max_new_tokens)

    def moderate_texts(
        self, texts: list[str], images: Sequence[Sequence[Any]], max_new_tokens: int = 64
    ) -> list[Verdict]:
        scores = self.p_unsafe(texts, images)
        raws = self.generate(texts, images, max_new_tokens=max_new_tokens)
        verdicts = []
        for raw, score in zip(raws, scores, strict=True):
            parsed = parse_verdict(raw, self.taxonomy)
            # The calibrated score decides the flag; the text supplies category and intent. An
            # unparseable answer flags regardless (fail-closed) and is reported via parse_error.
            flagged = score >= self.threshold or parsed.parse_error
            category = (parsed.category or UNKNOWN_CATEGORY) if flagged else None
            verdicts.append(
                Verdict(
                    verdict="unsafe" if flagged else "safe",
                    category=category,
                    intent=parsed.intent if flagged else None,
                    p_unsafe=score,
                    policy=self.taxonomy.policy_for(category) if category else None,
                    parse_error=parsed.parse_error,
                    raw=raw,
                )
            )
        return verdicts

    def moderate(
        self,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
    ) -> Verdict:
        turns = None if image_turns is None else [image_turns]
        return self.moderate_batch([dialogue], [list(images)], turns)[0]


def main() -> None:
    import argparse

    from PIL import Image

    from moderator.schema import parse_safemt_record

    parser = argparse.ArgumentParser(description="Moderate SafeMT dialogues with a moderator checkpoint.")
    parser.add_argument("--model", required=True, help="merged checkpoint, adapter dir or hub name")
    parser.add_argument("--safemt-file", required=True, help="a <k>_turn.json file; images resolve next to it")
    parser.add_argument("--limit", type=int, default=3)
    args = parser.parse_args()
    moderator = Moderator.from_pretrained(args.model)
    path = Path(args.safemt_file)
    for raw in json.loads(path.read_text())[: args.limit]:
        record = parse_safemt_record(raw, moderator.taxonomy)
        with Image.open(path.parent / record.image_path) as image:
            verdict = moderator.moderate(record.dialogue, [image.convert("RGB")])
        print(
            f"{record.id}: verdict={verdict.verdict} category={verdict.category} p_unsafe={verdict.p_unsafe:.3f} "
            f"parse_error={verdict.parse_error}"
        )


if __name__ == "__main__":
    main()
