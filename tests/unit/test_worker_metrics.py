"""The worker's Prometheus endpoint, and the dashboard querying only metrics that exist."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nvfp4_common.jobs import JobState
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings, get_settings
from nvfp4_worker import main as worker_main
from nvfp4_worker.main import Worker
from nvfp4_worker.metrics import WorkerMetrics, serve
from tests.conftest import free_port
from tests.worker_harness import Workers, spec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "observability" / "grafana" / "dashboards" / "nvfp4-stack.json"
PROMETHEUS = ROOT / "deploy" / "observability" / "prometheus.yml"
# Who exports what the dashboard may query: Ray Serve, vLLM through Ray Serve LLM, and
# our worker.
KNOWN_PREFIXES = ("ray_serve_", "ray_vllm_", "nvfp4_")


def samples(text: str) -> dict[str, float]:
    """`name{labels}` (labels sorted) -> value, read with Prometheus' own Python parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_endpoint_after_a_recorded_job(
    job_settings: Settings, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job process reads its settings from the environment, as under a real worker.
    for name, value in Workers(job_settings).env().items():
        if name.startswith(("NVFP4_", "HF_")):
            monkeypatch.setenv(name, value)
    q = JobQueue(job_settings)
    job = q.submit(spec(tiny_model, tiny_model.parent / "missing.txt"))  # fails at once
    queued = q.submit(spec(tiny_model, tiny_model.parent / "missing.txt"))
    q.cancel(queued.id)  # ends without running: not one of this worker's attempts

    worker = Worker(job_settings)
    port = free_port()
    server = serve(worker.metrics, port, host="127.0.0.1")
    try:
        worker.run(burst=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            content_type = r.headers["Content-Type"]
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    assert q.get(job.id).state == JobState.FAILED
    assert content_type.startswith("text/plain; version=")  # Prometheus' text format
    got = samples(text)
    assert got['nvfp4_jobs_total{state="failed"}'] == 1
    assert got['nvfp4_jobs_total{state="succeeded"}'] == 0
    assert got['nvfp4_job_duration_seconds_count{state="failed"}'] == 1
    assert got['nvfp4_job_duration_seconds_bucket{le="+Inf",state="failed"}'] == 1
    assert 0 < got['nvfp4_job_duration_seconds_sum{state="failed"}'] < 300
    assert got["nvfp4_worker_busy"] == 0
    assert got["nvfp4_queue_depth"] == 0
    assert got["nvfp4_workers"] == 0  # the burst worker signed off
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"nvfp4_jobs", "nvfp4_job_duration_seconds", "nvfp4_queue_depth"} <= families


def test_queue_gauges_follow_the_queue_and_vanish_without_redis(
    queue: JobQueue, settings: Settings, tiny_model: Path
) -> None:
    metrics = WorkerMetrics(queue)
    for _ in range(3):
        queue.submit(spec(tiny_model, tiny_model))
    queue.beat_worker("w-1", "host", 1, "some-job")
    got = samples(metrics.render())
    assert got["nvfp4_queue_depth"] == 3
    assert got["nvfp4_workers"] == 1 and got["nvfp4_workers_busy"] == 1
    # Redis unreachable: the counters are still served, the queue gauges are left out.
    gone = JobQueue(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}"}))
    text = WorkerMetrics(gone).render()
    assert "nvfp4_jobs_total" in text and "nvfp4_queue_depth" not in text


def test_a_taken_port_leaves_the_worker_running(
    job_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen(1)
        monkeypatch.setenv("NVFP4_REDIS_URL", job_settings.redis_url)
        monkeypatch.setenv("NVFP4_MODELS_DIR", str(job_settings.models_dir))
        monkeypatch.setenv("NVFP4_WORKER_METRICS_PORT", str(taken.getsockname()[1]))
        get_settings.cache_clear()
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        try:
            with caplog.at_level(logging.WARNING, logger="nvfp4_worker"):
                assert worker_main.main(["--burst"]) == 0
        finally:
            signal.signal(signal.SIGTERM, handlers[0])
            signal.signal(signal.SIGINT, handlers[1])
            get_settings.cache_clear()
    assert "metrics endpoint not started" in caplog.text


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or label values."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return set(words) - {"and", "or", "unless", "bool", "offset"}


def test_promql_metric_names_parser() -> None:
    expr = 'histogram_quantile(0.5, sum by (le) (rate(a_b_bucket{state="x"}[1h]))) / max(c)'
    assert promql_metric_names(expr) == {"a_b_bucket", "c"}


def test_dashboard_queries_only_metrics_that_are_exported(queue: JobQueue) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used, "no metric found in the dashboard"
    unknown = sorted(n for n in used if not n.startswith(KNOWN_PREFIXES))
    assert not unknown, f"no scraped service exports {unknown}"
    # Ours must be names the worker really writes (gauges included: queue reachable).
    ours = set(samples(WorkerMetrics(queue).render()))
    exported = {re.sub(r"\{.*", "", s) for s in ours}
    missing = sorted(n for n in used if n.startswith("nvfp4_") and n not in exported)
    assert not missing, f"the worker does not export {missing}"
    assert {"nvfp4_job_duration_seconds_bucket", "nvfp4_queue_depth"} <= used


def test_prometheus_scrapes_the_worker_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker = jobs["worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"]  # the compose service
    default = Settings.model_fields["worker_metrics_port"].default
    assert worker["port"] == default == 9400
