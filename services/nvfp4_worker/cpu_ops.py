"""A pure-torch NVFP4 fake-quantization op, so quantized models run forward on a CPU.

ModelOpt computes NVFP4 fake quantization with a CUDA extension or a Triton kernel and
asserts that `amax` is a CUDA tensor ("amax must be a CUDA tensor for dynamic block
quantization"). Calibration with the `max` algorithm never fake-quantizes, so it works on
a CPU, but evaluating the quantized model does not. `install()` swaps the module-level
`dynamic_block_quantize_op` that `tensor_quant._dynamic_block_quantize_forward` calls for
`dynamic_block_quantize` below, which follows the Triton kernel's math
(modelopt/torch/kernels/quantization/common/nvfp4_quant.py) element for element:

    global_scale = amax / (6 * 448)                               (FP32, per tensor)
    block_scale  = fp8_e4m3(min(block_amax / (6 * global_scale), 448)) * global_scale
    q            = nearest E2M1 magnitude of |x| / block_scale    (blocks of 16)
    y            = sign(x) * q * block_scale
"""

from __future__ import annotations

from collections.abc import Callable

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
# Smallest block scale the kernel keeps; below it the block is scaled by 1 instead (so an
# all-zero block stays zero rather than dividing by zero).
_MIN_BLOCK_SCALE = 1e-5
_MIN_GLOBAL_SCALE = 1e-12

_original_op: Callable[..., torch.Tensor] | None = None
_original_static: Callable[..., torch.Tensor] | None = None


def _round_to_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """Round non-negative values to the nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}.

    The thresholds are the kernel's: ties go to the value with an even mantissa
    (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    """
    m = magnitude
    return torch.where(
        m <= 0.25,
        0.0,
        torch.where(
            m < 0.75,
            0.5,
            torch.where(
                m <= 1.25,
                1.0,
                torch.where(
                    m < 1.75,
                    1.5,
                    torch.where(
                        m <= 2.5,
                        2.0,
                        torch.where(m < 3.5, 3.0, torch.where(m <= 5.0, 4.0, 6.0)),
                    ),
                ),
            ),
        ),
    )


def nvfp4_fake_quant(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_size: int = NVFP4_BLOCK
) -> torch.Tensor:
    """Quantize `x` to NVFP4 and back, in blocks of `block_size` along the last dimension.

    Args:
        x: any shape; a last dimension that is not a multiple of the block is zero-padded
            (as the kernel's boundary check does) and the padding dropped again.
        global_amax: the tensor's calibrated absolute maximum (per-tensor FP32 scale).
        block_size: elements that share one FP8 E4M3 scale.

    Returns:
        A tensor of x's shape and dtype holding the dequantized values.
    """
    shape, dtype = x.shape, x.dtype
    last = shape[-1] if x.dim() else 1
    flat = x.reshape(-1, last).float()
    pad = (-last) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.reshape(flat.shape[0], -1, block_size)

    amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device)
    global_scale = (amax.float() / (E2M1_MAX * E4M3_MAX)).reshape(())
    global_scale = torch.where(global_scale > 0, global_scale, _MIN_GLOBAL_SCALE)

    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    in_fp8_range = torch.clamp(block_amax / (E2M1_MAX * global_scale), max=E4M3_MAX)
    block_scale = in_fp8_range.to(torch.float8_e4m3fn).float() * global_scale
    block_scale = torch.where(block_scale >= _MIN_BLOCK_SCALE, block_scale, 1.0)

    q = _round_to_e2m1(blocks.abs() / block_scale) * block_scale
    y = torch.where(blocks >= 0, q, -q).reshape(flat.shape)
    if pad:
        y = y[:, :last]
    return y.reshape(shape).to(dtype)


def dynamic_block_quantize(
    inputs: torch.Tensor,
    block_size: int,
    amax: torch.Tensor | None,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> torch.Tensor:
    """Drop-in for `tensor_quant.dynamic_block_quantize_op` (same signature).

    Handles NVFP4 (E2M1 values, E4M3 scales) on CPU tensors; CUDA tensors and every
    other format go to ModelOpt's own op.
    """
    is_nvfp4 = (exponent_bits, num_bits - exponent_bits - 1) == (2, 1) and (
        scale_exponent_bits,
        scale_num_bits - scale_exponent_bits - 1,
    ) == (4, 3)
    if inputs.is_cuda or not is_nvfp4:
        assert _original_op is not None, "cpu_ops.install() was not called"
        return _original_op(
            inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
        )
    if amax is None:
        amax = inputs.detach().abs().amax()
    elif amax.numel() != 1:
        amax = amax.amax()  # the kernel also reduces a per-channel amax to one scale
    return nvfp4_fake_quant(inputs, amax, block_size)


def install() -> bool:
    """Route ModelOpt's dynamic and static NVFP4 block quantization through the CPU ports.

    The static op backs the recipes that search weight block scales (MSE sweep,
    four-over-six, local Hessian): ModelOpt refuses it without Triton
    ("static_blockwise_fp4_fake_quant requires triton"). Idempotent. Returns True when
    the patches are (now) in place.
    """
    global _original_op, _original_static
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    if tensor_quant.dynamic_block_quantize_op is not dynamic_block_quantize:
        _original_op = tensor_quant.dynamic_block_quantize_op
        tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize
    if tensor_quantizer.static_blockwise_fp4_fake_quant is not static_block_fake_quant:
        _original_static = tensor_quantizer.static_blockwise_fp4_fake_quant
        tensor_quantizer.static_blockwise_fp4_fake_quant = static_block_fake_quant
    return True


def static_block_fake_quant(
    x: torch.Tensor,
    amax: torch.Tensor,
    global_amax: torch.Tensor | None = None,
    quantize_block_scales: bool = True,
    fp8_max_for_normalization: float = E4M3_MAX,
    out_dtype: torch.dtype | None = None,
    pass_through_bwd: bool = False,
) -> torch.Tensor:
    """NVFP4 fake quantization with calibrated per-block amax values (static block scales).

    A drop-in for the name `static_blockwise_fp4_fake_quant` in ModelOpt's
    tensor_quantizer module (same signature): CUDA tensors go to ModelOpt's own op. On a
    CPU it follows ModelOpt's Triton kernel (kernels/quantization/gemm/fp4_kernel.py,
    `static_blockwise_fp4_fake_quant` and `compute_fp4_scales`): scale = amax / 6, stored
    as FP8 E4M3 relative to the tensor's global amax; a zero scale gives a zero block.
    """
    if x.is_cuda:
        assert _original_static is not None, "cpu_ops.install() was not called"
        args = (global_amax, quantize_block_scales, fp8_max_for_normalization, out_dtype)
        return _original_static(x, amax, *args, pass_through_bwd)
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl

    blocks = amax.numel()
    scale = amax.float() / E2M1_MAX
    if quantize_block_scales:
        if global_amax is None:
            global_amax = amax.float().amax()
        scale_amax = global_amax.float() * (E4M3_MAX / fp8_max_for_normalization) / E2M1_MAX
        scale = scaled_e4m3_impl(scale, scale_amax)
    scale = scale.reshape(blocks, 1)
    flat = x.reshape(blocks, -1).float()
    bad = (scale == 0) | ~torch.isfinite(scale)
    safe = torch.where(bad, 1.0, scale)
    q = _round_to_e2m1(flat.abs() / safe) * safe
    y = torch.where(bad, 0.0, torch.where(flat >= 0, q, -q))
    return y.reshape(x.shape).to(out_dtype or x.dtype)
