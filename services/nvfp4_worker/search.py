"""The quality-target search: the smallest checkpoint that keeps a job's target.

Cheapest first. Each recipe of the ladder is calibrated and measured with every layer
quantized; the first that keeps the target wins. Otherwise the recipe that came closest
(lowest KL) is kept, each decoder layer's sensitivity is measured (the KL divergence of
the model with only that layer quantized, on a slice of the calibration text, so the
held-out text stays a fair judge), and the most sensitive layers are kept in BF16: a
bisection finds the fewest that keep the target, within the size budget. Keeping a
layer disables its quantizers in place, which exports the same checkpoint as excluding
it up front (every quantizer's calibration is its own), so no candidate recalibrates.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nvfp4_common.recipes import QualityTarget

# A decoder layer of a Hugging Face causal LM: model.layers.12, transformer.h.3, ...
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")
_QUANTIZERS = ("weight_quantizer", "input_quantizer", "output_quantizer")


@dataclass
class Candidate:
    recipe: str
    kept: tuple[str, ...]  # decoder layers kept in BF16, most sensitive first
    size_bytes: int  # estimated checkpoint size
    perplexity: float | None
    ppl_change_pct: float | None
    kl: float | None
    wall_s: float
    meets: bool = False
    why_not: str = ""

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept"] = list(self.kept)
        return out

    def describe(self) -> str:
        ppl = "n/a" if self.ppl_change_pct is None else f"{self.ppl_change_pct:+.1f}%"
        kl = "n/a" if self.kl is None else f"{self.kl:.4f}"
        return (
            f"{self.recipe}, {len(self.kept)} layers in BF16: perplexity {ppl}, KL {kl},"
            f" {self.size_bytes / 1e9:.3f} GB"
        )


def judge(c: Candidate, target: QualityTarget) -> Candidate:
    """Mark whether `c` keeps every part of the target, and if not, why."""
    misses = []
    if target.max_ppl_increase_pct is not None and (
        c.ppl_change_pct is None or c.ppl_change_pct > target.max_ppl_increase_pct
    ):
        misses.append(f"perplexity above +{target.max_ppl_increase_pct:g}%")
    if target.max_kl is not None and (c.kl is None or c.kl > target.max_kl):
        misses.append(f"KL above {target.max_kl:g}")
    if target.max_size_gb is not None and c.size_bytes > target.max_size_gb * 1e9:
        misses.append(f"larger than {target.max_size_gb:g} GB")
    c.meets, c.why_not = not misses, "; ".join(misses)
    return c


class Layers:
    """The quantized linear modules of each decoder layer, and switching them off."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.units: dict[str, list[Any]] = {}
        for name, module in model.named_modules():
            match = _LAYER.match(name + ".")
            if match is None or match.group(1) == name:
                continue
            quantizers = [
                q
                for q in (getattr(module, attr, None) for attr in _QUANTIZERS)
                if q is not None and getattr(q, "is_enabled", False)
            ]
            if quantizers and hasattr(module, "weight"):
                self.units.setdefault(match.group(1), []).extend(quantizers)
        self.kept: set[str] = set()

    def keep(self, kept: Iterable[str]) -> None:
        """Exactly these layers unquantized; the others as calibrated."""
        want = set(kept)
        for unit, quantizers in self.units.items():
            for q in quantizers:
                if unit in want:
                    q.disable()
                else:
                    q.enable()
        self.kept = want


@dataclass
class Outcome:
    chosen: Candidate | None
    candidates: list[Candidate]
    sensitivity: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> Candidate | None:
        """The candidate that came closest: lowest KL (then perplexity)."""
        scored = [c for c in self.candidates if c.kl is not None or c.perplexity is not None]
        return (
            min(scored, key=lambda c: (c.kl if c.kl is not None else 0, c.perplexity or 0))
            if scored
            else None
        )


# (kept layers) -> candidate measured on the held-out text
Evaluate = Callable[[tuple[str, ...]], Candidate]
# (layers) -> KL of the model with only these layers quantized, on the calibration slice
Probe = Callable[[], float | None]


def sensitivity(layers: Layers, probe: Probe, log: Callable[[str], None]) -> dict[str, float]:
    """KL of the model with only one layer quantized, for each layer."""
    names = list(layers.units)
    out: dict[str, float] = {}
    started = time.monotonic()
    for i, unit in enumerate(names):
        layers.keep(n for n in names if n != unit)
        out[unit] = probe() or 0.0
        if i == 0:
            each = time.monotonic() - started
            log(f"sensitivity: {len(names)} layers, about {each * len(names):.0f} s")
    layers.keep(())
    return out


def keep_layers(
    layers: Layers,
    order: list[str],
    evaluate: Evaluate,
    target: QualityTarget,
    size_of: Callable[[tuple[str, ...]], int],
    candidates: list[Candidate],
) -> Candidate | None:
    """Bisection for the fewest of the most sensitive layers to keep in BF16."""
    # Keeping every layer would publish the original: at least one stays quantized.
    most = len(order) - 1
    if target.max_size_gb is not None:
        while most > 0 and size_of(tuple(order[:most])) > target.max_size_gb * 1e9:
            most -= 1

    def trial(k: int) -> Candidate:
        kept = tuple(order[:k])
        layers.keep(kept)
        c = judge(evaluate(kept), target)
        candidates.append(c)
        return c

    # Keeping more of the most sensitive layers only helps: the answer is the smallest
    # k in [1, most] that keeps the target, if any does.
    best: Candidate | None = None
    low, high = 1, most
    while low <= high:
        mid = (low + high) // 2
        c = trial(mid)
        if c.meets:
            best, high = c, mid - 1
        else:
            low = mid + 1
    if best is None:
        layers.keep(())
        return None
    layers.keep(best.kept)
    return best
