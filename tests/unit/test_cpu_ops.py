"""The CPU NVFP4 fake-quant op against a plain reference of the NVFP4 math."""

from __future__ import annotations

import math

import pytest
import torch

from nvfp4_worker import cpu_ops

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e4m3_values() -> list[float]:
    """Every finite non-negative FP8 E4M3 (fn) value, built from its bit fields."""
    values = []
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue  # NaN
            if exponent == 0:
                values.append(mantissa / 8 * 2.0**-6)
            else:
                values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return sorted(values)


E4M3 = _e4m3_values()


def _nearest_even(x: float, grid: list[float], even: list[bool]) -> float:
    """Round to the nearest grid value; ties go to the value with an even mantissa."""
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - x), not even[i]))
    return grid[best]


E2M1_EVEN = [True, False, True, False, True, False, True, False]
E4M3_EVEN = [i % 2 == 0 for i in range(len(E4M3))]  # mantissa parity follows the index


def reference(x: torch.Tensor, global_amax: float, block: int = 16) -> torch.Tensor:
    """Element-by-element NVFP4: FP32 per-tensor scale, FP8 E4M3 block scales, E2M1 values."""
    global_scale = global_amax / (6.0 * 448.0)
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        new_row = []
        for start in range(0, len(row), block):
            values = row[start : start + block]
            block_amax = max(abs(v) for v in values)
            scaled = min(block_amax / (6.0 * global_scale), 448.0)
            scale = _nearest_even(scaled, E4M3, E4M3_EVEN) * global_scale
            if scale < 1e-5:
                scale = 1.0
            for v in values:
                q = _nearest_even(abs(v) / scale, E2M1_GRID, E2M1_EVEN) * scale
                new_row.append(math.copysign(q, v) if v != 0 else 0.0)
        out.append(new_row)
    return torch.tensor(out).reshape(x.shape)


def test_e4m3_table_matches_torch_cast() -> None:
    # Our independent table and torch's float8 type agree, so the reference is sound.
    table = torch.tensor(E4M3)
    assert torch.equal(table.to(torch.float8_e4m3fn).float(), table)
    assert E4M3[-1] == 448.0 and len(E4M3) == 127


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_weights(seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(8, 64) * (seed + 1)
    amax = float(x.abs().max())
    got = cpu_ops.nvfp4_fake_quant(x, torch.tensor(amax))
    want = reference(x, amax)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_values_on_the_grid_survive_exactly() -> None:
    # One block holding every E2M1 magnitude with both signs, amax 6: scales are exact.
    row = torch.tensor(E2M1_GRID + [-v for v in E2M1_GRID])
    x = row.reshape(1, 16)
    assert torch.equal(cpu_ops.nvfp4_fake_quant(x, torch.tensor(6.0)), x)


def test_ties_round_to_even_mantissa() -> None:
    # Block amax 6 keeps the block scale at 1, so each value is rounded by itself.
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 8])
    got = cpu_ops.nvfp4_fake_quant(x, torch.tensor(6.0))
    assert got[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_zero_block_and_bf16_dtype_and_odd_width() -> None:
    x = torch.zeros(2, 20, dtype=torch.bfloat16)
    x[1, 3] = 1.0
    got = cpu_ops.nvfp4_fake_quant(x, torch.tensor(1.0))
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert got[0].abs().sum() == 0 and got[1, 3] == 1.0


def test_relative_error_of_gaussian_weights_is_about_0_095() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    q = cpu_ops.nvfp4_fake_quant(w, w.abs().max())
    rel = float((q - w).norm() / w.norm())
    assert 0.08 < rel < 0.11


def test_modelopt_forward_runs_on_cpu_after_install() -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import tensor_quant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    data = torch.randn(4, 64)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(data))
    cpu_ops.install()
    assert tensor_quant.dynamic_block_quantize_op is cpu_ops.dynamic_block_quantize
    assert cpu_ops.install()  # idempotent
    with torch.no_grad():
        out = model(data)
    assert torch.isfinite(out).all()
    # The layer's own weight quantizer now gives the reference NVFP4 weight.
    layer = model[0]
    got = layer.weight_quantizer(layer.weight.detach())
    want = reference(layer.weight.detach(), float(layer.weight_quantizer.amax))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_signature_matches_modelopt_op() -> None:
    import inspect

    from modelopt.torch.quantization import tensor_quant

    theirs = inspect.signature(tensor_quant._dynamic_block_quantize_impl).parameters
    ours = inspect.signature(cpu_ops.dynamic_block_quantize).parameters
    assert list(theirs) == list(ours)


# --- the static block op (calibrated per-block amax: MSE sweep, four-over-six, ...) ------


def static_reference(
    x: torch.Tensor,
    amax: torch.Tensor,
    global_amax: float | None = None,
    quantize_block_scales: bool = True,
    fp8_max: float = 448.0,
) -> torch.Tensor:
    """Block by block: scale = amax / 6, stored as FP8 E4M3 relative to the global amax
    (normalised to `fp8_max`); each value the nearest E2M1 multiple; zero scale, zero block."""
    amaxes = amax.float().reshape(-1).tolist()
    if global_amax is None:
        global_amax = max(amaxes)
    scale_amax = global_amax * (448.0 / fp8_max) / 6.0
    rows = x.float().reshape(len(amaxes), -1).tolist()
    out = []
    for block_amax, values in zip(amaxes, rows, strict=True):
        scale = block_amax / 6.0
        if quantize_block_scales:
            scale = _nearest_even(scale * 448.0 / scale_amax, E4M3, E4M3_EVEN) * scale_amax / 448.0
        if scale == 0:
            out.append([0.0] * len(values))
            continue
        out.append(
            [
                math.copysign(_nearest_even(abs(v) / scale, E2M1_GRID, E2M1_EVEN) * scale, v)
                for v in values
            ]
        )
    return torch.tensor(out).reshape(x.shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_static_block_fake_quant_matches_reference(seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(6, 64) * (seed + 1)
    x[2, 16:32] = 0.0  # a zero block: zero amax, zero scale
    blocks = x.reshape(-1, 16)
    # Calibrated amaxes as a search would leave them: some below the block's maximum
    # (values clip to 6 x scale), some above it.
    amax = blocks.abs().amax(-1) * torch.empty(blocks.shape[0]).uniform_(0.7, 1.2)
    got = cpu_ops.static_block_fake_quant(x, amax)
    want = static_reference(x, amax)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got[2, 16:32].abs().sum() == 0
    assert got.shape == x.shape and got.dtype == x.dtype


def test_static_block_fake_quant_options() -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 32)
    amax = x.reshape(-1, 16).abs().amax(-1)
    # A given global amax and the four-over-six normalisation (FP8 max 256).
    got = cpu_ops.static_block_fake_quant(
        x, amax, torch.tensor(5.0), fp8_max_for_normalization=256.0
    )
    torch.testing.assert_close(
        got, static_reference(x, amax, 5.0, fp8_max=256.0), rtol=1e-6, atol=1e-7
    )
    # Unquantized block scales, a BF16 input and a float32 output.
    got = cpu_ops.static_block_fake_quant(
        x.bfloat16(), amax, quantize_block_scales=False, out_dtype=torch.float32
    )
    want = static_reference(x.bfloat16().float(), amax, quantize_block_scales=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_install_patches_both_ops_idempotently() -> None:
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    assert cpu_ops.install()
    first = (cpu_ops._original_op, cpu_ops._original_static)
    assert cpu_ops.install() and cpu_ops.install()
    assert tensor_quant.dynamic_block_quantize_op is cpu_ops.dynamic_block_quantize
    assert tensor_quantizer.static_blockwise_fp4_fake_quant is cpu_ops.static_block_fake_quant
    # The originals are kept once: a second install must not save our own op as ModelOpt's.
    assert (cpu_ops._original_op, cpu_ops._original_static) == first
    assert cpu_ops._original_op is not cpu_ops.dynamic_block_quantize
    assert cpu_ops._original_static is not cpu_ops.static_block_fake_quant
    assert cpu_ops._original_op is not None and cpu_ops._original_static is not None


def test_static_wrapper_routes_cpu_tensors_to_the_port() -> None:
    cpu_ops.install()
    torch.manual_seed(4)
    x = torch.randn(2, 32)
    amax = x.reshape(-1, 16).abs().amax(-1)
    got = cpu_ops.static_block_fake_quant(x, amax, None, True, 448.0, None, False)
    torch.testing.assert_close(got, static_reference(x, amax), rtol=1e-6, atol=1e-7)
