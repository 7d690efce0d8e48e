"""Streaming moderation benchmark: ``python -m bench.streaming [--model DIR] [--quick]``.

Three measurements on one moderator (default: the offline tiny Qwen2.5-VL, built in a temporary
directory; float32 on CPU unless the device says otherwise):

(a) per-turn moderation of one 8-user-turn dialogue (a SafeMT sample dialogue extended with its own
    turns, image on the first turn; the verdict prefix forced as in (b)): ``Moderator.moderate_turns``
    (each turn continues the previous prompt's KV cache), once with the whole answer decoded
    (``answer="full"``) and once with the decision alone (``answer="decision"``, the default: no text
    decoded), against ``moderate()`` on every prefix (the full answer recomputed from scratch): wall time
    and prompt tokens prefilled; then the latency of each turn's verdict (p50/p95 over the turns, and
    at the last turn) for the decision against the full answer, both continuing the cache;
(b) one pass against two passes per decision on the same batch: ``moderate_batch`` (P(unsafe) read
    from the generate call) against the old path (``p_unsafe`` scoring forward, then ``generate``).
    A random model never writes the ``verdict: `` prefix, which would send the one pass back to the
    scoring pass; a forward hook adds a large logit to the prefix tokens only (as
    tests/test_inference.py does), so both paths generate the prefix and P(unsafe) is the model's own;
(c) the service (``serve``'s app under uvicorn, in a thread, on 127.0.0.1 and a free port)
    serving a verified export of the same checkpoint (``python -m export``'s code path): N concurrent
    clients each send a fixed number of requests; every answer must be a 200 with a verdict.

Prints one table, then ``decision latency at turn 8 = L × the full answer's``,
``decision-only per-turn cost ratio at 8 turns = D``, ``one-pass speed-up = Y×`` and, last,
``per-turn cost ratio at 8 turns = X`` (targets: X <= 0.35 and Y >= 1.8, issue 14; D <= 0.25 and
L <= 0.3, issue 26). A random model (the defaults) never writes the answer format, so its decision
fails closed after the one prefill and is never asked for a category: for those figures use a trained
moderator (``--model``). Timings are the best of ``--repeats`` runs after a warm-up,
the two sides of a comparison taking turns.
Not a test (tests/test_bench_streaming.py runs ``--quick``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from moderator.contract import DECISION, FULL_ANSWER
from moderator.inference import Moderator, PrefixCache

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"
LOOPBACK = "127.0.0.1"


# -- inputs ----------------------------------------------------------------------------------------------
def long_dialogue(user_turns: int) -> list[dict[str, str]]:
    """The first 4-turn sample dialogue, its turns repeated until it has ``user_turns`` user turns."""
    base = json.loads((SAMPLE_DIR / "4_turn.json").read_text())[0]["dialogue"]
    dialogue: list[dict[str, str]] = []
    while sum(m["role"] == "user" for m in dialogue) < user_turns:
        for message in base:
            dialogue.append(dict(message))
            if sum(m["role"] == "user" for m in dialogue) == user_turns:
                break
    # The sample ends on a user turn: its first assistant reply goes between the repeats.
    return alternating(dialogue, next(m["content"] for m in base if m["role"] == "assistant"))


def alternating(messages: Sequence[dict[str, str]], filler: str) -> list[dict[str, str]]:
    """``messages`` with an assistant turn (``filler``) between two user turns (SafeMT roles alternate)."""
    out: list[dict[str, str]] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"] == "user":
            out.append({"role": "assistant", "content": filler})
        out.append(dict(message))
    return out


def sample_batch(size: int) -> tuple[list[list[dict[str, str]]], list[list[Image.Image]]]:
    """``size`` SafeMT sample dialogues (4-turn, then 1-turn records), each with its own image."""
    records = json.loads((SAMPLE_DIR / "4_turn.json").read_text()) + json.loads(
        (SAMPLE_DIR / "1_turn.json").read_text()
    )
    if size > len(records):
        raise SystemExit(f"--batch {size}: only {len(records)} sample dialogues in {SAMPLE_DIR}")
    images = [[Image.new("RGB", (224 + 28 * (i % 4), 168), (30 * i % 256, 90, 200))] for i in range(size)]
    return [r["dialogue"] for r in records[:size]], images


def build_wider_random(tiny_dir: Path, out_dir: Path, width: int, layers: int) -> Path:
    """The tiny checkpoint with a wider, deeper random text model (head size 128, as Qwen2.5-VL's).

    At the tiny model's width (64) a call costs its fixed overhead (processor, generate's loop), not
    its prefill; this model makes prefill cost what it costs in a real one. Same tokenizer and processor.
    """
    import torch
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if width % 128:
        raise SystemExit(f"--width {width}: must be a multiple of 128 (the head size)")
    config = AutoConfig.from_pretrained(tiny_dir)
    text, heads = config.text_config, width // 128
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = width, width * 11 // 4, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, max(heads // 2, 1), 128
    text.max_window_layers, text.layer_types = layers, ["full_attention"] * layers
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [16, 24, 24]}  # sums to head_dim / 2
    config.vision_config.out_hidden_size = width
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_dir)
    out_dir.mkdir(parents=True)
    for path in tiny_dir.iterdir():  # processor, tokenizer, chat template
        if path.is_file() and not path.name.startswith(("model", "config.json", "generation_config.json")):
            shutil.copy(path, out_dir / path.name)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# -- measuring -------------------------------------------------------------------------------------------
@contextmanager
def prefill_counter(moderator: Moderator) -> Iterator[dict[str, int]]:
    """Counts forward passes over more than one token (prefills) and the tokens they ran."""
    counted = {"tokens": 0, "prefills": 0}

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        length = kwargs["input_ids"].shape[1]
        if length > 1:
            counted["tokens"] += length * kwargs["input_ids"].shape[0]
            counted["prefills"] += 1

    handle = moderator.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


def prompt_tokens_run(moderator: Moderator):
    """Kept for callers of the old ``bench.per_turn`` helper (same counter)."""
    return prefill_counter(moderator)


def best_times(
    calls: Sequence[Callable[[], Any]], repeats: int, moderator: Moderator
) -> list[tuple[float, dict[str, int]]]:
    """Per call: best wall time of ``repeats`` runs after one warm-up, and the prefills of one run.

    The calls take turns (A, B, A, B, ...) so that a change in the machine's load (it is shared)
    falls on both rather than on whichever ran during it.
    """
    for call in calls:
        call()  # warm-up (first-call allocations, lazy imports)
    times: list[list[float]] = [[] for _ in calls]
    counted: list[dict[str, int]] = [{} for _ in calls]
    for repeat in range(repeats):
        for index, call in enumerate(calls):
            with prefill_counter(moderator) as counts:
                start = time.perf_counter()
                call()
                times[index].append(time.perf_counter() - start)
            if repeat == 0:
                counted[index] = dict(counts)
    return [(min(t), c) for t, c in zip(times, counted, strict=True)]


def prompt_end_token(moderator: Moderator, dialogues: Sequence[Any], images: Sequence[Sequence[Any]]) -> int:
    """The last token of the prompts (the generation prompt's), after which the verdict prefix starts."""
    texts = moderator.prompt_texts(dialogues, [[0] * len(i) for i in images])
    ends = {int(ids[-1]) for ids in moderator._inputs(texts, images)["input_ids"]}
    if len(ends) != 1:
        raise RuntimeError(f"prompts end in different tokens {sorted(ends)}: cannot force the verdict prefix")
    return ends.pop()


@contextmanager
def verdict_prefix_forced(moderator: Moderator, prompt_end_token: int) -> Iterator[None]:
    """Make a random model generate the ``verdict: `` prefix (as tests/test_inference.py does).

    A forward hook adds a large logit to the next prefix token after the prompt's last token and after
    each prefix token; the safe/unsafe logits at the verdict position are left as the model made them.
    """
    prefix = moderator._prefix
    following = {prompt_end_token: prefix[0], **{prefix[i]: prefix[i + 1] for i in range(len(prefix) - 1)}}

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        last = kwargs["input_ids"][:, -1].tolist()
        for row, token in enumerate(last):
            target = following.get(token)
            if target is not None:
                output.logits[row, -1, target] += 1e3

    handle = moderator.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# -- (a) per-turn reuse vs recompute ---------------------------------------------------------------------
@dataclass
class PerTurn:
    turns: int
    reuse_s: float  # moderate_turns, the full answer
    recompute_s: float  # moderate() on every prefix, the full answer
    reuse_tokens: int
    recompute_tokens: int
    decision_s: float  # moderate_turns, the decision alone
    decision_tokens: int
    decision_latencies_s: list[float]  # per turn, best of the repeats
    full_latencies_s: list[float]
    flagged: int  # turns the decision flagged

    @property
    def decision_ratio(self) -> float:
        return self.decision_s / self.recompute_s

    @property
    def last_turn_ratio(self) -> float:
        return self.decision_latencies_s[-1] / self.full_latencies_s[-1]


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def turn_latencies(
    moderator: Moderator, dialogue: list[dict[str, str]], images: list[Any], answer: str, max_new_tokens: int
) -> list[float]:
    """Wall time of each user turn's verdict, each turn continuing the previous one's cache (a session)."""
    prefix_cache, times = PrefixCache(), []
    for end, message in enumerate(dialogue):
        if message["role"] == "user":
            start = time.perf_counter()
            moderator.moderate_extended(prefix_cache, dialogue[: end + 1], images, [0], max_new_tokens, answer=answer)
            times.append(time.perf_counter() - start)
    return times


def bench_per_turn(moderator: Moderator, user_turns: int, max_new_tokens: int, repeats: int) -> PerTurn:
    dialogue, images = long_dialogue(user_turns), [Image.new("RGB", (448, 336), (40, 90, 200))]
    ends = [i for i, m in enumerate(dialogue) if m["role"] == "user"]

    def reuse() -> None:
        moderator.moderate_turns(dialogue, images, max_new_tokens=max_new_tokens, answer=FULL_ANSWER)

    def decision() -> None:
        moderator.moderate_turns(dialogue, images, max_new_tokens=max_new_tokens, answer=DECISION)

    def recompute() -> None:
        for end in ends:
            moderator.moderate_batch([dialogue[: end + 1]], [images], max_new_tokens=max_new_tokens)

    # As a trained moderator does: without the verdict prefix every turn would add a scoring pass.
    with verdict_prefix_forced(moderator, prompt_end_token(moderator, [dialogue], [images])):
        timed = best_times([reuse, decision, recompute], repeats, moderator)
        latencies: dict[str, list[list[float]]] = {DECISION: [], FULL_ANSWER: []}
        for _ in range(repeats):  # the two take turns, as in best_times
            for answer, runs in latencies.items():
                runs.append(turn_latencies(moderator, dialogue, images, answer, max_new_tokens))
        flagged = sum(v.flagged for v in moderator.moderate_turns(dialogue, images, answer=DECISION))
    (reuse_s, reuse_counts), (decision_s, decision_counts), (recompute_s, recompute_counts) = timed
    best = {answer: [min(turn) for turn in zip(*runs, strict=True)] for answer, runs in latencies.items()}
    return PerTurn(
        len(ends),
        reuse_s,
        recompute_s,
        reuse_counts["tokens"],
        recompute_counts["tokens"],
        decision_s,
        decision_counts["tokens"],
        best[DECISION],
        best[FULL_ANSWER],
        flagged,
    )


# -- (b) one pass vs two passes per decision -------------------------------------------------------------
@dataclass
class OnePass:
    batch: int
    one_s: float
    two_s: float
    one_prefills: int
    two_prefills: int
    prefixed: bool
    max_score_diff: float


def bench_one_pass(moderator: Moderator, batch: int, max_new_tokens: int, repeats: int) -> OnePass:
    dialogues, images = sample_batch(batch)
    image_turns = [[0]] * len(dialogues)

    def one_pass() -> list[Any]:
        return moderator.moderate_batch(dialogues, images, image_turns, max_new_tokens=max_new_tokens)

    def two_pass() -> list[Any]:  # the path before issue 14: a scoring forward, then generate
        texts = moderator.prompt_texts(dialogues, image_turns)
        scores = moderator.p_unsafe(texts, images)
        raws = moderator.generate(texts, images, max_new_tokens=max_new_tokens)
        return [moderator._verdict(raw, score) for raw, score in zip(raws, scores, strict=True)]

    with verdict_prefix_forced(moderator, prompt_end_token(moderator, dialogues, images)):
        (one_s, one_counts), (two_s, two_counts) = best_times([one_pass, two_pass], repeats, moderator)
        one, two = one_pass(), two_pass()
    prefixed = all(v.raw.startswith("verdict:") for v in one)
    diff = max(abs(a.p_unsafe - b.p_unsafe) for a, b in zip(one, two, strict=True))
    return OnePass(len(dialogues), one_s, two_s, one_counts["prefills"], two_counts["prefills"], prefixed, diff)


# -- (c) the service under a bounded loopback load -------------------------------------------------------
@dataclass
class ServiceLoad:
    clients: int
    requests: int
    ok: int
    latencies_s: list[float]
    wall_s: float
    failures: list[str]

    @property
    def lost(self) -> int:
        return self.requests - self.ok

    def percentile(self, q: int) -> float:
        return percentile(self.latencies_s, q)


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export ``checkpoint`` with ``python -m export``'s code (manifest, card; no equivalence samples)."""
    from export.exporting import export, parse_export_args
    from moderator.artefacts import read_run_record, write_run_record
    from moderator.contract import PROMPT_FORMAT_VERSION
    from moderator.taxonomy import load_taxonomy

    if read_run_record(checkpoint) is None:  # the offline tiny model was never trained
        copy = out.parent / "checkpoint"
        shutil.copytree(checkpoint, copy)
        record = {**load_taxonomy().provenance(), "prompt_format_version": PROMPT_FORMAT_VERSION, "config": {}}
        write_run_record(copy, record)
        checkpoint = copy
    return export(parse_export_args(["--checkpoint", str(checkpoint), "--out", str(out), "--equivalence-samples", "0"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def serving(export_dir: Path, max_new_tokens: int, max_batch: int) -> Iterator[str]:
    """The service's app on a loopback port in a thread, serving the export verified at load."""
    import uvicorn

    from serve import ServeSettings, create_app

    moderator = Moderator.from_pretrained(export_dir, verify=True)  # ManifestError if it does not match
    settings = ServeSettings(max_new_tokens=max_new_tokens, max_batch=max_batch)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(moderator, settings), host=LOOPBACK, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="bench-serve", daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if not thread.is_alive():
                raise RuntimeError("the service stopped before it was ready")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as ready:
                    if json.load(ready)["verified"] is True:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/readyz did not answer within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def bench_service(url: str, clients: int, requests_per_client: int, user_turns: int) -> ServiceLoad:
    """``clients`` threads each POST ``requests_per_client`` conversations (prefixes of the dialogue)."""
    dialogue = long_dialogue(user_turns)
    ends = [i for i, m in enumerate(dialogue) if m["role"] == "user"]
    buffer = io.BytesIO()
    Image.new("RGB", (448, 336), (40, 90, 200)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def client(index: int) -> list[tuple[float, str | None]]:
        results = []
        for k in range(requests_per_client):
            end = ends[(index + k) % len(ends)]
            body = json.dumps({"messages": dialogue[: end + 1], "images": [image]}).encode()
            request = urllib.request.Request(f"{url}/v1/moderate", body, {"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.load(response)
                    problem = None if answer.get("verdict") in ("safe", "unsafe") else f"no verdict: {answer}"
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}: {exc.read()[:200]!r}"
            except OSError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            results.append((time.perf_counter() - start, problem))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        per_client = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    failures = [problem for _, problem in results if problem is not None]
    latencies = [latency for latency, problem in results if problem is None]
    return ServiceLoad(clients, len(results), len(latencies), latencies, wall, failures)


# -- command line ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="moderator checkpoint (default: the tiny model, built offline)")
    parser.add_argument("--export", help="serve this export in (c) instead of exporting --model to a temporary dir")
    parser.add_argument(
        "--width",
        type=int,
        default=0,
        help="with the default tiny model: widen its random text model to this hidden size (multiple of 128)",
    )
    parser.add_argument("--layers", type=int, default=4, help="text layers of the --width model")
    parser.add_argument("--user-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="verdict text length in every measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--batch", type=int, default=4, help="dialogues per decision batch in (b)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent service clients in (c)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client in (c)")
    parser.add_argument("--no-service", action="store_true", help="skip (c)")
    parser.add_argument(
        "--quick", action="store_true", help="a short run (smoke test): 1 repeat, fewer tokens and requests"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.max_new_tokens, args.batch = 1, min(args.max_new_tokens, 8), min(args.batch, 2)
        args.clients, args.requests = min(args.clients, 2), min(args.requests, 3)
    for name in ("user_turns", "max_new_tokens", "repeats", "batch", "clients", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from tiny_models.moderator import build_tiny_qwen2_5_vl

            model_dir = build_tiny_qwen2_5_vl(Path(tmp) / "tiny")
            if args.width:
                model_dir = build_wider_random(model_dir, Path(tmp) / "wider", args.width, args.layers)
        else:
            model_dir = Path(args.model)
        moderator = Moderator.from_pretrained(model_dir, verify=False)  # the checkpoint, not an export
        per_turn = bench_per_turn(moderator, args.user_turns, n, args.repeats)
        one_pass = bench_one_pass(moderator, args.batch, n, args.repeats)
        service = None
        if not args.no_service:
            del moderator  # the service loads its own (verified) copy
            export_dir = Path(args.export) if args.export else export_checkpoint(model_dir, Path(tmp) / "export")
            with serving(export_dir, n, max_batch=max(args.clients, 1)) as url:
                service = bench_service(url, args.clients, args.requests, args.user_turns)

    turns = per_turn.turns
    cost_ratio = per_turn.reuse_s / per_turn.recompute_s
    speed_up = one_pass.two_s / one_pass.one_s
    name = str(model_dir) if args.model else "tiny Qwen2.5-VL (random weights)"
    if args.width and not args.model:
        name = f"random Qwen2.5-VL, tiny vision tower and vocabulary, text width {args.width} x {args.layers} layers"
    print(f"\nmodel: {name}; {n} new tokens; best of {args.repeats}\n")
    rows = [
        (
            f"(a) reuse: moderate_turns, {turns} user turns",
            f"{per_turn.reuse_s / turns * 1e3:.1f} ms/turn",
            f"{per_turn.reuse_tokens} tokens prefilled",
        ),
        (
            f"(a) recompute: moderate() per prefix, {turns} prefixes",
            f"{per_turn.recompute_s / turns * 1e3:.1f} ms/turn",
            f"{per_turn.recompute_tokens} tokens prefilled",
        ),
        (
            f"(a) decision: moderate_turns(answer='decision'), {turns} user turns",
            f"{per_turn.decision_s / turns * 1e3:.1f} ms/turn",
            f"{per_turn.decision_tokens} tokens prefilled; {per_turn.flagged} of {turns} turns flagged",
        ),
        (
            "(a) cost ratio reuse/recompute (wall; target <= 0.35)",
            f"{cost_ratio:.2f}",
            f"tokens {per_turn.reuse_tokens / per_turn.recompute_tokens:.2f}",
        ),
        (
            "(a) cost ratio decision/recompute (wall; target <= 0.25)",
            f"{per_turn.decision_ratio:.2f}",
            f"tokens {per_turn.decision_tokens / per_turn.recompute_tokens:.2f}",
        ),
        (
            "(a) decision latency per turn, p50 / p95",
            f"{percentile(per_turn.decision_latencies_s, 50) * 1e3:.0f} / "
            f"{percentile(per_turn.decision_latencies_s, 95) * 1e3:.0f} ms",
            f"turn {turns}: {per_turn.decision_latencies_s[-1] * 1e3:.0f} ms",
        ),
        (
            "(a) full-answer latency per turn, p50 / p95",
            f"{percentile(per_turn.full_latencies_s, 50) * 1e3:.0f} / "
            f"{percentile(per_turn.full_latencies_s, 95) * 1e3:.0f} ms",
            f"turn {turns}: {per_turn.full_latencies_s[-1] * 1e3:.0f} ms",
        ),
        (
            f"(a) turn-{turns} latency decision/full (target <= 0.3)",
            f"{per_turn.last_turn_ratio:.2f}",
            "",
        ),
        (
            f"(b) one pass: moderate_batch, batch {one_pass.batch}",
            f"{one_pass.one_s / one_pass.batch * 1e3:.1f} ms/decision",
            f"{one_pass.one_prefills} prefill(s)/batch",
        ),
        (
            "(b) two passes: p_unsafe + generate",
            f"{one_pass.two_s / one_pass.batch * 1e3:.1f} ms/decision",
            f"{one_pass.two_prefills} prefill(s)/batch",
        ),
        (
            "(b) one-pass speed-up (target >= 1.8x)",
            f"{speed_up:.2f}x",
            f"verdict prefix generated: {'yes' if one_pass.prefixed else 'NO'}; max |dP| {one_pass.max_score_diff:.1e}",
        ),
    ]
    if service is not None:
        load = f"{service.clients} clients x {args.requests} requests"
        if service.latencies_s:
            p50, p95 = service.percentile(50), service.percentile(95)
            rows.append((f"(c) service latency p50 / p95 ({load})", f"{p50 * 1e3:.0f} / {p95 * 1e3:.0f} ms", ""))
        rows.append(
            ("(c) service throughput", f"{service.ok / service.wall_s:.2f} requests/s", f"{service.wall_s:.1f} s wall")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = ("measurement", "value", "detail")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    print()
    if service is not None:
        for problem in service.failures[:5]:
            print(f"failed request: {problem}")
        print(f"service requests lost = {service.lost} of {service.requests}")
    if not one_pass.prefixed:
        print("warning: the verdict prefix was not generated: the one pass fell back to the scoring pass")
    print(f"decision latency at turn {turns} = {per_turn.last_turn_ratio:.2f} × the full answer's")
    print(f"decision-only per-turn cost ratio at {turns} turns = {per_turn.decision_ratio:.2f}")
    print(f"one-pass speed-up = {speed_up:.2f}×")
    print(f"per-turn cost ratio at {turns} turns = {cost_ratio:.2f}")
    return 1 if service is not None and service.lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
