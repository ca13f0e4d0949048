"""`nvfp4ctl workers ...`: see the quantization workers and change how many run."""

from __future__ import annotations

import click

from nvfp4_admin.context import AppContext, json_option, pass_app
from nvfp4_admin.output import emit_json, human_age, table
from nvfp4_admin.scaler import scale_compose, scale_kubernetes, worker_deployment_name


@click.group()
def workers() -> None:
    """List and scale quantization workers."""


@workers.command("list")
@json_option
@pass_app
def list_workers(app: AppContext, as_json: bool) -> None:
    """Workers that sent a heartbeat recently, with the job each is running."""
    found = app.queue.workers()
    timeout = app.settings.heartbeat_timeout_s
    if as_json:
        emit_json(
            [
                {**w.__dict__, "alive": w.heartbeat_age_s <= timeout}
                for w in sorted(found, key=lambda w: w.id)
            ]
        )
        return
    rows = [
        (
            w.id,
            w.host,
            w.pid,
            w.job_id or "idle",
            human_age(w.heartbeat_age_s),
            "alive" if w.heartbeat_age_s <= timeout else "silent",
        )
        for w in sorted(found, key=lambda w: w.id)
    ]
    click.echo(
        table(("worker", "host", "pid", "job", "heartbeat", "state"), rows, empty="no workers")
    )
    depth = app.queue.queue_depth()
    click.echo(f"queued jobs: {depth}")


@workers.command()
@click.argument("replicas", type=click.IntRange(0))
@click.option(
    "--mode",
    type=click.Choice(["compose", "kubernetes"]),
    help="Where the stack runs (default: NVFP4_WORKERS_MODE).",
)
@click.option(
    "--deployment",
    help="Kubernetes worker Deployment (default: <NVFP4_HELM_RELEASE>-nvfp4-stack-worker).",
)
@click.option(
    "--stop-timeout",
    type=click.IntRange(0),
    default=120,
    show_default=True,
    help="Compose: seconds a stopped worker gets to re-queue its job before SIGKILL.",
)
@pass_app
def scale(
    app: AppContext, replicas: int, mode: str | None, deployment: str | None, stop_timeout: int
) -> None:
    """Run REPLICAS workers: the compose `worker` service or the Helm worker Deployment.

    Workers being removed get SIGTERM and re-queue the job they were running.
    """
    s = app.settings
    if (mode or s.workers_mode) == "kubernetes":
        name = deployment or worker_deployment_name(s.helm_release)
        result = scale_kubernetes(s.k8s_namespace, name, replicas)
    else:
        result = scale_compose(
            s.compose_project, s.worker_service, replicas, stop_timeout, s.compose_max_workers
        )
    click.echo(f"{result.target}: {result.before} -> {result.after} worker(s)")
