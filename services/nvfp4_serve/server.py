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

from collections.abc import AsyncGenerator
from typing import Any

from ray.serve.llm.deployment import LLMServer as RayLLMServer

from nvfp4_serve.streaming import first_chunk_now


class LLMServer(RayLLMServer):
    """Ray's LLMServer with `first_chunk_now` as its stream batcher.

    `_batch_output_stream` is a private hook of Ray 2.60's LLMServer;
    tests/integration/test_serve.py checks it exists in the installed Ray.
    """

    def _batch_output_stream(self, generator: AsyncGenerator[Any, None]) -> Any:
        return first_chunk_now(generator, self._get_batch_interval_ms())
