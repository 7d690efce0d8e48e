"""A moderation service: ``python -m serve EXPORT_DIR --host 127.0.0.1 --port 8000``.

Endpoints:

- ``POST /v1/moderate``: ``{"messages": [{"role": "user"|"assistant", "content": str}, ...],
  "images": [data URL or raw base64, ...], "conversation_id": optional str}`` returns
  ``{"verdict", "category", "intent", "p_unsafe", "threshold", "policy", "flagged", "parse_error",
  "prompt_format_version", "incremental"}``. ``messages`` follows the SafeMT schema (roles alternate from
  ``user`` and the last turn is ``user``); the images belong to the first user turn, as in SafeMT.
- ``GET /healthz``: the process is up. ``GET /readyz``: the verified model is loaded and the batch worker runs.

The export is verified against its manifest before the port is bound (a tampered export exits with one
line). Requests from concurrent callers are batched: one worker collects up to ``--max-batch`` requests
or waits ``--max-wait-ms``, then runs one ``moderate_batch`` in a single model thread (never two forward
passes at once). Bad input gets a 4xx naming the field; a model error fails only the requests it hit.

With a ``conversation_id``, and a moderator that offers ``session(conversation_id)``, the client still
sends the whole conversation; only the turns the session has not seen are fed to it (``"incremental":
true``), with one verdict per request however many turns are new; an edited conversation goes through
``session.reset``, and a session its store forgot is fed everything again. Session requests run one at
a time (not batched). Without sessions the whole conversation is moderated (``"incremental": false``).

Memory and time are bounded (``ServeSettings``; each limit is a command-line option, or a key of a
``--config serve.yaml``, ``serve.app.ServeArguments``):

- images are downscaled to the moderator's trained pixel bounds as they are decoded (to the size its
  processor would resize them to), so nothing keeps a full-size image: not a queued request, not a session;
- decoded pixels in flight (images being decoded, queued or moderated) stay within
  ``--max-pixels-in-flight``; a request that cannot get its pixels before its deadline gets 503;
- sessions are bounded in bytes (``--max-session-bytes``: turns, images, and KV caches held in host
  memory) as well as in count (``--max-sessions``);
- a request's prompt (text and image tokens) is at most ``--max-request-tokens`` (413 naming it),
  counted before the request is queued;
- a request not answered within ``--request-timeout-s`` gets 504 (the caller is never held longer).

Status codes: 400 malformed JSON (also nested too deeply), 413 body or tokens over the limit, 422 a bad
field or image (format, size, aspect ratio above 200), 503 queue full or pixel budget taken, 504 past
the deadline, 500 only when the model itself fails on a request; every error body is one line.

The package: ``serve.limits`` (``ServeSettings``, the image fit, the pixel budget), ``serve.request``
(reading, checking and decoding one request), ``serve.worker`` (batching, sessions, the model thread),
``serve.app`` (the FastAPI app and the command line); ``python -m serve`` runs ``serve.app.main``.
"""

from serve.app import create_app, main
from serve.limits import ServeSettings

__all__ = ["ServeSettings", "create_app", "main"]
