"""The card the GPU benchmarks ran on, and its measured device-to-device copy bandwidth.

Decode is bound by memory reads: the bandwidth measured here (bytes read + bytes written
per second by a large torch copy, as STREAM counts a copy) is the ceiling the decode
tables compare against, rather than the vendor's datasheet figure.

    python3 bench/gpu_card.py --out bench/results/gpu_card.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))  # run as a script, also where nothing is installed

from nvfp4_common.sizing import GIB  # noqa: E402


def nvidia_smi() -> dict[str, str]:
    fields = "name,memory.total,driver_version,clocks.max.memory,clocks.max.sm"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    first = out.splitlines()[0] if out else ""
    return dict(zip(fields.split(","), (v.strip() for v in first.split(",")), strict=False))


def copy_bandwidth(size_bytes: int = 4 * GIB, iters: int = 20) -> dict[str, float]:
    """Bytes moved per second (read + write) by `dst.copy_(src)` on the current GPU."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    moved = 2 * size_bytes * iters
    del src, dst
    torch.cuda.empty_cache()
    return {
        "buffer_gib": size_bytes / GIB,
        "iterations": iters,
        "seconds": round(seconds, 4),
        "copy_bytes_per_s": moved / seconds,
        "copy_tb_per_s": round(moved / seconds / 1e12, 3),
    }


def card() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "nvidia_smi": nvidia_smi(),
        "torch_name": props.name,
        "memory_gib": round(props.total_memory / GIB, 1),
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **card(),
        "bandwidth": copy_bandwidth(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
