"""The engine deployment: Ray Serve LLM's LLMServer, sending a stream's first chunk at once.

Ray Serve LLM groups a stream's tokens into one message per batching interval (50 ms by
default, `stream_batching_interval_ms`) so that Ray moves fewer, larger messages between
the engine replica and the ingress. Its batcher waits a full interval before it sends
anything, the first token included: every streamed request pays up to one interval of
extra time to first token (about 50 ms measured on an H200, where plain vLLM answers in
16 ms). `first_chunk_now` keeps the batching but sends the first chunk as soon as the
engine yields it; after that, at most one chunk leaves per interval, and the stream's
end is sent at once.

The class keeps Ray's name, LLMServer, so the deployment is still called
`LLMServer:<model id>`, the name Serve config overrides and `nvfp4ctl` address.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nvfp4_serve.ray_hooks import LLMServerHooks
from nvfp4_serve.streaming import first_chunk_now


class LLMServer(LLMServerHooks):
    """Ray's LLMServer with `first_chunk_now` as its stream batcher (the private hook it
    replaces is in nvfp4_serve.ray_hooks)."""

    def batch_stream(
        self, generator: AsyncIterator[Any], interval_ms: float | None
    ) -> AsyncIterator[list[Any]]:
        return first_chunk_now(generator, interval_ms)
