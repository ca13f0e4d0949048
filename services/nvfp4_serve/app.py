"""`build_app(args)`: the Ray Serve application serving one NVFP4 (or any) checkpoint.

Used as `import_path: nvfp4_serve.app:build_app` by `serve run`, `serve deploy` and
KubeRay's serveConfigV2. Ray Serve LLM's `build_openai_app` does the real work (the
OpenAI routes, streaming, replicas, autoscaling); this module turns our settings
into its LLMConfig and checks the checkpoint and the memory first. With direct
streaming (the serving default, nvfp4_common.serving.RAY_ENV_DEFAULTS) the engine replica
is the ingress and adds API keys, request checks and health routes to vLLM's app
(nvfp4_serve.direct); without it, an ingress of ours adds them (nvfp4_serve.ingress).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment, build_openai_app

from nvfp4_common.checkpoint_files import check_folder
from nvfp4_common.meminfo import read_meminfo
from nvfp4_common.serving import DIRECT_STREAMING_ENV, SETTING_PREFIX
from nvfp4_common.settings import Settings, get_settings
from nvfp4_serve.checkpoint import Checkpoint, CheckpointError, inspect_checkpoint, resolve_local
from nvfp4_serve.config import ServeArgs, load_args
from nvfp4_serve.direct import LLMServer as DirectLLMServer
from nvfp4_serve.direct import direct_options
from nvfp4_serve.preflight import GIB, plan_memory
from nvfp4_serve.ray_hooks import log_missing_hooks

logger = logging.getLogger(__name__)


def _effective_max_len(args: ServeArgs, ckpt: Checkpoint | None) -> int:
    limit = ckpt.max_position_embeddings if ckpt else None
    if limit and args.max_model_len > limit:
        # vLLM refuses a max_model_len beyond max_position_embeddings; clamp instead.
        logger.warning(
            "max_model_len %d exceeds the model's max_position_embeddings %d; serving %d",
            args.max_model_len,
            limit,
            limit,
        )
        return limit
    return args.max_model_len


def _quantization(args: ServeArgs, ckpt: Checkpoint | None) -> str | None:
    if args.quantization == "none":
        return None
    if args.quantization != "auto":
        return args.quantization
    return ckpt.vllm_quantization if ckpt else None  # vLLM detects it for remote models


def _preflight(args: ServeArgs, ckpt: Checkpoint | None, max_len: int) -> None:
    if not args.preflight or not (args.accelerator == "cpu" or args.unified_memory):
        return
    if ckpt is None:
        logger.warning("preflight skipped: %s is not available locally", args.model)
        return
    plan = plan_memory(
        read_meminfo(),
        weights_bytes=ckpt.weights_bytes,
        kv_bytes_per_token=ckpt.kv_bytes_per_token,
        max_model_len=max_len,
        overhead_bytes=int(args.memory_overhead_gb * GIB),
        gpu_memory_utilization=args.gpu_memory_utilization if args.unified_memory else None,
    )
    logger.info(
        "preflight ok: %s; gpu_memory_utilization up to %.2f fits",
        plan.summary(),
        plan.suggested_gpu_memory_utilization,
    )


def setting_env(name: str) -> str:
    """The environment variable of a serving config field, e.g. NVFP4_SERVE_MAX_MODEL_LEN."""
    return f"{Settings.model_config.get('env_prefix', '')}{SETTING_PREFIX}{name}".upper()


def direct_streaming() -> bool:
    """Whether Ray Serve LLM serves through the engine replica with no ingress deployment
    (nvfp4_serve.direct); Ray's own variable, read as Ray reads it."""
    return os.environ.get(DIRECT_STREAMING_ENV, "0") == "1"


def llm_config(args: ServeArgs, ckpt: Checkpoint | None) -> LLMConfig:
    """The Ray Serve LLM config for `args` (exposed for tests and the CLI)."""
    max_len = _effective_max_len(args, ckpt)
    _preflight(args, ckpt, max_len)
    engine: dict[str, Any] = {
        "max_model_len": max_len,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.accelerator == "gpu":
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    quant = _quantization(args, ckpt)
    if quant:
        engine["quantization"] = quant
    engine.update(args.engine_kwargs)  # untouched; clashes were refused in ServeArgs

    if args.autoscaling is not None:
        deployment: dict[str, Any] = {"autoscaling_config": args.autoscaling.model_dump()}
    else:
        deployment = {"num_replicas": args.num_replicas}
    extra: dict[str, Any] = {}
    experimental: dict[str, Any] = {"stream_batching_interval_ms": args.stream_batching_interval_ms}
    if direct_streaming():
        # The engine replica is the ingress (build_app_with): it takes our keys, health
        # routes and aliases.
        experimental.update(
            direct_options(args.api_key_file, args.readiness_prompt, args.model_aliases)
        )
    elif args.first_chunk_now:
        extra["server_cls"] = "nvfp4_serve.server:LLMServer"
    if args.accelerator == "cpu":
        # Without this Ray Serve LLM asks for GPUs and the replica never schedules.
        extra["accelerator_config"] = {"kind": "cpu"}
        # The vLLM plugin reads it from the settings in each engine process; Serve merges
        # these env_vars with the application's own runtime_env.
        flag = "true" if args.cpu_weight_cache else "false"
        extra["runtime_env"] = {"env_vars": {setting_env("cpu_weight_cache"): flag}}
    return LLMConfig(
        model_loading_config={
            "model_id": args.served_name,
            "model_source": str(ckpt.path) if ckpt else args.model,
        },
        engine_kwargs=engine,
        deployment_config=deployment,
        experimental_configs=experimental,
        **extra,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Build the serving application; `args` override the NVFP4_SERVE_* settings.

    Ray Serve calls builders with exactly one argument, the `args` of the config.

    Raises:
        ValueError: bad args or an unservable checkpoint (one line that says what to do).
        PreflightError: the model does not fit in free memory (with the numbers).
    """
    return build_app_with(get_settings(), args)


def build_app_with(settings: Settings, args: dict[str, Any] | None) -> Application:
    """`build_app` with explicit settings (tests, the admin CLI)."""
    serve_args = load_args(settings, args)
    log_missing_hooks()
    try:
        local = resolve_local(serve_args.model)
        if local is not None:
            # A damaged copy (cut-short shard, broken JSON, no tokenizer) fails here in one
            # line instead of in every replica, which Ray would restart again and again.
            check_folder(local, tokenizer=not serve_args.engine_kwargs.get("tokenizer"))
        ckpt = inspect_checkpoint(local) if local else None
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if settings.env == "production" and not (settings.serve_api_keys or serve_args.api_key_file):
        # Checked here to fail the deploy at once; the ingress checks again where
        # the key file is mounted.
        raise ValueError(
            "production serving needs API keys: set NVFP4_SERVE_API_KEYS or api_key_file"
        )
    config = llm_config(serve_args, ckpt)
    logger.info(
        "serving %s as %r (quantization=%s, max_model_len=%s, accelerator=%s)",
        config.model_loading_config.model_source,
        serve_args.served_name,
        config.engine_kwargs.get("quantization"),
        config.engine_kwargs["max_model_len"],
        serve_args.accelerator,
    )
    if direct_streaming():
        # The engine deployment is the ingress, behind HAProxy, which balances its replicas
        # itself (least connections). Ray's builder for the mode would put its request
        # router, a deployment HAProxy asks for every request, in between: one more hop
        # per request (docs/serving.md).
        return build_llm_deployment(config, deployment_cls=serve.ingress()(DirectLLMServer))
    return build_openai_app(
        {
            "llm_configs": [config],
            "ingress_cls_config": {
                "ingress_cls": "nvfp4_serve.ingress:NVFP4Ingress",
                "ingress_extra_kwargs": {
                    "api_key_file": str(serve_args.api_key_file)
                    if serve_args.api_key_file
                    else None,
                    "readiness_prompt": serve_args.readiness_prompt,
                    "model_aliases": serve_args.model_aliases,
                },
            },
        }
    )
