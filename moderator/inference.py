"""Run a moderator checkpoint: ``Moderator.from_pretrained(dir).moderate(dialogue, images)``.

This is what eval, export's equivalence check and the serving stack import. P(unsafe) is read
from the logits at the verdict position (a calibrated score for thresholds and AUPRC); the
category and intent come from greedy generation parsed by the shared, fail-closed parser. Both come
from one ``generate`` call (``Moderator.generate_with_scores``); ``Moderator.p_unsafe`` is the
scoring pass alone (the trainer's score-only eval). When the score flags but the greedy answer is a
parseable ``verdict: safe`` (a threshold below 0.5), the category and intent come from a second,
forced continuation of the answer ``verdict: unsafe\ncategory:`` (``FORCED_UNSAFE_PREFIX``), run
for those rows only.

``answer="decision"`` (the default of per-turn moderation and sessions) decodes no text: one prefill of
the new tokens gives P(unsafe) at the verdict position, and for a flagged row one more forward step of
``FORCED_UNSAFE_PREFIX`` gives the category, the most probable taxonomy id at the category position
(``DecisionTokens``). ``answer="decision+intent"`` then generates the intent of flagged rows from the same
cache. The decision is fail-closed like the parser: where the model's own greedy tokens at the positions
it reads would not follow the answer format (the ``verdict: `` prefix, a verdict word, the end after
``safe``), the row is flagged with ``parse_error``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moderator.artefacts import (  # noqa: F401  (check_threshold, resolve_threshold: re-exported)
    DEFAULT_THRESHOLD,
    SERVING_CONFIG_FILE,
    ModeratorConfigError,
    check_threshold,
    flags,
    read_run_record,
    read_serving_config,
    resolve_threshold,
    trained_image_bounds,
)
from moderator.contract import (
    DECISION,
    DECISION_WITH_INTENT,
    FULL_ANSWER,
    PROMPT_FORMAT_VERSION,
    SAFE,
    TAXONOMY_FILE,
    UNSAFE,
    DialogueError,
    Verdict,
    check_answer_kind,
    parse_verdict,
    render_moderator_messages,
    render_target,
    verdict_choice_token_ids,
)
from moderator.images import ImageBounds
from moderator.loading import ModelLoadError, ModelNotFoundError, load_vlm, looks_like_a_path, require_left_padding
from moderator.manifest import check_sha256_hex, refuse_special_files, start_verification
from moderator.schema import SAFEMT_IMAGE_TURNS
from moderator.session import (
    VISION_PIXEL_INPUTS,
    ModerationSession,
    PrefixCache,
    SessionStore,
    common_prefix_length,
    pixel_digest,
)
from moderator.taxonomy import UNKNOWN_CATEGORY, Taxonomy, load_taxonomy


def _forced_unsafe_prefix() -> str:
    """The contract's unsafe target up to its category: ``verdict: unsafe\ncategory:``.

    The space before the category is left to the model: in the training target it is part of the
    category's first token (`` fraud``), and a forced lone space token would be one it never saw there.
    """
    marker = "\x00"
    target = render_target(UNSAFE, marker, "intent")
    return target[: target.index(marker)].rstrip(" ")


FORCED_UNSAFE_PREFIX = _forced_unsafe_prefix()


def load_model_and_processor(
    path: str | Path,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """A merged checkpoint or a PEFT adapter directory with its processor, through the shared loader."""
    return load_vlm(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def serving_contract(path: str | Path, taxonomy: Taxonomy | None = None) -> tuple[Taxonomy, float | None]:
    """The taxonomy and decision threshold a checkpoint must be served with.

    An export ships ``moderator_config.json`` and its own ``taxonomy.yaml``; a training output
    records its taxonomy in ``moderator_run.json``. The prompt-format version and the category ids
    must match what it was trained on, or the moderator would be shown another prompt, or parse its
    categories against another list (all flagged as ``unknown``, silently). Policy texts may differ:
    the moderator never sees them, so they can be edited without retraining.
    """
    path = Path(path)
    threshold = None
    recorded = read_serving_config(path)
    if recorded is not None:
        source: Path = path / SERVING_CONFIG_FILE
        shipped = load_taxonomy(path / recorded.get("taxonomy_file", TAXONOMY_FILE))
        recorded = {**recorded, **shipped.provenance()}
        threshold = recorded.get("decision_threshold")
        taxonomy = taxonomy or shipped
    else:
        found = read_run_record(path)
        if found is None:
            return taxonomy or load_taxonomy(), None
        recorded, source = found
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


def local_checkpoint(path: str | Path, revision: str | None = None) -> Path:
    """A local directory for ``path``: itself, or the Hub snapshot of a repo id (so an export pulled from
    the Hub is verified and served with its own config, threshold and taxonomy, like a local one)."""
    name = str(path)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists() or looks_like_a_path(name):
        raise ModelNotFoundError(f"{name}: moderator directory not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision))
    except Exception as exc:  # hub errors come in many types; their first line says which
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)
        raise ModelNotFoundError(
            f"{name}: not a local directory, and not a Hub model available here ({reason})"
        ) from None


def _checked_pin(expect_manifest_sha256: str | None, verify: bool) -> str | None:
    """The pinned manifest digest, lower-cased; refused when malformed or when nothing would be verified."""
    if expect_manifest_sha256 is None:
        return None
    if not verify:
        raise ModeratorConfigError(
            "expect_manifest_sha256 needs verify=True: an unverified load cannot check a pinned manifest"
        )
    try:
        return check_sha256_hex(expect_manifest_sha256, "expect_manifest_sha256")
    except ValueError as exc:
        raise ModeratorConfigError(str(exc)) from None


def _hub_blobs(snapshot: Path) -> Path | None:
    """The ``blobs`` folder a Hub snapshot's files link into (``<repo>/snapshots/<commit>/`` layout)."""
    return snapshot.parent.parent / "blobs" if snapshot.parent.name == "snapshots" else None


def _load_checkpoint(
    directory: Path,
    *,
    threshold: float | None,
    taxonomy: Taxonomy | None,
    device: str | None,
    dtype: str | torch.dtype | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
    image_bounds: ImageBounds | None,
) -> tuple[Any, Any, Taxonomy, float]:
    """``(model, processor, taxonomy, threshold)`` from one directory: every file read from it alone."""
    taxonomy, _ = serving_contract(directory, taxonomy)
    served_threshold = resolve_threshold(directory, threshold)
    model, processor = load_vlm(
        directory,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        image_bounds=image_bounds or trained_image_bounds(directory),
    )
    return model, processor, taxonomy, served_threshold


def _name_after(exc: BaseException, private: Path, local: Path) -> None:
    """Name the export itself where ``exc`` names the private folder its verified files were loaded from."""
    if exc.args and all(isinstance(arg, str) for arg in exc.args):
        exc.args = tuple(arg.replace(str(private), str(local)) for arg in exc.args)


class Moderator:
    def __init__(
        self, model: Any, processor: Any, taxonomy: Taxonomy | None = None, threshold: float = DEFAULT_THRESHOLD
    ):
        # Batched scoring reads the last position and generation appends there. The loader sets left
        # padding; a processor from elsewhere (e.g. the trainer's, shared with its collator) is checked,
        # not silently changed.
        require_left_padding(processor, "Moderator")
        self.model = model
        self.processor = processor
        self.taxonomy = taxonomy or load_taxonomy()
        self.threshold = check_threshold(threshold, "Moderator threshold")
        self._prefix, self._safe_id, self._unsafe_id = verdict_choice_token_ids(processor.tokenizer)
        config = getattr(model, "config", None)
        self._image_token_ids = [
            token
            for name in ("image_token_id", "image_token_index", "video_token_id")
            if (token := getattr(config, name, None)) is not None
        ]
        self._rope_delta_modules = [module for module in model.modules() if hasattr(module, "rope_deltas")]
        self._sessions: SessionStore | None = None
        # The layer that turns hidden states into vocabulary logits: P(unsafe) is read from its output.
        self._output_layer = model.get_output_embeddings()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        threshold: float | None = None,
        taxonomy: Taxonomy | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        verify: bool = True,
        expect_manifest_sha256: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        attn_implementation: str | None = None,
        image_bounds: ImageBounds | None = None,
    ) -> Moderator:
        """Load a checkpoint with the taxonomy, threshold and image bounds it ships.

        ``device``/``dtype``: see ``moderator.loading`` (default: CUDA in bfloat16 when present, else CPU
        in float32; ``device="auto"`` spreads the model over all GPUs). ``image_bounds`` overrides the
        bounds recorded at training.

        ``verify`` (the default): the directory must be an export made by ``python -m export`` and match
        its ``manifest.json`` (``moderator.manifest``): its small files are checked and then loaded as the
        bytes that were checked, its weights hashed while they load and before the moderator is returned;
        a mismatch, or no manifest at all, raises ``ManifestError`` naming the file. A Hub name is
        downloaded first and verified the same way (pin its commit with ``revision``).
        ``expect_manifest_sha256`` pins the export: a ``manifest.json`` whose sha256 differs is refused,
        naming both digests. ``verify=False`` loads an unverified development checkpoint (a training
        output, a hand-made directory); it must be explicit. A FIFO, socket or device anywhere in the
        directory is refused either way (``ManifestError``), never opened.
        """
        pin = _checked_pin(expect_manifest_sha256, verify)
        hub = not Path(str(path)).expanduser().is_dir()
        local = local_checkpoint(path, revision)
        refuse_special_files(local)  # before anything in it is opened: a FIFO would block the load
        options = {
            "threshold": threshold,
            "taxonomy": taxonomy,
            "device": device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attn_implementation,
            "image_bounds": image_bounds,
        }
        if not verify:
            return cls(*_load_checkpoint(local, **options))
        # The small files are checked now, the weights' hashes run alongside their load; everything is
        # loaded from what was checked (materialize), never re-read from the export afterwards.
        pending = start_verification(local, expect_manifest_sha256=pin, link_root=_hub_blobs(local) if hub else None)
        try:
            with pending.materialize() as verified:
                try:
                    loaded = _load_checkpoint(verified, **options)
                except Exception as exc:
                    pending.result()  # a tampered weight file explains a failed load: say that instead
                    _name_after(exc, verified, local)
                    raise
                model, processor, served_taxonomy, served_threshold = loaded
                if getattr(model.config, "_name_or_path", None) == str(verified):
                    model.config._name_or_path = str(local)
                if served_taxonomy.path.startswith(str(verified)):
                    served_taxonomy = dataclasses.replace(
                        served_taxonomy, path=str(local) + served_taxonomy.path[len(str(verified)) :]
                    )
            pending.result()  # raises ManifestError: the loaded model is dropped, never served
        finally:
            pending.close()
        return cls(model, processor, taxonomy=served_taxonomy, threshold=served_threshold)

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
        answer: str = FULL_ANSWER,
    ) -> list[Verdict]:
        """One verdict per dialogue; ``answer`` says what is decoded (``moderator.contract.ANSWER_KINDS``)."""
        if image_turns is None:
            image_turns = [SAFEMT_IMAGE_TURNS[: len(imgs)] for imgs in images]
        return self.moderate_texts(self.prompt_texts(dialogues, image_turns), images, max_new_tokens, answer)

    def rendered_texts(self, prompts: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
        """Chat-templated text of prompts already rendered by the contract (``prompt_of_prepared_row``)."""
        return [
            self.processor.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts
        ]

    def moderate_rendered(
        self,
        prompts: Sequence[Sequence[Mapping[str, Any]]],
        images: Sequence[Sequence[Any]],
        max_new_tokens: int = 64,
        answer: str = FULL_ANSWER,
    ) -> list[Verdict]:
        """Moderate prompts already rendered by the contract (e.g. a prepared dataset's messages minus the target)."""
        return self.moderate_texts(self.rendered_texts(prompts), images, max_new_tokens, answer)

    def moderate_texts(
        self, texts: list[str], images: Sequence[Sequence[Any]], max_new_tokens: int = 64, answer: str = FULL_ANSWER
    ) -> list[Verdict]:
        if check_answer_kind(answer) != FULL_ANSWER:  # one row at a time: a flagged row takes extra steps
            return [
                self._decide(PrefixCache(), text, list(imgs), max_new_tokens, answer)
                for text, imgs in zip(texts, images, strict=True)
            ]
        answers = self.generate_with_scores(texts, images, max_new_tokens)
        # Rows the score flags though their answer says safe: one more generate, on just those rows.
        disagreeing = [row for row, (raw, score) in enumerate(answers) if self._needs_forced_answer(raw, score)]
        forced: dict[int, str] = {}
        if disagreeing:
            continuations = self.generate(
                [texts[row] + FORCED_UNSAFE_PREFIX for row in disagreeing],
                [images[row] for row in disagreeing],
                max_new_tokens,
            )
            forced = {row: FORCED_UNSAFE_PREFIX + text for row, text in zip(disagreeing, continuations, strict=True)}
        return [self._verdict(raw, score, forced.get(row)) for row, (raw, score) in enumerate(answers)]

    @torch.no_grad()
    def generate_with_scores(
        self, texts: list[str], images: Sequence[Sequence[Any]], max_new_tokens: int = 64
    ) -> list[tuple[str, float]]:
        """Greedy answers and their P(unsafe), from one ``generate`` call (each image encoded once).

        P(unsafe) is read from the logits of the step that follows the generated ``verdict: `` prefix
        tokens: the same position and the same value (within float rounding) as :meth:`p_unsafe`, which
        appends the prefix to the prompt. A row whose answer does not start with exactly those prefix
        tokens (an untrained or drifting model; ``max_new_tokens`` too small to reach the verdict) has
        no verdict position in its generation: for those rows only, P(unsafe) comes from the scoring
        pass (:meth:`p_unsafe`), so the score never depends on whether the answer parsed. Such an
        answer does not parse either, so its verdict stays fail-closed (``unsafe``, ``parse_error``).
        The answers are the greedy ones: the forced unsafe answer of a row whose score flags a ``safe``
        answer is generated by :meth:`moderate_texts`. One call at a time per model: the score is read
        through a hook on its output layer.
        """
        raws, scores, _, _ = self._generate_scored(self._inputs(texts, images), max_new_tokens)
        missing = [row for row, score in enumerate(scores) if score is None]
        if missing:
            fallback = self.p_unsafe([texts[row] for row in missing], [images[row] for row in missing])
            for row, score in zip(missing, fallback, strict=True):
                scores[row] = score
        return list(zip(raws, scores, strict=True))

    def _generate_scored(
        self, inputs: Mapping[str, Any], max_new_tokens: int, **generate_kwargs: Any
    ) -> tuple[list[str], list[float | None], Any, torch.Tensor]:
        """``generate`` once: answers, P(unsafe) per row at its verdict position (None where the prefix was
        not generated), generate's output (its cache holds the prompt and the answer but its last token)
        and the (safe, unsafe) logits of every generated step, shaped (steps, batch, 2)."""
        # The two verdict logits are taken from the output layer as each step computes them: raw, as the
        # scoring pass reads them (generate's ``scores`` went through its logits processors, e.g. a
        # repetition penalty), without keeping a float32 vocabulary row per step and row (output_logits).
        pairs: list[torch.Tensor] = []
        choice = [self._safe_id, self._unsafe_id]

        def record(module: Any, args: Any, output: Any) -> None:
            pairs.append(output[:, -1, choice].float())

        handle = self._output_layer.register_forward_hook(record)
        try:
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                **generate_kwargs,
            )
        finally:
            handle.remove()
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        # One output-layer call per generated token, the last ones (a chunked prefill may add calls first).
        step_pairs = torch.stack(pairs[len(pairs) - generated.shape[1] :]) if generated.shape[1] else None
        raws = self.processor.batch_decode(generated, skip_special_tokens=True)
        position = len(self._prefix)  # the step after the prefix tokens predicts safe/unsafe
        prefix = torch.tensor(self._prefix, dtype=generated.dtype, device=generated.device)
        scores: list[float | None] = []
        for row in range(generated.shape[0]):
            if position < generated.shape[1] and torch.equal(generated[row, :position], prefix):
                scores.append(step_pairs[position, row].softmax(dim=-1)[1].item())
            else:
                scores.append(None)
        return raws, scores, out, step_pairs

    def _needs_forced_answer(self, raw: str, score: float) -> bool:
        """The score flags, but the answer parses as ``verdict: safe``: it names no category or intent.

        Not for a non-finite score: it flags (fail-closed), but says nothing the forced answer could use.
        """
        parsed = parse_verdict(raw, self.taxonomy)
        return (
            math.isfinite(score) and flags(score, self.threshold) and not parsed.parse_error and parsed.verdict == SAFE
        )

    def _verdict(self, raw: str, score: float, forced_raw: str | None = None) -> Verdict:
        """``forced_raw``: the forced unsafe answer, for a row where ``_needs_forced_answer`` holds."""
        parsed = parse_verdict(raw, self.taxonomy)
        # The calibrated score decides the flag; the text supplies category and intent. An
        # unparseable answer, or a score that is not a finite number, flags regardless (fail-closed);
        # parse_error reports the former, p_unsafe keeps the latter as computed.
        flagged = flags(score, self.threshold, parsed.parse_error)
        if flagged and forced_raw is not None:
            # The greedy answer said safe: category and intent are what the model says under an unsafe
            # verdict. A forced answer that does not parse leaves the category unknown.
            forced = parse_verdict(forced_raw, self.taxonomy)
            category, intent = (UNKNOWN_CATEGORY, None) if forced.parse_error else (forced.category, forced.intent)
        else:
            category = (parsed.category or UNKNOWN_CATEGORY) if flagged else None
            intent = parsed.intent if flagged else None
        return Verdict(
            verdict="unsafe" if flagged else "safe",
            category=category,
            intent=intent,
            p_unsafe=score,
            policy=self.taxonomy.policy_for(category) if category else None,
            parse_error=parsed.parse_error,
            raw=raw,
            forced_raw=forced_raw or "",
            answer=FULL_ANSWER,
            intent_generated=flagged,  # the whole answer was decoded, intent included where it wrote one
        )

    def moderate(
        self,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
        answer: str = FULL_ANSWER,
        max_new_tokens: int = 64,
    ) -> Verdict:
        turns = None if image_turns is None else [image_turns]
        return self.moderate_batch([dialogue], [list(images)], turns, max_new_tokens, answer)[0]

    @property
    def sessions(self) -> SessionStore:
        """This moderator's conversation sessions (created on first use; bounds in ``moderator.session``)."""
        if self._sessions is None:
            self._sessions = SessionStore(self)
        return self._sessions

    def session(self, conversation_id: str) -> ModerationSession:
        """The incremental session of ``conversation_id``: ``add_turn(role, content, images)`` returns the
        verdict after each user turn, reusing the conversation's cache (see ``moderator.session``)."""
        return self.sessions.get(conversation_id)

    def moderate_turns(
        self,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        answer: str = DECISION,
    ) -> list[Verdict]:
        """One verdict per user turn: the verdict on the conversation up to and including that turn.

        Equal to ``moderate(dialogue[: i + 1], ..., answer=answer)`` for each user turn ``i`` (an image
        counts from the turn that carries it), but each turn reuses the key/value cache of the transcript
        the earlier turns share with it (the prompt differs only after the transcript), so only the new
        turns and the closing instruction are run, and an image is encoded once. A turn whose new tokens
        hold an image (an image on a later turn) is run from the start, exactly as ``moderate`` would.
        By default only the decision is computed (``answer="decision"``: no text decoded); pass
        ``"decision+intent"`` for the intent of flagged turns, ``"full"`` for the whole greedy answer.
        """
        check_answer_kind(answer)
        image_turns = list(SAFEMT_IMAGE_TURNS[: len(images)] if image_turns is None else image_turns)
        if len(image_turns) != len(images):
            raise DialogueError(f"{len(images)} images but {len(image_turns)} image_turns")
        for index in image_turns:  # an image past the dialogue's end would otherwise never be shown
            if not 0 <= index < len(dialogue) or dialogue[index].get("role") != "user":
                raise DialogueError(f"image_turns index {index} does not name a user turn of this dialogue")
        prefix_cache = PrefixCache()
        verdicts = []
        for end, message in enumerate(dialogue):
            if message.get("role") != "user":
                continue
            shown = [(turn, image) for turn, image in zip(image_turns, images, strict=True) if turn <= end]
            verdicts.append(
                self.moderate_extended(
                    prefix_cache,
                    dialogue[: end + 1],
                    [image for _, image in shown],
                    [turn for turn, _ in shown],
                    max_new_tokens,
                    answer,
                )
            )
        return verdicts

    @torch.no_grad()
    def moderate_extended(
        self,
        prefix_cache: PrefixCache,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any],
        image_turns: Sequence[int],
        max_new_tokens: int = 64,
        answer: str = FULL_ANSWER,
    ) -> Verdict:
        """``moderate(dialogue, images, image_turns, answer=answer)``, continuing from what ``prefix_cache`` holds.

        The cache keeps the last prompt's tokens and their keys/values. It is cut back to the longest
        common token prefix with this prompt (never all of it: one token at least is run), and
        generation continues from there; afterwards it holds this prompt. With nothing in common, or a
        new image among the tokens to run, it starts over. An answer without the ``verdict: `` prefix
        is scored by running the prefix on this prompt's cache (the scoring pass, minus the prompt it
        shares), and stays fail-closed as in ``moderate``. An answer that says safe where the score flags
        is continued from ``FORCED_UNSAFE_PREFIX`` on the prompt's cache, as ``moderate`` would. Not
        thread-safe: one cache per conversation, used by one caller at a time (the model is shared
        state too).
        """
        text = self.prompt_texts([dialogue], [list(image_turns)])[0]
        if check_answer_kind(answer) != FULL_ANSWER:
            return self._decide(prefix_cache, text, list(images), max_new_tokens, answer)
        return self._full_answer_extended(prefix_cache, text, list(images), max_new_tokens)

    def _full_answer_extended(
        self, prefix_cache: PrefixCache, text: str, images: list[Any], max_new_tokens: int
    ) -> Verdict:
        inputs = self._inputs([text], [list(images)])
        input_ids = inputs["input_ids"]
        pixels = pixel_digest(inputs)
        reused = prefix_cache.reusable_length(input_ids[0], pixels, self._image_token_ids)
        raws, scores, out, _ = self._continue_generation(inputs, prefix_cache.cache, reused, max_new_tokens)
        cache, score = out.past_key_values, scores[0]
        if score is None:  # no verdict position in the answer: run the prefix on the prompt's cache instead
            score = self._score_on_cache(inputs, cache) if self._prefix else self.p_unsafe([text], [list(images)])[0]
        forced_raw = None
        if self._needs_forced_answer(raws[0], score):  # as moderate_texts, continuing the prompt's cache
            forced_inputs = self._inputs([text + FORCED_UNSAFE_PREFIX], [list(images)])
            common = common_prefix_length(input_ids[0], forced_inputs["input_ids"][0])
            continuation, _, forced_out, _ = self._continue_generation(forced_inputs, cache, common, max_new_tokens)
            cache, forced_raw = forced_out.past_key_values, FORCED_UNSAFE_PREFIX + continuation[0]
        prefix_cache.update(input_ids[0], pixels, cache, reused)
        return self._verdict(raws[0], score, forced_raw)

    def _continue_generation(
        self, inputs: Mapping[str, Any], cache: Any, reused: int, max_new_tokens: int, **generate_kwargs: Any
    ) -> tuple[list[str], list[float | None], Any, torch.Tensor]:
        """``_generate_scored`` on one prompt whose first ``reused`` tokens ``cache`` holds (0: from scratch)."""
        kwargs: dict[str, Any] = dict(generate_kwargs)
        if reused:
            surplus = cache.get_seq_length() - reused
            if surplus:
                cache.crop(-surplus)  # transformers 5: a negative count of tokens to drop
            # The vision inputs are in the cache already; the grid sizes stay for the 3D (mrope) positions.
            inputs = {key: value for key, value in inputs.items() if key not in VISION_PIXEL_INPUTS}
            kwargs["past_key_values"] = cache
            # Qwen-VL keeps the last call's rope offset on the model and would reuse it when a cache is
            # passed; without it, generate computes this prompt's positions from the whole input.
            for module in self._rope_delta_modules:
                module.rope_deltas = None
        return self._generate_scored(inputs, max_new_tokens, **kwargs)

    def _score_on_cache(self, inputs: Mapping[str, Any], cache: Any) -> float:
        """P(unsafe) of the scoring pass (prompt + ``verdict: `` prefix), the prompt taken from ``cache``."""
        prompt_length = inputs["input_ids"].shape[1]
        extended = with_tokens(inputs, prompt_length, self._prefix)
        _, _, _, step_pairs = self._continue_generation(extended, cache, prompt_length, max_new_tokens=1)
        return step_pairs[0, 0].softmax(dim=-1)[1].item()  # the prefix is input: step 0 is the verdict position

    # -- the one-step decision: answer="decision" / "decision+intent" ---------------------------------
    @functools.cached_property
    def decision_tokens(self) -> DecisionTokens:
        return DecisionTokens.for_tokenizer(self.processor.tokenizer, self.taxonomy, self._prefix, self._unsafe_id)

    @functools.cached_property
    def _end_ids(self) -> frozenset[int]:
        """The tokens that end a greedy answer (generate stops on them)."""
        config = getattr(self.model, "generation_config", None)
        ends = getattr(config, "eos_token_id", None)
        if ends is None:
            ends = self.processor.tokenizer.eos_token_id
        return frozenset([ends] if isinstance(ends, int) else (ends or []))

    def _forward_logits(
        self, inputs: Mapping[str, Any], cache: Any, reused: int, keep: int
    ) -> tuple[torch.Tensor, Any]:
        """Run the tokens of ``inputs`` past the first ``reused`` (held by ``cache``) in one forward pass: the
        vocabulary logits of the last ``keep`` positions (float32, ``(keep, vocab)``) and the cache, which
        then holds every token of ``inputs``. Nothing is decoded."""
        rows: list[torch.Tensor] = []

        def record(module: Any, args: Any, output: Any) -> None:
            rows.append(output[0, -keep:, :].float())

        handle = self._output_layer.register_forward_hook(record)
        try:
            _, _, out, _ = self._continue_generation(inputs, cache, reused, max_new_tokens=1, logits_to_keep=keep)
        finally:
            handle.remove()
        return rows[-1], out.past_key_values  # a chunked prefill calls the output layer more than once

    @torch.no_grad()
    def _decide(
        self, prefix_cache: PrefixCache, text: str, images: list[Any], max_new_tokens: int, answer: str
    ) -> Verdict:
        """The decision on one prompt ``text``, continuing from what ``prefix_cache`` holds (see the module doc).

        One prefill runs the prompt's new tokens, the ``verdict: `` prefix and the ``safe`` token: its logits
        give P(unsafe) at the verdict position and the model's greedy tokens at the prefix positions, the
        verdict position and after ``safe`` (the format check). A flagged row runs the rest of
        ``FORCED_UNSAFE_PREFIX`` (one step) and reads the category among the taxonomy's ids; ids that share
        their first tokens take one more step per shared token. A row under the threshold whose greedy word
        is ``unsafe`` (a threshold above 0.5) takes that step too: if its greedy category token starts no id,
        the full answer would not parse, and the row is flagged as it would be.
        """
        tokens = self.decision_tokens
        k = len(self._prefix)
        inputs = self._inputs([text + tokens.prefix_text], [images])
        if inputs["input_ids"][0, inputs["input_ids"].shape[1] - k :].tolist() != self._prefix:
            # The template's last token merged with the prefix: the positions read below do not exist.
            return self._full_answer_extended(prefix_cache, text, images, max_new_tokens)
        length = inputs["input_ids"].shape[1] + 1
        inputs = with_tokens(inputs, length - 1, [self._safe_id])
        input_ids = inputs["input_ids"][0]
        keep = k + 2  # predicting each prefix token, the verdict word, and what follows "safe"
        pixels = pixel_digest(inputs)
        reused = min(prefix_cache.reusable_length(input_ids, pixels, self._image_token_ids), length - keep)
        rows, cache = self._forward_logits(inputs, prefix_cache.cache, reused, keep)
        greedy = rows.argmax(dim=-1).tolist()
        score = rows[k, [self._safe_id, self._unsafe_id]].softmax(dim=-1)[1].item()
        follows = greedy[:k] == self._prefix and (
            greedy[k] == self._unsafe_id or (greedy[k] == self._safe_id and greedy[k + 1] in self._end_ids)
        )
        category, intent, forced_raw = None, None, ""
        # A threshold above 0.5 leaves rows whose greedy word is "unsafe" below it: the full answer flags
        # those only when the category it writes is no id (fail-closed), so that position is read too.
        unsafe_below = follows and greedy[k] == self._unsafe_id and not flags(score, self.threshold)
        if follows and (flags(score, self.threshold) or unsafe_below):
            # The forced answer replaces "safe": the cache keeps the prompt and the prefix.
            forced = with_tokens(inputs, length - 1, tokens.forced_ids[k:])
            logits, cache = self._forward_logits(forced, cache, length - 1, keep=1)
            if unsafe_below:
                follows = int(logits[-1].argmax()) in tokens.category_trie
            else:
                chosen, category, cache = self._choose_category(forced, logits[-1], cache)
            if answer == DECISION_WITH_INTENT and category is not None:
                continued = with_tokens(forced, forced["input_ids"].shape[1], chosen)
                raws, _, out, _ = self._continue_generation(
                    continued, cache, int(cache.get_seq_length()), max_new_tokens
                )
                cache = out.past_key_values
                forced_raw = FORCED_UNSAFE_PREFIX + self.processor.tokenizer.decode(chosen) + raws[0]
                parsed = parse_verdict(forced_raw, self.taxonomy)
                intent = parsed.intent if not parsed.parse_error and parsed.category == category else None
        prefix_cache.update(input_ids[:-1], pixels, cache, reused)  # "safe" may have been replaced in the cache
        flagged = flags(score, self.threshold, parse_error=not follows)
        if flagged and category is None:
            category = UNKNOWN_CATEGORY  # flagged because the format was not followed
        return Verdict(
            verdict=UNSAFE if flagged else SAFE,
            category=category if flagged else None,
            intent=intent,
            p_unsafe=score,
            policy=self.taxonomy.policy_for(category) if flagged and category else None,
            parse_error=not follows,
            forced_raw=forced_raw,
            answer=answer,
            intent_generated=bool(forced_raw),
        )

    def _choose_category(
        self, inputs: Mapping[str, Any], logits: torch.Tensor, cache: Any
    ) -> tuple[list[int], str, Any]:
        """Walk the category ids' token trie from the category position: at each fork the most probable
        next token among the ids' (``logits`` at the first fork; one forward step for each later fork).
        Returns the tokens chosen (not yet run), the category id and the cache."""
        node, chosen, pending = self.decision_tokens.category_trie, [], 0
        while CATEGORY_LEAF not in node:
            options = list(node)
            if len(options) > 1:
                if pending:
                    stepped = with_tokens(inputs, inputs["input_ids"].shape[1], chosen)
                    logits, cache = self._forward_logits(stepped, cache, stepped["input_ids"].shape[1] - pending, 1)
                    logits, pending = logits[-1], 0
                token = max(options, key=lambda t: logits[t].item())
            else:
                token = options[0]
            chosen.append(token)
            pending += 1
            node = node[token]
        return chosen, node[CATEGORY_LEAF], cache


CATEGORY_LEAF = -1  # the key under which a trie node names the category its path spells


@dataclasses.dataclass(frozen=True)
class DecisionTokens:
    """The token ids the one-step decision reads, derived from the contract's target text.

    ``forced_ids``: ``FORCED_UNSAFE_PREFIX``'s tokens (starting with the verdict prefix and ``unsafe``).
    ``category_trie``: token -> node, each path the tokens a target writes after the forced prefix for one
    category id, up to and including the token that ends its line; a leaf holds ``{CATEGORY_LEAF: id}``.
    """

    prefix_text: str
    forced_ids: list[int]
    category_trie: dict[int, Any]

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, taxonomy: Taxonomy, prefix: list[int], unsafe_id: int) -> DecisionTokens:
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        forced = ids(FORCED_UNSAFE_PREFIX)
        if forced[: len(prefix) + 1] != [*prefix, unsafe_id]:
            raise ValueError("the tokenizer splits the forced unsafe answer unlike the verdict prefix and 'unsafe'")
        trie: dict[int, Any] = {}
        for category in taxonomy.ids:
            target = ids(render_target(UNSAFE, category, "intent"))
            if target[: len(forced)] != forced:
                raise ValueError(f"the tokenizer merges category {category!r} into the forced unsafe prefix")
            rest = target[len(forced) :]
            ends = [i for i, token in enumerate(rest) if "\n" in tokenizer.decode([token])]
            if not ends:
                raise ValueError(f"no line end after category {category!r} in the tokenized target")
            node = trie
            for token in rest[: ends[0] + 1]:
                node = node.setdefault(token, {})
            node[CATEGORY_LEAF] = category
        return cls(tokenizer.decode(prefix), forced, trie)


def with_tokens(inputs: Mapping[str, Any], keep: int, token_ids: Sequence[int]) -> dict[str, Any]:
    """``inputs`` (one row) cut to its first ``keep`` tokens, then ``token_ids`` appended: text tokens, so the
    attention mask gets ones and the multimodal token types zeros. Vision inputs are kept as they are."""
    input_ids = inputs["input_ids"]
    extra = torch.tensor([list(token_ids)], dtype=input_ids.dtype, device=input_ids.device)
    out = dict(inputs)
    out["input_ids"] = torch.cat([input_ids[:, :keep], extra], dim=1)
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
        if key in inputs:
            out[key] = torch.cat([inputs[key][:, :keep], torch.full_like(extra, fill)], dim=1)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from PIL import Image

    from moderator.cli import MissingInputError, one_line_parser_errors
    from moderator.schema import parse_safemt_record

    parser = argparse.ArgumentParser(
        prog="python -m moderator.inference", description="Moderate SafeMT dialogues with a moderator checkpoint."
    )
    one_line_parser_errors(parser)
    parser.add_argument("--model", required=True, help="merged checkpoint, adapter dir or hub name")
    parser.add_argument("--safemt-file", required=True, help="a <k>_turn.json file; images resolve next to it")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument(
        "--expect-manifest-sha256",
        default=None,
        help="pin the export: refuse it unless its manifest.json has this sha256 (printed by `python -m export`)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load an unverified development checkpoint (a training output: no manifest to check)",
    )
    args = parser.parse_args(argv)
    path = Path(args.safemt_file)
    if not path.is_file():
        raise MissingInputError(f"{path}: SafeMT file not found")
    moderator = Moderator.from_pretrained(
        args.model, verify=not args.no_verify, expect_manifest_sha256=args.expect_manifest_sha256
    )
    for raw in json.loads(path.read_text())[: args.limit]:
        record = parse_safemt_record(raw, moderator.taxonomy)
        with Image.open(path.parent / record.image_path) as image:
            verdict = moderator.moderate(record.dialogue, [image.convert("RGB")])
        print(
            f"{record.id}: verdict={verdict.verdict} category={verdict.category} p_unsafe={verdict.p_unsafe:.3f} "
            f"parse_error={verdict.parse_error}"
        )


if __name__ == "__main__":
    from moderator.cli import run_cli
    from moderator.manifest import ManifestError

    raise SystemExit(run_cli(main, user_errors=(ModelLoadError, ManifestError, ModeratorConfigError)))
