"""One request: its body read within the size limit, parsed, its images checked, counted and decoded.

Parsing and decoding run in a worker thread (image decoding is CPU work); nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from moderator.images import DEFAULT_MAX_PIXELS
from moderator.schema import SAFEMT_IMAGE_TURNS, RecordError
from moderator.schema import validate_dialogue as validate_safemt_dialogue
from serve.limits import MAX_ASPECT_RATIO, MAX_CHARS_PER_TOKEN, BadRequest, ImageFit, ServeSettings

# Images of a request belong to the first user turn (the SafeMT contract: moderator/schema.py).
IMAGE_TURN = SAFEMT_IMAGE_TURNS[0]
# Formats PIL decodes in-process; others are refused (EPS, for one, would run Ghostscript on the bytes).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


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
    # Whether to generate a flagged verdict's intent: None (not given) means the default of the request's
    # kind, the whole answer without a conversation_id, the decision alone with one.
    intent: bool | None = None
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
    unknown = sorted(set(payload) - {"messages", "images", "conversation_id", "intent"})
    if unknown:
        raise BadRequest(422, f"unknown field(s) {unknown}; expected 'messages', 'images', 'conversation_id', 'intent'")
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
    intent = payload.get("intent")
    if intent is not None and not isinstance(intent, bool):
        raise BadRequest(422, f"field 'intent': expected true or false, got {json.dumps(intent)[:40]}")
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
        intent=intent,
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
