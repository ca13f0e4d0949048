"""Will the job fit in memory? A check made before any weights are loaded.

A job that outgrows its container's memory limit is killed by the kernel's OOM killer,
re-queued and killed again until its attempts run out. Estimating its need from the
checkpoint size and comparing it with what this process may use turns that into one
clear error at the start.

The rule itself, need = W + B/2 + 2 GiB (the weights in the compute dtype where they
sit in host memory, half the BF16 model for export and activations, and the runtime), and
the measurements behind it live in nvfp4_common.sizing.whole_model_peak, which
`nvfp4ctl estimate` reports too. This module turns the source's safetensors bytes into a
parameter count and reads what this process may use: the container's memory limit
(cgroup v2, else v1) and MemAvailable. With the compose default limit of 56 GiB on a
Spark, the rule admits BF16 sources up to about 36 GiB (19B parameters).

The check runs in the job's process after torch is imported, so part of the runtime is
already out of MemAvailable and counted twice: an error of under 1 GiB, on the safe side.

Everything here reads files passed as paths, so tests can give their own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_common.meminfo import MEMINFO, parse_meminfo, read_meminfo
from nvfp4_common.sizing import (
    GIB,
    RUNTIME_BYTES,
    LayerSizes,
    PeakMemory,
    activation_bytes,
    gib,
    gpu_need,
    gpu_placement,
    layerwise_peak,
    whole_model_peak,
)
from nvfp4_worker.errors import JobError

CGROUP_V2_MAX = Path("/sys/fs/cgroup/memory.max")
# What a layer-by-layer job's process grows by after the preflight, beyond the layer, the
# activations and the shard being written (measured on CPU: see layerwise_runtime).
LAYERWISE_RUNTIME_MARGIN = GIB // 2
CGROUP_V1_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712).
_NO_LIMIT = 2**62
# Bytes per element of the source's dominant safetensors dtype (checkpoint.weights_dtype);
# anything else is counted as 2 bytes, the common case. The safetensors headers are
# counted as weights too: a few MB of a model, on the safe side.
_SOURCE_ITEMSIZE = {"BF16": 2, "FP16": 2, "FP32": 4, "FP64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Room:
    """What this process may use: the container's memory limit and MemAvailable
    (None where the host sets or reports none)."""

    limit: int | None
    available: int | None

    @property
    def usable(self) -> int | None:
        known = [v for v in (self.limit, self.available) if v is not None]
        return min(known) if known else None


def weights_in_host_memory(device: torch.device) -> bool:
    """True on a CPU and on a GPU that shares host memory (DGX Spark's GB10)."""
    if device.type != "cuda":
        return True
    props = torch.cuda.get_device_properties(device)
    # The name as well: doctor.py and nvidia-smi know GB10 by name, whatever the driver
    # reports as "integrated".
    return bool(getattr(props, "is_integrated", False)) or "GB10" in props.name


def gpu_free(device: torch.device) -> list[int]:
    """Free memory of each visible discrete card, in device order; none for a CPU or a
    card that shares host memory (the host check covers those). CUDA_VISIBLE_DEVICES
    picks the cards a worker may use."""
    if device.type != "cuda" or weights_in_host_memory(device):
        return []
    return [_card_free(i) for i in range(torch.cuda.device_count())]


def _card_free(index: int) -> int:
    """Free memory of one card. Read through NVML (nvidia-smi's figures), which opens no
    CUDA context: CUDA's own reading would leave one, a few hundred MB, on every card,
    also those the job then does not use. CUDA's reading where NVML cannot say (MIG)."""
    try:
        used = torch.cuda.device_memory_used(index)
        # NVML's "used" counts memory the driver reserves, which CUDA's total leaves out:
        # this errs low by that reserve, never high.
        return max(0, torch.cuda.get_device_properties(index).total_memory - used)
    except Exception:  # no NVML library, MIG, an old driver
        return torch.cuda.mem_get_info(index)[0]


def estimate(
    source_bytes: int, source_dtype: str | None, compute_dtype: torch.dtype, in_host: bool
) -> PeakMemory:
    """The job's host-memory need from the source's safetensors bytes and dtype."""
    params = source_bytes // _SOURCE_ITEMSIZE.get(source_dtype or "", 2)
    return whole_model_peak(params, str(compute_dtype).removeprefix("torch."), in_host)


def cgroup_limit(v2: Path = CGROUP_V2_MAX, v1: Path = CGROUP_V1_LIMIT) -> int | None:
    """The memory limit of this process's container (cgroup v2, else v1); None if unset."""
    for path in (v2, v1):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":  # cgroup v2: no limit
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < _NO_LIMIT else None
    return None


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        return parse_meminfo(read_meminfo(meminfo)).get("MemAvailable")
    except OSError:
        return None


def room(
    v2: Path | None = None,
    v1: Path | None = None,
    meminfo: Path | None = None,
    cap: int | None = None,
) -> Room:
    """This process's Room, from the system's files unless others are given; `cap` (the
    worker's own limit, NVFP4_WORKER_MEMORY_LIMIT_GB) lowers the container's."""
    limit = cgroup_limit(v2 or CGROUP_V2_MAX, v1 or CGROUP_V1_LIMIT)
    if cap is not None:
        limit = cap if limit is None else min(limit, cap)
    return Room(limit, mem_available(meminfo or MEMINFO))


def rss_bytes(statm: Path = Path("/proc/self/statm")) -> int | None:
    """This process's resident memory now; None where /proc is not there."""
    try:
        pages = int(statm.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def layerwise_runtime(rss: int | None) -> int:
    """The fixed part of a layer-by-layer job's peak: what this process holds already at
    the preflight (torch, transformers, ModelOpt, the CUDA context: all imported or made
    by then) plus LAYERWISE_RUNTIME_MARGIN for what comes later (the tokenizer, the
    calibration text, ModelOpt's export). Never more than the whole-model rule's fixed
    2 GiB, which holds the same and was set for small models' evaluation passes."""
    if rss is None:
        return RUNTIME_BYTES
    return min(RUNTIME_BYTES, rss + LAYERWISE_RUNTIME_MARGIN)


def check(model: str, need: PeakMemory, have: Room) -> str:
    """A one-line summary for the job's log, or JobError when `need` exceeds `have`."""
    parts = []
    if have.limit is not None:
        parts.append(f"memory limit {gib(have.limit)}")
    if have.available is not None:
        parts.append(f"MemAvailable {gib(have.available)}")
    where = ", ".join(parts) or "no limit or MemAvailable found"
    weights = f"weights {gib(need.weights)} in {need.compute_dtype} + " if need.weights else ""
    needs = (
        f"about {gib(need.total)} ({weights}working memory {gib(need.working)}"
        f" + runtime {gib(need.runtime)})"
    )
    usable = have.usable
    if usable is None or need.total <= usable:
        return f"memory: needs {needs}; {where}"
    what = []
    if have.available is not None and need.total > have.available:
        what.append("free memory")
    if have.limit is not None and need.total > have.limit:
        what.append('raise NVFP4_WORKER_MEMORY_LIMIT (docs/operations.md, "Memory")')
    # On a shared node both come down to stopping serving while this model is quantized.
    raise JobError(
        f"model {model} does not fit in memory: needs {needs} but this worker may use"
        f" {gib(usable)} ({where}); stop serving (`docker compose stop serve`) to"
        f" {' and '.join(what)}, or quantize a smaller model"
        " (NVFP4_WORKER_MEMORY_PREFLIGHT=false skips this check)"
    )


def activation_budget(base: int, have: Room) -> int | None:
    """Bytes the calibration activations of a layer-by-layer job may keep in memory: what
    is usable beyond `base`, the job's need without them (None: no limit known)."""
    usable = have.usable
    return None if usable is None else max(0, usable - base)


@dataclass(frozen=True)
class Mode:
    """Whole model or layer by layer, and the log line that says why."""

    layerwise: bool
    note: str
    activation_budget: int | None = None
    # Whole model on discrete cards: the BF16 weight bytes each card takes (accelerate's
    # max_memory), one entry per card used; empty on a CPU, a Spark, or layer by layer.
    gpu_budgets: tuple[int, ...] = ()


def _on_cards(model: str, sizes: LayerSizes, free: Sequence[int]) -> tuple[int, ...]:
    """The cards' shares of the whole model (gpu_placement), or JobError if they are too
    small; () where there are no discrete cards."""
    if not free:
        return ()
    budgets = gpu_placement(sizes, free)
    if budgets is not None:
        return tuple(budgets)
    raise JobError(
        f"model {model} does not fit in GPU memory: the whole model needs about"
        f" {gib(gpu_need(sizes.bf16_bytes))} (BF16 weights x 1.5 + 1 GiB a card), the"
        f" {len(free)} GPU{'s' if len(free) > 1 else ''} have {gib(sum(free))} free"
    )


def choose_mode(
    model: str,
    whole: PeakMemory,
    sizes: LayerSizes,
    calib: tuple[int, int],
    compute_dtype: torch.dtype,
    in_host: bool,
    have: Room,
    *,
    requested: bool,
    can_switch: bool = True,
    eval_samples: int = 0,
    runtime: int = RUNTIME_BYTES,
    gpus: Sequence[int] = (),
) -> Mode:
    """The job's mode: layer by layer when asked (`requested`), or when the whole model
    does not fit but one layer at a time does (unless `can_switch` is False: a recipe
    that layer-by-layer mode does not run). JobError when neither fits.

    `gpus` is the free memory of each discrete card (gpu_free): the whole model must fit
    the host and those cards, spread over several when one does not hold it."""
    dtype = str(compute_dtype).removeprefix("torch.")
    samples, seq_len = calib
    layered_need = 0  # set by layered(), for the error when neither mode fits

    def layered() -> Mode:
        in_memory = layerwise_peak(
            sizes, samples, seq_len, dtype, in_host, eval_samples=eval_samples, runtime=runtime
        )
        # Everything but the activations (the held-out logits included) stays in memory.
        acts = activation_bytes(2 * samples + 4 * eval_samples, seq_len, sizes.hidden, dtype)
        budget = activation_budget(in_memory.total - acts, have)
        spill = budget is not None and acts > budget
        need = layerwise_peak(
            sizes,
            samples,
            seq_len,
            dtype,
            in_host,
            spill=spill,
            eval_samples=eval_samples,
            runtime=runtime,
        )
        nonlocal layered_need
        layered_need = need.total
        line = check(model, need, have)
        how = "activations spilled to disk" if spill else "activations in memory"
        return Mode(True, f"{line}; layer by layer, {how}", budget)

    def switch(refused: JobError, why: str) -> Mode:
        if not can_switch:
            raise refused
        try:
            mode = layered()
        except JobError:
            # Both figures, so the operator sees how far even one layer at a time is.
            raise JobError(
                f"{refused}; layer by layer it needs about {gib(layered_need)}"
            ) from None
        return Mode(True, f"{why}: quantizing layer by layer ({mode.note})", mode.activation_budget)

    if requested:
        return layered()
    try:
        line = check(model, whole, have)
    except JobError as refused:
        return switch(
            refused,
            f"the whole model needs about {gib(whole.total)}, more than this worker may use",
        )
    try:
        budgets = _on_cards(model, sizes, gpus)
    except JobError as refused:
        return switch(
            refused,
            f"the whole model needs about {gib(gpu_need(sizes.bf16_bytes))} of GPU memory,"
            f" more than the GPUs have free ({gib(sum(gpus))})",
        )
    if len(budgets) > 1:
        line += f"; the whole model spread over {len(budgets)} GPUs"
    return Mode(False, line, gpu_budgets=budgets)
