"""The serving configuration: Settings (NVFP4_SERVE_*) overridden by build_app's args.

Validated into one pydantic model before anything starts, so a typo in a YAML file
fails `serve deploy` with one line that names the field, not a replica crash loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nvfp4_common.settings import Settings


class AutoscalingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero).")
    max_replicas: int = Field(2, ge=1, description="Upper bound on engine replicas.")
    target_ongoing_requests: int = Field(
        16, ge=1, description="In-flight requests per replica that Ray Serve aims for."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas"
                f" ({self.max_replicas})"
            )
        return self


class ServeArgs(BaseModel):
    """Everything build_app needs; each field but model_aliases defaults from the matching
    serve_ setting."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Local checkpoint folder or Hugging Face id.")
    model_name: str | None = Field(
        None, description="Model id clients send; defaults to the folder/repo name."
    )
    model_aliases: list[str] = Field(
        default_factory=list,
        description="Other model ids this app answers to (set by `nvfp4ctl serve deploy` to"
        " the name of the model it replaces); answers carry the served name.",
    )
    quantization: Literal["auto", "none", "modelopt_fp4", "modelopt"] = Field(
        "auto",
        description="vLLM quantization; auto reads hf_quant_config.json (NVFP4 -> modelopt_fp4,"
        " FP8 -> modelopt).",
    )
    max_model_len: int = Field(8192, gt=0, description="Context length (clamped to the model's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM's GPU memory share.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica.")
    accelerator: Literal["gpu", "cpu"] = Field("gpu", description="Where engines run.")
    num_replicas: int = Field(1, ge=1, description="Fixed replicas when autoscaling is off.")
    autoscaling: AutoscalingArgs | None = Field(
        None, description="Turn autoscaling on with these bounds (replaces num_replicas)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments, passed untouched."
    )
    api_key_file: Path | None = Field(None, description="File of API keys, one per line.")
    preflight: bool = Field(True, description="Run the memory preflight before starting.")
    unified_memory: bool = Field(False, description="GPU shares host memory (DGX Spark).")
    memory_overhead_gb: float = Field(2.0, ge=0, description="Preflight runtime allowance.")
    readiness_prompt: str = Field("Hello", min_length=1, description="Prompt behind /readyz.")
    stream_batching_interval_ms: float = Field(
        50,
        ge=0,
        description="Ray Serve LLM sends a stream's tokens in one message per interval"
        " (fewer, larger messages between engine and ingress); 0 sends every token alone.",
    )
    first_chunk_now: bool = Field(
        True,
        description="Send a stream's first chunk as soon as the engine yields it, not at the"
        " end of the first batching interval (nvfp4_serve.server; false is Ray's own batcher).",
    )

    @model_validator(mode="after")
    def _no_duplicate_engine_settings(self) -> ServeArgs:
        owned = {"model", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size"}
        clash = sorted(owned & set(self.engine_kwargs))
        if clash:
            raise ValueError(
                f"engine_kwargs must not set {clash}: use the top-level args of the same name"
            )
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.rstrip("/").split("/")[-1]


def args_from_settings(settings: Settings) -> dict[str, Any]:
    """The serve_ settings as build_app args (the defaults that args override)."""
    out: dict[str, Any] = {
        "model_name": settings.serve_model_name,
        "max_model_len": settings.serve_max_model_len,
        "gpu_memory_utilization": settings.serve_gpu_memory_utilization,
        "tensor_parallel_size": settings.serve_tensor_parallel_size,
        "accelerator": settings.serve_accelerator,
        "num_replicas": settings.serve_num_replicas,
        "engine_kwargs": dict(settings.serve_engine_kwargs),
        "api_key_file": settings.serve_api_key_file,
        "preflight": settings.serve_preflight,
        "unified_memory": settings.serve_unified_memory,
        "memory_overhead_gb": settings.serve_memory_overhead_gb,
        "readiness_prompt": settings.serve_readiness_prompt,
        "quantization": settings.serve_quantization,
        "stream_batching_interval_ms": settings.serve_stream_batching_interval_ms,
        "first_chunk_now": settings.serve_first_chunk_now,
    }
    if settings.serve_model:
        out["model"] = settings.serve_model
    if settings.serve_autoscaling:
        out["autoscaling"] = {
            "min_replicas": settings.serve_min_replicas,
            "max_replicas": settings.serve_max_replicas,
            "target_ongoing_requests": settings.serve_target_ongoing_requests,
        }
    return out


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "args"
        if e["type"] == "extra_forbidden":
            known = ", ".join(ServeArgs.model_fields)
            parts.append(f"unknown arg {where!r} (known: {known})")
        elif e["type"] == "missing" and where == "model":
            parts.append("no model: pass args.model or set NVFP4_SERVE_MODEL")
        else:
            parts.append(f"{where}: {e['msg']}")
    return "invalid serving config: " + "; ".join(parts)


def load_args(settings: Settings, args: dict[str, Any] | None) -> ServeArgs:
    """Settings first, then `args` on top; raise ValueError with one line on bad input."""
    merged = args_from_settings(settings)
    merged.update(args or {})
    if (args or {}).get("autoscaling") is not None and "num_replicas" in (args or {}):
        raise ValueError("invalid serving config: set num_replicas or autoscaling, not both")
    try:
        return ServeArgs.model_validate(merged)
    except ValidationError as e:
        raise ValueError(_one_line(e)) from None
