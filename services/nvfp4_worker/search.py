"""The quality-target search: the smallest checkpoint that keeps a job's target.

Cheapest first. Each recipe of the ladder is calibrated and measured with every layer
quantized; the first that keeps the target wins. Otherwise the recipe that came closest
(lowest KL) is kept, each decoder layer's sensitivity is measured (the KL divergence of
the model with only that layer quantized, on a slice of the calibration text, so the
held-out text stays a fair judge), and the most sensitive layers are kept in higher
precision: FP8 first (8 bits a weight against BF16's 16), then BF16 if no number of FP8
layers keeps the target. A bisection, guided by the sensitivities, finds the fewest
layers that keep it, within the size budget. No candidate recalibrates:
- keeping a layer in BF16 disables its quantizers in place, which exports the same
  checkpoint as excluding it up front (every quantizer's calibration is its own);
- keeping it in FP8 swaps in per-tensor FP8 quantizers whose ranges come from what the
  NVFP4 ones already hold: the weight's absolute maximum, and the input quantizer's
  calibrated per-tensor amax (the same maximum FP8's max calibration would find).
  ModelOpt exports such a model as MIXED_PRECISION, which vLLM loads (modelopt_mixed).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import torch

from nvfp4_common.recipes import QualityTarget

# A decoder layer of a Hugging Face causal LM: model.layers.12, transformer.h.3, ...
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")
_QUANTIZERS = ("weight_quantizer", "input_quantizer", "output_quantizer")
# ModelOpt's fused MoE experts: `<proj>_weight_quantizers`, a ModuleList with one per expert
_EXPERT_QUANTIZERS = "_weight_quantizers"


# The precisions a layer can be kept in, cheapest first.
KEEP_PRECISIONS = ("fp8", "bf16")


@dataclass
class Candidate:
    recipe: str
    kept: tuple[str, ...]  # decoder layers kept in higher precision, most sensitive first
    size_bytes: int  # estimated checkpoint size
    perplexity: float | None
    ppl_change_pct: float | None
    kl: float | None
    wall_s: float
    kept_as: str = "bf16"  # the precision of the kept layers: "fp8" or "bf16"
    meets: bool = False
    why_not: str = ""

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept"] = list(self.kept)
        return out

    def describe(self) -> str:
        ppl = "n/a" if self.ppl_change_pct is None else f"{self.ppl_change_pct:+.1f}%"
        kl = "n/a" if self.kl is None else f"{self.kl:.4f}"
        kept = (
            f"{len(self.kept)} layers in {self.kept_as.upper()}"
            if self.kept
            else "every layer quantized"
        )
        return f"{self.recipe}, {kept}: perplexity {ppl}, KL {kl}, {self.size_bytes / 1e9:.3f} GB"


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


def closest(candidates: list[Candidate]) -> Candidate:
    """The every-layer candidate that came closest (lowest KL, then perplexity): its
    recipe is the one whose layers the search keeps."""
    return min(candidates, key=lambda c: (c.kl or 0.0, c.perplexity or 0.0))


class Keeps(Protocol):
    """What the bisection sets before it measures a candidate: `Layers` on a whole model;
    layer by layer, each pass applies the candidate itself (NoModel)."""

    def keep(self, kept: Iterable[str], precision: str = "bf16") -> None: ...


class NoModel:
    """`Keeps` for a search whose measurement applies the candidate (layer by layer)."""

    def keep(self, kept: Iterable[str], precision: str = "bf16") -> None:
        pass


class Layers:
    """The quantized weights of each decoder layer, and keeping them in higher precision
    (in place, reversibly): linear modules, and the fused experts of an MoE layer (one
    weight quantizer per expert, one input quantizer per projection)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.units: dict[str, list[_Part]] = {}
        for name, module in model.named_modules():
            match = _LAYER.match(name + ".")
            if match is None or match.group(1) == name:
                continue
            parts = _parts(module)
            if parts:
                self.units.setdefault(match.group(1), []).extend(parts)
        self._fp8: dict[_Part, dict[_Slot, Any] | None] = {}  # made on first use
        self.kept: set[str] = set()
        self.kept_as = "bf16"

    def keep(self, kept: Iterable[str], precision: str = "bf16") -> None:
        """Exactly these layers in `precision` ("fp8" or "bf16"); the others as calibrated."""
        if precision not in KEEP_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        want = set(kept)
        for unit, parts in self.units.items():
            for part in parts:
                mode = precision if unit in want else "own"
                twins = self._fp8_twins(part) if mode == "fp8" else None
                if mode == "fp8" and twins is None:
                    mode = "bf16"  # no calibrated input range to give FP8: keep it in BF16
                for slot, own in part.own.items():
                    slot.put((twins or {}).get(slot, own))
                    own.disable() if mode == "bf16" else own.enable()
        self.kept, self.kept_as = want, precision

    def _fp8_twins(self, part: _Part) -> dict[_Slot, Any] | None:
        """FP8 quantizers for the part, or None when its input never saw calibration data
        (an MoE expert no calibration token was routed to)."""
        if part not in self._fp8:
            amaxes = {slot: part.own[slot].amax for slot in part.inputs}
            twins: dict[_Slot, Any] | None = None
            if all(a is not None for a in amaxes.values()):
                twins = {s: _fp8_quantizer(a.detach().float().amax()) for s, a in amaxes.items()}
                for slot, weight in part.weights.items():
                    twins[slot] = _fp8_quantizer(weight.detach().abs().amax())
            self._fp8[part] = twins
        return self._fp8[part]


@dataclass(frozen=True)
class _Slot:
    """Where a quantizer lives: an attribute of a module, or an item of a ModuleList."""

    holder: torch.nn.Module
    key: str | int

    def get(self) -> Any:
        if isinstance(self.key, int):
            return cast(torch.nn.ModuleList, self.holder)[self.key]
        return getattr(self.holder, self.key, None)

    def put(self, quantizer: Any) -> None:
        if isinstance(self.key, int):
            cast(torch.nn.ModuleList, self.holder)[self.key] = quantizer
        else:
            setattr(self.holder, self.key, quantizer)


@dataclass(eq=False)
class _Part:
    """One projection's calibrated quantizers (enabled ones only), and the weights that
    its weight quantizers quantize."""

    own: dict[_Slot, Any]
    weights: dict[_Slot, torch.Tensor]
    inputs: list[_Slot]


def _parts(module: torch.nn.Module) -> list[_Part]:
    """The quantized projections of `module`: itself when it is a quantized linear module,
    each fused projection of ModelOpt's fused-experts wrapper (`gate_up_proj` with its
    `gate_up_proj_weight_quantizers`, one per expert, and `gate_up_proj_input_quantizer`)."""
    parts = []
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        slots = [_Slot(module, a) for a in _QUANTIZERS]
        weights = {_Slot(module, "weight_quantizer"): cast(torch.Tensor, module.weight)}
        parts.append(_part(slots, weights, [_Slot(module, "input_quantizer")]))
    for attr, child in module.named_children():
        proj = attr.removesuffix(_EXPERT_QUANTIZERS)
        weight = getattr(module, proj, None)
        if proj == attr or not isinstance(weight, torch.Tensor):
            continue
        weights = {_Slot(child, i): weight[i] for i in range(len(cast(Sized, child)))}
        inputs = [_Slot(module, f"{proj}_input_quantizer")]
        parts.append(_part([*weights, *inputs], weights, inputs))
    return [p for p in parts if any(s in p.own for s in p.weights)]


def _part(slots: list[_Slot], weights: dict[_Slot, torch.Tensor], inputs: list[_Slot]) -> _Part:
    """The part, with only the quantizers calibration left enabled."""
    own = {s: q for s in slots if getattr(q := s.get(), "is_enabled", False)}
    enabled = {s: w for s, w in weights.items() if s in own}
    return _Part(own, enabled, [s for s in inputs if s in own])


def _fp8_quantizer(amax: torch.Tensor) -> Any:
    """A per-tensor FP8 (E4M3) quantizer with its range set, as max calibration sets it."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None))
    q.amax = amax.float().reshape(())
    return q


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

    def failure(self, target: QualityTarget) -> str:
        """The job's one-line error when no candidate kept `target`."""
        best = self.best
        return (
            f"no candidate keeps the target ({target.describe()}): the closest was"
            f" {best.describe() if best else 'none'}; {len(self.candidates)} tried (job log)"
        )


# (kept layers, their precision) -> candidate measured on the held-out text
Evaluate = Callable[[tuple[str, ...], str], Candidate]
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


def shortfall(c: Candidate, target: QualityTarget) -> float | None:
    """How far `c` is from the target's quality parts: 1 is exactly at the limit, below 1
    keeps it. Perplexity counts in log space (what adds up over layers), as KL does."""
    parts = []
    if target.max_ppl_increase_pct is not None and c.ppl_change_pct is not None:
        ratio = math.log1p(max(c.ppl_change_pct, -99.0) / 100)
        parts.append(ratio / math.log1p(target.max_ppl_increase_pct / 100))
    if target.max_kl is not None and c.kl is not None:
        parts.append(c.kl / target.max_kl)
    return max(parts) if parts else None


def keep_layers(
    layers: Keeps,
    order: list[str],
    evaluate: Evaluate,
    target: QualityTarget,
    size_of: Callable[[tuple[str, ...], str], int],
    candidates: list[Candidate],
    precision: str = "bf16",
    sensitivity: dict[str, float] | None = None,
    start: Candidate | None = None,
) -> Candidate | None:
    """The fewest of the most sensitive layers to keep in `precision`, found by bisection.

    With the layers' `sensitivity` and `start` (the candidate that keeps none), each step
    guesses instead of halving: the target's shortfall is taken as linear in the share of
    the total sensitivity kept, between the two nearest measured candidates (the end with
    every layer kept counts as 0). After three guesses in a row that did not halve the
    range comes a plain halving, so the worst case stays within about four times the
    bisection's; on the measured curves it needs about a quarter fewer candidates.
    """
    # Keeping every layer in BF16 would publish the original: one stays quantized.
    most = len(order) - (precision == "bf16")
    if target.max_size_gb is not None:
        while most > 0 and size_of(tuple(order[:most]), precision) > target.max_size_gb * 1e9:
            most -= 1
    share = _kept_share(order, sensitivity) if sensitivity and start else None

    def trial(k: int) -> Candidate:
        kept = tuple(order[:k])
        layers.keep(kept, precision)
        c = judge(evaluate(kept, precision), target)
        candidates.append(c)
        return c

    def guess(lo: int, hi: int, lo_c: Candidate | None, hi_c: Candidate | None) -> int | None:
        if share is None or lo_c is None:
            return None
        e_lo = shortfall(lo_c, target)
        e_hi, x_hi = (0.0, 1.0) if hi_c is None else (shortfall(hi_c, target), share[hi])
        if e_lo is None or e_hi is None or e_lo <= max(e_hi, 1.0):
            return None
        x = share[lo] + (x_hi - share[lo]) * (e_lo - 1) / (e_lo - e_hi)
        k = next((i for i, v in enumerate(share) if v >= x), hi)
        return min(max(k, lo + 1), hi - 1)

    # Keeping more of the most sensitive layers only helps: the answer is the smallest
    # k in [1, most] that keeps the target, if any does. lo fails; hi keeps it (most + 1
    # stands for "none found yet").
    lo, hi = 0, most + 1
    lo_c, hi_c = start, None
    slow = 0  # guesses in a row that did not halve the range
    while hi - lo > 1:
        width = hi - lo
        k = guess(lo, hi, lo_c, hi_c) if slow < 3 else None
        c = trial((lo + hi) // 2 if k is None else k)
        if c.meets:
            hi, hi_c = len(c.kept), c
        else:
            lo, lo_c = len(c.kept), c
        slow = slow + 1 if k is not None and (hi - lo) * 2 > width else 0
    if hi > most:
        layers.keep(())
        return None
    assert hi_c is not None
    layers.keep(hi_c.kept, precision)
    return hi_c


def _kept_share(order: list[str], sensitivity: dict[str, float]) -> list[float]:
    """share[k]: the part of the total sensitivity that keeping order[:k] removes."""
    weights = [max(sensitivity.get(u, 0.0), 0.0) for u in order]
    total = sum(weights) or 1.0
    share, acc = [0.0], 0.0
    for w in weights:
        acc += w
        share.append(acc / total)
    return share
