"""Processes known by a marker variable in their environment, and how to stop them.

The test cluster and the local stack give every process they start a unique marker
(`NAME=<uuid>`), so they can stop exactly those, even Ray workers and vLLM engine
processes that left the process group, without `ray stop` (which would stop every Ray
on the host).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def marked_pids(variable: str, value: str) -> list[int]:
    """PIDs of the processes (other than this one) whose environment holds variable=value."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def kill_marked(variable: str, value: str, rounds: int = 3) -> None:
    """SIGKILL every process marked variable=value, a few rounds a second apart: a dying
    Ray raylet may still start a worker."""
    for _ in range(rounds):
        pids = marked_pids(variable, value)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
