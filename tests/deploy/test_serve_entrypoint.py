"""The serve image's entrypoint against the installed Ray (.venv-serve): the Serve config it
writes is valid for Ray's deploy API, and every CLI flag it uses exists.

The entrypoint itself is not started here: it runs `ray start --head` and, on stop,
`ray stop`, which would stop every Ray on a shared host (and needs a GPU image to matter).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "services" / "nvfp4_serve" / "entrypoint.sh"
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]

# Runs in .venv-serve: validate the config with Ray's own schema and look up the flags.
_CHECK = """
import json, sys
import click, yaml
from ray.serve.schema import ServeDeploySchema
from ray.serve.scripts import cli as serve_cli
from ray.scripts.scripts import cli as ray_cli

config = ServeDeploySchema.model_validate(yaml.safe_load(sys.stdin.read()))
def flags(group, name):
    return sorted(o for p in group.commands[name].params for o in p.opts)
print(json.dumps({
    "app": [(a.name, a.route_prefix, a.import_path, a.args) for a in config.applications],
    "http": [config.http_options.host, config.http_options.port],
    "flags": {
        "ray start": flags(ray_cli, "start"),
        "ray health-check": flags(ray_cli, "health-check"),
        "serve deploy": flags(serve_cli, "deploy"),
        "serve start": flags(serve_cli, "start"),
        "serve shutdown": flags(serve_cli, "shutdown"),
    },
}))
"""


@pytest.fixture(scope="module")
def checked() -> dict[str, object]:
    if not SERVE_PYTHON.exists():
        pytest.skip("needs .venv-serve (make install-serve)")
    heredoc = re.search(r"<<EOF\n(.*?)\nEOF\n", ENTRYPOINT.read_text(), re.DOTALL)
    assert heredoc, "no Serve config heredoc in the entrypoint"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    config = subprocess.run(
        ["bash", "-c", f"cat <<EOF\n{heredoc.group(1)}\nEOF"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", _CHECK],
        input=config,
        env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_deploys_build_app_on_the_root_route(checked: dict[str, object]) -> None:
    assert checked["app"] == [["nvfp4", "/", "nvfp4_serve.app:build_app", {}]]
    assert checked["http"] == ["0.0.0.0", 8000]


def test_every_flag_the_entrypoint_uses_exists(checked: dict[str, object]) -> None:
    flags: dict[str, list[str]] = checked["flags"]  # type: ignore[assignment]
    text = ENTRYPOINT.read_text()
    for command, known in flags.items():
        pattern = rf"^\s*(?:while\s+)?{command}\b(.*?)(?<!\\)$"
        calls = re.findall(pattern, text, re.MULTILINE | re.DOTALL)
        assert calls, f"the entrypoint no longer calls {command}"
        for call in calls:
            for flag in re.findall(r"(--[a-z-]+|-y)\b", call):
                assert flag in known, f"{command} has no {flag}"
    for flag in ("--metrics-export-port", "--dashboard-host", "--object-store-memory"):
        assert flag in flags["ray start"]
