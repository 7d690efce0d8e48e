"""Placeholder images for SafeMT records, for the tests and ``make demo`` (the real images are not shipped).

``python -m tiny_models.images DIR --copy-from tests/data/safemt_sample`` copies the ``<k>_turn.json``
files into DIR and writes a deterministic placeholder image (``moderator.images.placeholder_image``) at
every ``image_path`` they name.
"""

from __future__ import annotations

import json
from pathlib import Path

from moderator.images import placeholder_image
from moderator.schema import TURN_COUNTS, safemt_turn_file


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


def main(argv: list[str] | None = None) -> None:
    import argparse
    import shutil

    from moderator.cli import one_line_parser_errors

    parser = argparse.ArgumentParser(
        prog="python -m tiny_models.images", description="Copy SafeMT <k>_turn.json files and write placeholder images."
    )
    one_line_parser_errors(parser)
    parser.add_argument("out_dir")
    parser.add_argument("--copy-from", help="folder whose <k>_turn.json files are copied first")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    sources = sorted(Path(args.copy_from).glob("*_turn.json")) if args.copy_from else []
    if args.copy_from and not sources:
        parser.error(f"--copy-from {args.copy_from}: no <k>_turn.json files there (is it a SafeMT Data folder?)")
    out.mkdir(parents=True, exist_ok=True)
    for path in sources:
        shutil.copy(path, out / path.name)
    print(f"{write_placeholder_images(out)} placeholder images under {out}")


if __name__ == "__main__":
    from moderator.cli import run_cli

    raise SystemExit(run_cli(main))
