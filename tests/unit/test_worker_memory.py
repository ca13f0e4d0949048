"""The worker's memory check: estimate, cgroup and meminfo parsing, the refusal.

The cgroup and meminfo files are temp files passed as paths: this machine's real limits
are whatever the test host has, not the case under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvfp4_common.settings import Settings
from nvfp4_common.sizing import GIB
from nvfp4_worker import memory
from nvfp4_worker.errors import JobError

# cgroup v1's "no limit", as this kind of host writes it.
V1_UNLIMITED = "9223372036854771712"


def room(tmp_path: Path, *, v2: str | None, v1: str | None, available_gib: float) -> memory.Room:
    """The Room read from cgroup v2/v1 files with this text (None: no such file, as on a
    host without that cgroup version) and a meminfo with this MemAvailable."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, text in (("v2", v2), ("v1", v1)):
        if text is not None:
            (tmp_path / name).write_text(text + "\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       131072000 kB\n"
        "MemFree:         1000000 kB\n"
        f"MemAvailable:   {int(available_gib * 1024 * 1024)} kB\n"
    )
    return memory.room(tmp_path / "v2", tmp_path / "v1", meminfo)


def test_estimate_follows_device_and_dtype() -> None:
    bf16 = 16 * GIB  # an 8B model in BF16
    cpu = memory.estimate(bf16, "BF16", torch.float32, in_host=True)
    assert (cpu.weights, cpu.working, cpu.runtime) == (32 * GIB, 8 * GIB, 2 * GIB)
    spark = memory.estimate(bf16, "BF16", torch.bfloat16, in_host=True)
    assert spark.total == 16 * GIB + 8 * GIB + 2 * GIB
    discrete = memory.estimate(bf16, "BF16", torch.bfloat16, in_host=False)
    assert discrete.total == 8 * GIB + 2 * GIB  # the weights live on the GPU
    # An FP32 source has half the parameters of its byte count in BF16.
    fp32 = memory.estimate(bf16, "FP32", torch.bfloat16, in_host=True)
    assert (fp32.weights, fp32.working) == (8 * GIB, 4 * GIB)


def test_fits_returns_the_numbers(tmp_path: Path) -> None:
    need = memory.estimate(16 * GIB, "BF16", torch.bfloat16, in_host=True)  # 26 GiB
    have = room(tmp_path, v2=str(56 * GIB), v1=None, available_gib=100)
    assert (have.limit, have.available, have.usable) == (56 * GIB, 100 * GIB, 56 * GIB)
    note = memory.check("org/model-8b", need, have)
    assert "26.00 GiB" in note and "memory limit 56.00 GiB" in note


def test_does_not_fit_names_numbers_and_the_limit_setting(tmp_path: Path) -> None:
    need = memory.estimate(61 * GIB, "BF16", torch.bfloat16, in_host=True)  # a 32B model
    have = room(tmp_path, v2=str(56 * GIB), v1=None, available_gib=100)
    with pytest.raises(JobError) as info:
        memory.check("Qwen/Qwen3-32B", need, have)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model Qwen/Qwen3-32B does not fit in memory: needs about 93.50")
    assert "weights 61.00 GiB in bfloat16 + working memory 30.50 GiB" in message
    assert "may use 56.00 GiB" in message
    assert "NVFP4_WORKER_MEMORY_LIMIT" in message and "smaller model" in message
    assert "NVFP4_WORKER_MEMORY_PREFLIGHT=false" in message


def test_short_mem_available_says_to_free_memory(tmp_path: Path) -> None:
    need = memory.estimate(16 * GIB, "BF16", torch.bfloat16, in_host=True)
    have = room(tmp_path, v2="max", v1=None, available_gib=20)
    with pytest.raises(JobError, match=r"may use 20\.00 GiB .*docker compose stop serve"):
        memory.check("org/model-8b", need, have)


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    # "max" in v2 is final: a v1 file beside it (a hybrid host) is not read.
    have = room(tmp_path, v2="max", v1=str(GIB), available_gib=30)
    assert have.limit is None and have.usable == 30 * GIB


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    assert room(tmp_path / "a", v2=None, v1=str(8 * GIB), available_gib=30).usable == 8 * GIB
    unlimited = room(tmp_path / "b", v2=None, v1=V1_UNLIMITED, available_gib=30)
    assert unlimited.limit is None and unlimited.usable == 30 * GIB


def test_nothing_known_lets_the_job_run(tmp_path: Path) -> None:
    have = memory.room(tmp_path / "none", tmp_path / "none", tmp_path / "none")
    assert have == memory.Room(None, None)
    need = memory.estimate(1000 * GIB, "BF16", torch.bfloat16, in_host=True)
    assert "no limit or MemAvailable found" in memory.check("m", need, have)


def test_the_check_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).worker_memory_preflight is True  # type: ignore[call-arg]
    monkeypatch.setenv("NVFP4_WORKER_MEMORY_PREFLIGHT", "false")
    assert Settings(_env_file=None).worker_memory_preflight is False  # type: ignore[call-arg]


def test_cpu_weights_are_host_memory() -> None:
    assert memory.weights_in_host_memory(torch.device("cpu"))


def test_the_workers_own_limit_lowers_the_containers(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable:   {100 * 1024 * 1024} kB\n")
    (tmp_path / "v2").write_text(f"{56 * GIB}\n")
    lower = memory.room(tmp_path / "v2", tmp_path / "v1", meminfo, cap=8 * GIB)
    assert (lower.limit, lower.usable) == (8 * GIB, 8 * GIB)
    higher = memory.room(tmp_path / "v2", tmp_path / "v1", meminfo, cap=64 * GIB)
    assert higher.limit == 56 * GIB  # a setting cannot raise the kernel's limit
    no_cgroup = memory.room(tmp_path / "none", tmp_path / "none", meminfo, cap=8 * GIB)
    assert no_cgroup.limit == 8 * GIB


def test_layerwise_runtime_is_what_the_process_holds_plus_a_margin() -> None:
    held = memory.rss_bytes()
    assert held is not None and 10 * 2**20 < held < 16 * GIB  # this test process
    assert memory.layerwise_runtime(GIB) == GIB + memory.LAYERWISE_RUNTIME_MARGIN
    # Never more than the whole-model rule's fixed part, and that part where /proc is not.
    assert memory.layerwise_runtime(3 * GIB) == 2 * GIB
    assert memory.layerwise_runtime(None) == 2 * GIB


def test_setting_empty_means_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from nvfp4_common.settings import Settings

    monkeypatch.setenv("NVFP4_WORKER_MEMORY_LIMIT_GB", "")
    assert Settings(_env_file=None).worker_memory_limit_gb is None
    monkeypatch.setenv("NVFP4_WORKER_MEMORY_LIMIT_GB", "1.5")
    assert Settings(_env_file=None).worker_memory_limit_gb == 1.5
