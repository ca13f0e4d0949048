"""/proc/meminfo, read by serving's and the worker's memory checks and by `doctor`."""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field ("MemAvailable: 123 kB" -> 125952)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        out[name.strip()] = int(parts[0]) * scale
    return out


def read_meminfo(path: Path = MEMINFO) -> str:
    return path.read_text()
