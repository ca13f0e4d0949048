"""`nvfp4ctl doctor`: kernel-path rules, GPU discovery, and one status per check."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvfp4_admin.cli import cli
from nvfp4_admin.doctor import _parse_smi_line, find_gpus, nvfp4_path

# The stand-in for Ray's dashboard and Serve proxy that the serve tests use (no Ray here).
from tests.unit.test_cli_serve import FakeRay, _live_config, fake_ray  # noqa: F401


@pytest.mark.parametrize(
    ("capability", "status", "words"),
    [
        ((12, 1), "ok", "native FP4"),  # GB10 (DGX Spark)
        ((10, 0), "ok", "native FP4"),  # B200
        ((9, 0), "warn", "Marlin"),  # H100/H200
        ((8, 0), "warn", "Marlin"),  # A100
        ((7, 5), "fail", "no NVFP4 kernel"),  # T4
        (None, "warn", "emulation"),
    ],
)
def test_nvfp4_path(capability: tuple[int, int] | None, status: str, words: str) -> None:
    got_status, detail = nvfp4_path(capability)
    assert got_status == status and words in detail


def test_smi_line_with_unified_memory() -> None:
    gpu = _parse_smi_line("NVIDIA GB10, 12.1, [N/A], [N/A]")
    assert gpu.capability == (12, 1) and gpu.total_bytes is None
    gpu = _parse_smi_line("NVIDIA H100 80GB HBM3, 9.0, 81559, 80000")
    assert gpu.total_bytes == 81559 * 2**20


def _fake_nvidia_smi(folder: Path, line: str) -> None:
    # No GPU here: a stand-in nvidia-smi prints what a DGX Spark's prints.
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho '{line}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_doctor_json_with_redis_up_and_ray_down(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(tmp_path, "NVIDIA GB10, 12.1, [N/A], [N/A]")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert [g.name for g in find_gpus()] == ["NVIDIA GB10"]
    env = {
        "NVFP4_REDIS_URL": redis_url,
        "NVFP4_RAY_ADDRESS": "http://127.0.0.1:9",
        "NVFP4_MODELS_DIR": str(tmp_path),
    }
    out = CliRunner().invoke(cli, ["doctor", "--json"], env=env)
    assert out.exit_code == 1  # Ray's dashboard is unreachable
    checks = {c["name"]: c for c in json.loads(out.output)}
    assert checks["gpu 0"]["status"] == "ok" and "unified memory" in checks["gpu 0"]["detail"]
    assert checks["nvfp4 path"]["status"] == "ok"
    assert "unified" in checks["memory"]["detail"]
    assert checks["redis"]["status"] == "ok" and "0 queued job(s)" in checks["redis"]["detail"]
    assert checks["ray dashboard"]["status"] == "fail"
    assert checks["ray dashboard"]["detail"].startswith(
        "cannot reach http://127.0.0.1:9/api/ray/version"
    )
    assert "nvfp4-stack 0.1.0" in checks["versions"]["detail"]
    assert {c["status"] for c in checks.values()} <= {"ok", "warn", "fail"}


def test_doctor_hides_the_redis_password(tmp_path: Path) -> None:
    env = {
        "NVFP4_REDIS_URL": "redis://:hunter2@127.0.0.1:9/0",
        "NVFP4_RAY_ADDRESS": "http://127.0.0.1:9",
        "NVFP4_MODELS_DIR": str(tmp_path),
    }
    out = CliRunner().invoke(cli, ["doctor"], env=env)
    assert out.exit_code == 1
    assert "hunter2" not in out.output
    assert "cannot reach Redis at redis://:***@127.0.0.1:9/0" in out.output


def test_doctor_with_ray_reachable_and_serving_ready(
    redis_url: str,
    fake_ray: tuple[FakeRay, str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, url = fake_ray
    _live_config(fake, "/models/qwen3-nvfp4")
    _fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3, 9.0, 81559, 61440")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {
        "NVFP4_REDIS_URL": redis_url,
        "NVFP4_RAY_ADDRESS": url,
        "NVFP4_SERVE_URL": url,
        "NVFP4_MODELS_DIR": str(tmp_path),
    }
    out = CliRunner().invoke(cli, ["doctor", "--json"], env=env)
    checks = {c["name"]: c for c in json.loads(out.output)}
    assert out.exit_code == 0, checks
    assert checks["gpu 0"]["detail"].endswith("compute capability 9.0, 60.0 GiB free of 80 GiB")
    assert checks["nvfp4 path"]["status"] == "warn"  # Hopper: weight-only Marlin
    assert checks["ray dashboard"] == {
        "name": "ray dashboard",
        "status": "ok",
        "detail": f"{url}: Ray 2.60.0",
    }
    assert checks["serving"]["status"] == "ok"
    assert checks["serving"]["detail"] == (
        f"{url}/readyz answers 200; nvfp4 RUNNING (/models/qwen3-nvfp4)"
    )
