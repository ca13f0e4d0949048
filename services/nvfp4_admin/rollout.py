"""Zero-downtime model switches on Ray Serve, driven through the dashboard REST API.

Blue-green (the default):
  1. PUT the current config plus the new model as a second application on a staging
     route (/_staging/<app>). The live application is passed back exactly as Ray
     reported it: even a "lightweight" deployment override restarts an engine
     deployment's replicas the first time it is applied (seen with Ray 2.60 and Ray Serve
     LLM), so the live application is never edited here.
  2. Wait until the new application is RUNNING and its /readyz answers 200 through
     Serve's HTTP proxy, i.e. the model is loaded and can generate.
  3. PUT the final config: the new application on the main route, the old one left out.
     The new application also answers to the old model's id (`model_aliases`), so a
     client that read that id from /v1/models just before the switch gets no 404.
     Ray keeps the new application's replicas (only its route_prefix changed, which Ray
     applies by reconfiguring, not restarting, replicas) and removes the old application,
     whose replicas finish in-flight requests within their graceful_shutdown_timeout_s.
  If step 1 or 2 fails, the config from before is PUT back, which removes the staging
  application; the live model was never touched. The cost: for a while both models are
  loaded, so the machine needs room for two.

Replace: update the live application's builder args in place. Ray restarts its replicas
with the new model, so the route serves errors while the new model loads. For machines
that cannot hold two models at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvfp4_admin import serve_config as sc
from nvfp4_admin.ray_client import RayClient
from nvfp4_common.errors import Nvfp4Error


class RolloutError(Nvfp4Error, RuntimeError):
    """The new model did not become ready; the message says what Ray reported."""


@dataclass
class RolloutOptions:
    route_prefix: str = "/"
    ready_path: str = "/readyz"
    timeout_s: float = 1800.0
    poll_s: float = 2.0


def route_path(route_prefix: str, path: str) -> str:
    return route_prefix.rstrip("/") + "/" + path.lstrip("/")


class Rollout:
    def __init__(
        self, ray: RayClient, options: RolloutOptions, say: Callable[[str], None] = print
    ) -> None:
        self.ray = ray
        self.opts = options
        self.say = say

    def _current(self, new_app: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """The Serve config now, the apps on the main route, and `new_app` answering to
        their model names too (clients keep the names they know)."""
        details = self.ray.serve_details()
        before = sc.current_body(details)
        live = sc.apps_on_route(details, self.opts.route_prefix)
        # By builder args, or by Ray's status when the replica's settings name the model.
        ids = [sc.served_name(sc.app_of(before, n)) or "" for n in live]
        ids += [i for n in live for i in sc.live_model_ids(details, n)]
        return before, live, sc.with_aliases(new_app, ids)

    def blue_green(
        self, new_app: dict[str, Any], on_switched: Callable[[dict[str, Any]], None]
    ) -> None:
        """Stage `new_app`, wait until it is ready, then move the main route to it."""
        before, live, new_app = self._current(new_app)
        name = new_app["name"]
        staged = {**new_app, "route_prefix": sc.staging_route(name)}
        stage_body = sc.replace_apps(before, remove=[], add=[staged])
        self.say(f"staging {name} on {staged['route_prefix']} (live: {', '.join(live) or 'none'})")
        self.ray.deploy(stage_body)
        try:
            deadline = time.monotonic() + self.opts.timeout_s
            self.wait_running(name, deadline)
            self.wait_ready(staged["route_prefix"], deadline)
        except BaseException as e:
            self.say(f"{name} did not become ready; removing it, the live model is unchanged")
            try:
                self.ray.deploy(before)
            except Exception as restore_error:  # report both: the user must clean up
                raise RolloutError(
                    f"{e}; also failed to remove the staging application {name}: {restore_error}"
                ) from e
            raise
        final = {**new_app, "route_prefix": self.opts.route_prefix}
        switch_body = sc.replace_apps(before, remove=live, add=[final])
        self.say(f"switching {self.opts.route_prefix} to {name}")
        self.ray.deploy(switch_body)
        on_switched(before)
        deadline = time.monotonic() + max(self.opts.timeout_s, 60.0)
        self.wait_route(name, deadline)
        self.wait_ready(self.opts.route_prefix, deadline)
        if live:
            self.say(f"{', '.join(live)} removed after its in-flight requests finish")

    def replace(
        self, new_app: dict[str, Any], on_switched: Callable[[dict[str, Any]], None]
    ) -> None:
        """Swap the model of the live application in place (downtime while it loads)."""
        before, live, new_app = self._current(new_app)
        target = {**new_app, "route_prefix": self.opts.route_prefix}
        if live:
            target["name"] = live[0]
        body = sc.replace_apps(before, remove=live, add=[target])
        self.say(
            f"updating {target['name']} in place; {self.opts.route_prefix} is down while"
            " the new model loads"
        )
        self.ray.deploy(body)
        on_switched(before)
        deadline = time.monotonic() + self.opts.timeout_s
        # Ray needs a moment to notice the new config; RUNNING from before the PUT is stale.
        time.sleep(min(self.opts.poll_s, 2.0))
        self.wait_running(target["name"], deadline)
        self.wait_ready(self.opts.route_prefix, deadline)

    # --- waiting ----------------------------------------------------------------------

    def wait_running(self, name: str, deadline: float) -> None:
        last = ""
        while True:
            app = self.ray.serve_details()["applications"].get(name)
            status = app.get("status", "?") if app else "NOT_STARTED"
            message = (app or {}).get("message", "")
            if status == "RUNNING":
                self.say(f"{name} is RUNNING")
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RolloutError(f"Serve application {name} is {status}: {message[:1000]}")
            if status != last:
                self.say(f"{name}: {status} {message[:200]}".rstrip())
                last = status
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"Serve application {name} is still {status} after {self.opts.timeout_s:.0f} s"
                )
            time.sleep(self.opts.poll_s)

    def wait_ready(self, route_prefix: str, deadline: float) -> None:
        path = route_path(route_prefix, self.opts.ready_path)
        last: tuple[int | None, str] = (None, "")
        while True:
            code, body = self.ray.probe(path)
            if code == 200:
                self.say(f"{path} is ready")
                return
            last = (code, body)
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"{self.ray.serve_url}{path} did not answer 200 in time (last: {last[0]}"
                    f" {last[1][:200]})"
                )
            time.sleep(self.opts.poll_s)

    def wait_route(self, name: str, deadline: float) -> None:
        while True:
            app = self.ray.serve_details()["applications"].get(name) or {}
            if app.get("route_prefix") == self.opts.route_prefix and app.get("status") == "RUNNING":
                return
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"{name} did not move to {self.opts.route_prefix} in time; check"
                    " `nvfp4ctl serve status` and `nvfp4ctl serve rollback`"
                )
            time.sleep(self.opts.poll_s)
