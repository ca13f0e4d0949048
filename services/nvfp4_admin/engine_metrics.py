"""What a vLLM engine's Prometheus metrics say about memory: KV cache capacity and dtype.

A plain vLLM server exports `vllm:<name>` on its own /metrics. Under Ray Serve LLM the
same metrics go through Ray's metrics agent (the `--metrics-export-port`, 8080 here), which
allows only `[a-zA-Z0-9_]` in names and prefixes `ray_`: `ray_vllm_<name>`, with Ray's own
labels (WorkerId, ReplicaId, ...) added. That port carries every replica of every model,
so the engines of one model are picked by the `model_name` label of their other series.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx

from nvfp4_common.errors import Nvfp4Error

_PREFIXES = ("vllm:", "ray_vllm_")
# Labels that tell one engine's series from another's, as vLLM and Ray set them.
_ENGINE_LABELS = ("WorkerId", "ReplicaId", "engine")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class MetricsError(Nvfp4Error, RuntimeError):
    """The metrics URL did not answer with Prometheus text."""


def metrics_endpoint(url: str) -> str:
    """`http://host:8080` means its /metrics; a URL with a path is taken as it is."""
    url = url.rstrip("/")
    return url if "/" in url.split("://", 1)[-1] else url + "/metrics"


def fetch(url: str, timeout_s: float = 10.0) -> str:
    """The Prometheus text at `url`, or MetricsError with one line saying why not."""
    url = metrics_endpoint(url)
    try:
        r = httpx.get(url, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise MetricsError(f"cannot read metrics at {url}: {e or type(e).__name__}") from None
    if r.status_code != 200:
        raise MetricsError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    return r.text


def parse(text: str, model: str | None = None) -> dict[str, Any]:
    """KV cache capacity (tokens per engine), its dtype and the server's RSS; {} if absent.

    With `model`, only the engines whose series name that model count (when any series
    names a model at all). The RSS is read only from vLLM's own /metrics: on Ray's port
    `process_resident_memory_bytes` is the metrics agent's, not the engine's.
    """
    caches: dict[tuple[str, ...], dict[str, str]] = {}
    models: dict[tuple[str, ...], str] = {}
    rss: float | None = None
    plain = False
    for name, labels, value in _samples(text):
        if name == "process_resident_memory_bytes":
            rss = value
            continue
        short = next((name[len(p) :] for p in _PREFIXES if name.startswith(p)), None)
        if short is None:
            continue
        plain = plain or name.startswith("vllm:")
        engine = tuple(labels.get(k, "") for k in _ENGINE_LABELS)
        if short == "cache_config_info":
            caches[engine] = labels
        elif "model_name" in labels:
            models.setdefault(engine, labels["model_name"])
    out: dict[str, Any] = {}
    if plain and rss is not None:
        out["server_rss_bytes"] = int(rss)
    chosen = [
        c
        for engine, c in caches.items()
        if model is None or not models or models.get(engine) == model
    ]
    if not chosen:
        return out
    out["engines"] = len(chosen)
    tokens = {_kv_tokens(c) for c in chosen}
    # Replicas of one model get the same capacity; if they differ, no single number is right.
    out["kv_cache_tokens"] = tokens.pop() if len(tokens) == 1 else None
    out["kv_cache_dtype"] = chosen[0].get("cache_dtype")
    util = chosen[0].get("gpu_memory_utilization")
    if util and util != "None":
        out["gpu_memory_utilization"] = float(util)
    return out


def _kv_tokens(cache: dict[str, str]) -> int | None:
    # kv_cache_size_tokens is vLLM's own count (right for hybrid models too); older
    # vLLMs export only blocks and block size. Unset values are exported as "None".
    if cache.get("kv_cache_size_tokens", "None").isdigit():
        return int(cache["kv_cache_size_tokens"])
    blocks, size = cache.get("num_gpu_blocks", ""), cache.get("block_size", "")
    return int(blocks) * int(size) if blocks.isdigit() and size.isdigit() else None


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of the Prometheus text format."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            body, _, tail = rest.rpartition("}")
            labels = {
                k: re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], v)
                for k, v in _LABEL.findall(body)
            }
        else:
            name, _, tail = line.partition(" ")
            labels = {}
        try:
            value = float(tail.split()[0])
        except (IndexError, ValueError):
            continue
        yield name.strip(), labels, value
