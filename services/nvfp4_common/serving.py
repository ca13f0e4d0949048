"""The serving configuration, declared once.

`ServingConfig` is the one model of how a checkpoint is served. Everything else is
derived from it:

- the `NVFP4_SERVE_<NAME>` settings (`serve_<name>` fields of `Settings`), built by
  `settings_fields()` with the same defaults, bounds and descriptions;
- `build_app`'s arguments, `ServeArgs`: the model plus what only a deploy sets
  (`model_aliases`);
- the builder-argument names the admin CLI edits in Serve configs (`MODEL_ARG`, ...);
- the engine arguments build_app owns, which the Helm chart's schema refuses in
  `serve.engineKwargs` (`OWNED_ENGINE_ARGS`).

No Ray or vLLM here: the admin CLI and the chart's schema generator import it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

# Settings of the serving config are named `serve_<field>` (env NVFP4_SERVE_<FIELD>).
SETTING_PREFIX = "serve_"
# Engine arguments build_app sets from its own args; engine_kwargs must not repeat them.
OWNED_ENGINE_ARGS = ("model", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size")
# Ray Serve LLM's direct streaming: the engine replica is the ingress, behind Ray's HAProxy,
# and serves vLLM's own app, to which nvfp4_serve.direct adds our keys, request checks,
# health routes and aliases. No ingress hop and no stream batching: 0.99-1.02x of plain
# vLLM's tok/s at 1-128 streams on an H100 with both clients, against 0.91x at 64 streams
# through an ingress deployment (docs/serving.md). Ray reads both at process start.
DIRECT_STREAMING_ENV = "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"
RAY_ENV_DIRECT_STREAMING: dict[str, str] = {
    DIRECT_STREAMING_ENV: "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
# The other way to serve: our ingress deployment (nvfp4_serve.ingress) in front of the
# engine deployment, behind Serve's HTTP proxy (compose NVFP4_DIRECT_STREAMING=0, Helm
# ray.directStreaming=false).
RAY_ENV_INGRESS: dict[str, str] = {k: "0" for k in RAY_ENV_DIRECT_STREAMING}
# Environment of every Ray process that serves (compose, the Helm chart's RayService, the
# local demo stack, the test cluster), read by Ray at process start: direct streaming, in
# throughput-optimized Ray Serve. The mode runs request handling on the replica's own event
# loop, calls between deployments over gRPC, buffers access logs and freezes the GC after
# start (with an ingress deployment: 0.94-0.99x of plain vLLM's throughput at 1-128 streams
# on an H100, against 0.83x at 64 without it). Turn the mode off with "0".
# Its direct ingress is turned back off: it runs Serve's HTTP proxy on the head node only
# and serves the ingress from replica ports 30000+, so a Ray worker pod would have nothing
# on port 8000 (the chart's serve Service and /readyz probe). The mode's gRPC does not reach
# the proxy -> ingress hop (Ray derives the proxy's flag before the mode applies), which
# otherwise passes every streamed chunk through the object store by reference; the proxy's
# own flag turns it on (it matters with an ingress deployment).
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    **RAY_ENV_DIRECT_STREAMING,
}


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling bounds of the engine deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero).")
    max_replicas: int = Field(2, ge=1, description="Upper bound on engine replicas.")
    target_ongoing_requests: int = Field(
        16, ge=1, description="In-flight requests per replica that Ray Serve aims for."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas"
                f" ({self.max_replicas})"
            )
        return self


class ServingConfig(BaseModel):
    """How a checkpoint is served: each field is a build_app arg and an NVFP4_SERVE_* setting."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Checkpoint to serve: a local folder or a Hugging Face id (org/name)."
    )
    model_name: str | None = Field(
        None, description="Model id clients send as `model`; defaults to the folder/repo name."
    )
    quantization: Literal["auto", "none", "modelopt_fp4", "modelopt"] = Field(
        "auto",
        description="vLLM quantization: auto reads hf_quant_config.json (NVFP4 ->"
        " modelopt_fp4, FP8 -> modelopt); none serves the weights as stored.",
    )
    max_model_len: int = Field(
        8192,
        gt=0,
        description="Context length; lowered (with a warning) to the model's"
        " max_position_embeddings.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM's share of GPU memory for weights and KV cache."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica.")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="`cpu` runs vLLM's CPU build (tests, laptops); NVFP4 is emulated."
    )
    num_replicas: int = Field(
        1, ge=1, description="Fixed engine replicas (ignored when autoscaling is on)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="Let Ray Serve scale the engine replicas between min and max replicas"
        " (replaces num_replicas).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments, passed through untouched (JSON object).",
    )
    api_key_file: Path | None = Field(
        None,
        description="File with one API key per line (a mounted secret); re-read when it changes.",
    )
    preflight: bool = Field(
        True,
        description="Before starting, check that weights + KV cache fit the free memory of this"
        " host (CPU serving, or GPUs that share host memory).",
    )
    unified_memory: bool = Field(
        False,
        description="GPU and CPU share memory (DGX Spark/GB10): gpu_memory_utilization is no"
        " real cap, so preflight checks MemAvailable.",
    )
    memory_overhead_gb: float = Field(
        2.0, ge=0, description="Preflight allowance for activations, CUDA graphs and runtime."
    )
    readiness_prompt: str = Field(
        "Hello", min_length=1, description="Prompt of the 1-token generation behind /readyz."
    )
    stream_batching_interval_ms: float = Field(
        50,
        ge=0,
        description="Ray Serve LLM sends a stream's tokens in one message per interval (fewer,"
        " larger messages between engine and ingress); 0 sends every token alone.",
    )
    first_chunk_now: bool = Field(
        True,
        description="Send a stream's first chunk as soon as the engine yields it (false:"
        " Ray's batcher, which holds it for one interval).",
    )
    cpu_weight_cache: bool = Field(
        True,
        description="CPU only: unpack NVFP4 weights once at load (about 3.5x the packed size in"
        " RAM, about 10x faster) instead of on every forward pass.",
    )

    @model_validator(mode="after")
    def _no_duplicate_engine_settings(self) -> ServingConfig:
        clash = sorted(set(OWNED_ENGINE_ARGS) & set(self.engine_kwargs))
        if clash:
            raise ValueError(
                f"engine_kwargs must not set {clash}: use the top-level args of the same name"
            )
        return self


def served_name(model: str, model_name: str | None) -> str:
    """The model id clients send: `model_name`, else the checkpoint's folder/repo name."""
    return model_name or model.rstrip("/").split("/")[-1]


class ServeArgs(ServingConfig):
    """build_app's arguments: the serving config, with a model required, plus what only a
    deploy sets. Each field but model_aliases defaults from its NVFP4_SERVE_* setting."""

    model: str = Field(min_length=1, description=ServingConfig.model_fields["model"].description)
    model_aliases: list[str] = Field(
        default_factory=list,
        description="Other model ids this app answers to (set by `nvfp4ctl serve deploy` to"
        " the name of the model it replaces); answers carry the served name.",
    )

    @property
    def served_name(self) -> str:
        return served_name(self.model, self.model_name)


# The builder arguments `nvfp4ctl serve` reads and edits in a Serve config's `args`.
MODEL_ARG = "model"
SERVED_NAME_ARG = "model_name"
ALIASES_ARG = "model_aliases"
NUM_REPLICAS_ARG = "num_replicas"
AUTOSCALING_ARG = "autoscaling"
AUTOSCALING_KEYS = tuple(AutoscalingConfig.model_fields)
DEPLOY_ARGS = (MODEL_ARG, SERVED_NAME_ARG, ALIASES_ARG, NUM_REPLICAS_ARG, AUTOSCALING_ARG)


def _nested_model(info: FieldInfo) -> type[BaseModel] | None:
    """The model class of an `X | None` field whose X is a model, else None."""
    for arg in getattr(info.annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def settings_fields() -> dict[str, tuple[Any, FieldInfo]]:
    """The serve_ settings, as `create_model` field definitions.

    One setting per ServingConfig field, `serve_<name>`, with the field's type, default,
    bounds and description. A field that holds an optional model (autoscaling) becomes an
    on/off setting plus one setting per field of that model (serve_autoscaling,
    serve_min_replicas, ...): environment variables hold flat values.
    """
    out: dict[str, tuple[Any, FieldInfo]] = {}
    for name, info in ServingConfig.model_fields.items():
        nested = _nested_model(info)
        if nested is None:
            out[SETTING_PREFIX + name] = (info.annotation, copy.deepcopy(info))
            continue
        out[SETTING_PREFIX + name] = (
            bool,
            FieldInfo.from_field(False, description=info.description),
        )
        for sub, sub_info in nested.model_fields.items():
            out[SETTING_PREFIX + sub] = (sub_info.annotation, copy.deepcopy(sub_info))
    return out


def config_from_settings(settings: object) -> dict[str, Any]:
    """The serve_ settings of `settings` as ServingConfig values (build_app's defaults).

    An unset model is left out, so a missing model is reported as missing.
    """
    out: dict[str, Any] = {}
    for name, info in ServingConfig.model_fields.items():
        value = getattr(settings, SETTING_PREFIX + name)
        nested = _nested_model(info)
        if nested is not None:
            if value:
                out[name] = {k: getattr(settings, SETTING_PREFIX + k) for k in nested.model_fields}
        elif name == MODEL_ARG:
            if value:
                out[name] = value
        else:
            out[name] = copy.deepcopy(value)
    return out
