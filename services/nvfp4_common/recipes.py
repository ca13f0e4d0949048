"""Quantization recipes a job can name, and the quality target it can set.

A recipe is a ModelOpt calibration preset whose export vLLM serves (a standard ModelOpt
NVFP4 checkpoint: `quant_algo: NVFP4`, with an exclusion list). The names live here, not
in the worker, so the CLI can list and check them without ModelOpt installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Recipe:
    name: str
    preset: str  # the ModelOpt config (modelopt.torch.quantization.<preset>)
    summary: str  # one line for `jobs submit --help` and the model card
    # Module globs the preset leaves unquantized beyond the defaults (for size estimates).
    keeps: tuple[str, ...] = ()


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("nvfp4", "NVFP4_DEFAULT_CFG", "max calibration (ModelOpt's default)"),
        Recipe(
            "nvfp4-4over6",
            "NVFP4_FOUR_OVER_SIX_CFG",
            "per-block choice between scaling to 6 and to 4 (lower weight error)",
        ),
        Recipe(
            "nvfp4-mse",
            "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",
            "weight block scales searched over every FP8 value for least squared error",
        ),
        Recipe(
            "nvfp4-local-hessian",
            "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG",
            "weight block scales chosen by activation-weighted (local Hessian) error",
        ),
        Recipe(
            "nvfp4-awq-clip",
            "NVFP4_AWQ_CLIP_CFG",
            "weight clipping ranges searched on the calibration activations (AWQ clip)",
        ),
        Recipe(
            "nvfp4-mlp-only",
            "NVFP4_MLP_ONLY_CFG",
            "only the MLP layers in NVFP4; attention stays BF16 (larger, more accurate)",
            keeps=("self_attn",),
        ),
    )
}
DEFAULT_RECIPE = "nvfp4"
# Tried first, in this order, when a job sets a quality target but no recipe: cheapest
# first (max: one calibration pass; four-over-six adds a per-block choice at about the
# same cost). The slower recipes are picked by name.
SEARCH_LADDER = ("nvfp4", "nvfp4-4over6")
# The recipes layer-by-layer mode runs: their calibration reads only each layer's own
# weights and input ranges (max; four-over-six's weight MSE), so a layer calibrated alone
# exports what the whole model's job writes. The search ladder must be among them.
LAYERWISE_RECIPES = ("nvfp4", "nvfp4-4over6")
# ModelOpt presets left out because vLLM cannot serve their export, with the reason.
NOT_OFFERED = {
    "NVFP4_AWQ_LITE_CFG / NVFP4_AWQ_FULL_CFG": "export quant_algo NVFP4_AWQ with"
    " pre_quant_scale tensors, which vLLM's ModelOpt loader does not accept",
    "W4A16_NVFP4_CFG": "vLLM has no CPU kernel for weight-only NVFP4, and it is unverified"
    " on the GPU vLLM release the images ship",
    "NVFP4_SVDQUANT_DEFAULT_CFG": "adds low-rank BF16 branches vLLM does not load",
}


def recipe_help() -> str:
    return "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())


class QualityTarget(BaseModel):
    """What a job must keep; the worker publishes the smallest candidate that keeps it."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase_pct: float | None = Field(
        None, gt=0, le=1000, description="Held-out perplexity may rise at most this many %."
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Mean per-token KL divergence (nats) of the quantized model's next-token"
        " distribution from the original's, on the held-out text.",
    )
    max_size_gb: float | None = Field(
        None, gt=0, description="The checkpoint may be at most this many GB (10^9 bytes)."
    )

    @property
    def has_quality(self) -> bool:
        return self.max_ppl_increase_pct is not None or self.max_kl is not None

    def describe(self) -> str:
        parts = []
        if self.max_ppl_increase_pct is not None:
            parts.append(f"perplexity +{self.max_ppl_increase_pct:g}% at most")
        if self.max_kl is not None:
            parts.append(f"KL {self.max_kl:g} at most")
        if self.max_size_gb is not None:
            parts.append(f"{self.max_size_gb:g} GB at most")
        return ", ".join(parts)
