"""The stream batcher of our engine deployment: first chunk at once, then batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from nvfp4_serve.streaming import first_chunk_now


async def tokens(n: int, every_s: float, fail_at: int | None = None) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(every_s)
        if i == fail_at:
            raise RuntimeError("engine died")
        yield i


async def collect(
    source: AsyncIterator[int], interval_ms: float | None
) -> list[tuple[float, list[int]]]:
    start = time.monotonic()
    return [
        (time.monotonic() - start, batch) async for batch in first_chunk_now(source, interval_ms)
    ]


def test_first_token_is_not_held_for_an_interval() -> None:
    out = asyncio.run(collect(tokens(20, 0.005), interval_ms=200))
    first_at, first = out[0]
    assert first == [0] and first_at < 0.1  # Ray's own batcher would hold it 200 ms
    assert [t for _, batch in out for t in batch] == list(range(20))  # nothing lost, in order
    assert len(out) <= 3  # the rest comes in few chunks


def test_interval_zero_sends_every_token_and_none_sends_one_batch() -> None:
    assert [b for _, b in asyncio.run(collect(tokens(4, 0), 0))] == [[0], [1], [2], [3]]
    batches = [b for _, b in asyncio.run(collect(tokens(4, 0.001), None))]
    assert [t for b in batches for t in b] == [0, 1, 2, 3] and len(batches) <= 2


def test_an_engine_error_reaches_the_caller() -> None:
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(collect(tokens(10, 0.001, fail_at=5), interval_ms=50))
