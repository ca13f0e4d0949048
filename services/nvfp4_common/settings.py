"""One typed settings object for every service.

Values come from `NVFP4_*` environment variables or a `.env` file. Build it with
`get_settings()`, never at import time, so tests and the CLI can override values.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_REDIS_URL = "redis://localhost:6379/0"


class Settings(BaseSettings):
    """Settings shared by the worker, the serving app and the admin CLI."""

    model_config = SettingsConfigDict(
        env_prefix="NVFP4_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- shared -----------------------------------------------------------------------
    env: Literal["development", "production"] = Field(
        "development",
        description="`production` refuses development defaults (no Redis password, no API keys).",
    )
    redis_url: str = Field(
        DEV_REDIS_URL,
        description="Redis holding the job queue, e.g. redis://:PASSWORD@redis:6379/0.",
    )
    models_dir: Path = Field(
        Path("models"),
        description="Where finished checkpoints are published; every output stays inside it.",
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Extra local folders jobs may read source models from (besides models_dir"
        " and the Hugging Face cache). JSON list, e.g. '[\"/data/models\"]'.",
    )
    hf_offline: bool = Field(
        False, description="Never contact the Hugging Face hub; use only the local cache."
    )

    # --- worker -----------------------------------------------------------------------
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}",
        description="Name this worker reports; the process id is appended.",
    )
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="How often a busy worker renews its job's heartbeat."
    )
    heartbeat_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A running job whose heartbeat is older than this is re-queued (dead worker).",
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs a job may use, counted before each run; then it fails."
    )
    result_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long an ended job and its logs stay in Redis."
    )
    job_log_lines: int = Field(200, ge=10, description="Log lines kept per job.")
    cancel_grace_s: float = Field(
        5.0, ge=0, description="After SIGTERM, a cancelled job's process gets this long to exit."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where quantization runs; auto = CUDA when available."
    )
    min_free_disk_gb: float = Field(
        1.0, ge=0, description="Extra free disk required beyond the expected checkpoint size."
    )

    # --- admin CLI --------------------------------------------------------------------
    ray_address: str = Field(
        "http://127.0.0.1:8265", description="Ray dashboard (REST API) the CLI manages serving through."
    )

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.env == "production" and self.redis_url == DEV_REDIS_URL:
            raise ValueError(
                "NVFP4_REDIS_URL must be set in production (with a password, e.g. "
                "redis://:PASSWORD@redis:6379/0)"
            )
        return self

    @property
    def worker_name(self) -> str:
        import os

        return f"{self.worker_id}-{os.getpid()}"

    def redis_password(self) -> SecretStr | None:
        from urllib.parse import urlparse

        password = urlparse(self.redis_url).password
        return SecretStr(password) if password else None


@lru_cache
def get_settings(**overrides: Any) -> Settings:
    """The process-wide settings, built on first use."""
    return Settings(**overrides)
