"""Concurrent streaming chat clients against an endpoint for a fixed time.

Each client opens a streaming /v1/chat/completions, reads it to the end, and starts
the next one until the time is up (closed loop: `--concurrency` streams in flight).
Prints and returns requests served, errors, tokens/s and latency percentiles (time
to first token, whole request); an error is any non-200 answer, an error chunk, a
broken stream or a stream that ends without its final usage record.

    .venv/bin/python bench/chat_soak.py --url http://127.0.0.1:8000 --key KEY \\
        --model NAME [--concurrency 8] [--seconds 60] [--max-tokens 16]

tests/reliability/test_serving_faults.py runs it against the CPU app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nvfp4_admin.loadgen import stream_request

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count from one to five.",
    "Write a short greeting.",
]


@dataclass
class SoakResult:
    concurrency: int
    seconds: float
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 1),
            "requests_ok": self.ok,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "output_tok_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "ttft_ms": {
                "p50": pct(self.ttft_s, 0.5),
                "p95": pct(self.ttft_s, 0.95),
                "p99": pct(self.ttft_s, 0.99),
            },  # fmt: skip
            "latency_ms": {
                "p50": pct(self.latency_s, 0.5),
                "p95": pct(self.latency_s, 0.95),
                "p99": pct(self.latency_s, 0.99),
            },  # fmt: skip
            "latency_mean_ms": round(statistics.fmean(self.latency_s) * 1000, 1)
            if self.latency_s
            else None,
        }


async def _one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int,
               result: SoakResult) -> None:  # fmt: skip
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        # TTFT as everywhere here: up to the first chunk with text, not the role chunk.
        stats = await stream_request(client, url, body, require_text=False)
    except (RuntimeError, httpx.HTTPError, json.JSONDecodeError) as e:
        result.errors.append(f"{type(e).__name__}: {e}"[:200])
        return
    if stats.usage_tokens is None:
        result.errors.append("stream ended without its usage record")
        return
    result.ok += 1
    result.tokens += stats.usage_tokens
    result.latency_s.append(stats.total_s)
    if stats.text_chunks:
        result.ttft_s.append(stats.ttft_s)


async def soak(base_url: str, api_key: str, model: str, concurrency: int = 8,
               seconds: float = 60.0, max_tokens: int = 16) -> SoakResult:  # fmt: skip
    url = base_url.rstrip("/") + "/v1/chat/completions"
    result = SoakResult(concurrency=concurrency, seconds=seconds)
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=limits) as client:

        async def client_loop(worker: int) -> None:
            i = worker
            while time.perf_counter() < stop_at:
                await _one(client, url, model, i, max_tokens, result)
                i += concurrency

        await asyncio.gather(*(client_loop(w) for w in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


def table(summary: dict[str, Any]) -> str:
    t, lat = summary["ttft_ms"], summary["latency_ms"]
    return "\n".join(
        [
            "| streams | seconds | requests | errors | tok/s | TTFT p50/p95/p99 ms "
            "| latency p50/p95/p99 ms |",
            "|---|---|---|---|---|---|---|",
            f"| {summary['concurrency']} | {summary['seconds']} | {summary['requests_ok']} "
            f"| {summary['errors']} | {summary['output_tok_s']} "
            f"| {t['p50']} / {t['p95']} / {t['p99']} "
            f"| {lat['p50']} / {lat['p95']} / {lat['p99']} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="endpoint root, e.g. http://host:8000")
    parser.add_argument("--key", required=True, help="API key")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args()
    result = asyncio.run(
        soak(args.url, args.key, args.model, args.concurrency, args.seconds, args.max_tokens)
    )
    summary = result.summary()
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    raise SystemExit(1 if result.errors else 0)


if __name__ == "__main__":
    main()
