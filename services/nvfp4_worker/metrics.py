"""The worker's Prometheus metrics on `/metrics` (prometheus_client).

Counters and the histogram count what this worker process ran; the queue gauges are read
from Redis at scrape time, so every worker reports the same value (the dashboard takes
their max). Each WorkerMetrics has its own registry: tests run several in one process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nvfp4_common.queue import JobQueue

log = logging.getLogger("nvfp4_worker")

# How an attempt this worker ran ended. "requeued": handed back to the queue (the job
# process was killed, the worker shut down, or the attempt was taken over).
OUTCOMES = ("succeeded", "failed", "cancelled", "requeued")
# Seconds: a tiny model on a GPU takes under a minute, a 32B model an hour or more.
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, math.inf)


class _QueueGauges(Collector):
    """Queue depth and workers, read from Redis on each scrape."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        try:
            depth = self.queue.queue_depth()
            workers = self.queue.workers()
        except redis.RedisError as e:
            # Left out rather than reported as 0: an empty queue and an unknown one differ.
            log.debug("metrics: queue gauges unavailable: %s", e)
            return
        yield GaugeMetricFamily(
            "nvfp4_queue_depth", "Jobs waiting in the queue (all workers).", value=depth
        )
        yield GaugeMetricFamily(
            "nvfp4_workers", "Workers with a recent heartbeat (all hosts).", value=len(workers)
        )
        busy = sum(1 for w in workers if w.job_id)
        yield GaugeMetricFamily("nvfp4_workers_busy", "Workers running a job (all hosts).", busy)


class WorkerMetrics:
    """Job outcomes and durations of one worker, plus the queue gauges."""

    def __init__(self, queue: JobQueue | None = None) -> None:
        self.registry = CollectorRegistry()
        self._jobs = Counter(
            "nvfp4_jobs",
            "Job attempts this worker ran, by how they ended.",
            ["state"],
            registry=self.registry,
        )
        self._durations = Histogram(
            "nvfp4_job_duration_seconds",
            "Wall time of job attempts this worker ran.",
            ["state"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # every series from 0, so rate() has a first sample
            self._jobs.labels(outcome)
            self._durations.labels(outcome)
        self._busy = Gauge(
            "nvfp4_worker_busy", "1 while this worker runs a job.", registry=self.registry
        )
        if queue is not None:
            self.registry.register(_QueueGauges(queue))

    def job_started(self) -> None:
        self._busy.set(1)

    def job_ended(self, outcome: str | None, duration_s: float) -> None:
        """Count one attempt this worker ran, `duration_s` from start to end; None (the
        job process found the job gone before it started) only marks the worker idle."""
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r}")
        self._busy.set(0)
        if outcome is not None:
            self._jobs.labels(outcome).inc()
            self._durations.labels(outcome).observe(duration_s)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def serve(metrics: WorkerMetrics, port: int, host: str = "0.0.0.0") -> WSGIServer:  # noqa: S104
    """Serve `/metrics` from a daemon thread on every interface by default (the scraper
    runs in another container). Raises OSError when the port is taken."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
