"""A real build of the admin image with podman, then `nvfp4ctl --help` inside it.

No registry is reachable here, so scripts/build-admin-image.sh builds the Dockerfile
unchanged from a local Debian bookworm base (debootstrap, cached under .data/) instead of
python:3.11-slim: the base is the Dockerfile's BASE_IMAGE build argument. pip inside the
build reaches PyPI. Minutes on the first run (debootstrap), about one to two after.
The script leaves a record of the build in bench/results/admin-image.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/nvfp4-admin:test"
RECORD = ROOT / "bench" / "results" / "admin-image.json"
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none"]
RUN += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def built() -> subprocess.CompletedProcess[str]:
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {' '.join(missing)} (apt-get install podman runc debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap and rootful podman)")
    start = time.monotonic()
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-admin-image.sh")],
        cwd=ROOT,
        env={**os.environ, "NVFP4_IMAGE_TAG": TAG, "NVFP4_IMAGE_RECORD": str(RECORD)},
        capture_output=True,
        text=True,
    )
    print(f"build-admin-image.sh: {time.monotonic() - start:.0f} s")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_nvfp4ctl_help_runs_in_the_image(built: subprocess.CompletedProcess[str]) -> None:
    # The script's last step is `podman run IMAGE --help` (the image's entrypoint).
    assert "Usage: nvfp4ctl" in built.stdout


def test_runs_as_uid_1000_without_build_leftovers(built: subprocess.CompletedProcess[str]) -> None:
    # docker and kubernetes: the clients `nvfp4ctl workers scale` drives.
    script = (
        "id -u; test ! -e /src && test ! -e /run/secrets/pip_ca"
        " && python3 -c 'import docker, kubernetes' && echo clean"
    )
    out = subprocess.run(
        [*RUN, "--entrypoint", "sh", TAG, "-c", script], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "clean"]


def test_no_layer_holds_the_proxy_ca_or_an_env_file(
    built: subprocess.CompletedProcess[str],
) -> None:
    """The CA bundle was a build secret; .env and secrets/ are outside the context."""
    script = "find / -xdev \\( -name pip_ca -o -name .env -o -name api_keys \\) -print"
    out = subprocess.run(
        [*RUN, "--user", "0", "--entrypoint", "sh", TAG, "-c", script],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_build_is_recorded(built: subprocess.CompletedProcess[str]) -> None:
    """The record names this revision and the image just built, as podman sees it."""
    record = json.loads(RECORD.read_text())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert record["revision"] == head
    inspect = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}} {{.Size}}", TAG],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [record["image_id"], str(record["size_bytes"])] == inspect
    assert record["build_seconds"] >= 0 and record["base"].startswith("localhost/")
    assert record["help_head"][0].startswith("Usage: nvfp4ctl")
