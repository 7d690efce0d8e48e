"""The service's limits: its settings, the size images are kept at, and the decoded-pixel budget.

Every limit is a command-line option of ``python -m serve`` (``ServeSettings``); a request over one gets
a ``BadRequest`` with its HTTP status and a one-line message naming the field or the option.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from moderator.cli import UsageError
from moderator.images import DEFAULT_MAX_PIXELS, processor_image_bounds

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


class DeadlinePassed(BadRequest):
    """No verdict by the request's deadline: its caller gets a 504 (and the model drops what it can)."""

    def __init__(self, timeout_s: float):
        super().__init__(
            504,
            f"no verdict within the request's deadline of {timeout_s:g} s (--request-timeout-s): the server is busy",
        )


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
