"""vLLM general plugin: serve ModelOpt NVFP4 checkpoints with vLLM's CPU build.

vLLM 0.32 registers no NVFP4 linear kernel for the CPU platform, so loading fails
with "Failed to find a kernel that can implement the NVFP4 linear layer". vLLM does
ship a pure-torch `EmulationNvFp4LinearKernel`; we register it for CPU, behind a
subclass that unpacks each FP4 weight once at load instead of on every forward
pass (the stock kernel's cost; about 10x slower). Activations are still
quantize-dequantized to NVFP4 per call, exactly as the stock kernel does, so
outputs are bit-identical (checked by `python -m nvfp4_serve.kernel_check`).

FP8 layers (an FP8 checkpoint, or the FP8 layers of a MIXED_PRECISION one) load with
vLLM's own CPU FP8 kernels. Loading requantizes fused layers (QKV, gate/up) to one
per-tensor scale through `ops.scaled_fp8_quant`, whose static form is a stub in the CPU
build ("_C::static_scaled_fp8_quant() expected at most 0 argument(s)"); `_static_fp8_quant`
is the same rounding in torch, used only for that per-tensor case. vLLM's CPU FP8 kernel
needs AMX, and some processes (seen in Ray Serve replicas) find none; vLLM's next choice
there, `torch._scaled_mm` on CPU, hangs, and takes activations pre-quantized by a fused
SiLU + FP8 op the CPU build lacks (`_C.silu_and_mul_quant`). So
`CachedEmulationFp8LinearKernel` comes right after the AMX kernel: the weight dequantized
once at load, the activation quantize-dequantized to FP8 with its calibrated scale per
call (W8A8, as on GPUs); it asks for unquantized input, so that fusion never runs.

Never a silent BF16 fallback: the layers keep their packed uint8 weights and
scales, and vLLM logs the chosen kernel ("Using CachedEmulationNvFp4LinearKernel
for NVFP4 GEMM"); `LOADED` counts the layers this process set up.

Loaded by vLLM in every engine process through the `vllm.general_plugins` entry
point (pyproject.toml); `register` must be idempotent and cheap.
"""

from __future__ import annotations

import logging
from typing import Any

# A child of vLLM's logger, so lines appear in vLLM's format wherever it logs.
logger = logging.getLogger("vllm.nvfp4_serve")

LOADED = {"cached": 0, "stock": 0}
_registered = False


def _kernel_classes() -> tuple[type, type]:
    import torch
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype,
        ref_nvfp4_quant_dequant,
    )

    class CachedEmulationNvFp4LinearKernel(EmulationNvFp4LinearKernel):
        """The stock emulation kernel with the weight dequantized once, at load."""

        def process_weights_after_loading(self, layer: Any) -> None:
            super().process_weights_after_loading(layer)
            dtype = getattr(layer, "params_dtype", torch.bfloat16)
            # The same call the stock kernel makes per forward pass, made once.
            w_dq = dequantize_to_dtype(
                layer.weight.data.view(torch.uint8),
                layer.weight_scale.data,
                layer.weight_global_scale,
                dtype,
                16,
                swizzle=False,
            )
            layer.register_buffer("nvfp4_dequant_weight_t", w_dq.t(), persistent=False)
            LOADED["cached"] += 1
            if LOADED["cached"] == 1:
                logger.info(
                    "nvfp4_serve: NVFP4 weights unpacked once at load (packed %s %s kept)",
                    layer.weight.dtype,
                    tuple(layer.weight.shape),
                )

        def apply_weights(
            self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            w_t = layer.nvfp4_dequant_weight_t
            if x.dtype != w_t.dtype:  # only if activations change dtype after load
                return super().apply_weights(layer, x, bias)
            x_dq = ref_nvfp4_quant_dequant(x, layer.input_global_scale_inv, block_size=16)
            out = torch.matmul(x_dq, w_t)
            return out + bias if bias is not None else out

    class CountingEmulationNvFp4LinearKernel(EmulationNvFp4LinearKernel):
        """vLLM's stock kernel, counted (used when the cache is turned off)."""

        def process_weights_after_loading(self, layer: Any) -> None:
            super().process_weights_after_loading(layer)
            LOADED["stock"] += 1

    return CachedEmulationNvFp4LinearKernel, CountingEmulationNvFp4LinearKernel


def _fp8_kernel_class() -> type:
    import torch
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import (
        PerTensorTorchFP8ScaledMMLinearKernel,
    )
    from vllm.platforms import current_platform

    class CachedEmulationFp8LinearKernel(PerTensorTorchFP8ScaledMMLinearKernel):
        """Per-tensor FP8 in plain torch: the weight dequantized once, at load."""

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            return (True, None) if current_platform.is_cpu() else (False, "CPU only")

        def input_quant_key(self) -> Any:
            return None  # takes the activation unquantized and quantizes it itself

        def process_weights_after_loading(self, layer: Any) -> None:
            w_name, w_s_name, _, _ = self.layer_param_names
            weight = getattr(layer, w_name)  # (K, N) FP8 after Fp8LinearMethod's transpose
            dtype = getattr(layer, "orig_dtype", None) or torch.bfloat16
            w = weight.float() * getattr(layer, w_s_name).float()
            layer.register_buffer("fp8_dequant_weight", w.to(dtype), persistent=False)
            LOADED["fp8"] = LOADED.get("fp8", 0) + 1

        def apply_weights(
            self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            w = layer.fp8_dequant_weight
            _, _, x_s_name, _ = self.layer_param_names
            scale = getattr(layer, x_s_name, None)
            if scale is not None:  # static per-tensor activation scale, as ModelOpt writes
                x = (_to_fp8(x, scale).float() * scale.float()).to(w.dtype)
            out = torch.matmul(x.to(w.dtype), w)
            return out + bias if bias is not None else out

    return CachedEmulationFp8LinearKernel


def _to_fp8(x: Any, scale: Any) -> Any:
    """x / scale rounded to FP8 E4M3, saturating: vLLM's static per-tensor quantization."""
    import torch

    limit = torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale.float()).clamp(-limit, limit).to(torch.float8_e4m3fn)


def _static_fp8_quant(original: Any) -> Any:
    """`ops.scaled_fp8_quant` with a per-tensor static scale done in torch on CPU."""
    import torch

    def scaled_fp8_quant(
        input: torch.Tensor,
        scale: torch.Tensor | None = None,
        *args: Any,
        output: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if scale is None or scale.numel() != 1 or args or kwargs.get("num_token_padding"):
            return original(input, scale, *args, output=output, **kwargs)
        q = _to_fp8(input, scale)
        if output is not None:
            output.copy_(q)
            q = output
        return q, scale

    scaled_fp8_quant.nvfp4_serve = True  # type: ignore[attr-defined]
    return scaled_fp8_quant


def _register_fp8_fallback() -> None:
    """Our FP8 kernel right after vLLM's AMX one, before `torch._scaled_mm`."""
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    kernels = linear._POSSIBLE_FP8_KERNELS[PlatformEnum.CPU]
    if any(k.__name__ == "CachedEmulationFp8LinearKernel" for k in kernels):
        return
    amx = [i for i, k in enumerate(kernels) if k.__name__ == "CPUFp8PerTensorScaledMMLinearKernel"]
    kernels.insert(amx[0] + 1 if amx else 0, _fp8_kernel_class())


def register() -> None:
    """Entry point: make NVFP4 linear layers loadable on vLLM's CPU platform."""
    global _registered
    if _registered:
        return
    from vllm.platforms import PlatformEnum, current_platform

    if not current_platform.is_cpu():
        return  # GPUs have real NVFP4 kernels (Marlin, CUTLASS)
    from vllm.model_executor.kernels.linear import register_linear_kernel

    from nvfp4_common.settings import get_settings

    cached, stock = _kernel_classes()
    # Set by NVFP4_SERVE_CPU_WEIGHT_CACHE, or by build_app's arg through the replica's env.
    if get_settings().serving.cpu_weight_cache:
        register_linear_kernel(cached, PlatformEnum.CPU, "nvfp4")
    # The stock kernel comes second: reached only when the first is disabled
    # (VLLM_DISABLED_KERNELS=CachedEmulationNvFp4LinearKernel) or turned off.
    register_linear_kernel(stock, PlatformEnum.CPU, "nvfp4")
    from vllm import _custom_ops as ops

    if not getattr(ops.scaled_fp8_quant, "nvfp4_serve", False):
        ops.scaled_fp8_quant = _static_fp8_quant(ops.scaled_fp8_quant)
    _register_fp8_fallback()
    _registered = True
    logger.info(
        "nvfp4_serve: NVFP4 emulation kernels and static FP8 quantization registered for CPU"
    )


def kernel_report(model: Any) -> dict[str, Any]:
    """Per-kernel count of NVFP4 linear layers in a loaded vLLM model."""
    kinds: dict[str, int] = {}
    packed = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
        if kernel is None or not hasattr(module, "weight_global_scale"):
            continue
        kinds[type(kernel).__name__] = kinds.get(type(kernel).__name__, 0) + 1
        packed += int(str(module.weight.dtype) == "torch.uint8")
    return {"kernels": kinds, "packed_uint8_layers": packed}
