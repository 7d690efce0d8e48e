"""The service's limits (issue 21, items 1, 2, 11, 12, 13): bounded memory, a token limit, a deadline,
one-line 4xx for hostile bodies and images, and batching options that cannot hang the server.

Bugs caught: decoded full-size images kept in sessions and in queued requests (RSS grew by GBs and stayed),
one long request or a long new conversation holding every other client, a deep JSON body or an extreme
aspect ratio answered with a 500 (and a batch rerun request by request), ``--max-wait-ms inf`` accepted.
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from PIL import Image, ImageDraw

from moderator.images import placeholder_image, processor_image_bounds
from moderator.inference import Moderator
from serve import ServeSettings, create_app
from tests.conftest import LOOPBACK, REPO_ROOT, _free_port
from tests.test_manifest_verify import tiny_export  # noqa: F401  (module fixture)
from tests.test_serve import SUBPROCESS_ENV, _post_concurrently, png_base64

fastapi_testclient = pytest.importorskip("fastapi.testclient")

MAX_NEW_TOKENS = 4
SETTINGS = ServeSettings(max_batch=4, max_wait_ms=20, max_new_tokens=MAX_NEW_TOKENS)
HELLO = [{"role": "user", "content": "Hello there"}]
BIG = (4096, 4096)  # the largest image the service takes by default (--max-image-pixels)
# Under the flood below (8 conversations and a burst of 16 stateless requests, four 4096x4096 PNGs each)
# the server's RSS may grow by at most this much over its RSS when ready, with the default limits: the
# decode budget (--max-pixels-in-flight, 32 Mi pixels at up to 8 bytes each while decoding: 256 MiB) plus
# 256 MiB of working memory. Measured: about 60 MiB. Before the fix it passed 3 GiB (and was killed):
# sessions kept full-size images, and the burst decoded them all at once.
FLOOD_RSS_CEILING = 512 * 1024 * 1024
SMALL_REQUEST_SECONDS = 15.0  # a small request's latency while a large one (within the limits) runs


def big_png(key: int, size: tuple[int, int] = BIG) -> str:
    """A palette PNG of ``size``: a few KB on the wire, 64 MiB once decoded to RGB (distinct per ``key``)."""
    image = Image.new("P", size, 0)
    image.putpalette([key % 251, 40, 90, 200, (7 * key) % 251, 30] + [0] * 762)
    ImageDraw.Draw(image).rectangle([size[0] // 5, size[1] // 7, size[0] // 2, size[1] // 3], fill=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", bits=1)  # two colours: one bit per pixel on the wire
    return base64.b64encode(buffer.getvalue()).decode()


def expected_size(moderator: Moderator, width: int, height: int) -> tuple[int, int]:
    """The size the moderator's processor resizes a ``width`` x ``height`` image to (Qwen2-VL's rule)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = moderator.processor.image_processor
    bounds = processor_image_bounds(moderator.processor)
    factor = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(height, width, factor, bounds.min_pixels, bounds.max_pixels)
    return w, h


def single(moderator: Moderator, dialogue, images) -> object:
    """The moderator's verdict, the images on the first user turn (as the service places them)."""
    turns = [[0] * len(images)]
    return moderator.moderate_batch([dialogue], [images], turns, max_new_tokens=MAX_NEW_TOKENS)[0]


@pytest.fixture(scope="module")
def served_moderator(tiny_export) -> Moderator:  # noqa: F811
    return Moderator.from_pretrained(tiny_export, device="cpu")


def _spy_batches(moderator: Moderator, monkeypatch) -> list[list[tuple[int, int]]]:
    """Per ``moderate_batch`` call, the sizes of the images the model was given."""
    calls: list[list[tuple[int, int]]] = []
    real = moderator.moderate_batch

    def spy(dialogues, images, *args, **kwargs):
        calls.append([*(image.size for row in images for image in row), (-1, len(dialogues))])  # size last
        return real(dialogues, images, *args, **kwargs)

    monkeypatch.setattr(moderator, "moderate_batch", spy)
    return calls


# -- 1: images are kept at the trained bounds; sessions and decoding have memory budgets ----------------
def test_a_large_image_is_downscaled_to_the_trained_bounds_before_it_is_stored(served_moderator, monkeypatch):
    calls = _spy_batches(served_moderator, monkeypatch)
    images = [big_png(1), big_png(2, (3000, 1000))]
    expected = [expected_size(served_moderator, *BIG), expected_size(served_moderator, 3000, 1000)]
    bounds = processor_image_bounds(served_moderator.processor)
    with fastapi_testclient.TestClient(create_app(served_moderator, SETTINGS)) as client:
        stateless = client.post("/v1/moderate", json={"messages": HELLO, "images": images})
        assert stateless.status_code == 200, stateless.text
        in_session = client.post("/v1/moderate", json={"messages": HELLO, "images": images, "conversation_id": "big"})
        assert in_session.status_code == 200, in_session.text
    assert [size for size in calls[0] if size[0] >= 0] == expected  # what the model was given
    stored = served_moderator.sessions.get("big").images  # what the session keeps
    assert [image.size for image in stored] == expected
    assert all(w * h <= bounds.max_pixels for w, h in expected)
    # The verdict is the moderator's on the downscaled images (the processor resizes them no further).
    assert stateless.json()["p_unsafe"] == pytest.approx(single(served_moderator, HELLO, stored).p_unsafe, abs=1e-5)


def test_sessions_are_bounded_in_bytes_not_only_in_count(served_moderator):
    from moderator.session import SessionStore

    image = placeholder_image("session-bytes", (112, 112))
    probe = SessionStore(served_moderator, max_new_tokens=MAX_NEW_TOKENS)
    probe.get("one").add_turn("user", "Hello there", [image])
    one_session = probe.held_bytes
    assert one_session >= 112 * 112 * 3  # the image's pixels count
    store = SessionStore(served_moderator, max_sessions=100, max_bytes=int(2.5 * one_session), max_new_tokens=4)
    for index in range(6):
        store.get(f"c{index}").add_turn("user", "Hello there", [image])
        assert store.held_bytes <= store.max_bytes
    # Caches go first (cheap to recompute), then the oldest sessions; the latest keeps its cache.
    assert len(store) < 6 and "c0" not in store and "c5" in store
    kept = [store.get(f"c{index}") for index in range(5) if f"c{index}" in store]
    assert store.get("c5").prefix_cache.cached_tokens > 0
    assert all(session.prefix_cache.cached_tokens == 0 for session in kept)
    # The service hands its budget to the moderator's store.
    settings = replace(SETTINGS, max_session_bytes=12345678, max_sessions=77)
    create_app(served_moderator, settings)
    assert served_moderator.sessions.max_bytes == 12345678 and served_moderator.sessions.max_sessions == 77


def test_decoded_pixels_in_flight_stay_within_the_budget_and_the_excess_waits_or_gets_503(
    served_moderator, monkeypatch
):
    from serve import request as serve_request

    budget = 2 * BIG[0] * BIG[1]  # a request decodes one image at a time: two requests decode at once
    settings = replace(SETTINGS, max_pixels_in_flight=budget, request_timeout_s=30)
    payloads = [{"messages": HELLO, "images": [big_png(2 * i + j) for j in range(2)]} for i in range(3)]
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as client:
        responses = _post_concurrently(client, payloads)
        assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
        pixels = client.app.state.pixels
        assert 0 < pixels.peak <= budget and pixels.in_use == 0
    # A request that cannot get its pixels before its deadline gets a 503 naming the limit.
    entered, release = threading.Event(), threading.Event()
    real = serve_request.decode_image

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_request, "decode_image", held)
    settings = replace(settings, max_pixels_in_flight=BIG[0] * BIG[1], request_timeout_s=1.0)
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as client:
        answers: list = []
        first = threading.Thread(
            target=lambda: answers.append(client.post("/v1/moderate", json={"messages": HELLO, "images": [big_png(9)]}))
        )
        first.start()
        assert entered.wait(timeout=30)  # the first request holds the whole budget while it decodes
        refused = client.post("/v1/moderate", json={"messages": HELLO, "images": [big_png(10)]})
        text_only = client.post("/v1/moderate", json={"messages": HELLO})  # needs no pixels: not held up
        release.set()
        first.join(timeout=60)
        assert client.app.state.pixels.in_use == 0  # all given back
    assert refused.status_code == 503, refused.text
    assert "--max-pixels-in-flight" in refused.json()["detail"] and "\n" not in refused.json()["detail"]
    assert text_only.status_code == 200
    assert answers[0].status_code == 504  # held past its own deadline while the others were answered


# -- 2: a token limit, a deadline, and a long new conversation moderated once ----------------------------
def test_a_request_over_the_token_limit_gets_413_naming_the_limit(served_moderator, monkeypatch):
    calls = _spy_batches(served_moderator, monkeypatch)
    settings = replace(SETTINGS, max_request_tokens=600)
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as client:
        assert client.post("/v1/moderate", json={"messages": HELLO}).status_code == 200
        for content in ("word " * 400, "x" * 200_000):  # over the limit; far over it (refused before tokenizing)
            started = time.monotonic()
            response = client.post("/v1/moderate", json={"messages": [{"role": "user", "content": content}]})
            assert response.status_code == 413, response.text
            detail = response.json()["detail"]
            assert "600" in detail and "--max-request-tokens" in detail and "\n" not in detail
            assert time.monotonic() - started < 5
    assert len(calls) == 1  # the refused requests never reached the model
    # Image tokens count too (16 per image at the bound here): four images tip a request near the limit over.
    from serve.limits import ImageFit
    from serve.request import TokenCounter

    text_tokens = TokenCounter(served_moderator, ImageFit.for_moderator(served_moderator)).count(HELLO, [])
    image = png_base64(placeholder_image("tokens", (112, 112)))
    settings = replace(SETTINGS, max_request_tokens=text_tokens + 30)
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as client:
        assert client.post("/v1/moderate", json={"messages": HELLO, "images": [image]}).status_code == 200
        with_images = client.post("/v1/moderate", json={"messages": HELLO, "images": [image] * 4})
    # The count is the prompt the model would have run: the processor's own input length.
    text = served_moderator.prompt_texts([HELLO], [[0] * 4])[0]
    pixels = [placeholder_image("tokens", (112, 112))] * 4
    model_tokens = served_moderator.processor(text=[text], images=pixels, return_tensors="pt")["input_ids"].shape[1]
    assert with_images.status_code == 413 and f"request of {model_tokens} tokens" in with_images.json()["detail"]


def test_a_request_past_its_deadline_gets_504_naming_it_and_the_server_keeps_serving(served_moderator, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = served_moderator.moderate_batch

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(served_moderator, "moderate_batch", held)
    settings = replace(SETTINGS, request_timeout_s=1.0)
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as client:
        started = time.monotonic()
        late = client.post("/v1/moderate", json={"messages": HELLO})
        elapsed = time.monotonic() - started
        assert entered.is_set()
        release.set()
        monkeypatch.setattr(served_moderator, "moderate_batch", real)
        after = client.post("/v1/moderate", json={"messages": HELLO})
    assert late.status_code == 504, late.text
    detail = late.json()["detail"]
    assert "--request-timeout-s" in detail and "1" in detail and "\n" not in detail
    assert elapsed < 5 and after.status_code == 200


def test_a_long_new_conversation_gets_one_verdict_not_one_per_turn(served_moderator, monkeypatch):
    dialogue = []
    for index in range(20):
        dialogue += [{"role": "user", "content": f"turn {index}"}, {"role": "assistant", "content": "ok"}]
    dialogue.append({"role": "user", "content": "and the last one"})
    calls = []
    real = served_moderator.moderate_extended
    monkeypatch.setattr(served_moderator, "moderate_extended", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fastapi_testclient.TestClient(create_app(served_moderator, SETTINGS)) as client:
        body = client.post("/v1/moderate", json={"messages": dialogue, "conversation_id": "long-new"}).json()
        assert len(calls) == 1  # 21 before: a verdict after every user turn
        extended = [*dialogue, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
        again = client.post("/v1/moderate", json={"messages": extended, "conversation_id": "long-new"}).json()
        assert len(calls) == 2 and again["incremental"] is True
    assert body["incremental"] is True
    assert body["p_unsafe"] == pytest.approx(single(served_moderator, dialogue, []).p_unsafe, abs=1e-4)
    assert again["p_unsafe"] == pytest.approx(single(served_moderator, extended, []).p_unsafe, abs=1e-4)


# -- 11, 12: hostile bodies and images get one-line 4xx before the model --------------------------------
def test_deeply_nested_json_gets_400_without_a_traceback(served_moderator, caplog):
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    app = create_app(served_moderator, SETTINGS)
    with (
        caplog.at_level("ERROR"),
        fastapi_testclient.TestClient(app, raise_server_exceptions=False) as client,
    ):
        response = client.post("/v1/moderate", content=body)
        assert client.post("/v1/moderate", json={"messages": HELLO}).status_code == 200
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "nested" in detail and "\n" not in detail
    assert not [record for record in caplog.records if record.exc_info], caplog.text


def _thin_png(size: tuple[int, int]) -> str:
    return png_base64(Image.new("RGB", size, (200, 30, 30)))


def test_an_extreme_aspect_ratio_gets_422_before_batching(served_moderator, monkeypatch):
    calls = _spy_batches(served_moderator, monkeypatch)
    settings = replace(SETTINGS, max_wait_ms=1000, max_batch=2)
    with fastapi_testclient.TestClient(create_app(served_moderator, settings), raise_server_exceptions=False) as client:
        for size in ((4000, 2), (2, 4000)):
            response = client.post("/v1/moderate", json={"messages": HELLO, "images": [_thin_png(size)]})
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert "images[0]" in detail and "aspect ratio" in detail and "200" in detail and "\n" not in detail
        assert calls == []  # refused before it reached a batch
        wide = {"messages": HELLO, "images": [_thin_png((4000, 2))]}
        bad, good = _post_concurrently(client, [wide, {"messages": HELLO}])
    assert bad.status_code == 422 and good.status_code == 200
    assert calls == [[(-1, 1)]]  # one batch, of the good request only: nothing rerun one by one


# -- 13: batching options that would never answer are refused -------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
def test_a_batch_wait_that_is_not_a_finite_bounded_number_is_refused(tiny_export, monkeypatch, value):  # noqa: F811
    import uvicorn

    from moderator.cli import UsageError
    from serve import main

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))  # never listen here
    with pytest.raises(UsageError, match="--max-wait-ms") as refused:
        main([str(tiny_export), "--device", "cpu", "--port", "1", "--max-wait-ms", value])
    assert "\n" not in str(refused.value) and not served
    for field in ("request_timeout_s", "max_wait_ms"):
        with pytest.raises(UsageError, match=field.replace("_", "-")):
            ServeSettings(**{field: math.inf})


# -- 1, 2, 13 end to end: the command on loopback, flooded ----------------------------------------------
class Server:
    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url


@pytest.fixture(scope="module")
def loopback_server(tiny_export, tmp_path_factory):  # noqa: F811
    """``python -m serve`` with its default limits on a loopback port (fresh if a test killed it)."""
    servers: list[Server] = []
    log_dir = tmp_path_factory.mktemp("serve-limits")

    def start() -> Server:
        if servers and servers[-1].process.poll() is None:
            return servers[-1]
        port = _free_port()
        command = [sys.executable, "-m", "serve", str(tiny_export), "--host", LOOPBACK, "--port", str(port)]
        command += ["--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS), "--log-level", "warning"]
        with (log_dir / f"serve{len(servers)}.log").open("w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
        server = Server(process, f"http://{LOOPBACK}:{port}")
        servers.append(server)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (log_dir / f"serve{len(servers) - 1}.log").read_text()
            try:
                with urllib.request.urlopen(f"{server.url}/readyz", timeout=2):
                    return server
            except OSError:
                assert time.monotonic() < deadline, "the service did not become ready"
                time.sleep(0.3)

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)


def post(url: str, payload: dict, timeout: float = 120) -> tuple[int, dict, float]:
    """Status, JSON body and seconds taken of a POST to ``/v1/moderate``."""
    request = urllib.request.Request(
        f"{url}/v1/moderate", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), time.monotonic() - started


class RssWatch:
    """The peak RSS of a process, sampled; kills it ``headroom`` bytes above its RSS now (keeps CI alive)."""

    def __init__(self, process: subprocess.Popen, headroom: int):
        import psutil

        self.process = process
        self.psutil_process = psutil.Process(process.pid)
        self.ready = self.peak = self.rss()
        self.kill_above = self.ready + headroom
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self.psutil_process.memory_info().rss

    def _watch(self) -> None:
        while not self._stop.wait(0.02) and self.process.poll() is None:
            rss = self.rss()
            self.peak = max(self.peak, rss)
            if rss > self.kill_above:
                self.killed = True
                self.process.kill()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.mark.slow
def test_a_flood_of_large_images_keeps_the_servers_memory_under_the_ceiling(loopback_server):
    server = loopback_server()
    assert post(server.url, {"messages": HELLO})[0] == 200  # warm: the first forward pass allocates
    watch = RssWatch(server.process, headroom=3 * FLOOD_RSS_CEILING)
    try:
        conversations = [
            {"messages": HELLO, "images": [big_png(100 + 4 * i + j) for j in range(4)], "conversation_id": f"flood-{i}"}
            for i in range(8)
        ]
        burst = [{"messages": HELLO, "images": [big_png(200 + 4 * i + j) for j in range(4)]} for i in range(16)]
        sent = sum(len(json.dumps(p)) for p in conversations + burst)
        assert sent < 2_000_000  # small on the wire: the size is in the pixels

        def status(payload: dict) -> int:
            try:
                return post(server.url, payload)[0]
            except OSError:  # the watch killed the server
                return 0

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(status, conversations))
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses += list(pool.map(status, burst))
        time.sleep(0.5)
        kept = watch.rss()
    finally:
        watch.stop()
    growth, kept_growth = watch.peak - watch.ready, kept - watch.ready
    mib = 1024 * 1024
    assert growth <= FLOOD_RSS_CEILING, f"RSS grew by {growth // mib} MiB during the flood (killed: {watch.killed})"
    assert kept_growth <= FLOOD_RSS_CEILING // 2, f"RSS stayed {kept_growth // mib} MiB above ready"
    assert set(statuses) <= {200, 503, 504} and statuses.count(200) >= len(statuses) // 2, statuses


@pytest.mark.slow
def test_a_small_request_stays_fast_while_a_large_one_runs_and_sigterm_stops_the_server(loopback_server):
    server = loopback_server()
    small = {"messages": HELLO}
    assert post(server.url, small)[0] == 200
    huge = {"messages": [{"role": "user", "content": "x " * 100_000}]}  # the 200,000-character turn
    large = {"messages": [{"role": "user", "content": "word " * 1500}]}  # within the default limits
    results: dict[str, tuple[int, dict, float]] = {}
    threads = [
        threading.Thread(target=lambda name=name, p=p: results.__setitem__(name, post(server.url, p, timeout=60)))
        for name, p in (("huge", huge), ("large", large))
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    latencies = [post(server.url, small, timeout=SMALL_REQUEST_SECONDS + 5)[2] for _ in range(3)]
    for thread in threads:
        thread.join(timeout=90)
    status, body, seconds = results["huge"]
    assert status == 413 and "--max-request-tokens" in body["detail"] and seconds < 10, (status, body, seconds)
    assert results["large"][0] == 200
    assert max(latencies) < SMALL_REQUEST_SECONDS, latencies
    # SIGTERM with a request in flight: it is answered or cut off, and the server exits (no hang).
    in_flight = threading.Thread(target=lambda: results.__setitem__("last", post(server.url, large, timeout=60)))
    in_flight.start()
    time.sleep(0.3)
    server.process.terminate()
    server.process.wait(timeout=60)
    in_flight.join(timeout=60)


def test_a_non_finite_score_is_sent_as_null_and_flagged():
    # JSON has no NaN: `json.dumps(float("nan"))` writes `NaN`, which strict clients refuse to parse.
    import json
    from types import SimpleNamespace

    from serve.worker import verdict_response

    verdict = SimpleNamespace(
        verdict="unsafe", category="unknown", intent="", p_unsafe=float("nan"), policy="", parse_error=False
    )
    body = verdict_response(verdict, 0.5, incremental=False)
    assert body["p_unsafe"] is None and body["flagged"] is True
    json.loads(json.dumps(body, allow_nan=False))
