"""The benchmark cluster's HAProxy maxconn stays within the open-file limit: HAProxy 2.8
needs about 2.5 descriptors a connection plus 36, a few more a backend server, and exits
at start below that (Ray 2.58 asks for 20,000 connections, 50,036 descriptors)."""

from __future__ import annotations

import resource

import pytest

from devkit import serve_cluster


@pytest.mark.parametrize(
    ("hard", "maxconn"),
    [(20_000, 7_585), (65_536, 20_000), (1_024, 374), (resource.RLIM_INFINITY, 20_000)],
)
def test_maxconn_fits_the_hard_limit(
    monkeypatch: pytest.MonkeyPatch, hard: int, maxconn: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (min(hard, 1024), hard))
    assert serve_cluster.haproxy_maxconn() == maxconn
    if hard != resource.RLIM_INFINITY:
        assert 2.5 * maxconn + 36 <= 0.95 * hard  # room left for the backend servers
