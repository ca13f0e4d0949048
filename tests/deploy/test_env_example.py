""".env.example: every setting, with its default, and every variable the compose file uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nvfp4_common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / ".env.example"
# `NAME=value` lines, active or commented out ("# NAME=value").
LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
# Settings the deployment requires the operator to fill in (compose refuses to start
# without them); their lines are active and empty on purpose.
REQUIRED = {"NVFP4_RAY_AUTH_TOKEN"}


def _lines() -> dict[str, tuple[bool, str]]:
    """name -> (active, value)."""
    out = {}
    for raw in EXAMPLE.read_text().splitlines():
        match = LINE.match(raw.strip())
        if match:
            out[match.group(2)] = (match.group(1) is None, match.group(3))
    return out


def test_every_setting_is_listed() -> None:
    listed = _lines()
    missing = [
        f"NVFP4_{name.upper()}"
        for name in Settings.model_fields
        if f"NVFP4_{name.upper()}" not in listed
    ]
    assert not missing, f"add to .env.example: {missing}"


def test_every_compose_variable_is_listed() -> None:
    files = ("docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.cpu.yml")
    compose = "".join((ROOT / name).read_text() for name in files)
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    missing = sorted(used - set(_lines()))
    assert not missing, f"add to .env.example: {missing}"


def test_active_lines_carry_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file says active lines hold the code's default: the same .env then leaves a host
    CLI, `make demo` and the tests as they were. Loading it is also a parse check."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"NVFP4_{name.upper()}", raising=False)
    loaded = Settings(_env_file=str(EXAMPLE))  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    active = {n for n, (is_active, _) in _lines().items() if is_active}
    assert active >= REQUIRED
    for name in Settings.model_fields:
        if f"NVFP4_{name.upper()}" in active - REQUIRED:
            assert getattr(loaded, name) == getattr(defaults, name), name
