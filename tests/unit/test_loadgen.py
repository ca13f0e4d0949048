"""The streaming client's TTFT and token counts, against a local SSE server with set delays.

The server is a small stdlib HTTP server (no vLLM needed): each path streams a script of
(delay, event) pairs, so the test knows exactly when generated text leaves the server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from nvfp4_admin.loadgen import (
    LoadGenerator,
    RequestStats,
    chunk_text,
    sse_lines,
    stream_request,
)

DELAY_S = 0.2


def _completion(text: str) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


def _chat(delta: dict[str, str]) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def _usage(tokens: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": tokens}}


# path -> (delay before the event, event) in the order sent; then "data: [DONE]".
SCRIPTS: dict[str, list[tuple[float, dict[str, Any]]]] = {
    # A chat stream: the role-only chunk at once, the first text DELAY_S later.
    "/v1/chat/completions": [
        (0.0, _chat({"role": "assistant", "content": ""})),
        (DELAY_S, _chat({"content": "Paris"})),
        (0.01, _chat({"content": " is"})),
        (0.0, _usage(3)),
    ],
    # A completions stream that starts with an empty-text chunk, packs tokens per chunk
    # and ends with usage: tokens come from usage (7), not from the 2 text chunks.
    "/v1/completions": [
        (0.0, _completion("")),
        (DELAY_S, _completion("one two three")),
        (0.05, _completion(" four five six seven")),
        (0.0, _usage(7)),
    ],
    # No usage record: tokens are the text chunks.
    "/nousage/v1/completions": [
        (0.0, _completion("a")),
        (0.0, _completion("b")),
        (0.0, _completion("c")),
    ],
    "/empty/v1/completions": [(0.0, _completion(""))],
    "/broken/v1/completions": [(0.0, {"error": {"message": "engine died", "code": 500}})],
}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/busy"):
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": "busy"}')
            return
        script = SCRIPTS[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delay, event in script:
            time.sleep(delay)
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _stream(url: str, **kwargs: Any) -> RequestStats:
    async def go() -> RequestStats:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            return await stream_request(client, url, {"stream": True}, **kwargs)

    return asyncio.run(go())


def test_ttft_waits_for_the_first_generated_text_not_the_role_chunk(server: str) -> None:
    stats = _stream(f"{server}/v1/chat/completions")
    assert stats.ttft_s >= DELAY_S
    assert stats.total_s >= stats.ttft_s
    assert stats.tokens == 3 and stats.usage_tokens == 3


def test_tokens_come_from_usage_when_the_server_sends_it(server: str) -> None:
    stats = _stream(f"{server}/v1/completions")
    assert DELAY_S <= stats.ttft_s < stats.total_s
    assert stats.tokens == 7 and stats.usage_tokens == 7


def test_without_usage_tokens_are_the_text_chunks(server: str) -> None:
    stats = _stream(f"{server}/nousage/v1/completions")
    assert stats.tokens == stats.text_chunks == 3 and stats.usage_tokens is None


def test_a_stream_without_text_errors_or_counts_as_total_time(server: str) -> None:
    with pytest.raises(RuntimeError, match="without any generated text"):
        _stream(f"{server}/empty/v1/completions")
    stats = _stream(f"{server}/empty/v1/completions", require_text=False)
    assert stats.ttft_s == stats.total_s and stats.tokens == stats.text_chunks == 0


def test_http_errors_and_error_chunks_raise_one_line(server: str) -> None:
    with pytest.raises(RuntimeError, match="HTTP 503"):
        _stream(f"{server}/busy/v1/completions")
    with pytest.raises(RuntimeError, match="error chunk: .*engine died"):
        _stream(f"{server}/broken/v1/completions")


def test_chunk_text_of_both_endpoints() -> None:
    assert chunk_text({"text": "a"}) == "a"
    assert chunk_text({"delta": {"content": "b"}}) == "b"
    assert chunk_text({"delta": {"role": "assistant"}}) == ""


def test_load_generator_level_runs_every_request(server: str) -> None:
    gen = LoadGenerator(server, "m", "key", prompt_words=4, max_tokens=7, timeout_s=10)
    stats = asyncio.run(gen.level(concurrency=2, requests=3))
    assert len(stats.requests) == 3 and not stats.errors
    assert all(r.ttft_s >= DELAY_S and r.tokens == 7 for r in stats.requests)
    summary = stats.summary()
    assert summary["tokens"] == 21 and summary["ttft_p50_ms"] >= DELAY_S * 1000


def test_sse_lines_split_at_line_feeds_only() -> None:
    """A token with U+2028, U+0085 or \\x1e sits raw in a data: line's JSON; splitting
    there (as httpx's aiter_lines does) cuts the JSON mid-string."""
    event = json.dumps({"choices": [{"text": "a\u2028b\x85c\x1ed"}]}, ensure_ascii=False)
    stream = f"data: {event}\r\n\r\ndata: [DONE]\n\n"

    async def chunks() -> AsyncIterator[str]:
        for k in range(0, len(stream), 7):  # cut anywhere, as the network does
            yield stream[k : k + 7]

    async def collect() -> list[str]:
        return [line async for line in sse_lines(chunks())]

    lines = asyncio.run(collect())
    assert lines == [f"data: {event}", "", "data: [DONE]", ""]
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "a\u2028b\x85c\x1ed"
