"""Choosing the Python that measures vLLM's speed on a checkpoint, and its failures.

The measurement itself runs real vLLM: tests/integration/test_pipeline.py (CPU build,
.venv-serve) and tests/gpu/test_quantize_cuda.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

from nvfp4_worker import served_speed


def test_the_setting_picks_the_python() -> None:
    assert served_speed.python_for("") is None
    assert served_speed.python_for("/opt/vllm/bin/python") == "/opt/vllm/bin/python"
    # This environment has ModelOpt, so it cannot have vLLM's CPU build: auto finds none.
    assert served_speed.python_for("auto") is None


def test_a_python_without_vllm_is_one_error_line(tmp_path: Path) -> None:
    result = served_speed.measure(sys.executable, tmp_path)
    assert set(result) == {"error"}
    assert result["error"].startswith("vLLM exited 1: ")
    assert "No module named 'vllm'" in result["error"] and "\n" not in result["error"]


def test_a_measurement_that_hangs_is_stopped_with_its_children(tmp_path: Path) -> None:
    # A stand-in "python" that starts a child (as vLLM starts its engine core) and hangs.
    pid_file = tmp_path / "child.pid"
    sleeper = tmp_path / "python"
    sleeper.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    sleeper.chmod(0o755)
    result = served_speed.measure(str(sleeper), tmp_path, timeout_s=2)
    assert result == {"error": "vLLM did not finish within 2 s"}
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
