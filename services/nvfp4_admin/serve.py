"""`nvfp4ctl serve ...`: the serving app, through Ray's dashboard REST API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nvfp4_admin import serve_config as sc
from nvfp4_admin.context import AppContext, json_option, pass_app
from nvfp4_admin.output import emit_json, table
from nvfp4_admin.ray_client import RayApiError
from nvfp4_admin.rollout import Rollout, RolloutOptions
from nvfp4_common.checkpoint_files import check_folder
from nvfp4_common.jobs import JobState


@click.group()
def serve() -> None:
    """Inspect and change the serving app (Ray Serve + vLLM)."""


@serve.command()
@json_option
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Show each Serve application: route, status, replicas, health and model."""
    details = app.ray.serve_details()
    apps = details.get("applications", {})
    summary = [_app_summary(name, a) for name, a in apps.items()]
    proxies = {nid: p.get("status") for nid, p in (details.get("proxies") or {}).items()}
    if as_json:
        emit_json({"applications": summary, "proxies": proxies})
        return
    if not apps:
        click.echo(f"no Serve applications on {app.settings.ray_address}")
        return
    rows = [
        (s["name"], s["route_prefix"], s["status"], s["replicas"], s["health"], s["model"])
        for s in summary
    ]
    click.echo(table(("application", "route", "status", "replicas", "health", "model"), rows))
    for s in summary:
        if s["message"] and s["status"] != "RUNNING":
            click.echo(f"{s['name']}: {s['message'][:500]}")
    if proxies:
        healthy = sum(1 for v in proxies.values() if v == "HEALTHY")
        click.echo(f"proxies: {healthy}/{len(proxies)} healthy")


@serve.command()
@click.option("--model", "model_path", help="Checkpoint folder, as the serving replicas see it.")
@click.option("--job", "job_id", help="Serve the output of this succeeded job.")
@click.option(
    "--served-model-name", help="Name clients request (default: the checkpoint folder name)."
)
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra builder argument (repeatable; JSON values allowed).",
)
@click.option(
    "--strategy",
    type=click.Choice(["blue-green", "replace"]),
    default="blue-green",
    show_default=True,
    help="blue-green keeps serving (needs room for two models); replace has downtime.",
)
@click.option(
    "--ready-path", default="/readyz", show_default=True, help="Readiness route of the app."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    help="Seconds to wait for the new model (default: NVFP4_SERVE_READY_TIMEOUT_S).",
)
@pass_app
def deploy(
    app: AppContext,
    model_path: str | None,
    job_id: str | None,
    served_model_name: str | None,
    args: tuple[str, ...],
    strategy: str,
    ready_path: str,
    timeout_s: float | None,
) -> None:
    """Switch the served model with no downtime.

    \b
    blue-green (default):
      1. the new model starts as a second application on /_staging/<app>, next to the
         live one, which keeps serving untouched;
      2. when it is RUNNING and its /readyz answers 200 through Serve's proxy, one config
         update moves the main route to it (Ray only reconfigures its route, the loaded
         replicas stay) and removes the old application, whose replicas finish their
         in-flight requests (within its graceful_shutdown_timeout_s);
      3. if the new model fails to start, it is removed and nothing else changes.
    Both models are loaded for a while, so the machine needs memory for two. Use
    --strategy replace when it has not: the model is swapped in place and the route
    is down while it loads.

    The new application keeps the live one's builder arguments and deployment
    overrides; only the model (and its served name) change. Until the next deploy it
    also answers to the replaced model's id (its answers carry the new id), so clients
    that hold the old id, or read it just before the switch, get no 404. The config that was live
    before is remembered (in Redis) for `serve rollback`.

    On Kubernetes the RayService's serveConfigV2 (Helm value serve.modelPath) stays the
    source of truth: the next `helm upgrade` applies it again, so make a lasting switch
    there.
    """
    s = app.settings
    if bool(model_path) == bool(job_id):
        raise click.UsageError("give exactly one of --model PATH or --job ID")
    app.queue.redis.ping()  # the rollback history lives there: fail before changing anything
    if job_id:
        job = app.queue.get(job_id)
        if job.state != JobState.SUCCEEDED or job.result is None:
            raise click.ClickException(
                f"job {job_id} is {job.state.value}; only a succeeded job can be served"
            )
        model_path = job.result.output_path
    assert model_path is not None
    _refuse_damaged(model_path, args)
    extra = sc.parse_args(args)
    if served_model_name:
        extra[sc.SERVED_NAME_ARG] = served_model_name
    details = app.ray.serve_details()
    live = sc.apps_on_route(details, s.serve_route_prefix)
    template = sc.app_of(sc.current_body(details), live[0]) if live else None
    new_app = sc.app_config(
        sc.new_app_name(s.serve_app_name),
        s.serve_route_prefix,
        model_path,
        s.serve_import_path,
        template=template,
        extra_args=extra,
    )
    rollout = _rollout(app, ready_path, timeout_s)
    run = rollout.blue_green if strategy == "blue-green" else rollout.replace
    run(new_app, on_switched=app.serve_history.push)
    click.echo(f"serving {model_path} on {s.serve_url}{s.serve_route_prefix}")


@serve.command()
@click.option(
    "--ready-path", default="/readyz", show_default=True, help="Readiness route of the app."
)
@click.option("--timeout", "timeout_s", type=float, help="Seconds to wait for the old model.")
@pass_app
def rollback(app: AppContext, ready_path: str, timeout_s: float | None) -> None:
    """Serve the model that was live before the last `serve deploy` (blue-green again).

    Each rollback goes one deploy further back.
    """
    history = app.serve_history.configs()
    if not history:
        raise click.ClickException("no earlier Serve config is remembered; nothing to roll back to")
    previous = history[0]
    routed = [
        a
        for a in previous["applications"]
        if a.get("route_prefix") == app.settings.serve_route_prefix
    ]
    if not routed:
        raise click.ClickException("the remembered config served nothing on the main route")
    old = dict(routed[0])
    old["name"] = sc.new_app_name(app.settings.serve_app_name)
    _rollout(app, ready_path, timeout_s).blue_green(old, on_switched=lambda _b: None)
    app.serve_history.pop()
    click.echo(f"rolled back to {(old.get('args') or {}).get(sc.MODEL_ARG, old['name'])}")


@serve.command()
@click.option("--replicas", type=click.IntRange(1), help="A fixed number of replicas.")
@click.option("--min", "min_replicas", type=click.IntRange(0), help="Autoscaling lower bound.")
@click.option("--max", "max_replicas", type=click.IntRange(1), help="Autoscaling upper bound.")
@click.option("--app", "app_name", help="Application (default: the one on the main route).")
@click.option(
    "--deployment", help="Deployment to scale (default: the app's only one, or its model server)."
)
@pass_app
def scale(
    app: AppContext,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    app_name: str | None,
    deployment: str | None,
) -> None:
    """Set a fixed replica count, or autoscaling bounds with --min/--max.

    Replicas are added or drained and the running ones stay. The first scale of an
    application's engine makes Ray restart its replicas; it does so as a surge (the
    replacements start before the old ones stop), so it keeps serving but needs room for
    the extra replicas meanwhile.
    """
    if replicas is None and min_replicas is None and max_replicas is None:
        raise click.UsageError("give --replicas N, or --min and/or --max")
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise click.UsageError("--replicas and --min/--max exclude each other")
    details = app.ray.serve_details()
    name = app_name or _live_app(app, details)
    if name not in details["applications"]:
        raise click.ClickException(f"no Serve application named {name!r}")
    deps = list(details["applications"][name].get("deployments", {}))
    dep = deployment or _pick_deployment(name, deps)
    if dep not in deps:
        raise click.ClickException(f"{name} has no deployment {dep!r} (it has: {', '.join(deps)})")
    body = sc.current_body(details)
    new = sc.scaled_app(sc.app_of(body, name), dep, replicas, min_replicas, max_replicas)
    app.ray.deploy(sc.replace_apps(body, remove=[], add=[new]))
    what = f"{replicas} replica(s)" if replicas else f"autoscaling {min_replicas}..{max_replicas}"
    click.echo(f"{name}/{dep}: {what} requested (see `nvfp4ctl serve status`)")


@serve.command()
@click.option("--app", "app_name", help="Application (default: the one on the main route).")
@click.option("--lines", "-n", type=click.IntRange(1), default=100, show_default=True)
@click.option(
    "--kind",
    type=click.Choice(["serve", "out", "err"]),
    default="serve",
    show_default=True,
    help="serve: the replicas' Serve logs; out/err: their stdout/stderr (vLLM's own output).",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing the first replica's log (of those that have one).",
)
@pass_app
def logs(app: AppContext, app_name: str | None, lines: int, kind: str, follow: bool) -> None:
    """Print the replicas' logs through Ray's log API.

    A replica Ray has not placed yet (starting, or pending resources) has no log, and a
    just-started one may not have written it yet; both are listed with the reason.
    """
    details = app.ray.serve_details()
    name = app_name or _live_app(app, details)
    if name not in details["applications"]:
        raise click.ClickException(f"no Serve application named {name!r}")
    replicas = [
        (dep, r)
        for dep, d in details["applications"][name].get("deployments", {}).items()
        for r in d.get("replicas", [])
    ]
    if not replicas:
        raise click.ClickException(f"{name} has no replicas")
    printed = 0
    unreadable: RayApiError | None = None
    for dep, r in replicas:
        params = _log_params(r, kind)
        click.echo(f"==> {name}/{dep} replica {r.get('replica_id', r.get('actor_id'))} <==")
        if params is None:
            click.echo(f"(no log yet: the replica is {r.get('state', 'not placed')})")
            continue
        if follow:
            for line in app.ray.follow_log({**params, "lines": lines}):
                click.echo(line)
            return
        try:
            if "filename" in params:
                text = app.ray.log_file(params["node_id"], params["filename"], lines)
            else:
                text = app.ray.actor_log(params["actor_id"], kind, lines)
        except RayApiError as e:
            click.echo(f"(log not readable: {e})")
            unreadable = e
            continue
        click.echo(text, nl=False)
        printed += 1
    if not printed:
        # The same error for every replica (a refused token, say) is that error.
        if unreadable:
            raise unreadable
        raise click.ClickException(f"no replica of {name} has a log yet; try again shortly")


# --- helpers --------------------------------------------------------------------------


def _refuse_damaged(model_path: str, args: tuple[str, ...]) -> None:
    """Refuse a checkpoint that build_app would refuse, before the live config changes.

    Only a folder this machine can see is checked: --model is the path as the replicas see
    it, which may be another machine's volume.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return
    engine = sc.parse_args(args).get("engine_kwargs")
    own_tokenizer = isinstance(engine, dict) and bool(engine.get("tokenizer"))
    check_folder(folder, tokenizer=not own_tokenizer)


def _rollout(app: AppContext, ready_path: str, timeout_s: float | None) -> Rollout:
    s = app.settings
    opts = RolloutOptions(
        route_prefix=s.serve_route_prefix,
        ready_path=ready_path,
        timeout_s=timeout_s or s.serve_ready_timeout_s,
    )
    return Rollout(app.ray, opts, say=lambda m: click.echo(m, err=True))


def _live_app(app: AppContext, details: dict[str, Any]) -> str:
    live = sc.apps_on_route(details, app.settings.serve_route_prefix)
    if not live:
        raise click.ClickException(
            f"no Serve application on {app.settings.serve_route_prefix}; name one with --app"
        )
    return live[0]


def _pick_deployment(app_name: str, deployments: list[str]) -> str:
    if len(deployments) == 1:
        return deployments[0]
    # Ray Serve LLM apps have an OpenAI ingress plus the engine deployment; scale the engine.
    engines = [d for d in deployments if "ingress" not in d.lower() and "router" not in d.lower()]
    if len(engines) == 1:
        return engines[0]
    raise click.ClickException(
        f"{app_name} has several deployments ({', '.join(deployments)});"
        " choose one with --deployment"
    )


def _log_params(replica: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """Where Ray keeps this replica's log; None before Ray has placed it."""
    if kind == "serve" and replica.get("log_file_path") and replica.get("node_id"):
        return {"node_id": replica["node_id"], "filename": replica["log_file_path"]}
    if replica.get("actor_id"):
        return {"actor_id": replica["actor_id"], "suffix": "err" if kind == "serve" else kind}
    return None


def _app_summary(name: str, a: dict[str, Any]) -> dict[str, Any]:
    deps = a.get("deployments", {}) or {}
    running = sum(
        1 for d in deps.values() for r in d.get("replicas", []) if r.get("state") == "RUNNING"
    )
    target = sum(int(d.get("target_num_replicas", 0) or 0) for d in deps.values())
    health = sorted({str(d.get("status")) for d in deps.values()})
    return {
        "name": name,
        "route_prefix": a.get("route_prefix"),
        "status": a.get("status"),
        "replicas": f"{running}/{target}",
        "health": ",".join(health) or "-",
        "model": sc.model_of(a),
        "message": a.get("message", ""),
        "deployments": {
            dn: {
                "status": d.get("status"),
                "target_num_replicas": d.get("target_num_replicas"),
                "replica_states": [r.get("state") for r in d.get("replicas", [])],
            }
            for dn, d in deps.items()
        },
    }
