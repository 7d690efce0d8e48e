"""The HTTP app (``create_app``) and the command line of ``python -m serve`` (``main``)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # the serving extra; without it the command says what to install instead of a traceback
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
except ImportError:  # pragma: no cover - depends on the install
    FastAPI = None  # type: ignore[assignment,misc]

from moderator.cli import InputError, MissingInputError, UsageError, parse_config
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.loading import DTYPE_NAMES, ModelLoadError
from moderator.manifest import ManifestError, looks_like_export
from serve.limits import DECODE_BYTES_PER_PIXEL, BadRequest, ImageFit, PixelBudget, ServeSettings
from serve.request import (
    ModerationRequest,
    TokenCounter,
    check_request_tokens,
    decode_images,
    parse_request,
    read_body,
)
from serve.worker import ModelFailure, ModerationWorker

logger = logging.getLogger("serve")

SERVE_EXTRA_MISSING = "serving needs fastapi and uvicorn: pip install 'safemt-moderator[serve]'"

# The command's description (the first line of the package's docstring, serve/__init__.py).
DESCRIPTION = "A moderation service: ``python -m serve EXPORT_DIR --host 127.0.0.1 --port 8000``."


# -- the app --------------------------------------------------------------------------------------------
def create_app(moderator: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving ``moderator`` (already loaded and verified)."""
    if FastAPI is None:
        raise ImportError(SERVE_EXTRA_MISSING)
    settings = settings or ServeSettings()
    store = getattr(moderator, "sessions", None)
    if hasattr(store, "max_new_tokens"):  # incremental verdicts are generated as long as whole-conversation ones
        store.max_new_tokens = settings.max_new_tokens
    if hasattr(store, "max_bytes"):
        store.max_bytes, store.max_sessions = settings.max_session_bytes, settings.max_sessions
    worker = ModerationWorker(moderator, settings)
    fit = ImageFit.for_moderator(moderator)
    counter = TokenCounter(moderator, fit)
    pixels = PixelBudget(settings.max_pixels_in_flight)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        pixels.start()
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="SafeMT moderator", lifespan=lifespan)
    app.state.worker, app.state.pixels = worker, pixels

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(ModelFailure)
    async def model_failure(_request: Request, exc: ModelFailure) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = worker.running
        body = {
            "status": "ready" if ready else "not ready",
            "verified": settings.verified,
            "threshold": moderator.threshold,
            "prompt_format_version": PROMPT_FORMAT_VERSION,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    def parse(body: bytes) -> ModerationRequest:
        parsed = parse_request(body, settings, fit)
        check_request_tokens(parsed, counter, settings.max_request_tokens)  # before any pixel is decoded
        return parsed

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> dict[str, Any]:
        started = time.monotonic()
        body = await read_body(request, settings.max_body_bytes)
        parsed = await run_in_threadpool(parse, body)
        del body
        held = 0
        try:
            if parsed.encoded:
                remaining = settings.request_timeout_s - (time.monotonic() - started)
                held = await pixels.take(parsed.decode_pixels, remaining)
                kept = sum(image.kept_pixels for image in parsed.encoded)
                await run_in_threadpool(decode_images, parsed)
                # Only the kept copies stay until the answer: the rest of the budget goes back now.
                await pixels.give_back(held - min(held, kept))
                held = min(held, kept)
            return await worker.submit(parsed, settings.request_timeout_s - (time.monotonic() - started))
        finally:
            await pixels.give_back(held)

    return app


# -- command line ---------------------------------------------------------------------------------------
LIMITS = ServeSettings()  # the defaults of the limit flags
LIMIT_FIELDS = tuple(f.name for f in fields(ServeSettings) if f.name != "verified")


@dataclass
class ServeArguments:
    """``python -m serve``'s flags (``--max-batch`` or ``--max_batch``; any of them in ``--config serve.yaml``)."""

    export_dir: str = field(metadata={"help": "a directory written by `python -m export` (verified before serving)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind; the default is loopback only"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    device: str | None = field(default=None, metadata={"help": "torch device; unset: CUDA when visible, else CPU"})
    dtype: str | None = field(
        default=None, metadata={"choices": [*DTYPE_NAMES, "auto"], "help": "weights dtype; unset: the export's"}
    )
    threshold: float | None = field(default=None, metadata={"help": "override the export's decision threshold"})
    verify: bool = field(
        default=True,
        metadata={
            "help": "check the export against its manifest before serving (--no-verify skips it: development only)"
        },
    )
    expect_manifest_sha256: str | None = field(
        default=None,
        metadata={
            "metavar": "HEX",
            "help": "serve this export and no other: the sha256 of its manifest.json, as `python -m export` printed it",
        },
    )
    max_batch: int = field(default=LIMITS.max_batch, metadata={"help": "requests per model batch"})
    max_wait_ms: float = field(
        default=LIMITS.max_wait_ms,
        metadata={
            "help": "how long a batch waits to fill up (finite, below --request-timeout-s; default: %(default)s)"
        },
    )
    max_body_bytes: int = field(default=LIMITS.max_body_bytes, metadata={"help": "larger request bodies get 413"})
    max_images: int = field(default=LIMITS.max_images, metadata={"help": "images per request"})
    max_image_pixels: int = field(
        default=LIMITS.max_image_pixels, metadata={"help": "width x height per image, before decoding"}
    )
    max_pixels_in_flight: int = field(
        default=LIMITS.max_pixels_in_flight,
        metadata={
            "help": f"decoded pixels of all requests in flight, at most {DECODE_BYTES_PER_PIXEL} bytes each; past "
            "it requests wait, and get 503 at their deadline (default: %(default)s, two 4096x4096 images)"
        },
    )
    max_request_tokens: int = field(
        default=LIMITS.max_request_tokens,
        metadata={"help": "prompt tokens per request, text and images; larger requests get 413 (default: %(default)s)"},
    )
    request_timeout_s: float = field(
        default=LIMITS.request_timeout_s,
        metadata={"help": "a request not answered within this gets 504 (default: %(default)s)"},
    )
    max_queue: int = field(default=LIMITS.max_queue, metadata={"help": "requests waiting beyond this get 503"})
    max_new_tokens: int = field(
        default=LIMITS.max_new_tokens, metadata={"help": "verdict text length (category, intent)"}
    )
    max_sessions: int = field(
        default=LIMITS.max_sessions, metadata={"help": "conversations remembered (LRU; default: %(default)s)"}
    )
    max_session_bytes: int = field(
        default=LIMITS.max_session_bytes,
        metadata={
            "help": "host memory all sessions may hold: turns, images, CPU KV caches (LRU; default: %(default)s, 1 GiB)"
        },
    )
    log_level: str = field(
        default="info",
        metadata={"choices": ["critical", "error", "warning", "info", "debug"], "help": "uvicorn's log level"},
    )

    def __post_init__(self) -> None:
        self.settings()  # a limit out of range is a command-line error, before anything is loaded

    def settings(self) -> ServeSettings:
        limits = {name: getattr(self, name) for name in LIMIT_FIELDS}
        return ServeSettings(**limits, verified=self.verify)


def parse_args(argv: Sequence[str] | None = None) -> ServeArguments:
    """The command line (``moderator.cli.parse_config``): a problem raises a one-line ``UsageError``."""
    (args,) = parse_config(
        (ServeArguments,), argv, prog="python -m serve", description=DESCRIPTION, positional=("export_dir",)
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = args.settings()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    export_dir = Path(args.export_dir)
    if not export_dir.is_dir():
        raise MissingInputError(f"{export_dir}: export directory not found (write one with `python -m export`)")
    if not args.verify:
        logger.warning("--no-verify: serving %s WITHOUT checking its manifest (development only)", export_dir)
    elif not looks_like_export(export_dir):
        raise UsageError(
            f"{export_dir}: not an export (no manifest.json); write one with `python -m export`, "
            "or pass --no-verify for development"
        )
    if FastAPI is None:
        raise UsageError(SERVE_EXTRA_MISSING)
    import uvicorn

    from moderator.inference import Moderator, ModeratorConfigError

    try:
        moderator = Moderator.from_pretrained(
            export_dir,
            device=args.device,
            dtype=args.dtype,
            threshold=args.threshold,
            verify=args.verify,
            expect_manifest_sha256=args.expect_manifest_sha256,
        )
    except (ManifestError, ModeratorConfigError, ModelLoadError) as exc:
        raise InputError(str(exc)) from None
    logger.info("serving %s (threshold %s) on http://%s:%d", export_dir, moderator.threshold, args.host, args.port)
    # The model is loaded and verified before the port is bound: a refused export never listens.
    # Every request is answered by its deadline, so SIGTERM's graceful shutdown ends by then too.
    uvicorn.run(
        create_app(moderator, settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s) + 5,
    )
    return 0
