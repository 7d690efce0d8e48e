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
true``), with one verdict per request however many turns are new; an edited conversation goes through
``session.reset``, and a session its store forgot is fed everything again. Session requests run one at
a time (not batched). Without sessions the whole conversation is moderated (``"incremental": false``).

Memory and time are bounded (``ServeSettings``; each limit is a command-line option):

- images are downscaled to the moderator's trained pixel bounds as they are decoded (to the size its
  processor would resize them to), so nothing keeps a full-size image: not a queued request, not a session;
- decoded pixels in flight (images being decoded, queued or moderated) stay within
  ``--max-pixels-in-flight``; a request that cannot get its pixels before its deadline gets 503;
- sessions are bounded in bytes (``--max-session-bytes``: turns, images, and KV caches held in host
  memory) as well as in count (``--max-sessions``);
- a request's prompt (text and image tokens) is at most ``--max-request-tokens`` (413 naming it),
  counted before the request is queued;
- a request not answered within ``--request-timeout-s`` gets 504 (the caller is never held longer).

Status codes: 400 malformed JSON (also nested too deeply), 413 body or tokens over the limit, 422 a bad
field or image (format, size, aspect ratio above 200), 503 queue full or pixel budget taken, 504 past
the deadline, 500 only when the model itself fails on a request; every error body is one line.
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
import math
import re
import sys
import threading
import time
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
from moderator.images import DEFAULT_MAX_PIXELS, processor_image_bounds
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
# Qwen2-VL-style processors refuse images whose long side is more than 200 times the short one.
MAX_ASPECT_RATIO = 200
# Text longer than this many characters per token of --max-request-tokens is refused before it is
# tokenized (no tokenizer here packs more into a token), so counting tokens costs bounded time.
MAX_CHARS_PER_TOKEN = 32
# Host bytes per pixel while an image decodes (decoded buffer plus its RGB copy): what one pixel of
# --max-pixels-in-flight costs at most.
DECODE_BYTES_PER_PIXEL = 8


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service (the command line's options)."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 4
    # Decoded pixels per image, checked from the header before any pixel is decoded (decompression bombs).
    max_image_pixels: int = 4096 * 4096
    # Decoded pixels of all requests in flight: two full-size images decode at once (about 256 MiB).
    max_pixels_in_flight: int = 2 * 4096 * 4096
    # Prompt tokens per request, text and images (the SafeMT data recipe's max_length).
    max_request_tokens: int = 8192
    request_timeout_s: float = 30.0  # a request is answered (504 at worst) within this
    max_queue: int = 256
    max_new_tokens: int = 64
    max_sessions: int = 4096  # conversations whose fed turns the server remembers (LRU)
    max_session_bytes: int = 1024 * 1024 * 1024  # host memory all sessions may hold (LRU)
    verified: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_body_bytes",
            "max_images",
            "max_image_pixels",
            "max_pixels_in_flight",
            "max_request_tokens",
            "max_queue",
            "max_new_tokens",
            "max_sessions",
            "max_session_bytes",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{_option(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_pixels_in_flight < self.max_image_pixels:
            raise UsageError(
                f"--max-pixels-in-flight ({self.max_pixels_in_flight}) must be at least --max-image-pixels "
                f"({self.max_image_pixels}): one image must fit"
            )
        # inf or nan would leave requests unanswered forever (and SIGTERM waiting on them).
        if not (math.isfinite(self.request_timeout_s) and 0 < self.request_timeout_s <= 3600):
            raise UsageError(
                f"--request-timeout-s must be a number of seconds in (0, 3600], got {self.request_timeout_s}"
            )
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms < 1000 * self.request_timeout_s):
            raise UsageError(
                f"--max-wait-ms must be a number of milliseconds in [0, {1000 * self.request_timeout_s:g}) "
                f"(below --request-timeout-s), got {self.max_wait_ms}"
            )


class BadRequest(Exception):
    """A request the service refuses: ``status`` is the HTTP code, the message one line naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EncodedImage:
    """An image as received: its bytes, its size read from the header, and the size it will be kept at."""

    data: bytes
    size: tuple[int, int]
    kept_size: tuple[int, int]
    where: str

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def kept_pixels(self) -> int:
        return self.kept_size[0] * self.kept_size[1]


@dataclass
class ModerationRequest:
    messages: list[dict[str, str]]
    images: list[Image.Image]
    image_digests: tuple[str, ...]
    conversation_id: str | None
    encoded: list[EncodedImage] = field(default_factory=list, repr=False)  # dropped once decoded
    message_digests: tuple[bytes, ...] = ()
    expires: float = math.inf  # time.monotonic() past which nobody waits for the answer
    future: asyncio.Future | None = field(default=None, repr=False)

    @property
    def decode_pixels(self) -> int:
        """Pixels alive at most while its images decode: the largest in full, the kept copies of all."""
        if not self.encoded:
            return 0
        return max(image.pixels for image in self.encoded) + sum(image.kept_pixels for image in self.encoded)


class ImageFit:
    """The size the service keeps an image at: at most the moderator's trained pixel bounds.

    For a Qwen2-VL-style processor (pixel bounds, sides in multiples of patch x merge size) an image over
    the bound is downscaled to exactly the size the processor would resize it to, so the processor leaves
    it as it is and the model sees as many image tokens as it would have; smaller images are kept as
    sent (the processor resizes them itself, as before). Other processors resize to their own fixed size:
    images are kept within ``DEFAULT_MAX_PIXELS``.
    """

    def __init__(self, max_pixels: int, min_pixels: int | None = None, factor: int | None = None):
        self.max_pixels, self.min_pixels, self.factor = max_pixels, min_pixels, factor
        self._smart_resize: Any = None
        if factor is not None:
            try:  # the processors' own rule, so the sizes agree with the transformers version installed
                from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
            except ImportError:  # pragma: no cover - depends on the transformers version
                self.factor = None
            else:
                self._smart_resize = smart_resize

    @classmethod
    def for_moderator(cls, moderator: Any) -> ImageFit:
        processor = getattr(moderator, "processor", None)
        bounds = processor_image_bounds(processor) if processor is not None else None
        if bounds is None or not bounds.max_pixels:
            return cls(DEFAULT_MAX_PIXELS)
        image_processor = processor.image_processor
        factor = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        if not all(isinstance(f, int) and f > 0 for f in factor):
            return cls(bounds.max_pixels, bounds.min_pixels)
        return cls(bounds.max_pixels, bounds.min_pixels, factor[0] * factor[1])

    def _processor_size(self, width: int, height: int) -> tuple[int, int]:
        assert self.factor is not None
        min_pixels = self.min_pixels or self.factor * self.factor
        resized_height, resized_width = self._smart_resize(height, width, self.factor, min_pixels, self.max_pixels)
        return resized_width, resized_height

    def kept_size(self, width: int, height: int) -> tuple[int, int]:
        if width * height <= self.max_pixels:
            return width, height
        if self.factor is not None:
            size = self._processor_size(width, height)
            if size[0] * size[1] <= self.max_pixels:
                return size
        # A very thin image, whose processor size passes the bound (a side is at least one patch): scale it
        # into the bound, rounding the short side up and the long side down (the aspect ratio never grows).
        scale = math.sqrt(self.max_pixels / (width * height))
        if width >= height:
            kept_height = max(1, math.ceil(height * scale))
            return max(1, min(math.floor(width * scale), self.max_pixels // kept_height)), kept_height
        kept_width = max(1, math.ceil(width * scale))
        return kept_width, max(1, min(math.floor(height * scale), self.max_pixels // kept_width))

    def tokens(self, size: tuple[int, int]) -> int:
        """Image tokens the processor makes of a kept image (0 where the processor's rule is not known)."""
        if self.factor is None:
            return 0
        width, height = self._processor_size(*size)
        return (width // self.factor) * (height // self.factor)


# -- request parsing (runs in a worker thread: image decoding is CPU work) ------------------------------
def read_image(value: Any, where: str, max_pixels: int, fit: ImageFit) -> tuple[EncodedImage, str]:
    """A base64 string or ``data:image/...;base64,`` URL, checked but not decoded, and its bytes' sha256.

    Size and aspect ratio are read from the header; ``verify()`` checks the file's structure. Pixels are
    decoded later, by ``decode_image``, once the request holds its share of ``--max-pixels-in-flight``.
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
                # Refused here, not by the processor inside a batch (a 500 and the batch rerun one by one).
                if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                    ratio = max(width, height) / max(1, min(width, height))
                    raise BadRequest(
                        422,
                        f"{where}: image is {width}x{height} pixels, an aspect ratio of {ratio:.0f}, "
                        f"above the limit of {MAX_ASPECT_RATIO}",
                    )
                header.verify()
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(422, f"{where}: not a {'/'.join(IMAGE_FORMATS)} image") from None
    except Exception as exc:  # PIL raises many types for bad bytes; all mean "not a usable image"
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise BadRequest(422, f"{where}: not a decodable image ({reason})") from None
    encoded = EncodedImage(data, (width, height), fit.kept_size(width, height), where)
    return encoded, hashlib.sha256(data).hexdigest()


def decode_image(encoded: EncodedImage) -> Image.Image:
    """The image fully decoded, as RGB at its kept size: only the downscaled copy outlives this call.

    ``load()`` decodes it all (``verify`` alone misses a file cut off halfway). A JPEG is decoded at a
    reduced scale already (``draft``) when it is to be downscaled.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(encoded.data), formats=IMAGE_FORMATS)
            if encoded.kept_size != encoded.size:
                image.draft("RGB", encoded.kept_size)
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != encoded.kept_size:
                # reducing_gap: a fast integer reduction first, then bicubic (practically fair resampling).
                image = image.resize(encoded.kept_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            return image
    except Exception as exc:  # PIL raises many types for bad bytes; all mean "not a usable image"
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise BadRequest(422, f"{encoded.where}: not a decodable image ({reason})") from None


def decode_images(request: ModerationRequest) -> None:
    """Decode ``request``'s images (in a worker thread), one at a time, and drop their encoded bytes."""
    request.images = [decode_image(encoded) for encoded in request.encoded]
    request.encoded = []


def message_digests(messages: Sequence[Mapping[str, str]]) -> tuple[bytes, ...]:
    """One digest per message: what the server remembers of a conversation instead of its text."""
    return tuple(hashlib.sha256(f"{m['role']}\x00{m['content']}".encode()).digest() for m in messages)


class TokenCounter:
    """A request's prompt tokens as the model sees them (its text and image tokens), before it is queued.

    Uses its own copy of the tokenizer: the model thread's tokenizer changes its padding state per call,
    and a Rust tokenizer used from two threads at once raises. A moderator without a tokenizer here (a
    stand-in) has its text counted in UTF-8 bytes, an upper bound for byte-level tokenizers.
    """

    def __init__(self, moderator: Any, fit: ImageFit):
        self.fit = fit
        self._render = getattr(moderator, "prompt_texts", None)
        tokenizer = getattr(getattr(moderator, "processor", None), "tokenizer", None)
        self._encode: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._render is None or tokenizer is None:
            return
        if backend is not None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(backend.to_str())
            copy.no_padding()
            copy.no_truncation()
            self._encode = lambda text: len(copy.encode(text).ids)
        else:
            import copy as copying

            own = copying.deepcopy(tokenizer)
            self._encode = lambda text: len(own(text)["input_ids"])
        self._lock = threading.Lock()

    def count(self, messages: list[dict[str, str]], images: Sequence[EncodedImage]) -> int:
        if self._encode is None:
            return sum(len(m["content"].encode()) for m in messages)
        text = self._render([messages], [[IMAGE_TURN] * len(images)])[0]
        with self._lock:
            tokens = self._encode(text)
        # Each image is one placeholder token in the text, expanded by the processor.
        return tokens + sum(max(self.fit.tokens(image.kept_size) - 1, 0) for image in images)


def check_request_tokens(request: ModerationRequest, counter: TokenCounter, limit: int) -> None:
    characters = sum(len(m["content"]) for m in request.messages)
    if characters > limit * MAX_CHARS_PER_TOKEN:
        raise BadRequest(
            413,
            f"messages: {characters} characters, more than the {limit * MAX_CHARS_PER_TOKEN} that the limit of "
            f"{limit} tokens allows (--max-request-tokens)",
        )
    tokens = counter.count(request.messages, request.encoded)
    if tokens > limit:
        raise BadRequest(
            413, f"request of {tokens} tokens (text and images), more than the limit of {limit} (--max-request-tokens)"
        )


def parse_request(body: bytes, settings: ServeSettings, fit: ImageFit | None = None) -> ModerationRequest:
    """Validate a request body (already size-checked); raise ``BadRequest`` naming the field.

    Images are checked from their headers, not decoded (``decode_images`` does that).
    """
    fit = fit or ImageFit(DEFAULT_MAX_PIXELS)
    try:
        payload = json.loads(body)
    except RecursionError:  # "[[[[..." deeper than Python's parser goes: a client error, not a 500
        raise BadRequest(400, "request body is not valid JSON (nested too deeply)") from None
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
    read = [read_image(v, f"images[{i}]", settings.max_image_pixels, fit) for i, v in enumerate(raw_images)]
    return ModerationRequest(
        messages=messages,
        images=[],
        image_digests=tuple(digest for _, digest in read),
        conversation_id=conversation_id,
        encoded=[encoded for encoded, _ in read],
        message_digests=message_digests(messages) if conversation_id is not None else (),
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


# -- the pixel budget -----------------------------------------------------------------------------------
class PixelBudget:
    """Decoded pixels of the requests in flight, at most ``limit`` (used on the event loop only).

    A request decodes its images one at a time, so before decoding it takes the pixels of its largest
    image at full size plus those of all its kept (downscaled) copies (``ModerationRequest.decode_pixels``),
    keeps the kept copies' share until it is answered, and gives the rest back as soon as it has decoded.
    It takes them all at once or waits: no request holds some while it waits for more (no deadlock).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self.peak = 0  # the most ever held at once (observability, tests)
        self._changed: asyncio.Condition | None = None

    def start(self) -> None:
        """On the serving event loop (an asyncio condition belongs to one loop)."""
        self._changed = asyncio.Condition()

    async def take(self, pixels: int, timeout: float) -> int:
        """Take ``min(pixels, limit)``, waiting at most ``timeout`` seconds; 503 if it did not come free."""
        pixels = min(pixels, self.limit)
        assert self._changed is not None, "PixelBudget.start() first"
        async with self._changed:
            try:
                if self.in_use + pixels > self.limit:
                    fits = lambda: self.in_use + pixels <= self.limit  # noqa: E731
                    await asyncio.wait_for(self._changed.wait_for(fits), max(timeout, 0.0))
            except asyncio.TimeoutError:
                raise BadRequest(
                    503,
                    f"server busy: the images in flight hold all {self.limit} decoded pixels of "
                    "--max-pixels-in-flight; retry later",
                ) from None
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        return pixels

    async def give_back(self, pixels: int) -> None:
        if pixels and self._changed is not None:
            async with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()


# -- the moderation worker ----------------------------------------------------------------------------
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
        return self.moderator.moderate_batch(
            [r.messages for r in batch],
            [r.images for r in batch],
            image_turns=[[IMAGE_TURN] * len(r.images) for r in batch],
            max_new_tokens=self.settings.max_new_tokens,
        )

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
            verdict = session.reset(request.messages, request.images, image_turns)
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
            return session.extend(request.messages[start:], images, [IMAGE_TURN] * len(images))
        verdict = None
        for index in range(start, len(request.messages)):
            if time.monotonic() >= request.expires:
                raise DeadlinePassed(self.settings.request_timeout_s)
            message = request.messages[index]
            verdict = session.add_turn(message["role"], message["content"], images if index == IMAGE_TURN else [])
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


class ModelFailure(Exception):
    """The model raised while moderating a request (logged with its traceback; the caller gets a 500)."""

    def __init__(self) -> None:
        super().__init__("moderation failed inside the model for this request; see the server log")


class DeadlinePassed(BadRequest):
    """No verdict by the request's deadline: its caller gets a 504 (and the model drops what it can)."""

    def __init__(self, timeout_s: float):
        super().__init__(
            504,
            f"no verdict within the request's deadline of {timeout_s:g} s (--request-timeout-s): the server is busy",
        )


# -- the app --------------------------------------------------------------------------------------------
def create_app(moderator: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving ``moderator`` (already loaded and verified)."""
    if FastAPI is None:
        raise ImportError(SERVE_EXTRA_MISSING)
    settings = settings or ServeSettings()
    store = getattr(moderator, "sessions", None)
    if hasattr(store, "max_new_tokens"):  # incremental verdicts are generated as long as whole-conversation ones
        store.max_new_tokens = settings.max_new_tokens
    if hasattr(store, "max_bytes"):
        store.max_bytes, store.max_sessions = settings.max_session_bytes, settings.max_sessions
    worker = ModerationWorker(moderator, settings)
    fit = ImageFit.for_moderator(moderator)
    counter = TokenCounter(moderator, fit)
    pixels = PixelBudget(settings.max_pixels_in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        pixels.start()
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="SafeMT moderator", lifespan=lifespan)
    app.state.worker, app.state.pixels = worker, pixels

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

    def parse(body: bytes) -> ModerationRequest:
        parsed = parse_request(body, settings, fit)
        check_request_tokens(parsed, counter, settings.max_request_tokens)  # before any pixel is decoded
        return parsed

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> dict[str, Any]:
        started = time.monotonic()
        body = await read_body(request, settings.max_body_bytes)
        parsed = await run_in_threadpool(parse, body)
        del body
        held = 0
        try:
            if parsed.encoded:
                remaining = settings.request_timeout_s - (time.monotonic() - started)
                held = await pixels.take(parsed.decode_pixels, remaining)
                kept = sum(image.kept_pixels for image in parsed.encoded)
                await run_in_threadpool(decode_images, parsed)
                # Only the kept copies stay until the answer: the rest of the budget goes back now.
                await pixels.give_back(held - min(held, kept))
                held = min(held, kept)
            return await worker.submit(parsed, settings.request_timeout_s - (time.monotonic() - started))
        finally:
            await pixels.give_back(held)

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
    parser.add_argument(
        "--expect-manifest-sha256",
        default=None,
        metavar="HEX",
        help="serve this export and no other: the sha256 of its manifest.json, as `python -m export` printed it",
    )
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests per model batch")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help="how long a batch waits to fill up (finite, below --request-timeout-s; default: %(default)s)",
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
        "--max-pixels-in-flight",
        type=int,
        default=defaults.max_pixels_in_flight,
        help=f"decoded pixels of all requests in flight, at most {DECODE_BYTES_PER_PIXEL} bytes each; "
        "past it requests wait, and get 503 at their deadline (default: %(default)s, two 4096x4096 images)",
    )
    parser.add_argument(
        "--max-request-tokens",
        type=int,
        default=defaults.max_request_tokens,
        help="prompt tokens per request, text and images; larger requests get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=defaults.request_timeout_s,
        help="a request not answered within this gets 504 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="requests waiting beyond this get 503"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="verdict text length (category, intent)"
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=defaults.max_sessions,
        help="conversations remembered (LRU; default: %(default)s)",
    )
    parser.add_argument(
        "--max-session-bytes",
        type=int,
        default=defaults.max_session_bytes,
        help="host memory all sessions may hold: turns, images, CPU KV caches (LRU; default: %(default)s, 1 GiB)",
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
        max_pixels_in_flight=args.max_pixels_in_flight,
        max_request_tokens=args.max_request_tokens,
        request_timeout_s=args.request_timeout_s,
        max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens,
        max_sessions=args.max_sessions,
        max_session_bytes=args.max_session_bytes,
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
            export_dir,
            device=args.device,
            dtype=args.dtype,
            threshold=args.threshold,
            verify=not args.no_verify,
            expect_manifest_sha256=args.expect_manifest_sha256,
        )
    except (ManifestError, ModeratorConfigError, ModelLoadError) as exc:
        raise InputError(str(exc)) from None
    logger.info("serving %s (threshold %s) on http://%s:%d", export_dir, moderator.threshold, args.host, args.port)
    # The model is loaded and verified before the port is bound: a refused export never listens.
    # Every request is answered by its deadline, so SIGTERM's graceful shutdown ends by then too.
    uvicorn.run(
        create_app(moderator, settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s) + 5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
