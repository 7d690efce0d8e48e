"""Image checks and the benign image pool.

Each unique image file is fully decoded once (``Image.load()``): ``verify()`` only reads the header and
misses a JPEG cut off halfway. Decoding runs in a few threads (PIL releases the GIL while decoding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from moderator.images import placeholder_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class ImageCheck:
    path: str
    size: tuple[int, int] | None  # (width, height) when the image decoded
    error: str | None  # why it is unusable


def check_image(path: str) -> ImageCheck:
    if not Path(path).is_file():
        return ImageCheck(path, None, f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageCheck(path, image.size, None)
    except Exception as exc:  # PIL raises many types for bad bytes; all mean "unusable"
        return ImageCheck(path, None, f"image cannot be decoded ({type(exc).__name__}: {exc}): {path}")


def check_images(paths: Iterable[str], workers: int = 4) -> dict[str, ImageCheck]:
    """Check every unique path once; return ``path -> ImageCheck``."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass the check")
    unique = sorted(set(paths))
    if workers <= 1 or len(unique) < 2:
        return {p: check_image(p) for p in unique}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(check_image, unique), strict=True))


class ImagePathError(ValueError):
    """An image path that leaves its root (or cannot be resolved); the message is the quarantine reason."""


def resolve_inside(
    root: Path, path: str | Path, *, also_allowed: Sequence[Path] = (), what: str = "images folder"
) -> Path:
    """``root / path`` with ``..`` and every link (file or folder) followed; it must stay inside ``root``.

    ``also_allowed``: other folders links may lead into (a hub snapshot's blob store). The error text is
    the same whether or not a file exists outside, so a quarantine entry cannot be used to probe for one.
    """
    if "\0" in str(path):
        raise ImagePathError(f"{str(path)!r} contains a NUL byte")
    root = root.resolve()
    outside = ImagePathError(f"{str(path)!r} points outside the {what} {root}")
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long: not a file inside root either
        raise outside from None
    if resolved.is_relative_to(root) or any(resolved.is_relative_to(Path(a).resolve()) for a in also_allowed):
        return resolved
    raise outside


def folder_images(folder: str | Path) -> list[str]:
    """All image files under ``folder`` (recursive), absolute, sorted; links that lead out of it are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"benign image pool folder not found: {folder}")
    root = folder.resolve()
    images = {p.resolve() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    return sorted(str(p) for p in images if p.is_relative_to(root))


def write_placeholder(path: Path, key: str, size: tuple[int, int]) -> str:
    """A generated image for a benign dialogue without one (tests, the demo); returns the absolute path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        placeholder_image(key, size).save(path, format="JPEG")
    return str(path.resolve())
