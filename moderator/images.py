"""Placeholder images for SafeMT records whose real images are not at hand (tests, the demo)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from moderator.schema import TURN_COUNTS, safemt_turn_file


def bound_image_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Make a Qwen2-VL-style processor resize images into [min_pixels, max_pixels] (bounds image tokens).

    Used by training and by data prep's token lengths, so both count the same image tokens. The
    bounds go in ``size`` (shortest_edge/longest_edge); the ``min_pixels``/``max_pixels`` attributes
    are deprecated in transformers 5.
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not (min_pixels or max_pixels):
        return
    size = dict(getattr(image_processor, "size", None) or {})
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


def write_placeholder_images(safemt_dir: str | Path, size: tuple[int, int] = (64, 48)) -> int:
    """Write a placeholder image at every ``image_path`` named by the ``<k>_turn.json`` files; return how many."""
    safemt_dir = Path(safemt_dir)
    written = set()
    for k in TURN_COUNTS:
        path = safemt_turn_file(safemt_dir, k)
        if not path.exists():
            continue
        for record in json.loads(path.read_text()):
            rel = record.get("image_path") if isinstance(record, dict) else None
            if not isinstance(rel, str) or not rel or rel in written:
                continue
            target = safemt_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fmt = {".png": "PNG"}.get(target.suffix.lower(), "JPEG")
            placeholder_image(rel, size).save(target, format=fmt)
            written.add(rel)
    return len(written)


def main() -> None:
    import argparse
    import shutil

    parser = argparse.ArgumentParser(description="Copy SafeMT <k>_turn.json files and write placeholder images.")
    parser.add_argument("out_dir")
    parser.add_argument("--copy-from", help="folder whose <k>_turn.json files are copied first")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.copy_from:
        for path in sorted(Path(args.copy_from).glob("*_turn.json")):
            shutil.copy(path, out / path.name)
    print(f"{write_placeholder_images(out)} placeholder images under {out}")


if __name__ == "__main__":
    main()
