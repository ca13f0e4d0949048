"""Building Ray Serve multi-application configs (pure functions, no I/O).

Ray's PUT /api/serve/applications/ is declarative: the body lists every application and
anything missing is deleted. So every change starts from the config Ray reports as
deployed (each application's `deployed_app_config`) and edits a copy. Applications we do
not touch are passed back exactly as Ray reported them, which Ray treats as "no change"
(their code version, a hash of import_path, runtime_env and args, stays the same), so
their replicas keep running.
"""

from __future__ import annotations

import copy
import json
import secrets
from typing import Any

# Builder arguments of nvfp4_serve.app:build_app, named by its one model (ServeArgs).
from nvfp4_common.errors import Nvfp4Error
from nvfp4_common.serving import (
    ALIASES_ARG,
    AUTOSCALING_ARG,
    AUTOSCALING_KEYS,
    MODEL_ARG,
    NUM_REPLICAS_ARG,
    SERVED_NAME_ARG,
)
from nvfp4_common.serving import served_name as served_name_of

# Where a new application waits, reachable through the proxy, before it takes traffic.
STAGING_ROOT = "/_staging"
# Extra replicas Ray may start during a rolling restart (Ray >= 2.60; older Rays ignore
# the field): 100 = a full set of replacements before any old replica stops.
SURGE_PERCENT = 100
# Instance-level keys of Ray's details that are also valid in a deploy body.
_CARRIED_KEYS = ("proxy_location", "http_options", "grpc_options", "target_capacity")


class ServeConfigError(Nvfp4Error, ValueError):
    """The current Serve state cannot be turned into the requested config."""


def current_body(details: dict[str, Any]) -> dict[str, Any]:
    """The deploy body (ServeDeploySchema) that reproduces what is running now."""
    apps = []
    for name, app in details.get("applications", {}).items():
        if app.get("status") == "DELETING":
            # A replaced application still draining its replicas: Ray has dropped its
            # config already, and a body that named it would bring it back.
            continue
        cfg = app.get("deployed_app_config")
        if not cfg:
            raise ServeConfigError(
                f"Serve application {name!r} was deployed from Python (serve.run), not from a"
                " config, so it cannot be updated over the REST API; redeploy it with"
                " `serve deploy CONFIG` or `nvfp4ctl serve deploy` first"
            )
        apps.append(copy.deepcopy(cfg))
    body: dict[str, Any] = {
        k: copy.deepcopy(details[k]) for k in _CARRIED_KEYS if details.get(k) is not None
    }
    body["applications"] = apps
    return body


def apps_on_route(details: dict[str, Any], route_prefix: str) -> list[str]:
    """Names of applications serving `route_prefix` (normally zero or one)."""
    return [
        name
        for name, app in details.get("applications", {}).items()
        if app.get("route_prefix") == route_prefix and app.get("status") != "DELETING"
    ]


def new_app_name(base: str) -> str:
    """A fresh application name: renaming is how Ray tells old and new apart."""
    return f"{base}-{secrets.token_hex(3)}"


def staging_route(app_name: str) -> str:
    return f"{STAGING_ROOT}/{app_name}"


def parse_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """KEY=VALUE builder arguments; a VALUE that parses as JSON is taken as JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ServeConfigError(f"--arg {pair!r} must look like KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def app_config(
    name: str,
    route_prefix: str,
    model_path: str,
    import_path: str,
    template: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An application config for `model_path`.

    With a template (the live application's config) the new app keeps its builder,
    runtime_env, other builder args and deployment overrides (replicas, autoscaling), so a
    deploy changes the model and nothing else.
    """
    cfg: dict[str, Any] = copy.deepcopy(template) if template else {"import_path": import_path}
    cfg["name"] = name
    cfg["route_prefix"] = route_prefix
    args = dict(cfg.get("args") or {})
    if args.get(MODEL_ARG) != model_path:
        # The old name belonged to the old checkpoint; the builder derives one from the
        # folder unless the caller passes a stable name explicitly.
        args.pop(SERVED_NAME_ARG, None)
        if cfg.get("deployments"):
            cfg["deployments"] = _carry_engine_overrides(cfg["deployments"], args)
    args.update(extra_args or {})
    args[MODEL_ARG] = model_path
    cfg["args"] = args
    return cfg


def _carry_engine_overrides(deployments: list[dict[str, Any]], args: dict[str, Any]) -> list:
    """Deployment overrides that still apply once the model changes.

    Ray Serve LLM names the engine deployment after the model ("LLMServer:<model id>"),
    so an override of the old engine would name a deployment the new app lacks and fail
    its deploy. Its replica settings move into the builder's own arguments instead.
    """
    kept = []
    for dep in deployments:
        if ":" not in dep.get("name", ""):
            kept.append(dep)
            continue
        if isinstance(dep.get("num_replicas"), int):
            args[NUM_REPLICAS_ARG] = dep["num_replicas"]
            args.pop(AUTOSCALING_ARG, None)
        auto = dep.get("autoscaling_config")
        if isinstance(auto, dict):
            args[AUTOSCALING_ARG] = {k: auto[k] for k in AUTOSCALING_KEYS if k in auto}
    return kept


def replace_apps(
    body: dict[str, Any], remove: list[str], add: list[dict[str, Any]]
) -> dict[str, Any]:
    """A copy of `body` without the named apps and with `add` appended (or swapped in)."""
    out = copy.deepcopy(body)
    adding = {a["name"] for a in add}
    out["applications"] = [
        a for a in out["applications"] if a["name"] not in remove and a["name"] not in adding
    ] + copy.deepcopy(add)
    routes = [a.get("route_prefix", "/") for a in out["applications"]]
    dupes = sorted({r for r in routes if r is not None and routes.count(r) > 1})
    if dupes:
        raise ServeConfigError(f"two applications would share the route {dupes[0]!r}")
    return out


def scaled_app(
    app: dict[str, Any],
    deployment: str,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> dict[str, Any]:
    """The app config with a deployment's replica count or autoscaling bounds changed.

    Ray applies both as lightweight updates (replicas are added or drained), except that
    the first override of an engine deployment restarts its replicas (seen with Ray 2.60
    and Ray Serve LLM). `max_surge_percent: 100` makes that restart a surge: replacements
    start before the old replicas stop, so the deployment keeps serving. A fixed count and
    autoscaling exclude each other, so setting one clears the other.
    """
    out = copy.deepcopy(app)
    overrides = {d["name"]: d for d in out.get("deployments", [])}
    dep = overrides.setdefault(deployment, {"name": deployment})
    dep["max_surge_percent"] = SURGE_PERCENT
    if replicas is not None:
        if replicas < 1:
            raise ServeConfigError("--replicas must be at least 1")
        dep["num_replicas"] = replicas
        dep.pop("autoscaling_config", None)
    else:
        auto = dict(dep.get("autoscaling_config") or {})
        if min_replicas is not None:
            auto["min_replicas"] = min_replicas
        if max_replicas is not None:
            auto["max_replicas"] = max_replicas
        lo, hi = auto.get("min_replicas", 1), auto.get("max_replicas", 1)
        if lo < 0 or hi < 1 or lo > hi:
            raise ServeConfigError(f"autoscaling needs 0 <= min ({lo}) <= max ({hi}), max >= 1")
        dep["autoscaling_config"] = auto
        dep.pop("num_replicas", None)
    out["deployments"] = list(overrides.values())
    return out


def served_name(app: dict[str, Any]) -> str | None:
    """The model id clients send to an application config (build_app's rule); None when
    its builder args name no model."""
    args = app.get("args") or {}
    name = args.get(SERVED_NAME_ARG)
    if name:
        return str(name)
    model = args.get(MODEL_ARG)
    return served_name_of(str(model), None) if model else None


def live_model_ids(details: dict[str, Any], app_name: str) -> list[str]:
    """The model ids a running application answers to, read from Ray's status.

    Ray Serve LLM names each engine deployment "LLMServer:<model id>". This is the only
    place the id is known when the replica's settings (NVFP4_SERVE_MODEL, as in compose),
    not the builder args, name the model.
    """
    deployments = (details.get("applications", {}).get(app_name) or {}).get("deployments") or {}
    return sorted(d.split(":", 1)[1] for d in deployments if d.startswith("LLMServer:"))


def with_aliases(app: dict[str, Any], replaced: list[str]) -> dict[str, Any]:
    """`app` also answering to the model ids it replaces (`replaced`).

    A client that read the old id from /v1/models just before the route moved sends it to
    the new application; without the alias that request would get a 404. The aliases last
    until the next deploy, which replaces them with the ids of the app it replaces.
    """
    own = served_name(app)
    names = sorted({n for n in replaced if n and n != own})
    out = copy.deepcopy(app)
    out["args"] = {**(out.get("args") or {}), ALIASES_ARG: names}
    return out


def model_of(app: dict[str, Any]) -> str | None:
    cfg = app.get("deployed_app_config") or {}
    value = (cfg.get("args") or {}).get(MODEL_ARG)
    return None if value is None else str(value)


def app_of(body: dict[str, Any], name: str) -> dict[str, Any]:
    for app in body["applications"]:
        if app["name"] == name:
            return app
    raise ServeConfigError(f"no Serve application named {name!r}")
