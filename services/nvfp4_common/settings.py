"""One typed settings object for every service.

Values come from `NVFP4_*` environment variables or a `.env` file. Build it with
`get_settings()`, never at import time, so tests and the CLI can override values.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse, urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from nvfp4_common.errors import InvalidSettings
from nvfp4_common.serving import ServingConfig, config_from_settings, settings_fields

DEV_REDIS_URL = "redis://localhost:6379/0"


if TYPE_CHECKING:
    _ServeSettings = BaseModel
else:
    # The NVFP4_SERVE_* settings of the serving config, generated from its one model.
    _ServeSettings = create_model("_ServeSettings", **settings_fields())


class Settings(BaseSettings, _ServeSettings):
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
    cpu_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Compute dtype for quantization on a CPU (checkpoints are BF16 either way);"
        " float32 is several times faster on CPUs without native BF16 matrix units.",
    )
    worker_memory_preflight: bool = Field(
        True,
        description="Before loading a model, refuse a job whose estimated memory need exceeds"
        " the container's memory limit or MemAvailable; false tries anyway (swap, odd cgroups).",
    )
    worker_memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="Most memory (GiB) a job may plan to use, below the container's limit and"
        " MemAvailable; a model that does not fit whole in it is quantized layer by layer."
        " Unset: those two only.",
    )
    worker_vllm_python: str = Field(
        "auto",
        description="Python with vLLM that measures a published checkpoint's decode speed"
        " after export (report and model card): auto = the worker's own when it has vLLM"
        " (GPU images carrying both), a path (on CPU, the serving environment's), empty = off.",
    )
    hf_cache_dir: Path | None = Field(
        None,
        description="Hugging Face hub cache to download models into and read them from;"
        " unset = the huggingface_hub default (HF_HUB_CACHE).",
    )
    worker_metrics_port: int = Field(
        9400,
        ge=0,
        le=65535,
        description="Port of the worker's Prometheus endpoint (/metrics, all interfaces);"
        " 0 disables it.",
    )

    # --- serving (nvfp4_serve) --------------------------------------------------------
    # Every other serve_ setting comes from nvfp4_common.serving.ServingConfig (see
    # _ServeSettings); build_app args override them. The keys are a setting only: as a
    # build_app arg they would be stored in Ray's GCS and shown on its dashboard.
    serve_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted Bearer tokens (JSON list). Required in production unless a key"
        " file is set.",
    )

    # --- admin CLI --------------------------------------------------------------------
    ray_address: str = Field(
        "http://127.0.0.1:8265",
        description="Ray dashboard (REST API) the CLI manages serving through.",
    )
    ray_auth_token: SecretStr | None = Field(
        None, description="Token for Ray's dashboard when Ray token authentication is on."
    )
    serve_url: str = Field(
        "http://127.0.0.1:8000",
        description="Ray Serve's HTTP proxy; the CLI checks a new app's /readyz through it.",
    )
    serve_app_name: str = Field(
        "nvfp4", description="Base name of the Serve application; deploys add a short suffix."
    )
    serve_route_prefix: str = Field("/", description="Route the live model is served on.")
    serve_import_path: str = Field(
        "nvfp4_serve.app:build_app", description="Serve application builder the CLI deploys."
    )
    serve_ready_timeout_s: float = Field(
        1800.0, gt=0, description="How long `serve deploy` waits for a new model to be ready."
    )
    workers_mode: Literal["compose", "kubernetes"] = Field(
        "compose", description="Where `workers scale` scales the worker: Docker Compose or Helm."
    )
    compose_project: str = Field(
        "nvfp4-stack", description="Docker Compose project name of the stack."
    )
    worker_service: str = Field("worker", description="Compose service name of the worker.")
    compose_max_workers: int = Field(
        1,
        ge=1,
        description="Most workers `workers scale` runs in compose mode. Compose workers share"
        " the node's one GPU beside serving, and its memory split holds one quantization job"
        " at a time; raise this only with memory for more (docs/operations.md, 'Memory').",
    )
    k8s_namespace: str = Field("default", description="Kubernetes namespace of the Helm release.")
    helm_release: str = Field("nvfp4", description="Helm release name of the stack.")

    @field_validator("worker_memory_limit_gb", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        # .env.example lists it as `NVFP4_WORKER_MEMORY_LIMIT_GB=`: empty means no limit.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, v: str) -> str:
        # Checked here so a typo fails as "invalid settings", not deep inside redis-py.
        # The message never repeats the URL: it may hold the password.
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("is not a valid URL, e.g. redis://:PASSWORD@redis:6379/0") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.env == "production" and (
            self.redis_url == DEV_REDIS_URL or not urlparse(self.redis_url).password
        ):
            raise ValueError(
                "NVFP4_REDIS_URL must be set in production, with a password "
                "(e.g. redis://:PASSWORD@redis:6379/0)"
            )
        return self

    @property
    def worker_name(self) -> str:
        return f"{self.worker_id}-{os.getpid()}"

    @property
    def serving(self) -> ServingConfig:
        """The serve_ settings as the serving config (what build_app args override)."""
        return ServingConfig.model_validate(config_from_settings(self))


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log.

    The credentials end at the last "@", not where urlsplit stops: a password pasted
    without percent-encoding (base64 holds "/" and "+") would otherwise leak its tail.
    """
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}"


def describe_invalid(e: ValidationError) -> str:
    """One line naming each bad setting and its problem, without the values: pydantic's own
    text repeats every input, and those include the Redis password and API keys."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: "
        + err["msg"].removeprefix("Value error, ")
        for err in e.errors()
    )


def build_settings(**kwargs: Any) -> Settings:
    """Settings from NVFP4_* variables (and `_env_file`, if given) with `kwargs` on top.

    Raises:
        InvalidSettings: "invalid settings: ..." in one line that shows no secret.
    """
    try:
        return Settings(**kwargs)
    except ValidationError as e:
        raise InvalidSettings(f"invalid settings: {describe_invalid(e)}") from None
    except SettingsError as e:  # an NVFP4_* list/dict variable that is not JSON
        raise InvalidSettings(f"invalid settings: {e}") from None


@lru_cache
def get_settings(**overrides: Any) -> Settings:
    """The process-wide settings, built on first use (see build_settings).

    Raises:
        InvalidSettings: invalid settings, in one line that shows no secret.
    """
    return build_settings(**overrides)
