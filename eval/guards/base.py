"""The baseline-guard interface: a guard reads a dialogue (and its image) and says whether to block it.

Each adapter builds its guard's NATIVE prompt itself (``build_inputs``, pure and testable without a
model) and parses its native output (``parse``, pure, fail-closed: anything it cannot read is
``flagged=True, parse_error=True``). ``classify_batch`` runs the model: greedy generation with left
padding for the guards that answer in text, one forward pass for ShieldGemma 2's Yes/No scores.
``load_guard(kind, model_dir_or_hub_name, **options)`` picks the adapter by name.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from moderator.artefacts import flags
from moderator.contract import DialogueError
from moderator.images import DEFAULT_IMAGE_BOUNDS, ImageBounds
from moderator.loading import load_vlm, require_left_padding
from moderator.schema import RecordError
from moderator.schema import validate_dialogue as validate_record_dialogue

# kind -> "module:Class"; modules are imported on demand so one guard's imports cannot break another.
GUARD_KINDS: dict[str, str] = {
    "llama_guard_3_vision": "eval.guards.llama_guard_3_vision:LlamaGuard3Vision",
    "llama_guard_4": "eval.guards.llama_guard_4:LlamaGuard4",
    "shieldgemma_2": "eval.guards.shieldgemma_2:ShieldGemma2",
    "llavaguard": "eval.guards.llavaguard:LlavaGuard",
    "llama_guard_3_text": "eval.guards.llama_guard_3_text:LlamaGuard3Text",
}


@dataclass(frozen=True)
class GuardResult:
    flagged: bool
    categories: tuple[str, ...]  # guard-native category codes ("S1", "O2", "dangerous"); empty when not flagged
    score: float | None  # P(unsafe) or max P(Yes) when the guard gives one
    parse_error: bool
    raw: str  # the guard's decoded answer (ShieldGemma 2: its per-policy P(Yes) as JSON)


@dataclass(frozen=True)
class GuardPrompt:
    """One model input: the fully rendered prompt text (special tokens and image placeholders in place)."""

    text: str
    images: tuple[Image.Image, ...] = ()  # in the order of their placeholders in ``text``
    policy: str | None = None  # ShieldGemma 2: the policy this prompt asks about


def fail_closed(raw: str) -> GuardResult:
    """What every parser returns for output it cannot read: block, and say so."""
    return GuardResult(flagged=True, categories=(), score=None, parse_error=True, raw=raw)


def validate_dialogue(
    dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image], index: int = 0
) -> list[dict[str, str]]:
    """The record schema's dialogue check (``moderator.schema.validate_dialogue``: roles alternate from a
    user turn and end on one, string contents), plus the guards' own rule: at most one image, a PIL image
    (it belongs to the first user turn). ``DialogueError`` names the dialogue index and the field."""
    where = f"dialogue {index}"
    plain = list(dialogue) if isinstance(dialogue, Sequence) and not isinstance(dialogue, str) else dialogue
    try:
        messages = validate_record_dialogue(plain, expected_turns=None)
    except RecordError as exc:
        raise DialogueError(f"{where}: {exc}") from None
    if len(images) > 1:
        raise DialogueError(f"{where}: got {len(images)} images; the guards take at most one (first user turn)")
    for image in images:
        if not isinstance(image, Image.Image):
            raise DialogueError(f"{where}: images must be PIL images, got {type(image).__name__}")
    return messages


class Guard(ABC):
    """A baseline guard. Subclasses set ``kind``/``name`` and implement the three methods below."""

    kind: ClassVar[str]
    name: str

    def __init__(self, model: Any = None, processor: Any = None, *, name: str | None = None):
        self.model = model
        self.processor = processor
        self.name = name or self.kind

    @abstractmethod
    def build_inputs(self, dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image]) -> list[GuardPrompt]:
        """The guard's native prompt(s) for one dialogue. Pure: needs no model."""

    @abstractmethod
    def parse(self, output: Any) -> GuardResult:
        """Turn the guard's native output into a ``GuardResult``. Pure and fail-closed."""

    @abstractmethod
    def classify_batch(
        self, dialogues: Sequence[Sequence[Mapping[str, Any]]], images: Sequence[Sequence[Image.Image]]
    ) -> list[GuardResult]:
        """Classify many dialogues; ``images[i]`` holds dialogue ``i``'s images (zero or one)."""

    def classify(self, dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image] = ()) -> GuardResult:
        return self.classify_batch([dialogue], [list(images)])[0]

    def _require_model(self) -> None:
        if self.model is None or self.processor is None:
            raise RuntimeError(f"{self.name}: no model loaded; build it with load_guard({self.kind!r}, path)")

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def check_supported(cls) -> None:
        """Raise before loading when the installed libraries are known to break this guard."""
        return None

    model_loader: ClassVar[str] = "transformers:AutoModelForImageTextToText"
    processor_loader: ClassVar[str] = "transformers:AutoProcessor"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        min_pixels: int | None = DEFAULT_IMAGE_BOUNDS.min_pixels,
        max_pixels: int | None = DEFAULT_IMAGE_BOUNDS.max_pixels,
        **options: Any,
    ) -> Guard:
        """Load weights (safetensors only) and processor through ``moderator.loading.load_vlm``: CUDA in
        bfloat16 when present, else CPU in float32, unless ``device``/``dtype`` say otherwise. The pixel
        bounds apply to processors with a pixel budget (Qwen2-VL style); the others keep their fixed size."""
        cls.check_supported()
        model, processor = load_vlm(
            path,
            device=device,
            dtype=dtype,
            model_cls=_import(cls.model_loader),
            processor_cls=_import(cls.processor_loader),
            trust_remote_code=trust_remote_code,
            revision=revision,
            image_bounds=ImageBounds(min_pixels, max_pixels),
        )
        return cls(model, processor, **options)


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


class GenerativeGuard(Guard):
    """A guard that answers in text: render the native prompt, generate greedily, parse the answer.

    ``verdict_prefix`` is what the guard emits before its verdict word (Llama Guard 3 Vision and 4
    start with a blank line); it is appended to the prompt so the first generated token is the
    verdict and ``score_words`` (safe word, unsafe word) give P(unsafe) from that step's logits.
    """

    verdict_prefix: ClassVar[str] = ""
    score_words: ClassVar[tuple[str, str] | None] = None
    default_max_new_tokens: ClassVar[int] = 16

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        name: str | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        threshold: float | None = None,
    ):
        """``threshold``: if set, flag when the score is at least this (the text still gives the categories);
        if ``None`` the guard's own text verdict decides."""
        super().__init__(model, processor, name=name)
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.threshold = threshold

    def classify_batch(
        self, dialogues: Sequence[Sequence[Mapping[str, Any]]], images: Sequence[Sequence[Image.Image]]
    ) -> list[GuardResult]:
        if len(dialogues) != len(images):
            raise ValueError(f"got {len(dialogues)} dialogues but {len(images)} image lists")
        prompts = []
        for i, (dialogue, imgs) in enumerate(zip(dialogues, images, strict=True)):
            validate_dialogue(dialogue, imgs, index=i)
            [prompt] = self.build_inputs(dialogue, imgs)
            prompts.append(prompt)
        if not prompts:
            return []
        self._require_model()
        # Batched generation appends after the last position: left padding, set once by the loader. A
        # guard built around another processor can still render prompts, but not generate from them.
        require_left_padding(self.processor, self.name)
        results: list[GuardResult | None] = [None] * len(prompts)
        # Image and text-only prompts go in separate batches: processors cannot mix them in one call.
        for with_images in (True, False):
            group = [i for i, p in enumerate(prompts) if bool(p.images) == with_images]
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                for i, (text, score) in zip(chunk, self._generate([prompts[i] for i in chunk]), strict=True):
                    results[i] = self.apply_threshold(self.parse(text), score)
        return [r for r in results if r is not None]

    def apply_threshold(self, parsed: GuardResult, score: float | None) -> GuardResult:
        """Attach the score; with ``threshold`` set the score decides the flag (unparseable answers stay flagged)."""
        flagged = parsed.flagged
        if self.threshold is not None and score is not None and not parsed.parse_error:
            flagged = flags(score, self.threshold)  # fail-closed: a NaN or infinite score flags
        return GuardResult(
            flagged=flagged,
            categories=parsed.categories if flagged else (),
            score=score,
            parse_error=parsed.parse_error,
            raw=parsed.raw,
        )

    def _processor_inputs(self, prompts: Sequence[GuardPrompt]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "text": [p.text + self.verdict_prefix for p in prompts],
            "return_tensors": "pt",
            "padding": True,
            "add_special_tokens": False,  # the native prompts carry their own BOS
        }
        if any(p.images for p in prompts):
            kwargs["images"] = [list(p.images) for p in prompts]
        return kwargs

    def _score_ids(self) -> tuple[int, int] | None:
        """First-token ids of the safe and unsafe words (after the verdict prefix), if they differ."""
        if self.score_words is None:
            return None
        tokenizer = _tokenizer_of(self.processor)
        firsts = []
        for word in self.score_words:
            with_prefix = tokenizer(self.verdict_prefix + word, add_special_tokens=False)["input_ids"]
            prefix = (
                tokenizer(self.verdict_prefix, add_special_tokens=False)["input_ids"] if self.verdict_prefix else []
            )
            if with_prefix[: len(prefix)] != prefix or len(with_prefix) == len(prefix):
                return None  # the prefix and the word merge into one token: no clean verdict position
            firsts.append(with_prefix[len(prefix)])
        return (firsts[0], firsts[1]) if firsts[0] != firsts[1] else None

    @torch.no_grad()
    def _generate(self, prompts: Sequence[GuardPrompt]) -> list[tuple[str, float | None]]:
        inputs = self.processor(**self._processor_inputs(prompts))
        dtype = next(self.model.parameters()).dtype
        # Some image processors emit bf16 (Llama 4) or float64 pixels: match the model.
        inputs = {
            k: (v.to(self.model.device, dtype) if torch.is_floating_point(v) else v.to(self.model.device))
            for k, v in inputs.items()
        }
        tokenizer = _tokenizer_of(self.processor)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        score_ids = self._score_ids()
        if score_ids is None:
            return [(t, None) for t in texts]
        pair = out.logits[0][:, list(score_ids)].float().softmax(dim=-1)[:, 1]
        return list(zip(texts, pair.tolist(), strict=True))


def load_guard(kind: str, model: str | Path, **kwargs: Any) -> Guard:
    """Load a baseline guard by adapter name (see ``GUARD_KINDS``) from a local dir or hub name.

    Keyword arguments go to the adapter: ``device``, ``dtype``, ``trust_remote_code`` (off by
    default), ``revision``, ``min_pixels``/``max_pixels`` (pixel-budget processors only),
    ``threshold``, ``batch_size``, ``max_new_tokens`` (generative guards), ``policies``
    (ShieldGemma 2), ``include_dialogue`` (LlavaGuard), ``image_note`` (text-only Llama Guard).
    """
    if kind not in GUARD_KINDS:
        raise ValueError(f"unknown guard kind {kind!r}; known kinds: {', '.join(sorted(GUARD_KINDS))}")
    guard_cls = _import(GUARD_KINDS[kind])
    return guard_cls.from_pretrained(model, **kwargs)
