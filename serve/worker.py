"""The moderation worker: batches queued requests and runs them on the model in one thread.

Requests with a ``conversation_id`` go through the moderator's sessions, fed only the turns they have not
seen; a model error fails only the requests it hit (``ModelFailure``, a 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from moderator.contract import DECISION, FULL_ANSWER, PROMPT_FORMAT_VERSION
from serve.limits import BadRequest, DeadlinePassed, ServeSettings
from serve.request import IMAGE_TURN, ModerationRequest

logger = logging.getLogger("serve")


def verdict_response(verdict: Any, threshold: float, incremental: bool) -> dict[str, Any]:
    return {
        "verdict": verdict.verdict,
        "category": verdict.category,
        "intent": verdict.intent,
        # JSON has no NaN: a non-finite score (which flags, fail-closed) is sent as null.
        "p_unsafe": float(verdict.p_unsafe) if math.isfinite(verdict.p_unsafe) else None,
        "threshold": threshold,
        "policy": verdict.policy,
        "flagged": verdict.verdict == "unsafe",
        "parse_error": bool(verdict.parse_error),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "incremental": incremental,
        # What was decoded: "full" (the whole answer), "decision" (no text) or "decision+intent".
        "answer": getattr(verdict, "answer", FULL_ANSWER),
        "intent_generated": bool(getattr(verdict, "intent_generated", verdict.intent is not None)),
    }


class ModerationWorker:
    """Batches queued requests and runs them on the model, one batch at a time, in one thread."""

    def __init__(self, moderator: Any, settings: ServeSettings):
        self.moderator = moderator
        self.settings = settings
        self.queue: asyncio.Queue[ModerationRequest] | None = None
        self.task: asyncio.Task | None = None
        self.model_thread: ThreadPoolExecutor | None = None
        # conversation_id -> (session key, messages fed, image digests fed); LRU-bounded.
        self.sessions: OrderedDict[str, tuple[str, list[dict[str, str]], tuple[str, ...]]] = OrderedDict()
        self._session_generation = 0

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.settings.max_queue)
        # One thread: the model never runs two forward passes at once.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderator")
        self.task = asyncio.get_running_loop().create_task(self._run(), name="moderation-worker")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.model_thread is not None:
            self.model_thread.shutdown(wait=True)

    async def submit(self, request: ModerationRequest, timeout: float) -> dict[str, Any]:
        """The request's answer; 504 after ``timeout`` seconds (the model drops it if it has not started)."""
        if not self.running or self.queue is None:
            raise BadRequest(503, "the moderation worker is not running")
        request.future = asyncio.get_running_loop().create_future()
        request.expires = time.monotonic() + timeout
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise BadRequest(503, f"server busy: {self.settings.max_queue} requests queued, retry later") from None
        try:
            # On timeout the future is cancelled: a batch still to come skips it.
            return await asyncio.wait_for(request.future, max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise DeadlinePassed(self.settings.request_timeout_s) from None

    async def _collect(self) -> list[ModerationRequest]:
        assert self.queue is not None
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [r for r in await self._collect() if not r.future.done()]  # a caller may have gone
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.model_thread, self._moderate, batch)
            except Exception:  # a bug outside the per-request guards must not stop the worker
                logger.exception("moderation failed for a batch")
                results = [ModelFailure() for _ in batch]
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

    # Runs in the model thread.
    def _moderate(self, batch: list[ModerationRequest]) -> list[dict[str, Any] | BaseException]:
        results: list[dict[str, Any] | BaseException | None] = [None] * len(batch)
        use_sessions = hasattr(self.moderator, "session")
        stateless = []
        for index, request in enumerate(batch):
            if request.conversation_id is not None and use_sessions:
                if time.monotonic() >= request.expires:  # its caller got a 504 while earlier ones ran
                    results[index] = DeadlinePassed(self.settings.request_timeout_s)
                else:
                    results[index] = self._guarded(lambda r=request: self._moderate_in_session(r))
            else:
                stateless.append(index)
        for index, result in zip(stateless, self._moderate_stateless([batch[i] for i in stateless]), strict=True):
            results[index] = result
        return results  # type: ignore[return-value]

    def _moderate_stateless(self, batch: list[ModerationRequest]) -> list[dict[str, Any] | BaseException]:
        if not batch:
            return []
        try:
            verdicts = self._moderate_batch(batch)
        except Exception:
            if len(batch) == 1:
                logger.exception("moderation failed for a request")
                return [ModelFailure()]
            # Rerun one by one: only the request(s) that break the model get a 500.
            return [self._guarded(lambda r=r: self._moderate_stateless_one(r)) for r in batch]
        threshold = self.moderator.threshold
        return [verdict_response(v, threshold, incremental=False) for v in verdicts]

    def _moderate_stateless_one(self, request: ModerationRequest) -> dict[str, Any]:
        return verdict_response(self._moderate_batch([request])[0], self.moderator.threshold, incremental=False)

    def _moderate_batch(self, batch: list[ModerationRequest]) -> list[Any]:
        """Whole conversations: the full answer, or the decision alone for a request that says ``intent: false``."""
        verdicts: list[Any] = [None] * len(batch)
        for answer in (FULL_ANSWER, DECISION):
            rows = [i for i, r in enumerate(batch) if (r.intent is False) == (answer == DECISION)]
            if not rows:
                continue
            kwargs = {} if answer == FULL_ANSWER else {"answer": answer}  # a moderator without answer= still serves
            found = self.moderator.moderate_batch(
                [batch[i].messages for i in rows],
                [batch[i].images for i in rows],
                image_turns=[[IMAGE_TURN] * len(batch[i].images) for i in rows],
                max_new_tokens=self.settings.max_new_tokens,
                **kwargs,
            )
            for row, verdict in zip(rows, found, strict=True):
                verdicts[row] = verdict
        return verdicts

    def _moderate_in_session(self, request: ModerationRequest) -> dict[str, Any]:
        """Feed the session only the turns it has not seen yet.

        The server remembers what it fed each conversation (LRU; a digest per message, not the text). A
        session that holds fewer turns than that (its store forgot it: ``len(session)``) gets the whole
        conversation again. An edited conversation (an earlier turn or an image changed) goes to
        ``session.reset`` when the session has one, else to a fresh session under a new key: a stale
        prefix is never reused.
        """
        assert request.conversation_id is not None
        known = self.sessions.pop(request.conversation_id, None)
        key = known[0] if known is not None else request.conversation_id
        session = self.moderator.session(key)
        fed = len(known[1]) if known is not None else 0
        held = len(session) if hasattr(session, "__len__") else fed
        extends = (
            known is not None
            and held == fed
            and known[2] == request.image_digests
            and len(request.messages) > fed
            and request.message_digests[:fed] == known[1]
        )
        image_turns = [IMAGE_TURN] * len(request.images)
        if extends or held == 0:
            verdict = self._add_turns(session, request, start=fed if extends else 0)
        elif hasattr(session, "reset"):
            verdict = session.reset(request.messages, request.images, image_turns, **_intent(request))
        else:
            self._session_generation += 1
            key = f"{request.conversation_id}#{self._session_generation}"
            verdict = self._add_turns(self.moderator.session(key), request, start=0)
        self.sessions[request.conversation_id] = (key, request.message_digests, request.image_digests)
        while len(self.sessions) > self.settings.max_sessions:
            self.sessions.popitem(last=False)
        return verdict_response(verdict, self.moderator.threshold, incremental=True)

    def _add_turns(self, session: Any, request: ModerationRequest, start: int) -> Any:
        """The new turns, with one verdict at the end (``session.extend``) where the session offers it.

        Else turn by turn, each user turn computing a verdict: a long new conversation costs one per
        user turn, so a request whose caller has stopped waiting (504) is not fed further.
        """
        images = request.images if start <= IMAGE_TURN else []
        if hasattr(session, "extend"):
            return session.extend(request.messages[start:], images, [IMAGE_TURN] * len(images), **_intent(request))
        verdict = None
        for index in range(start, len(request.messages)):
            if time.monotonic() >= request.expires:
                raise DeadlinePassed(self.settings.request_timeout_s)
            message = request.messages[index]
            shown = images if index == IMAGE_TURN else []
            verdict = session.add_turn(message["role"], message["content"], shown, **_intent(request))
        return verdict  # the last turn is a user turn: a verdict

    @staticmethod
    def _guarded(call: Any) -> dict[str, Any] | BaseException:
        try:
            return call()
        except DeadlinePassed as exc:
            return exc
        except Exception:
            logger.exception("moderation failed for a request")
            return ModelFailure()


def _intent(request: ModerationRequest) -> dict[str, bool]:
    """The session's ``intent`` argument where the request sets it (else the store's default: decision only)."""
    return {} if request.intent is None else {"intent": request.intent}


class ModelFailure(Exception):
    """The model raised while moderating a request (logged with its traceback; the caller gets a 500)."""

    def __init__(self) -> None:
        super().__init__("moderation failed inside the model for this request; see the server log")
