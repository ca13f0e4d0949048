"""Will the model fit? A memory check made before any engine starts.

On a DGX Spark (GB10) CPU and GPU share one pool of memory, so vLLM's
gpu_memory_utilization is a share of memory that other processes also use, not a
real cap: an engine that asks for 90% of "GPU memory" can push the host into the
OOM killer. The same holds for vLLM's CPU build. So we compare what the model
needs against /proc/meminfo's MemAvailable and refuse early with numbers.

Everything here is a pure function of its inputs (the caller reads /proc/meminfo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvfp4_common.errors import Nvfp4Error
from nvfp4_common.meminfo import parse_meminfo
from nvfp4_common.sizing import GIB, gib

# Leave this much of MemAvailable to the OS, Ray and the HTTP proxy.
HOST_HEADROOM_BYTES = 1 * GIB


class PreflightError(Nvfp4Error, RuntimeError):
    """The model cannot start with this configuration; the message says what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    available_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    suggested_gpu_memory_utilization: float

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def summary(self) -> str:
        return (
            f"needs {gib(self.needed_bytes)} (weights {gib(self.weights_bytes)} + KV cache "
            f"{gib(self.kv_cache_bytes)} + overhead {gib(self.overhead_bytes)}); "
            f"available {gib(self.available_bytes)} of {gib(self.total_bytes)}"
        )


def plan_memory(
    meminfo_text: str,
    *,
    weights_bytes: int,
    kv_bytes_per_token: int,
    max_model_len: int,
    overhead_bytes: int,
    gpu_memory_utilization: float | None,
) -> MemoryPlan:
    """Check that one full-length sequence fits next to the weights, or raise.

    Args:
        meminfo_text: the text of /proc/meminfo.
        weights_bytes: checkpoint size (safetensors bytes).
        kv_bytes_per_token: KV cache bytes per token over all layers.
        max_model_len: the context length to be served; vLLM needs KV room for one
            sequence of this length at least.
        overhead_bytes: activations, CUDA graphs, runtime.
        gpu_memory_utilization: vLLM's setting on a shared-memory GPU; None on CPU.

    Returns:
        The plan, with the largest gpu_memory_utilization the free memory allows.

    Raises:
        PreflightError: the model does not fit, or the utilization asks for more memory
            than is free.
    """
    info = parse_meminfo(meminfo_text)
    if "MemTotal" not in info or "MemAvailable" not in info:
        raise PreflightError("meminfo lacks MemTotal/MemAvailable; set serve_preflight=false")
    total, available = info["MemTotal"], info["MemAvailable"]
    usable = max(available - HOST_HEADROOM_BYTES, 0)
    # Round down to 0.01 so the suggestion never claims more than is free.
    suggested = math.floor(usable / total * 100) / 100 if total else 0.0
    plan = MemoryPlan(
        total_bytes=total,
        available_bytes=available,
        weights_bytes=weights_bytes,
        kv_cache_bytes=kv_bytes_per_token * max_model_len,
        overhead_bytes=overhead_bytes,
        suggested_gpu_memory_utilization=suggested,
    )
    if plan.needed_bytes > usable:
        room = usable - weights_bytes - overhead_bytes
        fit_len = room // kv_bytes_per_token if kv_bytes_per_token and room > 0 else 0
        hint = (
            f"lower max_model_len to {fit_len} or free memory"
            if fit_len >= 256
            else "free memory or serve a smaller checkpoint"
        )
        raise PreflightError(
            f"model does not fit: {plan.summary()}, {gib(HOST_HEADROOM_BYTES)} kept for the"
            f" host; {hint}"
        )
    if gpu_memory_utilization is not None:
        claim = gpu_memory_utilization * total
        if claim > usable:
            low = math.ceil(plan.needed_bytes / total * 100) / 100
            raise PreflightError(
                f"gpu_memory_utilization={gpu_memory_utilization} would claim "
                f"{gib(int(claim))} of shared memory but only {gib(usable)} is free; "
                f"use gpu_memory_utilization between {low} and {suggested}"
            )
    return plan
