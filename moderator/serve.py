"""A moderation service: ``python -m moderator.serve EXPORT_DIR --host 127.0.0.1 --port 8000``.

Endpoints:

- ``POST /v1/moderate``: ``{"messages": [{"role": "user"|"assistant", "content": str}, ...],
  "images": [data URL or raw base64, ...], "conversation_id": optional str}`` returns
  ``{"verdict", "category", "intent", "p_unsafe", "threshold", "policy", "flagged", "parse_error",
  "prompt_format_version", "incremental"}``. ``messages`` follows the SafeMT schema (roles alternate from
  ``user`` and the last turn is ``user``); the images belong to the first user turn, as in SafeMT.
- ``GET /healthz``: the process is up. ``GET /readyz``: the verified model is loaded and the batch worker runs.

The export is verified against its manifest before the port is bound (a tampered export exits with one
line). Requests from concurrent callers are batched: one worker collects up to ``--max-batch`` requests
or waits ``--max-wait-ms``, then runs one ``moderate_batch`` in a single model thread (never two forward
passes at once). Bad input gets a 4xx naming the field; a model error fails only the requests it hit.

With a ``conversation_id``, and a moderator that offers ``session(conversation_id)``, the client still
sends the whole conversation; only the turns the session has not seen are fed to it (``"incremental":
true``), an edited conversation goes through ``session.reset``, and a session its store forgot is fed
everything again. Session requests run one at a time (not batched). Without sessions the whole
conversation is moderated (``"incremental": false``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

try:  # the serving extra; without it the command says what to install instead of a traceback
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
except ImportError:  # pragma: no cover - depends on the install
    FastAPI = None  # type: ignore[assignment,misc]

from moderator.cli import InputError, MissingInputError, UsageError, one_line_parser_errors, run_cli
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.loading import DTYPE_NAMES, ModelLoadError
from moderator.manifest import ManifestError, looks_like_export
from moderator.schema import SAFEMT_IMAGE_TURNS, RecordError
from moderator.schema import validate_dialogue as validate_safemt_dialogue

logger = logging.getLogger("moderator.serve")

# Images of a request belong to the first user turn (the SafeMT contract: moderator/schema.py).
IMAGE_TURN = SAFEMT_IMAGE_TURNS[0]
# Formats PIL decodes in-process; others are refused (EPS, for one, would run Ghostscript on the bytes).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
SERVE_EXTRA_MISSING = "serving needs fastapi and uvicorn: pip install 'safemt-moderator[serve]'"
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service (the command line's options)."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 4
    # Decoded pixels per image, checked from the header before any pixel is decoded (decompression bombs).
    max_image_pixels: int = 4096 * 4096
    max_queue: int = 256
    max_new_tokens: int = 64
    max_sessions: int = 4096  # conversations whose fed turns the server remembers (LRU)
    verified: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_images", "max_image_pixels", "max_queue", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise UsageError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")


class BadRequest(Exception):
    """A request the service refuses: ``status`` is the HTTP code, the message one line naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ModerationRequest:
    messages: list[dict[str, str]]
    images: list[Image.Image]
    image_digests: tuple[str, ...]
    conversation_id: str | None
    future: asyncio.Future | None = field(default=None, repr=False)


# -- request parsing (runs in a worker thread: image decoding is CPU work) ------------------------------
def decode_image(value: Any, where: str, max_pixels: int) -> tuple[Image.Image, str]:
    """A base64 string or ``data:image/...;base64,`` URL as a fully decoded RGB image, and its bytes' sha256.

    The header's size is checked before any pixel is decoded; ``verify()`` checks the file's structure
    and ``load()`` decodes it all (``verify`` alone misses a file cut off halfway).
    """
    if not isinstance(value, str):
        raise BadRequest(422, f"{where}: expected a base64 string or data URL, got {type(value).__name__}")
    payload = value
    match = _DATA_URL.match(value)
    if match:
        if not match["mime"].startswith("image/"):
            raise BadRequest(422, f"{where}: data URL must have an image/* media type, got {match['mime']!r}")
        if ";base64" not in match["params"]:
            raise BadRequest(422, f"{where}: data URL must be base64-encoded (';base64,')")
        payload = match["data"]
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f"{where}: not valid base64") from None
    if not data:
        raise BadRequest(422, f"{where}: empty image")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's bomb warning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as header:
                width, height = header.size
                if width * height > max_pixels:
                    raise BadRequest(
                        422, f"{where}: image is {width}x{height} pixels, more than the limit of {max_pixels}"
                    )
                header.verify()
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                image.load()
                rgb = image.convert("RGB")
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(422, f"{where}: not a {'/'.join(IMAGE_FORMATS)} image") from None
    except Exception as exc:  # PIL raises many types for bad bytes; all mean "not a usable image"
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise BadRequest(422, f"{where}: not a decodable image ({reason})") from None
    return rgb, hashlib.sha256(data).hexdigest()


def parse_request(body: bytes, settings: ServeSettings) -> ModerationRequest:
    """Validate a request body (already size-checked); raise ``BadRequest`` naming the field."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(payload, Mapping):
        raise BadRequest(422, f"request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"messages", "images", "conversation_id"})
    if unknown:
        raise BadRequest(422, f"unknown field(s) {unknown}; expected 'messages', 'images', 'conversation_id'")
    if "messages" not in payload:
        raise BadRequest(422, "field 'messages': missing")
    try:
        messages = validate_safemt_dialogue(payload["messages"], None)
    except RecordError as exc:
        where = exc.field.replace("dialogue", "messages", 1)
        raise BadRequest(422, f"field {where!r}: {exc.reason}") from None
    conversation_id = payload.get("conversation_id")
    if conversation_id is not None and (not isinstance(conversation_id, str) or not conversation_id.strip()):
        raise BadRequest(422, "field 'conversation_id': expected a non-empty string")
    raw_images = payload.get("images") or []
    if not isinstance(raw_images, list):
        raise BadRequest(422, f"field 'images': expected a list, got {type(raw_images).__name__}")
    if len(raw_images) > settings.max_images:
        raise BadRequest(422, f"field 'images': {len(raw_images)} images, the limit is {settings.max_images}")
    decoded = [decode_image(v, f"images[{i}]", settings.max_image_pixels) for i, v in enumerate(raw_images)]
    return ModerationRequest(
        messages=messages,
        images=[image for image, _ in decoded],
        image_digests=tuple(digest for _, digest in decoded),
        conversation_id=conversation_id,
    )


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (before anything is parsed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count as it arrives
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- the moderation worker ----------------------------------------------------------------------------
def verdict_response(verdict: Any, threshold: float, incremental: bool) -> dict[str, Any]:
    return {
        "verdict": verdict.verdict,
        "category": verdict.category,
        "intent": verdict.intent,
        "p_unsafe": float(verdict.p_unsafe),
        "threshold": threshold,
        "policy": verdict.policy,
        "flagged": verdict.verdict == "unsafe",
        "parse_error": bool(verdict.parse_error),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "incremental": incremental,
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

    async def submit(self, request: ModerationRequest) -> dict[str, Any]:
        if not self.running or self.queue is None:
            raise BadRequest(503, "the moderation worker is not running")
        request.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise BadRequest(503, f"server busy: {self.settings.max_queue} requests queued, retry later") from None
        return await request.future

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
        return self.moderator.moderate_batch(
            [r.messages for r in batch],
            [r.images for r in batch],
            image_turns=[[IMAGE_TURN] * len(r.images) for r in batch],
            max_new_tokens=self.settings.max_new_tokens,
        )

    def _moderate_in_session(self, request: ModerationRequest) -> dict[str, Any]:
        """Feed the session only the turns it has not seen yet.

        The server remembers what it fed each conversation (LRU). A session that holds fewer turns than
        that (its store forgot it: ``len(session)``) gets the whole conversation again. An edited
        conversation (an earlier turn or an image changed) goes to ``session.reset`` when the session has
        one, else to a fresh session under a new key: a stale prefix is never reused.
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
            and request.messages[:fed] == known[1]
        )
        image_turns = [IMAGE_TURN] * len(request.images)
        if extends or held == 0:
            verdict = self._add_turns(session, request, start=fed if extends else 0)
        elif hasattr(session, "reset"):
            verdict = session.reset(request.messages, request.images, image_turns)
        else:
            self._session_generation += 1
            key = f"{request.conversation_id}#{self._session_generation}"
            verdict = self._add_turns(self.moderator.session(key), request, start=0)
        self.sessions[request.conversation_id] = (key, list(request.messages), request.image_digests)
        while len(self.sessions) > self.settings.max_sessions:
            self.sessions.popitem(last=False)
        return verdict_response(verdict, self.moderator.threshold, incremental=True)

    @staticmethod
    def _add_turns(session: Any, request: ModerationRequest, start: int) -> Any:
        verdict = None
        for index in range(start, len(request.messages)):
            message = request.messages[index]
            images = request.images if index == IMAGE_TURN else []
            verdict = session.add_turn(message["role"], message["content"], images)
        return verdict  # the last turn is a user turn: a verdict

    @staticmethod
    def _guarded(call: Any) -> dict[str, Any] | BaseException:
        try:
            return call()
        except Exception:
            logger.exception("moderation failed for a request")
            return ModelFailure()


class ModelFailure(Exception):
    """The model raised while moderating a request (logged with its traceback; the caller gets a 500)."""

    def __init__(self) -> None:
        super().__init__("moderation failed inside the model for this request; see the server log")


# -- the app --------------------------------------------------------------------------------------------
def create_app(moderator: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving ``moderator`` (already loaded and verified)."""
    if FastAPI is None:
        raise ImportError(SERVE_EXTRA_MISSING)
    settings = settings or ServeSettings()
    store = getattr(moderator, "sessions", None)
    if hasattr(store, "max_new_tokens"):  # incremental verdicts are generated as long as whole-conversation ones
        store.max_new_tokens = settings.max_new_tokens
    worker = ModerationWorker(moderator, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="SafeMT moderator", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(ModelFailure)
    async def model_failure(_request: Request, exc: ModelFailure) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = worker.running
        body = {
            "status": "ready" if ready else "not ready",
            "verified": settings.verified,
            "threshold": moderator.threshold,
            "prompt_format_version": PROMPT_FORMAT_VERSION,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> dict[str, Any]:
        body = await read_body(request, settings.max_body_bytes)
        parsed = await run_in_threadpool(parse_request, body, settings)
        return await worker.submit(parsed)

    return app


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = one_line_parser_errors(
        argparse.ArgumentParser(prog="python -m moderator.serve", description=__doc__.split("\n\n")[0])
    )
    defaults = ServeSettings()
    parser.add_argument("export_dir", help="a directory written by `python -m export` (verified before serving)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when visible, else CPU)")
    parser.add_argument("--dtype", default=None, choices=[*DTYPE_NAMES, "auto"])
    parser.add_argument("--threshold", type=float, default=None, help="override the export's decision threshold")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest check (development only)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests per model batch")
    parser.add_argument(
        "--max-wait-ms", type=float, default=defaults.max_wait_ms, help="how long a batch waits to fill up"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger request bodies get 413"
    )
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="width x height per image, before decoding",
    )
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="requests waiting beyond this get 503"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="verdict text length (category, intent)"
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens,
        verified=not args.no_verify,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    export_dir = Path(args.export_dir)
    if not export_dir.is_dir():
        raise MissingInputError(f"{export_dir}: export directory not found (write one with `python -m export`)")
    if args.no_verify:
        logger.warning("--no-verify: serving %s WITHOUT checking its manifest (development only)", export_dir)
    elif not looks_like_export(export_dir):
        raise UsageError(
            f"{export_dir}: not an export (no manifest.json); write one with `python -m export`, "
            "or pass --no-verify for development"
        )
    if FastAPI is None:
        raise UsageError(SERVE_EXTRA_MISSING)
    import uvicorn

    from moderator.inference import Moderator, ModeratorConfigError

    try:
        moderator = Moderator.from_pretrained(
            export_dir, device=args.device, dtype=args.dtype, threshold=args.threshold, verify=not args.no_verify
        )
    except (ManifestError, ModeratorConfigError, ModelLoadError) as exc:
        raise InputError(str(exc)) from None
    logger.info("serving %s (threshold %s) on http://%s:%d", export_dir, moderator.threshold, args.host, args.port)
    # The model is loaded and verified before the port is bound: a refused export never listens.
    uvicorn.run(create_app(moderator, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
