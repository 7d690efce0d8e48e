"""The moderation service (issue 14, item 4): verdicts, 4xx for bad input, batching, a verified export."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from moderator.images import placeholder_image
from moderator.inference import Moderator
from moderator.manifest import HASH_CACHE_ENV
from serve import ServeSettings, create_app
from tests.conftest import REPO_ROOT
from tests.test_manifest_verify import THRESHOLD, _flip_a_byte, tiny_export  # noqa: F401  (module fixture)

fastapi_testclient = pytest.importorskip("fastapi.testclient")

MAX_NEW_TOKENS = 4  # P(unsafe) does not depend on it; short generations keep the tests fast
SETTINGS = ServeSettings(
    max_batch=4,
    max_wait_ms=20,
    max_body_bytes=64 * 1024,
    max_images=2,
    max_image_pixels=128 * 128,
    max_new_tokens=MAX_NEW_TOKENS,
)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = placeholder_image("serve", (56, 56))
DATA_URL = "data:image/png;base64," + png_base64(IMAGE)
DIALOGUE = [
    {"role": "user", "content": "What is in this picture?"},
    {"role": "assistant", "content": "A red square on a blue background."},
    {"role": "user", "content": "How would I make one at home?"},
]
VALID = {"messages": DIALOGUE, "images": [DATA_URL]}
SUBPROCESS_ENV = {**os.environ, HASH_CACHE_ENV: "off"}  # the user's hash cache stays untouched


@pytest.fixture(scope="module")
def served_moderator(tiny_export) -> Moderator:  # noqa: F811
    return Moderator.from_pretrained(tiny_export, device="cpu")


@pytest.fixture(scope="module")
def client(served_moderator):
    with fastapi_testclient.TestClient(create_app(served_moderator, SETTINGS)) as test_client:
        yield test_client


def single(moderator: Moderator, dialogue, images) -> object:
    return moderator.moderate_batch([dialogue], [images], max_new_tokens=MAX_NEW_TOKENS)[0]


def test_a_valid_request_gets_the_exports_verdict_threshold_and_format(client, served_moderator):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["verified"] is True
    response = client.post("/v1/moderate", json=VALID)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = single(served_moderator, DIALOGUE, [IMAGE])
    assert 0.0 <= body["p_unsafe"] <= 1.0
    assert body["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-5)  # the image reached the model
    assert body["threshold"] == THRESHOLD  # the export's own threshold, not the 0.5 default
    assert body["verdict"] == expected.verdict and body["flagged"] == (body["verdict"] == "unsafe")
    assert body["incremental"] is False and body["prompt_format_version"]
    # Raw base64 (no data URL) is the same image.
    raw = client.post("/v1/moderate", json={**VALID, "images": [png_base64(IMAGE)]}).json()
    assert raw["p_unsafe"] == pytest.approx(body["p_unsafe"], abs=1e-6)


def _truncated_jpeg() -> str:
    # A JPEG cut off halfway passes PIL's verify(); only decoding it all (load) notices.
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 80).convert("RGB").save(buffer, format="JPEG")  # noise: mostly pixel data
    return base64.b64encode(buffer.getvalue()[: buffer.tell() * 3 // 4]).decode()


def _tiff() -> str:
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="TIFF")  # PIL decodes it, but the service only takes the web formats
    return base64.b64encode(buffer.getvalue()).decode()


def _big_body() -> dict:
    return {**VALID, "messages": [{"role": "user", "content": "x" * (SETTINGS.max_body_bytes + 1)}]}


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": ([DIALOGUE], 422, "JSON object"),
    "oversized body": (_big_body(), 413, "exceeds the limit"),
    "unknown field": ({**VALID, "dialog": []}, 422, "unknown field"),
    "no messages": ({"images": []}, 422, "'messages': missing"),
    "empty dialogue": ({"messages": []}, 422, "non-empty list"),
    "wrong role": ({"messages": [{"role": "system", "content": "hi"}]}, 422, "messages[0].role"),
    "last turn not user": ({"messages": DIALOGUE[:2]}, 422, "does not end with a user turn"),
    "content not a string": ({"messages": [{"role": "user", "content": 3}]}, 422, "messages[0].content"),
    "too many images": ({**VALID, "images": [DATA_URL] * 3}, 422, "the limit is 2"),
    "images not a list": ({**VALID, "images": DATA_URL}, 422, "'images': expected a list"),
    "not base64": ({**VALID, "images": ["@@not base64@@"]}, 422, "images[0]: not valid base64"),
    "not an image": ({**VALID, "images": [base64.b64encode(b"hello" * 20).decode()]}, 422, "not a PNG/JPEG"),
    "format not allowed": ({**VALID, "images": [_tiff()]}, 422, "not a PNG/JPEG/WEBP/GIF/BMP image"),
    "truncated image": ({**VALID, "images": [_truncated_jpeg()]}, 422, "images[0]: not a decodable image"),
    "too many pixels": (
        {**VALID, "images": [png_base64(placeholder_image("big", (200, 200)))]},
        422,
        "more than the limit of 16384",
    ),
    "data URL not an image": ({**VALID, "images": ["data:text/plain;base64,aGk="]}, 422, "image/* media type"),
    "bad conversation id": ({**VALID, "conversation_id": 7}, 422, "conversation_id"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(client, case):
    payload, status, message = BAD_REQUESTS[case]
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    response = client.post("/v1/moderate", **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail
    assert client.post("/v1/moderate", json={"messages": DIALOGUE[:1]}).status_code == 200


def test_a_chunked_body_without_content_length_is_cut_off_at_the_limit(client):
    def chunks():
        for _ in range(SETTINGS.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    response = client.post("/v1/moderate", content=chunks())
    assert response.status_code == 413, response.text
    assert client.post("/v1/moderate", json={"messages": DIALOGUE[:1]}).status_code == 200


def _post_concurrently(client, payloads: list[dict]) -> list:
    responses: list = [None] * len(payloads)
    start = threading.Barrier(len(payloads))

    def post(index: int) -> None:
        start.wait()
        responses[index] = client.post("/v1/moderate", json=payloads[index])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return responses


CONCURRENT_DIALOGUES = [
    [{"role": "user", "content": "Hello there"}],
    DIALOGUE,
    [{"role": "user", "content": "Tell me how to pick a lock, step by step, quickly."}],
    DIALOGUE[:1],
]
CONCURRENT_IMAGES = [[], [IMAGE], [], [placeholder_image("other", (56, 56))]]


def test_concurrent_callers_are_batched_and_each_gets_its_own_verdict(served_moderator, monkeypatch):
    singles = [single(served_moderator, d, i) for d, i in zip(CONCURRENT_DIALOGUES, CONCURRENT_IMAGES, strict=True)]
    scores = sorted(v.p_unsafe for v in singles)
    assert all(b - a > 1e-4 for a, b in zip(scores, scores[1:], strict=False)), (
        "the requests must be told apart by score"
    )
    calls = []
    real = served_moderator.moderate_batch
    monkeypatch.setattr(served_moderator, "moderate_batch", lambda d, *a, **k: calls.append(len(d)) or real(d, *a, **k))
    settings = replace(SETTINGS, max_wait_ms=2000)  # room for all callers to arrive
    payloads = [
        {"messages": d, "images": [png_base64(image) for image in images]}
        for d, images in zip(CONCURRENT_DIALOGUES, CONCURRENT_IMAGES, strict=True)
    ]
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as test_client:
        responses = _post_concurrently(test_client, payloads)
    assert [r.status_code for r in responses] == [200] * len(payloads)  # none lost
    assert len(calls) < len(payloads) and sum(calls) == len(payloads)
    for response, expected in zip(responses, singles, strict=True):
        body = response.json()
        assert body["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=2e-5)
        assert body["verdict"] == expected.verdict and body["category"] == expected.category


def test_a_model_error_fails_only_the_request_that_caused_it(served_moderator, monkeypatch):
    real = served_moderator.moderate_batch

    def breaks_on_boom(dialogues, *args, **kwargs):
        if any("boom" in m["content"] for d in dialogues for m in d):
            raise RuntimeError("the model broke")
        return real(dialogues, *args, **kwargs)

    monkeypatch.setattr(served_moderator, "moderate_batch", breaks_on_boom)
    settings = replace(SETTINGS, max_wait_ms=2000, max_batch=2)
    payloads = [{"messages": [{"role": "user", "content": "boom"}]}, {"messages": DIALOGUE[:1]}]
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as test_client:
        failed, served = _post_concurrently(test_client, payloads)
        assert failed.status_code == 500 and "moderation failed" in failed.json()["detail"]
        assert served.status_code == 200, served.text  # same batch, its own verdict
        assert test_client.get("/readyz").status_code == 200
        assert test_client.post("/v1/moderate", json={"messages": DIALOGUE[:1]}).status_code == 200


class RecordingSession:
    """Stands in for ``moderator.session(id)``: moderates what it was fed, records what that was."""

    def __init__(self, moderator: Moderator, fed: list):
        self.moderator, self.fed, self.turns, self.images = moderator, fed, [], []

    def add_turn(self, role: str, content: str, images=()):
        self.fed.append((role, content, len(images)))
        self.turns.append({"role": role, "content": content})
        self.images.extend(images)
        if role == "user":
            return single(self.moderator, self.turns, self.images)
        return None


def test_a_conversation_id_feeds_a_session_only_the_new_turns(client, served_moderator, monkeypatch):
    fed, keys = [], []

    def session(key):
        keys.append(key)
        return sessions.setdefault(key, RecordingSession(served_moderator, fed))

    sessions: dict = {}
    monkeypatch.setattr(served_moderator, "session", session, raising=False)
    first = client.post("/v1/moderate", json={**VALID, "messages": DIALOGUE[:1], "conversation_id": "c1"})
    assert first.status_code == 200 and first.json()["incremental"] is True
    assert fed == [("user", DIALOGUE[0]["content"], 1)]
    extended = client.post("/v1/moderate", json={**VALID, "conversation_id": "c1"}).json()
    assert fed[1:] == [("assistant", DIALOGUE[1]["content"], 0), ("user", DIALOGUE[2]["content"], 0)]
    assert extended["p_unsafe"] == pytest.approx(single(served_moderator, DIALOGUE, [IMAGE]).p_unsafe, abs=1e-5)
    # An edited conversation is never moderated on the stale prefix: a fresh session gets all of it.
    edited = [{"role": "user", "content": "Something else entirely"}, *DIALOGUE[1:]]
    client.post("/v1/moderate", json={**VALID, "messages": edited, "conversation_id": "c1"})
    assert len(set(keys)) == 2 and [f[1] for f in fed[3:]] == [m["content"] for m in edited]


class ResettableSession(RecordingSession):
    """A session that knows how many turns it holds and takes an edited conversation through ``reset``."""

    resets: list

    def __len__(self) -> int:
        return len(self.turns)

    def reset(self, dialogue, images=(), image_turns=None):
        self.resets.append([m["content"] for m in dialogue])
        self.turns, self.images = [dict(m) for m in dialogue], list(images)
        return single(self.moderator, self.turns, self.images)


def test_a_forgotten_session_is_fed_everything_and_an_edit_goes_through_reset(client, served_moderator, monkeypatch):
    fed, resets, sessions = [], [], {}

    def session(key):
        return sessions.setdefault(key, ResettableSession(served_moderator, fed))

    monkeypatch.setattr(ResettableSession, "resets", resets, raising=False)
    monkeypatch.setattr(served_moderator, "session", session, raising=False)
    client.post("/v1/moderate", json={**VALID, "messages": DIALOGUE[:1], "conversation_id": "c3"})
    sessions.clear()  # the moderator's store evicted the conversation (LRU)
    extended = client.post("/v1/moderate", json={**VALID, "conversation_id": "c3"}).json()
    assert [f[1] for f in fed] == [DIALOGUE[0]["content"]] + [m["content"] for m in DIALOGUE]  # all again
    assert extended["p_unsafe"] == pytest.approx(single(served_moderator, DIALOGUE, [IMAGE]).p_unsafe, abs=1e-5)
    edited = [{"role": "user", "content": "Something else entirely"}, *DIALOGUE[1:]]
    client.post("/v1/moderate", json={**VALID, "messages": edited, "conversation_id": "c3"})
    assert resets == [[m["content"] for m in edited]] and len(fed) == 4 and list(sessions) == ["c3"]


def test_the_moderators_own_sessions_give_the_full_conversations_verdict(client, served_moderator):
    if not hasattr(Moderator, "session"):
        pytest.skip("Moderator.session is not there yet: the service moderates whole conversations")
    for messages in (DIALOGUE[:1], DIALOGUE, [{"role": "user", "content": "Edited"}, *DIALOGUE[1:]]):
        body = client.post("/v1/moderate", json={**VALID, "messages": messages, "conversation_id": "c4"}).json()
        expected = single(served_moderator, messages, [IMAGE])
        assert body["incremental"] is True and body["parse_error"] == expected.parse_error
        assert body["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-4)
    assert served_moderator.sessions.max_new_tokens == MAX_NEW_TOKENS  # the service's --max-new-tokens


class WithoutSessions:
    """A moderator that offers no ``session`` (e.g. one from before sessions existed)."""

    def __init__(self, moderator: Moderator):
        self.moderate_batch, self.threshold = moderator.moderate_batch, moderator.threshold


def test_without_sessions_a_conversation_id_moderates_the_whole_conversation(served_moderator):
    with fastapi_testclient.TestClient(create_app(WithoutSessions(served_moderator), SETTINGS)) as test_client:
        body = test_client.post("/v1/moderate", json={**VALID, "conversation_id": "c2"}).json()
    assert body["incremental"] is False
    assert body["p_unsafe"] == pytest.approx(single(served_moderator, DIALOGUE, [IMAGE]).p_unsafe, abs=1e-5)


def test_a_tampered_export_refuses_to_start_with_one_line(tiny_export, tmp_path):  # noqa: F811
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    expected = _flip_a_byte(export)
    command = [sys.executable, "-m", "serve", str(export), "--port", "1", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_a_checkpoint_without_a_manifest_is_not_served_unless_verification_is_skipped(tiny_model_dir: Path):
    from moderator.cli import UsageError
    from serve import main

    with pytest.raises(UsageError, match="not an export"):
        main([str(tiny_model_dir), "--port", "1"])


def test_the_command_serves_a_verified_export_on_loopback_and_loses_no_request(tiny_export, tmp_path):  # noqa: F811
    import json
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import LOOPBACK, _free_port

    port = _free_port()
    url = f"http://{LOOPBACK}:{port}"
    command = [sys.executable, "-m", "serve", str(tiny_export), "--host", LOOPBACK, "--port", str(port)]
    command += [
        "--device",
        "cpu",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-batch",
        "4",
        "--log-level",
        "warning",
    ]
    with (tmp_path / "serve.log").open("w") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as ready:
                    assert json.load(ready)["verified"] is True
                    break
            except OSError:
                assert time.monotonic() < deadline, "the service did not become ready"
                time.sleep(0.3)

        def post(index: int) -> dict:
            payload = {"messages": [{"role": "user", "content": f"request {index}"}], "images": [DATA_URL]}
            request = urllib.request.Request(
                f"{url}/v1/moderate", json.dumps(payload).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(post, range(8)))
        assert len(answers) == 8 and all(a["threshold"] == THRESHOLD and 0 <= a["p_unsafe"] <= 1 for a in answers)
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_no_verify_serves_a_changed_export_with_a_warning(tiny_export, tmp_path, monkeypatch, caplog):  # noqa: F811
    import uvicorn

    import serve

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    _flip_a_byte(export)
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    with caplog.at_level("WARNING", logger="serve"):
        assert serve.main([str(export), "--no-verify", "--device", "cpu", "--port", "8123", "--threshold", "0.3"]) == 0
    assert "WITHOUT checking its manifest" in caplog.text
    ((app, kwargs),) = served
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123  # loopback unless asked otherwise
    with fastapi_testclient.TestClient(app) as test_client:
        ready = test_client.get("/readyz").json()
        assert ready["verified"] is False and ready["threshold"] == 0.3  # --threshold overrides the export's


def test_a_full_queue_answers_503_and_the_queued_requests_still_complete(served_moderator, monkeypatch):
    import time

    entered, release = threading.Event(), threading.Event()
    real = served_moderator.moderate_batch

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(served_moderator, "moderate_batch", held)
    app = create_app(served_moderator, replace(SETTINGS, max_batch=1, max_queue=1))
    payload = {"messages": DIALOGUE[:1]}
    with fastapi_testclient.TestClient(app) as test_client:
        answers: list = []
        running = threading.Thread(target=lambda: answers.append(test_client.post("/v1/moderate", json=payload)))
        running.start()
        assert entered.wait(timeout=30)  # the first request holds the model
        queued = threading.Thread(target=lambda: answers.append(test_client.post("/v1/moderate", json=payload)))
        queued.start()
        deadline = time.monotonic() + 30
        while app.state.worker.queue.qsize() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = test_client.post("/v1/moderate", json=payload)
        release.set()
        running.join(timeout=60)
        queued.join(timeout=60)
    assert refused.status_code == 503 and "server busy" in refused.json()["detail"]
    assert [a.status_code for a in answers] == [200, 200]


def test_a_model_returning_the_wrong_number_of_verdicts_fails_the_batch_not_the_worker(served_moderator, monkeypatch):
    real = served_moderator.moderate_batch
    broken = [True]

    def drops_a_verdict(*args, **kwargs):
        if broken.pop() if broken else False:
            return []  # a bug below the service: no verdict for the request
        return real(*args, **kwargs)

    monkeypatch.setattr(served_moderator, "moderate_batch", drops_a_verdict)
    with fastapi_testclient.TestClient(create_app(served_moderator, SETTINGS)) as test_client:
        answers: list = []
        caller = threading.Thread(target=lambda: answers.append(test_client.post("/v1/moderate", json=VALID)))
        caller.start()
        caller.join(timeout=20)
        assert answers and answers[0].status_code == 500  # answered, not left waiting
        assert test_client.post("/v1/moderate", json=VALID).status_code == 200  # the worker still runs


def test_the_command_serves_only_the_export_its_manifest_digest_pins(tiny_export, monkeypatch):  # noqa: F811
    import uvicorn

    from moderator.cli import InputError
    from moderator.manifest import manifest_sha256
    from serve import main

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    other = "0" * 64
    with pytest.raises(InputError) as refused:
        main([str(tiny_export), "--device", "cpu", "--port", "1", "--expect-manifest-sha256", other])
    assert "\n" not in str(refused.value) and not served  # never listens
    pinned = manifest_sha256(tiny_export)
    assert main([str(tiny_export), "--device", "cpu", "--port", "1", "--expect-manifest-sha256", pinned]) == 0
    assert len(served) == 1


def test_the_decision_alone_or_with_the_intent_as_the_request_asks(served_moderator):
    from tests.test_decision import even_lean, format_followed

    lean = even_lean(served_moderator) + 6.0  # the scripted model answers unsafe: a category and an intent to show
    settings = replace(SETTINGS, max_new_tokens=16)  # room for the whole answer
    post = {
        "full": VALID,
        "decision": {**VALID, "intent": False},
        "session": {**VALID, "conversation_id": "decision-1"},
        "session with intent": {**VALID, "conversation_id": "decision-2", "intent": True},
    }
    with fastapi_testclient.TestClient(create_app(served_moderator, settings)) as test_client:
        with format_followed(served_moderator, lean):
            bodies = {name: test_client.post("/v1/moderate", json=body).json() for name, body in post.items()}
        refused = test_client.post("/v1/moderate", json={**VALID, "intent": "yes"})
    served_moderator.sessions.max_new_tokens = MAX_NEW_TOKENS
    full = bodies["full"]
    assert (full["answer"], full["intent_generated"], full["intent"], full["flagged"]) == (
        "full",
        True,
        "scam people",
        True,
    )
    expected_answer = {"decision": "decision", "session": "decision", "session with intent": "decision+intent"}
    for name, answer in expected_answer.items():
        body = bodies[name]
        assert body["answer"] == answer, name
        assert (body["verdict"], body["category"], body["policy"]) == (
            full["verdict"],
            full["category"],
            full["policy"],
        )
        assert body["p_unsafe"] == pytest.approx(full["p_unsafe"], abs=1e-5)
        assert body["intent_generated"] is (answer == "decision+intent")
        assert body["intent"] == (full["intent"] if answer == "decision+intent" else None)
    assert bodies["session"]["incremental"] is True and bodies["decision"]["incremental"] is False
    assert refused.status_code == 422 and "field 'intent'" in refused.json()["detail"]
