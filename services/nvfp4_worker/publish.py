"""Atomic publication of a finished checkpoint into the models folder.

A job writes into `models_dir/.tmp-<job_id>-<random>` and renames that folder to
`models_dir/<output_name>` at the end: readers (the serving side, `ls`) never see a
half-written checkpoint, and a crash leaves only a temp folder that the next attempt of
the same job removes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from nvfp4_worker.errors import JobError

TMP_PREFIX = ".tmp-"
REPORT = "report.json"


def models_root(models_dir: Path) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    return models_dir.resolve()


def output_path(models_dir: Path, name: str) -> Path:
    """models_dir/name, refused unless it is exactly one folder inside models_dir."""
    root = models_root(models_dir)
    candidate = root / name
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or name.startswith(TMP_PREFIX)
        or candidate.parent != root
    ):
        raise JobError(f"output name {name!r} escapes the models folder; use one folder name")
    return candidate


def remove_stale(models_dir: Path, job_id: str) -> list[Path]:
    """Delete temp folders an earlier attempt of this job left behind."""
    root = models_root(models_dir)
    removed = []
    for path in root.glob(f"{TMP_PREFIX}{job_id}-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def existing_report(final: Path, job_id: str) -> dict[str, Any] | None:
    """The report of an output this same job already published, else a JobError if the
    name is taken; None when the name is free."""
    if not final.exists() and not final.is_symlink():
        return None
    report_file = final / REPORT
    try:
        report: dict[str, Any] = json.loads(report_file.read_text())
    except (OSError, ValueError):
        report = {}
    if report.get("job_id") == job_id and not final.is_symlink():
        return report
    raise JobError(f"output {final.name} already exists")


def staging_dir(models_dir: Path, job_id: str) -> Path:
    """A fresh temp folder inside models_dir (same filesystem, so rename is atomic)."""
    root = models_root(models_dir)
    path = root / f"{TMP_PREFIX}{job_id}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def check_disk(models_dir: Path, needed_bytes: int, min_free_gb: float) -> None:
    free = shutil.disk_usage(models_root(models_dir)).free
    required = needed_bytes + int(min_free_gb * 1e9)
    if free < required:
        raise JobError(
            f"not enough disk space in {models_dir}: need {required / 1e9:.2f} GB (checkpoint"
            f" ~{needed_bytes / 1e9:.2f} GB + {min_free_gb} GB reserve), {free / 1e9:.2f} GB free"
        )


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename makes them visible (a power loss must not
    publish a folder of empty files)."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish(staging: Path, final: Path) -> None:
    _fsync_tree(staging)
    try:
        os.rename(staging, final)  # fails if final appeared meanwhile and is not empty
    except OSError:
        if final.exists():
            raise JobError(f"output {final.name} already exists") from None
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())
