"""Pixel bounds shared by every model that reads images, and the deterministic placeholder image.

``placeholder_image`` stands in for an image that cannot be used (data prep) or is not shipped (export's
equivalence check); writing placeholder images for a whole SafeMT folder is ``tiny_models.images`` (tests, demo).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

# One default for every model that reads images (targets, guards, the moderator, vLLM), equal to the
# training recipes' bound: Qwen2-VL-style processors otherwise allow 12.8M pixels (16,384 image tokens)
# per image. 28 x 28 pixels make one image token after the 2 x 2 merge of 14-pixel patches.
PIXELS_PER_IMAGE_TOKEN = 28 * 28
DEFAULT_MIN_PIXELS = 4 * PIXELS_PER_IMAGE_TOKEN  # 3,136: the Qwen2-VL processors' own lower bound
DEFAULT_MAX_PIXELS = 512 * PIXELS_PER_IMAGE_TOKEN  # 401,408: at most 512 image tokens per image


@dataclass(frozen=True)
class ImageBounds:
    """The pixel range images are resized into (None: keep the processor's own bound on that side)."""

    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")

    @property
    def is_set(self) -> bool:
        return bool(self.min_pixels or self.max_pixels)

    def processor_kwargs(self) -> dict[str, int]:
        """The bounds as processor keyword arguments (vLLM's ``mm_processor_kwargs``)."""
        return {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}


DEFAULT_IMAGE_BOUNDS = ImageBounds(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def supports_pixel_bounds(processor: Any) -> bool:
    """Whether the processor resizes images into a pixel budget (Qwen2-VL and its relatives).

    Decided by the image processor's own declared keyword arguments, not by ``size`` keys: a CLIP
    processor also has ``size["shortest_edge"]``, but there it is an edge length, not a pixel count.
    """
    image_processor = getattr(processor, "image_processor", None)
    declared = getattr(image_processor, "valid_kwargs", None)
    return declared is not None and {"min_pixels", "max_pixels"} <= set(getattr(declared, "__annotations__", {}))


def processor_image_bounds(processor: Any) -> ImageBounds | None:
    """The bounds a pixel-budget processor applies now (None for other processors)."""
    if not supports_pixel_bounds(processor):
        return None
    size = dict(processor.image_processor.size or {})
    return ImageBounds(size.get("shortest_edge"), size.get("longest_edge"))


def bound_image_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Make a Qwen2-VL-style processor resize images into [min_pixels, max_pixels] (bounds image tokens).

    Used by training, data prep's token lengths and every model loaded by ``moderator.loading``, so
    all count the same image tokens. The bounds go in ``size`` (shortest_edge/longest_edge); the
    ``min_pixels``/``max_pixels`` attributes are deprecated in transformers 5. A text-only processor
    is left alone; an image processor without a pixel budget is refused (its ``size`` means edges).
    """
    bounds = ImageBounds(min_pixels, max_pixels)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not bounds.is_set:
        return
    if not supports_pixel_bounds(processor):
        raise ValueError(
            f"min_pixels/max_pixels given, but {type(image_processor).__name__} does not resize images into a "
            "pixel budget (only Qwen2-VL-style processors do); unset them for this model"
        )
    size = dict(image_processor.size or {})
    if min_pixels:
        size["shortest_edge"] = min_pixels
    if max_pixels:
        size["longest_edge"] = max_pixels
    image_processor.size = size


def placeholder_image(key: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic image whose colours depend on ``key`` (so different records differ)."""
    digest = hashlib.sha256(key.encode()).digest()
    image = Image.new("RGB", size, tuple(digest[:3]))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=tuple(digest[3:6]))
    return image
