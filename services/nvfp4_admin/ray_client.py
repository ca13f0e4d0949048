"""A small client for Ray's dashboard REST API (Serve and logs) and the Serve HTTP proxy.

The CLI never starts a Ray driver: everything goes over HTTP, so it needs neither Ray nor
vLLM installed. Endpoints used (Ray 2.60, dashboard port 8265):

- GET/PUT /api/serve/applications/  Serve's state, and the declarative multi-app config
  (PUT replaces the whole set of applications: anything not listed is deleted).
- GET /api/v0/logs/file?node_id=..&filename=..&lines=N  a log file's last lines.
- GET /api/v0/logs/file?actor_id=..&suffix=out|err      an actor's stdout/stderr.
- GET /api/v0/logs/stream?...                           the same, followed.
- GET /api/ray/version                                  reachability and version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import SecretStr

from nvfp4_common.errors import Nvfp4Error

SERVE_APPS = "/api/serve/applications/"


class RayApiError(Nvfp4Error, RuntimeError):
    """Ray's dashboard answered, but not with success."""


class RayClient:
    def __init__(
        self,
        dashboard_url: str,
        serve_url: str,
        token: SecretStr | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self.dashboard_url = dashboard_url.rstrip("/")
        self.serve_url = serve_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.dashboard_url, headers=headers, timeout=timeout_s, trust_env=False
        )
        self._proxy = httpx.Client(base_url=self.serve_url, timeout=10.0, trust_env=False)

    def close(self) -> None:
        self._http.close()
        self._proxy.close()

    # --- Serve state and config -----------------------------------------------------

    def serve_details(self) -> dict[str, Any]:
        """Serve's instance details (ServeInstanceDetails as JSON); no apps if not started."""
        data = self._json(self._http.get(SERVE_APPS), "read Serve's applications")
        data.setdefault("applications", {})
        return data

    def deploy(self, config: dict[str, Any]) -> None:
        """PUT a complete multi-application config (ServeDeploySchema)."""
        self._check(self._http.put(SERVE_APPS, json=config), "deploy the Serve config")

    def version(self) -> dict[str, Any]:
        return self._json(self._http.get("/api/ray/version"), "read Ray's version")

    # --- logs -----------------------------------------------------------------------

    def log_file(self, node_id: str, filename: str, lines: int) -> str:
        # Serve reports log paths relative to Ray's log folder with a leading '/'; the
        # log API resolves a relative name under that folder but takes '/x' as absolute.
        params: dict[str, str | int] = {
            "node_id": node_id,
            "filename": filename.lstrip("/"),
            "lines": lines,
        }
        return self._text(self._http.get("/api/v0/logs/file", params=params), filename)

    def actor_log(self, actor_id: str, suffix: str, lines: int) -> str:
        params: dict[str, str | int] = {"actor_id": actor_id, "suffix": suffix, "lines": lines}
        return self._text(
            self._http.get("/api/v0/logs/file", params=params), f"actor {actor_id} {suffix}"
        )

    def follow_log(self, params: dict[str, Any]) -> Iterator[str]:
        """Stream a log as it grows (Ray's /api/v0/logs/stream), one line at a time."""
        params = {**params, "interval": 0.5}
        if "filename" in params:
            params["filename"] = str(params["filename"]).lstrip("/")
        timeout = httpx.Timeout(10.0, read=None)
        with self._http.stream("GET", "/api/v0/logs/stream", params=params, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                self._check(r, "follow the log")
            yield from r.iter_lines()

    # --- the Serve HTTP proxy -------------------------------------------------------

    def probe(self, path: str) -> tuple[int | None, str]:
        """GET a path through Serve's proxy: (status, short body), or (None, error)."""
        try:
            r = self._proxy.get(path)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        return r.status_code, r.text[:200]

    # --- helpers --------------------------------------------------------------------

    def _check(self, r: httpx.Response, what: str) -> None:
        if r.status_code == 401 or r.status_code == 403:
            raise RayApiError(
                f"Ray's dashboard at {self.dashboard_url} refused to {what}"
                f" (HTTP {r.status_code}): set NVFP4_RAY_AUTH_TOKEN to the cluster's token"
            )
        if r.status_code >= 400:
            body = " ".join(r.text.split())[:500] or r.reason_phrase
            raise RayApiError(
                f"Ray's dashboard at {self.dashboard_url} could not {what}"
                f" (HTTP {r.status_code}): {body}"
            )

    def _json(self, r: httpx.Response, what: str) -> dict[str, Any]:
        self._check(r, what)
        try:
            data = r.json()
        except ValueError:
            raise RayApiError(
                f"{self.dashboard_url} answered {what} with something that is not JSON;"
                " is NVFP4_RAY_ADDRESS the Ray dashboard (port 8265)?"
            ) from None
        if not isinstance(data, dict):
            raise RayApiError(f"unexpected answer from Ray's dashboard: {str(data)[:200]}")
        return data

    def _text(self, r: httpx.Response, what: str) -> str:
        self._check(r, f"read the log {what}")
        return r.text
