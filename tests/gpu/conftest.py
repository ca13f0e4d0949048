"""GPU tests: the worker's quantization on CUDA, vLLM and the serving app on a real GPU.

Skipped without CUDA (CI has none); `tests/gpu/run_on_device.sh` runs them on a GPU
machine. The model is small but big enough for vLLM's NVFP4 Marlin kernel, whose tiles
need layer widths that are multiples of 64/128 (the 64-wide test model of tests/fixtures
is too narrow for it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .support import SMALL_SHAPE, cuda_available, quantize

ROOT = Path(__file__).resolve().parents[2]
# bench/gpu_model.py makes the model: the same code as the 8B-shaped benchmark model.
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="session")
def small_bf16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not cuda_available():
        pytest.skip("needs a CUDA GPU")
    from gpu_model import make_model

    from tests.fixtures.text import write_text_file

    sources = tmp_path_factory.mktemp("gpu-sources")
    model = sources / "small-qwen3-bf16"
    make_model(model, SMALL_SHAPE, device="cuda")
    calib = write_text_file(sources / "calib.txt", max_chars=200_000)
    return model, calib


@pytest.fixture(scope="session")
def gpu_nvfp4(small_bf16: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, calib = small_bf16
    return quantize(model, calib, tmp_path_factory.mktemp("published"), "cuda", "small-gpu")
