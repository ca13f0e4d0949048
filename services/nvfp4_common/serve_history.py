"""The Serve configs that were live before each `nvfp4ctl serve deploy`, for `serve rollback`.

A Redis list of JSON documents, newest first, capped so it cannot grow without end. It
lives in the same Redis as the job queue but has nothing to do with jobs.
"""

from __future__ import annotations

import json
from typing import Any

from nvfp4_common import keys

# Each rollback goes one deploy further back; configs older than this many are dropped.
KEEP = 20


class ServeHistory:
    """Remembered Serve configs (the body Ray's `PUT /api/serve/applications/` takes)."""

    def __init__(self, client: Any) -> None:
        self.redis = client  # decode_responses=True: the configs are stored as JSON text

    def push(self, config: dict[str, Any], keep: int = KEEP) -> None:
        """Remember a Serve config that was live before a model switch."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(keys.SERVE_HISTORY, json.dumps(config, separators=(",", ":")))
            pipe.ltrim(keys.SERVE_HISTORY, 0, keep - 1)
            pipe.execute()

    def configs(self) -> list[dict[str, Any]]:
        """Remembered Serve configs, newest first."""
        return [json.loads(raw) for raw in self.redis.lrange(keys.SERVE_HISTORY, 0, -1)]

    def pop(self) -> dict[str, Any] | None:
        """Forget the newest config (after rolling back to it) and return it."""
        raw = self.redis.lpop(keys.SERVE_HISTORY)
        return json.loads(raw) if raw else None
