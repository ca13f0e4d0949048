"""Streaming load against an OpenAI-compatible endpoint: TTFT and decode speed.

The one streaming client of this repository: `nvfp4ctl bench` and the scripts in bench/
all measure through `stream_request`, so their figures share one definition.

- TTFT: the clock starts just before the request is sent and stops when the first SSE
  chunk that carries generated text arrives (`choices[].text` of /v1/completions,
  `choices[].delta.content` of /v1/chat/completions). A chunk without text, such as the
  role-only first chunk of a chat stream, does not stop it.
- Tokens: the server's count from the final usage chunk (`stream_options.include_usage`);
  without one, the number of chunks that carried text (a lower bound: a server may pack
  several tokens into one chunk, as Ray Serve does).
- Decode speed of a stream: (tokens - 1) / (end - first text), the end being the last
  byte of the stream.

Each request of `LoadGenerator` streams /v1/completions with a fixed prompt and
`ignore_eos` (a vLLM extension), so every request generates exactly max_tokens tokens.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from nvfp4_common.errors import Nvfp4Error

# Plain prose so the prompt tokenizes to roughly one token per word on any tokenizer.
_PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill and"
    " children play near the water on a warm summer afternoon in the quiet valley"
)


def prompt_of(words: int) -> str:
    vocab = _PROMPT_TEXT.split()
    return " ".join(vocab[i % len(vocab)] for i in range(words))


@dataclass
class RequestStats:
    ttft_s: float
    total_s: float
    tokens: int
    # completion_tokens of the server's usage chunk; None when the stream had none.
    usage_tokens: int | None = None
    # Chunks that carried generated text (0: the stream had none, and no real TTFT).
    text_chunks: int = 0

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first token, for this one stream."""
        span = self.total_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else None

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency of this stream (chunk gaps would miss packed tokens)."""
        tps = self.decode_tps
        return 1 / tps if tps else None


@dataclass
class LevelStats:
    concurrency: int
    wall_s: float
    requests: list[RequestStats] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    def summary(self) -> dict[str, Any]:
        ttfts = sorted(r.ttft_s for r in self.requests)
        per_stream = [d for r in self.requests if (d := r.decode_tps) is not None]
        itls = sorted(i for r in self.requests if (i := r.itl_s) is not None)
        return {
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "throughput_tok_s": round(self.tokens / self.wall_s, 2) if self.wall_s > 0 else None,
            "decode_tok_s_per_stream": round(statistics.median(per_stream), 2)
            if per_stream
            else None,
            "ttft_p50_ms": round(_pct(ttfts, 0.5) * 1000, 1) if ttfts else None,
            "ttft_p90_ms": round(_pct(ttfts, 0.9) * 1000, 1) if ttfts else None,
            "ttft_p95_ms": round(_pct(ttfts, 0.95) * 1000, 1) if ttfts else None,
            "itl_p50_ms": round(_pct(itls, 0.5) * 1000, 2) if itls else None,
            "itl_p95_ms": round(_pct(itls, 0.95) * 1000, 2) if itls else None,
        }


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class LoadGenerator:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        prompt_words: int,
        max_tokens: int,
        timeout_s: float,
        prompt: str | None = None,
    ) -> None:
        self.url = v1_url(base_url) + "/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.body = {
            "model": model,
            "prompt": prompt if prompt is not None else prompt_of(prompt_words),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)

    async def one(self, client: httpx.AsyncClient, max_tokens: int | None = None) -> RequestStats:
        body = self.body if max_tokens is None else {**self.body, "max_tokens": max_tokens}
        return await stream_request(client, self.url, body, self.headers)

    async def level(
        self, concurrency: int, requests: int | None = None, max_tokens: int | None = None
    ) -> LevelStats:
        """`requests` streams (default: `concurrency`), `concurrency` of them in flight.

        Each of the `concurrency` slots starts its next request as soon as its last one
        ends, so the server sees the same load until the requests run out. `max_tokens`
        overrides the generator's (e.g. short warm-up requests).
        """
        total = concurrency if requests is None else requests
        results: list[RequestStats | BaseException] = []

        async def slot(c: httpx.AsyncClient) -> None:
            while len(results) + in_flight[0] < total:
                in_flight[0] += 1
                try:
                    results.append(await self.one(c, max_tokens))
                except Exception as e:  # recorded; the level goes on
                    results.append(e)
                finally:
                    in_flight[0] -= 1

        in_flight = [0]
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits, trust_env=False) as c:
            start = time.perf_counter()
            await asyncio.gather(*(slot(c) for _ in range(concurrency)))
            wall = time.perf_counter() - start
        stats = LevelStats(concurrency, wall)
        for res in results:
            if isinstance(res, RequestStats):
                stats.requests.append(res)
            else:
                stats.errors.append(f"{type(res).__name__}: {res}")
        return stats

    def run(self, levels: list[int], warmup: bool = True) -> list[LevelStats]:
        async def go() -> list[LevelStats]:
            if warmup:
                await self.level(1)  # first request pays for graph capture and caches
            return [await self.level(c) for c in levels]

        return asyncio.run(go())


def chunk_text(choice: dict[str, Any]) -> str:
    """Generated text of one streamed choice: completions' `text`, chat's `delta.content`."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    require_text: bool = True,
) -> RequestStats:
    """Send one streaming request and time it (TTFT as defined in this module's docstring).

    Raises RuntimeError for a non-200 answer, an error chunk, or (with `require_text`) a
    stream without generated text; then `ttft_s` of a text-less stream is its total time.
    """
    start = time.perf_counter()  # just before the request is sent
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code}: {' '.join(text.split())[:300]}")
        async for line in sse_lines(r.aiter_text()):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                raise RuntimeError(f"error chunk: {str(event['error'])[:300]}")
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            if any(chunk_text(c) for c in event.get("choices") or []):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    if first is None and require_text:
        raise RuntimeError("the stream ended without any generated text")
    ttft = (first if first is not None else end) - start
    return RequestStats(ttft, end - start, usage_tokens or chunks, usage_tokens, chunks)


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, split at line feeds only.

    httpx's `aiter_lines` splits at every line boundary of `str.splitlines`, U+2028, U+0085
    and \x1c-\x1e included, which a JSON string in a `data:` line may hold raw (a model
    can generate them): the line is then cut mid-string and does not parse.
    """
    pending = ""
    async for text in chunks:
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


def v1_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class EndpointError(Nvfp4Error, RuntimeError):
    """The OpenAI endpoint answered, but not with success (a wrong URL or API key)."""


def served_models(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(v1_url(base_url) + "/models", headers=headers, timeout=timeout_s, trust_env=False)
    if r.status_code != 200:
        raise EndpointError(
            f"{v1_url(base_url)}/models answered HTTP {r.status_code}: {r.text[:200]}"
        )
    return [m["id"] for m in r.json().get("data", [])]
