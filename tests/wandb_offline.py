"""Read back what an offline W&B run recorded (test helper).

wandb >= 0.2x keeps offline runs only in ``run-<id>.wandb``: a LevelDB-style log (7-byte file
header, 32 KiB blocks, records of ``crc32 | length | type | payload`` split across blocks) whose
payloads are ``wandb_internal_pb2.Record`` protobufs. The Python reader was removed from wandb.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < HEADER:  # block trailer padding
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length:  # a record still being written: stop before it
            return
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0


def read_offline_run(run_dir: Path, wait_s: float = 30.0) -> dict[str, Any]:
    """Return ``{"config", "history", "summary", "artifacts"}`` for an offline run folder.

    Each artifact is ``{"name", "type", "aliases", "metadata", "files": {path: {"digest", "size"}}}``;
    ``digest`` is W&B's base64 MD5 of the file.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    # wandb-core flushes the file after ``wandb.finish()`` returns: wait (bounded) for the exit record.
    deadline = time.monotonic() + wait_s
    while True:
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
        records = []
        for payload in _payloads(data):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait_s} s (run not finished?)"
        time.sleep(0.2)
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "files": {e.path: {"digest": e.digest, "size": e.size} for e in artifact.manifest.contents},
                }
            )
    return {"config": config, "history": history, "summary": summary, "artifacts": artifacts}
