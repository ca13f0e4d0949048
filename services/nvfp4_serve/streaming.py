"""Grouping a token stream into chunks without delaying the first one (no Ray import,
so it is unit-tested without a cluster; nvfp4_serve.server plugs it into Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

_END = object()  # sentinel: the engine's generator is exhausted (or failed)


async def first_chunk_now(
    source: AsyncIterator[Any], interval_ms: float | None
) -> AsyncGenerator[list[Any], None]:
    """Yield lists of `source`'s items: the first at once, then one list per interval.

    `interval_ms` 0 yields every item alone; None yields everything in one list at the
    end (Ray's meaning of both).
    """
    if interval_ms == 0:
        async for item in source:
            yield [item]
        return
    interval_s = None if interval_ms is None else interval_ms / 1000
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = asyncio.Event()

    async def read() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        finally:
            queue.put_nowait(_END)
            done.set()

    reader = asyncio.create_task(read())
    last_sent: float | None = None
    try:
        while True:
            batch = [await queue.get()]  # wait for the next item, however long it takes
            if interval_s is None:
                await done.wait()
            elif last_sent is not None:
                # Not the first chunk: hold it until one interval after the last one,
                # unless the stream ends first.
                wait = last_sent + interval_s - time.monotonic()
                if wait > 0 and not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), timeout=wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            ended = batch[-1] is _END
            if ended:
                batch.pop()
            if batch:
                yield batch
                last_sent = time.monotonic()
            if ended:
                await reader  # re-raises the engine's error, if any
                return
    finally:
        if not reader.done():
            reader.cancel()
