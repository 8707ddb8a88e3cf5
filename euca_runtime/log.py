"""Structured logging: one JSON object per line, naming component, epoch and peer.

Use `log = get_logger("lease")` then `log.info("granted", extra={"epoch": 4, "peer": "node-b"})`.
Keys in `extra` become top-level fields. Never pass secrets (keys, passwords) in `extra`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, sort_keys=False)


def get_logger(component: str) -> logging.Logger:
    return logging.getLogger(f"euca_runtime.{component}")


def configure(level: str = "INFO", stream: Any = None, node: str | None = None) -> None:
    """Send every euca_runtime logger to `stream` (stderr by default) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    if node is not None:
        handler.addFilter(_NodeFilter(node))
    root = logging.getLogger("euca_runtime")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime


class _NodeFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        return True
