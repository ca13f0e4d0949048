"""Container health check: is this host's worker sending heartbeats to Redis?

`python -m nvfp4_worker.healthcheck` exits 0 when a worker running on this host (the
container's hostname) renewed its heartbeat within `heartbeat_timeout_s`, else 1 with one
line saying why. The worker beats about every second while idle and every
`heartbeat_interval_s` while a job runs, so a stale beat means the loop is stuck or dead,
which a process check alone would not show.
"""

from __future__ import annotations

import socket
import sys

import redis

from nvfp4_common.errors import InvalidSettings
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings, get_settings


def check(settings: Settings, host: str | None = None) -> str | None:
    """Return None when healthy, else the reason it is not."""
    host = host or socket.gethostname()
    try:
        workers = JobQueue(settings).workers()
    except redis.RedisError as e:
        return f"cannot read worker heartbeats from Redis: {e}"
    mine = [w for w in workers if w.host == host]
    if not mine:
        return f"no worker on host {host!r} has sent a heartbeat"
    freshest = min(w.heartbeat_age_s for w in mine)
    if freshest > settings.heartbeat_timeout_s:
        return (
            f"worker heartbeat on {host!r} is {freshest:.1f} s old "
            f"(limit {settings.heartbeat_timeout_s:g} s)"
        )
    return None


def main() -> int:
    try:
        settings = get_settings()
    except InvalidSettings as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    problem = check(settings)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
