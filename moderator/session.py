"""Incremental moderation for serving: ``moderator.session(conversation_id).add_turn(role, content, images)``.

A session holds one conversation's turns and the key/value cache of its last prompt
(``moderator.inference.PrefixCache``). After each user turn it returns the verdict on the conversation
so far, equal to ``moderator.moderate`` on it, running only the tokens the cache does not hold.

Memory is bounded two ways (``SessionStore``):

* ``max_cached_tokens``: the KV-cached tokens of all sessions together. Past it, the least recently
  used sessions' caches are dropped (their turns are kept, so their next verdict is recomputed from
  scratch: slower, never different).
* ``max_sessions``: sessions kept at all. Past it, the least recently used session is forgotten
  entirely; ``session(id)`` then returns an empty one, and ``len(session)`` (turns held) tells the
  caller to feed the whole conversation again.

A conversation that is edited rather than extended (an earlier turn changed or removed, an image
replaced) goes through ``session.reset(dialogue, images, image_turns)``: the verdict is recomputed on
the edited conversation, reusing only the tokens its prompt shares with the cached one (up to the
first changed token; a changed image's pixels are compared by digest, so a same-size replacement is
not mistaken for the cached one). ``add_turn`` only ever appends.

Not thread-safe: the model keeps per-call state, so one caller (e.g. the service's model thread) runs
sessions at a time; the store's bookkeeping is locked so other threads may look sessions up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from moderator.contract import ROLE_NAMES, DialogueError
from moderator.schema import SAFEMT_IMAGE_TURNS

if TYPE_CHECKING:
    from moderator.inference import Moderator, PrefixCache, Verdict

DEFAULT_MAX_SESSIONS = 4096
# 56 KiB of bf16 keys/values per token for Qwen2.5-VL-7B (28 layers x 4 KV heads x 128 dims x K, V x 2 bytes):
# about 3.5 GiB at this cap.
DEFAULT_MAX_CACHED_TOKENS = 65_536


class ModerationSession:
    """One conversation being moderated turn by turn (made by ``SessionStore.get``)."""

    def __init__(self, store: SessionStore, conversation_id: str) -> None:
        from moderator.inference import PrefixCache

        self.conversation_id = conversation_id
        self.dialogue: list[dict[str, str]] = []
        self.images: list[Any] = []
        self.image_turns: list[int] = []
        self.prefix_cache: PrefixCache = PrefixCache()
        self._store = store

    def __len__(self) -> int:
        return len(self.dialogue)

    def add_turn(self, role: str, content: str, images: Sequence[Any] = ()) -> Verdict | None:
        """Append a turn; after a user turn, the verdict on the conversation so far (else None).

        A user turn whose moderation raises is taken back out, so the caller can send it again.
        """
        if role not in ROLE_NAMES:
            raise DialogueError(f"turn {len(self.dialogue)}: role {role!r} is not one of {sorted(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise DialogueError(f"turn {len(self.dialogue)}: content must be a string, got {type(content).__name__}")
        if images and role != "user":
            raise DialogueError(f"turn {len(self.dialogue)}: images can only come with a user turn, not {role!r}")
        index = len(self.dialogue)
        self.dialogue.append({"role": role, "content": content})
        self.images += list(images)
        self.image_turns += [index] * len(images)
        if role != "user":
            return None
        try:
            return self._moderate()
        except Exception:
            del self.dialogue[index:]
            del self.images[len(self.images) - len(images) :]
            del self.image_turns[len(self.image_turns) - len(images) :]
            raise

    def reset(
        self,
        dialogue: Sequence[Mapping[str, Any]],
        images: Sequence[Any] = (),
        image_turns: Sequence[int] | None = None,
    ) -> Verdict:
        """Replace the conversation (an edit) and return its verdict, recomputed past the first change."""
        image_turns = list(SAFEMT_IMAGE_TURNS[: len(images)] if image_turns is None else image_turns)
        if len(image_turns) != len(images):
            raise DialogueError(f"{len(images)} images but {len(image_turns)} image_turns")
        self.dialogue = [{"role": m.get("role"), "content": m.get("content")} for m in dialogue]
        self.images, self.image_turns = list(images), image_turns
        return self._moderate()

    def _moderate(self) -> Verdict:
        try:
            return self._store.moderator.moderate_extended(
                self.prefix_cache, self.dialogue, self.images, self.image_turns, self._store.max_new_tokens
            )
        except Exception:
            self.prefix_cache.clear()  # a failed call may have left the cache half-updated
            raise
        finally:
            self._store.touched(self)


class SessionStore:
    """Sessions by conversation id, LRU-bounded in count and in KV-cached tokens (see the module doc)."""

    def __init__(
        self,
        moderator: Moderator,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        max_new_tokens: int = 64,
    ) -> None:
        if max_sessions < 1 or max_cached_tokens < 0:
            raise ValueError("max_sessions must be >= 1 and max_cached_tokens >= 0")
        self.moderator = moderator
        self.max_sessions, self.max_cached_tokens = max_sessions, max_cached_tokens
        self.max_new_tokens = max_new_tokens
        self._sessions: OrderedDict[str, ModerationSession] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._sessions

    @property
    def cached_tokens(self) -> int:
        return sum(session.prefix_cache.cached_tokens for session in self._sessions.values())

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
        """After a verdict: ``session`` is the most recent; caches are dropped, oldest first, past the cap."""
        with self._lock:
            if self._sessions.get(session.conversation_id) is session:
                self._sessions.move_to_end(session.conversation_id)
            total = self.cached_tokens
            for other in list(self._sessions.values()):  # oldest first; the current session last
                if total <= self.max_cached_tokens:
                    break
                total -= other.prefix_cache.cached_tokens
                other.prefix_cache.clear()
            if total > self.max_cached_tokens and session.prefix_cache.cached_tokens:
                session.prefix_cache.clear()  # a session no longer in the store (forgotten meanwhile)
