"""Readiness state machine, with the engine and Ray's controller played by small
async functions (the real ones are exercised in tests/reliability/test_serving_faults.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nvfp4_serve.health import Readiness


def test_ready_after_a_token_then_follows_the_engine_replicas() -> None:
    async def scenario() -> list[tuple[int, str | None]]:
        probes = iter([RuntimeError("engine loading"), "hi", "back"])
        counts = iter([(1, 1), (0, 1), (1, 1)] + [(1, 1)] * 100)
        seen: list[tuple[int, str | None]] = []

        def note() -> None:
            # Read at every call into the engine or the controller: the state can only
            # change after one returns, so no state is missed however slow the machine.
            code, body = r.status()
            if not seen or seen[-1][0] != code:
                seen.append((code, body.get("reason")))  # type: ignore[arg-type]

        async def probe() -> str:
            note()
            item = next(probes)
            if isinstance(item, Exception):
                raise item
            return item

        async def replicas() -> tuple[int, int]:
            note()
            return next(counts)

        r = Readiness(probe, replicas, retry_s=0.01, watch_s=0.01)
        r.start()
        while r.lost_engines < 1 or r.status()[0] != 200:
            await asyncio.sleep(0.005)
        note()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert [code for code, _ in seen] == [503, 200, 503, 200]
    assert "not probed yet" in str(seen[0][1]) or "engine loading" in str(seen[0][1])
    assert "no engine replica running (0 of 1)" in str(seen[2][1])


def test_a_controller_error_does_not_flip_readiness() -> None:
    async def scenario() -> Readiness:
        async def probe() -> str:
            return "hi"

        async def replicas() -> tuple[int, int]:
            raise ConnectionError("controller restarting")

        r = Readiness(probe, replicas, watch_s=0.01)
        r.start()
        await asyncio.sleep(0.2)
        return r

    r = asyncio.run(scenario())
    assert r.status()[0] == 200


def test_a_renamed_ray_attribute_stops_the_watch_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """An AttributeError is a Ray upgrade, not a passing controller outage: one error line,
    not a debug line every 2 s, and readiness keeps its last verdict."""
    calls = 0

    async def scenario() -> Readiness:
        async def probe() -> str:
            return "hi"

        async def replicas() -> tuple[int, int]:
            nonlocal calls
            calls += 1
            raise AttributeError("'DeploymentStatus' object has no attribute 'replica_states'")

        r = Readiness(probe, replicas, watch_s=0.01)
        r.start()
        await asyncio.sleep(0.2)
        return r

    with caplog.at_level(logging.DEBUG, logger="nvfp4_serve.health"):
        r = asyncio.run(scenario())
    assert r.status()[0] == 200
    assert calls == 1
    errors = [x for x in caplog.records if x.levelno >= logging.ERROR]
    assert len(errors) == 1 and "replica_states" in errors[0].getMessage()
