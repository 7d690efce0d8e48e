"""Incremental moderation for serving: ``moderator.session(conversation_id).add_turn(role, content, images)``.

A session holds one conversation's turns and the key/value cache of its last prompt
(``PrefixCache``, below). After each user turn it returns the verdict on the conversation
so far, equal to ``moderator.moderate`` on it, running only the tokens the cache does not hold.

Memory is bounded three ways (``SessionStore``):

* ``max_cached_tokens``: the KV-cached tokens of all sessions together. Past it, the least recently
  used sessions' caches are dropped (their turns are kept, so their next verdict is recomputed from
  scratch: slower, never different).
* ``max_bytes``: the host memory all sessions hold (``held_bytes``: their turns' text, their images'
  pixels, and their KV caches where these live in host memory, i.e. a model on CPU). Past it, the
  least recently used sessions' caches are dropped first, then those sessions are forgotten.
* ``max_sessions``: sessions kept at all. Past it, the least recently used session is forgotten
  entirely; ``session(id)`` then returns an empty one, and ``len(session)`` (turns held) tells the
  caller to feed the whole conversation again.

Images are kept as given: the service hands sessions images already downscaled to the model's bounds.

A conversation that is edited rather than extended (an earlier turn changed or removed, an image
replaced) goes through ``session.reset(dialogue, images, image_turns)``: the verdict is recomputed on
the edited conversation, reusing only the tokens its prompt shares with the cached one (up to the
first changed token; a changed image's pixels are compared by digest, so a same-size replacement is
not mistaken for the cached one). ``add_turn`` only ever appends; ``extend`` appends several turns and
computes one verdict, after the last (a long new conversation costs one verdict, not one per user turn).

Sessions return the decision alone by default (``answer="decision"`` in ``moderator.inference``: verdict,
P(unsafe) and category, no text decoded); ``intent=True`` (per store, or per call) also generates the
intent of a flagged turn, from the same cache.

Not thread-safe: the model keeps per-call state, so one caller (e.g. the service's model thread) runs
sessions at a time; the store's bookkeeping is locked so other threads may look sessions up.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moderator.contract import DECISION, DECISION_WITH_INTENT, ROLE_NAMES, DialogueError, Verdict
from moderator.schema import SAFEMT_IMAGE_TURNS

DEFAULT_MAX_SESSIONS = 4096
# 56 KiB of bf16 keys/values per token for Qwen2.5-VL-7B (28 layers x 4 KV heads x 128 dims x K, V x 2 bytes):
# about 3.5 GiB at this cap.
DEFAULT_MAX_CACHED_TOKENS = 65_536
# Host memory of all sessions together. A session at the 7B recipe's bounds holds at most 4 images of
# 401,408 pixels (6.1 MiB) plus its text: about 160 such sessions.
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
TURN_OVERHEAD_BYTES = 200  # a turn's dict and string objects, besides the text itself
IMAGE_BYTES_PER_PIXEL = 4  # PIL keeps an 8-bit RGB pixel in 4 bytes


# Inputs that carry pixels, dropped when their image's tokens are already in a reused cache.
VISION_PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")


class PrefixCache:
    """One conversation's prompt token ids and their key/value cache, for ``Moderator.moderate_extended`` and sessions."""

    def __init__(self) -> None:
        self.input_ids: torch.Tensor | None = None
        self.pixels = ""
        self.cache: Any = None
        self.reused_tokens = 0  # last call: tokens taken from the cache instead of being run
        self.run_tokens = 0  # last call: prompt tokens run through the model

    @property
    def cached_tokens(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def reusable_length(self, input_ids: torch.Tensor, pixels: str, image_token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``input_ids`` the cache can stand for (0: start over).

        ``pixels`` is the digest of this prompt's pixel inputs (``pixel_digest``): other images behind
        the same placeholder tokens (an edited image of the same size) make the cache stale.
        """
        if self.cache is None or self.input_ids is None or pixels != self.pixels:
            return 0
        common = common_prefix_length(self.input_ids.to(input_ids.device), input_ids)
        vision_tokens = torch.tensor(image_token_ids, dtype=input_ids.dtype, device=input_ids.device)
        if common == 0 or bool(torch.isin(input_ids[common:], vision_tokens).any()):
            return 0
        return common

    def update(self, input_ids: torch.Tensor, pixels: str, cache: Any, reused: int) -> None:
        self.input_ids, self.pixels, self.cache = input_ids.detach().cpu(), pixels, cache
        self.reused_tokens, self.run_tokens = reused, len(input_ids) - reused

    def clear(self) -> None:
        self.input_ids, self.pixels, self.cache = None, "", None


def common_prefix_length(cached_ids: torch.Tensor, input_ids: torch.Tensor) -> int:
    """Leading tokens of ``input_ids`` equal to ``cached_ids``, leaving at least one token of it to run."""
    limit = min(len(cached_ids), len(input_ids) - 1)
    return int((cached_ids[:limit] == input_ids[:limit]).long().cumprod(0).sum())


def pixel_digest(inputs: Mapping[str, Any]) -> str:
    """SHA-256 of a prompt's pixel inputs and image grids (what its image placeholder tokens stand for)."""
    digest = hashlib.sha256()
    for key in (*VISION_PIXEL_INPUTS, "image_grid_thw", "video_grid_thw"):
        value = inputs.get(key)
        if value is not None:
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_bytes(image: Any) -> int:
    size = getattr(image, "size", None)
    return size[0] * size[1] * IMAGE_BYTES_PER_PIXEL if size else 0


def cache_host_bytes(prefix_cache: PrefixCache) -> int:
    """Bytes of a prefix cache held in host memory: its token ids, and its keys/values on CPU."""
    total = 0
    tensors = [prefix_cache.input_ids]
    for layer in getattr(prefix_cache.cache, "layers", None) or ():
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    for tensor in tensors:
        device = getattr(tensor, "device", None)
        if device is not None and device.type == "cpu":
            total += tensor.nelement() * tensor.element_size()
    return total


class ModerationSession:
    """One conversation being moderated turn by turn (made by ``SessionStore.get``)."""

    def __init__(self, store: SessionStore, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.dialogue: list[dict[str, str]] = []
        self.images: list[Any] = []
        self.image_turns: list[int] = []
        self.prefix_cache: PrefixCache = PrefixCache()
        self._store = store
        self._turn_bytes = 0  # text and images, recounted when they change
        self._cache_bytes = 0  # the prefix cache's host bytes, counted by the store after each verdict

    def __len__(self) -> int:
        return len(self.dialogue)

    @property
    def held_bytes(self) -> int:
        """Host memory this session holds (turns, images, a CPU prefix cache): what ``max_bytes`` bounds."""
        return self._turn_bytes + self._cache_bytes

    def _recount(self) -> None:
        text = sum(len(m["content"].encode()) + TURN_OVERHEAD_BYTES for m in self.dialogue)
        self._turn_bytes = text + sum(image_bytes(image) for image in self.images)

    def _check_turn(self, index: int, role: Any, content: Any, has_images: bool) -> None:
        if role not in ROLE_NAMES:
            raise DialogueError(f"turn {index}: role {role!r} is not one of {sorted(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise DialogueError(f"turn {index}: content must be a string, got {type(content).__name__}")
        if has_images and role != "user":
            raise DialogueError(f"turn {index}: images can only come with a user turn, not {role!r}")

    def add_turn(
        self, role: str, content: str, images: Sequence[Any] = (), intent: bool | None = None
    ) -> Verdict | None:
        """Append a turn; after a user turn, the verdict on the conversation so far (else None).

        A user turn whose moderation raises is taken back out, so the caller can send it again.
        ``intent``: generate a flagged turn's intent (default: the store's ``intent``).
        """
        return self.extend([{"role": role, "content": content}], images, intent=intent)

    def extend(
        self,
        turns: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
        intent: bool | None = None,
    ) -> Verdict | None:
        """Append ``turns``; if the last is a user turn, the verdict on the conversation so far (else None).

        One verdict however many turns are appended. ``image_turns``: the conversation's turn index of
        each image (default: the first appended turn). If the moderation raises, the turns are taken back
        out, so the caller can send them again.
        """
        start = len(self.dialogue)
        image_turns = [start] * len(images) if image_turns is None else list(image_turns)
        if len(image_turns) != len(images):
            raise DialogueError(f"{len(images)} images but {len(image_turns)} image_turns")
        for index in image_turns:
            if not start <= index < start + len(turns):
                raise DialogueError(f"image_turns index {index} is not one of the turns appended")
        for offset, turn in enumerate(turns):
            self._check_turn(start + offset, turn.get("role"), turn.get("content"), start + offset in image_turns)
        if not turns:
            return None
        self.dialogue += [{"role": turn["role"], "content": turn["content"]} for turn in turns]
        self.images += list(images)
        self.image_turns += image_turns
        self._recount()
        if self.dialogue[-1]["role"] != "user":
            return None
        try:
            return self._moderate(intent)
        except Exception:
            del self.dialogue[start:]
            del self.images[len(self.images) - len(images) :]
            del self.image_turns[len(self.image_turns) - len(images) :]
            self._recount()
            raise

    def reset(
        self,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
        intent: bool | None = None,
    ) -> Verdict:
        """Replace the conversation (an edit) and return its verdict, recomputed past the first change."""
        image_turns = list(SAFEMT_IMAGE_TURNS[: len(images)] if image_turns is None else image_turns)
        if len(image_turns) != len(images):
            raise DialogueError(f"{len(images)} images but {len(image_turns)} image_turns")
        self.dialogue = [{"role": m.get("role"), "content": m.get("content")} for m in dialogue]
        self.images, self.image_turns = list(images), image_turns
        self._recount()
        return self._moderate(intent)

    def _moderate(self, intent: bool | None) -> Verdict:
        intent = self._store.intent if intent is None else intent
        try:
            return self._store.moderator.moderate_extended(
                self.prefix_cache,
                self.dialogue,
                self.images,
                self.image_turns,
                self._store.max_new_tokens,
                answer=DECISION_WITH_INTENT if intent else DECISION,
            )
        except Exception:
            self.prefix_cache.clear()  # a failed call may have left the cache half-updated
            raise
        finally:
            self._store.touched(self)


class SessionStore:
    """Sessions by conversation id, LRU-bounded in count, in KV-cached tokens and in bytes (see the module doc)."""

    def __init__(
        self,
        moderator: Any,  # a moderator.inference.Moderator (which imports this module, so not named here)
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        max_new_tokens: int = 64,
        max_bytes: int = DEFAULT_MAX_BYTES,
        intent: bool = False,
    ) -> None:
        if max_sessions < 1 or max_cached_tokens < 0 or max_bytes < 1:
            raise ValueError("max_sessions and max_bytes must be >= 1 and max_cached_tokens >= 0")
        self.moderator = moderator
        self.max_sessions, self.max_cached_tokens = max_sessions, max_cached_tokens
        self.max_bytes = max_bytes
        self.max_new_tokens = max_new_tokens
        self.intent = intent  # the default of add_turn/extend/reset: generate a flagged turn's intent
        self._sessions: OrderedDict[str, ModerationSession] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._sessions

    @property
    def cached_tokens(self) -> int:
        return sum(session.prefix_cache.cached_tokens for session in self._sessions.values())

    @property
    def held_bytes(self) -> int:
        return sum(session.held_bytes for session in self._sessions.values())

    def get(self, conversation_id: str) -> ModerationSession:
        """The session of ``conversation_id`` (a new, empty one if unknown or forgotten)."""
        with self._lock:
            session = self._sessions.get(conversation_id)
            if session is None:
                session = self._sessions[conversation_id] = ModerationSession(self, conversation_id)
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(conversation_id)
            return session

    def drop(self, conversation_id: str) -> None:
        with self._lock:
            self._sessions.pop(conversation_id, None)

    def touched(self, session: ModerationSession) -> None:
        """After a verdict: ``session`` is the most recent; past a cap, the oldest caches are dropped, then
        (past ``max_bytes``) the oldest sessions are forgotten."""
        with self._lock:
            if self._sessions.get(session.conversation_id) is session:
                self._sessions.move_to_end(session.conversation_id)
            session._cache_bytes = cache_host_bytes(session.prefix_cache)
            total = self.cached_tokens
            for other in list(self._sessions.values()):  # oldest first; the current session last
                if total <= self.max_cached_tokens:
                    break
                total -= other.prefix_cache.cached_tokens
                _drop_cache(other)
            if total > self.max_cached_tokens and session.prefix_cache.cached_tokens:
                _drop_cache(session)  # a session no longer in the store (forgotten meanwhile)
            self._bound_bytes(session)

    def _bound_bytes(self, current: ModerationSession) -> None:
        """Caches are cheaper to recompute than turns are to refeed: drop those first, oldest first."""
        total = self.held_bytes
        for other in list(self._sessions.values()):
            if total <= self.max_bytes:
                return
            if other is not current:
                total -= other._cache_bytes
                _drop_cache(other)
        for conversation_id, other in list(self._sessions.items()):
            if total <= self.max_bytes:
                return
            if other is not current:
                total -= other.held_bytes
                del self._sessions[conversation_id]
        if total > self.max_bytes:
            _drop_cache(current)  # its turns stay: the conversation in progress needs them


def _drop_cache(session: ModerationSession) -> None:
    session.prefix_cache.clear()
    session._cache_bytes = 0
